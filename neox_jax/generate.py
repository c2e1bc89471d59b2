"""`python -m neox_jax.generate`: text generation from a GPT-NeoX checkpoint (greedy or sampled)."""

from __future__ import annotations

from .cli import INTERRUPTED, ArgumentParser, add_model_arguments, exit_on_interrupt

if __name__ == "__main__":
    exit_on_interrupt()  # before the heavy imports below, so that Ctrl-C there is not a traceback

import argparse
import json
import os
import signal
import socket
import sys
import time

from .checkpoints import CheckpointError
from .config import PRESETS, ConfigError
from .decode import Generation, GenerationError, NonFiniteLogitsError, check_stop_token, validate_request
from .dtypes import default_dtype, lookup
from .sampling import Sampling, SamplingError
from .sharding import ShardingError
from .quantize import NAMES as QUANTIZE_NAMES
from .speculative import DEFAULT_DRAFT_TOKENS, MAX_DRAFT_TOKENS, SpeculativeGeneration
from .streaming import STREAM_CHUNK, TextStream, stream_text

EPILOG = """examples:
  python -m neox_jax.generate --demo
  python -m neox_jax.generate --model ./gpt-neox-20b --prompt "GPT-NeoX-20B is" --max-new-tokens 32
  python -m neox_jax.generate --model EleutherAI/pythia-410m --prompt "The Pile is"
  python -m neox_jax.generate --model ./slim_weights --tokenizer 20B_tokenizer.json --prompt-file prompts.txt --json
  python -m neox_jax.generate --model ./gpt-neox-20b --interactive --temperature 0.8 --top-p 0.95 --stop $'\\n\\n'
  python -m neox_jax.generate --model ./gpt-neox-20b --draft EleutherAI/pythia-410m --prompt "Hi" --json

--model takes a Hugging Face GPT-NeoX directory (config.json + safetensors, as written by
`python -m neox_jax.convert`), GPT-NeoX DeepSpeed shards, merged while loading (converting once is faster),
or a Hugging Face hub id, downloaded to (or, with HF_HUB_OFFLINE=1, only read from) huggingface_hub's cache.
Greedy unless --temperature is above 0. One prompt streams its text as it is generated; a batch prints
each completion, in order, as soon as it is finished. Timings (load, compile, prefill, ms per generated
token) go to stderr."""


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m neox_jax.generate", description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    prompts = p.add_mutually_exclusive_group()
    prompts.add_argument("--prompt", action="append", help="prompt text; repeat for a batch")
    prompts.add_argument("--prompt-file", help="file with one prompt per line ('-' for stdin)")
    prompts.add_argument("--interactive", action="store_true",
                         help="read prompts one by one, keeping the model loaded; Ctrl-C stops a generation, "
                              "Ctrl-D exits")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate per prompt (default 32)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (default 0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1: all)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same text")
    p.add_argument("--stop", action="append", default=[],
                   help="stop string, repeatable; the completion ends before it")
    p.add_argument("--stop-token", type=int,
                   help="token id that ends a completion (default: the tokenizer's <|endoftext|>; -1: never stop)")
    p.add_argument("--distributed", action="store_true",
                   help="multi-host: run this same command once per host (process 0 prints); the coordinator, "
                        "process count and id come from the flags below or the cluster (SLURM, Open MPI, ...)")
    p.add_argument("--coordinator", help="with --distributed: HOST:PORT of process 0")
    p.add_argument("--num-processes", type=int, help="with --distributed: number of processes")
    p.add_argument("--process-id", type=int, help="with --distributed: this process's index")
    p.add_argument("--draft", metavar="PATH|ngram",
                   help="speculative decoding (docs/speculative.md): a smaller model of the same tokenizer (any "
                        "--model source, e.g. EleutherAI/pythia-160m for GPT-NeoX-20B) proposes tokens that the "
                        "model checks several at a time, or 'ngram' to propose from the prompt itself; the output "
                        "is the same (greedy) or identically distributed (sampled)")
    p.add_argument("--num-draft-tokens", type=int, default=DEFAULT_DRAFT_TOKENS, metavar="K",
                   help=f"with --draft: tokens proposed per pass of the model, 1 to {MAX_DRAFT_TOKENS} "
                        f"(default {DEFAULT_DRAFT_TOKENS})")
    p.add_argument("--draft-quantize", choices=QUANTIZE_NAMES,
                   help="with --draft: the draft's quantization (default: --quantize's); "
                        "--draft SAME_AS_MODEL --draft-quantize int8 drafts with the model's own int8 weights")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per prompt (with --draft: its acceptance rate and target passes "
                        "per token)")
    args = p.parse_args(argv)
    if not 1 <= args.num_draft_tokens <= MAX_DRAFT_TOKENS:
        p.error(f"--num-draft-tokens must be in [1, {MAX_DRAFT_TOKENS}], got {args.num_draft_tokens}")
    return args


