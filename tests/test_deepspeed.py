"""Reading GPT-NeoX DeepSpeed checkpoints: merging ranks, safety, layouts, configs, and loud failures."""

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_config
from neox_jax.checkpoints import CheckpointError, expected_shapes, open_checkpoint, synthetic
from neox_jax.checkpoints.deepspeed import DeepSpeedCheckpoint, looks_like_deepspeed
from neox_jax.checkpoints.neox_yaml import config_from_neox_args, read_neox_yaml
from neox_jax.config import ConfigError


def merged(ckpt):
    return dict(ckpt.tensors())


class RunsCode:
    """Pickles as a call that would create `marker`: loading it must never execute that call."""

    def __init__(self, call, marker):
        self.call, self.marker = call, marker

    def __reduce__(self):
        if self.call == "mkdir":
            return os.mkdir, (str(self.marker),)
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.mark.parametrize("layout", ["pipeline", "sequential"])
@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_round_trip_fp32(tmp_path, ranks, tied, parallel, layout):
    config = tiny_config(tie_word_embeddings=tied, parallel_residual=parallel)
    tensors = synthetic.random_tensors(config)
    synthetic.write_deepspeed_checkpoint(tmp_path, config, tensors, ranks=ranks, dtype=np.float32, layout=layout)
    ckpt = DeepSpeedCheckpoint(tmp_path)
    assert (ckpt.config, ckpt.ranks, ckpt.layout) == (config, ranks, layout)
    got = merged(ckpt)
    assert list(got) == list(tensors)
    for name, array in got.items():
        assert array.dtype == np.float32
        np.testing.assert_allclose(array, tensors[name], rtol=1e-6, atol=1e-7, err_msg=name)
    assert ckpt.report.row_bias_rule == ("single" if ranks == 1 else "sum" if parallel else "copy")
    assert ckpt.report.inv_freq_checked == config.num_layers
    assert (ckpt.report.max_layernorm_diff > 0) == (ranks > 1)


@pytest.mark.parametrize("dtype, rtol", [("float16", 2e-3), ("bfloat16", 1.6e-2)])
@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_round_trip_half_precision_within_rounding(tmp_path, ranks, dtype, rtol):
    config = tiny_config()
    tensors = synthetic.random_tensors(config)
    synthetic.write_deepspeed_checkpoint(tmp_path, config, tensors, ranks=ranks, dtype=dtype)
    ckpt = DeepSpeedCheckpoint(tmp_path)
    for name, array in ckpt.tensors():
        assert array.dtype.name == dtype
        np.testing.assert_allclose(array.astype(np.float32), tensors[name], rtol=rtol, atol=rtol / 20, err_msg=name)
    assert ckpt.report.inv_freq_checked == config.num_layers


def test_rank_counts_agree(tmp_path):
    config = tiny_config(num_layers=3)
    tensors = synthetic.random_tensors(config, seed=7)
    results = []
    for ranks in (1, 2, 4):
        synthetic.write_deepspeed_checkpoint(tmp_path / str(ranks), config, tensors, ranks=ranks, dtype=np.float32)
        results.append(merged(DeepSpeedCheckpoint(tmp_path / str(ranks))))
    for other in results[1:]:
        for name in tensors:
            np.testing.assert_allclose(other[name], results[0][name], rtol=1e-6, atol=1e-7)


def test_bias_rule_follows_the_residual(tmp_path):
    parallel, sequential = tiny_config(parallel_residual=True), tiny_config(parallel_residual=False)
    tensors = synthetic.random_tensors(parallel)
    synthetic.write_deepspeed_checkpoint(tmp_path / "seq", sequential, tensors, dtype=np.float32)
    # Copies read under the parallel rule would be summed: the bias doubles.
    wrong = merged(DeepSpeedCheckpoint(tmp_path / "seq", parallel))
    name = "gpt_neox.layers.0.attention.dense.bias"
    np.testing.assert_allclose(wrong[name], 2 * tensors[name], rtol=1e-6)
    # Parts read under the copy rule disagree: refused, with the likely cause.
    synthetic.write_deepspeed_checkpoint(tmp_path / "par", parallel, tensors, dtype=np.float32)
    with pytest.raises(CheckpointError, match=r"layer_02-model_01.*differ.*gpt-j-residual"):
        merged(DeepSpeedCheckpoint(tmp_path / "par", sequential))


