"""Copy a finished training run into neox_jax/models/NAME: what the package ships (docs/training.md).

    python tools/ship_model.py pydocs-target runs/target runs/target2

RUNS are `neox_jax.train` output directories in the order they trained (a run continued with `--init` from
the one before it); the last one's `final/` (fp16) is shipped. Written: config.json and the safetensors
files (not `tokenizer.json`: the 20B tokenizer is not shipped, see neox_jax/demo.py), `training_log.jsonl`
(the runs' logs joined, each run's steps, tokens and seconds counted on from the one before: a run
continued from a checkpoint of step N logs its steps from 1) and README.md (what it is, how it was
trained, on what, under which licence).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

MODELS = Path(__file__).resolve().parents[1] / "neox_jax" / "models"


def joined_log(runs: list[Path]) -> tuple[list[dict], list[dict]]:
    """(records, one summary per run); a continued run starts from the checkpoint its --init names."""
    records, summaries = [], []
    step = tokens = seconds = 0
    for run in runs:
        settings = json.loads((run / "settings.json").read_text())
        if settings["init"]:  # continued from a checkpoint of the run before: count on from its step
            state = json.loads((Path(settings["init"]) / "trainer_state.json").read_text())
            records = [r for r in records if r["step"] <= state["step"]]
            step, tokens, seconds = state["step"], state["tokens"], state["seconds"]
        base = (step, tokens, seconds)
        last = base
        for line in (run / "log.jsonl").read_text().splitlines():
            r = json.loads(line)
            r["step"] += base[0]
            if "tokens" in r:
                r["tokens"] += base[1]
                r["seconds"] = round(r["seconds"] + base[2], 3)
                last = (r["step"], r["tokens"], r["seconds"])
            records.append(r)
        summaries.append({"run": run.name, "settings": settings, "steps": last[0] - base[0],
                          "tokens": last[1] - base[1], "seconds": last[2] - base[2]})
        step, tokens, seconds = last
    return records, summaries


def readme(name: str, config: dict, records: list[dict], summaries: list[dict]) -> str:
    evals = [r for r in records if "eval_loss" in r]
    steps = [r for r in records if "loss" in r]
    runs = "\n".join(
        f"- `{s['run']}`: {s['steps']} steps of {s['settings']['batch']} x {s['settings']['context']} tokens, "
        f"peak learning rate {s['settings']['lr']}, warm-up {s['settings']['warmup']}, cosine to "
        f"{s['settings']['min_lr_ratio']} of the peak over {s['settings']['steps']} steps"
        + (" (stopped early, continued by the next run)" if s["steps"] < s["settings"]["steps"] else "")
        + f"; {s['tokens']:,} tokens, {s['seconds'] / 60:.1f} min of training steps" for s in summaries)
    return f"""# {name}

A GPT-NeoX model ({config['num_hidden_layers']} layers, hidden {config['hidden_size']}, {config['num_attention_heads']} heads, \
{config['max_position_embeddings']} positions, vocabulary {config['vocab_size']} with tied embeddings; fp16) trained \
from scratch by `python -m neox_jax.train` on the CPU of a shared 2-core machine. See docs/training.md.

Trained on the Python 3.11 documentation (Debian's python3.11-doc, prose only; `python -m neox_jax.corpus`),
Copyright (c) 2001-2023 Python Software Foundation, used under the PSF License Version 2. The tokenizer is
EleutherAI's GPT-NeoX-20B tokenizer (Apache-2.0).

Runs, in order (the log of all of them: training_log.jsonl):
{runs}

Total: {steps[-1]['step']} steps, {steps[-1]['tokens']:,} tokens, {steps[-1]['seconds'] / 60:.1f} min of training \
steps (the machine was shared and loaded). Final held-out loss on the training tool's evaluation windows: \
{evals[-1]['eval_loss']:.3f} nats (perplexity {2.718281828 ** evals[-1]['eval_loss']:.1f}); the whole held-out \
split's figures: docs/figures/trained.md.
"""


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    name, runs = argv[0], [Path(r) for r in argv[1:]]
    final = runs[-1] / "final"
    out = MODELS / name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for f in final.iterdir():
        if f.name != "tokenizer.json":  # the 20B tokenizer is not shipped: neox_jax.demo.trained_tokenizer finds it
            shutil.copyfile(f, out / f.name)
    records, summaries = joined_log(runs)
    (out / "training_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    config = json.loads((out / "config.json").read_text())
    (out / "README.md").write_text(readme(name, config, records, summaries))
    print(f"{out}: {sum(f.stat().st_size for f in out.glob('*.safetensors')) / 1e6:.1f} MB of weights")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
