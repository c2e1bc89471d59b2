"""Evaluation benchmark: `python -m neox_jax.eval`'s model against lm-eval's own `hf` model (transformers) on the
same weights and the same multiple-choice task, in one run.

    python -m bench.eval [--model DIR] [--tokenizer FILE] [--task hellaswag_local_tiny] [--batch-size 16]
                         [--json OUT] [--markdown docs/figures/eval.md]

--model is a Hugging Face GPT-NeoX directory; without it, random fp32 weights of the Pythia-70M shape with the
real GPT-NeoX-20B tokenizer (--tokenizer, else as --demo finds it: neox_jax.demo.trained_tokenizer). The
task is a local lm-eval task (default: tests/data/hellaswag_local_tiny.yaml, HellaSwag-shaped: each context
shared by 4 endings). Each engine runs in its own child process, fp32 on the CPU, with the same batch size:
it loads the model (timed apart), then runs `lm_eval.simple_evaluate` on the task with its samples logged.

* eval s: the wall time of `simple_evaluate` (neox-jax's compilations included, and reported apart);
  requests/s: the task's loglikelihood requests over that time.
* The check: both engines' acc and acc_norm equal, and the largest difference between their log-likelihoods
  of the same request (target: <= 1e-4).
* The ratio: lm-eval `hf`'s eval time over neox-jax's (target: >= 2).
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


def random_model(out: Path, tokenizer: Path) -> Path:
    from neox_jax.checkpoints.synthetic import write_hf_checkpoint
    from neox_jax.config import PRESETS

    path = write_hf_checkpoint(out, PRESETS["pythia-70m"], seed=0)
    (path / "tokenizer.json").write_bytes(tokenizer.read_bytes())
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
        "pad_token": "<|padding|>"}))
    return path


def worker(args) -> int:
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    start = time.perf_counter()
    if args.worker == "neox-jax":
        from neox_jax.lm_eval_model import NeoXLM

        lm = NeoXLM(pretrained=args.model, dtype="float32", batch_size=args.batch_size)
    else:
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=args.model, dtype="float32", device="cpu", batch_size=args.batch_size)
    load_s = time.perf_counter() - start
    os.chdir(REPO)  # the task YAMLs name their data files relative to the repository root
    start = time.perf_counter()
    results = lm_eval.simple_evaluate(model=lm, tasks=[args.task], task_manager=TaskManager(include_path=str(DATA)),
                                      bootstrap_iters=0, log_samples=True)
    eval_s = time.perf_counter() - start
    samples = results["samples"][args.task]
    # Each request's response: [(log-likelihood, is_greedy)].
    loglik = {f"{s['doc_id']}/{i}": float(resp[0][0]) for s in samples for i, resp in enumerate(s["resps"])}
    metrics = {k: v for k, v in results["results"][args.task].items() if k in ("acc,none", "acc_norm,none")}
    out = dict(load_s=load_s, eval_s=eval_s, requests=len(loglik), loglik=loglik, metrics=metrics,
               compile_s=getattr(lm, "compile_seconds", 0.0))
    Path(args.worker_out).write_text(json.dumps(out))
    return 0


def run_bench(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            args.model = str(random_model(Path(tmp) / "model", args.tokenizer))
        argv = ["--model", args.model, "--task", args.task, "--batch-size", str(args.batch_size)]
        runs = {engine: run_worker("bench.eval", engine, argv) for engine in ENGINES}
    ours, ref = runs["neox-jax"], runs["hf"]
    shared = ours["loglik"].keys() & ref["loglik"].keys()
    return dict(task=args.task, batch_size=args.batch_size, runs={e: {k: v for k, v in r.items() if k != "loglik"}
                                                                  for e, r in runs.items()},
                max_loglik_diff=max(abs(ours["loglik"][k] - ref["loglik"][k]) for k in shared),
                same_requests=len(shared) == len(ours["loglik"]) == len(ref["loglik"]),
                metrics_equal=ours["metrics"] == ref["metrics"], ratio=ref["eval_s"] / ours["eval_s"])


def render(result: dict, markdown: bool) -> str:
    headers = ["engine", "load s", "eval s", "of which compile s", "requests", "requests/s", "acc", "acc_norm"]
    rows = [[name, sig(r["load_s"]), sig(r["eval_s"]), sig(r["compile_s"]) if name == "neox-jax" else "-",
             r["requests"], sig(r["requests"] / r["eval_s"]), sig(r["metrics"]["acc,none"]),
             sig(r["metrics"]["acc_norm,none"])] for name, r in result["runs"].items()]
    verdicts = [
        f"lm-eval `hf` eval time / neox-jax's: {result['ratio']:.2f}x (target >= {TARGET_RATIO:g}x: "
        f"{'met' if result['ratio'] >= TARGET_RATIO else 'not met'})",
        f"same requests: {result['same_requests']}; acc and acc_norm equal: {result['metrics_equal']}; largest "
        f"log-likelihood difference: {result['max_loglik_diff']:.2e} (target <= 1e-4)"]
    title = f"{result['task']}, batch size {result['batch_size']}, fp32, CPU"
    if markdown:
        return f"## {title}\n\n{markdown_table(headers, rows)}\n\n" + "".join(f"- {v}\n" for v in verdicts)
    return f"{title}\n{table(headers, rows)}\n" + "\n".join(verdicts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.eval", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="Hugging Face GPT-NeoX directory with its tokenizer.json (default: random "
                        "Pythia-70M-shaped weights)")
    parser.add_argument("--tokenizer", type=Path, default=None, help="tokenizer JSON for the random model (default: "
                        "as --demo finds it: $NEOX_TOKENIZER, ../shared/data/20B_tokenizer.json, the hub cache)")
    parser.add_argument("--task", default="hellaswag_local_tiny", help="a task of tests/data (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16, help="rows per forward pass, both engines")
    parser.add_argument("--json", metavar="OUT", help="also write the figures as JSON")
    parser.add_argument("--markdown", metavar="FILE", help="also write a Markdown page with the date, machine and "
                        "command (docs/figures/eval.md)")
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.model is not None and not (Path(args.model) / "config.json").is_file():
        parser.error(f"--model {args.model}: no config.json there (a Hugging Face GPT-NeoX directory is needed)")
    if args.model is None:
        from neox_jax.demo import trained_tokenizer

        args.tokenizer = args.tokenizer or trained_tokenizer()
        if args.tokenizer is None or not args.tokenizer.is_file():
            parser.error(f"tokenizer {args.tokenizer} not found: pass --tokenizer FILE or --model DIR")
    if not (DATA / f"{args.task}.yaml").is_file():
        parser.error(f"--task {args.task}: no {DATA / (args.task + '.yaml')}")
    if args.markdown and not Path(args.markdown).resolve().parent.is_dir():
        parser.error(f"--markdown {args.markdown}: its folder does not exist")
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
