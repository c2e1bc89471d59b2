"""Train a GPT-NeoX model from scratch (or on from a checkpoint) with the inference code's own `NeoX` module.

    python -m neox_jax.corpus corpus/                     # the Python documentation as JSON Lines
    python -m neox_jax.train --corpus corpus/ --out runs/target --tokenizer 20B_tokenizer.json \\
        --layers 6 --hidden 128 --heads 4 --steps 300     # Ctrl-C saves; the same command resumes

The loss is the mean next-token cross-entropy in fp32: the model runs in fp32 (`NeoX(dtype=float32)`, the
numerics of `neox_jax.model`) and `jax.grad` differentiates exactly the function inference computes.
AdamW (optax) with linear warm-up and cosine decay, the global gradient norm clipped; weight decay on the
matmul weights and the embedding only (not on biases and LayerNorms), by each parameter's kind in
`neox_jax.params`.

Data: every document is tokenized, ended with <|endoftext|>, and the documents concatenated (GPT-NeoX's
packing); the stream is cut into windows of `context + 1` tokens overlapping by one. The windows of sample
`i = step * batch + row` come from a permutation of all windows seeded by (seed, epoch), so the batch of
any step is a function of the seed and the step alone: a resumed run sees exactly the data, in exactly the
order, that an uninterrupted one would.

Output directory:
- `step-NNNNNN/`: a checkpoint, a Hugging Face GPT-NeoX directory in fp32 (config.json, safetensors,
  tokenizer.json) plus `optimizer.safetensors` and `trainer_state.json`; `load()` and transformers read it.
  Written under a temporary name and renamed, then named in `latest` (replaced atomically): a crash at any
  moment leaves the previous checkpoint whole. The newest `--keep` are kept.
- `final/`: the last step's weights in fp16, what is shipped; `log.jsonl`: a line per step and per
  evaluation (loss, learning rate, tokens, seconds); `settings.json`: what a resumed run must agree with.

Ctrl-C or SIGTERM: the step under way finishes, a checkpoint is written, the exit status is 130 (143).
Run the same command again to resume from `latest`.
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from .cli import ArgumentParser

CHECKPOINT_PREFIX = "step-"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"
SETTINGS_FILE = "settings.json"
LOG_FILE = "log.jsonl"
LATEST = "latest"
FINAL = "final"
PADDED_VOCAB = 50304  # the 20B tokenizer's 50277 ids padded to a multiple of 128, as Pythia does


class TrainError(ValueError):
    """Bad settings or files for training: one line naming the setting or file."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that decides the trained weights. A resumed run must agree with the stored copy."""

    corpus: str
    tokenizer: str
    model: dict  # NeoXConfig fields
    init: str | None  # a checkpoint to start from (None: random, seeded)
    steps: int
    batch: int
    context: int
    lr: float
    min_lr_ratio: float
    warmup: int
    weight_decay: float
    clip: float
    seed: int


# ---- data ----

def token_stream(texts: Iterable[str], tokenizer) -> np.ndarray:
    """The documents' tokens, each document ended with <|endoftext|>, concatenated: int32 [N]."""
    eos = tokenizer.eos_id
    if eos is None:
        raise TrainError("the tokenizer has no <|endoftext|> token to end documents with")
    parts = [np.asarray(tokenizer.encode(text) + [eos], np.int32) for text in texts]
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)


def windows(stream: np.ndarray, context: int) -> np.ndarray:
    """[W, context + 1] windows of the stream, each starting where the previous one's inputs end."""
    count = (len(stream) - 1) // context
    index = np.arange(count)[:, None] * context + np.arange(context + 1)
    return stream[index]


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, count: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(count)