def read_prompts(args) -> list[str]:
    if args.prompt:
        return args.prompt
    if args.prompt_file:
        name = "standard input" if args.prompt_file == "-" else args.prompt_file
        try:
            if args.prompt_file == "-":
                data = sys.stdin.buffer.read()
            else:
                with open(args.prompt_file, "rb") as f:
                    data = f.read()
            lines = data.decode("utf-8").splitlines()
        except OSError as e:
            raise FileNotFoundError(f"--prompt-file {name}: {e.strerror or e}") from None
        except UnicodeDecodeError as e:
            raise GenerationError(f"--prompt-file {name}: not UTF-8 text (byte {e.start}: "
                                  f"{data[e.start:e.start + 4]!r}...)") from None
        prompts = [line for line in lines if line.strip()]
        if not prompts:
            raise GenerationError(f"--prompt-file {args.prompt_file}: no prompts (one per line)")
        return prompts
    if args.demo:
        from .demo import PROMPTS

        return PROMPTS
    raise GenerationError("give --prompt TEXT, --prompt-file FILE or --interactive")


def load_model(args, prompts: list[str]):
    """-> model (with its tokenizer), prompt ids; the request is checked against the config before any
    weights load."""
    from .api import exact_ranks, load_checkpoint
    from .checkpoints import open_checkpoint
    from .tokenizer import check_vocabulary, load_tokenizer, require_tokenizer

    if args.demo:
        if args.tp_exact:
            raise GenerationError("--tp-exact needs GPT-NeoX DeepSpeed shards (--model DIR); --demo's model is "
                                  "one merged model built in memory")
        from .demo import demo_model

        print("demo: pydocs-target, a 6-layer GPT-NeoX trained on the Python documentation (docs/training.md)",
              file=sys.stderr)
        from .sharding import make_mesh, parse_mesh

        mesh = make_mesh(**parse_mesh(args.mesh)) if args.mesh else None
        model = demo_model(args.dtype or "float32", args.rotary_dtype, mesh, args.quantize)
        check_stop_token(model.config, stop_token(args, model.tokenizer))  # before any prompt is printed
        return model, encode(model.tokenizer, prompts, model.config, args.max_new_tokens)
    checkpoint = open_checkpoint(args.model, PRESETS[args.preset] if args.preset else args.config, args.revision)
    tokenizer = load_tokenizer(require_tokenizer(args.tokenizer, checkpoint))
    check_vocabulary(tokenizer, checkpoint.config.vocab_size)
    prompt_ids = encode(tokenizer, prompts, checkpoint.config, args.max_new_tokens)
    check_stop_token(checkpoint.config, stop_token(args, tokenizer))
    tp_ranks = exact_ranks(checkpoint, args.tp_exact)
    mesh = plan_devices(args, checkpoint.config, prompt_ids, tp_ranks)
    model = load_checkpoint(checkpoint, dtype=args.dtype, rotary_dtype=args.rotary_dtype, tokenizer=tokenizer,
                            mesh=mesh, tp_ranks=tp_ranks, quantize=args.quantize)
    return model, prompt_ids


def load_draft(args, model):
    """--draft: "ngram", or a model loaded like --model (same dtype, on the model's devices); None without it."""
    if args.draft is None or args.draft == "ngram":
        return args.draft
    from .api import load_checkpoint
    from .checkpoints import open_checkpoint

    checkpoint = open_checkpoint(args.draft, None, None)
    if checkpoint.config.max_position_embeddings < model.config.max_position_embeddings:
        print(f"note: the draft's context ({checkpoint.config.max_position_embeddings}) is shorter than the "
              f"model's ({model.config.max_position_embeddings})", file=sys.stderr)
    return load_checkpoint(checkpoint, dtype=model.dtype, mesh=model.mesh,
                           quantize=args.draft_quantize or args.quantize)


