"""Convert a GPT-NeoX DeepSpeed checkpoint into a Hugging Face GPT-NeoX directory.

    python -m neox_jax.convert CHECKPOINT_DIR OUT_DIR [--config YAML | --preset NAME] [options]

The library entry point is `convert()`; `main()` only parses arguments and prints.
"""

from __future__ import annotations

from .cli import ArgumentParser, exit_on_interrupt

if __name__ == "__main__":
    exit_on_interrupt()  # until main() starts: Ctrl-C while the libraries load is exit 130, not a traceback

import argparse
import dataclasses
import datetime
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import time
import zlib
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from safetensors import SafetensorError, safe_open

from .config import PRESETS, ConfigError, NeoXConfig
from .checkpoints import CheckpointError, check_finite, expected_shapes, hf
from .checkpoints.deepspeed import DeepSpeedCheckpoint, _find_yaml, looks_like_deepspeed
from .dtypes import DTYPES
from .tokenizer import TokenizerNotFoundError, checkpoint_dirs, find_tokenizer

TARGETS = {"keep": None, **{name: d.numpy for name, d in DTYPES.items()}}  # --dtype: the stored dtype
PROVENANCE_NAME = "conversion.json"
# Named in the folders a conversion keeps beside OUT (with its pid), so that a later run can tell whether
# their owner is still running; only characters that keep those names unambiguous.
_HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())


class ConvertError(Exception):
    """A conversion that cannot proceed (output exists, not writable, tokenizer unusable, ...)."""


@dataclasses.dataclass(frozen=True)
class ConversionResult:
    out_dir: Path
    parameters: int
    bytes: int
    seconds: float
    provenance: dict

    def summary(self) -> str:
        rate = self.bytes / 1e9 / max(self.seconds, 1e-9)
        return (f"converted {_count(self.parameters)} parameters ({self.bytes / 1e9:.2f} GB) in "
                f"{self.seconds:.1f} s ({rate:.2f} GB/s) -> {self.out_dir}")


def convert(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *,
            config: NeoXConfig | str | os.PathLike | None = None, tokenizer: str | os.PathLike | None = None,
            shard_bytes: int = 10**9, dtype: str = "keep", force: bool = False, progress: bool | None = None,
            log: Callable[[str], None] = lambda message: None) -> ConversionResult:
    """DeepSpeed checkpoint -> HF directory at `out_dir`, written beside it, verified, then renamed into place.

    `config`: a NeoXConfig, a NeoX YAML path, or None for the checkpoint's own `configs/*.yml`.
    `progress`: None shows a bar only on a terminal. Raises CheckpointError, ConfigError or ConvertError.
    An output that overlaps anything the conversion reads is refused before anything is written. On any
    failure or interrupt nothing is left at `out_dir` or beside it (a previous output replaced with `force`
    is put back); what a killed conversion left beside `out_dir` is removed by the next one.
    """
    start = time.perf_counter()
    if not os.fspath(out_dir):  # Path("") is ".", the current folder
        raise ConvertError("the output directory is an empty string: name the directory to create")
    if dtype not in TARGETS:
        raise ConvertError(f"--dtype must be one of {', '.join(TARGETS)}, got {dtype!r}")
    out_dir = _absolute(out_dir)
    if (Path(checkpoint) / "config.json").is_file() and not looks_like_deepspeed(checkpoint):
        raise ConvertError(f"{checkpoint} is already a Hugging Face directory (config.json); nothing to convert")
    ckpt = DeepSpeedCheckpoint(checkpoint, config)
    tokenizer_file = _find_tokenizer(ckpt, tokenizer, log)
    _refuse_overlap(out_dir, _sources(ckpt, config, tokenizer_file))
    _clean_leftovers(out_dir, log)
    _check_output(out_dir, force)
    stored_bytes = ckpt.validate()
    target = TARGETS[dtype]
    n_params = sum(int(np.prod(s)) for s in expected_shapes(ckpt.config).values())
    out_bytes = stored_bytes if target is None else n_params * target.itemsize
    _check_space(out_dir.parent, out_bytes)

    tmp = _make_temp_dir(out_dir)
    try:
        written, hashes = _write(ckpt, tmp, target, shard_bytes, progress)
        _verify(tmp, ckpt.config, written)
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, tmp / "tokenizer.json")
        seconds = time.perf_counter() - start
        provenance = {
            "tool": "neox_jax.convert",
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "source": {"path": str(ckpt.path.resolve()), "step_dir": str(ckpt.step_dir.resolve()),
                       "step": ckpt.step, "layout": ckpt.layout, "ranks": ckpt.ranks,
                       "config": ckpt.config_source},
            "input_files": hashes,
            "merge": ckpt.report.as_dict(),
            "config": dataclasses.asdict(ckpt.config),
            "output": {"dtype": ",".join(sorted({d for _, _, d, _ in written.values()})),
                       "parameters": n_params, "bytes": sum(b for *_, b in written.values()), "tensors": len(written),
                       "tokenizer": str(tokenizer_file.resolve()) if tokenizer_file else None,
                       "verified": "every tensor re-read from the written files: shape, dtype and crc32 match"},
            "seconds": round(seconds, 3),
        }
        (tmp / PROVENANCE_NAME).write_text(json.dumps(provenance, indent=2) + "\n")
        _apply_umask(tmp)
        _move_into_place(tmp, out_dir, force)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if _out_of_space(e):
            raise ConvertError(f"the disk is full: no space left on the filesystem of {out_dir.parent} while "
                               f"writing {out_dir} (the output needs {out_bytes / 1e9:.2f} GB); the partial "
                               f"output was removed") from None
        if isinstance(e, SafetensorError):
            raise ConvertError(f"writing {out_dir} failed: {e}") from None
        raise
    return ConversionResult(out_dir, n_params, provenance["output"]["bytes"], seconds, provenance)


