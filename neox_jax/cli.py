"""What every command shares: a usage mistake is one `error:` line and exit status 2; Ctrl-C exits with 130."""

from __future__ import annotations

import argparse
import os
import signal
import sys

INTERRUPTED = 130  # 128 + SIGINT, as shells report it


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (argparse prints the usage block, then `prog: error:`)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of every command that loads a model to run it (generate, serve): where the model comes from
    and how it is held. The choices are imported here, so that importing this module stays cheap."""
    from .config import PRESETS
    from .dtypes import NAMES
    from .quantize import NAMES as QUANTIZE_NAMES

    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="checkpoint directory (Hugging Face layout or DeepSpeed shards), or a Hugging "
                                     "Face hub id such as EleutherAI/pythia-410m (its cache: HF_HOME, HF_HUB_OFFLINE)")
    src.add_argument("--demo", action="store_true",
                     help="no files needed: pydocs-target, a small GPT-NeoX trained here on the Python documentation and "
                          "shipped in the package (docs/training.md)")
    p.add_argument("--revision", help="with a hub id: branch, tag or commit (e.g. Pythia's step143000; default main)")
    p.add_argument("--tokenizer", help="tokenizer JSON (default: the model's tokenizer.json, else its one "
                                       "*tokenizer*.json, e.g. 20B_tokenizer.json beside DeepSpeed shards)")
    config = p.add_mutually_exclusive_group()
    config.add_argument("--config", help="NeoX YAML for DeepSpeed shards without configs/*.yml beside them")
    config.add_argument("--preset", choices=sorted(PRESETS), help="a known config for DeepSpeed shards")
    p.add_argument("--dtype", choices=NAMES,
                   help="compute dtype (default: float16 on GPU, float32 on CPU)")
    p.add_argument("--quantize", choices=QUANTIZE_NAMES,
                   help="store every matmul weight as int8 (or fp8 e4m3) with a scale per output channel, "
                        "quantized while loading: a quarter of fp32's bytes, half of fp16's. int8-dynamic: int8's "
                        "weights, and each matmul quantizes its activations to int8 per row too (int8 x int8 sums; "
                        "faster on CPU at batch > 1, less exact) (docs/quantization.md)")
    p.add_argument("--rotary-dtype", choices=NAMES,
                   help="precision of the rotary angle tables (default: the model dtype, fp32 for bf16)")
    p.add_argument("--mesh", help="split the model over devices: model=N[,data=M] (default: one device, or all "
                                  "local devices on 'model' when the weights do not fit on one)")
    p.add_argument("--tp-exact", action="store_true",
                   help="DeepSpeed shards only: keep every tensor-parallel rank's LayerNorm copies and row-parallel "
                        "biases and compute as the ranks did in training, instead of merging them (the mesh's "
                        "model size must divide the rank count; see docs/conversion.md)")


def exit_on_interrupt() -> None:
    """From now on Ctrl-C ends the process at once with status 130.

    Unwinding a KeyboardInterrupt while XLA's threads still run a computation, then finalizing the
    interpreter under them, ends about one run in seven in "pure virtual method called" or a segfault:
    `os._exit` skips both. Only for commands with nothing to clean up."""
    signal.signal(signal.SIGINT, _exit_interrupted)


def _exit_interrupted(signum, frame) -> None:
    try:
        sys.stdout.flush()  # what was generated so far
    except Exception:  # e.g. interrupted in the middle of a write to the same buffer
        pass
    os.write(2, b"\ninterrupted\n")
    os._exit(INTERRUPTED)
