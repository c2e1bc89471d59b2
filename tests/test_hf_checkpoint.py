"""Hugging Face directories: the reader (layouts, aliases, errors) and the streaming writer."""

import json

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

import neox_jax
from neox_jax.checkpoints import CheckpointError, expected_shapes, open_checkpoint
from neox_jax.checkpoints.hf import INDEX_NAME, HFCheckpoint, write_hf
from neox_jax.checkpoints.synthetic import random_tensors, write_hf_checkpoint

from conftest import tiny_config


def read_all(path):
    return dict(open_checkpoint(path).tensors())


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_writer_shards_and_reader_round_trip(tmp_path, dtype):
    config = tiny_config(num_layers=3)
    tensors = {k: v.astype(dtype) for k, v in random_tensors(config).items()}
    index = write_hf(tmp_path, config, tensors.items(), shard_bytes=40_000)
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not list(tmp_path.glob("*.tmp"))
    assert set(index["weight_map"]) == set(expected_shapes(config))
    got = read_all(tmp_path)
    assert list(got) == list(expected_shapes(config))  # stream order, whatever the file order
    for name, value in tensors.items():
        assert got[name].dtype == value.dtype
        np.testing.assert_array_equal(got[name], value)


def test_transformers_sharded_save_loads_like_single_file(hf_model_dir, rng):
    config = tiny_config()
    single, _ = hf_model_dir(config, seed=3)
    sharded, _ = hf_model_dir(config.replace(max_position_embeddings=255), seed=3, max_shard_size="50KB")
    assert (sharded / INDEX_NAME).exists()
    tokens = rng.integers(0, config.vocab_size, (1, 9))
    a = neox_jax.load(single, "float32", progress=False).logits(tokens)
    b = neox_jax.load(sharded, "float32", progress=False).logits(tokens)
    np.testing.assert_array_equal(a, b)


def rewrite(path, edit):
    """Apply `edit` to the tensors of a single-file checkpoint and save it back."""
    from safetensors.numpy import load_file

    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


def single_file_checkpoint(tmp_path, config):
    path = write_hf_checkpoint(tmp_path / "ckpt", config)
    merged = read_all(path)
    for f in path.glob("model-*.safetensors"):
        f.unlink()
    (path / INDEX_NAME).unlink()
    save_file(merged, path / "model.safetensors")
    return path


def test_legacy_buffers_ignored_and_lm_head_alias(tmp_path):
    config = tiny_config()
    path = single_file_checkpoint(tmp_path, config)
    expected = read_all(path)

    def edit(t):
        t["lm_head.weight"] = t.pop("embed_out.weight")
        t["gpt_neox.layers.0.attention.bias"] = np.tril(np.ones((4, 4), bool))
        t["gpt_neox.layers.1.attention.rotary_emb.inv_freq"] = np.ones(8, np.float32)

    rewrite(path, edit)
    got = read_all(path)
    assert list(got) == list(expected)
    np.testing.assert_array_equal(got["embed_out.weight"], expected["embed_out.weight"])


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("gpt_neox.layers.1.mlp.dense_4h_to_h.bias"), "missing tensor 'gpt_neox.layers.1.mlp.dense_4h_to_h.bias'"),
    (lambda t: t.update({"gpt_neox.layers.2.input_layernorm.weight": np.ones(64, np.float32)}),
     "unexpected tensor 'gpt_neox.layers.2.input_layernorm.weight'"),
    (lambda t: t.update({"gpt_neox.layers.0.attention.dense.weight": np.ones((64, 32), np.float32)}),
     r"'gpt_neox.layers.0.attention.dense.weight' has shape \(64, 32\), the config expects \(64, 64\)"),
])
def test_bad_tensors_are_named(tmp_path, edit, message):
    path = single_file_checkpoint(tmp_path, tiny_config())
    rewrite(path, edit)
    with pytest.raises(CheckpointError, match=message):
        read_all(path)


