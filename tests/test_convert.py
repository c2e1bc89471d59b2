"""`python -m neox_jax.convert`: output a transformers-loadable directory, atomically, or a one-line error."""

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import SafetensorError

from conftest import REPO, tiny_config
from neox_jax import convert
from neox_jax.checkpoints import hf, synthetic
from neox_jax.checkpoints.deepspeed import DeepSpeedCheckpoint


def make_checkpoint(path, config=None, ranks=2, dtype=np.float32, step=None, tensors=None):
    config = config or tiny_config()
    tensors = synthetic.random_tensors(config) if tensors is None else tensors
    synthetic.write_deepspeed_checkpoint(path, config, tensors, ranks=ranks, dtype=dtype, step=step)
    return path, tensors


def write_tokenizer(path, size=50):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    Tokenizer(WordLevel({f"w{i}": i for i in range(size)}, unk_token="w0")).save(str(path))
    return path


def run(capsys, *argv):
    code = convert.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_error(result, pattern):
    code, out, err = result
    lines = [line for line in err.splitlines() if not line.startswith("warning: ")]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(pattern, lines[0]), lines[0]


def assert_nothing_at(out):
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*")), "temporary files left beside the output"


def hf_tensors(path):
    return dict(hf.HFCheckpoint(path).tensors())


def test_end_to_end(tmp_path, capsys):
    root, tensors = make_checkpoint(tmp_path / "run", step=150)
    tokenizer = write_tokenizer(root / "20B_tokenizer.json")
    out = tmp_path / "hf"
    code, stdout, err = run(capsys, root, out)
    assert code == 0, err
    assert re.fullmatch(r"converted \S+ parameters \(.* GB\) in .* s \(.* GB/s\) -> .*hf\n", stdout)
    assert {f.name for f in out.iterdir()} == {"config.json", "model-00001-of-00001.safetensors",
                                              "model.safetensors.index.json", "tokenizer.json", "conversion.json"}
    assert (out / "tokenizer.json").read_bytes() == tokenizer.read_bytes()
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    got = hf_tensors(out)
    expected = dict(DeepSpeedCheckpoint(root).tensors())
    assert list(got) == list(expected)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])

    prov = json.loads((out / "conversion.json").read_text())
    assert (prov["source"]["step"], prov["source"]["ranks"], prov["source"]["layout"]) == (150, 2, "pipeline")
    assert prov["source"]["config"].endswith("configs/model.yml")
    files = prov["input_files"]
    assert len(files) == 10 and all(name.startswith("global_step150/layer_") for name in files)
    for name, info in files.items():
        data = (root / name).read_bytes()
        assert info == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert prov["merge"]["row_bias_rule"] == "sum" and "parallel" in prov["merge"]["row_bias_reason"]
    assert 0 < prov["merge"]["max_layernorm_diff"] < 1e-2
    assert prov["output"]["parameters"] == sum(t.size for t in tensors.values())
    assert prov["output"]["bytes"] == 4 * prov["output"]["parameters"]