def batch_rows(step: int, batch: int, count: int, seed: int) -> np.ndarray:
    """The window indices of step `step`'s batch: samples step*batch.., each epoch a fresh seeded permutation."""
    samples = step * batch + np.arange(batch)
    return np.array([_epoch_order(seed, int(i // count), count)[i % count] for i in samples])


def eval_rows(count: int, wanted: int) -> np.ndarray:
    """`wanted` held-out windows spread evenly over the held-out text (all of it if fewer)."""
    return np.unique(np.linspace(0, count - 1, min(wanted, count)).round().astype(int))


# ---- the model, its loss and its optimizer ----

def decay_mask(params: dict) -> dict:
    """True for the leaves weight decay applies to: matmul weights and the embedding."""
    import jax

    from .params import Kind, spec_at

    return jax.tree_util.tree_map_with_path(
        lambda path, _: spec_at(tuple(k.key for k in path)).kind in (Kind.MATMUL, Kind.EMBEDDING), params)


def optimizer(s: Settings):
    import optax

    schedule = optax.warmup_cosine_decay_schedule(0.0, s.lr, s.warmup, s.steps, end_value=s.lr * s.min_lr_ratio)
    return optax.chain(optax.clip_by_global_norm(s.clip),
                       optax.adamw(schedule, b1=0.9, b2=0.95, eps=1e-8, weight_decay=s.weight_decay,
                                   mask=decay_mask)), schedule


def loss_fn(module, params, batch):
    """Mean next-token cross-entropy (fp32) of [B, T + 1] windows: the model sees [:, :-1], predicts [:, 1:]."""
    import jax.numpy as jnp
    import optax

    tokens, targets = batch[:, :-1], batch[:, 1:]
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    logits = module.apply({"params": params}, tokens, positions).logits  # fp32 [B, T, V]
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


class Trainer:
    """The compiled training and evaluation steps of one model under one set of settings."""

    def __init__(self, config, settings: Settings):
        import jax
        import jax.numpy as jnp

        from .model import NeoX

        self.config = config
        self.settings = settings
        self.module = NeoX(config, jnp.float32)
        self.tx, self.schedule = optimizer(settings)
        loss = functools.partial(loss_fn, self.module)

        def train_step(params, opt_state, batch):
            value, grads = jax.value_and_grad(loss)(params, batch)
            updates, opt_state = self.tx.update(grads, opt_state, params)
            return jax.tree.map(jnp.add, params, updates), opt_state, value

        self.train_step = jax.jit(train_step, donate_argnums=(0, 1))
        self.eval_loss = jax.jit(loss)

    def init_params(self, seed: int) -> dict:
        import jax
        import jax.numpy as jnp

        tokens = jnp.zeros((1, 2), jnp.int32)
        positions = jnp.arange(2, dtype=jnp.int32)[None]
        return jax.jit(self.module.init)(jax.random.PRNGKey(seed), tokens, positions)["params"]

    def evaluate(self, params, held_out: np.ndarray) -> float:
        """Mean loss over the held-out windows, in batches of the training batch size (token-weighted)."""
        total, size = 0.0, self.settings.batch
        for start in range(0, len(held_out), size):
            chunk = held_out[start:start + size]
            total += float(self.eval_loss(params, chunk)) * len(chunk)
        return total / len(held_out)


# ---- checkpoints ----

def stored_tensors(config, params: dict, dtype=np.float32) -> Iterator[tuple[str, np.ndarray]]:
    """The params as the canonical stream (Hugging Face names, stored shapes), cast to `dtype`."""
    from .params import model_params

    for spec in model_params(config):
        leaf = params
        for key in spec.tree_path:
            leaf = leaf[key]
        array = np.asarray(leaf, np.float32).reshape(spec.stored_shape(config))
        with np.errstate(over="raise"):
            yield spec.hf_name, array.astype(dtype)


def _fsync_tree(directory: Path) -> None:
    for path in directory.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_directory(final: Path, fill: Callable[[Path], None]) -> None:
    """Create directory `final` by `fill(tmp)` into a temporary sibling, then rename: never half-written.
    An existing `final` is replaced (moved aside first, deleted after the rename)."""
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
        _fsync_tree(tmp)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def write_model(directory: Path, config, params: dict, tokenizer_path: Path, dtype, metadata: dict) -> None:
    """A Hugging Face GPT-NeoX directory of `params` in `dtype` (contents of an already created directory)."""
    from .checkpoints.hf import write_hf

    torch_dtype = np.dtype(dtype).name
    write_hf(directory, config, stored_tensors(config, params, dtype), torch_dtype=torch_dtype,
             metadata={k: str(v) for k, v in metadata.items()})
    shutil.copyfile(tokenizer_path, directory / "tokenizer.json")


def save_checkpoint(out: Path, trainer: Trainer, params, opt_state, state: dict, tokenizer_path: Path,
                    keep: int) -> Path:
    import jax
    from safetensors.numpy import save_file

    step = state["step"]
    final = out / f"{CHECKPOINT_PREFIX}{step:06d}"

    def fill(tmp: Path) -> None:
        write_model(tmp, trainer.config, params, tokenizer_path, np.float32, {"step": step})
        leaves = jax.tree.leaves(opt_state)
        save_file({f"{i:05d}": np.asarray(leaf) for i, leaf in enumerate(leaves)}, str(tmp / OPTIMIZER_FILE))
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")

    write_directory(final, fill)
    replace_text(out / LATEST, final.name + "\n")
    for old in sorted(out.glob(f"{CHECKPOINT_PREFIX}[0-9]*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def replace_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_params(path: Path, config=None) -> tuple[Any, dict]:
    """(config, fp32 params) of any checkpoint `load()` reads."""
    import jax.numpy as jnp

    from .checkpoints import open_checkpoint
    from .weights import build_params

    checkpoint = open_checkpoint(path)
    return checkpoint.config, build_params(checkpoint.config, checkpoint.tensors(), jnp.float32, progress=False)


def load_checkpoint(directory: Path, trainer: Trainer, params_template) -> tuple[dict, Any, dict]:
    """(params, optimizer state, trainer state) of a checkpoint this tool wrote."""
    import jax
    import jax.numpy as jnp
    from safetensors.numpy import load_file

    config, params = load_params(directory)
    if config != trainer.config:
        raise TrainError(f"{directory}: its config.json describes another model than the settings")
    template = trainer.tx.init(params_template)
    leaves, treedef = jax.tree.flatten(template)
    stored = load_file(str(directory / OPTIMIZER_FILE))
    if len(stored) != len(leaves):
        raise TrainError(f"{directory / OPTIMIZER_FILE}: {len(stored)} tensors, the optimizer has {len(leaves)}")
    restored = []
    for i, leaf in enumerate(leaves):
        value = stored[f"{i:05d}"]
        if value.shape != leaf.shape or value.dtype != leaf.dtype:
            raise TrainError(f"{directory / OPTIMIZER_FILE}: tensor {i:05d} is {value.dtype}{list(value.shape)}, "
                             f"expected {leaf.dtype}{list(leaf.shape)}")
        restored.append(jnp.asarray(value))
    state = json.loads((directory / STATE_FILE).read_text())
    return params, jax.tree.unflatten(treedef, restored), state


def latest_checkpoint(out: Path) -> Path | None:
    if not (out / LATEST).exists():
        return None
    directory = out / (out / LATEST).read_text().strip()
    if not (directory / STATE_FILE).is_file():
        raise TrainError(f"{out / LATEST} names {directory.name}, which is not a complete checkpoint")
    return directory


# ---- the run ----

class StopRequest:
    """SIGINT and SIGTERM ask the loop to stop after the current step (and save); a second one exits at once."""

    def __init__(self):
        self.signum: int | None = None

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def handle(self, signum, frame):
        if self.signum is not None:
            os.write(2, b"\ninterrupted again: exiting without saving (the last checkpoint is whole)\n")
            os._exit(128 + signum)
        self.signum = signum
        os.write(2, b"\nstopping after this step to save a checkpoint (again to exit at once)\n")


def read_corpus(directory: Path, split: str) -> list[str]:
    from .corpus import read_jsonl

    path = directory / f"{split}.jsonl"
    if not path.is_file():
        raise TrainError(f"{path}: no such file (build the corpus with python -m neox_jax.corpus)")
    return read_jsonl(path)


def append_log(out: Path, record: dict) -> None:
    with open(out / LOG_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_log(out: Path, step: int) -> None:
    """Drop the log lines of steps after the checkpoint resumed from (a run killed without saving)."""
    path = out / LOG_FILE
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        replace_text(path, "".join(line + "\n" for line in lines))


def check_settings(out: Path, settings: Settings) -> None:
    """Store the settings on a new run; on a resumed one refuse any that differ, by name."""
    path = out / SETTINGS_FILE
    current = dataclasses.asdict(settings)
    if not path.exists():
        replace_text(path, json.dumps(current, indent=2) + "\n")
        return
    stored = json.loads(path.read_text())
    for key, value in current.items():
        if stored.get(key) != value:
            raise TrainError(f"{out} was trained with {key} = {stored.get(key)!r}, not {value!r}: resume with the "
                             f"same settings, or give a new --out")


def train(settings: Settings, out: Path, *, eval_every: int, eval_windows: int, save_every: int, keep: int,
          progress: bool = True, log: Callable[[str], None] = print) -> int:
    """Run (or resume) training to `settings.steps`; returns the exit status (128 + signal when stopped)."""
    import jax
    from tqdm.auto import tqdm

    from .config import NeoXConfig
    from .tokenizer import load_tokenizer

    tokenizer_path = Path(settings.tokenizer)
    tokenizer = load_tokenizer(tokenizer_path)
    config = NeoXConfig(**settings.model)
    if tokenizer.vocab_size > config.vocab_size:
        raise TrainError(f"the tokenizer has {tokenizer.vocab_size} tokens, more than vocab_size "
                         f"{config.vocab_size}")
    corpus = Path(settings.corpus)
    train_windows = windows(token_stream(read_corpus(corpus, "train"), tokenizer), settings.context)
    held_out = windows(token_stream(read_corpus(corpus, "heldout"), tokenizer), settings.context)
    if len(train_windows) < 1 or len(held_out) < 1:
        raise TrainError(f"{corpus}: the training and held-out texts need at least {settings.context + 1} "
                         f"tokens each (--context {settings.context})")
    held_out = held_out[eval_rows(len(held_out), eval_windows)]
    out.mkdir(parents=True, exist_ok=True)
    lock = open(out / ".lock", "w")  # held until the process exits: one run per directory at a time
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise TrainError(f"{out}: another training process is using this directory") from None
    check_settings(out, settings)
    for stale in out.glob(".*.tmp-*"):  # left by a process killed while writing (the lock excludes a live one)
        shutil.rmtree(stale, ignore_errors=True)

    trainer = Trainer(config, settings)
    if settings.init:
        init_config, params = load_params(Path(settings.init))
        if init_config != config:
            raise TrainError(f"{settings.init}: its config differs from the model settings")
    else:
        params = trainer.init_params(settings.seed)
    resume = latest_checkpoint(out)
    if resume is not None:
        params, opt_state, state = load_checkpoint(resume, trainer, params)
        truncate_log(out, state["step"])
        log(f"resuming from {resume} (step {state['step']} of {settings.steps})")
    else:
        opt_state = trainer.tx.init(params)
        state = {"step": 0, "tokens": 0, "seconds": 0.0}
        if (out / LOG_FILE).exists():
            (out / LOG_FILE).unlink()
    tokens_per_step = settings.batch * settings.context

    def save() -> Path:
        return save_checkpoint(out, trainer, params, opt_state, state, tokenizer_path, keep)

    with StopRequest() as stop, tqdm(total=settings.steps, initial=state["step"], desc="training", unit="step",
                                     disable=not progress, dynamic_ncols=True) as bar:
        rate = None
        while state["step"] < settings.steps:
            step = state["step"]
            batch = train_windows[batch_rows(step, settings.batch, len(train_windows), settings.seed)]
            started = time.perf_counter()
            params, opt_state, loss = trainer.train_step(params, opt_state, batch)
            loss = float(loss)
            seconds = time.perf_counter() - started
            if not math.isfinite(loss):
                log(f"error: the loss is {loss} at step {step + 1}; nothing saved past step {step} "
                    f"(try a lower --lr)")
                return 1
            state = {"step": step + 1, "tokens": state["tokens"] + tokens_per_step,
                     "seconds": state["seconds"] + seconds}
            lr = float(trainer.schedule(step))
            append_log(out, {"step": state["step"], "loss": loss, "lr": lr, "tokens": state["tokens"],
                             "seconds": round(state["seconds"], 3)})
            rate = tokens_per_step / seconds if rate is None else 0.9 * rate + 0.1 * tokens_per_step / seconds
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{rate:.0f}")
            done = state["step"] == settings.steps
            if state["step"] % eval_every == 0 or done:
                eval_loss = trainer.evaluate(params, held_out)
                append_log(out, {"step": state["step"], "eval_loss": eval_loss})
                bar.write(f"step {state['step']}: held-out loss {eval_loss:.4f}, perplexity {math.exp(eval_loss):.1f}")
            if stop.signum is not None:
                path = save()
                log(f"stopped at step {state['step']}: saved {path}; run the same command to resume")
                return 128 + stop.signum
            if state["step"] % save_every == 0 or done:
                save()
        write_directory(out / FINAL, lambda tmp: write_model(
            tmp, config, params, tokenizer_path, np.float16,
            {"step": state["step"], "tokens": state["tokens"], "corpus": Path(settings.corpus).name}))
    log(f"trained {state['step']} steps ({state['tokens']:,} tokens, {state['seconds'] / 60:.1f} min of steps); "
        f"fp16 weights in {out / FINAL}")
    return 0


def parse_args(argv=None):
    from .tokenizer import find_tokenizer

    p = ArgumentParser(prog="python -m neox_jax.train", description=__doc__.split("\n\n")[0],
                       epilog="The same command resumes an interrupted run from OUT/latest; settings that "
                              "change the weights must then be the same (OUT/settings.json).")
    p.add_argument("--corpus", type=Path, required=True, help="directory with train.jsonl and heldout.jsonl "
                                                              "(python -m neox_jax.corpus)")
    p.add_argument("--out", type=Path, required=True, help="run directory: checkpoints, log, final fp16 model")
    p.add_argument("--tokenizer", help="tokenizer.json (default: $NEOX_TOKENIZER; with --init, the checkpoint's)")
    shape = p.add_argument_group("model (from scratch)")
    shape.add_argument("--layers", type=int, default=6, help="transformer layers (default 6)")
    shape.add_argument("--hidden", type=int, default=128, help="hidden size (default 128)")
    shape.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    shape.add_argument("--intermediate", type=int, help="MLP width (default 4 x hidden)")
    shape.add_argument("--vocab-size", type=int, default=PADDED_VOCAB,
                       help=f"embedding rows (default {PADDED_VOCAB}: the 20B tokenizer padded as Pythia does)")
    shape.add_argument("--untied", action="store_true",
                       help="a separate output matrix (default: the output head is the input embedding, "
                            "tie_word_embeddings, which halves a small model's size)")
    p.add_argument("--init", type=Path, help="start from this checkpoint (any that load() reads) instead of "
                                             "random weights; its config replaces the model flags")
    run = p.add_argument_group("optimization")
    run.add_argument("--steps", type=int, default=1000, help="optimizer steps (default 1000)")
    run.add_argument("--batch", type=int, default=8, help="windows per step (default 8)")
    run.add_argument("--context", type=int, default=256, help="tokens per window (default 256)")
    run.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    run.add_argument("--min-lr-ratio", type=float, default=0.1, help="final / peak learning rate (default 0.1)")
    run.add_argument("--warmup", type=int, default=50, help="warm-up steps (default 50)")
    run.add_argument("--weight-decay", type=float, default=0.1, help="AdamW's, on matmuls and the embedding")
    run.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip (default 1.0)")
    run.add_argument("--seed", type=int, default=0, help="initialisation and data order (default 0)")
    book = p.add_argument_group("bookkeeping (free to change on resume)")
    book.add_argument("--eval-every", type=int, default=100, help="steps between held-out evaluations")
    book.add_argument("--eval-windows", type=int, default=32, help="held-out windows evaluated (default 32)")
    book.add_argument("--save-every", type=int, default=100, help="steps between checkpoints (default 100)")
    book.add_argument("--keep", type=int, default=2, help="checkpoints kept (default 2)")
    book.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)

    for name in ("steps", "batch", "eval_every", "eval_windows", "save_every", "keep", "layers", "hidden",
                 "heads", "vocab_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} = {getattr(args, name)}: expected a positive integer")
    if args.context < 2:
        p.error(f"--context = {args.context}: expected at least 2 tokens")
    for name, low, high in (("lr", 0.0, 1.0), ("min_lr_ratio", 0.0, 1.0), ("weight_decay", 0.0, 1.0),
                            ("clip", 0.0, math.inf)):
        value = getattr(args, name)
        if not (low <= value <= high and math.isfinite(value)) or (name in ("lr", "clip") and value == 0):
            p.error(f"--{name.replace('_', '-')} = {value}: expected a number in ({low}, {high}]")
    if not 0 <= args.warmup < args.steps:
        p.error(f"--warmup = {args.warmup}: expected 0 <= warmup < --steps ({args.steps})")
    if args.init is not None:
        given = [flag for flag in ("layers", "hidden", "heads", "intermediate", "vocab_size", "untied")
                 if getattr(args, flag) != p.get_default(flag)]
        if given:
            p.error(f"--init takes its model from the checkpoint: drop --{given[0].replace('_', '-')}")
    tokenizer = args.tokenizer or os.environ.get("NEOX_TOKENIZER")
    if tokenizer is None and args.init is not None:
        tokenizer = find_tokenizer(None, args.init)
    if tokenizer is None:
        p.error("no tokenizer: give --tokenizer FILE (the 20B tokenizer.json) or set NEOX_TOKENIZER")
    if not Path(tokenizer).is_file():
        p.error(f"--tokenizer {tokenizer}: no such file")
    args.tokenizer = str(Path(tokenizer).resolve())
    return args


def settings_of(args) -> Settings:
    from .config import NeoXConfig

    if args.init is not None:
        config = load_config(args.init)
        if config.max_position_embeddings < args.context:
            raise TrainError(f"{args.init}: max_position_embeddings {config.max_position_embeddings} is below "
                             f"--context {args.context}")
    else:
        config = NeoXConfig(vocab_size=args.vocab_size, hidden_size=args.hidden, num_layers=args.layers,
                            num_heads=args.heads, intermediate_size=args.intermediate or 4 * args.hidden,
                            max_position_embeddings=args.context, tie_word_embeddings=not args.untied)
    return Settings(corpus=str(args.corpus.resolve()), tokenizer=args.tokenizer, model=dataclasses.asdict(config),
                    init=None if args.init is None else str(args.init.resolve()), steps=args.steps,
                    batch=args.batch, context=args.context, lr=args.lr, min_lr_ratio=args.min_lr_ratio,
                    warmup=args.warmup, weight_decay=args.weight_decay, clip=args.clip, seed=args.seed)


def load_config(path: Path):
    from .checkpoints import open_checkpoint

    return open_checkpoint(path).config


def main(argv=None) -> int:
    args = parse_args(argv)
    from .checkpoints import CheckpointError
    from .config import ConfigError

    try:
        settings = settings_of(args)
        return train(settings, args.out, eval_every=args.eval_every, eval_windows=args.eval_windows,
                     save_every=args.save_every, keep=args.keep, progress=not args.no_progress,
                     log=lambda message: print(message, file=sys.stderr))
    except (TrainError, CheckpointError, ConfigError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before the training loop, which handles Ctrl-C itself
        print("error: interrupted before training started; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
