"""The GPU session: every GPU check, one after the other in order of value, in one run that fits the device
tool's 10-minute command (docs/gpu.md). Run it through `bash bench/gpu_session.sh run`, which first installs
the carried wheels and points NEOX_TOKENIZER at the carried tokenizer.

    python -m bench.gpu_session --out DIR              # GPT-NeoX-20B shapes on the GPU
    python -m bench.gpu_session --out DIR --tiny       # the same commands at toy sizes: a CPU dry run
    python -m bench.gpu_session --out DIR --only decode-torch,parity-int8   # some steps (a second run)
    python -m bench.gpu_session --list                 # the steps, their budgets and what they measure

Each step runs as its own process group (a child JAX or torch process frees the GPU when it exits), under
its budget as a timeout. As each step ends, DIR/gpu_session.json is rewritten whole with every finished
step's status, seconds and figures (the JSON its command wrote, or pytest's counts), so a run cut short
still returns what it measured; every step's output goes to DIR/gpu_session.log. Nothing else is written
to DIR (the device tool returns 8 files at most): the steps' own files, the parity checkpoint among them,
go to a temporary folder that is removed at the end. A step whose budget no
longer fits in what is left of --budget is skipped, and says so. Exit status: 0 when every step that ran
passed, 1 otherwise.

To add a step (a new figure), add a `Step` to STEPS where its value puts it, with a budget estimated as
docs/gpu.md's table does, and keep the sum of the default steps' budgets within DEFAULT_BUDGET_S
(tests/test_gpu_session.py checks both, and runs the new step's --tiny command under the image's packages).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BUDGET_S = 540  # of the device tool's 600 s command: 60 s for the wheel install, start-up and slack
TINY_TIMEOUT_S = 600  # a step's timeout in the CPU dry run, whose times say nothing about the GPU's
RESULT = "gpu_session.json"
LOG = "gpu_session.log"
TAIL_CHARS = 3000  # of a failed step's output, kept in the JSON


@dataclasses.dataclass(frozen=True)
class Work:
    """Where a step's files go, and whether this is the CPU dry run."""

    dir: Path
    tiny: bool

    def json(self, step: str) -> Path:
        return self.dir / f"{step}.json"


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    what: str  # the figure, in one line (docs/gpu.md says more, and its target)
    budget_s: int  # the timeout on an H200: docs/gpu.md's estimate with margin
    commands: Callable[[Work], list[list[str]]]  # run one after the other; the last writes work.json(name)
    default: bool = True  # False: only with --only (runs after the default steps, in a second call)


PY = sys.executable
# The tests step: the checks whose outcome can differ on GPU, most GPU-specific first: the compiled programs
# (no weight or cache copies, int8 read as stored, one device call), then numerics against transformers and
# the training arithmetic. The whole modules take ~6 min on an idle 2-core CPU (more on a GPU, where every
# tiny program compiles for CUDA): that is the `tests-all` step, for a second call. Both stop starting tests
# at their deadline (bench/pytest_deadline.py), so a slow run still returns what ran.
GPU_TESTS = ("tests/test_decode.py::test_decode_loop_copies_no_weights_and_no_cache",
             "tests/test_quantize.py::test_the_decode_step_reads_the_int8_weights_not_a_dequantized_copy",
             "tests/test_decode.py::test_decode_loop_runs_on_device_in_one_call",
             "tests/test_decode.py::test_prefill_attention_makes_each_score_sized_array_once",
             "tests/test_model.py::test_cached_decoding_equals_full_forward",
             "tests/test_model.py::test_fp16_full_context_stays_finite_and_matches_the_training_arithmetic",
             "tests/test_model.py::test_logits_match_transformers",
             "tests/test_decode.py::test_greedy_tokens_match_transformers",
             "tests/test_decode.py::test_chunked_prefill_fills_each_cache_slot_as_one_full_pass_does",
             "tests/test_quantize.py::test_quantized_logits_equal_the_dequantized_weights_in_fp32",
             "tests/test_parity_model.py::test_fp16_finite_on_full_context_and_uses_fp16_angles",
             "tests/test_sampling.py::test_full_softmax_sampling_has_the_model_distribution")
GPU_TEST_MODULES = ("tests/test_decode.py", "tests/test_quantize.py", "tests/test_model.py",
                    "tests/test_parity_model.py", "tests/test_sampling.py", "tests/test_streaming.py")
