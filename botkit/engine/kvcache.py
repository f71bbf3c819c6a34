"""The KV pool, in which every running row and every cached conversation is its own slot, and the
attention that reads it, for continuous batching with transformers' GPT-2.

transformers' DynamicCache concatenates every layer's keys and values on every step (a copy of the
whole cache per token) and cannot take in or drop rows cheaply; a padded batch also makes every row
pay for the longest one. Here each layer owns buffers of shape (num_slots, heads, capacity, head_dim),
allocated once; a slot holds its `lengths[slot]` tokens in columns [0, lengths[slot]) (no padding,
nothing ever shifts), so a token at column c sits at GPT-2 position c. A slot is free, a running row
or a cached conversation (prefix_cache.py); the runner maps rows to slots, so a row that leaves copies
nothing, and a finished conversation stays in its slot for its next turn.

A step is one forward pass over a flat list of tokens (batch 1, sequence N): first one new token for
each decoding row, then the new tokens of each sequence that joins. A joining row may already hold
a reused prefix in its first columns (a cached conversation's slot it took over, or columns copied
into its slot); its new tokens attend to it. `Step` says where each token's keys and values go and
what each token attends to; `rows_attention` reads only each row's own columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

ROWS_ATTENTION = "botkit_rows"


@dataclass
class Join:
    slot: int
    start: int  # its first token's index in the flat step
    past: int  # columns already holding its reused prefix
    length: int  # columns it holds after the step (past + new tokens)


@dataclass
class Step:
    """One flat forward pass: token i < len(decode) is the next token of the row in slot decode[i][0],
    which then holds decode[i][1] tokens; each Join's new tokens follow."""

    decode: list[tuple[int, int]]
    joins: list[Join]
    where: torch.Tensor  # (tokens * heads,): each token's key row in a layer buffer seen as (-1, head_dim)
    padded: bool = False  # decode attention as one padded call over the decode slots
    masks: dict = field(default_factory=dict)  # attention masks built by the first layer, reused by the others


def rows_attention(module, query, key, value, attention_mask, *, step: Step | None = None, **kwargs):
    """Attention of a flat step: each decode token over its row's columns, each joining row's new
    tokens causally over its columns. Calls without `step` use transformers' SDPA.
    query (1, H, N, D); key/value: the whole layer buffers (slots, H, capacity, D); returns (1, N, H, D)."""
    if step is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    scale = kwargs.get("scaling")
    if step.padded and step.decode:
        parts = [_padded_decode(query, key, value, step, scale)]
    else:
        # One call per row: every row's numbers are those of a batch of one (bit for bit what
        # transformers computes for that sequence alone). On this CPU this also measured faster than
        # one padded call (3.4 vs 4.1 ms per layer at 64 rows), which reduces over the padded length.
        parts = [
            F.scaled_dot_product_attention(
                query[:, :, i : i + 1], key[r : r + 1, :, :n], value[r : r + 1, :, :n], scale=scale
            )
            for i, (r, n) in enumerate(step.decode)  # r: the row's slot
        ]
    for j in step.joins:
        q = query[:, :, j.start : j.start + j.length - j.past]
        k, v = key[j.slot : j.slot + 1, :, : j.length], value[j.slot : j.slot + 1, :, : j.length]
        if j.past == 0:
            parts.append(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale))
        else:  # new tokens at columns [past, length) see every column up to their own
            allowed = step.masks.get(j.slot)
            if allowed is None:
                allowed = step.masks[j.slot] = torch.ones(
                    j.length - j.past, j.length, dtype=torch.bool, device=q.device
                ).tril_(j.past)
            parts.append(F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale))
    return torch.cat(parts, dim=2).transpose(1, 2), None


def _padded_decode(query, key, value, step: Step, scale):
    """All decode rows in one call (the GPU path: one kernel per layer instead of one per row), padded
    to the longest; padded columns are masked. Rows in slots 0..B-1, in order, read the pool in place;
    others are gathered first. Reducing over the padded length can change a row's numbers in the last
    bit, so greedy text may differ from a batch of one where two tokens tie within rounding; on a GPU
    the launches saved are worth it."""
    b, longest = len(step.decode), max(n for _, n in step.decode)  # from the host's list: no device sync
    masks = step.masks
    if "padded" not in masks:
        lengths = torch.tensor([n for _, n in step.decode], device=query.device)
        # (B, 1, 1, L)
        masks["padded"] = (torch.arange(longest, device=query.device)[None, :] < lengths[:, None])[:, None, None, :]
        slots = [s for s, _ in step.decode]
        masks["slots"] = None if slots == list(range(b)) else torch.tensor(slots, device=query.device)
    slots = masks["slots"]
    k = key[:b, :, :longest] if slots is None else key[slots, :, :longest]  # (B, H, L, D)
    v = value[:b, :, :longest] if slots is None else value[slots, :, :longest]
    q = query[0, :, :b].transpose(0, 1).unsqueeze(2)  # (B, H, 1, D)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=masks["padded"], scale=scale)
    return out.squeeze(2).transpose(0, 1).unsqueeze(0)  # (1, H, B, D)