@pytest.mark.parametrize("change", [{"rotary_base": 20000.0}, {"rotary_pct": 0.5}])
def test_inv_freq_mismatch_fails(tmp_path, change):
    config = tiny_config()
    synthetic.write_deepspeed_checkpoint(tmp_path, config, ranks=2)
    with pytest.raises(CheckpointError, match=r"layer_02-model_00.*inv_freq does not match.*rotary"):
        merged(DeepSpeedCheckpoint(tmp_path, config.replace(**change)))


def test_missing_inv_freq_is_tolerated(tmp_path):
    config = tiny_config()
    synthetic.write_deepspeed_checkpoint(tmp_path, config, ranks=1)
    for f in tmp_path.glob("layer_0[23]-*"):
        state = torch.load(f, weights_only=True)
        del state["attention.rotary_emb.inv_freq"]
        torch.save(state, f)
    ckpt = DeepSpeedCheckpoint(tmp_path)
    assert list(merged(ckpt)) == list(expected_shapes(config)) and ckpt.report.inv_freq_checked == 0


def test_malicious_layer_file_is_refused(tmp_path):
    config = tiny_config()
    synthetic.write_deepspeed_checkpoint(tmp_path, config, ranks=2)
    marker = tmp_path / "pwned"
    for call in ("exec", "mkdir"):
        torch.save({"word_embeddings.weight": RunsCode(call, marker)}, tmp_path / "layer_00-model_01-model_states.pt")
        with pytest.raises(CheckpointError, match=r"layer_00-model_01-model_states\.pt: refused to unpickle"):
            DeepSpeedCheckpoint(tmp_path)
        assert not marker.exists()


def test_pipeline_mp_rank_files_are_never_unpickled(tmp_path):
    config = tiny_config()
    synthetic.write_deepspeed_checkpoint(tmp_path, config, ranks=2)
    marker = tmp_path / "pwned"
    torch.save({"module": None, "args": RunsCode("exec", marker)}, tmp_path / "mp_rank_00_model_states.pt")
    assert list(merged(DeepSpeedCheckpoint(tmp_path))) == list(expected_shapes(config))
    assert not marker.exists()


def test_sequential_file_metadata_is_inert(tmp_path):
    config = tiny_config()
    tensors = synthetic.random_tensors(config)
    synthetic.write_deepspeed_checkpoint(tmp_path, config, tensors, ranks=2, layout="sequential")
    file = tmp_path / "mp_rank_01_model_states.pt"
    state = torch.load(file, weights_only=False)
    marker = tmp_path / "pwned"
    state["args"] = RunsCode("exec", marker)
    torch.save(state, file)
    assert len(merged(DeepSpeedCheckpoint(tmp_path))) == len(tensors)
    assert not marker.exists()
    state["args"] = RunsCode("mkdir", marker)  # a blocked module: refused outright
    torch.save(state, file)
    with pytest.raises(CheckpointError, match="mp_rank_01_model_states.pt: refused to unpickle"):
        DeepSpeedCheckpoint(tmp_path)
    assert not marker.exists()


