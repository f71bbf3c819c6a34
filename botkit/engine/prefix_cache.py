"""Conversation KV reuse: which slots of the KV pool (kvcache.py) hold a recently finished sequence
(prompt + reply), kept so that a prompt extending one of them (the chat's next turn) or sharing its
start (a template) prefills only its new tokens.

An entry is a token list and the pool slot that holds their keys and values: nothing is copied when
a row finishes and becomes an entry. A hit that continues the entry's conversation (`is_continued_by`:
the chat's next turn) takes the slot over as the prompt's row, again with no copy; the entry comes
back, longer, when that row finishes. Any other hit (a shared template, a redraw) copies the matched
columns into a free slot (runner.py decides; this file only knows tokens and slot numbers).

Why whole sequences indexed by a hash of blocks, not a radix tree of pages (SGLang) or paged blocks
(vLLM): the engine keeps every sequence contiguous from column 0 of its slot (no block tables,
per-row attention reads one slice). A chain hash per 16-token block finds the deepest shared block in
a dict lookup per block; the match then extends token by token. A chat's newer turn contains its older
one, so an entry that is a prefix of a new entry is dropped at once; past `max_entries` (the slots the
cache budget pays for) the least recently used leave first, and their slots are freed. Positions need
no care: an entry always starts at column 0, so a reused prefix sits at the same GPT-2 positions it was
computed at (a sequence that slid past the window is stored as the tokens it kept, from position 0).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

BLOCK = 16  # tokens per hashed block


@dataclass(eq=False)
class Entry:
    tokens: list[int]
    slot: int  # the pool slot holding their keys and values in columns [0, len(tokens))
    num_prompt_tokens: int = 0  # how many of `tokens` were the prompt of the row that wrote them
    hashes: set[int] = field(default_factory=set)  # chain hash of each full block

    def is_continued_by(self, matched: int) -> bool:
        """Whether a prompt that matched `matched` of its tokens continues its conversation, and may take
        its slot over: it matched the prompt that wrote it, but maybe that prompt's last token (a trailing
        space or line break merges with the reply's first characters when the next turn's text is
        tokenised afresh). What it does not match is the reply's end, which the chat cut (a stop string,
        a speaker line) or tokenised differently: no one else would match it. A shared template matches
        less, and copies instead."""
        return matched >= self.num_prompt_tokens - 1


def block_hashes(tokens: list[int]) -> list[int]:
    hashes, h = [], 0
    for i in range(BLOCK, len(tokens) + 1, BLOCK):
        h = hash((h, *tokens[i - BLOCK : i]))
        hashes.append(h)
    return hashes


class PrefixCache:
    def __init__(self, max_entries: int, bytes_per_token: int = 0):
        self.max_entries = max_entries  # 0: reuse is off
        self.bytes_per_token = bytes_per_token  # keys and values of one token in every layer (for stats)
        self.entries: OrderedDict[int, Entry] = OrderedDict()  # id(entry) -> entry, least recently used first
        self.by_hash: dict[int, Entry] = {}
        self.num_tokens = 0
        self.num_lookups = self.num_hits = self.num_reused_tokens = self.num_prompt_tokens = 0

    @property
    def nbytes(self) -> int:
        """Memory the entries' tokens hold in the pool (on CPU a slot's unwritten columns cost nothing)."""
        return self.num_tokens * self.bytes_per_token

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

    def add(self, tokens: list[int], slot: int, num_prompt_tokens: int = 0) -> list[int]:
        """Keep `slot`, which holds `tokens` (the first `num_prompt_tokens` of them a prompt); entries it
        contains go, and the least recently used past max_entries. Returns the slots no entry holds any
        more (`slot` itself when it is not kept)."""
        if len(tokens) < BLOCK or self.max_entries == 0:
            return [slot]
        entry = Entry(tokens, slot, num_prompt_tokens, set(block_hashes(tokens)))
        contained = [
            old
            for old in {self.by_hash.get(h) for h in entry.hashes} - {None}
            if len(old.tokens) <= len(tokens) and tokens[: len(old.tokens)] == old.tokens
        ]
        self.restore(entry)
        freed = [self.take(old) for old in contained]
        while len(self.entries) > self.max_entries:
            freed.append(self.take(next(iter(self.entries.values()))))
        return freed

    def restore(self, entry: Entry) -> None:
        """Put `entry` (back) in as the most recently used (a failed step gives back the entries it took)."""
        self.entries[id(entry)] = entry
        for h in entry.hashes:
            self.by_hash[h] = entry  # newest wins: it holds at least as much past this block
        self.num_tokens += len(entry.tokens)

    def take(self, entry: Entry) -> int:
        """`entry` leaves the cache (evicted, or its slot taken over by a row); returns its slot."""
        del self.entries[id(entry)]
        self.num_tokens -= len(entry.tokens)
        for h in entry.hashes:
            if self.by_hash.get(h) is entry:
                del self.by_hash[h]
                # an older entry sharing this block may still hold it: point the hash there
                holder = next((e for e in reversed(self.entries.values()) if h in e.hashes), None)
                if holder is not None:
                    self.by_hash[h] = holder
        return entry.slot

    def clear(self) -> list[int]:
        """Drop every entry (/forget); returns their slots."""
        slots = [e.slot for e in self.entries.values()]
        self.entries.clear()
        self.by_hash.clear()
        self.num_tokens = 0
        return slots

    def stats(self) -> dict:
        return {
            "entries": len(self.entries),
            "mb": round(self.nbytes / 2**20, 1),
            "lookups": self.num_lookups,
            "hits": self.num_hits,
            "reused_share": round(self.num_reused_tokens / max(1, self.num_prompt_tokens), 3),
        }
