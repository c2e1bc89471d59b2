"""Hugging Face hub ids (`--model EleutherAI/pythia-410m`), resolved offline against a cache laid out exactly as
huggingface_hub lays it out: models--ORG--NAME/{refs/REVISION, snapshots/COMMIT/FILE -> ../../blobs/SHA256}."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import pytest

from neox_jax.checkpoints.synthetic import write_hf_checkpoint
from neox_jax.tokenizer import demo_tokenizer

from conftest import REPO, tiny_config

REPO_ID = "EleutherAI/pythia-tiny"


def add_snapshot(hub_cache, repo_id, revision, commit, model_dir):
    """Put `model_dir`'s files in the cache as huggingface_hub does: content-addressed blobs, a snapshot
    folder of relative symlinks named by commit, and refs/REVISION holding the commit hash."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in sorted(model_dir.iterdir()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs" / revision).write_text(commit)  # no newline, as huggingface_hub writes it


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory):
    """HF_HOME with REPO_ID at main (2 layers) and at revision step3 (3 layers)."""
    root = tmp_path_factory.mktemp("hub")
    for revision, commit, layers in (("main", "a" * 40, 2), ("step3", "b" * 40, 3)):
        model = write_hf_checkpoint(root / f"model-{revision}", tiny_config(vocab_size=384, num_layers=layers))
        demo_tokenizer()._tokenizer.save(str(model / "tokenizer.json"))
        add_snapshot(root / "home" / "hub", REPO_ID, revision, commit, model)
    return root / "home"


def run_offline(hf_home, args, cwd):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_generate_takes_a_hub_id_from_the_cache_offline(hf_home, tmp_path):
    result = run_offline(hf_home, ["-m", "neox_jax.generate", "--model", REPO_ID, "--prompt", "The quick",
                                   "--max-new-tokens", "4", "--stop-token", "-1", "--json"], tmp_path)
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["prompt"] == "The quick" and record["completion_tokens"] == 4


def test_a_hub_id_not_in_the_cache_is_one_error_naming_it(hf_home, tmp_path):
    result = run_offline(hf_home, ["-m", "neox_jax.generate", "--model", "EleutherAI/pythia-410m", "--prompt", "x"],
                         tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("error: EleutherAI/pythia-410m: no such directory, and not in the Hugging Face "
                                    f"cache ({hf_home / 'hub'}); HF_HUB_OFFLINE is set"), result.stderr
    result = run_offline(hf_home, ["-m", "neox_jax.generate", "--model", REPO_ID, "--revision", "step9",
                                   "--prompt", "x"], tmp_path)
    assert result.returncode == 2 and f"{REPO_ID}: no such directory" in result.stderr
    assert "at revision 'step9'" in result.stderr, result.stderr


def test_load_takes_hub_ids_and_revisions_and_a_local_directory_wins(hf_home, tmp_path):
    local = write_hf_checkpoint(tmp_path / REPO_ID, tiny_config(vocab_size=384, num_layers=1))
    assert local.is_dir()
    script = textwrap.dedent(f"""
        import os, neox_jax
        os.chdir({str(tmp_path / 'elsewhere')!r})
        main = neox_jax.load({REPO_ID!r}, progress=False)
        step3 = neox_jax.load({REPO_ID!r}, revision="step3", progress=False)
        print(main.config.num_layers, step3.config.num_layers, main.tokenizer is not None)
        print(len(main.generate("The quick", 3)) > 0)
        os.chdir({str(tmp_path)!r})
        print(neox_jax.load({REPO_ID!r}, progress=False).config.num_layers)
        try:
            neox_jax.load({REPO_ID!r}, revision="step3", progress=False)
        except neox_jax.checkpoints.CheckpointError as e:
            print(e)
    """)
    (tmp_path / "elsewhere").mkdir()
    result = run_offline(hf_home, ["-c", script], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "2 3 True", "True", "1",
        f"{REPO_ID}: a revision applies to Hugging Face hub ids, not to a local directory"], result.stdout
