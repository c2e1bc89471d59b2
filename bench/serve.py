"""Serving benchmark: `python -m neox_jax.serve`'s throughput and latency under concurrent clients, against the
same requests sent one at a time through `generate`.

    python -m bench.serve [--shape pythia-70m] [--concurrency 1,4,8,16] [--requests 32] [--prompt-len 64]
                          [--new-tokens 64] [--max-batch 8] [--decode-chunk 4] [--json OUT]
                          [--markdown docs/figures/serve.md]

The server runs in a child process (the same code as `python -m neox_jax.serve`: engine, Starlette, uvicorn) on
random weights of the shape (`random_tensors(config, seed)`), fp32, with --max-batch slots and a context of
prompt + new tokens. Each request is `--prompt-len` random token ids and asks, greedy and streaming, for
exactly `--new-tokens` tokens (no stop token). At concurrency c, c client threads each send the next request
as soon as their last one ended, until all `--requests` are done; every level is warmed up first by one
request per slot.

* tok/s: all generated tokens over the wall time of the level.
* TTFT: from sending a request to its first token's event; per token: a request's time from its first token to
  its last over the tokens between (its decode speed), the median over the requests; gaps: the times between a
  request's token events, p50 and p99 over every gap of every request (the server decodes several steps per
  turn while no request waits, so its tokens come in bursts: the p99 gap is a burst's wait).
* The peer: a child process that runs the same requests one after another through `Decoder.stream` (what
  `python -m neox_jax.generate` runs), after a warm-up that compiles its programs: TTFT is the time to its first
  token, per token its decode time per step, tok/s all tokens over the total time.
* step ms: the server's mean decode step over the level (its /metrics): a step computes the smallest slot
  bucket (1, 2, 4, ..., --max-batch) holding the requests in flight.
* Prefix cache (--cached-prefix N, default 1024; 0 skips it): a second server, with a context for N + 64 prompt
  tokens and its prefix cache on, gets pairs of requests that share their first N tokens (random, new for each
  pair) and differ in their last 64: the first of a pair is prefilled cold (and fills the cache), the second
  copies the N tokens' blocks (`neox_jax/serve/prefix_cache.py`). TTFT of each, median over the pairs; target:
  cached <= 0.3x cold.
* A lone request's decode speed: the peer's time per token / the server's at concurrency 1 (target: >= 0.85).
* Ratios: throughput / the peer's (target: >= 3 at concurrency 8); TTFT / the peer's (target: <= 1.2 at
  concurrency 1); and the limit the machine sets: slots x the peer's time per token / the server's step time,
  the throughput ratio decoding alone would reach.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from neox_jax.serve.engine import DECODE_CHUNK

from .common import (SHAPES, load_average, machine, markdown_page, markdown_table, parse_list, run_worker, sig, table,
                     utc_now, write_page)

TARGETS = {"throughput_at_8": 3.0, "ttft_at_1": 1.2, "cached_prefix_ttft": 0.3, "lone_decode": 0.85}
PREFIX_TAIL = 64  # prompt tokens after the shared prefix in the prefix-cache measurement
PREFIX_PAIRS = 3


def prompts(args, vocab: int) -> list[list[int]]:
    return np.random.default_rng(args.seed).integers(0, vocab, (args.requests, args.prompt_len)).tolist()


def random_model(shape: str, seed: int):
    import jax.numpy as jnp

    from neox_jax.api import NeoXModel
    from neox_jax.checkpoints.synthetic import random_tensors
    from neox_jax.tokenizer import demo_tokenizer
    from neox_jax.weights import build_params

    config = SHAPES[shape]
    params = build_params(config, random_tensors(config, seed=seed).items(), jnp.float32, progress=False)
    return NeoXModel(config, params, "float32", tokenizer=demo_tokenizer())  # text is unused: ids in, ids counted


# ---- workers (child processes) ----

def server_worker(args) -> int:
    import logging

    from neox_jax.serve.__main__ import bind, run

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sock = bind("127.0.0.1", 0)
    model = random_model(args.shape, args.seed)
    return run(model, args.shape, None, sock, args.max_batch, args.prompt_len + args.new_tokens, 4 * args.requests,
               "warning", int(args.prefix_cache_gib * 2 ** 30), decode_chunk=args.decode_chunk)


def generate_worker(args) -> int:
    model = random_model(args.shape, args.seed)
    decoder = model.decoder
    batch = prompts(args, model.config.vocab_size)
    list(decoder.stream(batch[:1], args.new_tokens, stop_token=None))  # compile
    results = []
    start = time.perf_counter()
    for prompt in batch:
        sent = time.perf_counter()
        chunks = decoder.stream([prompt], args.new_tokens, stop_token=None)
        first = next(chunks)
        ttft = time.perf_counter() - sent
        rest = list(chunks)
        decode = time.perf_counter() - sent - ttft
        tokens = first.shape[1] + sum(c.shape[1] for c in rest)
        results.append({"ttft": ttft, "per_token": decode / max(tokens - 1, 1), "tokens": tokens})
    with open(args.worker_out, "w") as f:
        json.dump({"wall": time.perf_counter() - start, "requests": results}, f)
    return 0


# ---- the client ----

def given_argv(args) -> list[str]:
    """The command line this run was given (the workers get it too)."""
    return list(sys.argv[1:] if args.argv is None else args.argv)


class ServerProcess:
    def __init__(self, args, *extra: str):
        argv = [sys.executable, "-m", "bench.serve", *given_argv(args), *extra, "--worker", "server"]
        self.proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
        self.log = []
        for line in self.proc.stderr:
            self.log.append(line)
            match = re.search(r"serving \S+ on (http://\S+) ", line)
            if match:
                self.url = match.group(1)
                break
        else:
            raise RuntimeError("the server worker exited:\n" + "".join(self.log[-40:]))
        threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True).start()

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(120)


def one_request(url: str, prompt: list[int], new_tokens: int) -> dict:
    import requests

    body = {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True}
    sent = time.perf_counter()
    times = []
    with requests.post(f"{url}/v1/completions", json=body, stream=True, timeout=600) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if line.startswith(b"data: {"):
                times.append(time.perf_counter())
    times = times[:-1]  # the last chunk ends the completion; each one before it is a token
    return {"ttft": times[0] - sent, "gaps": np.diff(times).tolist(), "tokens": len(times),
            "per_token": (times[-1] - times[0]) / max(len(times) - 1, 1)}


def step_totals(url: str) -> tuple[float, float]:
    """The server's decode steps so far: (count, seconds), from its /metrics."""
    import requests

    text = requests.get(f"{url}/metrics", timeout=30).text
    return tuple(float(re.search(rf"^neox_decode_step_seconds_{k} (\S+)$", text, re.M).group(1))
                 for k in ("count", "sum"))


