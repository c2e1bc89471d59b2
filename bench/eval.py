"""Evaluation benchmark: `python -m neox_jax.eval`'s model against lm-eval's own `hf` model (transformers) on the
same weights and the same tasks, in one run.

    python -m bench.eval [--model DIR] [--tokenizer FILE] [--task hellaswag_local_tiny[,TASK...]]
                         [--batch-size 16] [--limit N] [--json OUT] [--markdown docs/figures/eval.md]

--model is a Hugging Face GPT-NeoX directory; without it, random fp32 weights of the Pythia-70M shape. The
tokenizer: --tokenizer, else the model's tokenizer.json, else the GPT-NeoX-20B one as --demo finds it
(neox_jax.demo.trained_tokenizer). The tasks are local lm-eval tasks of tests/data (default:
hellaswag_local_tiny.yaml, HellaSwag-shaped: each context shared by 4 endings). Each engine runs in its own
child process, fp32 on the CPU, with the same batch size: it loads the model (timed apart), then runs
`lm_eval.simple_evaluate` on each task in turn with its samples logged. neox-jax runs twice, with JAX's
persistent compilation cache on as `python -m neox_jax.eval` has it: cold (an empty cache: a first run) and
warm (reading back what the cold run wrote: any later run of the same model and tasks).

* eval s: the wall time of `simple_evaluate` (lm-eval's building of the requests included; its indexing of
  its own task folder, ~10 s, is not: only tests/data is indexed, before the clock starts); requests/s: the
  task's requests (documents x answers) over that time. neox-jax's split: compile s (compiling, or reading
  compiled programs back), prefill s (shared contexts: packed rows of a context and its continuations, or
  contexts into a cache), scoring s (continuations against a cache, the scored positions' output
  projection, and whole rows: placing the rows, computing, waiting for the result) and host s (the rest:
  lm-eval, tokenising, bookkeeping).
* The check: both engines' metrics equal (accuracies exactly; others within 1e-4, relative above 1), and the
  largest difference between their log-likelihoods of the same request (target: <= 1e-4).
* The ratio: lm-eval `hf`'s eval time over neox-jax's (target on a multiple-choice task: >= 2).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from .common import load_average, markdown_page, markdown_table, run_worker, sig, table, utc_now, write_page

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data"
TARGET_RATIO = 2.0
ENGINES = ("neox-jax", "hf")
RUNS = {"neox-jax cold": "neox-jax", "neox-jax warm": "neox-jax", "hf": "hf"}  # in this order, one process each


def random_model(out: Path, tokenizer: Path) -> Path:
    from neox_jax.checkpoints.synthetic import write_hf_checkpoint
    from neox_jax.config import PRESETS

    path = write_hf_checkpoint(out, PRESETS["pythia-70m"], seed=0)
    (path / "tokenizer.json").write_bytes(tokenizer.read_bytes())
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": "<|padding|>"}))
    return path


def hf_tokenizer(path: Path):
    """transformers' GPT-NeoX tokenizer from a tokenizer JSON, for lm-eval's `hf` model."""
    import transformers

    cls = getattr(transformers, "GPTNeoXTokenizer", None) or transformers.GPTNeoXTokenizerFast
    return cls(tokenizer_file=str(path))


def worker(args) -> int:
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    start = time.perf_counter()
    if args.worker == "neox-jax":
        from neox_jax.eval import use_compilation_cache
        from neox_jax.lm_eval_model import NeoXLM

        use_compilation_cache()  # as `python -m neox_jax.eval` does; the run picks the folder
        lm = NeoXLM(pretrained=args.model, tokenizer=args.tokenizer, dtype="float32", batch_size=args.batch_size)
    else:
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=args.model, tokenizer=hf_tokenizer(args.tokenizer) if args.tokenizer else None,
                  dtype="float32", device="cpu", batch_size=args.batch_size)
    load_s = time.perf_counter() - start
    os.chdir(REPO)  # the task YAMLs name their data files relative to the repository root
    manager = TaskManager(include_path=str(DATA), include_defaults=False)  # indexing lm-eval's own takes ~10 s
    tasks = {}
    for task in args.task.split(","):  # one at a time, each timed apart
        before = phases(lm)
        start = time.perf_counter()
        results = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager, bootstrap_iters=0,
                                          log_samples=True, limit=args.limit)
        eval_s = time.perf_counter() - start
        # Each request's response: [(log-likelihood, is_greedy)], or [log-likelihood] for rolling ones.
        loglik = {f"{s['doc_id']}/{i}": float(resp[0][0] if isinstance(resp[0], (list, tuple)) else resp[0])
                  for s in results["samples"][task] for i, resp in enumerate(s["resps"])}
        metrics = {k: v for k, v in results["results"][task].items()
                   if "stderr" not in k and isinstance(v, float)}
        tasks[task] = dict(eval_s=eval_s, requests=len(loglik), loglik=loglik, metrics=metrics,
                           output_type=results["configs"][task]["output_type"],
                           **{k: v - before[k] for k, v in phases(lm).items()})
    Path(args.worker_out).write_text(json.dumps(dict(load_s=load_s, tasks=tasks)))
    return 0


def phases(lm) -> dict:
    """neox-jax's seconds so far: compiling (or reading compiled programs back), computing contexts (prefill:
    packed rows or into a cache) and scoring (continuations, the head, whole rows); nothing for `hf`."""
    if not hasattr(lm, "context_scorer"):
        return {}
    prefill, continuations, head, packed = lm.context_scorer.run_seconds
    return dict(compile_s=lm.compile_seconds, prefill_s=prefill + packed,
                scoring_s=continuations + head + lm.scorer.run_seconds[0])


def compare(runs: dict) -> dict:
    """One task's figures of every run ({label: worker's task figures}, "hf" the reference): requests, metrics
    and log-likelihoods compared."""
    ref, ours = runs["hf"], [r for label, r in runs.items() if label != "hf"]
    diffs = [max(abs(r["loglik"][k] - ref["loglik"][k]) for k in r["loglik"].keys() & ref["loglik"].keys())
             for r in ours]
    relative = [max(abs(r["loglik"][k] - ref["loglik"][k]) / max(1.0, abs(ref["loglik"][k]))
                    for k in r["loglik"].keys() & ref["loglik"].keys()) for r in ours]
    metric_diff = max(abs(v - ref["metrics"][k]) / max(1.0, abs(ref["metrics"][k]))
                      for r in ours for k, v in r["metrics"].items())
    return dict(runs={label: {k: v for k, v in r.items() if k != "loglik"} for label, r in runs.items()},
                max_loglik_diff=max(diffs), max_loglik_rel=max(relative),
                same_requests=all(r["loglik"].keys() == ref["loglik"].keys() for r in ours),
                same_metrics=all(r["metrics"].keys() == ref["metrics"].keys() for r in ours), max_metric_diff=metric_diff,
                ratio={label: ref["eval_s"] / r["eval_s"] for label, r in runs.items() if label != "hf"},
                output_type=ref["output_type"])


def run_bench(args) -> dict:
    """Each of `args.task` (comma-separated) through neox-jax twice, first with an empty compilation cache
    (cold: a first run) then reading it back (warm: any later run), and through lm-eval's `hf` model ->
    {batch_size, load_s per run, tasks}."""
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            args.model = str(random_model(Path(tmp) / "model", args.tokenizer))
            args.tokenizer = None
        argv = ["--model", args.model, "--task", args.task, "--batch-size", str(args.batch_size)]
        argv += ["--tokenizer", str(args.tokenizer)] if args.tokenizer else []
        argv += ["--limit", str(args.limit)] if args.limit else []
        env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(Path(tmp) / "xla")}
        runs = {label: run_worker("bench.eval", engine, argv, env=env) for label, engine in RUNS.items()}
    return dict(batch_size=args.batch_size, load_s={label: r["load_s"] for label, r in runs.items()},
                tasks={task: compare({label: r["tasks"][task] for label, r in runs.items()})
                       for task in args.task.split(",")})


def render_task(task: str, result: dict, load_s: dict, batch_size: int, markdown: bool) -> str:
    runs = result["runs"]
    names = sorted(runs["hf"]["metrics"])
    headers = ["run", "load s", "eval s", "compile s", "prefill s", "scoring s", "host s", "requests",
               "requests/s", *(n.removesuffix(",none") for n in names)]
    rows = []
    for label, r in runs.items():
        split = [r[k] for k in ("compile_s", "prefill_s", "scoring_s")] if "compile_s" in r else None
        rows.append([label, sig(load_s[label]), sig(r["eval_s"]),
                     *([sig(x) for x in split] + [sig(r["eval_s"] - sum(split))] if split else ["-"] * 4),
                     r["requests"], sig(r["requests"] / r["eval_s"]), *(f"{r['metrics'][n]:.6g}" for n in names)])
    verdicts = []
    for label, ratio in result["ratio"].items():
        line = f"lm-eval `hf` eval time / {label}'s: {ratio:.2f}x"
        if result["output_type"] == "multiple_choice":  # issue 27's target is for shared contexts
            line += f" (target >= {TARGET_RATIO:g}x: {'met' if ratio >= TARGET_RATIO else 'not met'})"
        verdicts.append(line)
    verdicts.append(f"same requests: {result['same_requests']}; same metrics: {result['same_metrics']}, largest "
                    f"difference {result['max_metric_diff']:.1e} (relative above 1; target <= 1e-4); largest "
                    f"log-likelihood difference {result['max_loglik_diff']:.2e}, relative above 1 "
                    f"{result['max_loglik_rel']:.1e} (target <= 1e-4)")
    title = f"{task} ({result['output_type']}), batch size {batch_size}, fp32, CPU"
    if markdown:
        return f"## {title}\n\n{markdown_table(headers, rows)}\n\n" + "".join(f"- {v}\n" for v in verdicts)
    return f"{title}\n{table(headers, rows)}\n" + "\n".join(verdicts)


def render(result: dict, markdown: bool) -> str:
    return "\n".join(render_task(task, r, result["load_s"], result["batch_size"], markdown)
                     for task, r in result["tasks"].items())


def check_args(parser, args) -> None:
    """Every argument checked before a worker starts; --tokenizer resolved."""
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be >= 1, got {args.limit}")
    if args.model is not None and not (Path(args.model) / "config.json").is_file():
        parser.error(f"--model {args.model}: no config.json there (a Hugging Face GPT-NeoX directory is needed)")
    if args.tokenizer is None and (args.model is None or not (Path(args.model) / "tokenizer.json").is_file()):
        from neox_jax.demo import trained_tokenizer

        args.tokenizer = trained_tokenizer()
        if args.tokenizer is None:
            parser.error("no tokenizer: pass --tokenizer FILE (or set NEOX_TOKENIZER)")
    if args.tokenizer is not None and not args.tokenizer.is_file():
        parser.error(f"--tokenizer {args.tokenizer}: not found")
    for task in args.task.split(","):
        if not (DATA / f"{task}.yaml").is_file():
            parser.error(f"--task {task}: no {DATA / (task + '.yaml')}")
    if args.markdown and not Path(args.markdown).resolve().parent.is_dir():
        parser.error(f"--markdown {args.markdown}: its folder does not exist")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.eval", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Hugging Face GPT-NeoX directory (default: random Pythia-70M-shaped weights)")
    parser.add_argument("--tokenizer", type=Path, default=None, help="tokenizer JSON (default: the model's "
                        "tokenizer.json; for the random model, as --demo finds it: $NEOX_TOKENIZER, "
                        "../shared/data/20B_tokenizer.json, the hub cache)")
    parser.add_argument("--task", default="hellaswag_local_tiny", help="tasks of tests/data, comma-separated "
                        "(default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16, help="rows per forward pass, both engines")
    parser.add_argument("--limit", type=int, default=None, help="documents per task (default: all)")
    parser.add_argument("--json", metavar="OUT", help="also write the figures as JSON")
    parser.add_argument("--markdown", metavar="FILE", help="also write a Markdown page with the date, machine and "
                        "command (docs/figures/eval.md)")
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    check_args(parser, args)
    started = utc_now()
    result = run_bench(args)
    print(render(result, markdown=False), flush=True)
    if args.json:
        write_page(args.json, json.dumps(result, indent=2))
    if args.markdown:
        write_page(args.markdown, markdown_page("Evaluation benchmark", "bench.eval", sys.argv[1:] if argv is None else argv,
                                                render(result, markdown=True), started))
    print(f"load average: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
