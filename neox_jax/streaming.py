"""Tokens to text as they are generated: whole characters only, stop strings cut exactly.

A byte-level BPE token can end in the middle of a UTF-8 character, and a stop string can span tokens,
so text is released only once it can no longer change: trailing incomplete characters (decoded as
U+FFFD) and any tail that could still grow into a stop string are held back. Streaming and
non-streaming generation therefore give the same completion.

Each token costs work in proportion to its own text, whatever the lengths of the text so far and of the
stop strings (a server's engine thread does this for every client): only a window of the last few tokens
is decoded (from a character boundary, with one token before it, as some decoders join tokens with
spaces), and each stop string is matched character by character with Knuth-Morris-Pratt, which keeps how
much of it the text's tail already matches.
"""

from __future__ import annotations

import collections
from typing import Iterator, Sequence

import numpy as np

from .decode import FINISHED, Decoder
from .sampling import Sampling

REPLACEMENT = "\ufffd"
# Decode steps per device call while streaming; each call costs one host round trip. Measured on CPU with
# the demo model (0.12 ms/token in one call): 0.52 ms/token in chunks of 1, 0.15 in chunks of 8. A real
# model's step takes milliseconds, so at 8 the round trip is lost in the noise.
STREAM_CHUNK = 8


def stop_strings(stop) -> list[str]:
    """A stop string or a sequence of them -> the non-empty ones; TypeError for anything else."""
    stops = [stop] if isinstance(stop, str) else stop
    if isinstance(stops, (bytes, dict, set, frozenset)) or not isinstance(stops, Sequence) or not all(
            isinstance(s, str) for s in stops):
        raise TypeError(f"stop must be a string or a list of strings, got {_show(stop)}")
    return [s for s in stops if s]


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _StopMatcher:
    """One stop string, fed the text a character at a time: `matched` is how many of its first characters
    the text ends with; O(1) amortized per character (Knuth-Morris-Pratt)."""

    def __init__(self, stop: str):
        self.stop, self.matched = stop, 0
        self.fallback = [0] * len(stop)  # fallback[i]: the longest proper prefix of stop[:i + 1] that ends it
        k = 0
        for i in range(1, len(stop)):
            while k and stop[i] != stop[k]:
                k = self.fallback[k - 1]
            if stop[i] == stop[k]:
                k += 1
            self.fallback[i] = k

    def feed(self, char: str) -> bool:
        """-> whether the text now ends with the whole stop string."""
        k = self.matched
        while k and self.stop[k] != char:
            k = self.fallback[k - 1]
        if self.stop[k] == char:
            k += 1
        if k == len(self.stop):
            self.matched = self.fallback[k - 1]
            return True
        self.matched = k
        return False


class TextStream:
    """One row's completion text, fed token chunks."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = stop_strings(stop)
        self._matchers = [_StopMatcher(s) for s in self.stop]
        self.tokens: list[int] = []
        self._released: list[str] = []  # the text released so far, in pieces (see `text`)
        self._held: collections.deque[str] = collections.deque()  # checked, not released: a stop string's start?
        # Decoding window: tokens[_window:] are decoded on each token; _window is a character boundary, one
        # token before `_read`, the first token whose text may be incomplete. `_checked`: how many characters
        # of the window's text have gone through the stop matchers.
        self._window = self._read = self._checked = 0
        self.finished = False

    @property
    def text(self) -> str:
        """The text released so far."""
        if len(self._released) > 1:
            self._released = ["".join(self._released)]
        return self._released[0] if self._released else ""

    def push(self, tokens: Sequence[int], final: bool = False) -> str:
        """Add tokens; return the newly released text. `final` releases everything left."""
        if self.finished:
            return ""
        out: list[str] = []
        for token in tokens:
            self.tokens.append(token)
            if self._take(out):
                break  # the tokens after the one that completed a stop string are dropped
        else:
            if final:
                self._take(out, final=True)
                out.append("".join(self._held))
                self._held.clear()
                self.finished = True
        released = "".join(out)
        self._released.append(released)
        return released

    def _take(self, out: list[str], final: bool = False) -> bool:
        """Check the newest token's text against the stop strings and release what can no longer change;
        -> whether a stop string was completed (then the text ends before it)."""
        window = self.tokenizer.decode(self.tokens[self._window:])
        stable = len(window)
        while not final and stable > self._checked and window[stable - 1] == REPLACEMENT:
            stable -= 1  # an incomplete character, until the next token completes it
        for char in window[self._checked:stable]:
            self._held.append(char)
            completed = [len(m.stop) for m in self._matchers if m.feed(char)]
            if completed:  # the longest stop string ending here starts first
                for _ in range(max(completed)):
                    self._held.pop()
                out.append("".join(self._held))
                self._held.clear()
                self.finished = True
                return True
        hold = max((m.matched for m in self._matchers), default=0)
        while len(self._held) > hold:
            out.append(self._held.popleft())
        if stable == len(window):  # ends on a character boundary: the window moves up to the newest token
            self._window, self._read = self._read, len(self.tokens)
            self._checked = len(self.tokenizer.decode(self.tokens[self._window:]))
        else:
            self._checked = stable
        return False


def stream_text(decoder: Decoder, streams: Sequence[TextStream], prompts: Sequence[Sequence[int]],
                max_new_tokens: int, *, stop_token: int | None, sampling: Sampling | None = None,
                chunk: int | None = None, timing=None) -> Iterator[list[str]]:
    """Yield, per decoded chunk, the text released for each row (one `TextStream` per prompt, which keeps
    the row's tokens and text); stops decoding once every row is done."""
    chunks = decoder.stream(prompts, max_new_tokens, sampling, stop_token=stop_token, chunk=chunk, timing=timing)
    ends = [FINISHED] if stop_token is None else [FINISHED, stop_token]
    try:
        for out in chunks:
            deltas = []
            for stream, row in zip(streams, out):
                ended = np.flatnonzero(np.isin(row, ends))
                tokens = row[:ended[0]] if len(ended) else row
                deltas.append(stream.push(tokens.tolist(), final=len(ended) > 0))
            yield deltas
            if all(s.finished for s in streams):
                return
        yield [s.push([], final=True) for s in streams]
    finally:
        chunks.close()
