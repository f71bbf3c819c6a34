"""Typed configuration: frozen dataclasses loaded once from TOML.

Every TOML table is a dataclass below and every key is a field of the same name
(`[batch] max_size` is `config.batch.max_size`). Unknown keys and wrong types are errors that name
the key and the file. Secrets never live in the file: a `*_env` key names the environment variable.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError
from .params import ChatSettings


@dataclass(frozen=True)
class ModelConfig:
    source: str = ""  # hub name, local folder, or "" for the bundled demo model
    run_name: str = ""  # a run in checkpoint_dir (from `botkit finetune`), used when source is ""
    checkpoint_dir: str = "checkpoint"  # where `botkit finetune` saves runs
    device: str = ""  # "" = cuda if available, else cpu
    dtype: str = ""  # "" = bfloat16/float16 on GPU, float32 on CPU
    backend: str = "local"  # local | remote (an OpenAI-style /v1/completions server)
    url: str = ""  # remote backend base URL, e.g. http://gpu-box:8000/v1
    remote_model: str = ""  # model name sent to the remote server
    api_key_env: str = ""  # environment variable holding the remote server's API key
    max_context: int = 1024  # remote backend: the remote model's window in tokens


@dataclass(frozen=True)
class BatchConfig:
    max_size: int = 32  # sequences generated together in one forward pass
    max_queue: int = 256  # waiting requests beyond this are told "busy"
    timeout_s: float = 120.0  # a request not done by then fails with a timeout


@dataclass(frozen=True)
class LimitsConfig:
    max_message_chars: int = 4000  # longer messages are refused with a sentence
    user_per_minute: int = 10  # requests per user per minute (0 = unlimited)
    chat_per_minute: int = 30  # requests per chat per minute (0 = unlimited)
    api_per_minute: int = 0  # samples per client per minute on the web playground / HTTP API (0 = unlimited)
    context_messages: int = 20  # recent messages considered for context (then trimmed to the window)


@dataclass(frozen=True)
class StoreConfig:
    path: str = "botkit.db"  # SQLite file (WAL mode)
    retention_days: float = 0.0  # erase messages, requests and replies older than this (0 = keep them)
    prune_interval_s: float = 3600.0  # how often old rows are erased
    vacuum_interval_s: float = 86400.0  # how often the file is compacted (VACUUM) after erasing

    def __post_init__(self):
        _at_least("store.retention_days", self.retention_days, 0)
        _at_least("store.prune_interval_s", self.prune_interval_s, 0.01)
        _at_least("store.vacuum_interval_s", self.vacuum_interval_s, 0.01)


@dataclass(frozen=True)
class ConversationConfig:
    resume_max_age_s: float = 600.0  # after a restart, older unanswered requests get "sorry, I restarted" instead
    max_channel_messages: int = 50  # messages kept per chat for context = channel (beyond the bot's exchanges)

    def __post_init__(self):
        _at_least("conversation.resume_max_age_s", self.resume_max_age_s, 0)
        _at_least("conversation.max_channel_messages", self.max_channel_messages, 1)


def _at_least(name: str, value: float, low: float) -> None:
    if not (math.isfinite(value) and value >= low):  # load_config adds the file's name
        raise ValueError(f"{name} must be a finite number of at least {low}, not {value!r}.")


@dataclass(frozen=True)
class WebConfig:
    enabled: bool = True  # serve the playground and the HTTP API
    host: str = "127.0.0.1"  # bind elsewhere only with api_key_env set
    port: int = 8080  # 0 picks a free port
    api_key_env: str = ""  # environment variable with the API key (required unless host is loopback)
    max_body_bytes: int = 65536  # larger request bodies get 413
    max_n: int = 8  # most samples one request may ask for (playground nsamples; API n × prompts)


@dataclass(frozen=True)
class ConsoleConfig:
    enabled: bool = False  # chat in the terminal too (same as `botkit run --console`)


@dataclass(frozen=True)
class DiscordConfig:
    enabled: bool = False  # connect to Discord
    token_env: str = "DISCORD_TOKEN"  # environment variable holding the bot token
    command_prefix: str = "!gen"  # text command; the slash command is /gen
    allowed_guilds: tuple[str, ...] = ()  # empty = all servers
    allowed_channels: tuple[str, ...] = ()  # empty = all channels
    admin_user_ids: tuple[str, ...] = ()  # may change settings, besides members with Manage Server
    max_reply_parts: int = 3  # a long reply is split into at most this many messages
    allow_dms: bool = True  # answer direct messages (any text in a DM is a prompt)
    sync_commands: bool = True  # overwrite the bot's global slash commands with botkit's at start
    typing_interval_s: float = 5.0  # resend "typing…" this often while a reply is pending (it shows for ~10 s)
    queue_notice_s: float = 5.0  # a reply still queued after this long gets an "n-th in line" notice
    connect_timeout_s: float = 60.0  # start() fails if the gateway has not said READY by then


@dataclass(frozen=True)
class TelegramConfig:
    enabled: bool = False  # connect to Telegram
    token_env: str = "TELEGRAM_TOKEN"  # environment variable holding the bot token
    command_prefix: str = "!gen"  # text command; /gen works too
    allowed_chats: tuple[str, ...] = ()  # empty = all chats
    admin_user_ids: tuple[str, ...] = ()  # may change settings, besides chat administrators
    mode: str = "polling"  # polling | webhook
    webhook_url: str = ""  # public HTTPS URL Telegram posts to (webhook mode)
    webhook_listen: str = "127.0.0.1"  # local address the webhook server binds (behind your HTTPS proxy)
    webhook_port: int = 8443  # local port of the webhook server
    base_url: str = ""  # Bot API server ("" = Telegram's); tests point it at a fake
    max_reply_parts: int = 3  # a long reply is split into at most this many messages
    webhook_secret_env: str = ""  # env var with a secret Telegram echoes on every webhook call ("" = none)
    typing_interval_s: float = 4.0  # resend "typing…" this often while a reply is pending (it shows for 5 s)
    queue_notice_s: float = 5.0  # a reply still queued after this long gets an "n-th in line" notice
    chat_send_interval_s: float = 1.0  # at most one message per chat this often (Telegram's flood limit)
    group_sends_per_minute: int = 20  # at most this many messages per group per minute (Telegram's limit)
    max_send_retries: int = 2  # a send refused with 429 (after its retry_after), a 5xx or a dropped connection
    request_timeout_s: float = 10.0  # connect/read/write timeout of one Bot API call


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    chat: ChatSettings = field(default_factory=ChatSettings)  # defaults for every chat
    conversation: ConversationConfig = field(default_factory=ConversationConfig)
    web: WebConfig = field(default_factory=WebConfig)
    console: ConsoleConfig = field(default_factory=ConsoleConfig)
    discord: DiscordConfig = field(default_factory=DiscordConfig)
    telegram: TelegramConfig = field(default_factory=TelegramConfig)


# A value that looks like a bot token or API key pasted into the file instead of an env var name.
_SECRET_LIKE = re.compile(r"^(\d{6,}:[\w-]{30,}|[\w-]{24,}\.[\w-]{6,}\.[\w-]{27,}|sk-[\w-]{20,})$")


def load_config(path: str | os.PathLike | None) -> Config:
    """Read a TOML file into a Config; None gives the defaults."""
    if path is None:
        return Config()
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"Config file {path} does not exist: copy config.example.toml there and edit it.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"Config file {path} cannot be read ({exc.__class__.__name__}): check its permissions and that it is UTF-8 text.") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"Config file {path} is not valid TOML ({exc}): fix that line.") from None
    return _build(Config, data, path, "")


def _build(cls, data, path: Path, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: [{prefix.rstrip('.')}] must be a table.")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"{path}: unknown key {name!r}; see config.example.toml for the keys botkit knows.")
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            kwargs[key] = _build(kind, value, path, f"{name}.")
        else:
            kwargs[key] = _check(kind, value, path, name)
        if key.endswith("_env") and isinstance(value, str) and _SECRET_LIKE.match(value):
            raise ConfigError(f"{path}: {name} looks like a secret pasted into the file; put the secret in an environment variable and write that variable's name here.")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except Exception as exc:  # a field validator (e.g. ChatSettings) refused a value
        raise ConfigError(f"{path}: in [{prefix.rstrip('.')}], {exc}") from None


def _check(kind, value, path: Path, name: str):
    origin = typing.get_origin(kind)
    if origin is tuple:
        (item,) = {a for a in typing.get_args(kind) if a is not Ellipsis}
        if not isinstance(value, list):
            raise ConfigError(f"{path}: {name} must be a list, not {type(value).__name__}.")
        return tuple(_check(item, v, path, f"{name}[]") for v in value)
    if origin in (types.UnionType, typing.Union):
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is str and isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # ids may be written as numbers
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{path}: {name} must be a {kind.__name__}, not {type(value).__name__} {value!r}.")
    return value


def secret(env_name: str, what: str) -> str:
    """The secret in environment variable `env_name`, or a ConfigError saying how to set it."""
    value = os.environ.get(env_name, "").strip() if env_name else ""
    if not value:
        raise ConfigError(f"{what} needs a secret in the environment variable {env_name or '(none named)'}: export {env_name or 'ONE'}=... before starting botkit.")
    return value
