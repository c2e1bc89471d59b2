"""Weight-only int8 / fp8 quantization: scales derived from the declarations, the rounding bounds, the params
on device, the compiled decode step reading the stored values (no dequantized weight), quality against the
unquantized PyTorch reference on decisive weights, and the commands' --quantize."""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import neox_jax
from neox_jax import cpu_kernels
from neox_jax import quantize as quantization
from neox_jax.api import NeoXModel
from neox_jax.checkpoints.synthetic import decisive_tensors, random_tensors, write_hf_checkpoint
from neox_jax.config import NeoXConfig
from neox_jax.decode import Compiled, Decoder
from neox_jax.params import Kind, model_params
from neox_jax.quantize import MODES, QuantizationError, QuantizedWeight, dequantize, quantize
from neox_jax.sharding import param_spec, plan_memory, make_mesh
from neox_jax.tokenizer import demo_tokenizer
from neox_jax.weights import abstract_params, build_params

from conftest import tiny_config
from test_decode import large_arrays_moved

CONFIG = tiny_config(vocab_size=64)
TENSORS = random_tensors(CONFIG, seed=3)


@pytest.fixture(scope="module")
def int8_model():
    params = build_params(CONFIG, TENSORS.items(), jnp.float32, progress=False, quantize="int8")
    return NeoXModel(CONFIG, params, quantize="int8")


def test_every_matmul_weight_and_nothing_else_is_quantized_with_scales_on_its_output_channels():
    """From the declarations: a scale per output channel (the first dim group of `[out, in]`), sharded as those
    channels are; the embedding, biases and norms stay in the model dtype."""
    tree = abstract_params(CONFIG, jnp.float16, quantize="int8")
    c = CONFIG
    expected_scales = {"query_key_value.weight": (c.num_heads, 3, c.head_dim), "dense.weight": (c.hidden_size,),
                       "dense_h_to_4h.weight": (c.intermediate_size,), "dense_4h_to_h.weight": (c.hidden_size,),
                       "embed_out": (c.vocab_size,)}
    expected_specs = {"query_key_value.weight": ("model", None, None), "dense.weight": (None,),
                      "dense_h_to_4h.weight": ("model",), "dense_4h_to_h.weight": (None,), "embed_out": ("model",)}
    for spec in model_params(CONFIG):
        node = tree
        for key in spec.tree_path:
            node = node[key]
        if spec.kind is Kind.MATMUL:
            leaf = spec.tree_path[-1]
            assert node.values.shape == spec.shape(CONFIG) and node.values.dtype == np.int8
            assert node.scale.shape == expected_scales[leaf] and node.scale.dtype == np.float32
            assert tuple(param_spec((*spec.tree_path, "scale"))) == expected_specs[leaf]
            assert param_spec((*spec.tree_path, "values")) == param_spec(spec.tree_path)
        else:
            assert node.dtype == jnp.float16 and node.shape == spec.shape(CONFIG)


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_rounding_stays_within_the_modes_grid(mode, rng):
    """int8: every weight within half a step (scale / 2) of its value; fp8 e4m3: within 2^-4 of itself
    (3 mantissa bits) or of the subnormal step; each channel's largest weight is represented exactly."""
    spec = next(s for s in model_params(CONFIG) if s.name == "attention.query_key_value.weight")
    w = rng.standard_normal(spec.shape(CONFIG)).astype(np.float32) * rng.uniform(0.01, 3, spec.shape(CONFIG)[:3] + (1,))
    w[1, 2, 3] = 0.0  # an all-zero channel
    values, scale = quantize(w, spec, CONFIG, MODES[mode])
    assert values.dtype == MODES[mode].storage and scale.shape == spec.shape(CONFIG)[:3]
    assert scale[1, 2, 3] == 1.0 and not np.asarray(values[1, 2, 3], np.float32).any()
    back, step = dequantize(values, scale), scale[..., None]
    if mode == "int8":
        assert np.all(np.abs(back - w) <= step / 2 * (1 + 1e-6))
    else:
        assert np.all(np.abs(back - w) <= np.maximum(np.abs(w) * 2.0 ** -4, step * 2.0 ** -10) * (1 + 1e-6))
    top = np.abs(w).argmax(-1)[..., None]
    np.testing.assert_allclose(np.take_along_axis(np.abs(back), top, -1), np.take_along_axis(np.abs(w), top, -1),
                               rtol=1e-6)


