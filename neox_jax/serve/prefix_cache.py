"""Prefix caching's bookkeeping: blocks of prompt keys and values, named by a hash of their tokens and of every
token before them, in a least-recently-used pool with a byte budget.

The engine (`engine.py`) prefills prompts in chunks of `PREFILL_CHUNK` tokens, and a block is one full chunk:
the keys and values that chunk wrote into its row, every layer. A chunk's keys and values depend only on its
tokens and the cache before it, so a block named by the digest of all tokens up to its end holds exactly the
bits that prefilling the same prompt afresh would write; copying it into a new request's row instead of
recomputing it changes nothing the request computes. Blocks are copied into a row, never shared with one, so
a running request holds no reference to the pool, and evicting a block never affects it.
"""

from __future__ import annotations

import collections
import hashlib
from typing import Any, Sequence

import numpy as np


def block_digests(prompt: Sequence[int], block: int) -> list[bytes]:
    """The digest of each full block of `prompt`: its tokens chained to the digest of the blocks before it."""
    digests, previous = [], b""
    for start in range(0, len(prompt) - block + 1, block):
        previous = hashlib.blake2b(previous + np.asarray(prompt[start:start + block], np.int32).tobytes(),
                                   digest_size=16).digest()
        digests.append(previous)
    return digests


class PrefixCache:
    """An LRU pool of blocks (any value; each `block_bytes` large) within `budget_bytes`."""

    def __init__(self, budget_bytes: int, block_bytes: int):
        self.budget_bytes, self.block_bytes = budget_bytes, block_bytes
        self._blocks: collections.OrderedDict[bytes, Any] = collections.OrderedDict()
        self.hits = self.misses = self.evictions = 0

    @property
    def capacity(self) -> int:
        """Blocks the budget holds."""
        return self.budget_bytes // self.block_bytes

    @property
    def bytes_held(self) -> int:
        return len(self._blocks) * self.block_bytes

    def get(self, digest: bytes):
        """The block of `digest` (now the most recently used), or None; counted as a hit or a miss."""
        block = self._blocks.get(digest)
        if block is None:
            self.misses += 1
            return None
        self.hits += 1
        self._blocks.move_to_end(digest)
        return block

    def put(self, digest: bytes, block) -> None:
        """Keep `block` under `digest`, evicting the least recently used blocks to stay within the budget."""
        if self.capacity == 0:
            return
        self._blocks[digest] = block
        self._blocks.move_to_end(digest)
        while len(self._blocks) > self.capacity:
            self._blocks.popitem(last=False)
            self.evictions += 1

    def __contains__(self, digest: bytes) -> bool:
        return digest in self._blocks

    def __len__(self) -> int:
        return len(self._blocks)
