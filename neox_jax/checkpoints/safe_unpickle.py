"""Reading PyTorch pickles (`.pt` files) without letting them run code, and saying why one is refused.

torch's weights-only unpickler does the loading; when it refuses a file, the file's pickle opcodes are
decoded (never executed) to name the globals it would have imported.
"""

from __future__ import annotations

import pickle
import pickletools
import re
import zipfile
from pathlib import Path
from typing import Any, Iterator

import torch

from .stream import CheckpointError


class _Inert:
    """Stands in for any non-tensor object in a sequential-layout file (args, optimizer state): it accepts
    whatever the pickle hands it and does nothing, so the real class is never imported or called."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def load_weights_only(file: Path, *, inert_globals: bool = False) -> Any:
    """torch.load restricted to tensors and plain containers; `inert_globals` maps other classes to `_Inert`.

    A file torch refuses is reported as one that would run code when its pickle imports anything beyond
    torch's tensor types (torch itself says "unsupported operand" for pickle protocols above 2, whatever
    they hold), else as damaged.
    """
    try:
        is_zip = zipfile.is_zipfile(file)
        stubs = []
        if inert_globals and is_zip:
            stubs = [(_Inert, name) for name in torch.serialization.get_unsafe_globals_in_checkpoint(file)]
        with torch.serialization.safe_globals(stubs):
            return torch.load(file, map_location="cpu", weights_only=True, mmap=is_zip)
    except Exception as e:  # torch.load fails in many ways (UnpicklingError, RuntimeError, EOFError...) on bad bytes
        code = unsafe_globals(file)
        if code:
            raise CheckpointError(f"{file}: refused to unpickle: loading it would run code (it calls "
                                  f"{', '.join(code)}); a checkpoint of weights holds only tensors") from None
        # torch's message is long advice around one line naming the offending global or opcode. The advice
        # to load with weights_only=False (or to allowlist the global) is dropped: for a checkpoint of
        # weights, running its code is never the fix.
        lines = [line.strip() for line in str(e).splitlines() if line.strip() and "weights_only" not in line]
        refused = next((line for line in lines if re.search(r"GLOBAL|global|reduce|Can only|blocked", line)
                        and "Weights only load failed" not in line), None)
        if isinstance(e, pickle.UnpicklingError) and refused:
            refused = refused.removeprefix("WeightsUnpickler error: ").split(" Please use")[0]
            raise CheckpointError(f"{file}: refused to unpickle: the file holds objects other than tensors, "
                                  f"which could run code when loaded ({refused})") from None
        detail = next((line for line in lines if "WeightsUnpickler error" not in line and "Weights only" not in line
                       and "file an issue" not in line), _first_line(e))
        raise CheckpointError(f"{file}: truncated or corrupt checkpoint file ({detail})") from None


_STRING_OPCODES = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "SHORT_BINUNICODE", "BINUNICODE",
                   "BINUNICODE8"}


def unsafe_globals(file: Path) -> list[str]:
    """The globals (`module.name`) beyond torch's tensor types that `file`'s pickle imports, found by decoding
    its opcodes with pickletools: nothing is imported or run.

    Reads torch's zip format (`data.pkl`), the legacy one (whose object is its fourth pickle, after the magic
    number, protocol version and system info) and a plain pickle, up to the first byte it cannot decode.
    """
    found: set[str] = set()
    try:
        if zipfile.is_zipfile(file):
            with zipfile.ZipFile(file) as archive:
                data = next(name for name in archive.namelist() if name.endswith("data.pkl"))
                with archive.open(data) as f:
                    found.update(_imported_globals(f))
        else:
            with open(file, "rb") as f:
                for _ in range(4):
                    found.update(_imported_globals(f))
    except Exception:  # undecodable bytes end the scan: what was found so far is the answer
        pass
    allowed = {*torch._weights_only_unpickler._get_allowed_globals(),
               *torch._weights_only_unpickler._get_user_allowed_globals()}
    return sorted(found - allowed)


def _imported_globals(f) -> Iterator[str]:
    """`module.name` of each global one pickle in `f` imports (GLOBAL, INST, STACK_GLOBAL), as it is decoded."""
    pushed, memo = [], {}  # strings the opcodes pushed (None: anything else), to name STACK_GLOBAL's operands
    for op, arg, _ in pickletools.genops(f):
        if op.name in ("GLOBAL", "INST"):
            yield arg.replace(" ", ".")
        elif op.name == "STACK_GLOBAL":
            module, name = ([None, None] + pushed)[-2:]
            yield f"{module or '?'}.{name or '?'}"
        if op.name == "MEMOIZE":
            memo[len(memo)] = pushed[-1] if pushed else None
        elif op.name.endswith("PUT"):
            memo[arg] = pushed[-1] if pushed else None
        elif op.name.endswith("GET"):
            pushed.append(memo.get(arg))
        elif op.name not in ("PROTO", "FRAME", "STOP"):
            pushed.append(arg if op.name in _STRING_OPCODES else None)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
