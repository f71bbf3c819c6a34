"""A preallocated, row-compacted KV cache for continuous batching with transformers' GPT-2.

transformers' DynamicCache concatenates every layer's keys and values on every step (a copy of the
whole cache per token) and cannot take in or drop rows cheaply. Here each layer owns buffers of
shape (max_batch, heads, capacity, head_dim): the running sequences are rows [:batch], all rows
write the same column each step (left-aligned padding is masked out), a finished row is replaced by
the last row (one row copied), and a new row's prefill is copied in right-aligned to the current
column. The engine owns the bookkeeping (who is in which row, where each row starts).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

ROWS_ATTENTION = "botkit_rows"


def rows_attention(module, query, key, value, attention_mask, *, row_starts: list[int] | None = None, **kwargs):
    """Decode attention that reads each row's own columns only: no left padding, no mask.

    With rows of different lengths in one slotted cache, a masked batched attention reads (and
    masks) every padded column; on CPU that memory traffic is most of the attention time. Prefill
    (several query positions) and calls without `row_starts` use transformers' SDPA.
    query (B, H, 1, D); key/value (B, H, T, D); returns (B, 1, H, D) like sdpa_attention_forward.
    """
    if row_starts is None or query.shape[2] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    scale = kwargs.get("scaling")
    if min(row_starts) == max(row_starts):
        s = row_starts[0]
        out = F.scaled_dot_product_attention(query, key[:, :, s:], value[:, :, s:], scale=scale)
    else:
        out = torch.cat([F.scaled_dot_product_attention(query[i : i + 1], key[i : i + 1, :, s:], value[i : i + 1, :, s:], scale=scale)
                         for i, s in enumerate(row_starts)])
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ROWS_ATTENTION, rows_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(ROWS_ATTENTION, sdpa_mask)  # prefill masks as for SDPA


class _Shape:
    """Counters shared by all layers: active rows and used columns."""

    def __init__(self):
        self.batch = 0
        self.length = 0


class SlotLayer(DynamicLayer):
    def __init__(self, shape: _Shape, max_batch: int, heads: int, head_dim: int, capacity: int, dtype, device):
        super().__init__()
        self.shape = shape
        # Uninitialised: decode reads only columns a row has written (rows_attention), and an
        # untouched column never costs a page fault.
        self.k = torch.empty(max_batch, heads, capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)
        self.dtype, self.device = dtype, device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        b, end = self.shape.batch, self.shape.length + key_states.shape[-2]
        self.k[:b, :, self.shape.length : end] = key_states
        self.v[:b, :, self.shape.length : end] = value_states
        return self.k[:b, :, :end], self.v[:b, :, :end]

    def get_seq_length(self) -> int:
        return self.shape.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.shape.length + query_length, 0


class SlotCache(Cache):
    def __init__(self, config, max_batch: int, capacity: int, dtype, device):
        self.shape = _Shape()
        head_dim = config.n_embd // config.n_head
        layers = [SlotLayer(self.shape, max_batch, config.n_head, head_dim, capacity, dtype, device) for _ in range(config.n_layer)]
        super().__init__(layers=layers)

    @property
    def capacity(self) -> int:
        return self.layers[0].k.shape[2]

    def grow(self, capacity: int) -> None:
        """Reallocate to hold `capacity` columns (keeps the active rows' used columns)."""
        b, n = self.shape.batch, self.shape.length
        for layer in self.layers:
            for name in ("k", "v"):
                old = getattr(layer, name)
                new = old.new_empty(*old.shape[:2], capacity, old.shape[3])
                new[:b, :, :n] = old[:b, :, :n]
                setattr(layer, name, new)

    def put_rows(self, row: int, past: Cache, first_col: int) -> None:
        """Copy a prefill cache's rows (N, H, T, D) into rows [row, row+N), columns [first_col, first_col+T)."""
        for layer, src in zip(self.layers, past.layers, strict=True):
            n, t = src.keys.shape[0], src.keys.shape[2]
            layer.k[row : row + n, :, first_col : first_col + t] = src.keys
            layer.v[row : row + n, :, first_col : first_col + t] = src.values

    def move_row(self, src: int, dst: int) -> None:
        n = self.shape.length
        for layer in self.layers:
            layer.k[dst, :, :n] = layer.k[src, :, :n]
            layer.v[dst, :, :n] = layer.v[src, :, :n]

    def shift_columns(self, offset: int) -> None:
        """Move the used columns of the active rows by `offset` (negative: drop leading padding)."""
        b, n = self.shape.batch, self.shape.length
        for layer in self.layers:
            for buf in (layer.k, layer.v):
                if offset < 0:
                    buf[:b, :, : n + offset] = buf[:b, :, -offset:n].clone()
                else:
                    buf[:b, :, offset : n + offset] = buf[:b, :, :n].clone()
        self.shape.length = n + offset
