"""The synthetic checkpoint writers: tensors, file layout, and the per-rank splits GPT-NeoX training produces."""

import numpy as np
import pytest
import torch

from conftest import tiny_config
from neox_jax.checkpoints import expected_shapes, hf, synthetic
from neox_jax.checkpoints.deepspeed import rotary_inv_freq


def load(path):
    return torch.load(path, weights_only=True, map_location="cpu")


def test_random_tensors_order_shapes_and_scales():
    config = tiny_config()
    tensors = synthetic.random_tensors(config, seed=3)
    assert list(tensors) == list(expected_shapes(config))
    assert all(tensors[n].shape == s and tensors[n].dtype == np.float32 for n, s in expected_shapes(config).items())
    ln_w = tensors["gpt_neox.layers.0.input_layernorm.weight"]
    assert abs(ln_w.mean() - 1) < 0.05 and 0.05 < ln_w.std() < 0.2
    assert np.abs(tensors["gpt_neox.layers.1.mlp.dense_4h_to_h.bias"]).min() > 0
    np.testing.assert_array_equal(synthetic.random_tensors(config, seed=3)["embed_out.weight"],
                                  tensors["embed_out.weight"])
    assert not np.array_equal(synthetic.random_tensors(config, seed=4)["embed_out.weight"],
                              tensors["embed_out.weight"])
    assert synthetic.random_tensors(config, dtype=np.float16)["embed_out.weight"].dtype == np.float16
    assert "embed_out.weight" not in synthetic.random_tensors(tiny_config(tie_word_embeddings=True))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_write_hf_checkpoint_reads_back(tmp_path, dtype):
    config = tiny_config()
    tensors = synthetic.random_tensors(config)
    out = synthetic.write_hf_checkpoint(tmp_path / "hf", config, tensors, dtype=dtype)
    ckpt = hf.HFCheckpoint(out)
    assert ckpt.config == config
    for name, array in ckpt.tensors():
        assert array.dtype.name == dtype
        np.testing.assert_allclose(array.astype(np.float32), tensors[name], rtol=1e-2 if dtype == "bfloat16" else 0)


@pytest.mark.parametrize("tied", [False, True])
def test_pipeline_file_layout(tmp_path, tied):
    config = tiny_config(num_layers=3, tie_word_embeddings=tied)
    root = synthetic.write_deepspeed_checkpoint(tmp_path / "ckpt", config, ranks=2, step=42)
    step_dir = root / "global_step42"
    assert (root / "latest").read_text().strip() == "global_step42"
    assert (root / "configs" / "model.yml").is_file()
    indices = [0, 2, 3, 4, 6] + ([] if tied else [7])
    expected = {f"layer_{i:02d}-model_{r:02d}-model_states.pt" for i in indices for r in range(2)}
    expected |= {f"mp_rank_{r:02d}_model_states.pt" for r in range(2)}
    assert {f.name for f in step_dir.iterdir()} == expected
    meta = load(step_dir / "mp_rank_01_model_states.pt")
    assert meta["module"] is None and meta["mp_world_size"] == 2
    layer = load(step_dir / "layer_02-model_00-model_states.pt")
    assert layer["attention.query_key_value.weight"].shape == (3 * 64 // 2, 64)
    assert layer["attention.dense.weight"].shape == (64, 32)
    assert layer["attention.query_key_value.weight"].dtype == torch.float16
    assert load(step_dir / "layer_00-model_01-model_states.pt")["word_embeddings.weight"].shape == (
        config.vocab_size // 2, 64)


@pytest.mark.parametrize("parallel", [True, False])
def test_splits_merge_back(tmp_path, parallel):
    config = tiny_config(parallel_residual=parallel)
    tensors = synthetic.random_tensors(config)
    synthetic.write_deepspeed_checkpoint(tmp_path, config, tensors, ranks=4, dtype=np.float32)
    shards = [load(tmp_path / f"layer_03-model_{r:02d}-model_states.pt") for r in range(4)]
    merged = "gpt_neox.layers.1."
    biases = [s["mlp.dense_4h_to_h.bias"] for s in shards]
    if parallel:
        assert not torch.equal(biases[0], biases[1])
        np.testing.assert_allclose(sum(biases).numpy(), tensors[merged + "mlp.dense_4h_to_h.bias"], atol=1e-6)
    else:
        assert all(torch.equal(b, biases[0]) for b in biases)
    ln = torch.stack([s["input_layernorm.weight"] for s in shards])
    assert 0 < (ln - ln[0]).abs().max() < 1e-2
    np.testing.assert_allclose(ln.mean(0).numpy(), tensors[merged + "input_layernorm.weight"], atol=1e-6)
    np.testing.assert_array_equal(torch.cat([s["mlp.dense_4h_to_h.weight"] for s in shards], 1).numpy(),
                                  tensors[merged + "mlp.dense_4h_to_h.weight"])
    for s in shards:
        torch.testing.assert_close(s["attention.rotary_emb.inv_freq"],
                                   1.0 / 10000.0 ** (torch.arange(0, 4, 2).float() / 4))


def test_fp16_row_bias_parts_sum_within_rounding(tmp_path):
    config = tiny_config()
    tensors = synthetic.random_tensors(config)
    synthetic.write_deepspeed_checkpoint(tmp_path, config, tensors, ranks=2)
    parts = [load(tmp_path / f"layer_02-model_{r:02d}-model_states.pt")["attention.dense.bias"] for r in range(2)]
    np.testing.assert_allclose(sum(p.float() for p in parts).numpy(),
                               tensors["gpt_neox.layers.0.attention.dense.bias"], atol=1e-4)


def test_inv_freq_matches_gpt_neox_formula():
    config = tiny_config(hidden_size=96 * 4, num_heads=4, intermediate_size=64)  # head_dim 96: 20B's rotary_dim 24
    expected = 1.0 / (10000.0 ** (np.arange(0, 24, 2) / 24))
    np.testing.assert_allclose(rotary_inv_freq(config).numpy(), expected, rtol=1e-6)


def test_sequential_layout_and_indivisible_ranks(tmp_path):
    config = tiny_config()
    synthetic.write_deepspeed_checkpoint(tmp_path / "seq", config, ranks=2, layout="sequential")
    assert not list((tmp_path / "seq").glob("layer_*"))
    with pytest.raises(Exception, match="not divisible"):
        synthetic.write_deepspeed_checkpoint(tmp_path / "bad", config, ranks=3)