def test_corrupt_and_truncated_files(tmp_path):
    config = tiny_config()
    synthetic.write_deepspeed_checkpoint(tmp_path, config, ranks=2)
    file = tmp_path / "layer_03-model_01-model_states.pt"
    data = file.read_bytes()
    torch.save({"x": torch.zeros(100)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    legacy = (tmp_path / "legacy.pt").read_bytes()
    for broken in (data[: len(data) // 2], b"", b"not a checkpoint at all", legacy[:300]):
        file.write_bytes(broken)
        with pytest.raises(CheckpointError, match=r"layer_03-model_01-model_states\.pt: truncated or corrupt"):
            DeepSpeedCheckpoint(tmp_path).validate()


def test_missing_and_unexpected_layer_files(tmp_path):
    config = tiny_config()
    synthetic.write_deepspeed_checkpoint(tmp_path, config, ranks=2)
    with pytest.raises(CheckpointError, match=r"unexpected layer file .*layer_06"):
        DeepSpeedCheckpoint(tmp_path, config.replace(tie_word_embeddings=True))
    (tmp_path / "layer_03-model_01-model_states.pt").unlink()
    with pytest.raises(CheckpointError, match=r"missing layer file .*layer_03-model_01-model_states\.pt "
                                              r"\(expected the GPT-NeoX pipeline layout"):
        DeepSpeedCheckpoint(tmp_path)
    for f in tmp_path.glob("*model_01*"):
        f.rename(f.with_name(f.name.replace("model_01", "model_02").replace("mp_rank_01", "mp_rank_02")))
    with pytest.raises(CheckpointError, match="rank model_01 has no files"):
        DeepSpeedCheckpoint(tmp_path)


def test_shape_errors_name_file_tensor_and_shapes(tmp_path):
    config = tiny_config()
    synthetic.write_deepspeed_checkpoint(tmp_path, config, ranks=2)
    with pytest.raises(CheckpointError, match=r"layer_02-model_00-model_states\.pt: tensor "
                                              r"'mlp\.dense_h_to_4h\.weight' .* shape \(128, 64\), the config "
                                              r"expects \(64, 64\)"):
        DeepSpeedCheckpoint(tmp_path, config.replace(intermediate_size=128)).validate()
    file = tmp_path / "layer_02-model_01-model_states.pt"
    state = torch.load(file, weights_only=True)
    state["attention.dense.weight"] = state["attention.dense.weight"][:, :16].clone()
    torch.save(state, file)
    with pytest.raises(CheckpointError, match=r"layer_02-model_01.*ranks disagree on 'attention\.dense\.weight': "
                                              r"\(64, 16\).*\(64, 32\)"):
        DeepSpeedCheckpoint(tmp_path).validate()


def test_unexpected_key_is_an_error(tmp_path):
    config = tiny_config()
    synthetic.write_deepspeed_checkpoint(tmp_path, config, ranks=1)
    file = tmp_path / "layer_00-model_00-model_states.pt"
    state = torch.load(file, weights_only=True)
    state["position_embeddings.weight"] = torch.zeros(4, 64)
    torch.save(state, file)
    with pytest.raises(CheckpointError, match="unexpected tensor 'position_embeddings.weight'"):
        DeepSpeedCheckpoint(tmp_path).validate()


def test_step_folder_parent_and_latest(tmp_path):
    config = tiny_config()
    root = synthetic.write_deepspeed_checkpoint(tmp_path / "run", config, ranks=2, step=150)
    for path in (root, root / "global_step150"):
        ckpt = DeepSpeedCheckpoint(path)  # the YAML is found in run/configs in both cases
        assert (ckpt.step, ckpt.step_dir.name, ckpt.config) == (150, "global_step150", config)
        assert looks_like_deepspeed(path)
        assert isinstance(open_checkpoint(path), DeepSpeedCheckpoint)
    synthetic.write_deepspeed_checkpoint(root, config, ranks=2, step=300)
    assert DeepSpeedCheckpoint(root).step == 300  # `latest` now names the newer step
    (root / "latest").unlink()
    with pytest.raises(CheckpointError, match=r"several steps \(global_step150, global_step300\)"):
        DeepSpeedCheckpoint(root)
    (root / "latest").write_text("global_step999")
    with pytest.raises(CheckpointError, match="names 'global_step999'"):
        DeepSpeedCheckpoint(root)
    assert not looks_like_deepspeed(tmp_path)


def test_no_config_found(tmp_path):
    synthetic.write_deepspeed_checkpoint(tmp_path, tiny_config(), ranks=1, write_config_yaml=False)
    with pytest.raises(CheckpointError, match=r"no model config.*--config.*--preset"):
        DeepSpeedCheckpoint(tmp_path)


def test_explicit_config_vocab_must_match(tmp_path):
    config = tiny_config(vocab_size=96)
    synthetic.write_deepspeed_checkpoint(tmp_path, config, ranks=2)
    with pytest.raises(CheckpointError, match=r"word_embeddings\.weight.*\(48, 64\).*\(64, 64\)"):
        DeepSpeedCheckpoint(tmp_path, config.replace(vocab_size=128)).validate()


def test_yaml_keys_with_dashes_and_underscores(tmp_path):
    (tmp_path / "a.yml").write_text(
        '# comment\n{\n  "num-layers": 3, "hidden_size": 64, "num-attention-heads": 4,\n'
        '  "seq-length": 128, "pos-emb": "rotary", "rotary-pct": 0.5, "rotary_emb_base": 5e4,\n'
        '  "layernorm-epsilon": 1e-6, "gpt-j-residual": true, "bias_gelu_fusion": true,\n'
        '  "no-weight-tying": "true",\n}\n')
    (tmp_path / "b.yml").write_text('{"train-iters": 10, "hidden-size": 64}\n')
    config = config_from_neox_args(read_neox_yaml([tmp_path / "a.yml", tmp_path / "b.yml"]), 96)
    assert config == tiny_config(vocab_size=96, num_layers=3, intermediate_size=256, rotary_pct=0.5, rotary_base=5e4,
                                 layer_norm_eps=1e-6, parallel_residual=True, activation="gelu_tanh",
                                 max_position_embeddings=128, tie_word_embeddings=False)
    # GPT-NeoX's own defaults: tied embeddings, sequential residual, exact GELU, full rotary.
    defaults = config_from_neox_args({"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                                      "max_position_embeddings": 64, "pos_emb": "rotary"}, 96)
    assert (defaults.tie_word_embeddings, defaults.parallel_residual, defaults.activation,
            defaults.rotary_pct) == (True, False, "gelu", 1.0)


@pytest.mark.parametrize("args, message", [
    ({"pos_emb": "learned"}, "pos-emb = 'learned' is not supported"),
    ({"pos_emb": None}, "GPT-NeoX's default is 'learned'"),
    ({"activation": "swiglu"}, "activation 'swiglu' is not supported"),
    ({"num_layers": None}, "no 'num-layers'"),
    ({"layernorm_epsilon": "small"}, r"key 'layernorm-epsilon' = 'small' \(a string\): expected a finite number > 0"),
    ({"num_attention_heads": 5}, "is not divisible by key 'num-attention-heads' = 5"),
])
def test_yaml_errors(args, message):
    base = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 64, "pos_emb": "rotary"}
    merged_args = {k: v for k, v in {**base, **args}.items() if v is not None}
    with pytest.raises(ConfigError, match=message):
        config_from_neox_args(merged_args, 96, "x.yml")


def test_yaml_conflicts_and_model_parallel_size(tmp_path):
    (tmp_path / "a.yml").write_text('{"num-layers": 2}')
    (tmp_path / "b.yml").write_text('{"num_layers": 3}')
    with pytest.raises(ConfigError, match=r"b\.yml: num_layers = 3 conflicts with 2 in .*a\.yml"):
        read_neox_yaml([tmp_path / "a.yml", tmp_path / "b.yml"])
    config = tiny_config()
    synthetic.write_deepspeed_checkpoint(tmp_path / "ckpt", config, ranks=2)
    yaml_text = synthetic.neox_yaml(config, ranks=4)
    (tmp_path / "four.yml").write_text(yaml_text)
    with pytest.raises(CheckpointError, match="model-parallel-size 4, but .* holds 2 tensor-parallel rank"):
        DeepSpeedCheckpoint(tmp_path / "ckpt", tmp_path / "four.yml")


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no such directory"):
        DeepSpeedCheckpoint(tmp_path / "absent")
    with pytest.raises(CheckpointError, match="not a GPT-NeoX DeepSpeed checkpoint"):
        DeepSpeedCheckpoint(tmp_path)
    synthetic.write_deepspeed_checkpoint(tmp_path, tiny_config(), ranks=1)
    for f in tmp_path.glob("layer_*"):
        f.unlink()
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states\.pt: holds no weights under 'module'"):
        DeepSpeedCheckpoint(tmp_path)


def test_streams_one_index_at_a_time(tmp_path, monkeypatch):
    config = tiny_config(num_layers=3)
    synthetic.write_deepspeed_checkpoint(tmp_path, config, ranks=2)
    ckpt = DeepSpeedCheckpoint(tmp_path)
    loaded, seen = [], []
    real = ckpt._shard
    monkeypatch.setattr(ckpt, "_shard", lambda idx, rank: loaded.append(idx) or real(idx, rank))
    stream = ckpt.tensors(on_file=lambda f: seen.append(Path(f).name))
    next(stream)
    assert set(loaded) == {0}  # only the embedding shards were opened for the first tensor
    list(stream)
    assert seen == [f.name for f in ckpt.files]


def test_the_config_source_and_its_errors_name_the_yaml(tmp_path):
    synthetic.write_deepspeed_checkpoint(tmp_path / "ckpt", tiny_config(), ranks=2)
    assert DeepSpeedCheckpoint(tmp_path / "ckpt").config_source == str(tmp_path / "ckpt" / "configs" / "model.yml")
    (tmp_path / "four.yml").write_text(synthetic.neox_yaml(tiny_config(), ranks=4))
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(tmp_path / 'four.yml'))} says model-parallel-size "
                                              rf"4, but {re.escape(str(tmp_path / 'ckpt'))}"):
        DeepSpeedCheckpoint(tmp_path / "ckpt", tmp_path / "four.yml")


@pytest.mark.parametrize("tied", [False, True])
def test_a_checkpoint_of_another_depth_is_named_as_such(tmp_path, tied):
    """GPT-NeoX's pipeline layout: layer_00 the embedding, layer_02.. the transformer layers, then the final norm
    (and the untied head) after an empty index; a 2-layer model read with a 6-layer config says so."""
    synthetic.write_deepspeed_checkpoint(tmp_path, tiny_config(num_layers=2, tie_word_embeddings=tied), ranks=1)
    names = sorted(f.name.split("-")[0] for f in tmp_path.glob("layer_*"))
    assert names == ["layer_00", "layer_02", "layer_03", "layer_05"] + ([] if tied else ["layer_06"])
    last = "layer_05" if tied else "layer_06"
    with pytest.raises(CheckpointError, match=rf"holds a 2-layer model \(layer files up to {last}\), the config "
                                              rf"describes 6 layers"):
        DeepSpeedCheckpoint(tmp_path, tiny_config(num_layers=6, tie_word_embeddings=tied))


def test_non_finite_values_name_the_rank_file_and_tensor(tmp_path):
    synthetic.write_deepspeed_checkpoint(tmp_path, tiny_config(), ranks=2)
    file = tmp_path / "layer_03-model_01-model_states.pt"
    state = torch.load(file, weights_only=True)
    state["mlp.dense_4h_to_h.bias"][:3] = float("nan")
    torch.save(state, file)
    with pytest.raises(CheckpointError, match=r"layer_03-model_01-model_states\.pt: tensor 'mlp\.dense_4h_to_h\.bias' "
                                              r"holds 3 non-finite values \(NaN or infinity\) of 64"):
        list(DeepSpeedCheckpoint(tmp_path).tensors())


def test_a_missing_embedding_is_named(tmp_path):
    synthetic.write_deepspeed_checkpoint(tmp_path, tiny_config(), ranks=1)
    file = tmp_path / "layer_00-model_00-model_states.pt"
    torch.save({}, file)
    with pytest.raises(CheckpointError, match=r"layer_00-model_00-model_states\.pt: missing tensor "
                                              r"'word_embeddings\.weight'$"):
        DeepSpeedCheckpoint(tmp_path)


@pytest.mark.parametrize("ranks, parallel, rule, reason", [
    (2, True, "sum", "the model uses the parallel (GPT-J) residual: each rank adds its own row-parallel bias "
                     "before the all-reduce"),
    (2, False, "copy", "sequential residual: the bias is added once after the all-reduce"),
    (1, True, "single", "one tensor-parallel rank: nothing to merge"),
])
def test_the_merge_report_says_which_bias_rule_and_why(tmp_path, ranks, parallel, rule, reason):
    synthetic.write_deepspeed_checkpoint(tmp_path, tiny_config(parallel_residual=parallel), ranks=ranks)
    report = DeepSpeedCheckpoint(tmp_path).report
    assert (report.ranks, report.row_bias_rule, report.row_bias_reason) == (ranks, rule, reason)


def test_an_integer_inv_freq_is_a_mismatch_not_a_crash(tmp_path):
    synthetic.write_deepspeed_checkpoint(tmp_path, tiny_config(), ranks=1)
    file = tmp_path / "layer_02-model_00-model_states.pt"
    state = torch.load(file, weights_only=True)
    state["attention.rotary_emb.inv_freq"] = torch.ones_like(state["attention.rotary_emb.inv_freq"], dtype=torch.int64)
    torch.save(state, file)
    with pytest.raises(CheckpointError, match=r"layer_02-model_00.*inv_freq does not match"):
        merged(DeepSpeedCheckpoint(tmp_path))


def test_a_value_that_is_not_a_tensor_is_named_with_its_type(tmp_path):
    synthetic.write_deepspeed_checkpoint(tmp_path, tiny_config(), ranks=1)
    torch.save({"word_embeddings.weight": "weights"}, tmp_path / "layer_00-model_00-model_states.pt")
    with pytest.raises(CheckpointError, match=r"layer_00-model_00-model_states\.pt: 'word_embeddings\.weight' is a "
                                              r"str, not a tensor$"):
        DeepSpeedCheckpoint(tmp_path)


def test_the_expected_inv_freq_is_gpt_neoxs():
    """Written out by hand (the synthetic writer stores what the reader expects, so it cannot be the check):
    rotary_dim 8 of a 32-wide head at rotary_pct 0.25, base 10000: 10000 ** -(0, 2, 4, 6) / 8."""
    from neox_jax.checkpoints.deepspeed import rotary_inv_freq

    got = rotary_inv_freq(tiny_config(num_heads=2, rotary_pct=0.25)).numpy()
    np.testing.assert_allclose(got, [1.0, 0.1, 0.01, 0.001], rtol=1e-6)


def fp32_merge(path, config, ranks) -> dict[str, np.ndarray]:
    """The ranks' shards merged in fp32, written out from the files (GPT-NeoX's rules, not the reader's code)."""
    from neox_jax.checkpoints.deepspeed import pipeline_layout, shard_file

    out = {}
    for layer in pipeline_layout(config):
        states = [torch.load(path / shard_file(layer.idx, r), weights_only=True) for r in range(ranks)]
        for p in layer.params:
            parts = np.stack([s[p.key].float().numpy() for s in states])
            if p.key.endswith(("layernorm.weight", "layernorm.bias", "norm.weight", "norm.bias")):
                out[p.hf_name] = parts.mean(0)
            elif p.key.endswith(("attention.dense.bias", "dense_4h_to_h.bias")):
                out[p.hf_name] = parts.sum(0)
            else:
                out[p.hf_name] = np.concatenate(list(parts), axis=1 if p.key.endswith(
                    ("attention.dense.weight", "dense_4h_to_h.weight")) else 0)
    return out


@pytest.mark.parametrize("ranks", [2, 4])
def test_merged_float32_is_the_fp32_merge_of_fp16_shards(tmp_path, ranks):
    """Sums and means are rounded once, to the dtype asked for: float32 holds the exact merge, float16 that
    merge rounded once (not the fp16 sum of fp16 parts, nor a float32 copy of an fp16 merge)."""
    import jax.numpy as jnp

    import neox_jax

    config = tiny_config()
    synthetic.write_deepspeed_checkpoint(tmp_path, config, ranks=ranks, dtype=np.float16)
    exact = fp32_merge(tmp_path, config, ranks)
    as_float32 = dict(DeepSpeedCheckpoint(tmp_path).tensors(dtype=np.float32))
    rounded_in_fp16 = merged(DeepSpeedCheckpoint(tmp_path))
    for name, value in exact.items():
        np.testing.assert_allclose(as_float32[name].astype(np.float32), value, rtol=1e-6, atol=0, err_msg=name)
        np.testing.assert_array_equal(rounded_in_fp16[name], value.astype(np.float16), err_msg=name)
    norm = "gpt_neox.final_layer_norm.weight"
    assert np.abs(rounded_in_fp16[norm].astype(np.float32) - exact[norm]).max() > 1e-5  # the test can tell
    params = neox_jax.load(tmp_path, "float32", progress=False).params
    np.testing.assert_allclose(np.asarray(params["final_layer_norm"]["weight"]), exact[norm], rtol=1e-6, atol=0)
    bias = np.asarray(params["layers_1"]["mlp"]["dense_4h_to_h.bias"])
    assert bias.dtype == jnp.float32
    np.testing.assert_allclose(bias, exact["gpt_neox.layers.1.mlp.dense_4h_to_h.bias"], rtol=1e-6, atol=0)


def test_the_per_rank_stream_keeps_every_rank_as_stored(tmp_path):
    config = tiny_config(num_layers=3)
    synthetic.write_deepspeed_checkpoint(tmp_path, config, ranks=2, layernorm_jitter=0.05)
    ckpt = DeepSpeedCheckpoint(tmp_path)
    merged_stream = merged(DeepSpeedCheckpoint(tmp_path))
    rank1 = torch.load(tmp_path / "layer_04-model_01-model_states.pt", weights_only=True)
    seen = []
    for name, array in ckpt.per_rank_tensors(on_file=lambda f: seen.append(Path(f).name)):
        per_rank = name.endswith(("layernorm.weight", "layernorm.bias", "layer_norm.weight", "layer_norm.bias",
                                  "attention.dense.bias", "dense_4h_to_h.bias"))
        assert array.shape == ((2,) if per_rank else ()) + merged_stream[name].shape, name
        if not per_rank:
            np.testing.assert_array_equal(array, merged_stream[name])
        elif name.startswith("gpt_neox.layers.2."):
            key = name.removeprefix("gpt_neox.layers.2.")
            np.testing.assert_array_equal(array[1], rank1[key].numpy())
    assert seen == [f.name for f in ckpt.files]
