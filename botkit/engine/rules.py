"""Every per-token logits rule, written once: botkit's engine and vLLM's logits processor
(vllm_rules.py) both call `apply_rules` on a batch's raw logits before they sample.

A row's rules are a `RowRules`, built from its SamplingParams and the prompt ids the model sees, and
advanced with `append(token)` as tokens are added (not end of text). `apply_rules` reads that state
and writes only the logits, in this order:

    UTF-8 mask (token_bytes.py)          no token that leaves the reply's bytes invalid UTF-8
    repetition_penalty                   as transformers' RepetitionPenaltyLogitsProcessor, prompt and reply
    presence / frequency penalty         OpenAI's: logit -= frequency * count + presence * (count > 0), reply only
    no_repeat_ngram_size                 as transformers' NoRepeatNGramLogitsProcessor, prompt and reply
    DRY                                  text-generation-webui's: logit -= multiplier * base^(repeat - allowed)
    min_tokens                           no end of text and no token completing a stop string before N new tokens
    min_p, typical_p                     as transformers' MinP / Typical warpers on logits / temperature (sampled rows)

The copy index's rule of `unique` (never complete an NGRAM-token run of the training text) is
`training_run_hits`: botkit's engine checks the token it drew and draws again without it (exact and
cheap, one lookup per row); vLLM samples after the processor, so `apply_rules` with `candidates`
masks the hits among each row's likeliest tokens (its top_k, else MAX_COPY_CANDIDATES).

Only torch, numpy and botkit's torch-free modules are imported: this file is imported inside vLLM's venv.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import numpy as np
import torch

from botkit.engine.copy_index import CopyIndex
from botkit.engine.token_bytes import TokenBytes
from botkit.params import SamplingParams

MIN_TEMPERATURE = 1e-4  # below this a row is greedy: logits / 1e-39 overflow and picked the least likely token
MAX_DRY_LOOKBACK = 1024  # DRY looks for repeats in the last this many tokens (text-generation-webui's range)
MAX_DRY_MATCH = 50  # a repeat's length is counted up to this (text-generation-webui's cap: base^length stays finite)
BLOCK_TRIES = 16  # draws of one step's token for a `unique` row whose draws keep completing training n-grams
MAX_COPY_CANDIDATES = 1024  # vLLM: tokens per row checked against the copy index when top_k is off


class RuleContext:
    """What every row of one model shares: the token bytes (None for a tokenizer that is not byte
    level), end of text, the run's copy index, and tables built lazily from the vocabulary."""

    def __init__(
        self,
        token_bytes: TokenBytes | None,
        eos_id: int,
        copy_index: CopyIndex | None = None,
        *,
        mask_utf8: bool = True,
    ):
        self.token_bytes = token_bytes
        self.eos = eos_id
        self.copy_index = copy_index
        self.mask_utf8 = mask_utf8 and token_bytes is not None
        self._tokens_holding: dict[bytes, list[int]] = {}
        self._tokens_starting: dict[bytes, list[int]] = {}
        self._breakers: dict[tuple[str, ...], frozenset[int]] = {}

    def tokens_holding(self, data: bytes) -> list[int]:
        """Tokens whose bytes contain `data` (one scan of the vocabulary per string, then cached)."""
        if data not in self._tokens_holding:
            self._tokens_holding[data] = [t for t, b in enumerate(self.token_bytes.table) if data in b]
        return self._tokens_holding[data]

    def tokens_starting(self, data: bytes) -> list[int]:
        """Tokens whose bytes start with `data`."""
        if data not in self._tokens_starting:
            self._tokens_starting[data] = [t for t, b in enumerate(self.token_bytes.table) if b.startswith(data)]
        return self._tokens_starting[data]

    def breakers(self, strings: tuple[str, ...]) -> frozenset[int]:
        """DRY's sequence breakers as token ids: every token whose text holds one of `strings`."""
        if strings not in self._breakers:
            ids = set()
            if self.token_bytes is not None:
                for s in strings:
                    ids.update(self.tokens_holding(s.encode("utf-8")))
            self._breakers[strings] = frozenset(ids)
        return self._breakers[strings]


