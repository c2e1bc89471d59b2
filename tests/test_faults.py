"""Faults and hostile input: non-finite numbers never pass silently, user mistakes are one `error:` line,
the Python API reads its input as meant, Ctrl-C ends a generation cleanly."""

import io
import os
import random
import re
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import neox_jax
from neox_jax.api import NeoXModel
from neox_jax.checkpoints import CheckpointError
from neox_jax.checkpoints.hf import HFCheckpoint
from neox_jax.checkpoints.synthetic import random_tensors, write_deepspeed_checkpoint, write_hf_checkpoint
from neox_jax.convert import convert
from neox_jax.decode import GenerationError, NonFiniteLogitsError
from neox_jax.generate import main as generate_main
from neox_jax.tokenizer import demo_tokenizer
from neox_jax.weights import build_params

from conftest import REPO, tiny_config

CONFIG = tiny_config(vocab_size=384)


def one_line_error(err: str, *fragments: str) -> None:
    """`err` shows one line on a terminal, `error: ...` with each fragment (a cleared progress bar is
    overwritten by it: only the text after the last carriage return of a line is seen)."""
    lines = [shown for line in err.split("\n") if (shown := line.split("\r")[-1]).strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, err)


@pytest.fixture(scope="module")
def tensors():
    return random_tensors(CONFIG, seed=3)


def model_from(tensors) -> NeoXModel:
    return NeoXModel(CONFIG, build_params(CONFIG, tensors.items(), jnp.float32, progress=False),
                     tokenizer=demo_tokenizer())


# ---- non-finite weights are refused where they are read ----

def test_hf_reader_names_the_nan_tensor_and_count(tmp_path, tensors):
    broken = dict(tensors)
    name = "gpt_neox.layers.1.mlp.dense_h_to_4h.weight"
    broken[name] = broken[name].copy()
    broken[name][3, :2] = np.nan
    path = write_hf_checkpoint(tmp_path / "hf", CONFIG, broken)
    with pytest.raises(CheckpointError, match=rf"{name}.*holds 2 non-finite values"):
        list(HFCheckpoint(path).tensors())


@pytest.mark.parametrize("index", ['{"weight_map": 5}', '["weight_map"]', '{"weight_map": {"x": "../model.safetensors"}}',
                                   '{"weight_map": {"x": 3}}', '{"metadata": {}}'])
def test_a_malformed_safetensors_index_is_one_error(tmp_path, tensors, index):
    path = write_hf_checkpoint(tmp_path / "hf", CONFIG, tensors)
    (path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(CheckpointError, match="model.safetensors.index.json: .*(not a safetensors index|weight_map)"):
        HFCheckpoint(path)


@pytest.mark.parametrize("dtype, name", [(torch.float8_e4m3fn, "F8_E4M3"), (torch.int8, "I8"),
                                         (torch.complex64, "C64")])
def test_weights_that_are_not_floating_point_are_refused(tmp_path, tensors, dtype, name):
    path = write_hf_checkpoint(tmp_path / "hf", CONFIG, tensors)
    [file] = path.glob("*.safetensors")
    stored = load_file(file)
    save_file({**stored, "embed_out.weight": stored["embed_out.weight"].to(dtype)}, file)
    with pytest.raises(CheckpointError, match=rf"tensor 'embed_out.weight' has dtype {name}; model weights are"):
        HFCheckpoint(path)
    src = write_deepspeed_checkpoint(tmp_path / "ds", CONFIG, tensors, ranks=1)
    shard = tmp_path / "ds" / "layer_00-model_00-model_states.pt"
    torch.save({"word_embeddings.weight": torch.load(shard)["word_embeddings.weight"].to(dtype)}, shard)
    with pytest.raises(CheckpointError, match=r"tensor 'word_embeddings.weight' has dtype torch\.\w+; model weights"):
        convert(src, tmp_path / "out")


def test_converter_refuses_a_nan_shard_naming_file_and_tensor(tmp_path, tensors):
    broken = dict(tensors)
    broken["gpt_neox.layers.0.attention.dense.bias"] = np.full_like(tensors["gpt_neox.layers.0.attention.dense.bias"],
                                                                     np.inf)
    src = write_deepspeed_checkpoint(tmp_path / "ds", CONFIG, broken, ranks=2)
    with pytest.raises(CheckpointError, match=r"layer_02-model_00-model_states\.pt: tensor 'attention\.dense\.bias' "
                                              r"holds 64 non-finite"):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]  # nothing left beside the output either


