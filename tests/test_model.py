"""The Flax model against Hugging Face transformers' GPTNeoXForCausalLM, and its own invariants."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import neox_jax
from neox_jax import model as model_module
from neox_jax.model import KVCache, NeoX, NeoXOutput, rotary_tables

from conftest import tiny_config

VARIANTS = {
    "parallel-tanh-q": dict(parallel_residual=True, activation="gelu_tanh", rotary_pct=0.25),
    "sequential-exact-half-eps": dict(parallel_residual=False, activation="gelu", rotary_pct=0.5,
                                      layer_norm_eps=0.05),  # an eps that moves the logits
    "parallel-exact-full": dict(parallel_residual=True, activation="gelu", rotary_pct=1.0),
    "sequential-tanh-head32": dict(parallel_residual=False, activation="gelu_tanh", num_heads=2, rotary_pct=0.25),
    "tied-head8": dict(num_heads=8, rotary_pct=0.5, tie_word_embeddings=True),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_transformers(variant, hf_model_dir, rng):
    config = tiny_config(**VARIANTS[variant])
    path, reference = hf_model_dir(config)
    model = neox_jax.load(path, dtype="float32", progress=False)
    tokens = rng.integers(0, config.vocab_size, (3, 21))
    with torch.no_grad():
        expected = reference(torch.tensor(tokens)).logits.numpy()
    got = model.logits(tokens)
    assert got.shape == expected.shape == (3, 21, config.vocab_size)
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() <= 1e-4 * scale
    assert (got.argmax(-1) == expected.argmax(-1)).all()


def random_params(config, dtype=jnp.float32, seed=0):
    tokens = jnp.zeros((1, 1), jnp.int32)
    params = NeoX(config, dtype).init(jax.random.PRNGKey(seed), tokens, tokens)["params"]
    # Nonzero biases and LayerNorm affines so no term hides behind an identity initialisation.
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    leaves = [leaf + 0.05 * jax.random.normal(k, leaf.shape, leaf.dtype) for k, leaf in zip(keys, leaves)]
    return jax.tree.unflatten(treedef, leaves)


@pytest.mark.parametrize("parallel", [True, False])
def test_cached_decoding_equals_full_forward(parallel):
    config = tiny_config(parallel_residual=parallel)
    module = NeoX(config)
    params = random_params(config)
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 12), 0, config.vocab_size)
    positions = jnp.broadcast_to(jnp.arange(12), (2, 12))
    full = module.apply({"params": params}, tokens, positions).logits

    cache = KVCache.init(config, 2, 16, jnp.float32)
    pieces = []
    for start, stop in [(0, 5), (5, 6), (6, 7), (7, 12)]:  # a prefill, single steps, a chunk
        out = module.apply({"params": params}, tokens[:, start:stop], positions[:, start:stop], cache)
        pieces.append(out.logits)
        cache = out.cache
    assert int(cache.length) == 12
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, atol=2e-5, rtol=0)


def test_packed_segments_compute_as_prefix_plus_segment_alone():
    """One row holding a prefix and three continuations of 1, 4 and 2 tokens, each a segment whose positions
    continue the prefix's, then padding: each continuation's logits (and the prefix's) equal those of prefix +
    continuation alone, fp32. A second row, a shorter prefix, shares the batch."""
    config = tiny_config()
    module = NeoX(config)
    params = random_params(config)
    rng = np.random.default_rng(3)

    def draw(n):
        return list(rng.integers(0, config.vocab_size, n))

    rows = [(draw(7), [draw(n) for n in (1, 4, 2)]), (draw(3), [draw(n) for n in (2, 5)])]
    tokens, positions, segments = (np.zeros((2, 16), np.int32), np.full((2, 16), -1, np.int32),
                                   np.zeros((2, 16), np.int32))
    spans = []  # per row: (start, continuation) of each segment
    for b, (prefix, continuations) in enumerate(rows):
        n = len(prefix)
        tokens[b, :n], positions[b, :n], start, spans_b = prefix, np.arange(n), n, []
        for k, c in enumerate(continuations, 1):
            tokens[b, start:start + len(c)], segments[b, start:start + len(c)] = c, k
            positions[b, start:start + len(c)] = np.arange(n, n + len(c))
            spans_b.append((start, c))
            start += len(c)
        spans.append(spans_b)
    packed = module.apply({"params": params}, tokens, positions, segments=segments).logits
    for b, (prefix, continuations) in enumerate(rows):
        n = len(prefix)
        for start, c in spans[b]:
            whole = np.asarray(prefix + c)[None]
            alone = module.apply({"params": params}, whole, np.arange(whole.shape[1])[None]).logits
            np.testing.assert_allclose(packed[b, :n], alone[0, :n], atol=1e-5, rtol=0)
            np.testing.assert_allclose(packed[b, start:start + len(c)], alone[0, n:], atol=1e-5, rtol=0)
    # Without segments the continuations would see each other: the mask is what makes them equal.
    unmasked = module.apply({"params": params}, tokens, positions).logits
    start, c = spans[0][2]
    assert np.abs(unmasked[0, start:start + len(c)] - packed[0, start:start + len(c)]).max() > 1e-3
    with pytest.raises(ValueError, match="without a cache"):
        module.apply({"params": params}, tokens, positions, KVCache.init(config, 2, 16, jnp.float32),
                     segments=segments)


def test_padding_is_invisible():
    """A left-padded row (positions -1) gives the same logits as the unpadded sequence."""
    config = tiny_config()
    module = NeoX(config)
    params = random_params(config)
    tokens = jnp.array([[5, 6, 7, 8]])
    alone = module.apply({"params": params}, tokens, jnp.arange(4)[None]).logits
    padded = module.apply({"params": params}, jnp.array([[0, 0, 5, 6, 7, 8]]),
                          jnp.array([[-1, -1, 0, 1, 2, 3]])).logits
    np.testing.assert_allclose(padded[:, 2:], alone, atol=2e-5, rtol=0)


def test_fp16_full_context_stays_finite_and_matches_the_training_arithmetic():
    """2048 tokens in fp16 with large activations (hidden states up to ~45, logits up to ~28): finite, and
    equal to the parity model's fp16 forward (the training code's arithmetic, fp16 rotary angles included).
    Measured max error / max logit over all 2048 positions: 0.0155 with the default (fp16) rotary tables,
    0.224 with fp32 tables; the bound is 0.05."""
    from reference_models import jax_model, parity_logits, parity_model, peaked_tensors, relative_max_error

    config = tiny_config(max_position_embeddings=2048, rotary_pct=0.5)
    tensors = peaked_tensors(config, seed=3, qkv_scale=1.5, scale=2.0)
    tokens = np.random.default_rng(3).integers(0, config.vocab_size, (1, 2048))
    model = jax_model(config, tensors, "float16")
    logits = model.logits(tokens)
    assert logits.dtype == np.float32 and np.isfinite(logits).all()
    assert np.abs(model.hidden_states(tokens)).max() > 20  # large enough to stress the fp16 range
    expected = parity_logits(parity_model(config, tensors, "float16"), tokens)
    assert np.isfinite(expected).all() and np.abs(expected).max() > 10
    error = relative_max_error(logits, expected)
    assert error < 0.05, error


def test_fp16_rotary_tables_reproduce_gpt_neox_training_code():
    """GPT-NeoX's RotaryEmbedding after model.half(): fp16 inv_freq, fp16 positions, fp16 angle products."""
    rotary_dim, base, length = 24, 10000.0, 2048
    inv_freq = (1.0 / (base ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))).half()
    t = torch.arange(length).type_as(inv_freq)
    angles = torch.einsum("i,j->ij", t, inv_freq)
    # The fp16 angles are exact, so acos recovers them; cos and sin agree to one fp16 ulp (libm differences).
    cos, sin = rotary_tables(length, rotary_dim, base, jnp.float16)
    ulp = 2.0 ** -11
    assert np.abs(cos.astype(np.float32) - angles.cos().float().numpy()).max() <= ulp
    assert np.abs(sin.astype(np.float32) - angles.sin().float().numpy()).max() <= ulp
    recovered = np.arctan2(sin.astype(np.float64), cos.astype(np.float64))
    wrapped = np.angle(np.exp(1j * (recovered - angles.double().numpy())))
    assert np.abs(wrapped).max() < 2e-3  # fp32 angles would be off by up to 0.5 rad
    # fp32 tables (what Hugging Face uses) differ by up to the fp16 angle rounding: 0.5 rad above 1024.
    cos32, _ = rotary_tables(length, rotary_dim, base, jnp.float32)
    assert np.abs(cos32 - cos.astype(np.float32)).max() > 0.1


