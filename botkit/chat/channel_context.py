"""Channel context ("read the room"): the chat's recent messages, triggered or not, as the lines of a
chat log, so the model answers knowing what the channel was talking about.

Each message becomes one line of the chat's ChatFormat (the chat setting `chat_format`, "{name}:
{message}\\n", or the run's own format); the bot's own replies are lines by the bot's name; the
prompt ends with the bot's turn ("botkit:"), which the model continues. Oldest lines are dropped,
whole, until the prompt fits the budget.
"""

from __future__ import annotations

from collections.abc import Callable

from botkit.chat_format import ChatFormat
from botkit.prompting import fit_newest, newest_to_keep

History = list[tuple[str, str, str | None]]  # (author, text, the bot's reply or None), oldest first


def _lines(fmt: ChatFormat, author: str, text: str, reply: str | None, bot_name: str) -> str:
    return fmt.line(author, text) + (fmt.line(bot_name, reply.strip()) if reply is not None else "")


def channel_lines_to_keep(
    fmt: ChatFormat,
    history: History,
    author: str,
    message: str,
    bot_name: str,
    budget_tokens: int,
    count_tokens: Callable[[str], int],
) -> int:
    """How many of the newest messages of `history` to keep (prompting.newest_to_keep: past the
    budget, half of it at once, so the next prompts keep their start and reuse the engine's cache)."""
    sizes = [count_tokens(_lines(fmt, who, text, reply, bot_name)) for who, text, reply in history]
    return newest_to_keep(sizes, count_tokens(fmt.line(author, message) + fmt.bot_turn(bot_name)), budget_tokens)


def build_channel_prompt(
    fmt: ChatFormat,
    history: History,
    author: str,
    message: str,
    bot_name: str,
    budget_tokens: int,
    count_tokens: Callable[[str], int],
) -> str:
    """`history`, then the new message from `author` and the bot's turn, the oldest lines dropped to fit."""
    lines = [_lines(fmt, who, text, reply, bot_name) for who, text, reply in history]
    return fit_newest(lines, fmt.line(author, message) + fmt.bot_turn(bot_name), budget_tokens, count_tokens)
