"""Per-request sampling parameters and per-chat settings: plain frozen data, validated once."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from botkit.banned_words import MAX_BANNED_WORDS, check_banned_words
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
MAX_PENALTY = 2.0  # presence / frequency penalty: OpenAI's range is -2 to 2
MAX_DRY_ALLOWED_LENGTH = 50  # DRY counts a repeat's length up to 50 tokens (text-generation-webui's cap)
MAX_DRY_BREAKERS = 16
MAX_DRY_BREAKER_CHARS = 20
# The samplers of issue 22 (rules.py): the same names in SamplingParams, ChatSettings, `generate` and its CLI flags.
SAMPLERS = (
    "min_p",
    "typical_p",
    "presence_penalty",
    "frequency_penalty",
    "dry_multiplier",
    "dry_base",
    "dry_allowed_length",
    "dry_sequence_breakers",
    "min_tokens",
)
DRY_SEQUENCE_BREAKERS = ("\n", ":", '"', "*")  # text-generation-webui's default: a repeat never runs across these


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
    min_p: float = 0.0  # drop tokens less likely than min_p x the likeliest one, after temperature (0: off)
    typical_p: float = 1.0  # locally typical sampling's mass (1: off)
    presence_penalty: float = 0.0  # OpenAI's: taken off the logit of every token already in the reply
    frequency_penalty: float = 0.0  # OpenAI's: taken off a token's logit once per time it is in the reply
    dry_multiplier: float = 0.0  # DRY: penalty of a token that would extend a repeat (0: off)
    dry_base: float = 1.75  # DRY: the penalty grows by this factor per token of repeat beyond the allowed length
    dry_allowed_length: int = 2  # DRY: repeats this long are free
    # DRY: a repeat never runs across a token holding one
    dry_sequence_breakers: tuple[str, ...] = DRY_SEQUENCE_BREAKERS
    min_tokens: int = 0  # no end of text and no stop string before this many new tokens

    def __post_init__(self):
        if isinstance(self.stop, str | list):
            object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        object.__setattr__(self, "stop", tuple(s for s in self.stop if s))
        if isinstance(self.dry_sequence_breakers, str | list):
            breakers = self.dry_sequence_breakers
            object.__setattr__(
                self, "dry_sequence_breakers", (breakers,) if isinstance(breakers, str) else tuple(breakers)
            )
        self._check_samplers()
        try:  # a chat's list (at most MAX_BANNED_WORDS, checked by ChatSettings) plus the config's
            object.__setattr__(self, "banned_words", check_banned_words(self.banned_words, 2 * MAX_BANNED_WORDS))
        except ValueError as exc:
            raise InputError(f"banned_words: {exc}.") from None
        if (
            not isinstance(self.candidates, int)
            or isinstance(self.candidates, bool)
            or not 1 <= self.candidates <= MAX_CANDIDATES
        ):
            raise InputError(
                f"candidates must be a whole number from 1 to {MAX_CANDIDATES}, not {_short(self.candidates)}."
            )
        if (
            not isinstance(self.no_repeat_ngram_size, int)
            or isinstance(self.no_repeat_ngram_size, bool)
            or not 0 <= self.no_repeat_ngram_size <= MAX_NO_REPEAT_NGRAM
        ):
            raise InputError(
                f"no_repeat_ngram_size must be 0 (off) or a whole number up to {MAX_NO_REPEAT_NGRAM}, not "
                f"{_short(self.no_repeat_ngram_size)}."
            )
        if not isinstance(self.max_new_tokens, int) or not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise InputError(
                f"length / max_tokens must be a whole number from 1 to {MAX_NEW_TOKENS}, not {self.max_new_tokens!r}."
            )
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
        if self.seed is not None and (
            not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed <= MAX_SEED
        ):
            raise InputError(f"seed must be a whole number from 0 to {MAX_SEED:,} (2^63 - 1), not {_short(self.seed)}.")

    def _check_samplers(self) -> None:
        """min_p, typical_p, the penalties, DRY and min_tokens (comparisons with a non-number raise
        TypeError, which the HTTP layer turns into a sentence)."""
        if not 0 <= self.min_p <= 1:
            raise InputError(f"min_p must be between 0 (off) and 1, not {_short(self.min_p)}.")
        if not 0 < self.typical_p <= 1:
            raise InputError(f"typical_p must be in (0, 1] (1 is off), not {_short(self.typical_p)}.")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -MAX_PENALTY <= getattr(self, name) <= MAX_PENALTY:
                raise InputError(f"{name} must be between -2 and 2 (0 is off), not {_short(getattr(self, name))}.")
        if not 0 <= self.dry_multiplier <= 10:
            raise InputError(f"dry_multiplier must be between 0 (off) and 10, not {_short(self.dry_multiplier)}.")
        if not 1 <= self.dry_base <= 10:
            raise InputError(f"dry_base must be between 1 and 10, not {_short(self.dry_base)}.")
        if (
            not isinstance(self.dry_allowed_length, int)
            or isinstance(self.dry_allowed_length, bool)
            or not 1 <= self.dry_allowed_length <= MAX_DRY_ALLOWED_LENGTH
        ):
            raise InputError(
                f"dry_allowed_length must be a whole number from 1 to {MAX_DRY_ALLOWED_LENGTH}, not "
                f"{_short(self.dry_allowed_length)}."
            )
        breakers = self.dry_sequence_breakers
        if len(breakers) > MAX_DRY_BREAKERS or any(
            not isinstance(b, str) or not 0 < len(b) <= MAX_DRY_BREAKER_CHARS for b in breakers
        ):
            raise InputError(
                f"dry_sequence_breakers must be at most {MAX_DRY_BREAKERS} strings of 1 to "
                f"{MAX_DRY_BREAKER_CHARS} characters."
            )
        if (
            not isinstance(self.min_tokens, int)
            or isinstance(self.min_tokens, bool)
            or not 0 <= self.min_tokens <= self.max_new_tokens
        ):
            raise InputError(
                f"min_tokens must be a whole number from 0 to the length ({self.max_new_tokens}), not "
                f"{_short(self.min_tokens)}."
            )


# Where a person expects text (a chat reply, the playground, `botkit generate`), a sample gets at least
# this many tokens before a stop string or the end of text may end it: a chat-trained model's likeliest
# first token is often the line break that ends a message. The API keeps OpenAI's and vLLM's 0.
EXPECT_TEXT_MIN_TOKENS = 1


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
    # one line of channel context (ChatFormat.from_line); the reply follows "{bot's name}:"
    chat_format: str = "{name}: {message}\n"
    dataset_opt_in: bool = False  # this chat's messages may go into `botkit export-dataset` (training data)
    unique: bool = True  # a reply copying the chat's context or the model's training text is drawn again
    candidates: int = 1  # samples drawn for each reply; the likeliest that copies nothing is sent (up to 8)
    # no n-gram of this many tokens twice in a prompt and its reply (0: off; 3 stops loops)
    no_repeat_ngram_size: int = 0
    # comma-separated; a reply holding one (any case, accents, leetspeak) is drawn again, never sent
    banned_words: str = ""
    stream: bool = True  # show the reply while it is written, where the platform can (botkit/chat/live_reply.py)
    min_p: float = 0.0  # drop tokens less likely than this share of the likeliest one (0: off; 0.05 is common)
    typical_p: float = 1.0  # locally typical sampling (1: off)
    presence_penalty: float = 0.0  # -2 to 2: taken off every token already in the reply
    frequency_penalty: float = 0.0  # -2 to 2: taken off a token once per time it is already in the reply
    dry_multiplier: float = 0.0  # DRY against verbatim loops (0: off; 0.8 is common)
    dry_base: float = 1.75  # DRY: how fast its penalty grows with a repeat's length
    dry_allowed_length: int = 2  # DRY: repeats of this many tokens are free
    min_tokens: int = EXPECT_TEXT_MIN_TOKENS  # no end of reply before this many tokens (1: never an empty reply)

    def __post_init__(self):
        check_template(self.template)
        if self.trigger not in TRIGGERS:
            raise InputError(f"trigger must be one of {', '.join(TRIGGERS)}, not {self.trigger!r}.")
        if not 0 <= self.random_reply_chance <= 1:
            raise InputError(f"random_reply_chance must be between 0 and 1, not {self.random_reply_chance!r}.")
        try:
            check_banned_words(self.banned_words)
        except ValueError as exc:
            raise InputError(f"banned_words: {exc}.") from None
        self.sampling()  # validates the sampling fields
        check_channel_settings(self.context, self.chat_format)

    def sampling(self, seed: int | None = None) -> SamplingParams:
        return SamplingParams(
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
            min_p=self.min_p,
            typical_p=self.typical_p,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            dry_multiplier=self.dry_multiplier,
            dry_base=self.dry_base,
            dry_allowed_length=self.dry_allowed_length,
            min_tokens=self.min_tokens,
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