def plan_devices(args, config, prompt_ids: list[list[int]], tp_ranks: int | None = None):
    """The mesh to load onto, after checking that weights and KV cache fit (before any weights load);
    `tp_ranks`: the ranks the exact tensor-parallel mode keeps (None: merged)."""
    from .sharding import check_model_axis_divides, default_mesh, make_mesh, parse_mesh, plan_memory, require_fit

    dtype = lookup(args.dtype or default_dtype()).jax
    mesh = make_mesh(**parse_mesh(args.mesh)) if args.mesh else default_mesh(config, dtype, args.quantize)
    check_model_axis_divides(config, mesh, tp_ranks)
    batch = max(len(prompt_ids), 1)
    context = min(max((len(p) for p in prompt_ids), default=0) + args.max_new_tokens, config.max_position_embeddings)
    plan = plan_memory(config, dtype, mesh, batch, context, tp_ranks, args.quantize)
    require_fit(with_draft(plan, args, dtype, mesh, batch, context), config, mesh, batch, context)
    return mesh


def with_draft(plan, args, dtype, mesh, batch: int, context: int):
    """`plan` plus --draft's weights and KV cache (a model draft keeps its own cache of the same rows), so that
    the check before loading counts both models; the draft checkpoint's config is read, not its weights."""
    if args.draft is None or args.draft == "ngram":
        return plan
    from .checkpoints import open_checkpoint
    from .sharding import plan_memory

    draft = open_checkpoint(args.draft, None, None).config
    return plan.plus(plan_memory(draft, dtype, mesh, batch, context, None, args.draft_quantize or args.quantize))


def encode(tokenizer, prompts: list[str], config, max_new_tokens: int) -> list[list[int]]:
    """Token ids of the prompts, checked against the model's vocabulary and context (none: interactive)."""
    if not prompts:
        return []
    prompt_ids = [tokenizer.encode(p) for p in prompts]
    for text, ids in zip(prompts, prompt_ids):
        if not ids:
            raise GenerationError(f"prompt {text!r} encodes to no tokens")
    validate_request(config, prompt_ids, max_new_tokens)
    return prompt_ids


def complete(model, args, sampling, stop_token, prompts: list[str], prompt_ids: list[list[int]]) -> Generation:
    """Generate for one batch, printing as the mode asks; returns the timings."""
    streams = [TextStream(model.tokenizer, args.stop) for _ in prompts]
    timing = SpeculativeGeneration() if args.draft_model else Generation()
    single = len(prompts) == 1 and not args.json
    printed = 0
    if single:
        print(prompts[0], end="", flush=True)
    decoder = model.decoder_for(args.draft_model, args.num_draft_tokens)
    for deltas in stream_text(decoder, streams, prompt_ids, args.max_new_tokens, sampling=sampling,
                              stop_token=stop_token, chunk=STREAM_CHUNK, timing=timing):
        if single:
            print(deltas[0], end="", flush=True)
            continue
        while printed < len(streams) and streams[printed].finished:  # in order, each once finished
            show(args, prompts[printed], prompt_ids[printed], streams[printed], len(prompts),
                 timing.row_summary(printed, args.num_draft_tokens) if args.draft_model else None)
            printed += 1
    if single:
        print(flush=True)
    return timing


def show(args, prompt: str, ids: list[int], stream: TextStream, batch: int, draft: dict | None = None) -> None:
    """`draft`: the prompt's speculative decoding figures (acceptance rate, target passes per token)."""
    if args.json:
        record = {"prompt": prompt, "completion": stream.text, "prompt_tokens": len(ids),
                  "completion_tokens": len(stream.tokens), "prompt_token_ids": ids,
                  "completion_token_ids": stream.tokens}
        if draft is not None:
            record["draft"] = draft
        print(json.dumps(record), flush=True)  # ASCII: safe for line-based readers
    else:
        print(prompt + stream.text, flush=True)
        if batch > 1:
            print("-" * 40, flush=True)


