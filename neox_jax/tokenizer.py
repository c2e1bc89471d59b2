"""Tokenizers: the GPT-NeoX-20B `tokenizer.json` through Hugging Face `tokenizers`, and a tiny demo one."""

from __future__ import annotations

import os
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

END_OF_TEXT = "<|endoftext|>"


class Tokenizer:
    def __init__(self, tokenizer: HFTokenizer, path: Path | None = None):
        self._tokenizer = tokenizer
        self.path = path  # the file it was read from; None when built in memory
        self.eos_id = tokenizer.token_to_id(END_OF_TEXT)  # 0 for the 20B tokenizer; None if absent

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text to encode must be a string, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # lone surrogates: bytes that were not UTF-8, decoded with surrogateescape
            raise ValueError(f"text {text[:40]!r} is not valid Unicode at character {e.start} (input that was not "
                             f"UTF-8?)") from None
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tokenizer.id_to_token(token_id)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()


def check_vocabulary(tokenizer: Tokenizer, vocab_size: int) -> None:
    """Refuse, when loading, a tokenizer with ids the model has no embedding for (found otherwise only when a
    prompt produces one)."""
    if tokenizer.vocab_size > vocab_size:
        where = f"{tokenizer.path}: " if tokenizer.path else ""
        raise ValueError(f"{where}the tokenizer has {tokenizer.vocab_size} tokens, more than the model's vocabulary "
                         f"({vocab_size}): wrong tokenizer?")


class TokenizerNotFoundError(FileNotFoundError):
    """No tokenizer given and none beside the model, or several and none named `tokenizer.json`."""


def find_tokenizer(given: str | os.PathLike | None, *model_dirs: Path) -> Path | None:
    """The one rule of every command: the tokenizer given, which must exist; else, in each of `model_dirs` in
    turn, its `tokenizer.json`, else its only `*tokenizer*.json` (EleutherAI publishes `20B_tokenizer.json`
    beside the slim weights). None when there is none; several candidates in one directory are an error."""
    if given is not None:
        if not Path(given).exists():
            raise FileNotFoundError(f"{given}: the tokenizer file given does not exist")
        return Path(given)
    for directory in dict.fromkeys(model_dirs):
        if (directory / "tokenizer.json").is_file():
            return directory / "tokenizer.json"
        found = sorted(p for p in directory.glob("*tokenizer*.json")
                       if p.is_file() and not p.name.endswith("tokenizer_config.json"))
        if len(found) > 1:
            raise TokenizerNotFoundError(f"{directory}: several tokenizer files ({', '.join(p.name for p in found)}) "
                                         f"and no tokenizer.json: give the one to use")
        if found:
            return found[0]
    return None


def checkpoint_dirs(checkpoint) -> tuple[Path, ...]:
    """Where a checkpoint's tokenizer may lie: a Hugging Face directory itself; for DeepSpeed shards the step
    folder, the folder given and the step folder's parent (where `latest` and the tokenizer usually are)."""
    step = getattr(checkpoint, "step_dir", None)
    return (checkpoint.path,) if step is None else (step, checkpoint.path, step.parent)


def require_tokenizer(given: str | os.PathLike | None, checkpoint, option: str = "--tokenizer FILE") -> Path:
    """`find_tokenizer` for commands that cannot run without one."""
    path = find_tokenizer(given, *checkpoint_dirs(checkpoint))
    if path is None:
        raise TokenizerNotFoundError(f"{checkpoint.path}: no tokenizer found (looked for tokenizer.json and "
                                     f"*tokenizer*.json beside the model): give {option}")
    return path


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such tokenizer file (expected a Hugging Face tokenizer.json)")
    try:
        return Tokenizer(HFTokenizer.from_file(str(path)), path)
    except Exception as e:  # tokenizers raises a bare Exception for malformed JSON
        raise ValueError(f"{path}: not a Hugging Face tokenizer.json ({e})") from None


DEMO_TEXT = """GPT-NeoX-20B is a 20 billion parameter autoregressive language model trained on the Pile.
It uses rotary position embeddings, parallel attention and feed-forward layers, and a tokenizer
that encodes whitespace efficiently. JAX compiles the whole decoding loop to run on the accelerator.
The quick brown fox jumps over the lazy dog. def hello(): print("Hello, world!")"""


def demo_tokenizer(vocab_size: int = 320) -> Tokenizer:
    """A byte-level BPE trained in memory on a paragraph: encodes any text, needs no files."""
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT, "<|padding|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(DEMO_TEXT.splitlines(), trainer)
    return Tokenizer(tokenizer)
