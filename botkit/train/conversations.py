"""Chat messages into training conversations: split on silences, drop other bots' and excluded
speakers' messages, normalise mentions and links, render each conversation with a ChatFormat.

Exports (`chat_exports.py`) already drop system messages and messages their platform marks as a
bot's; what is left here is the same for every source.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from botkit.chat_format import ChatFormat, clean_name
from botkit.errors import InputError
from botkit.train.data_summary import DataSummary

DEFAULT_GAP_S = 3600.0  # a silence longer than this starts a new conversation
MAX_MESSAGES = 1000  # a conversation that never pauses is cut here (training windows are far shorter anyway)
# longer messages are pastes or spam, not voice: dropped (Discord allows 4,000, Telegram 4,096)
MAX_MESSAGE_CHARS = 20_000
COMMAND_PREFIXES = "!?.-/"  # "!rank", "?help", ".play", "-skip", "/start@bot": a prefix, then a word
COMMANDS, ANSWERS = "bot commands", "answers to a bot command"  # drop reasons in the data summary
COMMAND_REPLY_S = 5.0  # a bot answers a command within a second or two; a person rarely writes this soon after it

USER = "@user"  # what every mention becomes: no handle, id or name of the person mentioned reaches the training text
LINK = "<link>"
EMAIL = "<email>"

_DISCORD_USER = re.compile(r"<@!?\d+>")
_DISCORD_ROLE = re.compile(r"<@&\d+>")
_DISCORD_CHANNEL = re.compile(r"<#\d+>")
_DISCORD_EMOJI = re.compile(r"<a?:(\w{1,64}):\d+>")  # custom emoji keep their name, lose their id
# Links, Telegram's profile links (tg://user?id=, t.me/name) included: they name people.
_URL = re.compile(
    r"(?:https?://|www\.|tg://|(?<![\w.])(?:t\.me|telegram\.me|telegram\.dog)/)[^\s<>\"']*", re.IGNORECASE
)
# Starts only where a run of address characters starts: tried at every position of a long word,
# the match would rescan the rest of it each time (quadratic: 71 s for a 160,000-character message).
_EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_HANDLE = re.compile(r"(?<![\w@])@\w[\w.]*")  # @name, @everyone, @here; not the middle of an email
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")  # C0/C1 controls except tab and line breaks
_LINE_BREAK = re.compile(r"\r\n|[\r\u2028\u2029\x85]")


@dataclass(frozen=True)
class ChatMessage:
    chat: str  # messages of different chats never share a conversation
    speaker: str  # display name, as the chat showed it
    text: str
    time_s: float | None = None  # Unix time; None: unknown (no split on silence)


@dataclass(frozen=True)
class ConversationOptions:
    """How chat exports become training text (`finetune(..., chat_format=..., conversation_gap_s=...)`)."""

    chat_format: ChatFormat = field(default_factory=ChatFormat)
    gap_s: float = DEFAULT_GAP_S
    exclude_speakers: frozenset[str] = frozenset()  # names to drop, e.g. bots a Telegram or CSV export does not mark
    anonymize_speakers: bool = False  # speakers become user1, user2, ... (a CSV export names people by their username)
    # a message of a prefix then a word is a bot command: dropped with its answer ("" = keep)
    command_prefixes: str = COMMAND_PREFIXES

    @classmethod
    def of(
        cls,
        chat_format: ChatFormat | str | None = None,
        gap_s: float = DEFAULT_GAP_S,
        exclude_speakers: str | Iterable[str] = "",
        anonymize_speakers: bool = False,
        command_prefixes: str = COMMAND_PREFIXES,
    ) -> ConversationOptions:
        """From `finetune`'s arguments: a format or its JSON/path, and names comma-separated or listed."""
        fmt = (
            ChatFormat.parse(chat_format)
            if isinstance(chat_format, str) and chat_format
            else chat_format or ChatFormat()
        )
        names = exclude_speakers.split(",") if isinstance(exclude_speakers, str) else exclude_speakers
        if not isinstance(command_prefixes, str) or any(c.isalnum() or c.isspace() for c in command_prefixes):
            raise InputError(
                f"command_prefixes must be punctuation characters such as {COMMAND_PREFIXES!r} (or '' to "
                "keep commands), "
                f"not {command_prefixes!r}."
            )
        return cls(
            fmt,
            float(gap_s),
            frozenset(clean_name(n).casefold() for n in names if n.strip()),
            bool(anonymize_speakers),
            command_prefixes,
        )

    def is_command(self, text: str) -> bool:
        """ "!rank", "/start@bot", "?help me": a prefix then a letter. "- water" (a list), "...", "?!" and "-5" are
        talk."""
        return len(text) > 1 and text[0] in self.command_prefixes and text[1].isalpha()


