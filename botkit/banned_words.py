"""Banned words: the normaliser that sees through case, accents, zero-width characters and leetspeak,
the match ("b.a.d" spelled out too), and the bounds of a list given in a config or a chat command.

Shared by every layer: chat settings validate their list with it, the engine's judge refuses a
sample with it."""

from __future__ import annotations

import re
import unicodedata

MAX_BANNED_WORDS = 200
MAX_BANNED_WORD_CHARS = 64

# Besides format characters (Unicode category Cf: zero-width, bidi controls, tags, interlinear
# annotations, musical formatting) and nonspacing marks (Mn, Me: accents, variation selectors, the
# combining grapheme joiner, Mongolian and Khmer invisible vowels), these letters show as blanks.
_BLANK_LETTERS = frozenset("\u115f\u1160\u3164\uffa0")
_INVISIBLE_CATEGORIES = frozenset(("Cf", "Mn", "Me"))
# Letters of other scripts drawn like Latin ones (after casefold). Written out because the one table
# that has them all (Unicode's confusables.txt) maps thousands of characters for a few dozen used here.
_LOOKALIKE = str.maketrans(
    {
        "а": "a",
        "в": "b",
        "е": "e",
        "з": "3",
        "і": "i",
        "ј": "j",
        "к": "k",
        "м": "m",
        "н": "h",
        "о": "o",
        "р": "p",
        "с": "c",
        "т": "t",
        "у": "y",
        "х": "x",
        "ѕ": "s",
        "һ": "h",
        "ԁ": "d",
        "ԛ": "q",
        "ԝ": "w",
        "ɡ": "g",
        "ı": "i",
        "α": "a",
        "β": "b",
        "ε": "e",
        "η": "n",
        "ι": "i",
        "κ": "k",
        "ν": "v",
        "ο": "o",
        "ρ": "p",
        "τ": "t",
        "υ": "u",
        "χ": "x",
        "ω": "w",
        "ɑ": "a",
        "ℓ": "l",
    }
)
_LEET = str.maketrans(
    {
        "0": "o",
        "1": "i",
        "!": "i",
        "|": "i",
        "3": "e",
        "4": "a",
        "@": "a",
        "5": "s",
        "$": "s",
        "7": "t",
        "+": "t",
        "8": "b",
        "9": "g",
        "2": "z",
        "€": "e",
        "£": "l",
    }
)
_NOT_LETTER = re.compile(r"[\W_]+")
_INNER_MARK = re.compile(r"(?<=\w)(?:[^\w\s]|_)+(?=\w)")  # "sh.it", "sh-it": one mark splitting a word
_RIGHT_TO_LEFT = frozenset("\u202b\u202e\u2067")  # text after these is shown reversed


def _letters(text: str) -> str:
    """Lower case, no accents or invisible characters, lookalikes and leetspeak read as Latin letters."""
    text = unicodedata.normalize("NFKD", text.casefold())
    text = "".join(c for c in text if unicodedata.category(c) not in _INVISIBLE_CATEGORIES and c not in _BLANK_LETTERS)
    return text.translate(_LOOKALIKE).translate(_LEET)


def _words(letters: str) -> str:
    return " " + " ".join(_NOT_LETTER.split(letters)).strip() + " "


def normalize(text: str) -> str:
    """Lower case, no accents, no invisible characters, lookalike letters and leetspeak read as Latin
    letters, words separated by single spaces: "Sh1t", "ŞHİT", "ѕһіt" and "s\u200bh\u200bi\u200bt" all become "shit"."""
    return _words(_letters(text))


def _readings(text: str) -> list[str]:
    """`text` normalised as written, with marks inside words dropped ("sh.it"), and, when it holds a
    right-to-left override, reversed (as shown)."""
    letters = _letters(text)
    readings = [_words(letters), _words(_INNER_MARK.sub("", letters))]
    if _RIGHT_TO_LEFT.intersection(text):
        readings += [_words(letters[::-1])]
    return readings


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
    readings = _readings(text)
    spelled = _spelled(readings[0])
    for word in banned:
        target = normalize(word)
        if target.strip() and (
            any(target in r for r in readings) or any(target.replace(" ", "") in run for run in spelled)
        ):
            return word
    return None


def check_banned_words(words, max_words: int = MAX_BANNED_WORDS) -> tuple[str, ...]:
    """A banned-word list as given in a config or a chat command, checked and bounded."""
    if isinstance(words, str):
        words = words.split(",")
    words = tuple(w.strip() for w in words if isinstance(w, str) and w.strip())
    if len(words) > max_words or any(len(w) > MAX_BANNED_WORD_CHARS for w in words):
        raise ValueError(
            f"a banned-word list holds at most {max_words} words of at most {MAX_BANNED_WORD_CHARS} characters"
        )
    return words
