"""GPU benchmark: GPT-NeoX-20B shapes in fp16 with random weights made on the device, neox-jax against the
parity/ PyTorch model on CUDA.

    python -m bench.gpu                      # 20B shapes, one GPU (an H200: ~41 GB of weights + caches)
    python -m bench.gpu --tiny               # a 2-layer toy of the same code path; runs on CPU in seconds
    python -m bench.gpu --layers 4 --hidden 1024 --heads 16 --context 512 ...   # anything in between

Measured, for each engine in a child process of its own (the device is free again when it exits, so the
two never share GPU memory; JAX gets XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 there unless it is set):

* device copy bandwidth: GB/s of a 4 GiB on-device copy (jax: a jitted negation; torch: copy_), counted as
  read + write bytes: the reference the decode bandwidth is set against;
* prefill: one prompt of `--prefill-tokens` - 1 tokens (with the generated token, the whole context);
  ms and model TFLOP/s (`common.prefill_flops`: every layer matmul, causal attention, head on the last token);
* decode at each `--batch`: a cache of `--context` slots, filled to the end by the prompt plus the
  `--decode-steps` timed steps (prompt = context - steps) unless memory forces a shorter prompt (then
  said); ms/step, tok/s and achieved GB/s of the bytes a step must read: the weights, and the weights plus
  the filled part of the KV cache;
* peak device memory and neox-jax's compile time (excluded from its timings).

Weights: normal(0, 0.02) (output projections 0.02 / sqrt(2 L)), LayerNorm weights 1, biases 0, drawn
straight into device memory (jax.random per params leaf of `weights.abstract_params`; torch normal_ on the
CUDA parameters): nothing goes through the host, and no files. The two engines get different random weights;
the work per token is the same. `neox-jax-int8` / `neox-jax-fp8` (`--engines`) hold their matmul weights
quantized: random stored values (int8: normal with std 42, clipped to +-127; fp8: normal(0, 1) rounded to
e4m3) and per-channel scales that give the weights the same std; their bytes per step count values and scales.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from neox_jax.dtypes import DTYPES, NAMES

from .common import (WorkerError, decode_weight_bytes, fmt, kv_bytes, median, param_count, parse_list,
                     prefill_flops, run_worker, sig, table,
                     matmul_weight_sizes, weight_sized_float_buffers)

ENGINES = ("neox-jax", "neox-jax-int8", "neox-jax-fp8", "parity")
DEFAULT_ENGINES = ("neox-jax", "parity")  # the quantized rows: --engines neox-jax-int8,neox-jax-fp8
QUANTIZE = {"neox-jax": None, "neox-jax-int8": "int8", "neox-jax-fp8": "fp8"}  # weight-only (docs/quantization.md)
GIB = 2 ** 30


def build_config(args):
    from neox_jax.config import PRESETS

    config = PRESETS["tiny" if args.tiny else args.preset]
    changes = {"num_layers": args.layers, "hidden_size": args.hidden, "num_heads": args.heads,
               "intermediate_size": args.intermediate, "vocab_size": args.vocab,
               "max_position_embeddings": args.context}
    changes = {k: v for k, v in changes.items() if v is not None}
    if args.hidden is not None and args.intermediate is None:
        changes["intermediate_size"] = 4 * args.hidden
    return config.replace(**changes)


def init_std(path: str, config) -> float | None:
    """None: a bias (zeros); 1.0 marks a LayerNorm weight (ones); else the normal's std."""
    if path.endswith("bias"):
        return None
    if "layernorm" in path or "layer_norm" in path:
        return 1.0
    if path.endswith(("attention/dense.weight", "dense_4h_to_h.weight", "attention.dense.weight")):
        return 0.02 / math.sqrt(2 * config.num_layers)
    return 0.02