def normalise(text: str, mentioned: Iterable[str] = ()) -> str:
    """A message fit for training text: every mention becomes "@user", links "<link>", emails
    "<email>"; Discord's raw markup loses its ids; line breaks become "\\n"; controls go.
    `mentioned` are display names the export says this message mentions ("@Some Name" has spaces)."""
    text = _LINE_BREAK.sub("\n", text)
    text = _CONTROL.sub("", text)
    for name in sorted({n for n in mentioned if n}, key=len, reverse=True):
        text = text.replace("@" + name, USER)
    text = _DISCORD_USER.sub(USER, text)
    text = _DISCORD_ROLE.sub(USER, text)
    text = _DISCORD_CHANNEL.sub("#channel", text)
    text = _DISCORD_EMOJI.sub(r":\1:", text)
    text = _URL.sub(LINK, text)
    text = _EMAIL.sub(EMAIL, text)
    text = _HANDLE.sub(USER, text)
    return text.strip()


def conversations(
    messages: Iterable[ChatMessage],
    gap_s: float = DEFAULT_GAP_S,
    exclude_speakers: frozenset[str] = frozenset(),
    options: ConversationOptions | None = None,
    summary: DataSummary | None = None,
) -> Iterator[list[ChatMessage]]:
    """Consecutive messages of one chat, split where the chat changes, after a silence longer than
    `gap_s`, when time runs backwards by more than that, or at MAX_MESSAGES. Empty and overlong
    messages, excluded speakers, bot commands (`options.command_prefixes`) and their answers are
    dropped, each counted in `summary` by reason. Streams: holds one conversation at a time."""
    summary = summary if summary is not None else DataSummary()
    is_command = options.is_command if options is not None else ConversationOptions().is_command
    current: list[ChatMessage] = []
    last_time: float | None = None
    command, answerer = None, None  # the last command while its answer may still come, and who answered it
    for message in messages:
        reason = _drop_reason(message, exclude_speakers, is_command)
        if reason is None and command is not None and _answers(message, command, answerer):
            reason = ANSWERS
            answerer = clean_name(message.speaker)
            command = dataclasses.replace(command, time_s=message.time_s)  # an answer in several messages
        elif reason == COMMANDS:
            command, answerer = message, None
        elif reason is None:
            command = None
        if reason is not None:
            summary.drop(reason)
            continue
        summary.keep(clean_name(message.speaker))
        if current and (
            message.chat != current[-1].chat
            or len(current) >= MAX_MESSAGES
            or _silent(last_time, message.time_s, gap_s)
        ):
            yield current
            current = []
        current.append(message)
        last_time = message.time_s if message.time_s is not None else last_time
    if current:
        yield current


def _drop_reason(message: ChatMessage, exclude_speakers: frozenset[str], is_command) -> str | None:
    if not message.text:
        return "empty (an attachment or a sticker alone)"
    if len(message.text) > MAX_MESSAGE_CHARS:
        return f"longer than {MAX_MESSAGE_CHARS:,} characters (pastes)"
    if exclude_speakers and clean_name(message.speaker).casefold() in exclude_speakers:
        return "excluded speakers"
    if is_command(message.text):
        return COMMANDS
    return None


def _answers(message: ChatMessage, command: ChatMessage, answerer: str | None) -> bool:
    """A message from someone else in the same chat (the one who answered already, if any), within
    COMMAND_REPLY_S of the command or of the answer's previous part: a bot answering. Without times
    nothing counts as an answer (a CSV or Telegram export without them: name the bot in exclude_speakers)."""
    speaker = clean_name(message.speaker)
    return (
        message.chat == command.chat
        and speaker != clean_name(command.speaker)
        and answerer in (None, speaker)
        and message.time_s is not None
        and command.time_s is not None
        and 0 <= message.time_s - command.time_s <= COMMAND_REPLY_S
    )


def _silent(before: float | None, now: float | None, gap_s: float) -> bool:
    return before is not None and now is not None and abs(now - before) > gap_s


def render_conversations(
    messages: Iterable[ChatMessage],
    options: ConversationOptions,
    pseudonyms: dict[str, str] | None = None,
    summary: DataSummary | None = None,
) -> Iterator[str]:
    """Each conversation as training text in `options.chat_format`. With `anonymize_speakers`, each
    name gets a pseudonym in order of first appearance, kept in `pseudonyms` (one per dataset)."""
    pseudonyms = {} if pseudonyms is None else pseudonyms
    summary = summary if summary is not None else DataSummary()
    for conversation in conversations(messages, options.gap_s, options.exclude_speakers, options, summary):
        if options.anonymize_speakers:
            names = [
                pseudonyms.setdefault(clean_name(m.speaker).casefold(), f"user{len(pseudonyms) + 1}")
                for m in conversation
            ]
        else:
            names = [m.speaker for m in conversation]
        text = options.chat_format.render(zip(names, (m.text for m in conversation), strict=True))
        summary.conversation(text)
        yield text
