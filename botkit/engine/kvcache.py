"""A preallocated KV cache in which every row is its own sequence, and the attention that reads it,
for continuous batching with transformers' GPT-2.

transformers' DynamicCache concatenates every layer's keys and values on every step (a copy of the
whole cache per token) and cannot take in or drop rows cheaply; a padded batch also makes every row
pay for the longest one. Here each layer owns buffers of shape (max_batch, heads, capacity, head_dim);
row i holds its `lengths[i]` tokens in columns [0, lengths[i]) (no padding, nothing ever shifts),
so a token at column c sits at GPT-2 position c. A finished row is replaced by the last row (one
row copied).

A step is one forward pass over a flat list of tokens (batch 1, sequence N): first one new token for
each decoding row, then the new tokens of each sequence that joins. A joining row may already hold
a reused prefix (copied from the prefix cache) in its first columns; its new tokens attend to it.
`Step` says where each token's keys and values go and what each token attends to; `rows_attention`
reads only each row's own columns.
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
    row: int
    start: int  # its first token's index in the flat step
    past: int  # columns already holding its reused prefix
    length: int  # columns it holds after the step (past + new tokens)


@dataclass
class Step:
    """One flat forward pass: token i < len(decode) is the next token of row decode[i][0], which then
    holds decode[i][1] tokens; each Join's new tokens follow."""

    decode: list[tuple[int, int]]
    joins: list[Join]
    where: torch.Tensor  # (tokens * heads,): each token's key row in a layer buffer seen as (-1, head_dim)
    padded: bool = False  # decode attention as one padded call (rows 0..len(decode)-1, in order)
    masks: dict = field(default_factory=dict)  # attention masks built by the first layer, reused by the others


def rows_attention(module, query, key, value, attention_mask, *, step: Step | None = None, **kwargs):
    """Attention of a flat step: each decode token over its row's columns, each joining row's new
    tokens causally over its columns. Calls without `step` use transformers' SDPA.
    query (1, H, N, D); key/value: the whole layer buffers (B, H, capacity, D); returns (1, N, H, D)."""
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
            for i, (r, n) in enumerate(step.decode)
        ]
    for j in step.joins:
        q = query[:, :, j.start : j.start + j.length - j.past]
        k, v = key[j.row : j.row + 1, :, : j.length], value[j.row : j.row + 1, :, : j.length]
        if j.past == 0:
            parts.append(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale))
        else:  # new tokens at columns [past, length) see every column up to their own
            allowed = step.masks.get(j.row)
            if allowed is None:
                allowed = step.masks[j.row] = torch.ones(
                    j.length - j.past, j.length, dtype=torch.bool, device=q.device
                ).tril_(j.past)
            parts.append(F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale))
    return torch.cat(parts, dim=2).transpose(1, 2), None


