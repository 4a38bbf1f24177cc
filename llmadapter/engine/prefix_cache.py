"""Prefix caching: the KV cache of prompts already prefilled, reused by later prompts that start the same.

A system prompt, a chat history or few-shot examples shared by many requests is prefilled once; each
later prompt that starts with the same tokens copies that part of the KV cache and prefills only the
rest. Entries are whole prompts (their keys and values in every layer), found through the chained
hashes of their full blocks of `BLOCK` tokens: a lookup walks the query's block hashes, takes the
longest entry that has them, checks the tokens themselves (a hash is never trusted alone) and extends
the match token by token inside that entry. The budget is in bytes of keys and values; the least
recently used entries go first, and an entry whose prompt is a prefix of a newer one's is dropped for it
(a growing chat keeps one entry, not one per turn). Only the scheduler thread uses it: no locking.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch

BLOCK = 16  # tokens per hashed block (vLLM's default block size)


def block_hashes(ids: list[int], blocks: int | None = None) -> list[int]:
    """Chained hashes of the full blocks of `ids` (at most `blocks`): hash i covers tokens 0..(i+1)*BLOCK."""
    out: list[int] = []
    h = 0
    count = len(ids) // BLOCK if blocks is None else min(blocks, len(ids) // BLOCK)
    for i in range(count):
        h = hash((h, *ids[i * BLOCK : (i + 1) * BLOCK]))
        out.append(h)
    return out


@dataclass
class Entry:
    """One prompt's KV: per layer (keys, values), each [kv_heads, tokens, head_dim], and its token ids."""

    ids: list[int]
    layers: list[tuple[torch.Tensor, torch.Tensor]]
    hashes: list[int] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.layers)


@dataclass
class Hit:
    """The first `tokens` prompt tokens are in `entry`."""

    entry: Entry
    tokens: int

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.entry.layers[i]
        return k[:, : self.tokens], v[:, : self.tokens]


class PrefixCache:
    """An LRU of prompt KV caches within `budget_bytes` (0: off); counters for the metrics."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self._entries: OrderedDict[int, Entry] = OrderedDict()  # by id(entry), least recent first
        self._index: dict[int, list[Entry]] = {}  # block hash -> the entries that hold it, newest last
        self.bytes = 0
        self.queried_tokens = 0  # prompt tokens looked up (vLLM's prefix_cache_queries)
        self.hit_tokens = 0  # of those, tokens whose KV came from the cache (vLLM's prefix_cache_hits)

    @property
    def enabled(self) -> bool:
        return self.budget > 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, ids: list[int]) -> Hit | None:
        """The longest cached prefix of `ids`, leaving at least its last token to prefill (its logits
        are the first output); None when fewer than BLOCK tokens match."""
        if not self.enabled:
            return None
        self.queried_tokens += len(ids)
        hashes = block_hashes(ids, (len(ids) - 1) // BLOCK)
        for n in range(len(hashes), 0, -1):
            entry = self._holder(hashes[n - 1])
            if entry is None or entry.ids[: n * BLOCK] != ids[: n * BLOCK]:
                continue
            tokens = n * BLOCK
            limit = min(len(entry.ids), len(ids) - 1)
            while tokens < limit and entry.ids[tokens] == ids[tokens]:
                tokens += 1
            self._entries.move_to_end(id(entry))
            self.hit_tokens += tokens
            return Hit(entry, tokens)
        return None

    def covers(self, ids: list[int]) -> bool:
        """Whether an entry already holds every full block of `ids` (storing them again adds nothing)."""
        hashes = block_hashes(ids)
        if not hashes:
            return True
        entry = self._holder(hashes[-1])
        return entry is not None and entry.ids[: len(hashes) * BLOCK] == ids[: len(hashes) * BLOCK]

    def store(self, ids: list[int], layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Keep one prompt's KV (its own copies: the batch's tensors stay free to go)."""
        if not self.enabled or len(ids) < BLOCK or self.covers(ids):
            return
        entry = Entry(list(ids), [(k.contiguous(), v.contiguous()) for k, v in layers], block_hashes(ids))
        size = entry.nbytes
        if size > self.budget:
            return
        for h in entry.hashes:  # entries that are prefixes of this one: it holds all they hold
            for old in list(self._index.get(h, ())):
                if old.hashes[-1] == h and old.ids == ids[: len(old.ids)]:
                    self._drop(old)
        while self._entries and self.bytes + size > self.budget:
            self._drop(next(iter(self._entries.values())))
        self._entries[id(entry)] = entry
        for h in entry.hashes:
            self._index.setdefault(h, []).append(entry)
        self.bytes += size

    def _holder(self, h: int) -> Entry | None:
        holders = self._index.get(h)
        return holders[-1] if holders else None

    def _drop(self, entry: Entry) -> None:
        if self._entries.pop(id(entry), None) is None:
            return
        self.bytes -= entry.nbytes
        for h in entry.hashes:
            holders = self._index.get(h, [])
            holders[:] = [e for e in holders if e is not entry]
            if not holders:
                self._index.pop(h, None)

    def clear(self) -> None:
        self._entries.clear()
        self._index.clear()
        self.bytes = 0
