"""Mutation-test one core module against the tests that are meant to catch its bugs.

    python tools/mutation.py neox_jax/model.py            # mutate, run, print the score and the survivors
    python tools/mutation.py neox_jax/model.py --results  # the last run's score and survivors again
    python tools/mutation.py neox_jax/model.py --sample 60  # a seeded random sample: an estimate in minutes
    python tools/mutation.py --list                       # the modules and their focused tests

mutmut reads its settings from `pyproject.toml` in the directory it runs in, so each module gets its own work
directory `.mutation/<module>/`: a `pyproject.toml` built from `[tool.mutmut]` with `only_mutate` and the test
selection narrowed to the table below, and links to the sources. Runs of different modules therefore keep
their results apart (and may run at once), and a rerun reuses mutmut's record of what it already tested.
Compiled XLA programs are cached on disk across mutants (`JAX_COMPILATION_CACHE_DIR`): a mutant that does not
change a traced program (validation, the host-side loop) reuses the unmutated compilations.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The focused tests of each core module: those written against its behaviour, fast enough to run per mutant.
FOCUSED_TESTS = {
    "neox_jax/model.py": ["tests/test_model.py", "tests/test_numerics.py", "tests/test_precision.py"],
    "neox_jax/sampling.py": ["tests/test_sampling.py", "tests/test_sampling_statistics.py"],
    "neox_jax/decode.py": ["tests/test_decode.py", "tests/test_decode_loop.py", "tests/test_streaming.py",
                           "tests/test_faults.py", "tests/test_sharding.py"],
    "neox_jax/sharding.py": ["tests/test_sharding.py", "tests/test_memory_plan.py", "tests/test_split_layout.py"],
    "neox_jax/checkpoints/deepspeed.py": ["tests/test_deepspeed.py", "tests/test_split_layout.py",
                                          "tests/test_unsafe_pickles.py"],
    "neox_jax/checkpoints/safe_unpickle.py": ["tests/test_unsafe_pickles.py", "tests/test_deepspeed.py"],
    "neox_jax/params.py": ["tests/test_params.py", "tests/test_split_layout.py"],
    "parity/model.py": ["tests/test_parity_model.py"],
}


def work_dir(module: str) -> Path:
    return REPO / ".mutation" / module.replace("/", "-").removesuffix(".py")


def prepare(module: str) -> Path:
    """The module's work directory: linked sources and tests, its own pyproject.toml."""
    settings = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["mutmut"]
    # A mutant's time limit is 15x its tests' own time plus this constant, which must cover the fork, test
    # collection and compilation that the tests' recorded durations leave out, on a loaded 2-core machine.
    settings.update(only_mutate=[module], pytest_add_cli_args_test_selection=FOCUSED_TESTS[module],
                    timeout_constant=120, also_copy=["docs/"])  # a test runs the docs' examples
    work = work_dir(module)
    work.mkdir(parents=True, exist_ok=True)
    for name in ("neox_jax", "parity", "tests", "docs"):
        link = work / name
        if not link.is_symlink():
            link.symlink_to(REPO / name)
    lines = ["[tool.mutmut]"] + [f"{key} = {_toml(value)}" for key, value in settings.items()]
    (work / "pyproject.toml").write_text("\n".join(lines) + "\n")
    return work


def _toml(value) -> str:
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def run_mutmut(work: Path, *args: str, capture: bool = False, check: bool = True) -> str:
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(work / "xla-cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    result = subprocess.run([sys.executable, "-m", "mutmut", *args], cwd=work, env=env, text=True,
                            capture_output=capture)
    if check and result.returncode:
        sys.exit(f"error: mutmut {' '.join(args)} failed in {work} (exit {result.returncode})")
    return result.stdout if capture else ""


def mutant_names(work: Path, module: str) -> list[str]:
    """Every mutant of the module, generating them (and mutmut's test statistics) on first use."""
    meta = work / "mutants" / f"{module}.meta"
    if not meta.exists():  # mutmut writes it, then refuses a filter that matches no mutant: nothing is run
        run_mutmut(work, "run", f"{module_name(module)}.no-such-mutant", capture=True, check=False)
    if not meta.exists():
        sys.exit(f"error: mutmut generated no mutants of {module} in {work}")
    return sorted(tested(work, module))


def tested(work: Path, module: str) -> dict[str, int | None]:
    """Each mutant's exit status from the last run, None where it has not been tested."""
    return json.loads((work / "mutants" / f"{module}.meta").read_text())["exit_code_by_key"]


def module_name(module: str) -> str:
    return re.sub(r"\.py$", "", module).replace("/", ".")


def chosen(names: list[str], sample: int | None) -> list[str]:
    """All mutants, or the same seeded sample of them on every call."""
    return names if sample is None or sample >= len(names) else random.Random(0).sample(names, sample)


def report(work: Path, module: str, names: list[str], total: int) -> None:
    """Print killed / tested and every survivor's name (`mutmut show NAME` in the work dir gives its diff)."""
    rows = [line.strip().rsplit(": ", 1) for line in run_mutmut(work, "results", "--all", "true", capture=True)
            .splitlines() if ": " in line]
    status = {name: state for name, state in rows if name in set(names)}
    tested = {name: state for name, state in status.items() if state != "not checked"}
    killed = sum(state == "killed" for state in tested.values())
    print(f"{module}: {killed} of {len(tested)} mutants killed ({100 * killed / max(len(tested), 1):.0f}%); "
          f"{len(tested)} of {total} tested")
    for name, state in sorted(tested.items()):
        if state != "killed":
            print(f"  {state:12} {name}")
    print(f"diffs: cd {work.relative_to(REPO)} && mutmut show NAME")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("module", nargs="?", choices=sorted(FOCUSED_TESTS), help="core module to mutate")
    parser.add_argument("--sample", type=int, help="test only this many mutants, drawn at random (seed 0)")
    parser.add_argument("--results", action="store_true", help="only print the last run's score and survivors")
    parser.add_argument("--max-children", type=int, default=os.cpu_count(), help="mutants tested at once")
    parser.add_argument("--list", action="store_true", help="list the core modules and their focused tests")
    args = parser.parse_args()
    if args.list or not args.module:
        for module, tests in FOCUSED_TESTS.items():
            print(f"{module}: {' '.join(tests)}")
        return
    work = prepare(args.module)
    names = mutant_names(work, args.module)
    selected = chosen(names, args.sample)
    untested = [name for name in selected if tested(work, args.module).get(name) is None]
    if untested and not args.results:  # named mutants are always rerun: name only those without a result
        run_mutmut(work, "run", "--max-children", str(args.max_children), *untested)
    report(work, args.module, selected, len(names))


if __name__ == "__main__":
    main()