def level(url: str, batch: list[list[int]], new_tokens: int, concurrency: int, warmup: int) -> dict:
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda p: one_request(url, p, new_tokens), batch[:warmup]))
        steps_before, seconds_before = step_totals(url)
        start = time.perf_counter()
        results = list(pool.map(lambda p: one_request(url, p, new_tokens), batch))
        wall = time.perf_counter() - start
        steps, seconds = step_totals(url)
    gaps = [g for r in results for g in r["gaps"]]
    return {"concurrency": concurrency, "wall": wall, "tokens": sum(r["tokens"] for r in results),
            "step": (seconds - seconds_before) / max(steps - steps_before, 1),
            "ttft": float(np.median([r["ttft"] for r in results])),
            "per_token": float(np.median([r["per_token"] for r in results])),
            "per_token_p50": float(np.percentile(gaps, 50)), "per_token_p99": float(np.percentile(gaps, 99))}


def cached_prefix(args, vocab: int) -> dict:
    """TTFT of requests whose first `args.cached_prefix` tokens are in the prefix cache, against cold ones."""
    rng = np.random.default_rng(args.seed + 1)
    server = ServerProcess(args, "--prompt-len", str(args.cached_prefix + PREFIX_TAIL), "--prefix-cache-gib", "1")
    try:
        one_request(server.url, rng.integers(0, vocab, PREFIX_TAIL).tolist(), 2)  # warm-up
        cold, cached = [], []
        for _ in range(PREFIX_PAIRS):
            shared = rng.integers(0, vocab, args.cached_prefix).tolist()
            cold.append(one_request(server.url, shared + rng.integers(0, vocab, PREFIX_TAIL).tolist(), 2)["ttft"])
            cached.append(one_request(server.url, shared + rng.integers(0, vocab, PREFIX_TAIL).tolist(), 2)["ttft"])
        import requests

        hits = re.search(r"^neox_prefix_cache_hits (\S+)$", requests.get(f"{server.url}/metrics", timeout=30).text, re.M)
    finally:
        server.stop()
    cold_s, cached_s = float(np.median(cold)), float(np.median(cached))
    return {"prefix": args.cached_prefix, "tail": PREFIX_TAIL, "cold_ttft": cold_s, "cached_ttft": cached_s,
            "ratio": cached_s / cold_s, "hit_blocks": float(hits.group(1))}


