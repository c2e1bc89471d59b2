"""neox_jax.train on a tiny corpus and model: the loss falls, a resumed run equals an uninterrupted one,
checkpoints are whole or absent, bad settings are one `error:` line; and a trained directory gives
transformers' logits. neox_jax.corpus on a tiny HTML tree."""

import json
import os
import signal
import threading
import time

import numpy as np
import pytest

from neox_jax import train
from neox_jax.corpus import build, held_out, page_text
from neox_jax.tokenizer import DEMO_TEXT, demo_tokenizer

SENTENCES = DEMO_TEXT.replace("\n", " ").split(". ")


@pytest.fixture(scope="module", autouse=True)
def shared_compilations(tmp_path_factory):
    """Every run here trains the same shapes: compile once, on disk, and let the later runs read it back."""
    import jax

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    saved = {name: getattr(jax.config, name) for name in names}
    for name, value in zip(names, (str(tmp_path_factory.mktemp("xla")), 0.0, 0)):
        jax.config.update(name, value)
    yield
    for name, value in saved.items():
        jax.config.update(name, value)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A corpus of shuffled demo sentences (train and held-out) and the demo tokenizer, on disk."""
    root = tmp_path_factory.mktemp("train")
    rng = np.random.default_rng(0)
    corpus = root / "corpus"
    corpus.mkdir()
    for split, count in (("train", 40), ("heldout", 6)):
        with open(corpus / f"{split}.jsonl", "w") as f:
            for _ in range(count):
                f.write(json.dumps({"name": split, "text": ". ".join(rng.permutation(SENTENCES))}) + "\n")
    tokenizer = root / "tokenizer.json"
    demo_tokenizer()._tokenizer.save(str(tokenizer))
    return corpus, tokenizer


def argv(files, out, *extra):
    corpus, tokenizer = files
    return ["--corpus", str(corpus), "--out", str(out), "--tokenizer", str(tokenizer), "--vocab-size", "384",
            "--layers", "2", "--hidden", "32", "--heads", "2", "--context", "16", "--batch", "4", "--steps", "6",
            "--warmup", "1", "--lr", "1e-2", "--eval-every", "3", "--eval-windows", "4", "--save-every", "2",
            "--no-progress", *extra]


def weights(directory):
    from safetensors.numpy import load_file

    return {k: v for f in sorted(directory.glob("model-*.safetensors")) for k, v in load_file(str(f)).items()}


@pytest.fixture(scope="module")
def uninterrupted(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "a"
    assert train.main(argv(files, out)) == 0
    return out


def test_the_loss_falls_and_the_outputs_are_hugging_face_directories(uninterrupted):
    records = [json.loads(line) for line in (uninterrupted / train.LOG_FILE).read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.5
    assert len(evals) == 2 and evals[1] < evals[0]
    assert sorted(p.name for p in uninterrupted.glob("step-*")) == ["step-000004", "step-000006"]  # --keep 2
    assert (uninterrupted / train.LATEST).read_text().strip() == "step-000006"
    final = uninterrupted / train.FINAL
    assert {"config.json", "tokenizer.json"} <= {p.name for p in final.iterdir()}
    assert json.loads((final / "config.json").read_text())["tie_word_embeddings"] is True
    assert all(a.dtype == np.float16 for a in weights(final).values())
    assert "embed_out.weight" not in weights(final)  # tied: the head is the input embedding
    assert [p.name for p in uninterrupted.glob(".*")] == [".lock"]  # no temporary directories left


def test_a_run_stopped_by_sigterm_resumes_to_the_same_weights(files, uninterrupted, tmp_path):
    out = tmp_path / "b"

    def stop_after_two_steps():
        while not (out / train.LOG_FILE).exists() or (out / train.LOG_FILE).read_text().count('"loss"') < 2:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    watcher = threading.Thread(target=stop_after_two_steps, daemon=True)
    watcher.start()
    assert train.main(argv(files, out)) == 128 + signal.SIGTERM
    watcher.join()
    stopped_at = json.loads((out / train.latest_checkpoint(out) / train.STATE_FILE).read_text())["step"]
    assert 2 <= stopped_at < 6 and not (out / train.FINAL).exists()
    assert train.main(argv(files, out)) == 0
    for name, value in weights(uninterrupted / train.FINAL).items():
        np.testing.assert_array_equal(weights(out / train.FINAL)[name], value, err_msg=name)
    log = lambda run: [r for r in map(json.loads, (run / train.LOG_FILE).read_text().splitlines()) if "loss" in r]
    assert [r["loss"] for r in log(out)] == [r["loss"] for r in log(uninterrupted)]


def test_a_failed_save_leaves_the_previous_checkpoint_whole(files, tmp_path, monkeypatch, capsys):
    from neox_jax.checkpoints import hf

    real_write_hf, calls = hf.write_hf, []

    def full_disk_on_second_save(directory, *args, **kwargs):
        calls.append(directory)
        if len(calls) == 2:
            real_write_hf(directory, *args, **kwargs)  # the weights are written, then the disk fills
            raise OSError(28, "No space left on device")
        return real_write_hf(directory, *args, **kwargs)

    monkeypatch.setattr(hf, "write_hf", full_disk_on_second_save)
    out = tmp_path / "c"
    assert train.main(argv(files, out)) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: [Errno 28] No space left on device"
    assert train.latest_checkpoint(out).name == "step-000002"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(("step-", "."))) == [".lock", "step-000002"]
    monkeypatch.setattr(hf, "write_hf", real_write_hf)
    assert train.main(argv(files, out, "--steps", "7")) == 2  # a resumed run must keep the settings
    assert "trained with steps = 6, not 7" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--lr", "0"], "--lr = 0.0"),
    (["--warmup", "6"], "--warmup = 6"),
    (["--steps", "0"], "--steps = 0"),
    (["--context", "1"], "--context = 1"),
    (["--heads", "3"], "is not divisible by"),
    (["--context", "4000"], "need at least 4001 tokens"),
])
def test_bad_settings_are_one_error_line(files, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) if message.startswith("--") else _returns(2) as check:
        check.status = train.main(argv(files, tmp_path / "d", *extra))
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and len(err.splitlines()) == 1, err


def test_two_runs_cannot_share_a_directory(files, tmp_path, capsys):
    import fcntl

    out = tmp_path / "e"
    out.mkdir()
    with open(out / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert train.main(argv(files, out)) == 2
    assert capsys.readouterr().err == f"error: {out}: another training process is using this directory\n"


class _returns:
    def __init__(self, status):
        self.expected = status

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        assert exc[0] is None and self.status == self.expected


def test_a_trained_directory_gives_transformers_logits(uninterrupted):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import neox_jax

    tokens = np.array([[1, 50, 7, 300, 9, 12, 100, 5]])
    for directory in (uninterrupted / train.FINAL, train.latest_checkpoint(uninterrupted)):
        reference = transformers.GPTNeoXForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
        with torch.no_grad():
            expected = reference(torch.tensor(tokens)).logits.numpy()
        ours = neox_jax.load(directory, "float32", progress=False).logits(tokens)
        np.testing.assert_allclose(ours, expected, atol=2e-5, rtol=0)


def test_batches_depend_on_the_seed_and_the_step_alone():
    first = [train.batch_rows(step, 4, 10, seed=3) for step in range(5)]  # 20 samples: two epochs of 10
    assert [list(b) for b in first] == [list(train.batch_rows(step, 4, 10, seed=3)) for step in range(5)]
    epoch0, epoch1 = np.concatenate(first)[:10], np.concatenate(first)[10:]
    assert sorted(epoch0) == sorted(epoch1) == list(range(10)) and list(epoch0) != list(epoch1)
    assert list(train.batch_rows(0, 4, 10, seed=4)) != list(first[0])


def test_corpus_keeps_prose_and_splits_by_page_name(tmp_path):
    page = """<html><body><div class="sphinxsidebar">Navigation</div><div class="body" role="main">
      <h1>Lists<a class="headerlink" href="#l">¶</a></h1>
      <p>A list holds <code>items</code>
         in order.</p><div class="highlight"><pre>x = [1, 2]</pre></div><ul><li>One</li><li>Two &amp; three</li></ul>
      </div><div class="footer">Copyright</div></body></html>"""
    assert page_text(page) == "Lists\nA list holds items in order.\nOne\nTwo & three"
    docs = tmp_path / "html"
    (docs / "library").mkdir(parents=True)
    names = [f"library/page{i}.html" for i in range(60)]
    for name in names + ["genindex-A.html"]:
        (docs / name).write_text(page)
    counts = build(docs, tmp_path / "corpus")
    expected_held_out = [n for n in names if held_out(n)]
    assert 0 < counts["heldout"] == len(expected_held_out) < 60 and counts["train"] == 60 - len(expected_held_out)
    written = [json.loads(line)["name"] for line in (tmp_path / "corpus" / "heldout.jsonl").read_text().splitlines()]
    assert written == expected_held_out  # the index page is not prose and is left out