def report(model, timing: Generation, prompt_ids, load_seconds: float | None = None) -> None:
    # Per generated token of one row: with a draft a step (a target pass) yields one or more tokens per row.
    steps = timing.new_tokens / len(prompt_ids) if isinstance(timing, SpeculativeGeneration) else timing.decode_steps
    per_token = 1e3 * timing.decode_seconds / max(steps, 1)
    load = f"load {load_seconds:.2f}s | " if load_seconds is not None else ""
    quantized = f", {model.quantize}" if model.quantize else ""
    print(f"[{model.dtype}{quantized}] {load}compile {timing.compile_seconds:.2f}s | "
          f"prefill {sum(len(ids) for ids in prompt_ids)} tokens {1e3 * timing.prefill_seconds:.1f}ms | "
          f"decode {timing.decode_steps} steps x batch {len(prompt_ids)}: {per_token:.2f} ms/token{drafted(timing)}",
          file=sys.stderr)


def drafted(timing: Generation) -> str:
    """The report's speculative decoding figures ('' without a draft)."""
    if not isinstance(timing, SpeculativeGeneration):
        return ""
    return (f" | draft: {timing.acceptance_rate:.1%} of {timing.proposed} accepted, "
            f"{timing.passes_per_token:.3f} passes/token")


def interact(model, args, sampling, stop_token) -> None:
    print("interactive: enter a prompt; Ctrl-C stops a generation, Ctrl-D exits", file=sys.stderr)
    while True:
        try:
            prompt = input("> " if sys.stdin.isatty() else "")
        except EOFError:
            return
        except KeyboardInterrupt:
            print(file=sys.stderr)
            continue
        if not prompt.strip():
            continue
        try:
            ids = encode(model.tokenizer, [prompt], model.config, args.max_new_tokens)
            report(model, complete(model, args, sampling, stop_token, [prompt], ids), ids)
        except (GenerationError, ValueError) as e:  # e.g. a line that is not UTF-8: the session goes on
            print(f"error: {e}", file=sys.stderr)
        except KeyboardInterrupt:
            print("\n[interrupted]", file=sys.stderr)


def run(args) -> None:
    sampling = Sampling.create(args.temperature, args.top_k, args.top_p, args.seed)
    prompts = [] if args.interactive else read_prompts(args)
    start = time.perf_counter()
    model, prompt_ids = load_model(args, prompts)
    args.draft_model = load_draft(args, model)
    load_seconds = time.perf_counter() - start
    stop = stop_token(args, model.tokenizer)
    if args.interactive:
        print(f"loaded in {load_seconds:.2f}s", file=sys.stderr)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C stops one generation, not the session
        interact(model, args, sampling, stop)
    else:
        report(model, complete(model, args, sampling, stop, prompts, prompt_ids), prompt_ids, load_seconds)


def stop_token(args, tokenizer) -> int | None:
    """--stop-token as the decoder takes it (None: never). -1 is the command line's spelling of never; the
    default is the tokenizer's <|endoftext|>."""
    if args.stop_token is None:
        return tokenizer.eos_id
    return None if args.stop_token == -1 else args.stop_token


def check_distributed_args(args) -> None:
    """The coordinator, process count and index, checked before JAX's runtime waits on them."""
    if args.num_processes is not None and args.num_processes < 1:
        raise GenerationError(f"--num-processes must be >= 1, got {args.num_processes}")
    if args.process_id is not None and not 0 <= args.process_id < (args.num_processes or 2**31):
        raise GenerationError(f"--process-id must be in [0, --num-processes), got {args.process_id}")
    if args.coordinator is not None:
        host, _, port = args.coordinator.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise GenerationError(f"--coordinator {args.coordinator!r}: expected HOST:PORT")
        try:
            socket.getaddrinfo(host.strip("[]"), int(port))
        except (socket.gaierror, UnicodeError) as e:
            raise GenerationError(f"--coordinator {args.coordinator!r}: cannot resolve {host!r} ({e})") from None


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.distributed:
            check_distributed_args(args)
            import jax

            from .sharding import initialize_distributed

            initialize_distributed(args.coordinator, args.num_processes, args.process_id)
            # Every process computes; process 0 alone prints. The collectives library writes status lines
            # to file descriptor 1, so that goes to stderr and only our results reach stdout.
            results = os.fdopen(os.dup(1), "w", buffering=1) if jax.process_index() == 0 else open(os.devnull, "w")
            os.dup2(2, 1)
            sys.stdout = results
        run(args)
    except (CheckpointError, ConfigError, GenerationError, SamplingError, ShardingError, FileNotFoundError,
            ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLogitsError as e:  # the model failed, not the request
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return INTERRUPTED
    return 0


if __name__ == "__main__":
    status = main()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # done: Ctrl-C now would only interrupt the interpreter's exit
    sys.exit(status)