def run_bench(args) -> dict:
    config = SHAPES[args.shape]
    batch = prompts(args, config.vocab_size)
    peer = run_worker("bench.serve", "generate", given_argv(args))
    peer_tokens = sum(r["tokens"] for r in peer["requests"])
    peer_row = {"tok_s": peer_tokens / peer["wall"], "ttft": float(np.median([r["ttft"] for r in peer["requests"]])),
                "per_token": float(np.median([r["per_token"] for r in peer["requests"]]))}
    server = ServerProcess(args)
    try:
        levels = [level(server.url, batch, args.new_tokens, c, min(c, args.max_batch))
                  for c in parse_list(args.concurrency, int)]
    finally:
        code = server.stop()
    for row in levels:
        row["tok_s"] = row["tokens"] / row["wall"]
        row["throughput_ratio"] = row["tok_s"] / peer_row["tok_s"]
        row["ttft_ratio"] = row["ttft"] / peer_row["ttft"]
    prefix = cached_prefix(args, config.vocab_size) if args.cached_prefix else None
    return {"shape": args.shape, "requests": args.requests, "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens, "max_batch": args.max_batch, "decode_chunk": args.decode_chunk,
            "generate": peer_row, "server": levels,
            "prefix_cache": prefix, "server_exit": code, "load_average": load_average()}