TESTS_MARGIN_S = 20  # of the tests step's budget: for the test running at its deadline, and pytest's exit
# The GPU session's parity checkpoint: 2 DeepSpeed ranks, decisive weights (attention scores and logits with a
# std of ~3, as a trained model's), 20B's vocabulary; the tiny run's has the same form at toy sizes.
PARITY_CONFIG = dict(vocab_size=50432, hidden_size=1024, num_layers=8, num_heads=16, intermediate_size=4096)
TINY_PARITY_CONFIG = dict(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256)


def environment(w: Work) -> list[list[str]]:
    return [[PY, "-m", "bench.gpu_session", "--environment", str(w.json("environment"))]]


def pytest_step(name: str, selection: tuple[str, ...]) -> Callable[[Work], list[list[str]]]:
    def commands(w: Work) -> list[list[str]]:
        # The dry run collects (imports every module and fixture) instead of running: what it checks is that
        # they import from the image's packages; running them is the CPU suite's job.
        mode = ["--collect-only"] if w.tiny else []
        return [[PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "bench.pytest_deadline", *mode,
                 *selection, f"--junitxml={w.dir / (name + '.xml')}"]]

    return commands


def checkpoint(w: Work) -> list[str]:
    config = TINY_PARITY_CONFIG if w.tiny else PARITY_CONFIG
    return [PY, "-m", "bench.gpu_session", "--checkpoint", str(w.dir / "parity_ckpt"), json.dumps(config)]


def parity(dtype: str, quantize: str | None = None, per_layer: bool = False) -> Callable[[Work], list[list[str]]]:
    name = "parity-" + (quantize or {"float16": "fp16", "float32": "fp32"}[dtype])

    def commands(w: Work) -> list[list[str]]:
        ckpt = w.dir / "parity_ckpt"
        make = [] if (ckpt / "tokenizer.json").exists() else [checkpoint(w)]
        tiny = ["--prompt", "The capital of France is", "--max-new-tokens", "2"] if w.tiny else []
        return make + [[PY, "-m", "parity.check", "--checkpoint", str(ckpt), "--tokenizer",
                        str(ckpt / "tokenizer.json"), "--dtype", dtype, *(["--quantize", quantize] if quantize else []),
                        *(["--per-layer"] if per_layer else []), *tiny, "--json", str(w.json(name))]]

    return commands


def compile_20b(w: Work) -> list[list[str]]:
    size = ["--preset", "tiny", "--slots", "64"] if w.tiny else []
    return [[PY, "-m", "bench.compile", *size, "--json", str(w.json("compile-20b"))]]


def decode(engine: str, batch: str = "1,8,32") -> Callable[[Work], list[list[str]]]:
    name = "decode-" + {"neox-jax": "fp16", "parity": "torch"}.get(engine, engine.removeprefix("neox-jax-"))

    def commands(w: Work) -> list[list[str]]:
        size = ["--tiny", "--batch", "2", "--prefill-tokens", "32", "--decode-steps", "4", "--reps", "1"] if w.tiny \
            else ["--batch", batch, "--reps", "2"]
        return [[PY, "-m", "bench.gpu", "--engines", engine, *size, "--json", str(w.json(name))]]

    return commands


def speculative_20b(w: Work) -> list[list[str]]:
    """Issue 25: speculative decoding's cost side at GPT-NeoX-20B shapes with a Pythia-410M-shaped draft."""
    size = ["--target", "tiny", "--draft", "tiny", "--k", "1", "--prompt-len", "16", "--reps", "1"] if w.tiny \
        else ["--target", "gpt-neox-20b", "--draft", "pythia-410m", "--dtype", "float16", "--k", "1,2,4,8",
              "--prompt-len", "512"]
    return [[PY, "-m", "bench.speculative", "--cost-only", *size, "--json", str(w.json("speculative-20b"))]]