def _write(ckpt: DeepSpeedCheckpoint, tmp: Path, target: np.dtype | None, shard_bytes: int,
           progress: bool | None) -> tuple[dict[str, tuple[int, tuple[int, ...], str, int]], dict[str, dict]]:
    """Stream the checkpoint into `tmp`.

    Returns (crc32, shape, dtype, bytes) per tensor and (size, sha256) per input file.
    """
    from tqdm import tqdm

    written: dict[str, tuple[int, tuple[int, ...], str, int]] = {}
    hashes: dict[str, dict] = {}
    bar = tqdm(total=len(ckpt.files), unit="file", desc="converting", file=sys.stderr,
               disable=None if progress is None else not progress)

    def on_file(file: Path) -> None:
        # Hashed right after it was read, while its pages are still cached.
        with open(file, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        hashes[str(file.relative_to(ckpt.path))] = {"bytes": file.stat().st_size, "sha256": digest}
        bar.update(1)

    def stream():
        for name, array in ckpt.tensors(on_file=on_file, dtype=target):
            if target is not None and array.dtype != target:
                with np.errstate(over="ignore"):  # reported below, by name
                    array = array.astype(target)
                check_finite(name, array, f"--dtype {target.name} cannot hold its values")
            written[name] = (_crc(array), array.shape, array.dtype.name, array.nbytes)
            yield name, array

    try:
        hf.write_hf(tmp, ckpt.config, stream(), shard_bytes=shard_bytes,
                    torch_dtype=None if target is None else target.name)
    finally:
        bar.close()
    return written, hashes


def _verify(out: Path, config: NeoXConfig, written: dict[str, tuple[int, tuple[int, ...], str, int]]) -> None:
    """Re-open the written directory and compare every tensor with what was written.

    HFCheckpoint checks config.json, the index and that every tensor is present; the tensors are then
    read one shard file at a time, closing each, so that its mapped pages do not accumulate.
    """
    reopened = hf.HFCheckpoint(out)
    if reopened.config != config:
        raise ConvertError(f"verification failed: {out}/config.json reads back as {reopened.config}, "
                           f"not {config}")
    weight_map = json.loads((out / hf.INDEX_NAME).read_text())["weight_map"]
    if set(weight_map) != set(written):
        raise ConvertError(f"verification failed: {out} holds {len(weight_map)} tensors, {len(written)} were written")
    for file in dict.fromkeys(weight_map.values()):
        with safe_open(out / file, "pt") as f:
            for name in f.keys():
                array = hf.torch_to_numpy(f.get_tensor(name))
                if (_crc(array), array.shape, array.dtype.name, array.nbytes) != written[name]:
                    raise ConvertError(f"verification failed: tensor {name!r} in {out / file} differs from "
                                       f"what was written")


def _apply_umask(directory: Path) -> None:
    """safetensors creates its files 0600; give every output file the usual umask-derived mode."""
    umask = os.umask(0o022)
    os.umask(umask)
    for f in directory.iterdir():
        os.chmod(f, 0o666 & ~umask)


def _crc(array: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(array).reshape(-1).view(np.uint8))


def _out_of_space(e: BaseException) -> bool:
    """Whether a write failed for lack of space or quota (safetensors reports I/O errors as text)."""
    if isinstance(e, OSError):
        code = e.errno
    elif isinstance(e, SafetensorError):
        m = re.search(r"\(os error (\d+)\)", str(e))
        code = int(m.group(1)) if m else None
    else:
        return False
    return code in (errno.ENOSPC, errno.EDQUOT)


def _absolute(out_dir: str | os.PathLike) -> Path:
    """OUT with its folder resolved, so that it has a name and a folder to keep the temporary one in ('.'
    has neither). A symlink at OUT itself is kept: `--force` replaces the link, not where it leads."""
    out_dir = Path(out_dir)
    if out_dir.name in ("", ".."):
        return out_dir.resolve()
    return out_dir.parent.resolve() / out_dir.name


def _sources(ckpt: DeepSpeedCheckpoint, config: NeoXConfig | str | os.PathLike | None,
             tokenizer_file: Path | None) -> list[tuple[str, Path]]:
    """Everything the conversion reads, narrowest first, each with what to call it in an error."""
    sources = [] if tokenizer_file is None else [("the tokenizer file", tokenizer_file)]
    if config is None:
        sources += [("the configs folder", f.parent) for f in _find_yaml(ckpt.step_dir)[:1]]
    elif not isinstance(config, NeoXConfig):
        sources.append(("the config file", Path(config)))
    return sources + [("the step folder", ckpt.step_dir), ("the checkpoint folder", ckpt.path)]


def _refuse_overlap(out_dir: Path, sources: list[tuple[str, Path]]) -> None:
    """Refuse an output that is, lies inside or contains a source: replacing it would destroy that source.

    Both OUT itself (a symlink there is what `--force` replaces) and where it leads are compared with the
    resolved sources. The error names the closest source: the innermost one OUT lies in, the outermost
    one it contains.
    """
    outs = dict.fromkeys((out_dir, out_dir.resolve()))
    resolved = [(role, source.resolve()) for role, source in sources]
    checks = (("is", resolved, lambda out, source: out == source),
              ("lies inside", resolved, lambda out, source: source in out.parents),
              ("contains", resolved[::-1], lambda out, source: out in source.parents))
    for how, candidates, overlaps in checks:
        for role, source in candidates:
            for out in outs:
                if overlaps(out, source):
                    where = out_dir if out == out_dir else f"{out_dir} (a link to {out})"
                    named = "" if out == source else f" {source}"
                    raise ConvertError(f"{where} {how} {role}{named}, which this conversion reads; a conversion "
                                       f"never writes over its source: choose another output directory")


def _check_output(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ConvertError(f"{out_dir} exists and is not a directory; --force replaces only an earlier output "
                           f"directory: remove it or choose another name")
    if not (out_dir.exists() or out_dir.is_symlink()):
        return
    if not force:
        raise ConvertError(f"{out_dir} already exists (use --force to replace it)")
    _check_replaceable(out_dir)


# What a conversion writes into OUT, and nothing else: `--force` replaces only a folder holding exactly these.
_OUTPUT_FILE = re.compile(rf"config\.json|tokenizer\.json|{re.escape(PROVENANCE_NAME)}|{re.escape(hf.INDEX_NAME)}"
                          rf"|model-\d{{5}}-of-\d{{5}}\.safetensors")


def _check_replaceable(out_dir: Path) -> None:
    """Refuse, before anything is touched, an OUT that `--force` must not replace: anything but an empty folder
    or an earlier conversion's output (its conversion.json marker, written by this tool, and only the files a
    conversion writes). A link at OUT must lead to such a folder; only the link is then replaced."""
    where = out_dir
    if out_dir.is_symlink():
        where = out_dir.resolve()
        if not where.is_dir():
            raise ConvertError(f"{out_dir} is a link to {where}, which is not an earlier output of this converter; "
                               f"--force replaces only an earlier output directory: remove it or choose another name")
    refuse = (f"--force replaces only an earlier output of neox_jax.convert (a folder holding its "
              f"{PROVENANCE_NAME}): remove it yourself or choose another output directory")
    shown = out_dir if where == out_dir else f"{out_dir} (a link to {where})"
    try:
        entries = sorted(where.iterdir())
    except OSError as e:
        raise ConvertError(f"{shown}: cannot list it ({e.strerror or e}); {refuse}") from None
    if not entries:
        return
    try:
        marker = json.loads((where / PROVENANCE_NAME).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        marker = None
    if not (isinstance(marker, dict) and marker.get("tool") == "neox_jax.convert"):
        found = ", ".join(e.name + ("/" if e.is_dir() else "") for e in entries[:5])
        more = f" and {len(entries) - 5} more" if len(entries) > 5 else ""
        raise ConvertError(f"{shown} is not an earlier conversion's output (no {PROVENANCE_NAME} written by "
                           f"neox_jax.convert; it holds {found}{more}); {refuse}")
    foreign = [e for e in entries if not (_OUTPUT_FILE.fullmatch(e.name) and e.is_file() and not e.is_symlink())]
    if foreign:
        found = ", ".join(e.name + ("/" if e.is_dir() else "") for e in foreign[:5])
        more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        raise ConvertError(f"{shown} holds an earlier conversion's output and also {found}{more}, which a "
                           f"conversion does not write; {refuse}")


def _sibling(out_dir: Path, kind: str) -> Path:
    """A new name beside `out_dir` for a folder this run owns: `.NAME.KIND-PID@HOST-TOKEN`."""
    return out_dir.parent / f".{out_dir.name}.{kind}-{os.getpid()}@{_HOST}-{secrets.token_hex(4)}"


def _clean_leftovers(out_dir: Path, log: Callable[[str], None]) -> None:
    """Remove the folders that conversions to `out_dir` killed outright (SIGKILL, power loss) left beside it.

    Only a folder whose owner is known to be dead is removed: one named with this host and a pid that no
    process has. A live owner's folder is left alone; one whose owner cannot be checked (another host on a
    shared filesystem, or an older version's name without a host) is reported instead. A previous output
    that a killed `--force` replacement had moved aside is put back first if nothing took its place.
    """
    pattern = re.compile(rf"\.{re.escape(out_dir.name)}\.(tmp|old)-([1-9]\d{{0,6}})(?:@(.+))?-[0-9a-f]+")
    try:
        siblings = sorted(out_dir.parent.iterdir())
    except OSError:  # no folder yet, so nothing left over
        return
    for leftover in siblings:
        m = pattern.fullmatch(leftover.name)
        if not m or leftover.is_symlink() or not leftover.is_dir():
            continue
        kind, pid, host = m.group(1), int(m.group(2)), m.group(3)
        if host != _HOST:
            log(f"warning: {leftover} may be left over from an interrupted conversion (pid {pid} on "
                f"{host or 'an unknown host'}); delete it if no conversion to {out_dir} is running there")
            continue
        if _running(pid):
            continue  # a conversion in progress, or the pid was reused: not ours to judge
        try:
            previous = leftover / "previous"
            if kind == "old" and (previous.exists() or previous.is_symlink()) and not (
                    out_dir.exists() or out_dir.is_symlink()):
                os.rename(previous, out_dir)
                log(f"restored {out_dir}, which an interrupted --force replacement (pid {pid}) had moved to "
                    f"{previous}")
            shutil.rmtree(leftover)
        except OSError as e:
            log(f"warning: could not remove {leftover}, left over from an interrupted conversion (pid {pid}): "
                f"{e.strerror or e}")
            continue
        log(f"removed leftover {leftover} from an interrupted conversion (pid {pid})")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _make_temp_dir(out_dir: Path) -> Path:
    """A fresh directory beside `out_dir`, so that the final rename stays on one filesystem.

    Not tempfile.mkdtemp: its mode 0700 would survive the rename and hide the model from other users.
    """
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = _sibling(out_dir, "tmp")
        tmp.mkdir()
        return tmp
    except OSError as e:
        raise ConvertError(f"cannot write the output beside {out_dir}: {e.strerror or e}") from None


def _check_space(parent: Path, needed: int) -> None:
    probe = next((p for p in (parent, *parent.parents) if p.exists()), None)
    if probe is None:
        return
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise ConvertError(f"not enough free space at {probe}: the output needs {needed / 1e9:.2f} GB, "
                           f"{free / 1e9:.2f} GB are free")


def _move_into_place(tmp: Path, out_dir: Path, force: bool) -> None:
    if not (out_dir.exists() or out_dir.is_symlink()):
        os.rename(tmp, out_dir)
        return
    if not force:  # appeared while we were converting
        raise ConvertError(f"{out_dir} already exists (use --force to replace it)")
    _check_replaceable(out_dir)  # again: it may have changed while we were converting
    # The previous output is moved aside, not deleted, until the new one is in place. If this process is
    # killed in between, the next conversion finds it in `old` and puts it back.
    old = _sibling(out_dir, "old")
    previous = old / "previous"
    old.mkdir()
    try:
        os.rename(out_dir, previous)
    except BaseException:
        old.rmdir()
        raise
    try:
        os.rename(tmp, out_dir)
    except BaseException as failure:
        try:
            os.rename(previous, out_dir)
        except OSError as e:
            raise ConvertError(f"could not move the new output to {out_dir}, nor put the previous one back "
                               f"({e.strerror or e}): it is in {previous}") from None
        old.rmdir()
        if isinstance(failure, OSError):
            raise ConvertError(f"could not move the new output to {out_dir} ({failure.strerror or failure}); "
                               f"the previous output is unchanged") from None
        raise
    shutil.rmtree(old, ignore_errors=True)  # what cannot be removed now, the next conversion removes


def _find_tokenizer(ckpt: DeepSpeedCheckpoint, given: str | os.PathLike | None,
                    log: Callable[[str], None]) -> Path | None:
    """The given tokenizer JSON, or the one beside the checkpoint (e.g. 20B_tokenizer.json), validated."""
    try:
        path = find_tokenizer(given, *checkpoint_dirs(ckpt))
    except TokenizerNotFoundError as e:  # several candidates: converting without one beats guessing
        log(f"warning: {e}; none copied, pass --tokenizer")
        return None
    except FileNotFoundError as e:
        raise ConvertError(str(e)) from None
    if path is None:
        log("warning: no tokenizer JSON beside the checkpoint; the output has none (pass --tokenizer)")
        return None
    from tokenizers import Tokenizer

    try:
        size = Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)
    except Exception as e:  # tokenizers raises its own exception types for every parse failure
        raise ConvertError(f"{path}: not a Hugging Face tokenizers JSON file ({str(e).splitlines()[0]})") from None
    if size > ckpt.config.vocab_size:
        raise ConvertError(f"{path}: the tokenizer has {size} tokens, more than the model's vocabulary "
                           f"({ckpt.config.vocab_size}): wrong tokenizer?")
    return path


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'4GB' -> 4e9, '500MiB' -> 500 * 2**20 (decimal units as transformers' max_shard_size)."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4GB, 500MB, 2GiB)")
    number, unit = float(m.group(1)), (m.group(2) or "b").lower().rstrip("b")
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
             "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}[unit]
    size = int(number * scale)
    if size <= 0:
        raise argparse.ArgumentTypeError(f"the shard size must be positive, got {text!r}")
    return size


def _count(n: int) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f}{suffix}"
    return str(n)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m neox_jax.convert",
        description="Convert a GPT-NeoX DeepSpeed checkpoint (GPT-NeoX-20B slim weights, Pythia NeoX checkpoints)\n"
                    "into a Hugging Face GPT-NeoX directory that transformers' GPTNeoXForCausalLM.from_pretrained\n"
                    "and neox_jax read. Tensor-parallel ranks are merged, every tensor is checked against the\n"
                    "model config, and the result is written beside OUT_DIR, verified, then renamed into place.",
        epilog="examples:\n"
               "  python -m neox_jax.convert 20B_checkpoints/ gpt-neox-20b-hf/\n"
               "  python -m neox_jax.convert 20B_checkpoints/global_step150000 out/ --preset gpt-neox-20b \\\n"
               "      --tokenizer 20B_tokenizer.json --dtype float16 --shard-size 2GB\n\n"
               "The output holds config.json, model-XXXXX-of-YYYYY.safetensors, model.safetensors.index.json,\n"
               "tokenizer.json (when one is found or given) and conversion.json (provenance: source, step,\n"
               "sha256 of every input file, how ranks were merged). Exit status 2 on any usage or data error.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="CHECKPOINT_DIR",
                   help="the step folder (global_stepN/, holding layer_XX-model_YY-model_states.pt) or its "
                        "parent (with a 'latest' file naming the step)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="the Hugging Face directory to create")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--config", metavar="YAML",
                        help="the GPT-NeoX training YAML (e.g. 20B.yml); default: configs/*.yml beside or "
                             "above the checkpoint")
    source.add_argument("--preset", choices=sorted(PRESETS), help="a built-in model config instead of a YAML")
    p.add_argument("--tokenizer", metavar="FILE",
                   help="tokenizer JSON to copy as tokenizer.json; default: *tokenizer*.json beside the checkpoint")
    p.add_argument("--shard-size", type=parse_size, default=parse_size("1GB"), metavar="SIZE",
                   help="largest safetensors shard; the writer holds one shard in memory "
                        "(default 1GB, as the published 20B; units kB/MB/GB or KiB/MiB/GiB)")
    p.add_argument("--dtype", choices=list(TARGETS), default="keep",
                   help="dtype of the written weights (default: keep the checkpoint's)")
    p.add_argument("--force", action="store_true",
                   help="replace OUT_DIR if it is an earlier output of this converter (it holds our conversion.json "
                        "and only the files a conversion writes) or an empty folder; anything else is refused")
    return p


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the conversion is, so that it cleans up as on Ctrl-C."""


def _terminate(signum, frame):
    raise _Terminated


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = PRESETS[args.preset] if args.preset else args.config

    def log(message: str) -> None:
        print(message, file=sys.stderr)

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        result = convert(args.checkpoint, args.out_dir, config=config, tokenizer=args.tokenizer,
                         shard_bytes=args.shard_size, dtype=args.dtype, force=args.force, log=log)
    except (CheckpointError, ConfigError, ConvertError, OSError) as e:  # OSError: e.g. the disk filled up
        log(f"error: {e}")
        return 2
    except KeyboardInterrupt as e:
        terminated = isinstance(e, _Terminated)
        log(f"error: {'terminated' if terminated else 'interrupted'}; nothing was written to {args.out_dir}")
        return 128 + signal.SIGTERM if terminated else 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(result.summary())
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # libraries loaded: an interrupt now cleans up
    status = main()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # done: Ctrl-C now would only interrupt the interpreter's exit
    sys.exit(status)
