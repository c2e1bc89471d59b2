"""`python -m neox_jax.serve`: an OpenAI-compatible completions server with continuous batching, and a page at /."""

from __future__ import annotations

from ..cli import INTERRUPTED, ArgumentParser, add_model_arguments, exit_on_interrupt

if __name__ == "__main__":
    exit_on_interrupt()  # until the server runs: Ctrl-C while loading or compiling exits at once (status 130)

import argparse
import asyncio
import errno
import logging
import math
import os
import signal
import socket
import sys
import time

from ..checkpoints import CheckpointError
from ..config import PRESETS, ConfigError
from ..decode import GenerationError
from ..dtypes import default_dtype, lookup
from ..quantize import NAMES as QUANTIZE_NAMES
from ..sharding import ShardingError
from ..speculative import DEFAULT_DRAFT_TOKENS, MAX_DRAFT_TOKENS
from .engine import DECODE_CHUNK

EPILOG = """examples:
  python -m neox_jax.serve --demo                       # the trained demo model: try the page at http://127.0.0.1:8000/
  python -m neox_jax.serve --model ./gpt-neox-20b --dtype float16 --max-batch 16
  python -m neox_jax.serve --model EleutherAI/pythia-410m --port 8080 --context 1024
  python -m neox_jax.serve --model ./gpt-neox-20b --dtype float16 --draft EleutherAI/pythia-160m --num-draft-tokens 4

  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"prompt": "GPT-NeoX-20B is", "max_tokens": 32, "temperature": 0}'

One process owns the model and its devices. Requests share a fixed set of --max-batch decode slots: a new
one is prefilled and joins the running batch between decode steps, and a finished or abandoned one frees its
slot at once. All programs are compiled before the server listens. Up to --max-queue requests wait for a
slot; beyond that the server answers 429 with Retry-After. Ctrl-C (or SIGTERM) answers new requests and
/health with 503, lets the requests in flight finish, stops listening, and exits with status 0; a second
Ctrl-C quits at once (status 130).
See docs/serve.md."""


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m neox_jax.serve", description=__doc__, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0: any free port, printed)")
    p.add_argument("--max-batch", type=int, default=8, help="decode slots: requests decoded together (default 8)")
    p.add_argument("--context", type=int, help="most tokens of one request, prompt plus completion (default: the "
                                               "model's context); the KV cache holds max-batch x this")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting for a slot before new ones get 429 (default 64)")
    p.add_argument("--prefix-cache-gib", type=float, default=1.0, metavar="GIB",
                   help="device memory kept for prompt prefixes already computed (default 1 GiB; 0: none): a prompt "
                        "that starts with the same 256-token blocks as an earlier one copies their keys and values "
                        "instead of prefilling them, with identical results")
    p.add_argument("--exact-batching", action="store_true",
                   help="compute every slot at every step, so that a request's tokens and log-probabilities are bit "
                        "for bit those it gives alone, whatever else runs (default: only the slots in use, 1, 2, "
                        "4, ... up to --max-batch, which can change the last bits of the logits with the batch)")
    p.add_argument("--decode-chunk", type=int, default=DECODE_CHUNK, metavar="N",
                   help=f"decode steps the device runs per turn while no request waits for a slot (default "
                        f"{DECODE_CHUNK}): the host's work per step is paid once per N tokens, and a stream's tokens "
                        f"come N at a time; 1: a turn per token (with --draft: a turn is one pass)")
    p.add_argument("--draft", metavar="PATH|ngram",
                   help="speculative decoding (docs/speculative.md) for every request: a smaller model of the same "
                        "tokenizer (any --model source) proposes tokens that the model checks several at a time, or "
                        "'ngram' to propose from each prompt itself; the output is the same (greedy) or identically "
                        "distributed (sampled); /metrics reports the acceptance rate")
    p.add_argument("--num-draft-tokens", type=int, metavar="K",
                   help=f"with --draft: tokens proposed per pass of the model, 1 to {MAX_DRAFT_TOKENS} "
                        f"(default {DEFAULT_DRAFT_TOKENS})")
    p.add_argument("--draft-quantize", choices=QUANTIZE_NAMES,
                   help="with --draft: the draft's quantization (default: --quantize's); "
                        "--draft SAME_AS_MODEL --draft-quantize int8 drafts with the model's own int8 weights")
    p.add_argument("--model-name", help="the model's id in /v1/models and responses (default: the --model path's "
                                        "last part, or neox-jax-demo)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="server log level (default info: startup, compilation, one line per request)")
    args = p.parse_args(argv)
    for flag, value, low in (("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 1),
                             ("--decode-chunk", args.decode_chunk, 1),
                             ("--context", args.context, 1), ("--port", args.port, 0),
                             ("--prefix-cache-gib", args.prefix_cache_gib, 0)):
        if value is not None and value < low:
            p.error(f"{flag} must be >= {low}, got {value}")
    if args.port > 65535:
        p.error(f"--port must be at most 65535, got {args.port}")
    if not math.isfinite(args.prefix_cache_gib):
        p.error(f"--prefix-cache-gib must be a finite number of GiB, got {args.prefix_cache_gib}")
    for flag, value in (("--num-draft-tokens", args.num_draft_tokens), ("--draft-quantize", args.draft_quantize)):
        if value is not None and args.draft is None:
            p.error(f"{flag} needs --draft")
    if args.num_draft_tokens is None:
        args.num_draft_tokens = DEFAULT_DRAFT_TOKENS
    if not 1 <= args.num_draft_tokens <= MAX_DRAFT_TOKENS:
        p.error(f"--num-draft-tokens must be in [1, {MAX_DRAFT_TOKENS}], got {args.num_draft_tokens}")
    return args


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads: a taken port fails at once, not after minutes."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        raise GenerationError(f"--host {host!r}: cannot resolve it ({e})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        reason = "already in use (another server?)" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
        raise GenerationError(f"{host}:{port}: cannot listen there: {reason}") from None
    return sock


def load_model(args):
    """-> model (with its tokenizer), its name, the stop token (None: never)."""
    from ..sharding import make_mesh, parse_mesh

    mesh = make_mesh(**parse_mesh(args.mesh)) if args.mesh else None
    if args.demo:
        if args.tp_exact:
            raise GenerationError("--tp-exact needs GPT-NeoX DeepSpeed shards (--model DIR); --demo's model is "
                                  "one merged model built in memory")
        from ..demo import demo_model

        model = demo_model(args.dtype or "float32", args.rotary_dtype, mesh, args.quantize)
        return model, args.model_name or "neox-jax-demo", None
    from ..api import exact_ranks, load_checkpoint
    from ..checkpoints import open_checkpoint
    from ..decode import PREFILL_CHUNK
    from ..generate import with_draft
    from ..sharding import check_model_axis_divides, default_mesh, plan_memory, require_fit
    from ..tokenizer import check_vocabulary, load_tokenizer, require_tokenizer

    checkpoint = open_checkpoint(args.model, PRESETS[args.preset] if args.preset else args.config, args.revision)
    tokenizer = load_tokenizer(require_tokenizer(args.tokenizer, checkpoint))
    check_vocabulary(tokenizer, checkpoint.config.vocab_size)
    config, tp_ranks = checkpoint.config, exact_ranks(checkpoint, args.tp_exact)
    if args.context is not None and args.context > config.max_position_embeddings:  # before the weights load
        raise GenerationError(f"context {args.context} must be in [1, {config.max_position_embeddings}] (the "
                              f"model's context)")
    dtype = lookup(args.dtype or default_dtype()).jax
    mesh = mesh or default_mesh(config, dtype, args.quantize)
    check_model_axis_divides(config, mesh, tp_ranks)
    context = args.context or config.max_position_embeddings
    plan = plan_memory(config, dtype, mesh, args.max_batch, context, tp_ranks, args.quantize)
    plan = with_draft(plan, args, dtype, mesh, args.max_batch, context)
    prefix_cache = int(args.prefix_cache_gib * 2 ** 30) if context > PREFILL_CHUNK else 0  # the engine's rule
    require_fit(plan.with_prefix_cache(prefix_cache, mesh), config, mesh, args.max_batch, context)
    model = load_checkpoint(checkpoint, dtype=args.dtype, rotary_dtype=args.rotary_dtype, tokenizer=tokenizer,
                            mesh=mesh, tp_ranks=tp_ranks, quantize=args.quantize)
    name = args.model_name or str(args.model).rstrip("/").rsplit("/", 1)[-1]
    return model, name, tokenizer.eos_id


def require_serve_extra() -> None:
    """The server's own libraries (the `serve` extra), checked before anything is loaded."""
    for module in ("starlette", "uvicorn", "prometheus_client"):
        try:
            __import__(module)
        except ModuleNotFoundError:
            raise GenerationError(f"the server needs {module}, which is not installed: pip install "
                                  f"'neox-jax[serve]' (the serve extra: starlette, uvicorn, prometheus_client)") \
                from None


def serve(args) -> int:
    require_serve_extra()
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sock = bind(args.host, args.port)
    start = time.perf_counter()
    model, name, stop_token = load_model(args)
    from ..generate import load_draft  # as generate loads --draft: "ngram", or a model on the model's devices

    draft = load_draft(args, model)
    logging.getLogger("neox_jax.serve").info("loaded %s (%s%s)%s in %.1fs", name, model.dtype,
                                             f", {model.quantize}" if model.quantize else "",
                                             f" and the draft {args.draft}" if draft is not None else "",
                                             time.perf_counter() - start)
    return run(model, name, stop_token, sock, args.max_batch, args.context, args.max_queue, args.log_level,
               int(args.prefix_cache_gib * 2 ** 30), args.exact_batching, draft, args.num_draft_tokens,
               args.decode_chunk)


def run(model, name: str, stop_token: int | None, sock: socket.socket, max_batch: int, context: int | None,
        max_queue: int, log_level: str = "info", prefix_cache_bytes: int = 0, exact_batching: bool = False,
        draft=None, num_draft_tokens: int = DEFAULT_DRAFT_TOKENS, decode_chunk: int = DECODE_CHUNK) -> int:
    """Compile, then serve `model` on the bound `sock` until SIGINT or SIGTERM (with `draft`: speculative
    decoding, `neox_jax.speculative`'s draft argument); -> the exit status."""
    import uvicorn

    from .app import create_app
    from .connection import Connection
    from .engine import Engine

    log = logging.getLogger("neox_jax.serve")
    engine = Engine(model, max_batch, context, max_queue, prefix_cache_bytes=prefix_cache_bytes,
                    exact_batching=exact_batching, draft=draft, num_draft_tokens=num_draft_tokens,
                    decode_chunk=decode_chunk)
    app = create_app(engine, model.tokenizer, name, stop_token)
    engine.start()

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if self.should_exit and sig == signal.SIGINT:  # a second Ctrl-C: quit now, as every command does
                log.info("interrupted: abandoning the %d requests in flight", engine.occupied + engine.queue_depth)
                os._exit(INTERRUPTED)
            log.info("stopping: new requests get 503; finishing the %d requests in flight",
                     engine.occupied + engine.queue_depth)
            app.state.serve["draining"] = True
            engine.stop(timeout=0)  # takes no new requests; finishes those queued and running
            super().handle_exit(sig, frame)

        async def shutdown(self, sockets=None):
            # Still listening while the requests in flight finish: /health and new requests get 503, not a
            # refused connection, so a load balancer sees the drain. Then uvicorn's own shutdown.
            while engine.occupied + engine.queue_depth and not self.force_exit:
                await asyncio.sleep(0.05)
            await super().shutdown(sockets)

    # uvicorn handles SIGINT/SIGTERM while it runs, then re-raises them to the handlers it found: these, so a
    # graceful stop ends with status 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    sock.listen(2048)  # from now on connections wait in the backlog until uvicorn's loop accepts them
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    log.info("serving %s on http://%s:%d (the page at /, the API at /v1/completions)", name, shown, port)
    server = Server(uvicorn.Config(app, log_level=log_level, access_log=log_level == "debug", lifespan="off",
                                   http=Connection))
    server.run(sockets=[sock])
    engine.stop()
    log.info("stopped")
    return 0 if server.started else 1


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return serve(args)
    except (CheckpointError, ConfigError, GenerationError, ShardingError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
