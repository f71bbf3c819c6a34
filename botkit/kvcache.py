"""A preallocated KV cache in which every row is its own sequence, for continuous batching with
transformers' GPT-2.

transformers' DynamicCache concatenates every layer's keys and values on every step (a copy of the
whole cache per token) and cannot take in or drop rows cheaply; a left-padded batch also makes
every row pay for the longest one. Here each layer owns buffers of shape
(max_batch, heads, capacity, head_dim); the running sequences are rows [:batch], row i holds its
`lengths[i]` tokens in columns [0, lengths[i]) (no padding, nothing ever shifts), a decode step
writes each row's new token at its own column, and decode attention (rows_attention) reads each
row's own columns. A finished row is replaced by the last row (one row copied).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

ROWS_ATTENTION = "botkit_rows"


def rows_attention(module, query, key, value, attention_mask, *, row_lengths: list[int] | None = None, **kwargs):
    """Decode attention over each row's own tokens (`row_lengths[i]` columns, the new one included).

    Prefill (several query positions) and calls without `row_lengths` use transformers' SDPA.
    query (B, H, 1, D); key/value (B, H, T, D); returns (B, 1, H, D) like sdpa_attention_forward.
    """
    if row_lengths is None or query.shape[2] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    scale = kwargs.get("scaling")
    if min(row_lengths) == max(row_lengths):
        n = row_lengths[0]
        out = F.scaled_dot_product_attention(query, key[:, :, :n], value[:, :, :n], scale=scale)
    else:  # one call per row: no padding read, and each row's numbers are those of a batch of one
        out = torch.cat([F.scaled_dot_product_attention(query[i : i + 1], key[i : i + 1, :, :n], value[i : i + 1, :, :n], scale=scale)
                         for i, n in enumerate(row_lengths)])
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ROWS_ATTENTION, rows_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(ROWS_ATTENTION, sdpa_mask)  # prefill masks as for SDPA


class SlotLayer(DynamicLayer):
    def __init__(self, cache: SlotCache, k: torch.Tensor, v: torch.Tensor):
        super().__init__()
        self.cache, self.k, self.v = cache, k, v
        self.dtype, self.device = k.dtype, k.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        """Decode only (one new token per row): row i's token goes to its column lengths[i]."""
        b, d = key_states.shape[0], key_states.shape[-1]
        where = self.cache.where_new_tokens  # (B * heads,) rows of the buffers seen as (-1, head_dim)
        self.k.view(-1, d).index_copy_(0, where, key_states.reshape(-1, d))  # one copy, not B strided writes
        self.v.view(-1, d).index_copy_(0, where, value_states.reshape(-1, d))
        end = self.cache.max_length + 1
        return self.k[:b, :, :end], self.v[:b, :, :end]

    def get_seq_length(self) -> int:
        return self.cache.max_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cache.max_length + query_length, 0


class SlotCache(Cache):
    def __init__(self, config, max_batch: int, capacity: int, dtype, device):
        # Uninitialised: a row's attention reads only the columns it has written, and on CPU an
        # untouched page of a full-window buffer costs no memory.
        shape = (max_batch, config.n_head, capacity, config.n_embd // config.n_head)
        layers = [SlotLayer(self, torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))
                  for _ in range(config.n_layer)]
        super().__init__(layers=layers)
        self.lengths: list[int] = []  # tokens held by each active row
        self.where_new_tokens = torch.zeros(0, dtype=torch.long)

    @property
    def capacity(self) -> int:
        return self.layers[0].k.shape[2]

    @property
    def max_length(self) -> int:
        return max(self.lengths, default=0)

    def before_decode(self) -> None:
        """Where this step's new tokens go: row i, every head, column lengths[i]."""
        _, heads, capacity, _ = self.layers[0].k.shape
        rows = torch.arange(len(self.lengths))[:, None] * heads + torch.arange(heads)[None, :]  # (B, H)
        where = rows * capacity + torch.tensor(self.lengths)[:, None]
        self.where_new_tokens = where.reshape(-1).to(self.layers[0].k.device)

    def after_decode(self) -> None:
        self.lengths = [n + 1 for n in self.lengths]

    def grow(self, capacity: int) -> None:
        """Reallocate to hold `capacity` columns (keeps the active rows' tokens)."""
        b, n = len(self.lengths), self.max_length
        for layer in self.layers:
            for name in ("k", "v"):
                old = getattr(layer, name)
                new = old.new_empty(*old.shape[:2], capacity, old.shape[3])
                new[:b, :, :n] = old[:b, :, :n]
                setattr(layer, name, new)

    def add_row(self, past: Cache, index: int, length: int) -> None:
        """Append prefill row `index` of `past` (left-padded, its tokens in the last `length` columns)."""
        row = len(self.lengths)
        for layer, src in zip(self.layers, past.layers, strict=True):
            layer.k[row, :, :length] = src.keys[index, :, -length:]
            layer.v[row, :, :length] = src.values[index, :, -length:]
        self.lengths.append(length)

    def move_row(self, src: int, dst: int) -> None:
        n = self.lengths[src]
        for layer in self.layers:
            layer.k[dst, :, :n] = layer.k[src, :, :n]
            layer.v[dst, :, :n] = layer.v[src, :, :n]
        self.lengths[dst] = n

    def pop_row(self) -> None:
        self.lengths.pop()