# In order of value. The default steps' budgets add up to at most DEFAULT_BUDGET_S.
STEPS: list[Step] = [
    Step("environment", "jax, jaxlib, torch and CUDA versions, the device JAX and torch see, the carried wheels",
         20, environment),
    Step("tests", "the GPU-sensitive tests with JAX on CUDA (compiled-program checks, numerics): pass/fail counts",
         90, pytest_step("tests", GPU_TESTS)),
    Step("parity-fp16", "parity.check fp16 --per-layer on the synthetic 2-rank checkpoint against the PyTorch "
                        "reference on CUDA", 55, parity("float16", per_layer=True)),
    Step("compile-20b", "GPT-NeoX-20B's prefill and decode programs compiled from abstract shapes (fp16, batch 1, "
                        "2048 slots): seconds, target < 60", 75, compile_20b),
    Step("decode-fp16", "20B fp16: 2047-token prefill ms and TFLOP/s (target <= 150 ms), decode ms/token at batch "
                        "1/8/32 against the weight-read limit (target <= 11 ms at batch 1)", 150, decode("neox-jax")),
    Step("decode-int8", "20B int8: decode ms/token at batch 1/8/32 (target <= 6.5 ms at batch 1), and whether "
                        "its compiled decode holds a weight-sized float buffer (it must not)", 150,
         decode("neox-jax-int8")),
    # Second call (--only ...): the peer, the other quantized figures.
    Step("decode-torch", "the parity/ PyTorch model at the same 20B shapes: the peer the decode figures are "
                         "set against", 90, decode("parity"), default=False),
    Step("parity-int8", "parity.check --quantize int8 against the fp16 reference", 45, parity("float16", "int8"),
         default=False),
    Step("parity-fp8", "parity.check --quantize fp8 against the fp16 reference", 45, parity("float16", "fp8"),
         default=False),
    Step("decode-fp8", "20B fp8 (weight-only e4m3): decode ms/token at batch 1/8", 120,
         decode("neox-jax-fp8", "1,8"), default=False),
    Step("speculative-20b", "speculative decoding's cost side, 20B fp16 with a 410M-shaped draft: a (K+1)-token "
                            "verify pass against a decode step (K = 1, 2, 4, 8), a draft step against a target "
                            "step, and the expected speed-up at assumed acceptance rates", 240, speculative_20b,
         default=False),
    Step("tests-all", "the whole core test modules with JAX on CUDA (the real tokenizer's streaming tests too)",
         480, pytest_step("tests-all", GPU_TEST_MODULES), default=False),
    Step("parity-fp32", "parity.check fp32 on CUDA: its tight bounds catch TF32 matmuls where 'highest' precision is asked", 45,
         parity("float32"), default=False),
]


# ---- what a step returns ----

def pytest_counts(path: Path) -> dict:
    """Counts from pytest's JUnit XML, and the ids of what failed or was skipped."""
    root = ElementTree.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    out = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    out["failed"], out["skipped_ids"] = [], []
    for case in suite.iter("testcase"):
        test = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            out["failed"].append(test)
        elif (skip := case.find("skipped")) is not None:
            out["skipped_ids"].append(f"{test}: {skip.get('message', '')[:200]}")
    return out


def step_result(step: Step, work: Work) -> dict | None:
    if step.name.startswith("tests"):
        xml = work.dir / f"{step.name}.xml"
        return pytest_counts(xml) if xml.exists() else None
    path = work.json(step.name)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    # Cut short: bench.gpu's workers leave what they measured so far beside the JSON it did not write.
    partial = {p.name.removeprefix(path.name + ".").removesuffix(".partial"): json.loads(p.read_text())
               for p in sorted(path.parent.glob(path.name + ".*.partial"))}
    return {"partial": True, "results": partial} if partial else None


# ---- the run ----

def run_step(step: Step, work: Work, timeout: float, log) -> dict:
    started = time.perf_counter()
    status, returncode = "ok", 0
    log.write(f"\n===== {step.name} (budget {step.budget_s} s, timeout {timeout:.0f} s) =====\n")
    log.flush()
    offset = log.tell()
    for argv in step.commands(work):
        log.write(f"$ {' '.join(argv)}\n")
        log.flush()
        left = timeout - (time.perf_counter() - started)
        env = dict(os.environ, NEOX_PYTEST_DEADLINE=str(time.time() + left - TESTS_MARGIN_S))
        proc = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        try:
            returncode = proc.wait(timeout=max(1.0, left))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the step and every process it started: the GPU is freed
            proc.wait()
            status, returncode = "timeout", None
            break
        if returncode != 0:
            status = "failed"
            break
    seconds = time.perf_counter() - started
    out = {"name": step.name, "what": step.what, "budget_s": step.budget_s, "status": status,
           "returncode": returncode, "seconds": round(seconds, 1), "result": step_result(step, work)}
    if status != "ok":
        log.flush()
        with open(log.name, errors="replace") as f:
            f.seek(offset)
            out["log_tail"] = f.read()[-TAIL_CHARS:]
    return out