class Plan:
    """Prompt lengths for each decode batch, shrunk (halved) where the prefill's transient memory would not
    fit next to the weights and a full-size cache. `temp_bytes(batch, slots, prompt)` is the engine's
    transient prefill memory."""

    def __init__(self, config, dtype_bytes, device_bytes, steps, temp_bytes):
        self.config, self.itemsize, self.device_bytes, self.steps = config, dtype_bytes, device_bytes, steps
        self.temp_bytes = temp_bytes

    def prompt_len(self, batch: int) -> int:
        context = self.config.max_position_embeddings
        prompt = max(1, context - self.steps)
        if self.device_bytes is None:
            return prompt
        fixed = param_count(self.config) * self.itemsize + kv_bytes(self.config, batch, context, self.itemsize)
        while prompt > 64 and fixed + self.temp_bytes(batch, context, prompt) > 0.9 * self.device_bytes:
            prompt //= 2
        return prompt


# ---- neox-jax ----

def jax_worker(args, config) -> dict:
    import jax
    import jax.numpy as jnp

    from neox_jax.api import NeoXModel
    from neox_jax.decode import PREFILL_CHUNK, Generation
    from neox_jax.weights import abstract_params

    dtype = DTYPES[args.dtype].jax
    quantize = QUANTIZE[args.worker]
    device = jax.local_devices()[0]
    log(f"{args.worker} on {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    out = {"engine": args.worker, "device": f"{device.device_kind} ({jax.default_backend()})"}

    def memory():
        stats = device.memory_stats() if hasattr(device, "memory_stats") else None
        return stats or {}

    out["copy_gbps"] = jax_copy_bandwidth(args.copy_gib)
    log(f"device copy {out['copy_gbps']:.0f} GB/s")

    start = time.perf_counter()
    spec = abstract_params(config, dtype, quantize=quantize)
    key = jax.random.PRNGKey(args.seed)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(spec)
    values = []
    for i, (path, leaf) in enumerate(leaves):
        name = "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
        std = init_std(name.removesuffix("/values").removesuffix("/scale"), config)
        if name.endswith("/values"):
            values.append(_quantized_values(jax.random.fold_in(key, i), leaf.shape, leaf.dtype))
        elif name.endswith("/scale"):
            values.append(jnp.full(leaf.shape, std / (QUANTIZED_STD if quantize == "int8" else 1.0), leaf.dtype))
        elif std is None:
            values.append(jnp.zeros(leaf.shape, leaf.dtype))
        elif std == 1.0:
            values.append(jnp.ones(leaf.shape, leaf.dtype))
        else:
            values.append(_normal(jax.random.fold_in(key, i), leaf.shape, leaf.dtype, std))
    params = jax.tree_util.tree_unflatten(treedef, values)
    jax.block_until_ready(params)
    out["init_seconds"] = time.perf_counter() - start
    log(f"random params on device in {out['init_seconds']:.1f} s")
    model = NeoXModel(config, params, args.dtype, quantize=quantize)
    rng = np.random.default_rng(args.seed)
    context = config.max_position_embeddings
    itemsize = dtype.itemsize
    # neox-jax's prefill materialises [B, N, chunk, S] fp32 scores and their fp16 softmax weights,
    # PREFILL_CHUNK prompt tokens at a time: 6 bytes a score (XLA's memory analysis of the fp32 CPU program:
    # 5.9 at batch 8 and 2048 slots; fp16 on CPU says nothing, XLA:CPU converts fp16 matmul operands to
    # fp32). A prompt is shortened only where even that would not fit beside the cache.
    plan = Plan(config, itemsize, memory().get("bytes_limit"), args.decode_steps,
                lambda b, s, p: b * config.num_heads * s * min(p, PREFILL_CHUNK) * 6)

    # prefill
    prompt_len = min(args.prefill_tokens, context) - 1
    prompts = rng.integers(1, config.vocab_size, (1, prompt_len)).tolist()
    compile_s = model.generate_timed(prompts, 1, stop_token=None).compile_seconds
    runs = [model.generate_timed(prompts, 1, stop_token=None).prefill_seconds for _ in range(args.reps)]
    seconds = median(runs)
    out["prefill"] = {"tokens": prompt_len, "seconds": seconds, "runs": runs, "compile_seconds": compile_s,
                      "tflops": prefill_flops(config, 1, prompt_len) / seconds / 1e12,
                      "peak_bytes": memory().get("peak_bytes_in_use")}
    save_so_far(args, out)
    log(f"prefill {prompt_len} tokens: {1e3 * seconds:.1f} ms (compile {compile_s:.1f} s)")

    def decode(prompts, max_new_tokens):
        timing = Generation()
        stream = model.decoder.stream(prompts, max_new_tokens, stop_token=None, chunk=args.decode_steps,
                                      timing=timing)
        next(stream)  # prefill
        next(stream)  # the first chunk of decode steps
        stream.close()
        return timing

    out["decode"] = []
    for batch in parse_list(args.batch, int):
        prompt = plan.prompt_len(batch)
        case = {"batch": batch, "prompt": prompt, "slots": context, "steps": args.decode_steps}
        try:
            prompts = rng.integers(1, config.vocab_size, (batch, prompt)).tolist()
            warm = decode(prompts, context - prompt)
            timings = [decode(prompts, context - prompt) for _ in range(args.reps)]
            steps = timings[0].decode_steps
            seconds = median([t.decode_seconds for t in timings])
            case.update(steps=steps, seconds=seconds, runs=[t.decode_seconds for t in timings],
                        compile_seconds=warm.compile_seconds, peak_bytes=memory().get("peak_bytes_in_use"))
            log(f"decode batch {batch}: {1e3 * seconds / steps:.2f} ms/step (compile {warm.compile_seconds:.1f} s)")
        except Exception as e:  # out of device memory, most likely: report it and go on
            case["error"] = short_error(e)
            log(f"decode batch {batch} failed: {case['error']}")
        out["decode"].append(case)
        save_so_far(args, out)
    if quantize:
        # Issue 14's check at these shapes: the compiled decode loops read the stored values; a float array
        # of a matmul weight's size would be a converted copy written every step.
        programs = [e.as_text() for e in model.decoder._decode._executables.values()]
        sizes = matmul_weight_sizes(config)
        found = [line for hlo in programs for line in weight_sized_float_buffers(hlo, sizes)]
        out["weight_sized_float_buffers"] = {"programs": len(programs), "count": len(found), "first": found[:5]}
        log(f"{len(found)} weight-sized float buffers in {len(programs)} compiled decode programs")
    return out


@functools.cache
def _drawer(kind: str, shape: tuple, dtype, std: float | None):
    """One jitted draw per distinct leaf (44 layers share a dozen shapes): a new jit per leaf would compile
    each of 20B's ~350 leaves again."""
    import jax
    import jax.numpy as jnp

    def normal(key):
        return (jax.random.normal(key, shape, dtype) * std).astype(dtype)

    def quantized(key):
        x = jax.random.normal(key, shape, jnp.float32)
        if dtype == jnp.int8:
            return jnp.clip(jnp.round(x * QUANTIZED_STD), -127, 127).astype(dtype)
        return x.astype(dtype)

    return jax.jit(normal if kind == "normal" else quantized)


def _normal(key, shape, dtype, std):
    return _drawer("normal", tuple(shape), dtype, std)(key)


QUANTIZED_STD = 42.0  # random int8 values: clipped at 3 standard deviations


def _quantized_values(key, shape, dtype):
    return _drawer("quantized", tuple(shape), dtype, None)(key)


def jax_copy_bandwidth(gib: float, reps: int = 5) -> float:
    import jax
    import jax.numpy as jnp

    n = int(gib * GIB) // 4
    x = jnp.ones((n,), jnp.float32)
    negate = jax.jit(lambda a: -a)
    negate(x).block_until_ready()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        negate(x).block_until_ready()
        times.append(time.perf_counter() - start)
    del x
    return 2 * n * 4 / median(times) / 1e9


# ---- parity (PyTorch) ----

def parity_worker(args, config) -> dict:
    import torch

    from parity.model import GPTNeoX, KVCache

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = dev.type == "cuda"
    dtype = DTYPES[args.dtype].torch
    name = torch.cuda.get_device_name(dev) if cuda else "cpu"
    log(f"parity on {name}, torch {torch.__version__}")
    out = {"engine": "parity", "device": name}

    def sync():
        if cuda:
            torch.cuda.synchronize()

    out["copy_gbps"] = torch_copy_bandwidth(args.copy_gib, dev, sync)
    log(f"device copy {out['copy_gbps']:.0f} GB/s")

    start = time.perf_counter()
    torch.manual_seed(args.seed)
    model = GPTNeoX(config, dtype, device="meta").to_empty(device=dev).requires_grad_(False).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            std = init_std(pname, config)
            if std is None:
                p.zero_()
            elif std == 1.0:
                p.fill_(1.0)
            else:
                p.normal_(0.0, std)
    sync()
    out["init_seconds"] = time.perf_counter() - start
    log(f"random params on device in {out['init_seconds']:.1f} s")

    itemsize = DTYPES[args.dtype].bytes
    device_bytes = torch.cuda.get_device_properties(dev).total_memory if cuda else None
    context = config.max_position_embeddings
    gen = torch.Generator(device="cpu").manual_seed(args.seed)

    def peak():
        return torch.cuda.max_memory_allocated(dev) if cuda else None

    def reset_peak():
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)

    def prefill(tokens, cache, chunk):
        token = None
        for i in range(0, tokens.shape[1], chunk):
            token = model(tokens[:, i:i + chunk], cache=cache)[:, -1].float().argmax(-1)
        return token

    @torch.inference_mode()
    def timed_prefill(tokens):
        sync()
        start = time.perf_counter()
        prefill(tokens, KVCache(config.num_layers), tokens.shape[1])
        sync()
        return time.perf_counter() - start

    # prefill
    prompt_len = min(args.prefill_tokens, context) - 1
    tokens = torch.randint(1, config.vocab_size, (1, prompt_len), generator=gen).to(dev)
    reset_peak()
    timed_prefill(tokens)
    runs = [timed_prefill(tokens) for _ in range(args.reps)]
    seconds = median(runs)
    out["prefill"] = {"tokens": prompt_len, "seconds": seconds, "runs": runs, "compile_seconds": None,
                      "tflops": prefill_flops(config, 1, prompt_len) / seconds / 1e12, "peak_bytes": peak()}
    save_so_far(args, out)
    log(f"prefill {prompt_len} tokens: {1e3 * seconds:.1f} ms")
    del tokens

    # Decode: the prompt goes in by chunks (its scores are [B*N, chunk, S] fp16 plus the fp32 softmax,
    # ~14 bytes a score), so its cache can be filled to the end at every batch size.
    def chunk_for(batch, prompt):
        chunk = 1 << max(6, (prompt - 1).bit_length())
        if device_bytes is not None:
            fixed = param_count(config) * itemsize + kv_bytes(config, batch, context, itemsize)
            while chunk > 64 and fixed + batch * config.num_heads * chunk * context * 14 > 0.9 * device_bytes:
                chunk //= 2
        return chunk

    @torch.inference_mode()
    def timed_decode(tokens, chunk, steps):
        cache = KVCache(config.num_layers)
        token = prefill(tokens, cache, chunk)
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            token = model(token[:, None], cache=cache)[:, -1].float().argmax(-1)
        sync()
        return time.perf_counter() - start

    out["decode"] = []
    for batch in parse_list(args.batch, int):
        prompt = max(1, context - args.decode_steps)
        chunk = chunk_for(batch, prompt)
        case = {"batch": batch, "prompt": prompt, "slots": context, "steps": args.decode_steps, "prefill_chunk": chunk}
        try:
            tokens = torch.randint(1, config.vocab_size, (batch, prompt), generator=gen).to(dev)
            reset_peak()
            timed_decode(tokens, chunk, args.decode_steps)
            runs = [timed_decode(tokens, chunk, args.decode_steps) for _ in range(args.reps)]
            seconds = median(runs)
            case.update(seconds=seconds, runs=runs, compile_seconds=None, peak_bytes=peak())
            log(f"decode batch {batch}: {1e3 * seconds / args.decode_steps:.2f} ms/step")
        except Exception as e:
            case["error"] = short_error(e)
            log(f"decode batch {batch} failed: {case['error']}")
        finally:
            tokens = None
            if cuda:
                torch.cuda.empty_cache()
        out["decode"].append(case)
        save_so_far(args, out)
    return out