def _padded_decode(query, key, value, step: Step, scale):
    """All decode rows in one call (the GPU path: one kernel per layer instead of one per row). Rows
    are 0..B-1 in order, padded to the longest; padded columns are masked. Reducing over the padded
    length can change a row's numbers in the last bit, so greedy text may differ from a batch of one
    where two tokens tie within rounding; on a GPU the launches saved are worth it."""
    b, longest = len(step.decode), max(n for _, n in step.decode)  # from the host's list: no device sync
    mask = step.masks.get("padded")
    if mask is None:
        lengths = torch.tensor([n for _, n in step.decode], device=query.device)
        # (B, 1, 1, L)
        mask = step.masks["padded"] = (torch.arange(longest, device=query.device)[None, :] < lengths[:, None])[
            :, None, None, :
        ]
    q = query[0, :, :b].transpose(0, 1).unsqueeze(2)  # (B, H, 1, D)
    out = F.scaled_dot_product_attention(q, key[:b, :, :longest], value[:b, :, :longest], attn_mask=mask, scale=scale)
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
    def __init__(self, config, max_batch: int, capacity: int, dtype, device, zeroed: bool = False):
        # Uninitialised: a row's attention reads only the columns it has written, and on CPU an
        # untouched page of a full-window buffer costs no memory. Padded decode attention reads past a
        # row's end (masked): there uninitialised memory may hold NaN, and NaN x 0 is NaN, so `zeroed`.
        shape = (max_batch, config.n_head, capacity, config.n_embd // config.n_head)
        new = torch.zeros if zeroed else torch.empty
        layers = [
            SlotLayer(self, new(shape, dtype=dtype, device=device), new(shape, dtype=dtype, device=device))
            for _ in range(config.n_layer)
        ]
        super().__init__(layers=layers)
        self.lengths: list[int] = []  # tokens held by each active row
        self.step: Step | None = None

    @property
    def capacity(self) -> int:
        return self.layers[0].k.shape[2]

    @property
    def max_length(self) -> int:
        return max(self.lengths, default=0)

    def begin(self, decode_rows: list[int], joins: list[tuple[int, int]], padded: bool = False) -> Step:
        """Plan a step: each of `decode_rows` takes one token; rows (past, new) of `joins` are added
        after the active rows, holding `past` reused columns and taking `new` tokens. Nothing changes
        until `end()`: a step that fails leaves the cache as it was."""
        _, heads, capacity, _ = self.layers[0].k.shape
        decode = [(r, self.lengths[r] + 1) for r in decode_rows]
        rows, columns = list(decode_rows), [self.lengths[r] for r in decode_rows]
        planned, start = [], len(decode)
        for row, (past, new) in enumerate(joins, start=len(self.lengths)):
            planned.append(Join(row, start, past, past + new))
            rows += [row] * new
            columns += range(past, past + new)
            start += new
        where = (torch.tensor(rows)[:, None] * heads + torch.arange(heads)) * capacity + torch.tensor(columns)[:, None]
        padded = padded and decode_rows == list(range(len(decode_rows)))
        self.step = Step(decode, planned, where.reshape(-1).to(self.layers[0].k.device), padded)
        return self.step

    def end(self) -> None:
        for row, n in self.step.decode:
            self.lengths[row] = n
        self.lengths += [j.length for j in self.step.joins]
        self.step = None

    def grow(self, capacity: int) -> None:
        """Reallocate to hold `capacity` columns (keeps the active rows' tokens)."""
        b, n = len(self.lengths), self.max_length
        for layer in self.layers:
            for name in ("k", "v"):
                old = getattr(layer, name)
                new = old.new_zeros(*old.shape[:2], capacity, old.shape[3])
                new[:b, :, :n] = old[:b, :, :n]
                setattr(layer, name, new)

    def move_row(self, src: int, dst: int) -> None:
        self.copy_row(src, dst, self.lengths[src])
        self.lengths[dst] = self.lengths[src]

    def copy_row(self, src: int, dst: int, n: int) -> None:
        """Row `src`'s first `n` columns into row `dst` (a request's candidates share its prompt)."""
        for layer in self.layers:
            layer.k[dst, :, :n] = layer.k[src, :, :n]
            layer.v[dst, :, :n] = layer.v[src, :, :n]

    def pop_row(self) -> None:
        self.lengths.pop()

    def read_row(self, row: int, n: int) -> torch.Tensor:
        """Row `row`'s first `n` columns of every layer: (layers, 2, heads, n, head_dim), a copy."""
        return torch.stack([t for layer in self.layers for t in (layer.k[row, :, :n], layer.v[row, :, :n])]).unflatten(
            0, (len(self.layers), 2)
        )

    def write_row(self, row: int, kv: torch.Tensor, n: int) -> None:
        """Put the first `n` columns of `kv` (as read_row returns it) into row `row`'s first columns."""
        for layer, (k, v) in zip(self.layers, kv, strict=True):
            layer.k[row, :, :n] = k[:, :n]
            layer.v[row, :, :n] = v[:, :n]
