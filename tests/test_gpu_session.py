"""The GPU session (bench/gpu_session.sh, bench/gpu_session.py) works the first time on the GPU machine: everything
it runs imports only what that machine's image has (bench/device_packages.txt) or what travels as wheels
(bench/carried_wheels.txt), its default steps fit one 10-minute device command, and a run cut short keeps the
figures of the steps that finished.

Two checks of the imports: every import statement anywhere in the modules the steps run, and what they import
(read from the source, so lazy imports count), and the steps' own commands run at toy sizes on CPU under an
import hook that refuses anything else (bench/device_image.py), as the image would."""

import ast
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import device_image, gpu_session
from bench.gpu_session import DEFAULT_BUDGET_S, STEPS, Step, Work

from conftest import REPO

ALLOWED = device_image.allowed_distributions()
# Imports the source walk reaches but no step executes, each with why; anything else off the image fails.
NOT_EXECUTED = {
    "lm_eval": "neox_jax/eval.py imports it inside main() (python -m neox_jax.eval); the session's tests use only "
               "its build_argv (test_quantize), and no step runs the eval CLI",
}
DISTRIBUTIONS = importlib.metadata.packages_distributions()


# ---- the import closure, from the source ----

def repo_file(module: str) -> Path | None:
    """The file of a module of this checkout: a package's, or one of tests/ (imported by its bare name)."""
    parts = module.split(".")
    for base in (REPO, REPO / "tests"):
        for path in (base.joinpath(*parts).with_suffix(".py"), base.joinpath(*parts, "__init__.py")):
            if path.is_file():
                return path
    return None


def imports_of(path: Path, module: str) -> list[tuple[str, int]]:
    """(absolute module name, line) of every import in a file: `import a.b`, `from a import b` (b a module or
    a name) and relative imports, at any depth of the source."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.append((base, node.lineno))
            found += [(f"{base}.{alias.name}", node.lineno) for alias in node.names
                      if repo_file(f"{base}.{alias.name}")]
    return found


def closure(roots: list[str]) -> dict[str, str]:
    """Top-level third-party names imported from `roots` and every module of this checkout they import,
    each with the first place that imports it (`file:line`)."""
    seen, outside, todo = set(), {}, list(roots)
    while todo:
        module = todo.pop()
        parts = module.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a and a.b first
            name = ".".join(parts[:i])
            path = repo_file(name)
            if path is None or name in seen:
                continue
            seen.add(name)
            for imported, line in imports_of(path, name):
                if repo_file(imported):
                    todo.append(imported)
                else:
                    where = path.relative_to(REPO) if path.is_relative_to(REPO) else path.name
                    outside.setdefault(imported.split(".")[0], f"{where}:{line}")
    return outside


def not_on_the_image(outside: dict[str, str]) -> list[str]:
    """The names that come from neither the standard library nor an allowed distribution, with where."""
    bad = []
    for name, where in sorted(outside.items()):
        if name in sys.stdlib_module_names or name == "__future__" or name in NOT_EXECUTED:
            continue
        dists = {device_image.normalize(d) for d in DISTRIBUTIONS.get(name, [])}
        if not dists & ALLOWED:
            bad.append(f"{name} ({', '.join(sorted(dists)) or 'not installed here'}), imported at {where}")
    return bad


def session_roots() -> list[str]:
    """The modules and test files every step's commands run, at GPU and at toy sizes."""
    roots = {"bench.gpu_session", "conftest"}
    for step in STEPS:
        for tiny in (False, True):
            for argv in step.commands(Work(Path("/nonexistent"), tiny)):
                roots.update(nxt for flag, nxt in zip(argv, argv[1:]) if flag in ("-m", "-p") and ":" not in nxt)
                roots.update(Path(a.split("::")[0]).stem for a in argv if a.startswith("tests/"))
    roots.discard("pytest")
    return sorted(roots)