def torch_copy_bandwidth(gib: float, dev, sync, reps: int = 5) -> float:
    import torch

    n = int(gib * GIB) // 4
    src = torch.ones(n, dtype=torch.float32, device=dev)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        dst.copy_(src)
        sync()
        times.append(time.perf_counter() - start)
    del src, dst
    return 2 * n * 4 / median(times) / 1e9


# ---- driver ----

_T0 = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _T0:6.1f}s] {message}", file=sys.stderr, flush=True)


def short_error(e: Exception) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def child_env(engine: str) -> dict:
    env = dict(os.environ)
    if engine.startswith("neox-jax"):
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")  # room for the batch-32 cache next to 41 GB
    else:
        env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # the cache grows by torch.cat
    return env


def save_so_far(args, out: dict) -> None:
    """The worker's figures so far, whole, where the parent reads its result: a run stopped from outside
    (the GPU session's step timeout) leaves them in `--json FILE`.ENGINE.partial."""
    tmp = f"{args.worker_out}.tmp"
    with open(tmp, "w") as f:
        json.dump({**out, "partial": True}, f)
    os.replace(tmp, args.worker_out)


def partial_path(json_path: str | None, engine: str) -> str | None:
    return None if json_path is None else f"{json_path}.{engine}.partial"


def run_child(engine: str, argv: list[str], out: str | None) -> dict:
    try:
        return run_worker("bench.gpu", engine, argv, child_env(engine), out=out)
    except WorkerError as e:
        return {"engine": engine, "error": str(e)}