def render(result: dict, markdown: bool) -> str:
    peer = result["generate"]
    headers = ["engine", "concurrency", "tok/s", "x generate", "TTFT ms", "x generate", "per token ms",
               "gap p50 ms", "gap p99 ms", "step ms"]
    rows = [["generate, one at a time", 1, sig(peer["tok_s"]), "1", sig(1e3 * peer["ttft"]), "1",
             sig(1e3 * peer["per_token"]), "-", "-", sig(1e3 * peer["per_token"])]]
    rows += [["server", r["concurrency"], sig(r["tok_s"]), f"{r['throughput_ratio']:.2f}", sig(1e3 * r["ttft"]),
              f"{r['ttft_ratio']:.2f}", sig(1e3 * r["per_token"]), sig(1e3 * r["per_token_p50"]),
              sig(1e3 * r["per_token_p99"]), sig(1e3 * r["step"])] for r in result["server"]]
    title = (f"{result['shape']}: {result['requests']} requests of {result['prompt_len']} prompt tokens, "
             f"{result['new_tokens']} new tokens each, greedy; server with {result['max_batch']} slots, "
             f"{result['decode_chunk']} decode steps per turn")
    verdicts = []
    by_c = {r["concurrency"]: r for r in result["server"]}
    if 8 in by_c:
        ok = by_c[8]["throughput_ratio"] >= TARGETS["throughput_at_8"]
        verdicts.append(f"concurrency 8 throughput {by_c[8]['throughput_ratio']:.2f}x generate one at a time "
                        f"(target >= {TARGETS['throughput_at_8']:g}x): {'met' if ok else 'NOT met'}")
    full = max(result["server"], key=lambda r: r["concurrency"])
    slots = min(full["concurrency"], result["max_batch"])
    verdicts.append(f"the limit this machine sets: {slots} slots x generate's {sig(1e3 * peer['per_token'])} ms per "
                    f"token / the server's {sig(1e3 * full['step'])} ms decode step = "
                    f"{slots * peer['per_token'] / full['step']:.2f}x generate's decode throughput, prefill aside")
    if 1 in by_c:
        speed = peer["per_token"] / by_c[1]["per_token"]
        ok = speed >= TARGETS["lone_decode"]
        verdicts.append(f"a lone request decodes at {speed:.2f}x generate's speed (its time per token over the "
                        f"server's; target >= {TARGETS['lone_decode']:g}x): {'met' if ok else 'NOT met'}")
        ok = by_c[1]["ttft_ratio"] <= TARGETS["ttft_at_1"]
        verdicts.append(f"concurrency 1 TTFT {by_c[1]['ttft_ratio']:.2f}x a bare generate call "
                        f"(target <= {TARGETS['ttft_at_1']:g}x): {'met' if ok else 'NOT met'}")
    prefix = result.get("prefix_cache")
    if prefix:
        ok = prefix["ratio"] <= TARGETS["cached_prefix_ttft"]
        verdicts.append(f"prefix cache: TTFT of a {prefix['prefix']} + {prefix['tail']}-token prompt whose first "
                        f"{prefix['prefix']} tokens are cached {sig(1e3 * prefix['cached_ttft'])} ms, cold "
                        f"{sig(1e3 * prefix['cold_ttft'])} ms: {prefix['ratio']:.2f}x (target <= "
                        f"{TARGETS['cached_prefix_ttft']:g}x): {'met' if ok else 'NOT met'}; "
                        f"{prefix['hit_blocks']:.0f} blocks copied")
    if markdown:
        return f"## {title}\n\n{markdown_table(headers, rows)}\n\n" + "".join(f"- {v}\n" for v in verdicts)
    return f"== {title}\n{table(headers, rows)}\n" + "".join(f"{v}\n" for v in verdicts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="pythia-70m", choices=sorted(SHAPES))
    parser.add_argument("--concurrency", default="1,4,8,16", help="comma list of client counts")
    parser.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=8,
                        help="the server's decode slots (default 8, as the server's)")
    parser.add_argument("--decode-chunk", type=int, default=DECODE_CHUNK, metavar="N",
                        help=f"the server's --decode-chunk (default {DECODE_CHUNK}, as the server's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cached-prefix", type=int, default=1024, metavar="N",
                        help="prompt tokens the prefix-cache measurement shares between requests (0: skip it)")
    parser.add_argument("--prefix-cache-gib", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--markdown", metavar="FILE", help="also write a Markdown page with the date, machine and "
                                                           "command (docs/figures/serve.md)")
    parser.add_argument("--worker", choices=("server", "generate"), help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = argv
    if args.markdown and not Path(args.markdown).resolve().parent.is_dir():
        parser.error(f"--markdown {args.markdown}: its folder does not exist")
    if args.requests < 1 or args.prompt_len < 1 or args.new_tokens < 2 or args.max_batch < 1 or args.decode_chunk < 1 \
            or not parse_list(args.concurrency, int) or min(parse_list(args.concurrency, int)) < 1:
        parser.error("need --requests, --prompt-len, --max-batch, --decode-chunk, each concurrency >= 1 and "
                     "--new-tokens >= 2")
    if args.prompt_len + args.new_tokens > SHAPES[args.shape].max_position_embeddings:
        parser.error(f"--prompt-len + --new-tokens exceed the context of {args.shape}")
    if args.cached_prefix < 0 or args.cached_prefix + PREFIX_TAIL + args.new_tokens > \
            SHAPES[args.shape].max_position_embeddings:
        parser.error(f"--cached-prefix must be >= 0, and with {PREFIX_TAIL} more prompt tokens and --new-tokens "
                     f"fit the context of {args.shape}")
    if args.worker == "server":
        return server_worker(args)
    if args.worker == "generate":
        return generate_worker(args)

    started = utc_now()
    print(f"neox-jax serving benchmark: {machine()}; load average at start {load_average()}", flush=True)
    result = run_bench(args)
    print(render(result, markdown=False), flush=True)
    print(f"load average at the end: {result['load_average']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.markdown:
        write_page(args.markdown, markdown_page("Serving benchmark", "bench.serve", given_argv(args),
                                                render(result, markdown=True), started))
    return 0 if result["server_exit"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
