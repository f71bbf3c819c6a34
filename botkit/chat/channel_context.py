"""Channel context ("read the room"): the chat's recent messages, triggered or not, as the lines of a
chat log, so the model answers knowing what the channel was talking about.

Each message becomes one line through the chat setting `chat_format` ("{author}: {message}\n"); the
bot's own replies are lines by the bot's name; the prompt ends with the bot's turn ("botkit: "),
which the model continues. Oldest lines are dropped, whole, until the prompt fits the budget.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from botkit.chat_format import DEFAULT_NAME, MAX_NAME_CHARS
from botkit.prompting import fit_newest, newest_to_keep

_FIELD = re.compile(r"\{author\}|\{message\}")
_NOT_IN_A_NAME = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")  # a name cannot start a new line of the log


def render(chat_format: str, author: str, message: str) -> str:
    """One line: {author} and {message} substituted in one pass, so neither can inject the other."""
    values = {"{author}": author_name(author), "{message}": message}
    return _FIELD.sub(lambda m: values[m.group()], chat_format)


def author_name(name: str) -> str:
    return _NOT_IN_A_NAME.sub(" ", name).strip()[:MAX_NAME_CHARS] or DEFAULT_NAME


def bot_turn(chat_format: str, bot_name: str) -> str:
    """The start of the bot's line up to where its message goes, without trailing spaces (as
    ChatFormat.bot_turn): what the model continues."""
    return render(chat_format[: chat_format.index("{message}")], bot_name, "").rstrip(" ")


def channel_lines_to_keep(chat_format: str, history: list[tuple[str, str, str | None]], author: str, message: str,
                          bot_name: str, budget_tokens: int, count_tokens: Callable[[str], int]) -> int:
    """How many of the newest messages of `history` to keep (prompting.newest_to_keep: past the
    budget, half of it at once, so the next prompts keep their start and reuse the engine's cache)."""
    sizes = [count_tokens(render(chat_format, who, text) + (render(chat_format, bot_name, reply.strip()) if reply is not None else ""))
             for who, text, reply in history]
    return newest_to_keep(sizes, count_tokens(render(chat_format, author, message) + bot_turn(chat_format, bot_name)), budget_tokens)


def build_channel_prompt(chat_format: str, history: list[tuple[str, str, str | None]], author: str, message: str,
                         bot_name: str, budget_tokens: int, count_tokens: Callable[[str], int]) -> str:
    """`history` is (author, text, the bot's reply or None), oldest first; the new message from
    `author` and the bot's turn follow it."""
    lines = []
    for who, text, reply in history:
        lines.append(render(chat_format, who, text))
        if reply is not None:
            lines.append(render(chat_format, bot_name, reply.strip()))
    return fit_newest(lines, render(chat_format, author, message) + bot_turn(chat_format, bot_name), budget_tokens, count_tokens)