def test_the_docs_pure_model_example_runs_with_only_the_imports_it_shows(tmp_path):
    """docs/generate.md's pure-model example, run as written (on a tiny model in place of ./pythia-70m):
    its one import line must be enough, and its cached step must equal the full forward pass."""
    import re

    from neox_jax.checkpoints.synthetic import write_hf_checkpoint

    from conftest import REPO

    text = (REPO / "docs" / "generate.md").read_text()
    example = next(block for block in re.findall(r"```python\n(.*?)```", text, re.S) if "KVCache.init" in block)
    path = write_hf_checkpoint(tmp_path / "m", tiny_config(vocab_size=20000))
    scope = {}
    exec(example.replace('"./pythia-70m"', repr(str(path))), scope)  # a fresh namespace: nothing pre-imported
    model, next_token = scope["model"], np.asarray(scope["next_token"])
    full = model.logits(np.array([[12092, 1533, next_token[0, 0]]]))
    np.testing.assert_allclose(np.asarray(scope["logits"])[0, -1], full[0, -1], rtol=1e-5, atol=1e-5)


def test_the_forward_returns_named_outputs():
    config = tiny_config(num_layers=3)
    module, params = NeoX(config), random_params(config)
    tokens = jnp.array([[3, 1, 4, 1, 5]])
    positions = jnp.arange(5)[None]
    out = module.apply({"params": params}, tokens, positions, return_hidden_states=True)
    assert isinstance(out, NeoXOutput) and out.cache is None
    assert out.logits.shape == (1, 5, config.vocab_size) and out.logits.dtype == jnp.float32
    assert out.hidden_states.shape == (config.num_layers + 1, 1, 5, config.hidden_size)
    assert module.apply({"params": params}, tokens, positions).hidden_states is None
    cached = module.apply({"params": params}, tokens, positions, KVCache.init(config, 1, 8, jnp.float32),
                          last_token_only=True)
    assert cached.logits.shape == (1, 1, config.vocab_size) and int(cached.cache.length) == 5
    with pytest.raises(dataclasses.FrozenInstanceError):
        out.logits = out.logits


