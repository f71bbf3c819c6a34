"""Conversation KV reuse: the keys and values of recently finished sequences (prompt + reply), kept so
that a prompt extending one of them (the chat's next turn) or sharing its start (a template) prefills
only its new tokens.

Why whole sequences indexed by a hash of blocks, not a radix tree of pages (SGLang) or paged blocks
(vLLM): the engine keeps every running row contiguous from column 0 (no block tables, per-row
attention reads one slice), so a hit is one copy of the reused columns into the joining row, and an
entry is one tensor. A chain hash per 16-token block finds the deepest shared block in a dict lookup
per block; the match then extends token by token. A chat's newer turn contains its older one, so an
entry that is a prefix of a new entry is dropped at once; the rest leave least-recently-used first
when the cache passes its byte budget. Positions need no care: an entry always starts at column 0,
so a reused prefix sits at the same GPT-2 positions it was computed at (a sequence that slid past
the window is stored as the tokens it kept, from position 0).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch

BLOCK = 16  # tokens per hashed block


@dataclass(eq=False)
class Entry:
    tokens: list[int]
    kv: torch.Tensor  # (layers, 2, heads, len(tokens), head_dim)
    hashes: set[int] = field(default_factory=set)  # chain hash of each full block

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()


def block_hashes(tokens: list[int]) -> list[int]:
    hashes, h = [], 0
    for i in range(BLOCK, len(tokens) + 1, BLOCK):
        h = hash((h, *tokens[i - BLOCK : i]))
        hashes.append(h)
    return hashes


class PrefixCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[int, Entry] = OrderedDict()  # id(entry) -> entry, least recently used first
        self.by_hash: dict[int, Entry] = {}
        self.nbytes = 0
        self.num_lookups = self.num_hits = self.num_reused_tokens = self.num_prompt_tokens = 0

    def lookup(self, tokens: list[int]) -> tuple[Entry | None, int]:
        """The entry sharing the longest prefix with `tokens` and that prefix's length, at most
        len(tokens) - 1 (the last token must be fed to the model to get the next one's logits)."""
        self.num_lookups += 1
        self.num_prompt_tokens += len(tokens)
        best, matched = None, 0
        for i, h in enumerate(block_hashes(tokens[: len(tokens) - 1])):
            entry = self.by_hash.get(h)
            if entry is None:
                break
            best, matched = entry, (i + 1) * BLOCK
        if best is None or best.tokens[:matched] != tokens[:matched]:  # (a hash collision is not a match)
            return None, 0
        limit = min(len(best.tokens), len(tokens) - 1)
        while matched < limit and best.tokens[matched] == tokens[matched]:
            matched += 1
        self.entries.move_to_end(id(best))
        self.num_hits += 1
        self.num_reused_tokens += matched
        return best, matched

    def add(self, tokens: list[int], kv: torch.Tensor) -> None:
        """Keep `kv` (layers, 2, heads, len(tokens), head_dim) for `tokens`; entries it contains go."""
        if len(tokens) < BLOCK or kv.numel() * kv.element_size() > self.max_bytes:
            return
        entry = Entry(tokens, kv, set(block_hashes(tokens)))
        for old in {self.by_hash.get(h) for h in entry.hashes} - {None}:
            if len(old.tokens) <= len(tokens) and tokens[: len(old.tokens)] == old.tokens:
                self._remove(old)
        self.entries[id(entry)] = entry
        for h in entry.hashes:
            self.by_hash[h] = entry  # newest wins: it holds at least as much past this block
        self.nbytes += entry.nbytes
        while self.nbytes > self.max_bytes:
            self._remove(next(iter(self.entries.values())))

    def clear(self) -> None:
        self.entries.clear()
        self.by_hash.clear()
        self.nbytes = 0

    def _remove(self, entry: Entry) -> None:
        del self.entries[id(entry)]
        self.nbytes -= entry.nbytes
        for h in entry.hashes:
            if self.by_hash.get(h) is entry:
                del self.by_hash[h]
                # an older entry sharing this block may still hold it: point the hash there
                holder = next((e for e in reversed(self.entries.values()) if h in e.hashes), None)
                if holder is not None:
                    self.by_hash[h] = holder

    def stats(self) -> dict:
        return {
            "entries": len(self.entries),
            "mb": round(self.nbytes / 2**20, 1),
            "lookups": self.num_lookups,
            "hits": self.num_hits,
            "reused_share": round(self.num_reused_tokens / max(1, self.num_prompt_tokens), 3),
        }
