"""Pick each row's next token with its own temperature / top_k / top_p / seed (the logits rules before it are
rules.py's).

transformers' logits processors take one setting for the whole batch; here every row of a mixed
batch has its own, so the filters are applied with per-row tensors in one pass. Nothing sorts the
whole vocabulary: a row without filters samples from its softmax directly, top_k takes the k best,
and top_p alone grows a top-k head until it holds the nucleus (50,257 entries sorted per token made
up a third of a long generation's time).
"""

from __future__ import annotations

import torch

from botkit.engine.rules import MIN_TEMPERATURE
from botkit.params import SamplingParams

NUCLEUS_START = 256  # top_p alone: the first head tried; it grows 4x until it holds the nucleus


def sample_next(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> torch.Tensor:
    """logits (B, vocab) float, -inf where a token is not allowed -> next token ids (B,). Rows with
    temperature 0 (or below MIN_TEMPERATURE) are greedy. One uniform draw per sampled row from its
    own generator, so a row's text does not depend on its neighbours."""
    tokens = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if p.temperature >= MIN_TEMPERATURE]
    if not rows:
        return tokens
    device = logits.device
    u = torch.cat([torch.rand(1, generator=generators[i], device="cpu") for i in rows]).to(device)
    temps = torch.tensor([params[i].temperature for i in rows], device=device, dtype=logits.dtype)
    scaled = logits[rows] / temps[:, None]  # (R, vocab)
    filtered = [j for j, i in enumerate(rows) if params[i].top_k or params[i].top_p < 1]
    plain = [j for j in range(len(rows)) if j not in set(filtered)]
    if plain:
        cdf = scaled[plain].softmax(dim=-1).cumsum(dim=-1)
        choice = torch.searchsorted(cdf, (u[plain] * cdf[:, -1])[:, None]).clamp_(max=cdf.shape[-1] - 1)
        tokens[[rows[j] for j in plain]] = choice.squeeze(1)
    if filtered:
        picked = _sample_filtered(scaled[filtered], [params[rows[j]] for j in filtered], u[filtered])
        tokens[[rows[j] for j in filtered]] = picked
    return tokens


def _sample_filtered(scaled: torch.Tensor, params: list[SamplingParams], u: torch.Tensor) -> torch.Tensor:
    vocab, device = scaled.shape[-1], scaled.device
    ks = [min(p.top_k, vocab) if p.top_k else _nucleus_size(scaled[j], p.top_p) for j, p in enumerate(params)]
    values, ids = scaled.topk(max(ks), dim=-1)  # (R, k), high to low
    ks_t = torch.tensor(ks, device=device)
    values = values.masked_fill(torch.arange(values.shape[-1], device=device)[None, :] >= ks_t[:, None], float("-inf"))
    probs = values.softmax(dim=-1)
    top_ps = torch.tensor([p.top_p for p in params], device=device, dtype=probs.dtype)
    if (top_ps < 1).any():
        # keep the smallest head whose mass reaches top_p (always at least the first token)
        probs = probs.masked_fill((probs.cumsum(dim=-1) - probs) >= top_ps[:, None], 0.0)
    cdf = probs.cumsum(dim=-1)
    choice = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp_(max=cdf.shape[-1] - 1)
    return ids.gather(1, choice).squeeze(1)


def _nucleus_size(scaled_row: torch.Tensor, top_p: float) -> int:
    """How many of the likeliest tokens hold `top_p` of the mass (the whole vocabulary for top_p 1)."""
    vocab = scaled_row.shape[-1]
    if top_p >= 1:
        return vocab
    probs = scaled_row.softmax(dim=-1)
    k = min(NUCLEUS_START, vocab)
    while True:
        head = probs.topk(k).values
        if k == vocab or float(head.sum()) >= top_p:
            return min(vocab, int(((head.cumsum(0) - head) < top_p).sum()))
        k = min(vocab, 4 * k)
