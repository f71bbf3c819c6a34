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

from dataclasses import dataclass

from botkit.banned_words import banned_word_in

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


def judge(text: str, params, tokenizer, index, *, prompt_ids: list[int], finish_reason: str, num_tokens: int, seed: int,
          mean_logprob: float) -> Attempt:
    """A finished draw, judged: its banned word, and with `params.unique` how much it copies the
    run's training text (`index`, a copying.CopyIndex or None) and its prompt."""
    attempt = Attempt(text, finish_reason, num_tokens, seed, mean_logprob, banned=banned_word_in(text, params.banned_words))
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
