"""The reference model in parity/ against transformers' GPTNeoXForCausalLM, its KV cache, fp16 and its loaders."""

import numpy as np
import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from neox_jax.config import NeoXConfig
from parity.load import load_deepspeed, load_hf
from parity.model import GPTNeoX, KVCache

from conftest import tiny_config


def tiny(**changes) -> NeoXConfig:
    return tiny_config(**{"max_position_embeddings": 128, **changes})


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Weights of a scale that gives O(1) activations and peaked logits (the default init's 0.02 std makes
    every logit nearly equal, which would hide layout bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "layernorm" in name or "layer_norm" in name:
                p.copy_(1 + 0.2 * noise if name.endswith("weight") else 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif "embed_in" in name:
                p.copy_(noise)
            else:
                p.copy_(noise * (3.0 if "embed_out" in name else 1.0) / p.shape[1] ** 0.5)


def hf_reference(tmp_path, config: NeoXConfig, seed: int = 0) -> GPTNeoXForCausalLM:
    """A random transformers model, saved to tmp_path/hf."""
    torch.manual_seed(seed)
    hf = GPTNeoXForCausalLM(GPTNeoXConfig(**config.to_hf_dict("float32"), attn_implementation="eager")).eval()
    randomize_(hf, seed)
    if config.tie_word_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.gpt_neox.embed_in.weight.data_ptr()
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)
    return hf


CASES = {
    "parallel-tanh-rp0.25-hd16": dict(parallel_residual=True, activation="gelu_tanh", rotary_pct=0.25),
    "sequential-exact-rp0.5-hd16-eps0.05": dict(parallel_residual=False, activation="gelu", rotary_pct=0.5,
                                                layer_norm_eps=0.05),  # an eps that moves the logits
    "parallel-exact-rp1.0-hd8": dict(parallel_residual=True, activation="gelu", rotary_pct=1.0, num_heads=8),
    "sequential-tanh-rp0.25-hd8-tied": dict(parallel_residual=False, activation="gelu_tanh", rotary_pct=0.25,
                                            num_heads=8, tie_word_embeddings=True, rotary_base=500.0),
}


@pytest.mark.parametrize("case", CASES)
def test_matches_transformers(tmp_path, case):
    config = tiny(**CASES[case])
    hf = hf_reference(tmp_path, config)
    ours = load_hf(tmp_path / "hf")
    assert ours.config == config
    tokens = torch.randint(0, config.vocab_size, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(tokens, output_hidden_states=True)
    logits, hidden = ours(tokens, return_hidden=True)
    scale = expected.logits.abs().max()
    assert scale > 3  # peaked enough to mean something
    torch.testing.assert_close(logits, expected.logits, atol=1e-5 * scale, rtol=1e-5)
    # transformers' last hidden state is after the final LayerNorm; ours stops before it.
    assert hidden.shape == (config.num_layers + 1, 2, 37, config.hidden_size)
    for i in range(config.num_layers):
        torch.testing.assert_close(hidden[i], expected.hidden_states[i], atol=1e-5, rtol=1e-5)


def test_kv_cache_matches_full_forward(tmp_path):
    config = tiny(rotary_pct=0.5)
    hf_reference(tmp_path, config)
    model = load_hf(tmp_path / "hf")
    prompt = [5, 17, 3, 42, 8, 11, 60]
    new, margins = model.generate(prompt, 12, stop_token=None, return_margins=True)
    assert len(new) == len(margins) == 12

    # Same tokens and the same logits, step by step, as recomputing the whole sequence without a cache.
    seq = prompt + new
    full = model(torch.tensor([seq]))[0]
    assert [int(t) for t in full[len(prompt) - 1:-1].argmax(-1)] == new
    cache = KVCache(config.num_layers)
    pieces = [model(torch.tensor([prompt]), cache=cache)[0]]
    for t in new[:-1]:
        pieces.append(model(torch.tensor([[t]]), cache=cache)[0])
    torch.testing.assert_close(torch.cat(pieces), full[:-1], atol=1e-5, rtol=1e-5)
    top2 = full[len(prompt) - 1:-1].topk(2).values
    np.testing.assert_allclose(margins, (top2[:, 0] - top2[:, 1]).numpy(), atol=1e-5)


def test_generate_stops_before_stop_token(tmp_path):
    config = tiny()
    hf_reference(tmp_path, config)
    model = load_hf(tmp_path / "hf")
    prompt = [5, 17, 3]
    free = model.generate(prompt, 8, stop_token=None)
    stop = free[3]
    stopped, margins = model.generate(prompt, 8, stop_token=stop, return_margins=True)
    assert stopped == free[:free.index(stop)]
    assert len(margins) == len(stopped) + 1  # the step that produced the stop token is reported too


def test_fp16_finite_on_full_context_and_uses_fp16_angles():
    """2048 tokens in fp16: finite, and equal to the fp32 model given the fp16-angle rotary tables (so the
    fp16 model differs only by its rounded activations). Full rotary and QKV weights x1.5 make the angles
    matter: measured relative error (norm) 6.9e-4 against fp32 with fp16-angle tables, 1.6e-2 when the fp16
    model is given fp32-angle tables (and 1.6e-2 between the right fp16 model and plain fp32); the bound is 3e-3."""
    from parity.model import rotary_tables

    config = tiny(num_layers=1, max_position_embeddings=2048, vocab_size=64, rotary_pct=1.0)
    model = GPTNeoX(config, torch.float16)
    randomize_(model, 0)
    with torch.no_grad():
        model.layers[0].attention.query_key_value.weight.mul_(1.5)
    tokens = torch.randint(0, config.vocab_size, (1, 2048), generator=torch.Generator().manual_seed(0))
    logits, hidden = model(tokens, return_hidden=True)
    assert logits.dtype == torch.float16
    assert torch.isfinite(logits).all() and torch.isfinite(hidden).all()

    model32 = GPTNeoX(config, torch.float32)
    model32.load_state_dict(model.state_dict())
    plain = model32(tokens)
    cos, sin = rotary_tables(config.rotary_dim, config.rotary_base, 2048, torch.float16, "cpu")
    model32._rotary = (cos.float(), sin.float())  # fp16 angles, fp32 everything else
    ref = model32(tokens)
    rel = lambda a, b: float((a.float() - b).norm() / b.norm())  # noqa: E731
    assert rel(logits, ref) < 3e-3, rel(logits, ref)
    assert rel(logits, plain) > 5e-3  # the fp16 angles are what the comparison above recognises


def test_fp16_rotary_tables_are_computed_in_fp16():
    """The angle is rounded to fp16 before cos, as GPT-NeoX's `.half()`-converted inv_freq buffer made it."""
    from parity.model import rotary_tables

    cos16, _ = rotary_tables(16, 10000.0, 2048, torch.float16, "cpu")
    inv_freq = (1.0 / 10000.0 ** (torch.arange(0, 16, 2).float() / 16)).half()
    angle = (torch.tensor(2047.0).half() * inv_freq[1]).float()  # rounded to fp16
    assert cos16[2047, 1] == torch.cos(angle).half()
    cos32, _ = rotary_tables(16, 10000.0, 2048, torch.float32, "cpu")
    assert (cos32 - cos16.float()).abs().max() > 0.1  # fp16 angles above 512 sit on a 0.5 grid


@pytest.mark.parametrize("ranks,changes", [
    (2, dict(parallel_residual=True)),
    (2, dict(parallel_residual=False, tie_word_embeddings=True, activation="gelu")),
    (1, dict(parallel_residual=True, rotary_pct=0.5)),
])
def test_deepspeed_loader_equals_hf_loader(tmp_path, ranks, changes):
    from neox_jax.checkpoints.synthetic import random_tensors, write_deepspeed_checkpoint, write_hf_checkpoint
    from parity.load import deepspeed_config

    config = tiny(**changes)
    tensors = random_tensors(config, seed=3)
    write_deepspeed_checkpoint(tmp_path / "ds", config, tensors, ranks=ranks, step=7)
    write_hf_checkpoint(tmp_path / "hf", config, tensors, dtype=np.float16)

    assert deepspeed_config(tmp_path / "ds") == config  # configs/model.yml + vocabulary from the shards
    ds = load_deepspeed(tmp_path / "ds", config)  # a parent folder with `latest`
    hf = load_hf(tmp_path / "hf")
    hf_params = dict(hf.named_parameters())
    for name, p in ds.named_parameters():
        if "layernorm" in name or "layer_norm" in name or name.endswith("dense.bias") or "4h_to_h.bias" in name:
            # Merged from per-rank fp16 parts (a sum or a mean): equal up to the last fp16 bit.
            torch.testing.assert_close(p, hf_params[name], atol=1e-4, rtol=2e-3, msg=name)
        else:
            assert torch.equal(p, hf_params[name]), name
    tokens = torch.randint(0, config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(0))
    a, b = ds(tokens), hf(tokens)
    assert (a - b).norm() / b.norm() < 2e-3, ((a - b).norm() / b.norm())  # one fp16 bit of norm weights, not more


def test_deepspeed_loader_names_the_missing_shard(tmp_path):
    from neox_jax.checkpoints.synthetic import write_deepspeed_checkpoint
    from parity.load import LoadError

    config = tiny()
    write_deepspeed_checkpoint(tmp_path, config, ranks=2)
    (tmp_path / "layer_03-model_01-model_states.pt").unlink()
    with pytest.raises(LoadError, match="layer_03-model_01-model_states.pt: missing shard"):
        load_deepspeed(tmp_path, config)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tied", [False, True])
def test_parameters_and_every_module_output_are_in_the_model_dtype(dtype, tied):
    """The reference computes as the training code did: weights and activations in the model dtype throughout
    (fp32 only inside the kernels), so no module may hold fp32 weights or hand on fp32 activations."""
    config = tiny(tie_word_embeddings=tied)
    model = GPTNeoX(config, dtype)
    randomize_(model, seed=0)
    assert [name for name, p in model.named_parameters() if p.dtype != dtype] == []
    assert len(list(model.parameters())) == 3 + 12 * config.num_layers + (0 if tied else 1)
    outputs = []
    for name, module in model.named_modules():
        if name:
            module.register_forward_hook(lambda m, args, out, name=name: outputs.append((name, out)))
    logits = model(torch.tensor([[1, 2, 3, 4]]))
    assert logits.dtype == dtype and logits.shape == (1, 4, config.vocab_size)
    tensors = [(name, t) for name, out in outputs for t in (out if isinstance(out, tuple) else (out,))
               if isinstance(t, torch.Tensor)]
    assert len(tensors) >= 7 * config.num_layers  # norms, projections, MLP, attention and layer outputs
    assert [name for name, t in tensors if t.dtype != dtype] == []