def test_params_on_device_hold_the_stored_values_and_a_quarter_of_fp32s_bytes(int8_model):
    """Loading quantizes on the host and places values and scales: they equal quantizing the tensor directly;
    the memory plan counts the bytes allocated."""
    params = int8_model.params
    qkv = params["layers_1"]["attention"]["query_key_value.weight"]
    assert isinstance(qkv, QuantizedWeight) and qkv.values.dtype == jnp.int8
    spec = next(s for s in model_params(CONFIG) if s.hf_name == "gpt_neox.layers.1.attention.query_key_value.weight")
    values, scale = quantize(TENSORS[spec.hf_name].reshape(spec.shape(CONFIG)), spec, CONFIG, MODES["int8"])
    np.testing.assert_array_equal(np.asarray(qkv.values), values)
    np.testing.assert_array_equal(np.asarray(qkv.scale), scale)
    allocated = sum(x.nbytes for x in jax.tree.leaves(params))
    plan = plan_memory(CONFIG, jnp.float32, make_mesh(1, 1), quantize="int8")
    assert plan.weights_per_device == allocated
    matmul = sum(np.prod(s.shape(CONFIG)) for s in model_params(CONFIG) if s.kind is Kind.MATMUL)
    fp32 = plan_memory(CONFIG, jnp.float32, make_mesh(1, 1)).weights_per_device
    assert fp32 - allocated == 3 * matmul - 4 * sum(np.prod(quantization.scale_shape(s, CONFIG))
                                                   for s in model_params(CONFIG) if s.kind is Kind.MATMUL)


def test_quantized_logits_equal_the_dequantized_weights_in_fp32(int8_model):
    """The scale factored out of the contraction computes what the dequantized fp32 weights compute."""
    dequantized = jax.tree.map(lambda w: jnp.asarray(dequantize(np.asarray(w.values), np.asarray(w.scale)))
                               if isinstance(w, QuantizedWeight) else w, int8_model.params,
                               is_leaf=lambda w: isinstance(w, QuantizedWeight))
    tokens = np.random.default_rng(0).integers(0, 64, (2, 9))
    want = NeoXModel(CONFIG, dequantized).logits(tokens)
    np.testing.assert_allclose(int8_model.logits(tokens), want, atol=2e-5 * np.abs(want).max(), rtol=0)


def float_buffers(hlo: str, min_elements: int) -> list[str]:
    """Instructions writing a float array of at least `min_elements` (weight-sized), in an optimised HLO module."""
    return [line for line in large_arrays_moved(hlo, min_elements) if " f32[" in line or " f16[" in line
            or " bf16[" in line]


def decode_program(model) -> str:
    decoder = Decoder(model.module, model.params)
    decoder.generate([[1, 2, 3]], 4, stop_token=None)
    (executable,) = decoder._decode._executables.values()
    return executable.as_text()


