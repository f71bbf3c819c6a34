"""Banned words: the normaliser that sees through case, accents, zero-width characters and leetspeak,
the match ("b.a.d" spelled out too), and the bounds of a list given in a config or a chat command.

Shared by every layer: chat settings validate their list with it, the engine's judge refuses a
sample with it."""

from __future__ import annotations

import re
import unicodedata

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