def test_every_import_the_gpu_session_can_reach_is_on_the_image_or_carried():
    roots = session_roots()
    assert {"bench.gpu", "bench.compile", "parity.check", "bench.pytest_deadline", "test_quantize", "test_decode",
            "test_streaming"} <= set(roots)
    outside = closure(roots)
    assert {"jax", "torch", "flax", "pydantic", "tokenizers", "numpy"} <= outside.keys()  # the walk sees them
    assert not_on_the_image(outside) == []


def test_the_closure_check_names_a_module_the_image_lacks(tmp_path, monkeypatch):
    if "starlette" not in DISTRIBUTIONS:
        pytest.skip("starlette is not installed here")
    (tmp_path / "planted.py").write_text("import numpy\n\ndef later():\n    import starlette.routing\n")
    monkeypatch.setattr(sys.modules[__name__], "repo_file",
                        lambda m: tmp_path / "planted.py" if m == "planted" else None)
    assert not_on_the_image(closure(["planted"])) == ["starlette (starlette), imported at planted.py:4"]


def test_the_lists_hold_what_the_session_needs_and_no_guess():
    assert {"jax", "jaxlib", "torch", "flax", "transformers", "pytest", "typing-extensions"} <= ALLOWED
    assert "pydantic" not in device_image.read_list(device_image.PACKAGE_LISTS[0])  # the image lacks it
    carried = device_image.read_list(device_image.PACKAGE_LISTS[1])
    assert carried == {"pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions"}
    for line in device_image.PACKAGE_LISTS[1].read_text().splitlines():
        assert line.startswith("#") or "==" in line, f"carried wheels are pinned: {line}"


# ---- the import hook ----

def guarded_env(tmp_path: Path) -> dict:
    device_image.write_sitecustomize(tmp_path / "guard")
    env = dict(os.environ, NEOX_DEVICE_IMPORT_LOG=str(tmp_path / "imports.log"))
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "guard"), str(REPO), env.get("PYTHONPATH", "")])
    return env


def test_the_hook_refuses_what_the_image_lacks_and_names_it(tmp_path):
    env = guarded_env(tmp_path)
    if "starlette" not in DISTRIBUTIONS:
        pytest.skip("starlette is not installed here")
    script = ("import importlib.metadata, json, yaml, pydantic\n"
              "names = {d.metadata['Name'].lower() for d in importlib.metadata.distributions()}\n"
              "assert 'starlette' not in names and 'pydantic' in names, names  # its metadata is hidden too\n"
              "try:\n    import starlette\nexcept ImportError:\n    pass\n"
              "import starlette")  # refused the second time too
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "No module named 'starlette' on the GPU machine" in proc.stderr, proc.stderr
    assert "bench/device_packages.txt" in proc.stderr
    log = (tmp_path / "imports.log").read_text().splitlines()
    assert "refused starlette starlette <string>" in log and "allowed pydantic pydantic" in log, log


# ---- the run ----

def test_the_default_steps_fit_one_ten_minute_command_in_order_of_value():
    names = [s.name for s in STEPS]
    assert len(set(names)) == len(names)
    default = [s for s in STEPS if s.default]
    assert [s.name for s in default][:3] == ["environment", "tests", "parity-fp16"]
    assert sum(s.budget_s for s in default) <= DEFAULT_BUDGET_S <= 600 - 45
    assert names.index("decode-fp16") < names.index("decode-int8") < names.index("decode-torch")


def test_a_run_cut_short_keeps_every_finished_step(tmp_path, capsys):
    """A step past its budget is killed with its children and reported; the JSON is whole after every step;
    a step that no longer fits is skipped and says so."""
    py = [sys.executable, "-c"]
    steps = [Step("quick", "writes its figures", 30, lambda w: [py + [f"open({str(w.json('quick'))!r}, 'w')"
                                                                      f".write('{{\"x\": 1}}')"]]),
             Step("stuck", "outlives its budget", 1, lambda w: [py + ["import time; time.sleep(60)"]]),
             Step("failing", "exits 3", 5, lambda w: [py + ["print('boom'); raise SystemExit(3)"]]),
             Step("late", "does not fit", 60, lambda w: [py + ["pass"]])]
    work = Work(tmp_path / "work", tiny=False)
    work.dir.mkdir()
    assert gpu_session.run(steps, tmp_path, work, budget=45) == 1
    report = json.loads((tmp_path / "gpu_session.json").read_text())
    by_name = {s["name"]: s for s in report["steps"]}
    assert by_name["quick"]["status"] == "ok" and by_name["quick"]["result"] == {"x": 1}
    assert by_name["stuck"]["status"] == "timeout" and by_name["stuck"]["seconds"] < 10
    assert by_name["failing"]["status"] == "failed" and "boom" in by_name["failing"]["log_tail"]
    assert by_name["late"]["status"] == "skipped" and "left of the 45 s budget" in by_name["late"]["reason"]
    assert "===== stuck" in (tmp_path / "gpu_session.log").read_text()