def test_the_decode_step_reads_the_int8_weights_not_a_dequantized_copy(monkeypatch):
    """The compiled decode loop makes no float array the size of a weight: the weights enter as s8 and the
    matmuls read them. On CPU each matmul converts cache-sized blocks (CPU_BLOCK is lowered here so the tiny
    model's weights span several), and the positive control shows why: without the blocks, XLA:CPU writes a
    converted fp32 copy of every weight. On GPU, XLA fuses the conversion into the matmul (the GPU session
    runs this test)."""
    dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.float16
    params = build_params(CONFIG, TENSORS.items(), dtype, progress=False, quantize="int8")
    smallest_weight = CONFIG.hidden_size ** 2
    if jax.default_backend() != "cpu":
        assert float_buffers(decode_program(NeoXModel(CONFIG, params, "float16", quantize="int8")),
                             smallest_weight) == []
        return
    monkeypatch.setenv(cpu_kernels.SWITCH, "0")  # XLA's path (tests/test_cpu_kernels.py: the native kernel's)
    monkeypatch.setattr(quantization, "CPU_BLOCK", 1024)
    blocked = decode_program(NeoXModel(CONFIG, params, quantize="int8"))
    assert float_buffers(blocked, smallest_weight) == []
    assert blocked.count(f"s8[{CONFIG.vocab_size},{CONFIG.hidden_size}]") >= 1  # the head, read as stored

    monkeypatch.setattr(quantization, "CPU_BLOCK", 2 ** 40)  # one block: the plain convert-then-dot
    plain = decode_program(NeoXModel(CONFIG, params, quantize="int8"))
    copies = float_buffers(plain, smallest_weight)
    assert any(f"f32[{CONFIG.vocab_size},{CONFIG.hidden_size}]" in line for line in copies), copies


def test_the_blocked_cpu_form_is_chosen_by_the_platform_lowered_for(monkeypatch):
    """A program lowered for CUDA from this CPU process holds the plain product of the whole int8 weight, and
    the one lowered for CPU the blocked loop: the form follows the lowering platform, not the process's
    default backend (an exported or cross-compiled program would otherwise carry the CPU loop to the GPU).
    With the native kernels on, the CPU program calls them instead (tests/test_cpu_kernels.py)."""
    monkeypatch.setenv(cpu_kernels.SWITCH, "0")
    monkeypatch.setattr(quantization, "CPU_BLOCK", 1024)
    out, inner = 256, 64  # four blocks of 16 rows on CPU
    w = QuantizedWeight(jnp.ones((out, inner), jnp.int8), jnp.ones((out,), jnp.float32))
    x = jnp.ones((2, inner), jnp.float16)
    traced = jax.jit(lambda x, w: quantization.quantized_contract("bd,fd->bf", x, w, None)).trace(x, w)
    cpu, cuda = (traced.lower(lowering_platforms=(platform,)).as_text() for platform in ("cpu", "cuda"))
    assert "stablehlo.while" in cpu and "stablehlo.dynamic_slice" in cpu  # the blocked loop
    assert "stablehlo.while" not in cuda and "stablehlo.dynamic_slice" not in cuda, cuda
    assert f"tensor<{out}x{inner}xi8>) -> tensor<{out}x{inner}xf16>" in cuda  # one convert, fused on GPU


QUALITY_CONFIG = NeoXConfig(vocab_size=320, hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024,
                            max_position_embeddings=256)


@pytest.fixture(scope="module")
def decisive_checkpoint(tmp_path_factory):
    path = write_hf_checkpoint(tmp_path_factory.mktemp("decisive"), QUALITY_CONFIG, decisive_tensors(QUALITY_CONFIG))
    demo_tokenizer()._tokenizer.save(str(path / "tokenizer.json"))
    return path


@pytest.mark.parametrize("mode, top1, mean_kl", [("int8", 0.94, 6e-3), ("fp8", 0.8, 8e-2),
                                                 ("int8-dynamic", 0.9, 1.5e-2)])
def test_quantized_parity_against_the_unquantized_reference(decisive_checkpoint, tmp_path, capsys, mode, top1,
                                                            mean_kl):
    """parity.check --quantize on weights as decisive as a trained model's (the GPU session's): it passes its
    quantized criteria; top-1 agreement off near-ties is at least 99%, at every position above `top1`
    (measured: int8 95%, fp8 83%, int8-dynamic 94%: near-ties flip), and the KL is reported per prompt."""
    from parity.check import main

    out = tmp_path / "report.json"
    status = main(["--checkpoint", str(decisive_checkpoint), "--tokenizer", str(decisive_checkpoint / "tokenizer.json"),
                   "--dtype", "float32", "--quantize", mode, "--max-new-tokens", "4", "--json", str(out)])
    text = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert status == 0 and report["verdict"] == "pass" and report["quantize"] == mode, text
    overall = report["overall"]
    assert overall["top1_off_ties"] >= 0.99 and overall["top1"] >= top1 and overall["mean_kl"] <= mean_kl, overall
    assert all({"rel_l2", "mean_kl", "max_kl", "top1"} <= set(p) for p in report["prompts"])
    assert f"quantized {mode}" in text and "top-1 agreement off near-ties" in text


