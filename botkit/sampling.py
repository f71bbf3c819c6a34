"""Pick each row's next token with its own temperature / top_k / top_p / repetition penalty / seed.

transformers' logits processors take one setting for the whole batch; here every row of a mixed
batch has its own, so the filters are applied with per-row tensors in one pass.
"""

from __future__ import annotations

import torch

from .params import SamplingParams


def apply_repetition_penalty(logits: torch.Tensor, row: int, token_ids: torch.Tensor, penalty: float) -> None:
    """In place, as transformers' RepetitionPenaltyLogitsProcessor: seen tokens become less likely."""
    scores = logits[row, token_ids]
    logits[row, token_ids] = torch.where(scores < 0, scores * penalty, scores / penalty)


def sample_next(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> torch.Tensor:
    """logits (B, vocab) float -> next token ids (B,). Rows with temperature 0 are greedy."""
    tokens = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if p.temperature > 0]
    if not rows:
        return tokens
    vocab = logits.shape[-1]
    idx = torch.tensor(rows, device=logits.device)
    temps = torch.tensor([params[i].temperature for i in rows], device=logits.device, dtype=logits.dtype)
    scaled = logits.index_select(0, idx) / temps[:, None]
    ks = torch.tensor([params[i].top_k or vocab for i in rows], device=logits.device)
    k_max = int(ks.max())
    if k_max < vocab:
        values, ids = scaled.topk(k_max, dim=-1)  # (R, k_max), sorted high to low
    else:
        values, ids = scaled.sort(dim=-1, descending=True)
    values = values.masked_fill(torch.arange(values.shape[-1], device=logits.device)[None, :] >= ks[:, None], float("-inf"))
    probs = values.softmax(dim=-1)
    top_ps = torch.tensor([params[i].top_p for i in rows], device=logits.device, dtype=probs.dtype)
    if (top_ps < 1).any():
        # keep the smallest head whose mass reaches top_p (always at least the first token)
        outside = (probs.cumsum(dim=-1) - probs) >= top_ps[:, None]
        probs = probs.masked_fill(outside, 0.0)
    cdf = probs.cumsum(dim=-1)
    u = torch.cat([torch.rand(1, generator=generators[i], device="cpu") for i in rows]).to(cdf)
    choice = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp_(max=cdf.shape[-1] - 1)
    tokens[idx] = ids.gather(1, choice).squeeze(1)
    return tokens
