"""`python -m neox_jax.plan`: will a model fit, before anything is downloaded or loaded, and if not, what would.

    python -m neox_jax.plan --preset gpt-neox-20b --quantize int8 --batch 1 --context 2048 --device-memory 24GiB
    python -m neox_jax.plan --model ./pythia-1b --dtype float32 --batch 8 --json

The bytes are `sharding.planned_bytes`, the memory plan `generate` and `neox_jax.load` check before loading
(weights, quantized or not, plus the KV cache of `--batch` sequences of `--context` tokens, per device of
`--mesh`); the device is `--device-memory` (a card's total memory) or, without it, this machine's first
device (on CPU: the host's available memory, shared by the mesh's devices).

Beside weights and cache it counts the largest temporaries, the prefill's attention scores (~6 bytes a
score, `[batch, heads, 256-token chunk, context]`, measured in tests/test_decode.py); a decode step's are
small beside them. `generate`'s own check counts weights and cache only.

JAX's GPU allocator takes 75% of a card at start-up (`XLA_PYTHON_CLIENT_MEM_FRACTION`, default .75) and XLA
plans within that. A model that fits only in a larger share fits with the setting it needs, the needed
share rounded up to a multiple of .05, at most .95: the rest of the card holds the CUDA context and the
libraries' workspaces, outside XLA's pool.

When it does not fit, it says what would, each computed by the same plan: int8 weights, fewer sequences,
a shorter context, more devices on the model axis.

Exit status: 0 fits (perhaps with a larger memory fraction), 1 does not fit, 2 bad input (one `error:` line).
"""

from __future__ import annotations

from .cli import ArgumentParser, exit_on_interrupt

if __name__ == "__main__":
    exit_on_interrupt()

import argparse
import dataclasses
import json
import math
import os
import re
import sys

from .config import PRESETS, ConfigError, NeoXConfig
from .dtypes import NAMES, lookup
from .params import split_sizes
from .quantize import NAMES as QUANTIZE_NAMES
from .decode import PREFILL_CHUNK
from .sharding import DATA, MODEL, ShardingError, parse_mesh, planned_bytes

