"""Per-request sampling parameters and per-chat settings: plain frozen data, validated once."""

from __future__ import annotations

import dataclasses
import string
from dataclasses import dataclass

from .errors import InputError

MAX_NEW_TOKENS = 2048
STOP_LIMIT = 8


@dataclass(frozen=True)
class SamplingParams:
    """How one sample is drawn. `temperature=0` is greedy; `top_k=0` and `top_p=1` disable those filters."""

    max_new_tokens: int = 60
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()  # the sample ends before the first of these; "<|endoftext|>" also ends it
    seed: int | None = None

    def __post_init__(self):
        if isinstance(self.stop, str | list):
            object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        object.__setattr__(self, "stop", tuple(s for s in self.stop if s))
        if not isinstance(self.max_new_tokens, int) or not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise InputError(f"length / max_tokens must be a whole number from 1 to {MAX_NEW_TOKENS}, not {self.max_new_tokens!r}.")
        if not 0 <= self.temperature <= 10:
            raise InputError(f"temperature must be between 0 (greedy) and 10, not {self.temperature!r}.")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InputError(f"top_k must be 0 (off) or a positive whole number, not {self.top_k!r}.")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], not {self.top_p!r}.")
        if not 0 < self.repetition_penalty <= 10:
            raise InputError(f"repetition_penalty must be in (0, 10], not {self.repetition_penalty!r}.")
        if len(self.stop) > STOP_LIMIT:
            raise InputError(f"At most {STOP_LIMIT} stop strings are allowed, not {len(self.stop)}.")


TRIGGERS = ("mention", "always", "command", "never")


@dataclass(frozen=True)
class ChatSettings:
    """What a chat's replies look like; stored per chat, changed with /settings."""

    template: str = "{message}\n"  # how a message becomes a prompt; {message} is the user's text
    truncate: str = "\n"  # a reply ends before this string ("" = only at end of text or length)
    length: int = 60  # new tokens at most
    temperature: float = 0.8  # 0 = greedy; higher = more surprising
    top_k: int = 40  # sample from the k likeliest tokens (0 = off)
    top_p: float = 0.95  # sample from the smallest set holding this much probability (1 = off)
    use_context: bool = True  # prepend the chat's recent messages, as many as fit the window
    trigger: str = "mention"  # when the bot speaks in group chats: mention | always | command | never
    random_reply_chance: float = 0.0  # chance of answering an untriggered message in an allowed channel
    dataset_opt_in: bool = False  # this chat's messages may go into `botkit export-dataset` (training data)

    def __post_init__(self):
        check_template(self.template)
        if self.trigger not in TRIGGERS:
            raise InputError(f"trigger must be one of {', '.join(TRIGGERS)}, not {self.trigger!r}.")
        if not 0 <= self.random_reply_chance <= 1:
            raise InputError(f"random_reply_chance must be between 0 and 1, not {self.random_reply_chance!r}.")
        self.sampling()  # validates the sampling fields

    def sampling(self, seed: int | None = None) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=self.length,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            stop=(self.truncate,) if self.truncate else (),
            seed=seed,
        )

    def replace(self, **changes) -> ChatSettings:
        """A copy with `changes` (values may be strings, as typed in a chat command), validated."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        typed = {}
        for key, value in changes.items():
            if key not in fields:
                raise InputError(f"Unknown setting {key!r}: use one of {', '.join(fields)}.")
            typed[key] = _coerce(key, value, type(getattr(self, key)))
        return dataclasses.replace(self, **typed)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(key: str, value, kind: type):
    if kind is str and isinstance(value, str):
        return value.replace("\\n", "\n").replace("\\t", "\t")  # "\\n" typed in a chat means a newline
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    if not isinstance(value, str):
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        raise InputError(f"Setting {key!r} must be a {kind.__name__}, not {value!r}.")
    try:
        if kind is bool:
            if value.lower() not in ("on", "off", "true", "false", "yes", "no", "1", "0"):
                raise ValueError
            return value.lower() in ("on", "true", "yes", "1")
        return kind(value)
    except (ValueError, UnicodeDecodeError):
        raise InputError(f"Setting {key!r} must be a {kind.__name__}, not {value!r}.") from None


def check_template(template: str) -> None:
    """A prompt template must contain {message} and no other placeholder."""
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise InputError(f"The prompt template {template!r} is malformed ({exc}): write {{{{ and }}}} for literal braces.") from None
    if names != {"message"}:
        raise InputError(f"The prompt template {template!r} must contain {{message}} and no other placeholder.")
