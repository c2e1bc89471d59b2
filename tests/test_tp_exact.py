"""The exact tensor-parallel mode against GPT-NeoX's tensor-parallel computation run as R torch.distributed
processes (`parity.tensor_parallel`), on synthetic checkpoints whose ranks' LayerNorm copies differ."""

import json

import jax
import numpy as np
import pytest
import torch

import neox_jax
from neox_jax.checkpoints import CheckpointError
from neox_jax.checkpoints.synthetic import write_deepspeed_checkpoint, write_hf_checkpoint
from neox_jax.tokenizer import demo_tokenizer
from parity import tensor_parallel

from conftest import tiny_config

# LayerNorm copies 0.05 apart (a trained model's drift is smaller): the merged model is then measurably
# another model, so matching the reference within 1e-5 means the ranks' copies were kept and used as theirs.
JITTER = 0.05
PROMPTS = [[5, 17, 300, 2, 99, 41, 7, 250], [120, 3, 3, 64, 64, 9, 0, 383], [77, 1, 2, 3, 5, 8, 13, 21]]
NEW_TOKENS = [6, 6, 6]  # one batch and one length: each of neox_jax's programs compiles once
CASES = {"2 ranks": (2, True), "4 ranks": (4, True), "2 ranks, sequential residual": (2, False)}


def rel_l2(got, ref) -> float:
    return float(np.linalg.norm(np.asarray(got) - ref) / np.linalg.norm(ref))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """name -> (checkpoint, config, the reference's results), each case written and run (R processes) once
    however many tests use it; and the exact-mode models, loaded once each."""
    cases, models = {}, {}

    def case(name):
        if name not in cases:
            ranks, parallel = CASES[name]
            config = tiny_config(parallel_residual=parallel)
            path = write_deepspeed_checkpoint(tmp_path_factory.mktemp("tp"), config, ranks=ranks, dtype=np.float32,
                                              layernorm_jitter=JITTER, row_bias_jitter=0 if parallel else 1e-3)
            cases[name] = path, config, tensor_parallel.run(path, config, torch.float32, PROMPTS, NEW_TOKENS,
                                                            stop_token=None, per_layer=True)
        return cases[name]

    def exact(name):
        if name not in models:
            models[name] = neox_jax.load(case(name)[0], "float32", progress=False, tp_exact=True)
        return models[name]

    return case, exact


@pytest.fixture(scope="module", params=list(CASES))
def case_name(request):
    return request.param


@pytest.fixture
def case(built, case_name):
    return built[0](case_name)


@pytest.fixture
def exact(built, case_name):
    return built[1](case_name)


def test_exact_mode_equals_the_tensor_parallel_reference(case, exact):
    path, config, ref = case
    assert exact.tp_ranks == tensor_parallel.num_ranks(path)
    logits, hidden = exact.logits(PROMPTS), exact.hidden_states(PROMPTS)
    for i in range(len(PROMPTS)):
        assert rel_l2(logits[i], ref["logits"][i].numpy()) <= 1e-5, i
        assert rel_l2(hidden[:, i], ref["hidden"][i].numpy()) <= 1e-5, i
    assert exact.generate(PROMPTS, 6, stop_token=None) == ref["continuations"]


def test_the_merged_model_is_another_model(case):
    """What the exact mode is for: merging moves these logits far beyond the 1e-5 the exact mode meets."""
    path, _, ref = case
    merged = neox_jax.load(path, "float32", progress=False)
    assert merged.tp_ranks is None
    logits = merged.logits(PROMPTS)
    assert all(rel_l2(logits[i], ref["logits"][i].numpy()) > 1e-3 for i in range(len(PROMPTS)))


@pytest.mark.parametrize("case_name", ["4 ranks"])
def test_each_rank_uses_its_own_copies(case, exact):
    """Fault: the ranks' copies given to the wrong ranks (the rank axis reversed) is caught."""
    path, _, ref = case
    swapped = jax.tree.map(lambda x: x[::-1] if x.shape[0] == exact.tp_ranks and x.ndim == 2 else x, exact.params)
    model = neox_jax.NeoXModel(exact.config, swapped, "float32")
    assert rel_l2(model.logits(PROMPTS)[0], ref["logits"][0].numpy()) > 1e-3


def test_params_keep_every_rank_as_stored(case, exact):
    path, config, _ = case
    ranks = exact.tp_ranks
    layer = exact.params["layers_1"]
    for r in range(ranks):
        state = torch.load(path / f"layer_03-model_{r:02d}-model_states.pt", weights_only=True)
        np.testing.assert_array_equal(np.asarray(layer["input_layernorm"]["weight"][r]),
                                      state["input_layernorm.weight"].numpy())
        np.testing.assert_array_equal(np.asarray(layer["mlp"]["dense_4h_to_h.bias"][r]),
                                      state["mlp.dense_4h_to_h.bias"].numpy())
    # Column- and row-parallel tensors are the merged model's, as stored: the merged tree's shapes.
    assert layer["mlp"]["dense_h_to_4h.weight"].shape == (config.intermediate_size, config.hidden_size)
    assert exact.params["final_layer_norm"]["bias"].shape == (ranks, config.hidden_size)


