"""`python -m parity.check`: passes on faithful checkpoints, fails (naming the fault) on injected ones."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import neox_jax.api
from neox_jax.checkpoints.synthetic import random_tensors, write_deepspeed_checkpoint
from neox_jax.config import NeoXConfig
from neox_jax.convert import convert
from parity.check import compare_greedy, main

CONFIG = NeoXConfig(vocab_size=320, hidden_size=64, num_layers=3, num_heads=4, intermediate_size=256,
                    rotary_pct=0.25, max_position_embeddings=256)
PROMPTS = ["The quick brown fox jumps over the lazy dog.", "def hello():\n    print("]


def strong_tensors(config: NeoXConfig) -> dict[str, np.ndarray]:
    """Synthetic weights made decisive: the default 0.02 std gives near-uniform attention (rotary and cache
    positions then barely matter) and near-uniform logits (every greedy step a near-tie)."""
    t = random_tensors(config, seed=0)
    for name in t:
        if name.endswith("query_key_value.weight"):
            t[name] *= 15
        elif name.endswith(("attention.dense.weight", "dense_4h_to_h.weight")):
            t[name] *= 5
        elif name == "embed_out.weight":
            t[name] *= 25
    return t


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    tensors = strong_tensors(CONFIG)
    write_deepspeed_checkpoint(root / "ds1", CONFIG, tensors, ranks=1)
    write_deepspeed_checkpoint(root / "ds2", CONFIG, tensors, ranks=2, step=10)
    convert(root / "ds2", root / "hf2")

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=CONFIG.vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(PROMPTS * 3, trainer)
    tokenizer.save(str(root / "tokenizer.json"))
    return root


def run(files, *extra, checkpoint="ds2", dtype="float32", json_out=None):
    argv = ["--checkpoint", str(files / checkpoint), "--tokenizer", str(files / "tokenizer.json"),
            "--dtype", dtype, "--max-new-tokens", "8"]
    for p in PROMPTS:
        argv += ["--prompt", p]
    if json_out is not None:
        argv += ["--json", str(json_out)]
    return main(argv + list(extra))


def faulty_copy(files, tmp_path, edit) -> str:
    """A copy of the converted checkpoint with `edit(tensors)` applied to its safetensors."""
    out = tmp_path / "faulty"
    shutil.copytree(files / "hf2", out)
    for f in out.glob("*.safetensors"):
        tensors = load_file(f)
        edit(tensors)
        save_file(tensors, f, metadata={"format": "pt"})
    return str(out)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("checkpoint", ["ds1", "ds2"])
def test_passes_on_unmodified_checkpoint(files, tmp_path, capsys, checkpoint, dtype):
    report_path = tmp_path / "report.json"
    assert run(files, checkpoint=checkpoint, dtype=dtype, json_out=report_path) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "max|Δ|" in out
    report = json.loads(report_path.read_text())
    assert report["verdict"] == "pass" and report["failures"] == []
    assert len(report["prompts"]) == len(PROMPTS)
    assert report["overall"]["rel_l2"] < (1e-5 if dtype == "float32" else 2e-2)


def test_passes_against_converted_directory(files, capsys):
    assert run(files, "--model", str(files / "hf2"), "--per-layer") == 0
    assert "PASS" in capsys.readouterr().out


def test_default_prompts(files, capsys):
    argv = ["--checkpoint", str(files / "ds1"), "--tokenizer", str(files / "tokenizer.json"),
            "--dtype", "float32", "--max-new-tokens", "2"]
    assert main(argv) == 0
    assert "4: " in capsys.readouterr().out  # five built-in prompts


def _failures(tmp_path, files, *extra, **kw):
    report_path = tmp_path / "report.json"
    rc = run(files, *extra, json_out=report_path, **kw)
    report = json.loads(report_path.read_text())
    assert rc == 1 and report["verdict"] == "mismatch"
    return report


def test_fails_on_q_and_k_swapped_in_one_head(files, tmp_path):
    def swap(t):
        for kind in ("weight", "bias"):
            name = f"gpt_neox.layers.0.attention.query_key_value.{kind}"
            if name in t:
                x = t[name].view(CONFIG.num_heads, 3, CONFIG.head_dim, -1)
                x[1, [0, 1]] = x[1, [1, 0]].clone()

    report = _failures(tmp_path, files, "--model", faulty_copy(files, tmp_path, swap), "--per-layer")
    assert any("relative L2 of logits" in f for f in report["failures"])
    assert report["per_layer"]["first_divergence"] == "layer 0"


def test_fails_on_row_parallel_bias_averaged_instead_of_summed(files, tmp_path):
    def average(t):
        for i in range(CONFIG.num_layers):
            name = f"gpt_neox.layers.{i}.attention.dense.bias"
            if name in t:
                t[name] = t[name] / 2  # the stored value is the sum over the 2 ranks; a mean halves it

    report = _failures(tmp_path, files, "--model", faulty_copy(files, tmp_path, average), "--per-layer")
    assert any("relative L2 of logits" in f for f in report["failures"])
    assert report["per_layer"]["first_divergence"] == "layer 0"


def test_per_layer_names_the_layer_with_a_negated_layernorm_bias(files, tmp_path, capsys):
    def negate(t):
        name = "gpt_neox.layers.1.input_layernorm.bias"
        if name in t:
            t[name] = -t[name]

    report = _failures(tmp_path, files, "--model", faulty_copy(files, tmp_path, negate), "--per-layer")
    per_layer = report["per_layer"]
    assert per_layer["first_divergence"] == "layer 1"
    assert max(per_layer["rel_l2"][:2]) < 1e-5  # embedding and layer 0 untouched
    assert "diverge first after layer 1" in capsys.readouterr().out


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_fails_on_rotary_over_the_whole_head(files, tmp_path, monkeypatch, dtype):
    real = neox_jax.api.NeoX
    monkeypatch.setattr(neox_jax.api, "NeoX",
                        lambda config, *a, **k: real(config.replace(rotary_pct=1.0), *a, **k))
    report = _failures(tmp_path, files, dtype=dtype)
    assert any("relative L2 of logits" in f for f in report["failures"])


def test_fails_on_a_position_offset_in_cached_decoding(files, tmp_path, monkeypatch):
    class OffByOne(neox_jax.api.NeoX):
        """Decode steps (one token against a cache) see their position plus one; prefill is untouched."""

        def __call__(self, tokens, positions, cache=None, **kwargs):
            if cache is not None and tokens.shape[1] == 1:
                positions = positions + 1
            return super().__call__(tokens, positions, cache, **kwargs)

    monkeypatch.setattr(neox_jax.api, "NeoX", OffByOne)
    report = _failures(tmp_path, files)
    # Full-sequence logits still agree: only the decoder is wrong, and the report says so.
    assert all("KV-cache decoding diverges" in f for f in report["failures"])
    assert all(p["greedy"]["first_difference"] is not None for p in report["prompts"])


def test_greedy_difference_after_a_near_tie_passes():
    tie = 0.05
    assert compare_greedy([1, 2, 3], [1, 2, 3], [1.0, 1.0, 1.0], tie)["first_difference"] is None
    parted = compare_greedy([1, 2, 3], [1, 7, 3], [1.0, 0.01, 1.0], tie)
    assert parted["first_difference"] == 1 and parted["near_tie"]
    assert not compare_greedy([1, 2, 3], [1, 7, 3], [1.0, 0.5, 1.0], tie)["near_tie"]
    stopped = compare_greedy([1, 2], [1, 2, 5], [1.0, 1.0, 2.0], tie)  # the reference stopped at step 2
    assert stopped["first_difference"] == 2 and not stopped["near_tie"]


@pytest.mark.parametrize("case, message", [
    ("no-checkpoint", "missing: no such checkpoint directory"), ("no-shards", "no layer_XX"),
    ("no-tokenizer", "tokenizer.json: no such tokenizer file"), ("empty-prompt", "prompt 0 is empty"),
    ("no-prompts-file", "prompts.txt: no such prompts file"), ("prompts-not-a-list", "expected a JSON list of strings"),
    ("unknown-preset", "argument --preset: invalid choice: 'gpt-5'"), ("no-model", "missing: no such model directory"),
    ("bad-option", "argument --dtype: invalid choice: 'float64'")])
def test_bad_input_exits_2(files, tmp_path, capsys, case, message):
    argv = {"checkpoint": str(files / "ds1"), "tokenizer": str(files / "tokenizer.json")}
    extra = ["--prompt", "hello"]
    if case == "no-checkpoint":
        argv["checkpoint"] = str(tmp_path / "missing")
    elif case == "no-shards":
        argv["checkpoint"] = str(tmp_path)
    elif case == "no-tokenizer":
        argv["tokenizer"] = str(tmp_path / "tokenizer.json")
    elif case == "empty-prompt":
        extra = ["--prompt", "  "]
    elif case == "no-prompts-file":
        extra = ["--prompts", str(tmp_path / "prompts.txt")]
    elif case == "prompts-not-a-list":
        (tmp_path / "prompts.json").write_text('{"prompt": "hi"}')
        extra = ["--prompts", str(tmp_path / "prompts.json")]
    elif case == "unknown-preset":
        extra += ["--preset", "gpt-5"]
    elif case == "no-model":
        extra += ["--model", str(tmp_path / "missing")]
    elif case == "bad-option":
        extra += ["--dtype", "float64"]
    rc = main(["--checkpoint", argv["checkpoint"], "--tokenizer", argv["tokenizer"], *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


@pytest.mark.parametrize("source", ["hf-json", "yaml"])
def test_config_given_for_a_checkpoint_without_yaml(files, tmp_path, capsys, source):
    tensors = strong_tensors(CONFIG)
    write_deepspeed_checkpoint(tmp_path / "ds", CONFIG, tensors, ranks=2, write_config_yaml=False)
    config = files / "hf2" / "config.json" if source == "hf-json" else files / "ds2" / "configs" / "model.yml"
    assert run(files, checkpoint=tmp_path / "ds", dtype="float32") == 2  # nothing says what the model is
    assert "no configs/*.yml; give the config (--config or --preset)" in capsys.readouterr().err
    assert run(files, "--config", str(config), checkpoint=tmp_path / "ds") == 0


def test_command_line_bad_input(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "parity.check", "--checkpoint", str(tmp_path / "missing"),
                           "--tokenizer", str(tmp_path / "t.json")], cwd=repo, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {tmp_path / 'missing'}: no such checkpoint directory"


def test_evaluate_lists_each_failure_once_and_passes_only_without_any():
    """`evaluate` on hand-made outputs: equal logits pass; a NaN, a wrong shape and a shifted row each fail
    once, naming the prompt, and mark only that prompt's logits as not ok."""
    from parity.check import TOLERANCES, SideOutput, evaluate

    rng = np.random.default_rng(0)
    logits = [rng.standard_normal((5, 32)).astype(np.float32) for _ in range(4)]

    def side(rows, margins=None):
        return SideOutput(rows, None, [[1, 2]] * len(rows), margins)

    ref = side(logits, [[9.0, 9.0]] * 4)
    tol = TOLERANCES["float32"]
    same = evaluate(ref, side([x.copy() for x in logits]), tol)
    assert same["failures"] == [] and all(p["logits_ok"] for p in same["prompts"])
    assert same["overall"]["rel_l2"] == 0 and same["overall"]["greedy_identical"] == 4

    got = [x.copy() for x in logits]
    got[1][2, 3] = np.nan
    got[2] = got[2][:4]
    got[3] = got[3] + 0.1
    report = evaluate(ref, side(got), tol)
    assert [f.split(":")[0] for f in report["failures"] if f.startswith("prompt")].count("prompt 0") == 0
    assert any(f.startswith("prompt 1: neox_jax logits are not finite") for f in report["failures"])
    assert "prompt 2: logits shape (4, 32) (neox_jax) vs (5, 32) (reference)" in report["failures"]
    assert any(f.startswith("prompt 3: relative L2 of logits") for f in report["failures"])
    assert report["prompts"][2] is None
    assert [p["logits_ok"] for i, p in enumerate(report["prompts"]) if i != 2] == [True, False, False]
    assert "_sq" not in report["prompts"][0] and "sq_diff" not in report["prompts"][0]