def test_missing_and_broken_files_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="no such directory"):
        open_checkpoint(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        open_checkpoint(empty)

    config = tiny_config()
    path = write_hf_checkpoint(tmp_path / "sharded", config)
    index = json.loads((path / INDEX_NAME).read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    (path / first).write_bytes(b"\x00" * 100)  # truncated / corrupt shard
    with pytest.raises(CheckpointError, match=f"{first}: unreadable safetensors file"):
        HFCheckpoint(path)
    (path / first).unlink()
    with pytest.raises(CheckpointError, match=f"names {first}, which does not exist"):
        HFCheckpoint(path)

    bin_only = tmp_path / "bin"
    bin_only.mkdir()
    (bin_only / "config.json").write_text(json.dumps(config.to_hf_dict()))
    (bin_only / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="only PyTorch .bin weights"):
        open_checkpoint(bin_only)


def test_fp16_checkpoint_loads_as_any_dtype(tmp_path, rng):
    config = tiny_config()
    path = write_hf_checkpoint(tmp_path / "fp16", config, dtype=np.float16)
    tokens = rng.integers(0, config.vocab_size, (2, 7))
    full = neox_jax.load(path, "float32", progress=False)
    half = neox_jax.load(path, "float16", progress=False)
    assert half.params["layers_0"]["mlp"]["dense_h_to_4h.weight"].dtype == np.float16
    a, b = full.logits(tokens), half.logits(tokens)
    assert np.abs(a - b).max() < 0.02 * np.abs(a).max()
    assert (a.argmax(-1) == b.argmax(-1)).mean() > 0.9


def test_a_tensor_in_two_shards_is_refused_naming_both(tmp_path):
    from safetensors.numpy import load_file

    config, path = tiny_config(), tmp_path / "sharded"
    tensors = random_tensors(config)
    path.mkdir()
    write_hf(path, config, ((name, tensors[name]) for name in expected_shapes(config)), shard_bytes=40_000)
    first, second = sorted(set(json.loads((path / INDEX_NAME).read_text())["weight_map"].values()))[:2]
    copied = sorted(load_file(path / first))[0]
    save_file(load_file(path / second) | {copied: load_file(path / first)[copied]}, path / second)
    with pytest.raises(CheckpointError, match=rf"is stored twice: as '.*' in \S+{first} and as '.*' in \S+{second}"):
        HFCheckpoint(path)


def test_headers_are_read_without_mapping_the_files(tmp_path, monkeypatch):
    """A file larger than the host's memory cannot always be mapped; opening the checkpoint (config, index,
    every header: what the memory plan needs) must not try."""
    path = write_hf_checkpoint(tmp_path / "hf", tiny_config())

    def no_mapping(*args, **kwargs):
        raise OSError(12, "unable to mmap: Cannot allocate memory")

    monkeypatch.setattr("neox_jax.checkpoints.hf.safe_open", no_mapping)
    assert HFCheckpoint(path).config == tiny_config()


@pytest.mark.parametrize("content, message", [
    (b"", "a header of no bytes"), ((10**12).to_bytes(8, "little"), "a header of 1000000000000 bytes"),
    ((5).to_bytes(8, "little") + b"{]x{}", "its header is not JSON"),
    ((2).to_bytes(8, "little") + b"[]", "its header is not a JSON object"),
    (lambda: _header(b'{"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 99]}}'), "tensor 'x'"),
    (lambda: _header(b'{"x": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}'), "tensor 'x'"),
])
def test_corrupt_headers_are_named(tmp_path, content, message):
    path = write_hf_checkpoint(tmp_path / "hf", tiny_config())
    [shard] = {v for v in json.loads((path / INDEX_NAME).read_text())["weight_map"].values()}
    (path / shard).write_bytes(content() if callable(content) else content)
    with pytest.raises(CheckpointError, match=rf"{shard}: unreadable safetensors file \(.*{message}"):
        HFCheckpoint(path)


def _header(header: bytes) -> bytes:
    return len(header).to_bytes(8, "little") + header + b"\0" * 8


def test_a_config_of_another_architecture_is_refused(tmp_path):
    path = write_hf_checkpoint(tmp_path / "hf", tiny_config())
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"model_type": "llama"}))
    with pytest.raises(CheckpointError, match=r"config.json: key 'model_type' = 'llama': not a GPT-NeoX model"):
        open_checkpoint(path)