def test_rotary_tables_are_built_once_per_forward_not_per_layer(monkeypatch):
    calls = []

    def counted(*args):
        calls.append(args)
        return rotary_tables(*args)

    monkeypatch.setattr(model_module, "rotary_tables", counted)
    config = tiny_config(num_layers=4)
    NeoX(config).init(jax.random.PRNGKey(0), jnp.zeros((1, 3), jnp.int32), jnp.zeros((1, 3), jnp.int32))
    assert len(calls) == 1


@pytest.mark.parametrize("dtype, tables", [("bfloat16", "float32"), ("float16", "float16"), ("float32", "float32")])
def test_the_model_used_directly_builds_the_rotary_tables_load_does(dtype, tables):
    """`NeoX(config, bfloat16)` on its own and `load(dtype="bfloat16")` run the same forward: the rule that
    bf16 keeps fp32 rotary tables belongs to the model. bf16 tables would move the logits visibly."""
    from neox_jax.dtypes import lookup
    from reference_models import jax_model, peaked_tensors

    config = tiny_config(max_position_embeddings=256, rotary_pct=1.0)
    model = jax_model(config, peaked_tensors(config, seed=5, qkv_scale=1.5), dtype)  # as load builds it
    direct = NeoX(config, lookup(dtype).jax)
    assert model.rotary_dtype == tables and direct.rotary_table_dtype == jnp.dtype(tables)
    # One bucket of rows and tokens, so that both run the same program on the same shapes.
    rows, length = model.decoder.batch_size(1), 256
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (rows, length))
    positions = jnp.broadcast_to(jnp.arange(length), (rows, length))
    via_load = model.logits(tokens)
    alone = np.asarray(jax.jit(direct.apply)({"params": model.params}, tokens, positions).logits)
    np.testing.assert_allclose(alone, via_load, atol=1e-5 * np.abs(via_load).max(), rtol=0)
    if dtype == "bfloat16":
        bf16_tables = NeoX(config, jnp.bfloat16, jnp.bfloat16).apply({"params": model.params}, tokens, positions)
        assert np.abs(np.asarray(bf16_tables.logits) - via_load).max() > 0.05 * np.abs(via_load).max()
