"""The model over one step, and the KV pool it reads and writes (nano-vllm's `ModelRunner` shape).

A step is one forward pass over a flat list of tokens: the next token of every decoding row, then
the new tokens of each joining row (no padding; the running rows share the prompts' pass over the
weights). The model forward is transformers'; the pool's layout and the attention over it are
kvcache.py's.

Rows (numbered as the scheduler numbers them) live in slots of one pool: `slots[row]` is row's slot,
and a row that leaves hands its number to the last row, as the scheduler does (a list entry moves, no
keys and values). A finished row's slot becomes a prefix cache entry (prefix_cache.py) instead of
being freed; a joining prompt that continues an entry takes its slot over, and other hits (a shared
template, a request's candidates starting from their leader's row) copy the reused columns into a free
slot. The pool holds `max_batch_size` rows plus the entries the cache budget pays for (`cache_bytes`
over a full-window slot's bytes), allocated once: the running rows never wait for a slot, and peak KV
memory is known when the pool is built.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from botkit.engine.kvcache import SlotCache, register_attention
from botkit.engine.prefix_cache import Entry, PrefixCache

log = logging.getLogger("botkit")


@dataclass
class Prefill:
    """A joining row: its tokens (the whole context), of which the first `past` are reused from
    `source` (a running row, a prefix cache entry, or None when past is 0)."""

    tokens: list[int]
    past: int = 0
    source: int | Entry | None = None


class Runner:
    def __init__(self, model, window: int, max_batch_size: int, *, cache_bytes: int, padded_decode: bool):
        self.model = model
        # SDPA, except in our steps: each row reads only its own columns
        model.set_attn_implementation(register_attention())
        self.window, self.max_batch_size, self.padded_decode = window, max_batch_size, padded_decode
        self.no_mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=model.device)  # see run()
        config = model.config
        self.bytes_per_token = 2 * config.n_layer * config.n_embd * model.dtype.itemsize  # keys and values
        num_cached = cache_bytes // (self.bytes_per_token * window)
        if cache_bytes and not num_cached:
            log.warning(
                "cache_mb = %d holds no conversation: one takes %d MB at this model's window; "
                "conversation reuse is off. Set [batch] cache_mb to at least that, or to 0.",
                cache_bytes // 2**20,
                -(-self.bytes_per_token * window // 2**20),
            )
        self.num_slots = max_batch_size + num_cached
        self.prefix_cache = PrefixCache(num_cached, self.bytes_per_token)
        self.cache: SlotCache | None = None
        self.slots: list[int] = []  # row i's slot
        self._joined: list[tuple[int, Entry | None]] = []  # this step's joining rows: slot, the entry it took over
        self.num_forward_passes = 0
        self.num_prompt_tokens_computed = 0  # prompt tokens run through the model (not reused)
        self._step_prompt_tokens = 0

    def run(self, decode: list[tuple[int, int]], prefills: list[Prefill]) -> torch.Tensor:
        """One forward: `decode` is (row, its next token) of each decoding row; each Prefill becomes
        the next new row. Returns (rows, vocab) logits, decode rows first. Nothing is kept until end()."""
        needed = [self.cache.lengths[self.slots[r]] + 1 for r, _ in decode] + [len(p.tokens) for p in prefills]
        cache = self._ensure_cache(max(needed))
        self._joined = []
        for p in prefills:
            self._joined.append(self._slot_for(p))
        step = cache.begin(
            [self.slots[r] for r, _ in decode],
            [(slot, p.past, len(p.tokens) - p.past) for (slot, _), p in zip(self._joined, prefills, strict=True)],
            padded=self.padded_decode,
        )
        ids = [t for _, t in decode] + [t for p in prefills for t in p.tokens[p.past :]]
        positions = [n - 1 for _, n in step.decode] + [c for j in step.joins for c in range(j.past, j.length)]
        # the tokens that predict
        last = list(range(len(decode))) + [j.start + j.length - j.past - 1 for j in step.joins]
        self._step_prompt_tokens = sum(j.length - j.past for j in step.joins)
        device = self.model.device
        # The 4-D "mask" only makes transformers skip building one: rows_attention masks by `step`.
        out = self.model(
            input_ids=torch.tensor([ids], device=device),
            position_ids=torch.tensor([positions], device=device),
            attention_mask=self.no_mask,
            cache=cache,
            use_cache=True,
            logits_to_keep=torch.tensor(last, device=device),
            step=step,
        )
        return out.logits[0]

    def _slot_for(self, p: Prefill) -> tuple[int, Entry | None]:
        """A joining row's slot, and the entry it took over: the cached conversation it continues (no copy),
        else a free slot holding a copy of the columns it reuses."""
        entry = p.source if isinstance(p.source, Entry) else None
        # (an entry an earlier row of this step took over is no longer cached: copy from it)
        if entry and entry.is_continued_by(p.past) and id(entry) in self.prefix_cache.entries:
            return self.prefix_cache.take(entry), entry
        slot = self.cache.allocate()
        if p.past:
            self.cache.copy_slot(entry.slot if entry else self.slots[p.source], slot, p.past)
        return slot, None

    def end(self) -> None:
        """The step succeeded: its rows keep their new keys and values."""
        self.cache.end()
        self.slots += [slot for slot, _ in self._joined]
        self._joined = []
        self.num_forward_passes += 1
        self.num_prompt_tokens_computed += self._step_prompt_tokens

    def abort(self) -> None:
        """The step failed: the pool and the prefix cache are as they were before it (an entry a joining
        row took over is cached again: the step wrote only past its tokens)."""
        for slot, entry in self._joined:
            if entry is not None:
                self.prefix_cache.restore(entry)
            else:
                self.cache.release(slot)
        self._joined = []
        if self.cache is not None:
            self.cache.step = None

    def lookup(self, tokens: list[int]) -> tuple[Entry | None, int]:
        """The cached conversation sharing the longest prefix with `tokens`, and that prefix's length."""
        if self.prefix_cache.max_entries == 0:
            return None, 0
        return self.prefix_cache.lookup(tokens)

    def drop_row(self, row: int, keep: list[int] | None = None, num_prompt_tokens: int = 0) -> None:
        """Free `row` (the last row takes its number, as Scheduler.drop_row does). With `keep` (the row's
        context, its first `num_prompt_tokens` the prompt), its slot becomes a prefix cache entry for a
        later prompt that continues it."""
        slot = self.slots[row]
        self.slots[row] = self.slots[-1]
        self.slots.pop()
        if keep is None:
            freed = [slot]
        else:
            freed = self.prefix_cache.add(keep[: self.cache.lengths[slot]], slot, num_prompt_tokens)
        for s in freed:
            self.cache.release(s)

    def drop_cached_prefixes(self) -> None:
        for slot in self.prefix_cache.clear():
            self.cache.release(slot)

    def rewind_row(self, row: int, length: int) -> None:
        """Keep only the first `length` columns of `row` (a redraw from its prompt)."""
        self.cache.lengths[self.slots[row]] = length

    def reset(self) -> None:
        self.cache, self.slots, self._joined = None, [], []
        self.prefix_cache.clear()

    def _ensure_cache(self, columns: int) -> SlotCache:
        if self.cache is None:
            device = self.model.device
            # On CPU a full-window slot costs only the pages it writes; on a GPU memory is real: grow.
            capacity = self.window if device.type == "cpu" else min(self.window, columns + 128)
            self.cache = SlotCache(
                self.model.config, self.num_slots, capacity, self.model.dtype, device, zeroed=self.padded_decode
            )
        elif self.cache.capacity < columns:
            self.cache.grow(min(self.window, max(columns, 2 * self.cache.capacity)))
        return self.cache