def test_one_rank_exact_mode_is_the_merged_model(tmp_path):
    """A 1-rank checkpoint has one copy of everything: --tp-exact loads the merged params (same programs)."""
    config = tiny_config()
    path = write_deepspeed_checkpoint(tmp_path, config, ranks=1, dtype=np.float32)
    exact = neox_jax.load(path, "float32", progress=False, tp_exact=True)
    merged = neox_jax.load(path, "float32", progress=False)
    assert exact.tp_ranks is None
    np.testing.assert_array_equal(exact.logits(PROMPTS[:1]), merged.logits(PROMPTS[:1]))


def test_a_hugging_face_directory_cannot_hold_the_ranks(tmp_path, capsys):
    from neox_jax.generate import main

    path = write_hf_checkpoint(tmp_path / "hf", tiny_config())
    demo_tokenizer()._tokenizer.save(str(path / "tokenizer.json"))
    with pytest.raises(CheckpointError, match="needs GPT-NeoX DeepSpeed shards; a Hugging Face directory holds one "
                                              "merged copy of each LayerNorm and row-parallel bias"):
        neox_jax.load(path, "float32", progress=False, tp_exact=True)
    assert main(["--model", str(path), "--tp-exact", "--prompt", "hi", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "not each rank's" in err[0]
    assert main(["--demo", "--tp-exact"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: --tp-exact needs GPT-NeoX DeepSpeed")


def test_eval_flag_becomes_a_model_arg():
    from neox_jax.eval import build_argv

    assert build_argv(["--model_args", "pretrained=DIR", "--tp-exact", "--tasks", "piqa"]) == [
        "run", "--model", "neox-jax", "--model_args", "pretrained=DIR,tp_exact=True", "--tasks", "piqa"]
    assert build_argv(["--tp-exact", "--model_args=pretrained=DIR"])[-1] == "--model_args=pretrained=DIR,tp_exact=True"


def test_reference_checks_each_rank_file(tmp_path):
    """A rank reads its own files and names the one that does not fit (in-process: no collective is reached)."""
    config = tiny_config()
    path = write_deepspeed_checkpoint(tmp_path, config, ranks=2, dtype=np.float32)
    state = torch.load(path / "layer_02-model_01-model_states.pt", weights_only=True)
    state["mlp.dense_4h_to_h.weight"] = state["mlp.dense_4h_to_h.weight"][:, :-1].clone()
    torch.save(state, path / "layer_02-model_01-model_states.pt")
    tensor_parallel.Rank(path, config, 0, 2, torch.float32)  # rank 0's files are intact
    message = r"layer_02-model_01-model_states.pt \[mlp.dense_4h_to_h.weight\]: shape \(64, 127\), rank 1 of 2 expects"
    with pytest.raises(tensor_parallel.LoadError, match=message):
        tensor_parallel.Rank(path, config, 1, 2, torch.float32)
    # As R processes: rank 0 loads, rank 1 cannot; both stop (none waits in a collective) and the error is rank 1's.
    with pytest.raises(tensor_parallel.LoadError, match=message):
        tensor_parallel.run(path, config, torch.float32, PROMPTS[:1], [0], None)


@pytest.mark.parametrize("case_name", ["2 ranks"])
def test_parity_check_tp_exact(case, tmp_path, capsys):
    """`parity.check --tp-exact` passes on the exact mode and reports the merged model's distance per prompt;
    in fp16, so that the reference's fp16 path (gloo all-reduces fp16) runs too (fp32 is checked above)."""
    from parity.check import main

    path, config, _ = case
    tokenizer = tmp_path / "tokenizer.json"
    demo_tokenizer()._tokenizer.save(str(tokenizer))
    report = tmp_path / "report.json"
    argv = ["--checkpoint", str(path), "--tokenizer", str(tokenizer), "--dtype", "float16", "--max-new-tokens", "2",
            "--prompt", "GPT-NeoX-20B is", "--prompt", "The quick brown fox", "--tp-exact", "--json", str(report)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "the merged model against the exact tensor-parallel reference" in out and out.rstrip().endswith("PASS")
    data = json.loads(report.read_text())
    assert data["tp_exact"] and data["overall"]["rel_l2"] <= 1e-2
    merged = data["merged_vs_exact"]
    assert len(merged["prompts"]) == 2 and merged["overall"]["rel_l2"] > 2e-2
    assert all(p["mean_kl"] > 0 and 0 <= p["top1"] <= 1 for p in merged["prompts"])

    assert main([*argv, "--model", str(path)]) == 2  # a converted directory holds merged weights only
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: --tp-exact runs neox_jax on")


@pytest.mark.parametrize("case_name", ["4 ranks"])
def test_lm_eval_model_arg(case, tmp_path):
    """`tp_exact=true` in model_args loads the exact mode; a value lm-eval could not parse is named."""
    pytest.importorskip("lm_eval")
    from neox_jax.lm_eval_model import NeoXLM

    path, _, _ = case
    tokenizer = tmp_path / "tokenizer.json"
    demo_tokenizer()._tokenizer.save(str(tokenizer))
    assert NeoXLM(str(path), tokenizer=str(tokenizer), dtype="float32", tp_exact=True).model.tp_ranks == 4
    with pytest.raises(ValueError, match="tp_exact must be true or false, got 'yes'"):
        NeoXLM(str(path), tokenizer=str(tokenizer), dtype="float32", tp_exact="yes")
