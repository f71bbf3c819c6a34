"""Which sample a request sends: banned words, copying, and the best of several candidates.

A finished sample is judged before anyone sees it. One that holds a banned word (matched after
normalising case, accents, zero-width characters and leetspeak) or copies its training text or the
chat's own context (copying.py; sampling already keeps a `unique` row off 8-token runs of the
training text, engine.py) is drawn again with a new seed, up to MAX_RESAMPLES times. Then
the request sends the best sample it drew: never a banned one (if every sample is banned the
request fails), else one that does not copy if there is one, else the least copying; among equals
the one with the best score:

    score = mean log-likelihood of its tokens under the model (nats per token) - COPY_PENALTY * share copied

so with `candidates = n` the n samples drawn together compete on how likely the model finds them.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

MAX_RESAMPLES = 3  # draws after the first, per sample, while it is banned or copies
COPY_PENALTY = 5.0  # nats per token taken off a sample copying all of itself
MAX_BANNED_WORDS = 200
MAX_BANNED_WORD_CHARS = 64

_INVISIBLE = re.compile(r"[\u00ad\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")
_LEET = str.maketrans({"0": "o", "1": "i", "!": "i", "|": "i", "3": "e", "4": "a", "@": "a", "5": "s", "$": "s", "7": "t",
                       "+": "t", "8": "b", "9": "g", "2": "z", "€": "e", "£": "l"})
_NOT_LETTER = re.compile(r"[^\w]+")


def normalize(text: str) -> str:
    """Lower case, no accents, no zero-width characters, leetspeak read as letters, words separated
    by single spaces: "Sh1t", "ŞHİT" and "s\u200bh\u200bi\u200bt" all become "shit"."""
    text = _INVISIBLE.sub("", text)
    text = unicodedata.normalize("NFKD", text.casefold())
    text = "".join(c for c in text if not unicodedata.combining(c)).translate(_LEET)
    return " " + " ".join(_NOT_LETTER.split(text)).strip() + " "


def _spelled(normalized: str) -> list[str]:
    """Runs of single letters ("b a d", from "b.a.d" or "b-a-d"), each joined into one string."""
    runs, run = [], ""
    for word in normalized.split():
        if len(word) == 1:
            run += word
        elif run:
            runs, run = runs + [run], ""
    return runs + [run] if run else runs


def banned_word_in(text: str, banned: tuple[str, ...]) -> str | None:
    """The first banned word (or phrase) `text` holds as a whole word, or spelled out letter by
    letter ("s.h.i.t"), or None."""
    if not banned:
        return None
    plain = normalize(text)
    spelled = _spelled(plain)
    for word in banned:
        target = normalize(word)
        if target.strip() and (target in plain or any(target.replace(" ", "") in run for run in spelled)):
            return word
    return None


def check_banned_words(words) -> tuple[str, ...]:
    """A banned-word list as given in a config or a chat command, checked and bounded."""
    if isinstance(words, str):
        words = words.split(",")
    words = tuple(w.strip() for w in words if isinstance(w, str) and w.strip())
    if len(words) > MAX_BANNED_WORDS or any(len(w) > MAX_BANNED_WORD_CHARS for w in words):
        raise ValueError(f"a banned-word list holds at most {MAX_BANNED_WORDS} words of at most {MAX_BANNED_WORD_CHARS} characters")
    return words


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
        from .copying import check_copying  # numpy, only when judging

        report = check_copying(tokenizer(text, verbose=False).input_ids, index, prompt_ids)
        attempt.copy_share, attempt.copies = report.share, report.is_copy
    return attempt


def best(attempts: list[Attempt]) -> Attempt | None:
    """The attempt to send: never a banned one; one that does not copy if any; then the best score."""
    allowed = [a for a in attempts if a.banned is None]
    if not allowed:
        return None
    return max(allowed, key=lambda a: (not a.copies, a.score))