def test_a_cast_that_overflows_the_dtype_is_refused(tensors):
    big = dict(tensors)
    big["embed_out.weight"] = tensors["embed_out.weight"] * 1e6  # beyond float16's 65504
    with pytest.raises(CheckpointError, match=r"float16 cannot hold its values: tensor 'embed_out.weight'"):
        build_params(CONFIG, big.items(), jnp.float16, progress=False)


def test_convert_to_a_dtype_too_narrow_for_the_values_is_refused(tmp_path, tensors):
    big = dict(tensors)
    big["embed_out.weight"] = tensors["embed_out.weight"] * 1e7  # beyond float16's 65504
    src = write_deepspeed_checkpoint(tmp_path / "ds", CONFIG, big, ranks=1, dtype=np.float32)
    with pytest.raises(CheckpointError, match=r"--dtype float16 cannot hold its values: tensor 'embed_out.weight'"):
        convert(src, tmp_path / "out", dtype="float16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


# ---- the decoder never turns NaN logits into a token ----

def test_nan_logits_stop_generation_naming_the_row_and_step(tensors):
    clean = model_from(tensors)
    prompts = [[5, 6, 7], [8, 9]]
    sampled = dict(temperature=1.0, seed=4)
    out = clean.generate(prompts, 6, stop_token=None, **sampled)
    # Poison the embedding of a token row 1 draws at some step and that no row has seen before: the logits
    # of the next step are the first non-finite ones, in row 1 only.
    step = next(i for i in range(1, 5) if out[1][i] not in out[1][:i] + prompts[1] + out[0][:i + 1] + prompts[0])
    poisoned = dict(tensors)
    poisoned["gpt_neox.embed_in.weight"] = tensors["gpt_neox.embed_in.weight"].copy()
    poisoned["gpt_neox.embed_in.weight"][out[1][step]] = np.nan
    broken = NeoXModel(CONFIG, build_params(CONFIG, poisoned.items(), jnp.float32, progress=False))
    with pytest.raises(NonFiniteLogitsError, match=rf"prompt 1, generated token {step + 1}: .*not finite") as info:
        broken.generate(prompts, 6, stop_token=None, **sampled)
    assert (info.value.row, info.value.step) == (1, step + 1)


def test_an_infinite_output_row_is_not_repeated_forever(tensors):
    poisoned = dict(tensors)
    poisoned["embed_out.weight"] = tensors["embed_out.weight"].copy()
    poisoned["embed_out.weight"][17] = np.inf
    model = NeoXModel(CONFIG, build_params(CONFIG, poisoned.items(), jnp.float32, progress=False))
    for settings in ({}, {"temperature": 0.8, "seed": 1}):
        with pytest.raises(NonFiniteLogitsError, match="prompt 0, generated token 0"):
            model.generate([[1, 2, 3]], 8, stop_token=None, **settings)


# ---- Python API input ----

def test_a_bare_string_is_one_prompt(tensors):
    model = model_from(tensors)
    text = model.generate("The quick", 4, stop_token=None)
    assert isinstance(text, str) and text == model.generate(["The quick"], 4, stop_token=None)[0]


@pytest.mark.parametrize("prompts, message", [
    ([[1.7, 2]], "token ids must be integers, got 1.7"),
    ([[True, 2]], "token ids must be integers, got True"),
    ([np.array([1.0, 2.0])], "token ids must be integers"),
    (["text", [1, 2]], "not a mix"),
    ([[1, 2], "text"], "not a mix"),
    (42, "prompts must be a string"),
    (b"bytes", "prompts must be a string"),
])
def test_token_ids_must_be_integers_and_a_batch_one_kind(tensors, prompts, message):
    with pytest.raises(TypeError, match=message):
        model_from(tensors).generate(prompts, 2)


def test_a_bare_stop_string_is_one_stop_string_and_a_bool_is_no_token_count(tensors):
    model = model_from(tensors)
    full = model.generate("The quick", 24, stop_token=None)
    # Two characters whose second occurs earlier on its own: read as two stop strings, it would cut there.
    stop = next(full[i:i + 2] for i in range(1, len(full) - 1) if full[i + 1] in full[:full.index(full[i:i + 2])])
    assert model.generate("The quick", 24, stop_token=None, stop=stop) == full[:full.index(stop)]
    with pytest.raises(GenerationError, match="max_new_tokens must be a positive integer, got True"):
        model.generate([[1, 2]], True)


def test_a_stop_token_outside_the_vocabulary_is_refused(tensors):
    with pytest.raises(GenerationError, match=r"stop token 384 is outside the vocabulary \[0, 384\)"):
        model_from(tensors).generate([[1, 2]], 2, stop_token=384)


# ---- command-line mistakes: one error line, exit 2 ----

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = write_hf_checkpoint(tmp_path_factory.mktemp("m"), CONFIG)
    demo_tokenizer()._tokenizer.save(str(path / "tokenizer.json"))
    return path


@pytest.mark.parametrize("args, fragments", [
    (["--temperature", "nan"], ["temperature must be a finite number"]),
    (["--temperature", "inf"], ["temperature must be a finite number"]),
    (["--top-p", "nan"], ["top_p must be a finite number"]),
    (["--seed", "1e23"], ["--seed", "invalid int value: '1e23'"]),
    (["--seed", "99999999999999999999999"], ["seed must be in [0, 2**64)"]),
    (["--max-new-tokens", "99999999999"], ["beyond the model's context"]),
    (["--stop-token", "384"], ["stop token 384 is outside the vocabulary"]),
    (["--stop-token", "-5"], ["stop token -5 is outside the vocabulary"]),
    (["--mesh", "model=99999999999"], ["model"]),
    (["--distributed", "--coordinator", "no-such-host.invalid:1234", "--num-processes", "2", "--process-id", "0"],
     ["cannot resolve 'no-such-host.invalid'"]),
    (["--distributed", "--coordinator", "localhost", "--num-processes", "2", "--process-id", "0"],
     ["expected HOST:PORT"]),
    (["--distributed", "--num-processes", "2", "--process-id", "5"], ["--process-id must be in"]),
])
def test_cli_mistakes_are_one_error_line(model_dir, capsys, args, fragments):
    assert exit_status(["--model", str(model_dir), "--prompt", "The quick", *args]) == 2
    one_line_error(capsys.readouterr().err, *fragments)


def test_demo_stop_token_out_of_range_is_refused_before_any_prompt_is_printed(capsys):
    assert exit_status(["--demo", "--prompt", "The quick", "--stop-token", "999999"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    [error] = [line for line in captured.err.splitlines() if line.startswith("error")]
    assert "Traceback" not in captured.err
    assert error.startswith("error: stop token 999999 is outside the vocabulary [0, ")


def test_a_tokenizer_larger_than_the_vocabulary_is_refused_when_loading(model_dir, tmp_path, capsys):
    big = tmp_path / "big_tokenizer.json"
    demo_tokenizer(500)._tokenizer.save(str(big))
    message = rf"big_tokenizer\.json: the tokenizer has \d+ tokens, more than the model's vocabulary \(384\)"
    with pytest.raises(ValueError, match=message):
        neox_jax.load(model_dir, tokenizer=big, progress=False)
    assert exit_status(["--model", str(model_dir), "--tokenizer", str(big), "--prompt", "x"]) == 2
    one_line_error(capsys.readouterr().err, "more than the model's vocabulary (384): wrong tokenizer?")


def exit_status(argv) -> int:
    """`generate`'s exit status, whether main returns it or argparse exits."""
    try:
        return generate_main(argv)
    except SystemExit as e:
        return e.code


def test_prompt_file_that_is_not_utf8_names_the_file_and_byte(model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"fine line\ncaf\xe9 au lait\n")
    assert generate_main(["--model", str(model_dir), "--prompt-file", str(prompts)]) == 2
    one_line_error(capsys.readouterr().err, str(prompts), "not UTF-8", "byte 13")


def test_a_prompt_that_was_not_utf8_is_one_error_and_the_interactive_session_goes_on(model_dir, capsys,
                                                                                   monkeypatch):
    assert generate_main(["--model", str(model_dir), "--prompt", "ab\udcffc"]) == 2  # argv bytes b"ab\xffc"
    one_line_error(capsys.readouterr().err, "not valid Unicode at character 2")
    monkeypatch.setattr("sys.stdin", io.StringIO("\udcff\udcfe\nThe quick\n"))
    assert generate_main(["--model", str(model_dir), "--interactive", "--max-new-tokens", "2"]) == 0
    captured = capsys.readouterr()
    assert "not valid Unicode at character 0" in captured.err and captured.out.startswith("The quick")


def test_nan_weights_exit_2_not_an_empty_completion(tmp_path, tensors, capsys):
    broken = dict(tensors)
    broken["gpt_neox.final_layer_norm.weight"] = tensors["gpt_neox.final_layer_norm.weight"].copy()
    broken["gpt_neox.final_layer_norm.weight"][0] = np.nan
    path = write_hf_checkpoint(tmp_path / "nan", CONFIG, broken)
    demo_tokenizer()._tokenizer.save(str(path / "tokenizer.json"))
    assert generate_main(["--model", str(path), "--prompt", "The quick"]) == 2
    one_line_error(capsys.readouterr().err, "gpt_neox.final_layer_norm.weight", "1 non-finite value")


# ---- Ctrl-C ----

def test_ctrl_c_at_random_moments_exits_130_and_nothing_else():
    """Interrupts during start-up, loading, compiling and decoding: always status 130, never a traceback
    or a crash in the runtime's threads (it used to end ~1 run in 7 with "pure virtual method called")."""
    jitter = random.Random(0)
    for delay in (0.3 + 0.75 * i + jitter.uniform(0, 0.3) for i in range(8)):  # imports take the first ~2 s
        child = subprocess.Popen([sys.executable, "-m", "neox_jax.generate", "--demo", "--max-new-tokens", "240",
                                  "--prompt", "x", "--temperature", "0.9"], cwd=REPO,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=120)
        if child.returncode == 0:  # finished before the signal: nothing to check
            continue
        assert child.returncode == 130, (delay, child.returncode, err)
        for crash in ("Traceback", "pure virtual", "Segmentation", "terminate called", "Fatal Python"):
            assert crash not in err, (delay, err)


# ---- lm-eval ----

EVAL_ENV = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}


@pytest.mark.parametrize("model_args, task, fragments", [
    ("pretrained={model}", "no_such_task", ["Tasks not found: no_such_task"]),
    ("pretrained={missing}", "lambada_local_tiny", ["missing: no such directory"]),
    ("pretrained={model},dtype=float17", "lambada_local_tiny", ["dtype must be one of", "'float17'"]),
    ("dtype=float32", "lambada_local_tiny", ["model_args must name the model: pretrained=DIR"]),
    ("=,,=", "lambada_local_tiny", ["unknown model_args '': neox-jax takes pretrained, tokenizer, dtype"]),
])
def test_eval_mistakes_end_in_one_error_line(model_dir, tmp_path, model_args, task, fragments):
    args = ["--model_args", model_args.format(model=model_dir, missing=tmp_path / "missing"), "--tasks", task,
            "--include_path", str(REPO / "tests" / "data")]
    out = subprocess.run([sys.executable, "-m", "neox_jax.eval", *args], cwd=REPO, env=EVAL_ENV,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]  # after lm-eval's own INFO log lines
    assert last.startswith("error: ") and all(f in last for f in fragments), out.stderr[-2000:]


@pytest.mark.parametrize("model_args, message", [
    (dict(batch_size="abc"), "batch_size must be a positive integer or auto, got 'abc'"),
    (dict(batch_size=0), "batch_size must be"), (dict(batch_size=1.5), "batch_size must be"),
    (dict(batch_size=True), "batch_size must be"),
    (dict(bogus=1), "unknown model_args 'bogus': neox-jax takes pretrained, tokenizer, dtype"),
])
def test_eval_model_args_are_checked_before_the_model_loads(tmp_path, model_args, message):
    lm_eval_model = pytest.importorskip("neox_jax.lm_eval_model")
    with pytest.raises(ValueError, match=re.escape(message)):
        lm_eval_model.NeoXLM(pretrained=tmp_path / "missing", **model_args)  # missing: it would fail to load


def test_eval_refuses_non_finite_scores(tensors):
    lm_eval_model = pytest.importorskip("neox_jax.lm_eval_model")
    poisoned = dict(tensors)
    poisoned["embed_out.weight"] = tensors["embed_out.weight"].copy()
    poisoned["embed_out.weight"][7] = np.inf
    model = NeoXModel(CONFIG, build_params(CONFIG, poisoned.items(), jnp.float32, progress=False))
    lm = lm_eval_model.NeoXLM(pretrained=model, tokenizer=demo_tokenizer())
    with pytest.raises(FloatingPointError, match="request 0: the continuation's log-likelihood is nan"):
        lm._loglikelihood_tokens([(None, [5, 6], [7])])
