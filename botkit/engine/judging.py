"""Which sample a request sends: banned words, copying, and the best of several candidates.

A finished sample is judged before anyone sees it. One that holds a banned word (matched after
normalising case, accents, zero-width characters and leetspeak) or copies its training text (a run
of 8 tokens, or a whole short training text or more than half of one: training_texts.py) or the
chat's own context (copy_index.py; sampling already keeps a `unique` row off 8-token runs of the
training text, engine.py) is drawn again with a new seed, up to MAX_RESAMPLES times. Then
the request sends the best sample it drew: never a banned one (if every sample is banned the
request fails), else one that does not copy if there is one, else the least copying; among equals
the one with the best score:

    score = mean log-likelihood of its tokens under the model (nats per token) - COPY_PENALTY * share copied

so with `candidates = n` the n samples drawn together compete on how likely the model finds them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from botkit.banned_words import banned_word_in
from botkit.engine.sequence import Event, Sequence

MAX_RESAMPLES = 3  # draws after the first, per sample, while it is banned or copies
COPY_PENALTY = 5.0  # nats per token taken off a sample copying all of itself


@dataclass
class Attempt:
    """One finished draw of a sample."""

    text: str
    finish_reason: str
    num_tokens: int
    seed: int
    mean_logprob: float  # nats per generated token under the model
    copy_share: float = 0.0  # share of the reply copied from its training text or its context
    copies: bool = False
    banned: str | None = None

    @property
    def score(self) -> float:
        return self.mean_logprob - COPY_PENALTY * self.copy_share


def judge(
    text: str,
    params,
    tokenizer,
    index,
    *,
    prompt_ids: list[int],
    finish_reason: str,
    num_tokens: int,
    seed: int,
    mean_logprob: float,
) -> Attempt:
    """A finished draw, judged: its banned word, and with `params.unique` how much it copies the
    run's training text (`index`, a copying.CopyIndex or None) and its prompt."""
    attempt = Attempt(
        text, finish_reason, num_tokens, seed, mean_logprob, banned=banned_word_in(text, params.banned_words)
    )
    if params.unique and text.strip():
        from botkit.engine.copy_index import check_copying  # numpy, only when judging

        report = check_copying(tokenizer(text, verbose=False).input_ids, index, prompt_ids)
        attempt.copy_share, attempt.copies = report.share, report.is_copy
        covered = index.texts.covered(text) if index is not None and index.texts is not None else 0.0
        if covered:  # a whole training text, or more than half of one (training_texts.py)
            attempt.copy_share, attempt.copies = max(attempt.copy_share, covered), True
    return attempt


def best(attempts: list[Attempt]) -> Attempt | None:
    """The attempt to send: never a banned one; one that does not copy if any; then the best score."""
    allowed = [a for a in attempts if a.banned is None]
    if not allowed:
        return None
    return max(allowed, key=lambda a: (not a.copies, a.score))


class Judge:
    """The engine's plug-in for judged rows (banned words, `unique`, `candidates`), called when one
    finishes: `redraws(seq)` records the draw and says whether to draw it again; `settle(seq)` hands
    out the request's one event once every candidate is done."""

    def __init__(self, tokenizer, copy_index: Callable[[], object | None]):
        # copy_index: the run's CopyIndex, loaded when first asked
        self.tokenizer, self.copy_index = tokenizer, copy_index

    def redraws(self, seq: Sequence) -> bool:
        """True if the finished draw holds a banned word or copies, and may be drawn again (sampled, with draws
        left)."""
        seq.text = seq.text.rstrip("\ufffd")
        attempt = judge(
            seq.text,
            seq.params,
            self.tokenizer,
            self.copy_index(),
            prompt_ids=seq.prompt_ids[seq.offset :],
            finish_reason=seq.finish_reason,
            num_tokens=len(seq.generated),
            seed=seq.seed,
            mean_logprob=seq.logprob_sum / max(1, len(seq.generated)),
        )
        seq.attempts.append(attempt)
        # (a greedy row would draw the same again)
        return (
            bool(attempt.banned or attempt.copies)
            and seq.params.temperature != 0
            and len(seq.attempts) <= MAX_RESAMPLES
        )

    @staticmethod
    def settle(seq: Sequence) -> list[Event]:
        """Once every candidate of the request is done, the request's one event: the best draw."""
        group = seq.group or [seq]
        seq.result = Attempt("", "", 0, seq.seed, 0.0)  # a marker: this candidate is done
        if any(m.result is None for m in group):
            return []
        leader = group[0]
        chosen = best([a for m in group for a in m.attempts])
        leader.result = chosen
        if chosen is None:
            tried = sum(len(m.attempts) for m in group)
            leader.finish_reason = "error"
            leader.error = (
                f"each of {tried} draws held a banned word" if tried else leader.error or "no candidate finished"
            )
            return [Event(leader, "", True)]
        leader.text, leader.finish_reason, leader.seed = chosen.text, chosen.finish_reason, chosen.seed
        return [Event(leader, chosen.text, True)]
