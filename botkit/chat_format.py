"""How a conversation becomes text: one format for the training data and for the prompts a bot
continues, recorded in the run folder (`chat_format.json`) so serving uses what training used.

    alice: anyone up for pizza?        <- speaker = "{name}: {message}", one line per message
    bob: always                        <- separator = "\\n" after each message
    <|endoftext|>                      <- end: after the conversation (training text only)

A bot's prompt is the history in the same lines, then its own speaker prefix without its trailing
space ("gptbot:"): a byte-level BPE spells " word" as one token, so in training a speaker's colon is
followed by a token that starts with the space, never by a lone space (a prompt ending in "gptbot: "
cost the true reply 53 nats instead of 4 in benchmarks/quality.py). The reply ends before `truncate`. Placeholders are
replaced literally, never with `str.format`, so a message or
name such as "{message:>20000000}" stays text.

Chats use the same format for channel context (the chat setting `chat_format` is one message's line,
`ChatFormat.from_line`), so a run trained on a community's chats is served in the lines it learnt.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from botkit.errors import InputError
from botkit.prompting import fit_newest

CHAT_FORMAT_JSON = "chat_format.json"
NAME = "{name}"
MESSAGE = "{message}"
MAX_FIELD_CHARS = 200  # a format is a few characters of punctuation; a long one is a mistake or an attack
MAX_NAME_CHARS = 64
DEFAULT_NAME = "someone"  # a speaker whose name is empty after cleaning
_LINE_BREAKS = re.compile(r"\r\n|[\n\r\u2028\u2029\x85]")
# controls and line breaks; braces keep templates unambiguous
_NAME_JUNK = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029{}]+")


@dataclass(frozen=True)
class ChatFormat:
    speaker: str = "{name}: {message}"  # one message; {name} is optional, {message} required
    separator: str = "\n"  # after each message
    truncate: str = "\n"  # a generated reply ends before this ("" = at the end token or length)
    end: str = "<|endoftext|>"  # after each conversation in the training text
    # A line break inside a message, so a multi-line message stays one line of its speaker (the bot's
    # reply ends at the separator); replies are decoded back. "" = written raw.
    line_break: str = "<br>"

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, str):
                raise InputError(f"The chat format's {field.name} must be text, not {type(value).__name__}.")
            if len(value) > MAX_FIELD_CHARS:
                raise InputError(
                    f"The chat format's {field.name} is {len(value)} characters long: keep it under {MAX_FIELD_CHARS}."
                )
        rest = self.speaker.replace(MESSAGE, "", 1).replace(NAME, "", 1)
        if self.speaker.count(MESSAGE) != 1 or self.speaker.count(NAME) > 1 or "{" in rest or "}" in rest:
            raise InputError(
                f"The chat format's speaker {self.speaker!r} must contain {MESSAGE} once, {NAME} at most "
                "once, and no other braces."
            )
        if NAME in self.speaker and self.speaker.index(NAME) > self.speaker.index(MESSAGE):
            raise InputError(
                f"The chat format's speaker {self.speaker!r} must put {NAME} before {MESSAGE}, so a "
                "prompt can end with the bot's name."
            )
        for name in ("separator", "truncate", "end", "line_break"):
            if "{" in getattr(self, name) or "}" in getattr(self, name):
                raise InputError(f"The chat format's {name} must not contain braces.")
        if self.line_break and (
            "\n" in self.line_break or "\r" in self.line_break or (self.truncate and self.truncate in self.line_break)
        ):
            raise InputError(
                f"The chat format's line_break {self.line_break!r} must be on one line and not contain "
                "truncate: "
                "it stands for a line break inside a message."
            )
        if not self.separator:
            raise InputError("The chat format's separator must not be empty: messages would run into each other.")

    # -- text -------------------------------------------------------------------------------

    def line(self, name: str, message: str) -> str:
        """One message as the model sees it, separator included, its line breaks encoded."""
        return self.speaker_prefix(name) + self.encode(message) + self.speaker.split(MESSAGE, 1)[1] + self.separator

    def encode(self, message: str) -> str:
        """`message` with its line breaks written as `line_break` (when set)."""
        if not self.line_break:
            return message
        return _LINE_BREAKS.sub(self.line_break, message)

    def decode(self, reply: str) -> str:
        """A generated reply with `line_break` turned back into line breaks, as a person would write it."""
        return reply.replace(self.line_break, "\n") if self.line_break else reply

    def speaker_prefix(self, name: str) -> str:
        """What comes before a message of `name` ("gptbot: ")."""
        return self.speaker.split(MESSAGE, 1)[0].replace(NAME, clean_name(name))

    def bot_turn(self, name: str) -> str:
        """The end of a bot's prompt: its speaker prefix without trailing spaces ("gptbot:")."""
        return self.speaker_prefix(name).rstrip(" ")

    def render(self, messages: Iterable[tuple[str, str]]) -> str:
        """A whole conversation of (name, message) pairs as training text, end token included."""
        return "".join(self.line(name, message) for name, message in messages) + self.end

    def prompt(
        self,
        history: Sequence[tuple[str, str]],
        bot_name: str,
        *,
        budget_tokens: int | None = None,
        count_tokens: Callable[[str], int] | None = None,
    ) -> str:
        """The text a bot continues: `history` (oldest first, (name, message) pairs, the bot's own
        earlier replies included) then the bot's turn ("gptbot:"). With `budget_tokens` and
        `count_tokens`, the oldest messages are dropped, whole, until the prompt fits."""
        lines = [self.line(name, message) for name, message in history]
        tail = self.bot_turn(bot_name)
        if budget_tokens is None:
            return "".join(lines) + tail
        if count_tokens is None:
            raise TypeError("prompt(budget_tokens=...) needs count_tokens")
        return fit_newest(lines, tail, budget_tokens, count_tokens)

    def chat_settings(self, bot_name: str, user_name: str = "user") -> dict[str, str]:
        """The `ChatSettings` fields that make today's {message} template speak this format, for
        `settings.replace(**fmt.chat_settings("gptbot"))`: a user line, then the bot's prefix."""
        template = self.line(user_name, MESSAGE) + self.bot_turn(bot_name)
        return {"template": template, "truncate": self.truncate}

    # -- the chat setting -------------------------------------------------------------------

    @classmethod
    def from_line(cls, line: str, truncate: str = "\n") -> ChatFormat:
        """The chat setting `chat_format`, one message's line ("{name}: {message}\\n"): the speaker,
        then the separator (the whitespace that ends the line). "{author}", its older spelling, is read
        as "{name}"."""
        if not isinstance(line, str) or len(line) > MAX_FIELD_CHARS:
            raise InputError(f"chat_format must be text of at most {MAX_FIELD_CHARS} characters.")
        line = line.replace("{author}", NAME)
        speaker = line.rstrip()
        if speaker == line:
            raise InputError(
                f"chat_format {line!r} must end with the line break (or space) that separates one message"
                " from the next, as in '{name}: {message}\\n'."
            )
        return cls(speaker=speaker, separator=line[len(speaker) :], truncate=truncate)

    def as_line(self) -> str:
        """This format as the chat setting `chat_format` (from_line's inverse)."""
        return self.speaker + self.separator

    # -- files ------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: object, where: str = "the chat format") -> ChatFormat:
        if not isinstance(data, dict):
            raise InputError(
                f"{where} must be a JSON object with {', '.join(f.name for f in dataclasses.fields(cls))}."
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise InputError(f"{where} has an unknown key {unknown[0]!r}: use {', '.join(sorted(known))}.")
        return cls(**data)

    @classmethod
    def parse(cls, text: str) -> ChatFormat:
        """`--chat-format`: inline JSON (`{"speaker": "<{name}> {message}"}`) or a chat_format.json path."""
        text = text.strip()
        if text.startswith("{"):
            try:
                return cls.from_dict(json.loads(text), "--chat-format")
            except (json.JSONDecodeError, RecursionError):
                raise InputError(
                    "--chat-format is not valid JSON: pass a JSON object or the path of a chat_format.json."
                ) from None
        path = Path(text).expanduser()
        if path.is_dir():
            path = path / CHAT_FORMAT_JSON
        found = cls.load(path)
        if found is None:
            raise InputError(f"The chat format file {path} does not exist: check the path.")
        return found

    def save(self, run_dir: str | Path) -> Path:
        path = Path(run_dir) / CHAT_FORMAT_JSON
        path.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> ChatFormat | None:
        """The format in `path` (a chat_format.json, or a run folder holding one); None if there is none."""
        path = Path(path)
        if path.is_dir():
            path = path / CHAT_FORMAT_JSON
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_bytes()[: 64 * 1024].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise InputError(f"{path} is not valid JSON: delete it, or write it again as a JSON object.") from None
        return cls.from_dict(data, str(path))


class ReplyDecoder:
    """`ChatFormat.decode` for a reply that arrives in pieces: a `line_break` split across two pieces
    ("<b" then "r>") is held back until it is whole."""

    def __init__(self, line_break: str):
        self.line_break = line_break
        self.held = ""

    def feed(self, piece: str) -> str:
        if not self.line_break:
            return piece
        text = (self.held + piece).replace(self.line_break, "\n")
        keep = next((n for n in range(len(self.line_break) - 1, 0, -1) if text.endswith(self.line_break[:n])), 0)
        self.held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        held, self.held = self.held, ""
        return held


def clean_name(name: str) -> str:
    """A speaker name on one line, without braces, at most MAX_NAME_CHARS characters."""
    name = " ".join(_NAME_JUNK.sub(" ", str(name)).split())[:MAX_NAME_CHARS].strip()
    return name or DEFAULT_NAME
