"""The pydocs lm-eval tasks (tests/data/pydocs_*.yaml): held-out text of the trained models' corpus, scored by
the shipped target through neox-jax and through lm-eval's own `hf` model on the same weights."""

import json
import math
import os
import subprocess
import sys

os.environ["HF_DATASETS_OFFLINE"] = "1"  # before lm_eval / datasets are imported: they read these once
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402

lm_eval = pytest.importorskip("lm_eval")

from neox_jax.corpus import held_out  # noqa: E402
from neox_jax.demo import TARGET  # noqa: E402

from conftest import REPO  # noqa: E402

DATA = REPO / "tests" / "data"
TASKS = ["pydocs_lambada", "pydocs_perplexity"]
TOOL = REPO / "tools" / "pydocs_eval_data.py"


def test_the_task_data_is_held_out_text_chosen_by_the_tool(tmp_path):
    """Every passage comes from a page the corpus holds out, and the tool picks passages as documented."""
    lines = [json.loads(line) for line in (DATA / "pydocs_heldout.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 83 and all(held_out(line["name"]) for line in lines)
    for words in (line["text"].split(" ") for line in lines):
        assert 20 <= len(words) <= 80 and words[-1].isalpha() and words[-1] in words[:-1], words

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    pages = [{"name": "a.html", "text": "Too short.\n" + "word " * 40 + "end.\n" + "x " * 40 + "f().\n"
                                        + "end " * 30 + "end."},
             {"name": "b.html", "text": "words " * 31 + "words."}]
    (corpus / "heldout.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pages))
    out = tmp_path / "tasks.jsonl"
    run = subprocess.run([sys.executable, str(TOOL), str(corpus), "--out", str(out)], capture_output=True,
                         text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert run.returncode == 0, run.stderr
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    # Not the second paragraph ("end" is new), nor the third (not a word): the fourth and b's.
    assert kept == [{"name": "a.html", "text": "end " * 30 + "end"}, {"name": "b.html", "text": "words " * 31 + "words"}]
    bad = subprocess.run([sys.executable, str(TOOL), str(tmp_path / "missing")], capture_output=True, text=True,
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "heldout.jsonl" in bad.stderr


def test_neox_jax_equals_lm_eval_hf_on_the_trained_target(tokenizer_path, monkeypatch):
    """The first 8 passages of both tasks: every metric equal within 1e-4 (relative), accuracies exactly."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.evaluator import evaluate
    from lm_eval.tasks import TaskManager, get_task_dict

    from bench.eval import hf_tokenizer
    from neox_jax.lm_eval_model import NeoXLM

    monkeypatch.chdir(REPO)  # the task YAMLs name their data files relative to the repository root
    tasks = get_task_dict(TASKS, TaskManager(include_path=str(DATA), include_defaults=False))
    ours = evaluate(NeoXLM(pretrained=str(TARGET), tokenizer=str(tokenizer_path), dtype="float32", batch_size=8),
                    tasks, limit=8, bootstrap_iters=0)["results"]
    ref = evaluate(HFLM(pretrained=str(TARGET), tokenizer=hf_tokenizer(tokenizer_path), dtype="float32",
                        device="cpu", batch_size=8), tasks, limit=8, bootstrap_iters=0)["results"]
    for task in TASKS:
        metrics = {k: v for k, v in ref[task].items() if "stderr" not in k and isinstance(v, float)}
        assert {"acc,none", "perplexity,none"} <= metrics.keys() if task == "pydocs_lambada" else \
            {"word_perplexity,none", "bits_per_byte,none"} <= metrics.keys()
        for name, value in metrics.items():
            if name.startswith("acc"):
                assert ours[task][name] == value, (task, name)
            else:
                assert math.isclose(ours[task][name], value, rel_tol=1e-4), (task, name, ours[task][name], value)
    # A trained model: held-out words are far likelier than under a uniform choice of the vocabulary.
    assert ref["pydocs_perplexity"]["word_perplexity,none"] < 1e4