def write_json(path: Path, data: dict) -> None:
    """Whole or not at all: a run killed mid-write leaves the previous version."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def run(steps: list[Step], out: Path, work: Work, budget: float) -> int:
    deadline = time.perf_counter() + budget
    session = {"tiny": work.tiny, "budget_s": budget, "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
               "steps": []}
    failed = False
    with open(out / LOG, "a") as log:
        for step in steps:
            left = deadline - time.perf_counter()
            if step.budget_s > left and not work.tiny:
                entry = {"name": step.name, "what": step.what, "budget_s": step.budget_s, "status": "skipped",
                         "reason": f"{left:.0f} s left of the {budget:.0f} s budget"}
            else:
                print(f"[{budget - left:5.0f} s] {step.name} (budget {step.budget_s} s) ...", flush=True)
                entry = run_step(step, work, TINY_TIMEOUT_S if work.tiny else step.budget_s, log)
            failed |= entry["status"] in ("failed", "timeout")
            session["steps"].append(entry)
            write_json(out / RESULT, session)
            print(f"        {step.name}: {entry['status']}"
                  + (f" in {entry['seconds']} s" if "seconds" in entry else f" ({entry['reason']})"), flush=True)
            if "log_tail" in entry:
                print("        " + entry["log_tail"][-600:].replace("\n", "\n        "), flush=True)
    print(f"wrote {out / RESULT} and {out / LOG}")
    return 1 if failed else 0


# ---- helpers the steps run ----

def write_environment(path: str) -> None:
    import importlib.metadata

    import jax
    import torch

    def version(dist):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    devices = jax.devices()
    env = {"python": sys.version.split()[0], "jax_backend": jax.default_backend(),
           "jax_devices": [f"{d.device_kind} ({d.platform})" for d in devices],
           "torch_cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "versions": {d: version(d) for d in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt", "flax",
                                                 "torch", "transformers", "tokenizers", "safetensors", "numpy",
                                                 "pydantic", "pydantic-core", "typing-extensions", "pytest")},
           "pythonpath": os.environ.get("PYTHONPATH", ""), "neox_tokenizer": os.environ.get("NEOX_TOKENIZER"),
           "tokenizer_found": bool(os.environ.get("NEOX_TOKENIZER")) and os.path.isfile(os.environ["NEOX_TOKENIZER"])}
    if jax.default_backend() == "gpu":
        stats = devices[0].memory_stats() or {}
        env["gpu_bytes_limit"] = stats.get("bytes_limit")
    Path(path).write_text(json.dumps(env, indent=1))
    print(json.dumps(env, indent=1))


def write_checkpoint(directory: str, config_json: str) -> None:
    import numpy as np

    from neox_jax.checkpoints.synthetic import decisive_tensors, write_deepspeed_checkpoint
    from neox_jax.config import NeoXConfig
    from neox_jax.tokenizer import demo_tokenizer

    config = NeoXConfig(**json.loads(config_json))
    write_deepspeed_checkpoint(directory, config, decisive_tensors(config), ranks=2, dtype=np.float16)
    demo_tokenizer()._tokenizer.save(str(Path(directory) / "tokenizer.json"))
    print(f"wrote {directory}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_session", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", help="where gpu_session.json and gpu_session.log go (the device tool's $OUT)")
    parser.add_argument("--tiny", action="store_true", help="toy sizes: the CPU dry run of every step's command")
    parser.add_argument("--only", help="comma list of steps to run, in STEPS order (default: the default steps)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                        help=f"seconds for the whole run (default {DEFAULT_BUDGET_S}); a step that no longer fits "
                             f"is skipped")
    parser.add_argument("--list", action="store_true", help="print the steps and exit")
    parser.add_argument("--environment", metavar="FILE", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", nargs=2, metavar=("DIR", "CONFIG_JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.environment:
        write_environment(args.environment)
        return 0
    if args.checkpoint:
        write_checkpoint(*args.checkpoint)
        return 0
    if args.list:
        for s in STEPS:
            print(f"{s.name:13s} {s.budget_s:4d} s  {'' if s.default else '(--only) '}{s.what}")
        print(f"default steps: {sum(s.budget_s for s in STEPS if s.default)} s of budget {DEFAULT_BUDGET_S} s")
        return 0
    if not args.out:
        parser.error("--out DIR is required")
    names = {s.name for s in STEPS}
    only = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
    if only is not None and (unknown := [n for n in only if n not in names]):
        parser.error(f"--only: unknown step {', '.join(unknown)} (choose from {', '.join(s.name for s in STEPS)})")
    if args.budget <= 0:
        parser.error("--budget must be positive")
    steps = [s for s in STEPS if (s.name in only if only is not None else s.default)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Work(Path(tempfile.mkdtemp(prefix="gpu_session_")), args.tiny)
    try:
        return run(steps, out, work, args.budget)
    finally:
        shutil.rmtree(work.dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