GIB = 2 ** 30
DEFAULT_FRACTION = 0.75  # JAX's preallocated share of a GPU
MAX_FRACTION = 0.95
SCORE_BYTES = 6  # prefill temporaries per attention score (fp32 scores, then the weights)
UNITS = {"b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
         "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


class PlanError(ValueError):
    """Bad input: exit status 2."""


def parse_size(text: str) -> int:
    """'24GiB', '80 GB', '1.5TiB' -> bytes (GB = 10^9, GiB = 2^30)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([KMGT]i?B|B)\s*", text, re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise PlanError(f"--device-memory {text!r}: expected a positive size with a unit, e.g. 24GiB or 80GB")
    return int(float(match.group(1)) * UNITS[match.group(2).lower()])


@dataclasses.dataclass(frozen=True)
class Request:
    config: NeoXConfig
    dtype: str
    quantize: str | None
    batch: int
    context: int
    mesh: dict[str, int]  # axis sizes
    draft: NeoXConfig | None = None  # a speculative decoding draft, held beside the model (same dtype and mesh)

    def needed(self) -> tuple[int, int, int]:
        """(weights, KV cache, prefill temporaries) bytes per device; a draft's weights and cache included."""
        weights, cache = planned_bytes(self.config, lookup(self.dtype).jax, self.mesh, self.batch, self.context,
                                       quantize=self.quantize)
        if self.draft is not None:
            draft_weights, draft_cache = planned_bytes(self.draft, lookup(self.dtype).jax, self.mesh, self.batch,
                                                       self.context, quantize=self.quantize)
            weights, cache = weights + draft_weights, cache + draft_cache
        rows = -(-self.batch // self.mesh[DATA])
        heads = self.config.num_heads // self.mesh[MODEL]
        return weights, cache, SCORE_BYTES * rows * heads * min(PREFILL_CHUNK, self.context) * self.context

    def mesh_text(self) -> str:
        return f"model={self.mesh[MODEL]}" + (f",data={self.mesh[DATA]}" if self.mesh[DATA] > 1 else "")


@dataclasses.dataclass(frozen=True)
class Device:
    total: int  # bytes of one device (a card's total; the host's available memory per device on CPU)
    fraction: float | None  # the share XLA may use (None: all of it, as on CPU)
    what: str

    @property
    def available(self) -> int:
        return int(self.total * (self.fraction or 1.0))

    def fraction_needed(self, needed: int) -> float | None:
        """The memory fraction at which `needed` bytes fit (rounded up to .05), None if none up to .95 does."""
        if self.fraction is None:
            return None
        share = math.ceil(needed / self.total * 20 - 1e-9) / 20
        return max(share, self.fraction) if share <= MAX_FRACTION else None


def verdict(request: Request, device: Device) -> dict:
    """`fits`: with the memory fraction in effect, or with `mem_fraction_needed` (None: not needed)."""
    weights, cache, temporaries = request.needed()
    needed = weights + cache + temporaries
    as_is = needed <= device.available
    fraction = None if as_is else device.fraction_needed(needed)
    return {"weights_per_device": weights, "cache_per_device": cache, "temporaries_per_device": temporaries,
            "needed_per_device": needed, "available_per_device": device.available,
            "fits": as_is or fraction is not None, "mem_fraction_needed": fraction}


def fits_somehow(v: dict) -> bool:
    return v["fits"]


def fraction_setting(fraction: float) -> str:
    return f"XLA_PYTHON_CLIENT_MEM_FRACTION={fraction:.2f}".replace("=0.", "=.")


def suggestions(request: Request, device: Device) -> list[dict]:
    """What would fit instead, each a change of one setting, checked with the same plan."""
    out = []

    def offer(change: str, changed: Request):
        v = verdict(changed, device)
        if fits_somehow(v):
            out.append({"change": change, **v})

    if request.quantize is None:
        offer("--quantize int8", dataclasses.replace(request, quantize="int8"))
    batch = max_fitting(lambda b: dataclasses.replace(request, batch=b), request.batch - 1, device)
    if batch:
        offer(f"--batch {batch}", dataclasses.replace(request, batch=batch))
    context = max_fitting(lambda n: dataclasses.replace(request, context=n), request.context - 1, device)
    if context:
        offer(f"--context {context}", dataclasses.replace(request, context=context))
    divides = [*split_sizes(request.config).values(), *(split_sizes(request.draft).values() if request.draft else ())]
    for model in (2 ** k for k in range(1, 11)):
        if model > request.mesh[MODEL] and all(size % model == 0 for size in divides):
            changed = dataclasses.replace(request, mesh={**request.mesh, MODEL: model})
            if fits_somehow(verdict(changed, device)):
                offer(f"--mesh {changed.mesh_text()}", changed)
                break
    return out


def max_fitting(make, upper: int, device: Device) -> int:
    """The largest n in [1, upper] for which `make(n)` fits (perhaps with a larger fraction); 0 if none."""
    low, high = 0, upper
    while low < high:
        mid = (low + high + 1) // 2
        if fits_somehow(verdict(make(mid), device)):
            low = mid
        else:
            high = mid - 1
    return low


def local_device(mesh_devices: int) -> Device:
    """This machine's first device: a GPU's limit (already the preallocated share), or the host's memory."""
    import jax

    from .sharding import device_memory, host_memory

    device = jax.devices()[0]
    limit = device_memory(device)
    if limit is not None:
        fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", DEFAULT_FRACTION))
        return Device(int(limit / fraction), fraction, f"{device.device_kind} ({device.platform})")
    host = host_memory()
    if host is None:
        raise PlanError("this machine reports no memory size: give --device-memory")
    return Device(host // mesh_devices, None, f"host memory ({device.platform}), shared by {mesh_devices} device(s)")


def gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def describe(request: Request, device: Device, result: dict) -> str:
    quantized = f", {request.quantize} weights" if request.quantize else ""
    drafted = f", with a draft ({result['draft']})" if result.get("draft") else ""
    lines = [f"{request.dtype}{quantized}, batch {request.batch} x {request.context} tokens, "
             f"mesh {request.mesh_text()}{drafted}",
             f"device: {device.what}, {gib(device.total)}"
             + (f"; XLA may use {device.fraction:g} of it: {gib(device.available)}" if device.fraction else ""),
             f"per device: weights {gib(result['weights_per_device'])} + KV cache {gib(result['cache_per_device'])}"
             f" + prefill temporaries {gib(result['temporaries_per_device'])} = {gib(result['needed_per_device'])}"]
    if result["fits"]:
        fraction = result["mem_fraction_needed"]
        lines.append("fits" + (f" with {fraction_setting(fraction)}" if fraction else ""))
    else:
        lines.append("does not fit" + (f", even with {fraction_setting(MAX_FRACTION)}" if device.fraction else ""))
        for s in result["suggestions"]:
            how = f" with {fraction_setting(s['mem_fraction_needed'])}" if s["mem_fraction_needed"] else ""
            lines.append(f"  would fit: {s['change']} ({gib(s['needed_per_device'])} per device{how})")
        if not result["suggestions"]:
            lines.append("  no single change (int8, fewer sequences, a shorter context, up to 1024 devices) fits")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m neox_jax.plan", description=__doc__.split("\n\n")[0],
                       epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=sorted(PRESETS), help="a known model (no files needed)")
    src.add_argument("--model", help="a checkpoint directory (Hugging Face or DeepSpeed) or a hub id: only its "
                                     "config is read")
    p.add_argument("--dtype", choices=NAMES,
                   help="model dtype (default: float16 with --device-memory, a GPU card; else this machine's default)")
    p.add_argument("--quantize", choices=QUANTIZE_NAMES, help="quantized matmul weights (int8-dynamic stores int8's)")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together (default 1)")
    p.add_argument("--context", type=int, help="tokens per sequence, prompt + generated (default: the model's context)")
    p.add_argument("--mesh", default="model=1", help="model=N[,data=M]: the devices the model is split over")
    p.add_argument("--device-memory", help="one device's total memory, e.g. 24GiB or 80GB (default: this machine's)")
    p.add_argument("--draft-preset", choices=sorted(PRESETS),
                   help="count a speculative decoding draft too (generate --draft): its weights and its KV cache "
                        "of the same batch and context, e.g. pythia-410m for gpt-neox-20b")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    return p.parse_args(argv)


def model_config(args) -> NeoXConfig:
    """--preset's config, a directory's (Hugging Face or DeepSpeed), or a hub id's config.json alone (the
    weights are not downloaded)."""
    if args.preset:
        return PRESETS[args.preset]
    from .checkpoints import CheckpointError, hub, open_checkpoint

    try:
        if not os.path.exists(args.model) and hub.is_repo_id(args.model):
            import huggingface_hub

            try:
                return NeoXConfig.from_hf_json(huggingface_hub.hf_hub_download(args.model, "config.json"))
            except Exception as e:  # offline, unknown, gated: huggingface_hub's errors have no common base
                raise PlanError(f"{args.model}: no such directory, and its config.json could not be fetched "
                                f"from the Hugging Face hub ({str(e).strip().splitlines()[0]})") from None
        return open_checkpoint(args.model).config
    except CheckpointError as e:
        raise PlanError(str(e)) from None


def plan(args) -> tuple[dict, str]:
    config = model_config(args)
    if args.batch < 1:
        raise PlanError(f"--batch must be >= 1, got {args.batch}")
    context = config.max_position_embeddings if args.context is None else args.context
    if not 1 <= context <= config.max_position_embeddings:
        raise PlanError(f"--context must be in [1, {config.max_position_embeddings}] (the model's context), "
                        f"got {context}")
    mesh = parse_mesh(args.mesh)
    for field, size in split_sizes(config).items():
        if size % mesh[MODEL]:
            raise PlanError(f"{field} {size} is not divisible by the mesh's model axis ({mesh[MODEL]})")
    if args.device_memory is not None:
        device = Device(parse_size(args.device_memory), DEFAULT_FRACTION, "--device-memory")
    else:
        device = local_device(mesh[MODEL] * mesh[DATA])
    dtype = args.dtype or ("float16" if args.device_memory else None)
    if dtype is None:
        from .dtypes import default_dtype

        dtype = default_dtype()
    draft = PRESETS[args.draft_preset] if args.draft_preset else None
    if draft is not None:
        for field, size in split_sizes(draft).items():
            if size % mesh[MODEL]:
                raise PlanError(f"the draft's {field} {size} is not divisible by the mesh's model axis ({mesh[MODEL]})")
    request = Request(config, dtype, args.quantize, args.batch, context, mesh, draft)
    result = verdict(request, device)
    result["draft"] = args.draft_preset
    result["suggestions"] = [] if fits_somehow(result) else suggestions(request, device)
    report = {"model": args.preset or args.model, "dtype": dtype, "quantize": args.quantize, "batch": args.batch,
              "context": context, "mesh": mesh, "device": device.what, "device_memory": device.total,
              "mem_fraction": device.fraction, **result,
              "environment": ({"XLA_PYTHON_CLIENT_MEM_FRACTION": fraction_setting(result["mem_fraction_needed"])
                               .partition("=")[2]} if result["mem_fraction_needed"] else {})}
    return report, describe(request, device, result)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        report, text = plan(args)
    except (PlanError, ShardingError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report) if args.json else text)
    return 0 if fits_somehow(report) else 1


if __name__ == "__main__":
    sys.exit(main())