@pytest.mark.parametrize("parallel, tied", [(True, False), (False, True)])
def test_logits_match_transformers(tmp_path, capsys, parallel, tied):
    transformers = pytest.importorskip("transformers")
    config = tiny_config(parallel_residual=parallel, tie_word_embeddings=tied, activation="gelu")
    root, tensors = make_checkpoint(tmp_path / "ckpt", config)
    assert run(capsys, root, tmp_path / "hf")[0] == 0

    converted = transformers.GPTNeoXForCausalLM.from_pretrained(tmp_path / "hf").eval()
    reference = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**config.to_hf_dict("float32"))).eval()
    # transformers 5 calls the head lm_head (it renames embed_out when loading files); 4.x kept embed_out.
    head = "lm_head.weight" if hasattr(reference, "lm_head") else "embed_out.weight"
    state = {head if k == "embed_out.weight" else k: torch.from_numpy(v) for k, v in tensors.items()}
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= ({head} if tied else set())
    ids = torch.randint(0, config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = converted(ids).logits, reference(ids).logits
    assert want.std() > 0.05
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_rank_counts_convert_identically(tmp_path, capsys):
    config = tiny_config(num_layers=3)
    tensors = synthetic.random_tensors(config, seed=5)
    outputs = []
    for ranks in (1, 2, 4):
        root, _ = make_checkpoint(tmp_path / f"ckpt{ranks}", config, ranks=ranks, tensors=tensors)
        assert run(capsys, root, tmp_path / f"hf{ranks}")[0] == 0
        outputs.append(hf_tensors(tmp_path / f"hf{ranks}"))
    for other in outputs[1:]:
        for name in tensors:
            np.testing.assert_allclose(other[name], outputs[0][name], rtol=1e-6, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("dtype, expected", [("keep", "float16"), ("bfloat16", "bfloat16"), ("float32", "float32")])
def test_dtype_and_shard_size(tmp_path, capsys, dtype, expected):
    root, tensors = make_checkpoint(tmp_path / "ckpt", dtype=np.float16)
    out = tmp_path / "hf"
    assert run(capsys, root, out, "--dtype", dtype, "--shard-size", "40kB")[0] == 0
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 3
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == expected
    for name, array in hf_tensors(out).items():
        assert array.dtype.name == expected
        np.testing.assert_allclose(array.astype(np.float32), tensors[name], rtol=1e-2, atol=1e-3)


def earlier_output(out: Path) -> Path:
    """What an earlier conversion left at `out`, as far as `--force` can tell: its marker and its files."""
    out.mkdir()
    (out / "conversion.json").write_text(json.dumps({"tool": "neox_jax.convert"}))
    (out / "model-00001-of-00001.safetensors").write_text("previous")
    return out


def previous_files(out: Path) -> list[str]:
    return sorted(f.name for f in out.iterdir())


def test_existing_output_and_force(tmp_path, capsys):
    root, _ = make_checkpoint(tmp_path / "ckpt")
    out = earlier_output(tmp_path / "hf")
    assert_error(run(capsys, root, out), r"hf already exists \(use --force to replace it\)")
    assert (out / "model-00001-of-00001.safetensors").read_text() == "previous"
    assert run(capsys, root, out, "--force")[0] == 0
    assert (out / "model-00001-of-00001.safetensors").read_bytes() != b"previous"
    assert run(capsys, root, out, "--force")[0] == 0  # a real conversion's output is replaced too
    assert not list(tmp_path.glob(".hf.*"))
    assert_error(run(capsys, root, root, "--force"), r"ckpt is the step folder, which this conversion reads")


def snapshot(root):
    """Every path under `root` with its bytes: a refused conversion must leave it exactly as it was."""
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() and not p.is_symlink() else p.is_symlink()
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("checkpoint, out, args, pattern", [
    ("ckpt", "ckpt/global_step100", [], r"ckpt/global_step100 is the step folder, which"),
    ("ckpt/global_step100", "ckpt/configs", [], r"ckpt/configs is the configs folder, which"),
    ("ckpt/global_step100", "ckpt", [], r"ckpt contains the checkpoint folder \S+/ckpt/global_step100, which"),
    ("ckpt", "ckpt/global_step100/hf", [], r"hf lies inside the step folder \S+/ckpt/global_step100, which"),
    ("ckpt", "tok", ["--tokenizer", "tok/t.json"], r"tok contains the tokenizer file \S+/tok/t\.json, which"),
    ("ckpt", "tok/t.json", ["--tokenizer", "tok/t.json"], r"tok/t\.json is the tokenizer file, which"),
    ("ckpt", ".", [], r"contains the checkpoint folder \S+/ckpt, which"),
    ("ckpt", "cfg", ["--config", "cfg/20B.yml"], r"cfg contains the config file \S+/cfg/20B\.yml, which"),
    ("ckpt", "link", [], r"link \(a link to \S+/ckpt/global_step100\) is the step folder, which"),
])
def test_output_overlapping_the_source_is_refused_before_anything_is_touched(tmp_path, capsys, monkeypatch,
                                                                              checkpoint, out, args, pattern):
    make_checkpoint(tmp_path / "ckpt", step=100)
    (tmp_path / "tok").mkdir()
    write_tokenizer(tmp_path / "tok" / "t.json")
    (tmp_path / "cfg").mkdir()
    shutil.copy(tmp_path / "ckpt" / "configs" / "model.yml", tmp_path / "cfg" / "20B.yml")
    (tmp_path / "link").symlink_to(tmp_path / "ckpt" / "global_step100")
    before = snapshot(tmp_path)
    monkeypatch.chdir(tmp_path)
    result = run(capsys, tmp_path / checkpoint, out, *[a if a.startswith("--") else tmp_path / a for a in args],
                 "--force")
    assert_error(result, pattern + r" this conversion reads; a conversion never writes over its source")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("contents, out, pattern", [
    ({"thesis.tex": "years of work", "data/set.csv": "1,2"}, "mine",
     r"mine is not an earlier conversion's output \(no conversion\.json written by neox_jax\.convert; it holds "
     r"data/, thesis\.tex\)"),
    ({"thesis.tex": "years of work"}, ".", r"mine is not an earlier conversion's output .* it holds thesis\.tex\)"),
    ({"thesis.tex": "years of work"}, "", r"the output directory is an empty string"),
    ({"conversion.json": '{"tool": "something else"}', "config.json": "{}"}, "mine",
     r"mine is not an earlier conversion's output.*"),
    ({"conversion.json": '{"tool": "neox_jax.convert"}', "config.json": "{}", "notes.md": "mine"}, "mine",
     r"mine holds an earlier conversion's output and also notes\.md, which a conversion does not write.*"),
    ({"conversion.json": '{"tool": "neox_jax.convert"}', "runs/log.txt": "mine"}, "mine",
     r"mine holds an earlier conversion's output and also runs/, which.*"),
    ({"thesis.tex": "years of work"}, "link", r"link \(a link to \S+/mine\) is not an earlier conversion's output.*"),
])
def test_force_replaces_only_an_earlier_conversion(tmp_path, capsys, monkeypatch, contents, out, pattern):
    root, _ = make_checkpoint(tmp_path / "ckpt")
    (tmp_path / "mine").mkdir()
    for name, text in contents.items():
        (tmp_path / "mine" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "mine" / name).write_text(text)
    (tmp_path / "link").symlink_to(tmp_path / "mine")
    before = snapshot(tmp_path)
    monkeypatch.chdir(tmp_path / "mine")  # "." and "" name it (and nothing outside tmp_path, even unfixed)
    assert_error(run(capsys, root, out if out in (".", "") else tmp_path / out, "--force"), pattern)
    assert snapshot(tmp_path) == before


def test_force_replaces_an_earlier_conversion_or_an_empty_folder(tmp_path, capsys):
    root, _ = make_checkpoint(tmp_path / "ckpt")
    (tmp_path / "empty").mkdir()
    assert run(capsys, root, tmp_path / "empty", "--force")[0] == 0
    assert (tmp_path / "empty" / "conversion.json").exists()
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    assert run(capsys, root, tmp_path / "link", "--force")[0] == 0  # the link is replaced, not its target
    assert not (tmp_path / "link").is_symlink() and (tmp_path / "empty" / "conversion.json").exists()


def test_output_that_is_a_file_is_refused(tmp_path, capsys):
    root, _ = make_checkpoint(tmp_path / "ckpt")
    (tmp_path / "notes").write_text("keep me")
    assert_error(run(capsys, root, tmp_path / "notes", "--force"),
                 r"notes exists and is not a directory; --force replaces only an earlier output directory")
    assert (tmp_path / "notes").read_text() == "keep me"
    assert not list(tmp_path.glob(".notes.*"))


def test_convert_into_the_current_directory(tmp_path, capsys, monkeypatch):
    root, _ = make_checkpoint(tmp_path / "ckpt")
    out = earlier_output(tmp_path / "hf")
    monkeypatch.chdir(out)
    code, stdout, err = run(capsys, root, ".", "--force")
    assert code == 0, err
    assert stdout.endswith(f"-> {out}\n")
    assert {f.name for f in out.iterdir()} == {"config.json", "model-00001-of-00001.safetensors",
                                              "model.safetensors.index.json", "conversion.json"}
    assert not list(tmp_path.glob(".hf.*")), "leftovers beside the output"


def dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_leftovers_of_a_killed_conversion_are_removed_by_the_next(tmp_path, capsys):
    root, _ = make_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "hf"
    # A real conversion, SIGKILLed while it writes the shards: nothing in it can clean up.
    script = ("import os, signal, sys\n"
              "from neox_jax import convert\n"
              "real = convert.hf.write_hf\n"
              "def killed_midway(out_dir, config, stream, **kwargs):\n"
              "    def stream_until_killed():\n"
              "        for i, item in enumerate(stream):\n"
              "            if i == 10:\n"
              "                os.kill(os.getpid(), signal.SIGKILL)\n"
              "            yield item\n"
              "    return real(out_dir, config, stream_until_killed(), **kwargs)\n"
              "convert.hf.write_hf = killed_midway\n"
              "convert.main(sys.argv[1:])\n")
    killed = subprocess.Popen([sys.executable, "-c", script, str(root), str(out), "--shard-size", "40kB"],
                              cwd=REPO, stderr=subprocess.PIPE, text=True)
    _, stderr = killed.communicate()
    assert killed.returncode == -signal.SIGKILL, stderr
    [leftover] = tmp_path.glob(".hf.*")
    assert leftover.name.startswith(f".hf.tmp-{killed.pid}@") and list(leftover.glob("*.safetensors.tmp"))

    code, _, err = run(capsys, root, out)
    assert code == 0, err
    assert not list(tmp_path.glob(".hf.*"))
    assert f"removed leftover {leftover} from an interrupted conversion (pid {killed.pid})" in err


@pytest.mark.parametrize("sig, status, said", [(signal.SIGTERM, 143, "terminated"),
                                               (signal.SIGINT, 130, "interrupted")])
def test_sigterm_or_ctrl_c_while_writing_cleans_up(tmp_path, sig, status, said):
    root, _ = make_checkpoint(tmp_path / "ckpt")
    out = earlier_output(tmp_path / "hf")
    script = ("import os, signal, sys\n"
              "from neox_jax import convert\n"
              "real = convert.hf.write_hf\n"
              "def signalled_midway(out_dir, config, stream, **kwargs):\n"
              "    def stream_until_signalled():\n"
              "        for i, item in enumerate(stream):\n"
              "            if i == 10:\n"
              f"                os.kill(os.getpid(), {int(sig)})\n"
              "            yield item\n"
              "    return real(out_dir, config, stream_until_signalled(), **kwargs)\n"
              "convert.hf.write_hf = signalled_midway\n"
              "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
              "sys.exit(convert.main(sys.argv[1:]))\n")
    child = subprocess.run([sys.executable, "-c", script, str(root), str(out), "--force", "--shard-size", "40kB"],
                           cwd=REPO, capture_output=True, text=True, timeout=300)
    assert child.returncode == status, child.stderr
    assert child.stderr.strip().splitlines()[-1] == f"error: {said}; nothing was written to {out}"
    assert previous_files(out) == ["conversion.json", "model-00001-of-00001.safetensors"]  # the previous output
    assert not list(tmp_path.glob(".hf.*")), "temporary folders left beside the output"


def test_leftovers_whose_owner_may_be_alive_are_kept(tmp_path, capsys):
    root, _ = make_checkpoint(tmp_path / "ckpt")
    host, dead = convert._HOST, dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        dead_here = tmp_path / f".hf.tmp-{dead}@{host}-abcd"
        old_dead_here = tmp_path / f".hf.old-{dead}@{host}-abcd"
        live_here = tmp_path / f".hf.tmp-{live.pid}@{host}-abcd"
        elsewhere = tmp_path / f".hf.tmp-{dead}@other.host-abcd"
        no_host = tmp_path / f".hf.tmp-{dead}-abcd"  # named by an earlier version: its host is unknown
        other_output = tmp_path / f".hf2.tmp-{dead}@{host}-abcd"
        earlier_output(tmp_path / "hf")
        for d in (dead_here, old_dead_here / "previous", live_here, elsewhere, no_host,
                  other_output):
            d.mkdir(parents=True)
            (d / "model.safetensors").write_bytes(b"partial")
        code, _, err = run(capsys, root, tmp_path / "hf", "--force")
    finally:
        live.kill()
        live.wait()
    assert code == 0, err
    assert not dead_here.exists() and not old_dead_here.exists()
    assert f"removed leftover {dead_here} from an interrupted conversion (pid {dead})" in err
    assert f"removed leftover {old_dead_here} from an interrupted conversion (pid {dead})" in err
    assert live_here.exists() and str(live_here) not in err
    assert other_output.exists() and str(other_output) not in err
    for unsure, host_named in ((elsewhere, "other.host"), (no_host, "an unknown host")):
        assert unsure.exists()
        assert (f"warning: {unsure} may be left over from an interrupted conversion (pid {dead} on {host_named}); "
                f"delete it if no conversion to {tmp_path / 'hf'} is running there") in err


def test_previous_output_moved_aside_by_a_killed_replacement_is_restored(tmp_path, capsys):
    root, _ = make_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "hf"
    dead = dead_pid()
    old = tmp_path / f".hf.old-{dead}@{convert._HOST}-abcd"
    (old / "previous").mkdir(parents=True)  # killed between moving OUT aside and moving the new output in
    (old / "previous" / "old.txt").write_text("previous")
    (tmp_path / f".hf.tmp-{dead}@{convert._HOST}-abcd").mkdir()  # the new output it did not move in
    code, stdout, err = run(capsys, root, out)
    restored, removed_old, removed_tmp, *rest = [line for line in err.splitlines() if not line.startswith("warning")]
    assert restored == (f"restored {out}, which an interrupted --force replacement (pid {dead}) had moved to "
                        f"{old / 'previous'}")
    assert removed_old.startswith(f"removed leftover {old}") and removed_tmp.startswith("removed leftover")
    assert_error((code, stdout, "\n".join(rest)), r"hf already exists \(use --force to replace it\)")
    assert [f.name for f in out.iterdir()] == ["old.txt"] and (out / "old.txt").read_text() == "previous"
    assert not list(tmp_path.glob(".hf.*"))


def previous_output(tmp_path: Path) -> Path:
    return earlier_output(tmp_path / "hf")


def failing_rename(monkeypatch, fails) -> list[tuple[str, str]]:
    """Make convert's os.rename raise EIO on the calls for which `fails(call number)` is true; -> the calls."""
    real_rename, calls = os.rename, []

    def rename(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if fails(len(calls)):
            raise OSError(errno.EIO, "Input/output error")
        real_rename(src, dst)

    monkeypatch.setattr(convert.os, "rename", rename)
    return calls


def test_failed_replacement_puts_the_previous_output_back(tmp_path, capsys, monkeypatch):
    root, _ = make_checkpoint(tmp_path / "ckpt")
    out = previous_output(tmp_path)
    calls = failing_rename(monkeypatch, lambda n: n == 2)  # the previous output is aside; the new one fails
    assert_error(run(capsys, root, out, "--force"),
                 r"could not move the new output to \S+/hf \(Input/output error\); the previous output is unchanged")
    assert [(src.split("-")[0], dst) for src, dst in calls] == [("hf", "previous"), (".hf.tmp", "hf"),
                                                                ("previous", "hf")]
    assert previous_files(out) == ["conversion.json", "model-00001-of-00001.safetensors"]
    assert (out / "model-00001-of-00001.safetensors").read_text() == "previous"
    assert not list(tmp_path.glob(".hf.*"))


def test_previous_output_that_cannot_be_put_back_is_kept_and_named(tmp_path, capsys, monkeypatch):
    root, _ = make_checkpoint(tmp_path / "ckpt")
    out = previous_output(tmp_path)
    failing_rename(monkeypatch, lambda n: n > 1)  # neither the new output nor the previous one can move to OUT
    code, stdout, err = run(capsys, root, out, "--force")
    [old] = tmp_path.glob(".hf.old-*")
    assert_error((code, stdout, err), rf"could not move the new output to \S+/hf, nor put the previous one back "
                                      rf"\(Input/output error\): it is in {re.escape(str(old / 'previous'))}$")
    assert (old / "previous" / "model-00001-of-00001.safetensors").read_text() == "previous"
    assert not out.exists() and not list(tmp_path.glob(".hf.tmp-*"))


@pytest.mark.parametrize("disk_full", [
    OSError(errno.ENOSPC, "No space left on device"),
    SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),  # as safetensors
])
def test_disk_filling_up_while_writing_a_shard(tmp_path, capsys, monkeypatch, disk_full):
    root, _ = make_checkpoint(tmp_path / "ckpt")
    real, shards = convert.hf.save_file, []

    def save_file(tensors, filename, **kwargs):
        shards.append(filename)
        if len(shards) == 3:
            Path(filename).write_bytes(b"partial")
            raise disk_full
        real(tensors, filename, **kwargs)

    monkeypatch.setattr(convert.hf, "save_file", save_file)
    out = tmp_path / "hf"
    assert_error(run(capsys, root, out, "--shard-size", "40kB"),
                 rf"the disk is full: no space left on the filesystem of {re.escape(str(tmp_path))} while writing "
                 rf"{re.escape(str(out))} \(the output needs 0\.\d+ GB\); the partial output was removed")
    assert len(shards) == 3
    assert_nothing_at(out)


def truncate(root):
    file = root / "layer_03-model_01-model_states.pt"
    file.write_bytes(file.read_bytes()[:1000])


def rank_mismatch(root):
    file = root / "layer_02-model_01-model_states.pt"
    state = torch.load(file, weights_only=True)
    state["mlp.dense_h_to_4h.weight"] = state["mlp.dense_h_to_4h.weight"][:64].clone()
    torch.save(state, file)


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.mark.parametrize("breakage, args, pattern", [
    (lambda root: (root / "layer_03-model_00-model_states.pt").unlink(), [],
     r"missing layer file \S*layer_03-model_00-model_states\.pt \(expected the GPT-NeoX pipeline layout"),
    (rank_mismatch, [], r"layer_02-model_01-model_states\.pt: ranks disagree on 'mlp\.dense_h_to_4h\.weight': "
                        r"\(64, 64\).*\(128, 64\)"),
    (truncate, [], r"layer_03-model_01-model_states\.pt: truncated or corrupt"),
    (lambda root: (root / "configs" / "model.yml").write_text(
        (root / "configs" / "model.yml").read_text().replace('"intermediate_size": 256', '"intermediate_size": 512')),
     [], r"layer_02-model_00-model_states\.pt: tensor 'mlp\.dense_h_to_4h\.weight' .* has shape \(128, 64\), "
         r"the config expects \(256, 64\)"),
    (lambda root: (root / "configs" / "model.yml").unlink(), [], r"no model config.*--config.*--preset"),
    (lambda root: None, ["--preset", "pythia-70m"],
     r"ckpt holds a 2-layer model \(layer files up to layer_06\), the config describes 6 layers"),
    (lambda root: None, ["--config", "absent.yml"], r"absent\.yml: no such file"),
    (lambda root: write_tokenizer(root / "tokenizer.json", size=500), [], r"500 tokens, more than .* \(384\)"),
    (lambda root: (root / "tokenizer.json").write_text("{}"), [], r"tokenizer\.json: not a Hugging Face tokenizers"),
    (lambda root: torch.save({"word_embeddings.weight": RunsCode(root / "pwned")},
                             root / "layer_00-model_00-model_states.pt"), [],
     r"layer_00-model_00-model_states\.pt: refused to unpickle"),
])
def test_user_errors(tmp_path, capsys, breakage, args, pattern):
    root, _ = make_checkpoint(tmp_path / "ckpt")
    breakage(root)
    out = tmp_path / "hf"
    assert_error(run(capsys, root, out, *args), pattern)
    assert_nothing_at(out)
    assert not (root / "pwned").exists()


def test_path_errors(tmp_path, capsys):
    root, _ = make_checkpoint(tmp_path / "ckpt")
    assert_error(run(capsys, tmp_path / "absent", tmp_path / "hf"), r"absent: no such directory")
    (tmp_path / "file").write_text("")
    assert_error(run(capsys, root, tmp_path / "file" / "hf"), r"cannot write the output beside .*file/hf")
    synthetic.write_hf_checkpoint(tmp_path / "already", tiny_config())
    assert_error(run(capsys, tmp_path / "already", tmp_path / "hf"), "already a Hugging Face directory")
    assert_nothing_at(tmp_path / "hf")


def test_bad_arguments_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        convert.main([str(tmp_path), str(tmp_path / "hf"), "--shard-size", "lots"])
    assert e.value.code == 2 and "not a size: 'lots'" in capsys.readouterr().err
    assert [convert.parse_size(s) for s in ("4GB", "500MiB", "1000", "1.5kB")] == [4 * 10**9, 500 * 2**20, 1000, 1500]


@pytest.mark.parametrize("failure", [KeyboardInterrupt, OSError(28, "No space left on device")])
def test_interrupt_or_failure_leaves_nothing(tmp_path, capsys, monkeypatch, failure):
    root, _ = make_checkpoint(tmp_path / "ckpt")
    real = convert.hf.write_hf

    def failing_write(out_dir, config, stream, **kwargs):
        def fail_midway():
            for i, item in enumerate(stream):
                if i == 10:
                    raise failure
                yield item
        return real(out_dir, config, fail_midway(), **kwargs)

    monkeypatch.setattr(convert.hf, "write_hf", failing_write)
    out = tmp_path / "hf"
    code, _, err = run(capsys, root, out)
    assert (code, err.splitlines()[-1].split(":")[0]) == (130 if failure is KeyboardInterrupt else 2, "error")
    assert_nothing_at(out)
    earlier_output(out)  # with --force, an interrupted conversion leaves the previous output as it was
    run(capsys, root, out, "--force")
    assert previous_files(out) == ["conversion.json", "model-00001-of-00001.safetensors"]
    assert not list(tmp_path.glob(".hf.*"))


def test_verification_failure_is_an_error(tmp_path, capsys, monkeypatch):
    root, _ = make_checkpoint(tmp_path / "ckpt")
    real = convert.hf.torch_to_numpy
    monkeypatch.setattr(convert.hf, "torch_to_numpy", lambda t: real(t) * 2 if t.numel() == 64 else real(t))
    assert_error(run(capsys, root, tmp_path / "hf"), r"verification failed: tensor '.*' in .* differs")
    assert_nothing_at(tmp_path / "hf")


def test_cli_subprocess(tmp_path):
    help_run = subprocess.run([sys.executable, "-m", "neox_jax.convert", "--help"], cwd=REPO,
                              capture_output=True, text=True)
    assert help_run.returncode == 0 and "--shard-size" in help_run.stdout and "conversion.json" in help_run.stdout
    bad = subprocess.run([sys.executable, "-m", "neox_jax.convert", str(tmp_path / "absent"), str(tmp_path / "o")],
                         cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1, bad.stderr