def report(config, args, results: dict) -> None:
    itemsize = DTYPES[args.dtype].bytes
    scaled = any(getattr(args, k) is not None for k in ("layers", "hidden", "heads", "intermediate", "vocab", "context"))
    label = "tiny" if args.tiny else args.preset + (" (scaled)" if scaled else "")
    print(f"\n== {label}: {config.num_layers} layers, hidden {config.hidden_size}, "
          f"{config.num_heads} heads, vocab {config.vocab_size}, context {config.max_position_embeddings}; "
          f"{param_count(config) / 1e9:.2f}B params, {args.dtype}; medians of {args.reps} ==")
    for name, r in results.items():
        if "error" in r:
            print(f"{name}: {r['error']}")
    ok = {n: r for n, r in results.items() if "error" not in r}
    if not ok:
        return
    print("\ndevice and prefill")
    rows = []
    for name, r in ok.items():
        p = r["prefill"]
        rows.append([name, r["device"], sig(r["copy_gbps"]), f"{r['init_seconds']:.1f}", p["tokens"],
                     sig(1e3 * p["seconds"]), sig(p["tflops"]),
                     "-" if p["compile_seconds"] is None else f"{p['compile_seconds']:.1f}", gib(p["peak_bytes"])])
    print(table(["engine", "device", "copy GB/s", "init s", "prompt", "prefill ms", "TFLOP/s", "compile s",
                 "peak GiB"], rows, align_left=2))
    print("\ndecode (cache of `slots` positions, holding prompt + steps tokens at the end)")
    rows = []
    for name, r in ok.items():
        for c in r["decode"]:
            if "error" in c:
                rows.append([name, c["batch"], c["prompt"], c["slots"], c["error"][:60]] + [""] * 6)
                continue
            step = c["seconds"] / c["steps"]
            weights = decode_weight_bytes(config, c["batch"], itemsize, QUANTIZE.get(name))
            filled = c["prompt"] + c["steps"] / 2  # mean filled length over the timed steps
            kv = kv_bytes(config, c["batch"], 1, itemsize) * filled
            rows.append([name, c["batch"], c["prompt"], c["slots"], f"{1e3 * step:.2f}",
                         fmt(c["batch"] / step), sig(weights / step / 1e9), sig((weights + kv) / step / 1e9),
                         f"{100 * (weights + kv) / step / 1e9 / r['copy_gbps']:.0f}%",
                         "-" if c.get("compile_seconds") is None else f"{c['compile_seconds']:.1f}",
                         gib(c.get("peak_bytes"))])
    print(table(["engine", "batch", "prompt", "slots", "ms/step", "tok/s", "weights GB/s", "+KV(filled) GB/s",
                 "of copy", "compile s", "peak GiB"], rows))
    print("weights GB/s: bytes of weights one step reads / step time; +KV adds the filled part of the cache "
          "(the least any implementation must read); 'of copy' sets that against the device copy bandwidth "
          "measured by the same engine. peak GiB: neox-jax's is the process peak so far, parity's the case's.")
    for name, r in ok.items():
        if "weight_sized_float_buffers" in r:
            found = r["weight_sized_float_buffers"]
            print(f"{name}: {found['count']} weight-sized float buffers in its {found['programs']} compiled decode "
                  f"programs (0: its matmuls read the stored values)" + "".join(f"\n  {x[:160]}" for x in found["first"]))


