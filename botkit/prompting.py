"""Turning a chat message into the text the model continues: cleaning, template, context."""

from __future__ import annotations

import re
from collections.abc import Callable

from botkit.errors import InputError

MAX_TEMPLATE_CHARS = 1000
PLACEHOLDER = "{message}"


def check_template(template: str) -> None:
    """A prompt template holds `{message}` exactly once and otherwise literal text (`{{` and `}}` for
    braces). It is never given to str.format: a format spec such as `{message:>20000000}` or an
    attribute such as `{message.__class__}` would be live there."""
    if not isinstance(template, str) or len(template) > MAX_TEMPLATE_CHARS:
        raise InputError(f"The prompt template must be text of at most {MAX_TEMPLATE_CHARS} characters.")
    literal = template.split(PLACEHOLDER)
    if len(literal) != 2:
        raise InputError(
            "The prompt template must hold the placeholder {message} exactly once (for example Q: {message}\\nA:)."
        )
    if any(
        part.replace("{{", "").replace("}}", "").count("{") or part.replace("{{", "").replace("}}", "").count("}")
        for part in literal
    ):
        raise InputError(
            "The prompt template may hold no placeholder but {message}: write {{ and }} for literal braces."
        )


def fill_template(template: str, message: str) -> str:
    """`template` with `message` in place of its `{message}` (the template was checked by check_template)."""
    before, after = template.split(PLACEHOLDER, 1)
    unescape = lambda part: part.replace("{{", "{").replace("}}", "}")  # noqa: E731
    return unescape(before) + message + unescape(after)


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0/C1 controls except tab and newline
_INVISIBLE = re.compile(r"[\s\u200b-\u200f\u2060-\u2064\ufeff\u00ad]+")


def clean_message(text: str, max_chars: int) -> str:
    """The message as the model should see it, or an InputError that says what is wrong."""
    if not isinstance(text, str):
        raise InputError("The message must be text.")
    text = text.encode("utf-8", "replace").decode("utf-8")  # lone surrogates become "?"
    text = _CONTROL.sub("", text).replace("\r\n", "\n")
    if not _INVISIBLE.sub("", text):
        raise InputError("The message is empty: write some text for me to continue.")
    if len(text) > max_chars:
        raise InputError(f"The message is {len(text)} characters long; send at most {max_chars}.")
    return text


def build_prompt(
    template: str,
    message: str,
    history: list[tuple[str, str]],
    separator: str,
    budget_tokens: int,
    count_tokens: Callable[[str], int],
) -> str:
    """`history` (oldest first) rendered with the template, then the new message; the oldest
    exchanges are dropped until the whole fits `budget_tokens` (the window minus the reply length)."""
    pieces = [fill_template(template, m) + reply + separator for m, reply in history]
    return fit_newest(pieces, fill_template(template, message), budget_tokens, count_tokens)


def fit_newest(pieces: list[str], current: str, budget_tokens: int, count_tokens: Callable[[str], int]) -> str:
    """The newest `pieces` (oldest first), whole, then `current`: the oldest dropped until it fits."""
    pieces, sizes = list(pieces), [count_tokens(p) for p in pieces]
    total = count_tokens(current) + sum(sizes)
    while pieces and total > budget_tokens:
        total -= sizes.pop(0)
        pieces.pop(0)
    while pieces and count_tokens("".join(pieces) + current) > budget_tokens:  # merges across joins
        pieces.pop(0)
    return "".join(pieces) + current


def history_to_keep(
    template: str,
    message: str,
    history: list[tuple[str, str]],
    separator: str,
    budget_tokens: int,
    count_tokens: Callable[[str], int],
) -> int:
    """How many of the newest exchanges of `history` to keep (see newest_to_keep)."""
    sizes = [count_tokens(fill_template(template, m) + reply + separator) for m, reply in history]
    return newest_to_keep(sizes, count_tokens(fill_template(template, message)), budget_tokens)


def newest_to_keep(sizes: list[int], current: int, budget_tokens: int) -> int:
    """How many of the newest pieces of context (token `sizes`, oldest first) to keep before the
    `current` message: all while they fit the budget; past it, only as many as fit half the budget.
    Dropping half at once, rather than the oldest piece on every turn, keeps the prompt's start the
    same for the next turns, so the engine reuses their keys and values (prefix_cache.py) instead of
    recomputing the whole conversation."""
    if current + sum(sizes) <= budget_tokens:
        return len(sizes)
    keep, total = 0, current
    while keep < len(sizes) and total + sizes[-1 - keep] <= budget_tokens // 2:
        total += sizes[-1 - keep]
        keep += 1
    return keep
