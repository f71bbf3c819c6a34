"""Readers for chat exports, streamed message by message (an export can be gigabytes):

- DiscordChatExporter JSON (`messages[]` with `author{name,nickname,isBot}`, `type`, `timestamp`,
  `content`, `mentions[]`) and CSV (`AuthorID,Author,Date,Content,Attachments,Reactions`);
- Telegram Desktop's `result.json`, one chat (`messages[]`) or a full export (`chats.list[].messages[]`,
  group chats only: personal chats, bots and saved messages are left out), `text` a string or a list
  of strings and entity objects, `text_entities`, `from`, `date_unixtime`;
- botkit's own `botkit export-dataset` JSONL (a `{"format": "botkit-chat"}` line, then one message a line).

The shape is read from the content. System and service messages, messages the platform marks as a
bot's and forwards are dropped here (bot commands and their answers later, in `conversations.py`,
the same for every shape); mentions and links are normalised here (the export knows who was mentioned). Malformed
input is one DatasetError sentence.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from botkit.errors import DatasetError
from botkit.train.conversations import EMAIL, LINK, USER, ChatMessage, normalise
from botkit.train.data_summary import DataSummary

log = logging.getLogger("botkit")

DISCORD_CSV_HEADER = ("AuthorID", "Author", "Date", "Content")  # then Attachments, Reactions
DISCORD_KINDS = ("Default", "Reply")  # the rest are system messages (joins, pins, calls, thread starts)
TELEGRAM_GROUPS = ("private_group", "private_supergroup", "public_supergroup", "public_group")
BOTKIT_FORMAT = "botkit-chat"
MESSAGE_PATHS = (("messages", "item"), ("chats", "list", "item", "messages", "item"))
MAX_DEPTH = 64  # no export nests this deep; a hostile one nested 100,000 deep must not cost quadratic time
CSV_FIELD_LIMIT = 64 * 1024 * 1024  # csv's default of 128 KiB refuses a long but legitimate row
NOT_TALK = "system messages, marked bots, forwards and other chats"  # a drop reason in the data summary
_DISCRIMINATOR = re.compile(r"#\d{1,4}$")


# -- JSON: DiscordChatExporter and Telegram Desktop ---------------------------------------------------


def json_messages(path: Path, summary: DataSummary | None = None) -> Iterator[ChatMessage]:
    """Messages of a DiscordChatExporter JSON export or a Telegram Desktop result.json; what the
    platform marks as not a person's talk is counted in `summary`."""
    import ijson  # C parser; a stream of events, never the whole document

    kind, chat_type, chat_index, builder, untimed, total = None, None, 0, None, 0, 0
    with path.open("rb") as f:
        if f.read(3) != b"\xef\xbb\xbf":
            f.seek(0)
        try:
            for where, event, value in _events(ijson.basic_parse(f, use_float=True), path):
                if builder is not None:
                    builder.event(event, value)
                    if event == "end_map" and where in MESSAGE_PATHS:
                        record, builder = builder.value, None
                        kind = kind or _kind(record, path)
                        skip = where != MESSAGE_PATHS[0] and chat_type not in TELEGRAM_GROUPS
                        message = (
                            None
                            if skip
                            else _discord(record, path)
                            if kind == "discord"
                            else _telegram(record, f"{path}#{chat_index}")
                        )
                        if message is not None:
                            total += 1
                            untimed += message.time_s is None
                            yield message
                        elif summary is not None:
                            summary.drop(NOT_TALK)
                elif event == "start_map" and where in MESSAGE_PATHS:
                    builder = ijson.ObjectBuilder()
                    builder.event(event, value)
                elif event == "start_map" and where == ("chats", "list", "item"):
                    chat_index, chat_type = chat_index + 1, None
                elif event == "string" and where == ("chats", "list", "item", "type"):
                    chat_type = value
        except ijson.JSONError as exc:
            reason = str(exc).splitlines()[0].strip() if str(exc).strip() else "it ends early"
            raise DatasetError(f"{path} is not valid JSON ({reason[:80]}): export it again.") from None
    if kind is None:
        raise DatasetError(
            f"{path} holds no messages where a DiscordChatExporter JSON export or a Telegram Desktop "
            "result.json has them: export the chat as JSON with one of those tools, or name the file "
            ".txt to train on its raw text."
        )
    _warn_untimed(path, untimed, total)


def _events(events, path: Path):
    """(path, event, value) with the path as a tuple of keys ("item" for array entries), depth-bounded."""
    stack: list = []
    for event, value in events:
        if event == "map_key":
            stack[-1] = value
            yield None, event, value
            continue
        if event in ("end_map", "end_array"):
            stack.pop()
            yield tuple(stack), event, value
            continue
        yield tuple(stack), event, value
        if event in ("start_map", "start_array"):
            stack.append(None if event == "start_map" else "item")
            if len(stack) > MAX_DEPTH:
                raise DatasetError(
                    f"{path} is nested more than {MAX_DEPTH} levels deep, which no chat export is: pass "
                    "the export file itself."
                )


def _kind(record, path: Path) -> str:
    if isinstance(record, dict) and isinstance(record.get("author"), dict):
        return "discord"
    if isinstance(record, dict) and record.get("type") in ("message", "service"):
        return "telegram"
    raise DatasetError(
        f"{path} is JSON, but its messages are neither DiscordChatExporter's nor Telegram Desktop's: "
        "export the chat as JSON with one of those tools."
    )


