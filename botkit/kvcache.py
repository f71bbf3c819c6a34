"""A preallocated KV cache in which every row is its own sequence, and the attention that reads it,
for continuous batching with transformers' GPT-2.

transformers' DynamicCache concatenates every layer's keys and values on every step (a copy of the
whole cache per token) and cannot take in or drop rows cheaply; a padded batch also makes every row
pay for the longest one. Here each layer owns buffers of shape (max_batch, heads, capacity, head_dim);
the running sequences are rows [:batch], row i holds its `lengths[i]` tokens in columns
[0, lengths[i]) (no padding, nothing ever shifts). A finished row is replaced by the last row (one
row copied).

A step is one forward pass over a flat list of tokens (batch 1, sequence N): first one new token for
each running row, then the whole context of each sequence that joins. `Step` says where each token's
keys and values go and what each token attends to; `rows_attention` reads only each row's own columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

ROWS_ATTENTION = "botkit_rows"


@dataclass
class Step:
    """One flat forward pass: tokens [0, len(decode)) are the next token of rows [0, len(decode)),
    row i then holding decode[i] tokens (the new one included); each (row, start, length) of `joins`
    is a new row whose whole context is tokens [start, start + length)."""

    decode: list[int]
    joins: list[tuple[int, int, int]]
    where: torch.Tensor  # (tokens * heads,): each token's key row in a layer buffer seen as (-1, head_dim)


def rows_attention(module, query, key, value, attention_mask, *, step: Step | None = None, **kwargs):
    """Attention of a flat step: each decode token over its row's columns, each joining context
    causally over itself. Every row's numbers are those of a batch of one. Calls without `step` use
    transformers' SDPA. query (1, H, N, D); key/value: the whole layer buffers; returns (1, N, H, D)."""
    if step is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    scale = kwargs.get("scaling")
    parts = [F.scaled_dot_product_attention(query[:, :, i : i + 1], key[i : i + 1, :, :n], value[i : i + 1, :, :n], scale=scale)
             for i, n in enumerate(step.decode)]
    parts += [F.scaled_dot_product_attention(query[:, :, start : start + n], key[row : row + 1, :, :n], value[row : row + 1, :, :n],
                                             is_causal=True, scale=scale)
              for row, start, n in step.joins]
    return torch.cat(parts, dim=2).transpose(1, 2), None


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
    def __init__(self, config, max_batch: int, capacity: int, dtype, device):
        # Uninitialised: a row's attention reads only the columns it has written, and on CPU an
        # untouched page of a full-window buffer costs no memory.
        shape = (max_batch, config.n_head, capacity, config.n_embd // config.n_head)
        layers = [SlotLayer(self, torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))
                  for _ in range(config.n_layer)]
        super().__init__(layers=layers)
        self.lengths: list[int] = []  # tokens held by each active row
        self.step: Step | None = None

    @property
    def capacity(self) -> int:
        return self.layers[0].k.shape[2]

    @property
    def max_length(self) -> int:
        return max(self.lengths, default=0)

    def begin(self, joining: list[int]) -> Step:
        """Plan a step: every active row decodes one token, then rows of `joining` lengths are added."""
        _, heads, capacity, _ = self.layers[0].k.shape
        decode = [n + 1 for n in self.lengths]
        rows, columns, joins, start = list(range(len(decode))), list(self.lengths), [], len(decode)
        for row, n in enumerate(joining, start=len(decode)):
            joins.append((row, start, n))
            rows += [row] * n
            columns += range(n)
            start += n
        where = (torch.tensor(rows)[:, None] * heads + torch.arange(heads)) * capacity + torch.tensor(columns)[:, None]
        self.step = Step(decode, joins, where.reshape(-1).to(self.layers[0].k.device))
        return self.step

    def end(self) -> None:
        self.lengths = self.step.decode + [n for _, _, n in self.step.joins]
        self.step = None

    def grow(self, capacity: int) -> None:
        """Reallocate to hold `capacity` columns (keeps the active rows' tokens)."""
        b, n = len(self.lengths), self.max_length
        for layer in self.layers:
            for name in ("k", "v"):
                old = getattr(layer, name)
                new = old.new_empty(*old.shape[:2], capacity, old.shape[3])
                new[:b, :, :n] = old[:b, :, :n]
                setattr(layer, name, new)

    def move_row(self, src: int, dst: int) -> None:
        n = self.lengths[src]
        for layer in self.layers:
            layer.k[dst, :, :n] = layer.k[src, :, :n]
            layer.v[dst, :, :n] = layer.v[src, :, :n]
        self.lengths[dst] = n

    def pop_row(self) -> None:
        self.lengths.pop()