class RowRules:
    """One row's rule state. `tokens` is the prompt as the model sees it, then the reply."""

    def __init__(self, ctx: RuleContext, params: SamplingParams, prompt_ids: list[int]):
        self.ctx = ctx
        self.params = params
        self.tokens = list(prompt_ids)
        self.num_prompt = len(self.tokens)
        self.counts: Counter[int] = Counter()  # reply tokens, for the presence / frequency penalties
        self.utf8_state = 0  # where the reply's bytes stand in UTF-8's grammar (token_bytes.STATES)
        self.tail = b""  # the reply's last bytes, while min_tokens holds stop strings back
        self.ngrams: dict[tuple[int, ...], set[int]] = {}  # no_repeat_ngram_size: (n-1)-gram -> tokens seen after it
        self.ngrams_upto = 0  # positions of `tokens` already in `ngrams`
        self.max_stop_bytes = max((len(s.encode("utf-8")) for s in params.stop), default=0)

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - self.num_prompt

    def last_generated(self, k: int) -> list[int]:
        """The reply's last k tokens (fewer while it is shorter)."""
        return self.tokens[max(self.num_prompt, len(self.tokens) - k) :] if k > 0 else []

    def append(self, token: int) -> None:
        """A token added to the reply (never end of text: it ends the row)."""
        self.tokens.append(token)
        self.counts[token] += 1
        tb = self.ctx.token_bytes
        if tb is not None:
            self.utf8_state = tb.next_state(self.utf8_state, token)
            if self.max_stop_bytes and self.num_generated <= self.params.min_tokens:
                self.tail = (self.tail + tb.table[token])[-self.max_stop_bytes :]

    @property
    def is_active(self) -> bool:
        """Whether any rule but the UTF-8 mask and the copy index writes this row's logits."""
        p = self.params
        return bool(
            p.repetition_penalty != 1.0
            or p.presence_penalty
            or p.frequency_penalty
            or p.no_repeat_ngram_size
            or p.dry_multiplier
            or self.num_generated < p.min_tokens
            or p.min_p
            or p.typical_p < 1
        )


def apply_rules(
    ctx: RuleContext, rows: list[RowRules | None], logits: torch.Tensor, *, candidates: bool = False
) -> None:
    """In place on raw logits (B, vocab) float, row i by rows[i] (None: a row no rule applies to).
    `candidates=True` also masks the tokens that would complete a training run (vLLM; see the docstring)."""
    if ctx.mask_utf8:
        live = [i for i, r in enumerate(rows) if r is not None]
        if live:
            blocked = ctx.token_bytes.blocked([rows[i].utf8_state for i in live], logits.device)  # (R or 1, vocab)
            if len(live) == len(rows):
                logits.masked_fill_(blocked, float("-inf"))
            else:
                logits[live] = logits[live].masked_fill(blocked, float("-inf"))
    for i, row in enumerate(rows):
        if row is not None and row.is_active:
            _apply_row(row, logits, i)
    if candidates and ctx.copy_index is not None:
        mask_training_runs(ctx, rows, logits)


def _apply_row(row: RowRules, logits: torch.Tensor, i: int) -> None:
    p = row.params
    if p.repetition_penalty != 1.0:
        apply_repetition_penalty(logits, i, torch.tensor(row.tokens, device=logits.device), p.repetition_penalty)
    if p.presence_penalty or p.frequency_penalty:
        apply_presence_frequency(logits, i, row.counts, p.presence_penalty, p.frequency_penalty)
    if p.no_repeat_ngram_size:
        ban_repeated_ngrams(logits, i, row)
    if p.dry_multiplier:
        apply_dry(logits, i, row.tokens[-MAX_DRY_LOOKBACK:], row.ctx.breakers(p.dry_sequence_breakers), p)
    if row.num_generated < p.min_tokens:
        hold_back_ending(logits, i, row)
    if p.temperature >= MIN_TEMPERATURE and (p.min_p or p.typical_p < 1):
        scaled = logits[i] / p.temperature  # the warpers judge the distribution that is sampled
        if p.min_p:
            logits[i].masked_fill_(min_p_removed(scaled, p.min_p), float("-inf"))
            scaled = logits[i] / p.temperature
        if p.typical_p < 1:
            logits[i].masked_fill_(typical_removed(scaled, p.typical_p), float("-inf"))


