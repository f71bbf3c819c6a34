"""Per-request sampling parameters and per-chat settings: plain frozen data, validated once."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from botkit.banned_words import check_banned_words
from botkit.chat_format import ChatFormat
from botkit.errors import InputError
from botkit.prompting import check_template

MAX_NEW_TOKENS = 2048
STOP_LIMIT = 8
MAX_STOP_CHARS = 200  # one stop string; longer ones only cost search time
MAX_TOP_K = 1 << 20  # above any vocabulary: means "no top-k" in all but name
MAX_SEED = (1 << 63) - 1  # SQLite integers and torch generators are signed 64-bit
MAX_CANDIDATES = 8
MAX_NO_REPEAT_NGRAM = 20


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
    no_repeat_ngram_size: int = 0  # no n-gram of this size twice in the prompt and reply together (0: off)
    banned_words: tuple[str, ...] = ()  # a reply holding one (normalised: banned_words.py) is drawn again, never sent
    unique: bool = False  # a reply copying its training text or its prompt beyond a threshold is drawn again
    candidates: int = 1  # samples drawn together; the request sends the best (judging.py)

    def __post_init__(self):
        if isinstance(self.stop, str | list):
            object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        object.__setattr__(self, "stop", tuple(s for s in self.stop if s))
        try:
            object.__setattr__(self, "banned_words", check_banned_words(self.banned_words))
        except ValueError as exc:
            raise InputError(f"banned_words: {exc}.") from None
        if not isinstance(self.candidates, int) or isinstance(self.candidates, bool) or not 1 <= self.candidates <= MAX_CANDIDATES:
            raise InputError(f"candidates must be a whole number from 1 to {MAX_CANDIDATES}, not {_short(self.candidates)}.")
        if (not isinstance(self.no_repeat_ngram_size, int) or isinstance(self.no_repeat_ngram_size, bool)
                or not 0 <= self.no_repeat_ngram_size <= MAX_NO_REPEAT_NGRAM):
            raise InputError(f"no_repeat_ngram_size must be 0 (off) or a whole number up to {MAX_NO_REPEAT_NGRAM}, not {_short(self.no_repeat_ngram_size)}.")
        if not isinstance(self.max_new_tokens, int) or not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise InputError(f"length / max_tokens must be a whole number from 1 to {MAX_NEW_TOKENS}, not {self.max_new_tokens!r}.")
        if not 0 <= self.temperature <= 10:
            raise InputError(f"temperature must be between 0 (greedy) and 10, not {self.temperature!r}.")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or not 0 <= self.top_k <= MAX_TOP_K:
            raise InputError(f"top_k must be 0 (off) or a whole number up to {MAX_TOP_K:,}, not {_short(self.top_k)}.")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], not {self.top_p!r}.")
        if not 0 < self.repetition_penalty <= 10:
            raise InputError(f"repetition_penalty must be in (0, 10], not {self.repetition_penalty!r}.")
        if len(self.stop) > STOP_LIMIT:
            raise InputError(f"At most {STOP_LIMIT} stop strings are allowed, not {len(self.stop)}.")
        if any(not isinstance(s, str) or len(s) > MAX_STOP_CHARS for s in self.stop):
            raise InputError(f"Each stop string must be text of at most {MAX_STOP_CHARS} characters.")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed <= MAX_SEED):
            raise InputError(f"seed must be a whole number from 0 to {MAX_SEED:,} (2^63 - 1), not {_short(self.seed)}.")


# Where a person expects text (a chat reply, the playground, `botkit generate`), a sample gets at least
# this many tokens before a stop string or the end of text may end it: a chat-trained model's likeliest
# first token is often the line break that ends a message. The field, SamplingParams.min_tokens (vLLM's
# name), comes with the per-token rule that enforces it; until it exists, nothing changes.
EXPECT_TEXT_MIN_TOKENS = 1
HAS_MIN_TOKENS = "min_tokens" in {f.name for f in dataclasses.fields(SamplingParams)}


def expecting_text(params: SamplingParams) -> SamplingParams:
    """`params` with at least EXPECT_TEXT_MIN_TOKENS tokens, unless they already ask for more."""
    if not HAS_MIN_TOKENS or params.min_tokens >= EXPECT_TEXT_MIN_TOKENS:
        return params
    return dataclasses.replace(params, min_tokens=EXPECT_TEXT_MIN_TOKENS)


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
    context: str = "bot"  # bot: exchanges with the bot | channel: the chat's recent messages, with author names
    chat_format: str = "{name}: {message}\n"  # one line of channel context (ChatFormat.from_line); the reply follows "{bot's name}:"
    dataset_opt_in: bool = False  # this chat's messages may go into `botkit export-dataset` (training data)
    unique: bool = True  # a reply copying the chat's context or the model's training text is drawn again
    candidates: int = 1  # samples drawn for each reply; the likeliest that copies nothing is sent (up to 8)
    no_repeat_ngram_size: int = 0  # no n-gram of this many tokens twice in a prompt and its reply (0: off; 3 stops loops)
    banned_words: str = ""  # comma-separated; a reply holding one (any case, accents, leetspeak) is drawn again, never sent

    def __post_init__(self):
        check_template(self.template)
        if self.trigger not in TRIGGERS:
            raise InputError(f"trigger must be one of {', '.join(TRIGGERS)}, not {self.trigger!r}.")
        if not 0 <= self.random_reply_chance <= 1:
            raise InputError(f"random_reply_chance must be between 0 and 1, not {self.random_reply_chance!r}.")
        self.sampling()  # validates the sampling fields
        check_channel_settings(self.context, self.chat_format)

    def sampling(self, seed: int | None = None) -> SamplingParams:
        return expecting_text(SamplingParams(
            max_new_tokens=self.length,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            stop=(self.truncate,) if self.truncate else (),
            seed=seed,
            no_repeat_ngram_size=self.no_repeat_ngram_size,
            banned_words=self.banned_words,
            unique=self.unique,
            candidates=self.candidates,
        ))

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


def _short(value) -> str:
    """A refused value, shown without letting a huge one flood the reply."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


CONTEXTS = ("bot", "channel")
def check_channel_settings(context: str, chat_format: str) -> None:
    """`context` is a known kind; `chat_format` is one line of the chat format (ChatFormat.from_line)."""
    if context not in CONTEXTS:
        raise InputError(f"context must be one of {', '.join(CONTEXTS)}, not {context!r}.")
    ChatFormat.from_line(chat_format)
