"""Prefix-state cache: the recurrent state after each full block of a prompt, keyed by the hash of the prefix.

A Mamba state summarises every token before it in a fixed size, so a prompt that starts with a cached prefix only
needs the rest prefilled. Keys chain: key_k = sha256(key_{k-1} ‖ tokens of block k) (tokens as little-endian
int64), so the key of a prefix of k blocks names those k·block tokens exactly. Entries hold one sequence's state
(batch 1) and the logits of the block's last token; the cache evicts least recently used entries to stay within
``budget_bytes``.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
from typing import Sequence

import torch

from ..model import MambaState


@dataclasses.dataclass
class Snapshot:
    state: MambaState        # batch 1
    logits: torch.Tensor     # [1, V] fp32: logits of the last token of the prefix
    n_tokens: int

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [*self.state.conv, *self.state.ssm, self.logits])


def block_keys(tokens: Sequence[int], block: int) -> list[str]:
    """Chained hashes of the prompt's full blocks: element k-1 names tokens[: k·block]."""
    keys, prev = [], b""
    for k in range(len(tokens) // block):
        h = hashlib.sha256(prev)
        h.update(torch.tensor(tokens[k * block:(k + 1) * block], dtype=torch.int64).numpy().tobytes())
        prev = h.digest()
        keys.append(h.hexdigest())
    return keys


class PrefixCache:
    """LRU map prefix key → Snapshot under a byte budget. Not thread-safe (the engine thread owns it)."""

    def __init__(self, block: int, budget_bytes: int):
        if block < 1:
            raise ValueError(f"block must be >= 1, got {block}")
        self.block = block
        self.budget_bytes = budget_bytes
        self.entries: collections.OrderedDict[str, Snapshot] = collections.OrderedDict()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self.entries)

    def lookup(self, keys: Sequence[str]) -> Snapshot | None:
        """The snapshot of the longest cached prefix among ``keys`` (from ``block_keys``), or None."""
        for key in reversed(keys):
            snap = self.entries.get(key)
            if snap is not None:
                self.entries.move_to_end(key)
                return snap
        return None

    def put(self, key: str, snap: Snapshot) -> None:
        if key in self.entries or snap.nbytes > self.budget_bytes:
            return
        self.entries[key] = snap
        self.nbytes += snap.nbytes
        while self.nbytes > self.budget_bytes:
            _, old = self.entries.popitem(last=False)
            self.nbytes -= old.nbytes