def apply_repetition_penalty(logits: torch.Tensor, row: int, token_ids: torch.Tensor, penalty: float) -> None:
    """In place, as transformers' RepetitionPenaltyLogitsProcessor: seen tokens become less likely."""
    scores = logits[row, token_ids]
    logits[row, token_ids] = torch.where(scores < 0, scores * penalty, scores / penalty)


def apply_presence_frequency(
    logits: torch.Tensor, row: int, counts: Counter[int], presence: float, frequency: float
) -> None:
    """In place, OpenAI's formula: logit[j] -= c[j] * frequency + (c[j] > 0) * presence, c[j] the
    times token j is in the reply so far."""
    if not counts:
        return
    ids = torch.tensor(list(counts), device=logits.device)
    c = torch.tensor(list(counts.values()), device=logits.device, dtype=logits.dtype)
    logits[row, ids] -= c * frequency + presence


def ban_repeated_ngrams(logits: torch.Tensor, row: int, state: RowRules) -> None:
    """In place, as transformers' NoRepeatNGramLogitsProcessor over the prompt and the reply: a token
    that would complete an n-gram already in them is not drawn. `state.ngrams` maps each (n-1)-gram
    seen to the tokens that followed it, grown by the tokens added since the last call."""
    n, tokens = state.params.no_repeat_ngram_size, state.tokens
    for end in range(max(state.ngrams_upto, n), len(tokens) + 1):
        state.ngrams.setdefault(tuple(tokens[end - n : end - 1]), set()).add(tokens[end - 1])
    state.ngrams_upto = len(tokens) + 1
    banned = state.ngrams.get(tuple(tokens[len(tokens) - n + 1 :]) if n > 1 else (), ())
    if banned:
        logits[row, list(banned)] = float("-inf")


def dry_match_lengths(tokens: list[int], breakers: frozenset[int]) -> dict[int, int]:
    """DRY (text-generation-webui's DRYLogitsProcessor): for each token that followed an earlier
    occurrence of the last token, the length of the longest repeat it would extend (the run of tokens
    ending there that equals the end of `tokens`), never counting across a breaker."""
    if len(tokens) < 2 or tokens[-1] in breakers:
        return {}
    last, lengths = tokens[-1], {}
    for i in range(len(tokens) - 1):
        if tokens[i] != last or tokens[i + 1] in breakers:
            continue
        length = 1
        while length < MAX_DRY_MATCH and i - length >= 0:
            previous = tokens[-(length + 1)]
            if tokens[i - length] != previous or previous in breakers:
                break
            length += 1
        lengths[tokens[i + 1]] = max(length, lengths.get(tokens[i + 1], 0))
    return lengths


def apply_dry(logits: torch.Tensor, row: int, tokens: list[int], breakers: frozenset[int], p: SamplingParams) -> None:
    """In place: logit -= multiplier * base^(length - allowed) for a token extending a repeat of
    `length` >= allowed tokens."""
    hits = {t: n for t, n in dry_match_lengths(tokens, breakers).items() if n >= p.dry_allowed_length}
    if hits:
        ids = torch.tensor(list(hits), device=logits.device)
        lengths = torch.tensor(list(hits.values()), device=logits.device, dtype=logits.dtype)
        logits[row, ids] -= p.dry_multiplier * p.dry_base ** (lengths - p.dry_allowed_length)


def hold_back_ending(logits: torch.Tensor, row: int, state: RowRules) -> None:
    """In place, before min_tokens new tokens: no end of text and no token that completes a stop
    string (one holding it, or one that finishes what the reply's last bytes start), unless that
    would leave nothing to draw."""
    banned = {state.ctx.eos}
    if state.ctx.token_bytes is not None:
        for stop in state.params.stop:
            data = stop.encode("utf-8")
            banned.update(state.ctx.tokens_holding(data))
            for k in range(1, len(data)):
                if state.tail.endswith(data[:k]):
                    banned.update(state.ctx.tokens_starting(data[k:]))
    ids = torch.tensor(sorted(banned), device=logits.device)
    kept = logits[row].index_fill(0, ids, float("-inf"))
    if torch.isfinite(kept).any():
        logits[row] = kept