def _discord(m, chat: Path) -> ChatMessage | None:
    author, content = m.get("author"), m.get("content")
    if (
        m.get("type") not in DISCORD_KINDS
        or not isinstance(author, dict)
        or author.get("isBot") is True
        or not isinstance(content, str)
    ):
        return None  # a system message, a bot's (or a webhook's), or no text
    mentioned = []
    for who in m.get("mentions") if isinstance(m.get("mentions"), list) else ():
        if isinstance(who, dict):
            mentioned += [v for v in (who.get("nickname"), who.get("name")) if isinstance(v, str)]
    name = _text(author.get("nickname")) or _DISCRIMINATOR.sub("", _text(author.get("name")))
    return ChatMessage(str(chat), name, normalise(content, mentioned), _time(m.get("timestamp")))


_ENTITY_TEXT = {"mention": USER, "mention_name": USER, "link": LINK, "email": EMAIL, "phone": "<phone>"}


def _telegram(m, chat: str) -> ChatMessage | None:
    if m.get("type") != "message" or m.get("via_bot") or m.get("forwarded_from") is not None:
        return None  # a service message, an inline bot's, or a forward (someone else's words)
    parts = m.get("text_entities") if isinstance(m.get("text_entities"), list) else m.get("text")
    parts = [parts] if isinstance(parts, str) else parts if isinstance(parts, list) else []
    pieces = []
    for part in parts:
        if isinstance(part, str):
            pieces.append(part)
        elif isinstance(part, dict) and isinstance(part.get("text"), str):
            pieces.append(_ENTITY_TEXT.get(part.get("type"), part["text"]))
    time_s = _time(m.get("date"))
    if isinstance(m.get("date_unixtime"), str) and re.fullmatch(r"[0-9]{1,11}", m["date_unixtime"]):  # not "²" or "٣"
        time_s = float(m["date_unixtime"])
    return ChatMessage(chat, _text(m.get("from")), normalise("".join(pieces)), time_s)


# -- CSV: DiscordChatExporter -------------------------------------------------------------------------


def is_discord_csv(header: list[str]) -> bool:
    return tuple(h.strip().lstrip("\ufeff") for h in header[: len(DISCORD_CSV_HEADER)]) == DISCORD_CSV_HEADER


def discord_csv_messages(path: Path, rows: Iterator[list[str]]) -> Iterator[ChatMessage]:
    """Messages of DiscordChatExporter's CSV (its header already read). CSV has no bot flag: name
    bots in `exclude_speakers`."""
    untimed = total = 0
    for row in rows:
        if len(row) < len(DISCORD_CSV_HEADER):
            continue
        _, author, date, content = row[: len(DISCORD_CSV_HEADER)]
        message = ChatMessage(str(path), _DISCRIMINATOR.sub("", author), normalise(content), _time(date))
        total += 1
        untimed += message.time_s is None
        yield message
    _warn_untimed(path, untimed, total)


# -- JSONL: botkit export-dataset ---------------------------------------------------------------------


def is_botkit_header(line: str) -> bool:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, RecursionError):
        return False
    return isinstance(record, dict) and record.get("format") == BOTKIT_FORMAT


def botkit_messages(path: Path, lines: Iterator[tuple[int, str]]) -> Iterator[ChatMessage]:
    """Messages of `botkit export-dataset`'s JSONL (its header line already read)."""
    for line_no, line in lines:
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            raise DatasetError(f"{path} line {line_no} is not valid JSON: export the dataset again.") from None
        if not (
            isinstance(r, dict)
            and isinstance(r.get("chat"), str)
            and isinstance(r.get("speaker"), str)
            and isinstance(r.get("text"), str)
            and isinstance(r.get("time_s"), int | float)
            and not isinstance(r.get("time_s"), bool)
        ):
            raise DatasetError(
                f"{path} line {line_no} is not a message with chat, speaker, text and time_s: export the dataset again."
            )
        yield ChatMessage(r["chat"], r["speaker"], normalise(r["text"]), float(r["time_s"]))


def botkit_header() -> str:
    return json.dumps({"format": BOTKIT_FORMAT, "version": 1})


# -- shared -------------------------------------------------------------------------------------------


def _text(value) -> str:
    return value if isinstance(value, str) else ""


def _time(value) -> float | None:
    """Unix seconds of an ISO 8601 time (DiscordChatExporter's, Telegram's `date`); a time without a
    zone counts as UTC (only the gaps between messages matter); None if unreadable."""
    if not isinstance(value, str) or len(value) > 64:
        return None
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def _warn_untimed(path: Path, untimed: int, total: int) -> None:
    if untimed:
        log.warning(
            "%d of %d messages in %s have no readable time: conversations there are split only every %s messages.",
            untimed,
            total,
            path,
            "1,000",
        )


def raise_csv_limit() -> None:
    """Let the csv module read fields up to CSV_FIELD_LIMIT characters (a process-wide setting)."""
    if csv.field_size_limit() < CSV_FIELD_LIMIT:
        csv.field_size_limit(CSV_FIELD_LIMIT)
