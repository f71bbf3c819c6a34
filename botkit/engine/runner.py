"""The model over one step, and the keys and values it reads and writes (nano-vllm's `ModelRunner` shape).

A step is one forward pass over a flat list of tokens: the next token of every decoding row, then
the new tokens of each joining row (no padding; the running rows share the prompts' pass over the
weights). A joining row may start from columns it reuses: its request leader's row (candidates of
one request) or a prefix cache entry (a chat's earlier turn, prefix_cache.py). The model forward is
transformers'; the cache layout and the attention over it are kvcache.py's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from botkit.engine.kvcache import SlotCache, register_attention
from botkit.engine.prefix_cache import PrefixCache


@dataclass
class Prefill:
    """A joining row: its tokens (the whole context), of which the first `past` are reused from
    `source` (a row of this cache, a prefix cache entry's tensor, or None when past is 0)."""

    tokens: list[int]
    past: int = 0
    source: int | torch.Tensor | None = None


class Runner:
    def __init__(self, model, window: int, max_batch_size: int, *, cache_bytes: int, padded_decode: bool):
        self.model = model
        # SDPA, except in our steps: each row reads only its own columns
        model.set_attn_implementation(register_attention())
        self.window, self.max_batch_size, self.padded_decode = window, max_batch_size, padded_decode
        self.no_mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=model.device)  # see run()
        self.prefix_cache = PrefixCache(cache_bytes)
        self.cache: SlotCache | None = None
        self.num_forward_passes = 0
        self.num_prompt_tokens_computed = 0  # prompt tokens run through the model (not reused)
        self._step_prompt_tokens = 0

    def run(self, decode: list[tuple[int, int]], prefills: list[Prefill]) -> torch.Tensor:
        """One forward: `decode` is (row, its next token) of each decoding row; each Prefill becomes
        the next new row. Returns (rows, vocab) logits, decode rows first. Nothing is kept until end()."""
        needed = [self.cache.lengths[r] + 1 for r, _ in decode] + [len(p.tokens) for p in prefills]
        cache = self._ensure_cache(max(needed))
        first_row = len(cache.lengths)
        for row, p in enumerate(prefills, start=first_row):
            if isinstance(p.source, int):
                cache.copy_row(p.source, row, p.past)
            elif p.past:
                cache.write_row(row, p.source, p.past)
        step = cache.begin(
            [r for r, _ in decode], [(p.past, len(p.tokens) - p.past) for p in prefills], padded=self.padded_decode
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

    def end(self) -> None:
        """The step succeeded: its rows keep their new keys and values."""
        self.cache.end()
        self.num_forward_passes += 1
        self.num_prompt_tokens_computed += self._step_prompt_tokens

    def abort(self) -> None:
        """The step failed: the cache stays as it was before it."""
        if self.cache is not None:
            self.cache.step = None

    def lookup(self, tokens: list[int]) -> tuple[torch.Tensor | None, int]:
        """The longest cached prefix of `tokens`: (its keys and values, its length), or (None, 0)."""
        if self.prefix_cache.max_bytes == 0:
            return None, 0
        entry, past = self.prefix_cache.lookup(tokens)
        return (entry.kv, past) if entry else (None, 0)

    def keep(self, row: int, tokens: list[int]) -> None:
        """A finished row's keys and values, for a later prompt that extends it (the chat's next turn)."""
        if self.prefix_cache.max_bytes:
            n = self.cache.lengths[row]
            self.prefix_cache.add(tokens[:n], self.cache.read_row(row, n))

    def drop_row(self, row: int) -> None:
        """Free `row`: the last row moves into it (as Scheduler.drop_row does to its list)."""
        last = len(self.cache.lengths) - 1
        if row != last:
            self.cache.move_row(last, row)
        self.cache.pop_row()

    def rewind_row(self, row: int, length: int) -> None:
        """Keep only the first `length` columns of `row` (a redraw from its prompt)."""
        self.cache.lengths[row] = length

    def reset(self) -> None:
        self.cache = None

    def _ensure_cache(self, columns: int) -> SlotCache:
        if self.cache is None:
            device = self.model.device
            # On CPU a full-window buffer costs only the pages rows write; on a GPU memory is real: grow.
            capacity = self.window if device.type == "cpu" else min(self.window, columns + 128)
            self.cache = SlotCache(
                self.model.config, self.max_batch_size, capacity, self.model.dtype, device, zeroed=self.padded_decode
            )
        elif self.cache.capacity < columns:
            self.cache.grow(min(self.window, max(columns, 2 * self.cache.capacity)))
        return self.cache