def register_attention() -> str:
    """Make `rows_attention` known to transformers under ROWS_ATTENTION (idempotent; the engine calls
    it, never an import) and return that name."""
    AttentionInterface.register(ROWS_ATTENTION, rows_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ROWS_ATTENTION, sdpa_mask)  # calls without a Step mask as SDPA does
    return ROWS_ATTENTION


class SlotLayer(DynamicLayer):
    def __init__(self, cache: SlotCache, k: torch.Tensor, v: torch.Tensor):
        super().__init__()
        self.cache, self.k, self.v = cache, k, v
        self.dtype, self.device = k.dtype, k.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        """Writes the step's keys and values (1, heads, N, head_dim) to their rows and columns, in one copy each."""
        d = key_states.shape[-1]
        where = self.cache.step.where
        self.k.view(-1, d).index_copy_(0, where, key_states.transpose(1, 2).reshape(-1, d))
        self.v.view(-1, d).index_copy_(0, where, value_states.transpose(1, 2).reshape(-1, d))
        return self.k, self.v

    def get_seq_length(self) -> int:
        return self.cache.max_length


class SlotCache(Cache):
    """The KV pool: `num_slots` slots of `capacity` columns in every layer, each free, a running row or a
    cached conversation (the runner and prefix_cache.py say which). Allocated once, so its size is the
    most the keys and values take (on a GPU its columns grow up to the window, for the whole pool at once)."""

    def __init__(self, config, num_slots: int, capacity: int, dtype, device, zeroed: bool = False):
        # Uninitialised: a row's attention reads only the columns it has written, and on CPU an
        # untouched page of a full-window buffer costs no memory. Padded decode attention reads past a
        # row's end (masked): there uninitialised memory may hold NaN, and NaN x 0 is NaN, so `zeroed`.
        # Each slot is zeroed when first taken, so a large pool costs only the slots in use.
        shape = (num_slots, config.n_head, capacity, config.n_embd // config.n_head)
        layers = [
            SlotLayer(self, *(torch.empty(shape, dtype=dtype, device=device) for _ in "kv"))
            for _ in range(config.n_layer)
        ]
        super().__init__(layers=layers)
        self.lengths = [0] * num_slots  # tokens each slot holds
        # Taken from the end: the lowest slot first, and a slot just freed next (its pages are paid for on CPU)
        self.free = list(range(num_slots - 1, -1, -1))
        self.zeroed, self.num_taken_slots = zeroed, 0  # slots below num_taken_slots have been taken (and zeroed)
        self.step: Step | None = None
        self.num_copied_tokens = 0  # columns copied from slot to slot (a shared start, candidates)

    @property
    def capacity(self) -> int:
        return self.layers[0].k.shape[2]

    @property
    def num_slots(self) -> int:
        return len(self.lengths)

    @property
    def max_length(self) -> int:
        return max(self.lengths, default=0)

    def allocate(self) -> int:
        """A free slot (the runner never asks for more than the pool holds)."""
        slot = self.free.pop()
        if slot >= self.num_taken_slots:  # never taken before: the free list hands these out in order
            if self.zeroed:
                for layer in self.layers:
                    layer.k[slot].zero_()
                    layer.v[slot].zero_()
            self.num_taken_slots = slot + 1
        return slot

    def release(self, slot: int) -> None:
        self.lengths[slot] = 0
        self.free.append(slot)

    def begin(self, decode_slots: list[int], joins: list[tuple[int, int, int]], padded: bool = False) -> Step:
        """Plan a step: each of `decode_slots` takes one token; each join (slot, past, new) holds `past`
        reused columns in `slot` and takes `new` tokens. Nothing changes until `end()`: a step that fails
        leaves the lengths as they were (columns it wrote past them are never read)."""
        _, heads, capacity, _ = self.layers[0].k.shape
        decode = [(s, self.lengths[s] + 1) for s in decode_slots]
        slots, columns = list(decode_slots), [self.lengths[s] for s in decode_slots]
        planned, start = [], len(decode)
        for slot, past, new in joins:
            planned.append(Join(slot, start, past, past + new))
            slots += [slot] * new
            columns += range(past, past + new)
            start += new
        where = (torch.tensor(slots)[:, None] * heads + torch.arange(heads)) * capacity + torch.tensor(columns)[:, None]
        self.step = Step(decode, planned, where.reshape(-1).to(self.layers[0].k.device), padded)
        return self.step

    def end(self) -> None:
        for slot, n in self.step.decode:
            self.lengths[slot] = n
        for j in self.step.joins:
            self.lengths[j.slot] = j.length
        self.step = None

    def grow(self, capacity: int) -> None:
        """Reallocate to hold `capacity` columns (keeps every slot's tokens)."""
        n = self.max_length
        for layer in self.layers:
            for name in ("k", "v"):
                old = getattr(layer, name)
                new = old.new_zeros(*old.shape[:2], capacity, old.shape[3])
                new[:, :, :n] = old[:, :, :n]
                setattr(layer, name, new)

    def copy_slot(self, src: int, dst: int, n: int) -> None:
        """Slot `src`'s first `n` columns into slot `dst` (a shared start, or a request's candidates)."""
        for layer in self.layers:
            layer.k[dst, :, :n] = layer.k[src, :, :n]
            layer.v[dst, :, :n] = layer.v[src, :, :n]
        self.num_copied_tokens += n
