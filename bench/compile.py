"""Compile time of the decoder's programs at any model's shapes, with no weights: the params, cache and
inputs are abstract, so GPT-NeoX-20B's programs compile on a laptop.

    python -m bench.compile                              # GPT-NeoX-20B, fp16, batch 1, 2048 slots
    python -m bench.compile --preset pythia-70m --dtype float32 --batch 8 --slots 512
    python -m bench.compile --markdown docs/figures/compile.md   # the page the docs quote
    python -m bench.compile --json compile.json                  # the figures for a script (the GPU session)

It compiles for the machine it runs on (XLA:CPU here, XLA:GPU on a GPU), so run it where you will decode.
The layers are unrolled (see neox_jax/model.py), so compile time grows with depth.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from neox_jax.config import PRESETS
from neox_jax.decode import PREFILL_CHUNK, Decoder
from neox_jax.dtypes import DTYPES, NAMES
from neox_jax.model import KVCache, NeoX
from neox_jax.sampling import Sampling
from neox_jax.weights import abstract_params

from .common import markdown_page, markdown_table, utc_now, write_page


def compile_seconds(program, *args) -> tuple[float, float]:
    """Seconds to trace and lower one of the decoder's programs, then to compile it."""
    start = time.perf_counter()
    lowered = program.lower(*args)
    lowered_at = time.perf_counter()
    lowered.compile()
    return lowered_at - start, time.perf_counter() - lowered_at


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.compile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="gpt-neox-20b")
    parser.add_argument("--dtype", choices=NAMES, default="float16")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--slots", type=int, default=2048, help="KV-cache slots (the context)")
    parser.add_argument("--markdown", metavar="FILE",
                        help="also write the figures as a Markdown page with the date, machine and command")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.slots < 1:
        parser.error("--batch and --slots must be positive")
    if args.markdown and not Path(args.markdown).resolve().parent.is_dir():
        parser.error(f"--markdown {args.markdown}: its folder does not exist")

    started = utc_now()
    config, dtype = PRESETS[args.preset], DTYPES[args.dtype].jax
    decoder = Decoder(NeoX(config, dtype), params=None)
    params = abstract_params(config, dtype)
    cache = jax.eval_shape(lambda: KVCache.init(config, args.batch, args.slots, dtype))
    rows = lambda *shape: jax.ShapeDtypeStruct((args.batch, *shape), jnp.int32)  # noqa: E731
    piece = min(PREFILL_CHUNK, args.slots)
    sampling, stop = Sampling.create(), jnp.int32(0)
    active, salt = (jax.ShapeDtypeStruct((args.batch,), dtype) for dtype in (jnp.bool_, jnp.uint32))
    prefill = compile_seconds(decoder._prefill, params, rows(piece), rows(piece), cache, sampling, stop, active, salt)
    state = jax.eval_shape(decoder._prefill_fn, params, rows(piece), rows(piece), cache, sampling, stop, active,
                           salt)
    decode = compile_seconds(decoder._decode, params, state, sampling, stop, jnp.int32(1))

    title = (f"{args.preset} ({config.num_layers} layers), {args.dtype}, batch {args.batch}, {args.slots} slots, "
             f"on {jax.devices()[0].platform}")
    programs = (("prefill", prefill), ("decode loop", decode))
    total = sum(prefill) + sum(decode)
    print(f"{title}:")
    for name, (lower, compile_) in programs:
        print(f"  {name:12s} trace+lower {lower:5.1f} s   compile {compile_:5.1f} s")
    print(f"  total {total:.1f} s")
    if args.json:
        figures = {"preset": args.preset, "layers": config.num_layers, "dtype": args.dtype, "batch": args.batch,
                   "slots": args.slots, "platform": jax.devices()[0].platform, "jax": jax.__version__,
                   "programs": {name: {"trace_lower_seconds": lower, "compile_seconds": compile_}
                                for name, (lower, compile_) in programs},
                   "total_seconds": total}
        Path(args.json).write_text(json.dumps(figures, indent=1))
        print(f"wrote {args.json}")
    if args.markdown:
        rows = [[name, f"{lower:.1f}", f"{compile_:.1f}"] for name, (lower, compile_) in programs]
        body = (f"{title}, jax {jax.__version__}:\n\n"
                + markdown_table(["program", "trace+lower s", "compile s"], rows + [["total", "", f"{total:.1f}"]]))
        argv = sys.argv[1:] if argv is None else argv
        write_page(args.markdown, markdown_page("Compile time", "bench.compile", argv, body, started))
        print(f"wrote {args.markdown}")


if __name__ == "__main__":
    main()