def gib(x) -> str:
    return "-" if x is None else f"{x / GIB:.1f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="gpt-neox-20b")
    parser.add_argument("--tiny", action="store_true", help="the 'tiny' preset (2 layers, hidden 64, context 256): "
                                                            "a CPU smoke run")
    parser.add_argument("--layers", type=int)
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--heads", type=int)
    parser.add_argument("--intermediate", type=int, help="MLP width (default 4 x hidden when --hidden is given)")
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--context", type=int, help="max positions = cache slots")
    parser.add_argument("--dtype", default="float16", choices=NAMES)
    parser.add_argument("--prefill-tokens", type=int, default=2048, help="prefill length incl. the generated token")
    parser.add_argument("--batch", default="1,8,32")
    parser.add_argument("--decode-steps", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--copy-gib", type=float, default=4.0, help="size of the device copy bandwidth probe")
    parser.add_argument("--engines", default=",".join(DEFAULT_ENGINES), help=f"comma list of {', '.join(ENGINES)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tiny:
        args.decode_steps = min(args.decode_steps, 8)
        args.copy_gib = min(args.copy_gib, 0.0625)
        args.reps = min(args.reps, 2)

    config = build_config(args)
    engines = parse_list(args.engines)
    if any(e not in ENGINES for e in engines):
        parser.error(f"--engines: choose from {', '.join(ENGINES)}")
    if args.decode_steps < 1 or args.decode_steps >= config.max_position_embeddings:
        parser.error("--decode-steps must be in [1, context)")

    if args.worker:
        try:
            result = (jax_worker if args.worker in QUANTIZE else parity_worker)(args, config)
        except Exception as e:
            traceback.print_exc()
            result = {"engine": args.worker, "error": short_error(e)}
        with open(args.worker_out, "w") as f:
            json.dump(result, f)
        return 0

    child_argv = list(sys.argv[1:] if argv is None else argv)  # a worker ignores --json: the parent writes it
    print(f"neox-jax GPU benchmark: {', '.join(engines)}, each in its own process, one after the other",
          flush=True)
    started = time.perf_counter()
    results = {engine: run_child(engine, child_argv, partial_path(args.json, engine)) for engine in engines}
    report(config, args, results)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"argv": child_argv, "config": config.__dict__, "results": results}, f, indent=1)
        print(f"wrote {args.json}")
        for engine in engines:
            Path(partial_path(args.json, engine)).unlink(missing_ok=True)
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