def test_top1_is_judged_beyond_the_measured_move_of_the_top2_gap():
    """A perturbation that moves every logit by ~0.2 of the scale (fp8's on the GPU session's checkpoint) flips
    gaps just above the fixed near-tie margin: those are excused; a flip at a gap well beyond 3 RMS of the
    measured move is not."""
    from parity.check import QUANTIZED_TOLERANCES, TIE_SIGMAS, compare_logits

    tol = QUANTIZED_TOLERANCES["fp8"]
    rng = np.random.default_rng(0)
    ref = rng.normal(0, 3, (400, 64))
    got = ref + rng.normal(0, 0.4, ref.shape)  # 0.13 of the scale; the top-2 gap moves by ~0.19 of it
    m = compare_logits(ref, got, tol)
    assert m.pair_rms > 0.15 * m.logit_scale and m.decisive_margin == TIE_SIGMAS * m.pair_rms > tol.tie * m.logit_scale
    top2 = np.sort(ref, -1)[:, -2:]
    margins = top2[:, 1] - top2[:, 0]
    flipped = (ref.argmax(-1) != got.argmax(-1)) & (margins > tol.tie * m.logit_scale)
    assert flipped.any()  # the fixed margin alone would count these
    assert m.decisive_agree == m.decisive_positions > 0

    wide = int(np.argmax(margins))  # the clearest position, flipped outright
    got[wide, ref[wide].argmin()] = ref[wide].max() + 1
    assert compare_logits(ref, got, tol).decisive_agree == m.decisive_positions - 1
