"""`python -m neox_jax.eval`: lm-evaluation-harness's own CLI with the `neox-jax` model registered.

Every argument is lm-eval's (`lm-eval run --help`); the changes are that `--model` defaults to `neox-jax`,
that `--tp-exact` is short for the model_arg `tp_exact=true` and `--quantize int8` (or fp8) for
`quantize=int8`. lm-eval 0.4 has no plugin discovery for models (its registry is filled from a fixed table
and by importing modules), so its `lm_eval` console script cannot see `neox-jax`: use this module, or
`import neox_jax.lm_eval_model` before calling `lm_eval.simple_evaluate(model="neox-jax", ...)`.

    python -m neox_jax.eval --model_args pretrained=DIR,tokenizer=FILE,dtype=float16 \\
        --tasks lambada_openai,piqa --batch_size 16 --output_path results/

Compiled programs are kept on disk (JAX's persistent compilation cache, in $JAX_COMPILATION_CACHE_DIR, else
~/.cache/neox_jax/xla; at most 2 GiB), so a second run of the same model and tasks does not compile again.

Offline, with a task defined by local files:

    HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 python -m neox_jax.eval --model_args pretrained=DIR \\
        --include_path tests/data --tasks lambada_local_tiny
"""

from __future__ import annotations

from .cli import exit_on_interrupt

if __name__ == "__main__":
    exit_on_interrupt()  # lm-eval writes its results at the end: an interrupted run has nothing to clean up

import multiprocessing
import os
import signal
import sys
from pathlib import Path

SUBCOMMANDS = ("run", "ls", "validate")
COMPILATION_CACHE_BYTES = 2 * 2 ** 30  # least recently used programs are dropped beyond this

MODEL_ARGS_HELP = """neox-jax: lm-eval's CLI with --model neox-jax by default. neox-jax model_args:
  pretrained=DIR         Hugging Face GPT-NeoX directory or GPT-NeoX DeepSpeed checkpoint (required)
                         or a hub id (EleutherAI/pythia-410m; revision=REV)
  tokenizer=FILE         tokenizer JSON (default DIR/tokenizer.json, else DIR's one *tokenizer*.json)
  dtype=float16|bfloat16|float32   (default float16 on GPU/TPU, float32 on CPU)
  max_length=N           scoring context (default max_position_embeddings)
  max_gen_toks=N         generation budget of generate_until tasks (default 256)
  prefix_token_id=ID     token conditioning empty contexts (default <|endoftext|>)
  model_parallel=N,data_parallel=M   device mesh (default: one device, or all on the model axis if needed)
  tp_exact=true          DeepSpeed shards only: compute as the tensor-parallel ranks did in training, each
                         rank's LayerNorm copies and row-parallel biases kept (also: --tp-exact)
  quantize=int8|fp8|int8-dynamic   quantized matmul weights, int8-dynamic's activations too (also: --quantize int8)
Compiled programs are kept for later runs in $JAX_COMPILATION_CACHE_DIR, else ~/.cache/neox_jax/xla (<= 2 GiB).
"""


def _has_option(argv: list[str], *names: str) -> bool:
    return any(a in names or any(a.startswith(n + "=") for n in names) for a in argv)


def take_quantize(argv: list[str]) -> tuple[list[str], str | None]:
    """argv without `--quantize MODE` / `--quantize=MODE`, and MODE (None if not given). Raises ValueError."""
    from .quantize import lookup

    rest, mode = [], None
    args = iter(argv)
    for a in args:
        if a == "--quantize" or a.startswith("--quantize="):
            mode = a.partition("=")[2] if "=" in a else next(args, None)
            if mode is None:
                raise ValueError("--quantize needs a mode: int8, fp8 or int8-dynamic")
            lookup(mode)
        else:
            rest.append(a)
    return rest, mode


def build_argv(argv: list[str]) -> list[str]:
    """lm-eval argv (without the program name) for our argv: `run` when no subcommand is named,
    `--model neox-jax` unless --model or a --config file (which must name the model) is given, and
    `--tp-exact` as `tp_exact=True` and `--quantize MODE` as `quantize=MODE` added to --model_args."""
    if "--tp-exact" in argv:
        argv = [a for a in argv if a != "--tp-exact"]
        argv = _add_model_arg(argv, "tp_exact=True")
    argv, quantize = take_quantize(argv)
    if quantize:
        argv = _add_model_arg(argv, f"quantize={quantize}")
    if not argv or argv[0] not in SUBCOMMANDS:
        argv = ["run", *argv]
    if argv[0] == "run" and not _has_option(argv, "--model", "-M", "--config", "-C"):
        argv = ["run", "--model", "neox-jax", *argv[1:]]
    return argv


def _add_model_arg(argv: list[str], arg: str) -> list[str]:
    for i, a in enumerate(argv):
        if a in ("--model_args", "--model-args", "-a") and i + 1 < len(argv):
            return [*argv[:i + 1], f"{argv[i + 1]},{arg}", *argv[i + 2:]]
        if a.startswith(("--model_args=", "--model-args=")):
            return [*argv[:i], f"{a},{arg}", *argv[i + 1:]]
    return [*argv, "--model_args", arg]


def compilation_cache_dir() -> Path:
    """Where `use_compilation_cache` keeps compiled programs: $JAX_COMPILATION_CACHE_DIR, else
    $XDG_CACHE_HOME/neox_jax/xla (default ~/.cache/neox_jax/xla)."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "neox_jax" / "xla"


def use_compilation_cache() -> Path:
    """JAX's persistent compilation cache on: a later run of the same model shapes and tasks reads its scoring
    programs back from disk instead of compiling them (docs/figures/eval.md: cold and warm runs). Every
    program is kept however quickly it compiled (the default keeps only those over 1 s), within
    COMPILATION_CACHE_BYTES."""
    import jax

    path = compilation_cache_dir()
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_compilation_cache_max_size", COMPILATION_CACHE_BYTES)
    return path


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or _has_option(argv, "--help", "-h"):
        print(MODEL_ARGS_HELP)
    if not argv:
        argv = ["run", "--help"]

    # lm-eval bootstraps some stderrs (LAMBADA's perplexity) in a multiprocessing Pool. Forking a process
    # that runs JAX (multithreaded, and on GPU the CUDA runtime) can deadlock the children; forkserver
    # forks them from a clean single-threaded server instead.
    try:
        multiprocessing.set_start_method("forkserver")
    except (RuntimeError, ValueError):  # already set, or not available on this platform
        pass

    use_compilation_cache()
    from . import lm_eval_model  # noqa: F401  (registers "neox-jax")
    from lm_eval.__main__ import cli_evaluate

    from .checkpoints import CheckpointError

    try:
        sys.argv = ["lm-eval", *build_argv(argv)]
        cli_evaluate()
    # A missing or broken model, a bad model_arg, an unknown task (lm-eval raises ValueError for it), NaN scores.
    except (CheckpointError, ValueError, OSError, FloatingPointError) as e:
        print(f"error: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # done: Ctrl-C now would only interrupt the interpreter's exit