def min_p_removed(scaled: torch.Tensor, min_p: float) -> torch.Tensor:
    """(vocab,) bool, as transformers' MinPLogitsWarper: tokens less likely than min_p x the likeliest."""
    probs = scaled.softmax(dim=-1)
    return probs < min_p * probs.max()


def typical_removed(scaled: torch.Tensor, mass: float) -> torch.Tensor:
    """(vocab,) bool, as transformers' TypicalLogitsWarper: keep the tokens whose surprise is closest
    to the distribution's entropy until they hold `mass` (always at least one)."""
    logp = scaled.log_softmax(dim=-1)
    p = logp.exp()
    entropy = -(logp * p).nansum()
    shifted = (-logp - entropy).abs()
    order = shifted.argsort()
    cumulative = p[order].cumsum(dim=-1)
    last_ind = min(int((cumulative < mass).sum()), len(cumulative) - 1)
    threshold = shifted[order][last_ind]
    return shifted > threshold


# -- the copy index of `unique` -------------------------------------------------------------------


def training_run_hits(index: CopyIndex, recent: list[list[int]], tokens: list[int]) -> list[bool]:
    """For each row, whether appending tokens[r] to its reply's last n-1 tokens recent[r] completes an
    n-gram of the training text (False for a reply still shorter than n-1 tokens)."""
    n = index.n
    rows = [r for r, ids in enumerate(recent) if len(ids) >= n - 1]
    hits = [False] * len(recent)
    if rows:
        windows = np.array([recent[r][len(recent[r]) - n + 1 :] + [tokens[r]] for r in rows])
        for r, hit in zip(rows, index.contains(windows), strict=True):
            hits[r] = bool(hit)
    return hits


def mask_training_runs(ctx: RuleContext, rows: list[RowRules | None], logits: torch.Tensor) -> None:
    """In place, for engines that sample after the rules (vLLM): mask each `unique` row's likeliest
    tokens (its top_k, else MAX_COPY_CANDIDATES) that would complete a training run, never its last one."""
    index, n = ctx.copy_index, ctx.copy_index.n
    for i, row in enumerate(rows):
        if row is None or not row.params.unique or row.num_generated < n - 1:
            continue
        k = min(row.params.top_k or MAX_COPY_CANDIDATES, MAX_COPY_CANDIDATES, logits.shape[-1])
        values, ids = logits[i].topk(k)
        ids = ids[torch.isfinite(values)].tolist()
        prefix = row.last_generated(n - 1)
        hit = training_run_hits(index, [prefix] * len(ids), ids) if ids else []
        banned = [t for t, h in zip(ids, hit, strict=True) if h and t != ctx.eos]
        if banned and len(banned) < int(torch.isfinite(logits[i]).sum()):
            logits[i, banned] = float("-inf")


def redraw_training_runs(
    ctx: RuleContext,
    rows: list[RowRules],
    logits: torch.Tensor,
    tokens: list[int],
    draw: Callable[[list[int]], list[int]],
) -> None:
    """In place, for engines that draw first (botkit's): a `unique` row whose drawn token would
    complete a training run draws again without it, `draw(row_indices)` sampling those rows of
    `logits` again (up to BLOCK_TRIES tokens masked, never a row's last allowed one)."""
    index, n = ctx.copy_index, ctx.copy_index.n
    live = [i for i, r in enumerate(rows) if r.params.unique and r.num_generated >= n - 1]
    for _ in range(BLOCK_TRIES):
        live = [i for i in live if tokens[i] != ctx.eos]  # windows never cross an end of text
        if not live:
            return
        hits = training_run_hits(index, [rows[i].last_generated(n - 1) for i in live], [tokens[i] for i in live])
        live = [i for i, hit in zip(live, hits, strict=True) if hit]
        if live:  # one host copy for all rows: a row keeps its last allowed token
            live = [i for i, more in zip(live, (torch.isfinite(logits[live]).sum(1) > 1).tolist(), strict=True) if more]
        if not live:
            return
        logits[live, [tokens[i] for i in live]] = float("-inf")
        for i, token in zip(live, draw(live), strict=True):
            tokens[i] = token
