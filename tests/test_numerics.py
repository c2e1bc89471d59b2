"""Reduced-precision numerics against independent references, with bounds measured to separate right from wrong.

The references are `parity/`'s PyTorch GPT-NeoX (written from the training code: in fp16 it computes the
rotary angles, and everything else, in fp16 as GPT-NeoX-20B was trained) and `neox_jax`'s own fp32 path
where a test compares two of its paths. Every bound below was measured on CPU with the seeds given, for the
right configuration and for the plausible wrong one (the comment next to it says both); it sits between them.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neox_jax.model import KVCache

from conftest import tiny_config
from reference_models import jax_model, parity_logits, parity_model, peaked_tensors, relative_max_error

# Above position 1024 an fp16 angle of the first rotary frequency (1 rad per position) is rounded to a whole
# radian: fp16 and fp32 tables differ by up to 0.5 rad there. Full rotary (rotary_pct=1) and sharpened
# attention (QKV weights x1.5) make the model sensitive to it, as a trained model is.
LONG = tiny_config(max_position_embeddings=2048, rotary_pct=1.0)
LONG_TENSORS = peaked_tensors(LONG, seed=0, qkv_scale=1.5)
LONG_TOKENS = np.random.default_rng(1).integers(0, LONG.vocab_size, (1, 1280))
FAR = slice(1024, None)  # the positions compared


@pytest.fixture(scope="module")
def parity_fp16_logits():
    return parity_logits(parity_model(LONG, LONG_TENSORS, "float16"), LONG_TOKENS)


def test_fp16_uses_the_fp16_rotary_tables_the_weights_were_trained_with(parity_fp16_logits):
    """An fp16 model (default settings, as `neox_jax.load(..., dtype="float16")` makes it) against the training
    code's fp16 arithmetic at positions 1024-1279. Measured max error / max logit: 0.0027 with fp16 tables,
    0.062 with fp32 tables (rotary_dtype="float32", Hugging Face's choice); the bound is 0.01."""
    model = jax_model(LONG, LONG_TENSORS, "float16")
    assert model.rotary_dtype == "float16"
    error = relative_max_error(model.logits(LONG_TOKENS)[:, FAR], parity_fp16_logits[:, FAR])
    assert error < 0.01, error


def test_fp16_bound_rejects_fp32_tables(parity_fp16_logits):
    """The control for the test above: the same comparison with fp32 tables is far outside the bound."""
    wrong = jax_model(LONG, LONG_TENSORS, "float16", rotary_dtype="float32")
    assert relative_max_error(wrong.logits(LONG_TOKENS)[:, FAR], parity_fp16_logits[:, FAR]) > 0.03


def test_bf16_keeps_fp32_rotary_tables():
    """bf16 against the fp32 reference (fp32 tables) at positions 1024-1279. Measured max error / max logit:
    0.014 with the default fp32 tables, 0.059 with fp16 tables and 0.42 with bf16 tables (whose angles above
    1024 are rounded to multiples of 8 rad); the bound is 0.03."""
    reference = parity_logits(parity_model(LONG, LONG_TENSORS, "float32"), LONG_TOKENS)[:, FAR]
    model = jax_model(LONG, LONG_TENSORS, "bfloat16")
    assert model.rotary_dtype == "float32"
    error = relative_max_error(model.logits(LONG_TOKENS)[:, FAR], reference)
    assert error < 0.03, error
    wrong = jax_model(LONG, LONG_TENSORS, "bfloat16", rotary_dtype="bfloat16").logits(LONG_TOKENS)[:, FAR]
    assert relative_max_error(wrong, reference) > 0.1


def test_fp16_cached_decoding_equals_the_fp16_full_forward(parity_fp16_logits):
    """A 1100-token prefill through the cache, then single steps at positions 1100-1102, against one full fp16
    forward pass. Measured max error / max logit: 5.5e-4 against the full pass (4.7e-7 in fp32), 0.0015
    against the parity fp16 model; the bounds are 2e-3 and 0.01."""
    model = jax_model(LONG, LONG_TENSORS, "float16")
    full = model.logits(LONG_TOKENS[:, :1103])
    apply = jax.jit(model.module.apply)
    cache = KVCache.init(LONG, 1, 1280, jnp.float16)
    positions = np.arange(1103)[None]
    pieces = []
    for start, stop in [(0, 1100), (1100, 1101), (1101, 1102), (1102, 1103)]:
        out = apply({"params": model.params}, LONG_TOKENS[:, start:stop], positions[:, start:stop], cache)
        pieces.append(np.asarray(out.logits))
        cache = out.cache
    cached = np.concatenate(pieces, axis=1)
    assert cache.k[0].dtype == jnp.float16 and int(cache.length) == 1103
    np.testing.assert_array_equal(np.asarray(cache.positions)[0, :1103], np.arange(1103))
    assert (np.asarray(cache.positions)[0, 1103:] == -1).all()
    error = relative_max_error(cached[:, FAR], full[:, FAR])
    assert error < 2e-3, error
    assert relative_max_error(cached[:, FAR], parity_fp16_logits[:, FAR][:, :1103 - 1024]) < 0.01


SHORT = tiny_config(max_position_embeddings=64, rotary_pct=0.5, vocab_size=64)
SHORT_TENSORS = peaked_tensors(SHORT, seed=2, qkv_scale=1.5)


@pytest.mark.parametrize("dtype, bound", [("float32", 1e-5), ("float16", 5e-3)])
def test_cache_at_the_end_of_the_context(dtype, bound):
    """Positions max_position_embeddings-2 and -1 (62, 63): decoded one at a time after a 62-token prefill
    into exactly 64 slots, they equal the full forward pass and the parity model (the last rotary row is
    used, the last slot written). Measured max error / max logit: 4e-7 (fp32) and 1.4e-3 (fp16) against the
    parity model of the same dtype (0 and 0 against the full pass); the bounds are 1e-5 and 5e-3. Reading
    rotary row 62 at position 63 (a table one row short) makes it 0.18."""
    model = jax_model(SHORT, SHORT_TENSORS, dtype)
    tokens = np.random.default_rng(4).integers(0, SHORT.vocab_size, (2, 64))
    positions = np.broadcast_to(np.arange(64), (2, 64))
    full = model.logits(tokens)
    reference = parity_logits(parity_model(SHORT, SHORT_TENSORS, dtype), tokens)
    apply = jax.jit(model.module.apply)
    cache = KVCache.init(SHORT, 2, 64, model.module.dtype)
    cache = apply({"params": model.params}, tokens[:, :62], positions[:, :62], cache).cache
    steps = []
    for p in (62, 63):
        out = apply({"params": model.params}, tokens[:, p:p + 1], positions[:, p:p + 1], cache)
        steps.append(np.asarray(out.logits)[:, 0])
        cache = out.cache
    steps = np.stack(steps, axis=1)
    assert int(cache.length) == 64
    np.testing.assert_array_equal(np.asarray(cache.positions), positions)
    assert relative_max_error(steps, full[:, 62:]) < bound
    assert relative_max_error(steps, reference[:, 62:]) < bound


def test_greedy_decoding_fills_the_context_exactly():
    """A 56-token prompt and 8 new tokens end at position 63, the last of a 64-token context: every new token
    is the argmax of the full forward pass over the prompt and the tokens before it (teacher forcing), and
    of the parity model's."""
    model = jax_model(SHORT, SHORT_TENSORS, "float32")
    prompt = np.random.default_rng(5).integers(0, SHORT.vocab_size, 56).tolist()
    new = model.generate([prompt], 8, stop_token=None)[0]
    assert len(new) == 8
    sequence = np.array([prompt + new[:-1]])
    full = model.logits(sequence)[0, 55:]
    reference = parity_logits(parity_model(SHORT, SHORT_TENSORS), sequence)[0, 55:]
    assert full.argmax(-1).tolist() == new == reference.argmax(-1).tolist()