def test_the_session_refuses_an_unknown_step(capsys):
    with pytest.raises(SystemExit) as e:
        gpu_session.main(["--out", "/tmp/unused", "--only", "decode-fp16,nonsense"])
    assert e.value.code == 2 and "unknown step nonsense" in capsys.readouterr().err


def test_every_step_runs_at_toy_sizes_under_the_images_packages(tmp_path):
    """`bash bench/gpu_session.sh run --tiny`, restricted to the image's and the carried packages: each step
    passes and returns its figures, PYTHONPATH survives the script (the hook is active in every step), and
    nothing was refused. Slow for this suite (every step starts JAX), but it is the GPU session's one rehearsal."""
    env = guarded_env(tmp_path)
    env.update(OUT=str(tmp_path / "out"), PYTHON=sys.executable)
    proc = subprocess.run(["bash", "bench/gpu_session.sh", "run", "--tiny"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    log = (tmp_path / "imports.log").read_text().splitlines()
    refused = sorted({line for line in log if line.startswith("refused")})
    ours = [line for line in refused if line.split()[-1].startswith(str(REPO))]
    assert ours == [], ours  # this repository's code imports something the image lacks
    assert proc.returncode == 0, "\n".join([proc.stdout[-3000:], proc.stderr[-2000:], *refused])
    report = json.loads((tmp_path / "out" / "gpu_session.json").read_text())
    steps = {s["name"]: s for s in report["steps"]}
    assert [s.name for s in STEPS if s.default] == list(steps)
    assert all(s["status"] == "ok" and s["result"] for s in steps.values()), steps
    assert {"allowed jax jax", "allowed torch torch", "allowed pydantic pydantic"} <= set(log)
    assert steps["tests"]["result"]["errors"] == 0
    assert steps["compile-20b"]["result"]["total_seconds"] > 0
    assert "count" in steps["decode-int8"]["result"]["results"]["neox-jax-int8"]["weight_sized_float_buffers"]
    assert steps["parity-fp16"]["result"]["verdict"] == "pass"


def test_a_benchmark_cut_short_returns_the_cases_its_workers_finished(tmp_path):
    work = Work(tmp_path, tiny=False)
    (tmp_path / "decode-fp16.json.neox-jax.partial").write_text(json.dumps({"prefill": {"seconds": 0.1},
                                                                            "decode": [], "partial": True}))
    step = next(s for s in STEPS if s.name == "decode-fp16")
    assert gpu_session.step_result(step, work) == {"partial": True, "results": {"neox-jax": {
        "prefill": {"seconds": 0.1}, "decode": [], "partial": True}}}
    work.json("decode-fp16").write_text('{"results": {}}')  # the whole JSON wins once written
    assert gpu_session.step_result(step, work) == {"results": {}}


def test_the_tests_step_stops_starting_tests_at_its_deadline(tmp_path):
    (tmp_path / "test_two.py").write_text("def test_one():\n    pass\n\ndef test_two():\n    pass\n")
    xml = tmp_path / "out.xml"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "bench.pytest_deadline",
                           str(tmp_path / "test_two.py"), f"--junitxml={xml}"], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, NEOX_PYTEST_DEADLINE="1", PYTHONPATH=str(REPO)), timeout=120)
    assert "deadline for its tests step passed" in proc.stdout, proc.stdout
    counts = gpu_session.pytest_counts(xml)
    assert counts["tests"] == 0 and counts["failed"] == [], counts