def test_quantized_parity_fails_on_a_broken_quantization(decisive_checkpoint, monkeypatch, capsys):
    """The quantized criteria still catch a fault: one layer's QKV scales applied one channel off."""
    from parity.check import main

    real = quantization.quantize

    def skewed(weight, spec, config, mode):
        values, scale = real(weight, spec, config, mode)
        wrong = spec.layer == 1 and spec.name == "attention.query_key_value.weight"
        return values, np.roll(scale, 1, axis=-1) if wrong else scale

    monkeypatch.setattr("neox_jax.weights.quantize_weight", skewed)
    status = main(["--checkpoint", str(decisive_checkpoint), "--tokenizer", str(decisive_checkpoint / "tokenizer.json"),
                   "--dtype", "float32", "--quantize", "int8", "--max-new-tokens", "0"])
    assert status == 1 and "MISMATCH" in capsys.readouterr().out


def test_load_and_generate_take_quantize(decisive_checkpoint, capsys):
    from neox_jax.generate import main

    model = neox_jax.load(decisive_checkpoint, dtype="float32", quantize="int8", progress=False)
    assert model.quantize == "int8" and isinstance(model.params["embed_out"], QuantizedWeight)
    with pytest.raises(QuantizationError, match="quantize must be one of int8, fp8, int8-dynamic, got 'int4'"):
        neox_jax.load(decisive_checkpoint / "missing", quantize="int4")  # refused before the path is opened
    assert main(["--model", str(decisive_checkpoint), "--quantize", "int8", "--prompt", "The", "--max-new-tokens",
                 "4", "--dtype", "float32"]) == 0
    assert "[float32, int8]" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--demo", "--quantize", "int4"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: argument --quantize: invalid choice: 'int4'")


def test_eval_moves_quantize_into_the_model_args():
    from neox_jax.eval import build_argv

    assert build_argv(["--model_args", "pretrained=d", "--quantize", "int8", "--tasks", "t"]) == \
        ["run", "--model", "neox-jax", "--model_args", "pretrained=d,quantize=int8", "--tasks", "t"]
    assert build_argv(["--model_args=pretrained=d", "--quantize=fp8"])[-1] == "--model_args=pretrained=d,quantize=fp8"
    assert build_argv(["--tasks", "t", "--quantize", "int8"])[-2:] == ["--model_args", "quantize=int8"]
    with pytest.raises(QuantizationError):
        build_argv(["--quantize", "int4"])


def test_fp8_values_are_e4m3():
    assert MODES["fp8"].storage == np.dtype(ml_dtypes.float8_e4m3fn) and MODES["fp8"].max_value == 448.0
    assert float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max) == 448.0


def test_quantized_weights_and_the_exact_tensor_parallel_mode_are_refused_together(capsys):
    """The exact mode keeps the checkpoint's per-rank numbers: quantizing would change them, so the two do not
    combine: refused by the plan and the params builder before any weights load, and by the commands."""
    from parity.check import main as parity_main

    for attempt in (lambda: plan_memory(CONFIG, jnp.float32, make_mesh(1, 1), tp_ranks=2, quantize="int8"),
                    lambda: build_params(CONFIG, iter(()), jnp.float32, progress=False, tp_ranks=2, quantize="int8")):
        with pytest.raises(QuantizationError, match="--quantize int8 and --tp-exact do not combine"):
            attempt()
    assert parity_main(["--checkpoint", ".", "--tokenizer", "t.json", "--quantize", "int8", "--tp-exact"]) == 2
    assert "--quantize int8 and --tp-exact do not combine" in capsys.readouterr().err
