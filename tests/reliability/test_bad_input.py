"""Bad input, one table: every case is either accepted (and then it is in the store, intact or cleaned
as documented) or refused with one clear sentence (a BotkitError, or an HTTP error body), never a
traceback. Chat messages go through Core.submit, replies through defuse_mentions + split_reply,
config files through load_config, datasets through botkit.train.encoding, HTTP bodies through the web
adapter's aiohttp app with aiohttp's test client."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import pytest
from botkit.adapters.web_adapter import WebAdapter

from botkit.chat.chats import Chats, Prompt
from botkit.chat.replies import defuse_mentions, split_reply
from botkit.cli import main as botkit_cli
from botkit.config import load_config, secret
from botkit.errors import BotkitError, ConfigError, DatasetError, InputError
from botkit.params import ChatSettings
from botkit.serve.core import Core
from botkit.serve.store import Store
from botkit.train.encoding import read_documents

from .conftest import EchoBackend, make_config

DISCORD_LIMIT = 2000
KEY = "table-api-key-0123456789"
PASTED_TOKEN = "MTA5ODc2NTQzMjEwOTg3NjU0MzI.GhIjKl.abcdefghijklmnopqrstuvwxyz0123456789AB"
ODD_SECRET = "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"  # a token shape _SECRET_LIKE does not know
PINGS = re.compile(r"@(everyone|here)\b|<@[!&]?\d+>", re.IGNORECASE)  # what Discord would parse as a mention
TELEGRAM_PING = re.compile(r"(?<!\w)@\w")


def assert_one_sentence(message: str) -> None:
    assert message.strip(), "an empty error message"
    assert "\n" not in message and "Traceback" not in message, message
    assert message.rstrip()[-1] in ".?!", f"not a sentence: {message!r}"
    assert not re.search(r"[.!?]\s+[A-Z]", message), f"more than one sentence: {message!r}"
    assert len(message) < 400, f"too long to show a user: {message[:100]!r}..."


@dataclass
class Env:
    core: Core
    store: Store
    tmp_path: object
    http: aiohttp.ClientSession  # sends the API key
    web: WebAdapter

    @property
    def chats(self) -> Chats:
        return Chats(self.core, self.store, self.core.config)


# -- what each case does ---------------------------------------------------------------------------


def chat(text) -> Callable[[Env], Awaitable]:
    async def run(env: Env):
        ticket = await env.chats.submit(Prompt("discord", "chan", "user", text, message_id="m1", user_name="someone"))
        await ticket.result()
        return await env.store.request(ticket.request_id)

    return run


def reply(text: str, *, usernames: bool = False, limit: int = DISCORD_LIMIT) -> Callable[[Env], Awaitable]:
    async def run(env: Env):
        return split_reply(defuse_mentions(text, usernames=usernames), limit, max_parts=1000)

    return run


def settings(**changes) -> Callable[[Env], Awaitable]:
    async def run(env: Env):
        return await env.chats.update_settings("discord", "chan", **changes)

    return run


def config_file(content: str | bytes) -> Callable[[Env], Awaitable]:
    async def run(env: Env):
        path = env.tmp_path / "bot.toml"
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return load_config(path)

    return run


def missing_secret() -> Callable[[Env], Awaitable]:
    async def run(env: Env):
        return secret("BOTKIT_RELIABILITY_UNSET_TOKEN", "Discord ([discord] token_env)")

    return run


def dataset(name: str, content: bytes) -> Callable[[Env], Awaitable]:
    async def run(env: Env):
        path = env.tmp_path / name
        path.write_bytes(content)
        return read_documents(path)

    return run


def http(
    body: bytes | str, content_type: str = "application/json", path: str = "/v1/completions"
) -> Callable[[Env], Awaitable]:
    async def run(env: Env):
        data = body.encode() if isinstance(body, str) else body
        async with env.http.post(path, data=data, headers={"Content-Type": content_type}) as response:
            return response.status, await response.json()

    return run


def raw_http(request: bytes) -> Callable[[Env], Awaitable]:
    """Bytes no HTTP client would send, written to the adapter's socket; (status, JSON body) of the answer."""

    async def run(env: Env):
        host, port = env.web.url.removeprefix("http://").rstrip("/").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(request.replace(b"{key}", KEY.encode()))
            # every request here ends with Connection: close or is malformed
            answer = await asyncio.wait_for(reader.read(), 5)
        finally:
            writer.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert b"content-type: application/json" in head.lower(), answer[:300]
        return int(head.split()[1]), json.loads(body)

    return run


@dataclass
class CliOutcome:
    exit_code: int
    stderr: str


def cli(*argv: str, prepare: Callable | None = None) -> Callable[[Env], Awaitable]:
    """`botkit <argv>` in this process ({tmp} is the test's folder); a thread, since `run` starts its own loop."""

    async def run(env: Env):
        if prepare:
            prepare(env.tmp_path)
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = await asyncio.to_thread(botkit_cli, [a.format(tmp=env.tmp_path) for a in argv])
        return CliOutcome(code, err.getvalue())

    return run


def text_dataset(tmp_path) -> None:
    (tmp_path / "data.txt").write_text("The cat sat on the mat. " * 200)


def damaged_model(damage: Callable[[bytes], bytes]) -> Callable:
    """A saved tiny GPT-2 in {tmp}/model whose model.safetensors is `damage`d."""

    def prepare(tmp_path) -> None:
        from transformers import GPT2Config, GPT2LMHeadModel

        GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16)).save_pretrained(tmp_path / "model")
        weights = tmp_path / "model" / "model.safetensors"
        weights.write_bytes(damage(weights.read_bytes()))

    return prepare


# -- what each case expects ------------------------------------------------------------------------


def refused(kind: type[BotkitError] = BotkitError, *words: str):
    def check(outcome):
        assert isinstance(outcome, kind), f"expected {kind.__name__}, got {outcome!r}"
        assert_one_sentence(str(outcome))
        for word in words:
            assert word in str(outcome), f"{word!r} not in {str(outcome)!r}"

    return check


def refused_unechoed(secret_value: str, *words: str):
    """Refused with a sentence that names the key but never repeats the value, which may be a secret."""

    def check(outcome):
        refused(ConfigError, *words)(outcome)
        assert secret_value not in str(outcome) and secret_value[:8] not in str(outcome), str(outcome)

    return check


def loaded(condition: Callable[[object], bool]):
    def check(config):
        assert not isinstance(config, BaseException), f"refused: {config}"
        assert condition(config), config

    return check


def stored(expected_text: str):
    def check(row):
        assert isinstance(row, dict) and row["status"] == "done", row
        assert row["text"] == expected_text

    return check


def pings_nobody(original: str, *, telegram: bool = False):
    def check(parts):
        assert parts, "the reply disappeared"
        for part in parts:
            assert not PINGS.search(part), f"a part still pings: {part!r}"
            assert not (telegram and TELEGRAM_PING.search(part)), f"a part still pings: {part!r}"
            assert len(part) <= DISCORD_LIMIT
        assert "".join(parts).replace("\u200b", "") == original.replace("\u200b", ""), "text was lost or changed"

    return check


def http_error(status: int, *words: str):
    def check(outcome):
        got_status, body = outcome
        assert got_status == status, outcome
        assert_one_sentence(body["error"]["message"])
        for word in words:
            assert word in body["error"]["message"]

    return check


def cli_refused(*words: str):
    def check(outcome):
        assert isinstance(outcome, CliOutcome), outcome
        lines = outcome.stderr.strip().splitlines()
        assert outcome.exit_code == 2 and len(lines) == 1 and lines[0].startswith("botkit: "), outcome
        assert_one_sentence(lines[0].removeprefix("botkit: "))
        for word in words:
            assert word in lines[0], f"{word!r} not in {lines[0]!r}"

    return check


def http_ok(status: int = 200):
    def check(outcome):
        got_status, body = outcome
        assert got_status == status and "error" not in body, outcome

    return check


def documents(count: int, length: int | None = None):
    def check(docs):
        assert isinstance(docs, list) and len(docs) == count, docs if not isinstance(docs, list) else len(docs)
        assert length is None or len(docs[0]) == length

    return check


LONG_LINE = "word " * 400_000  # a 2 MB dataset line

CASES = [
    # chat messages
    ("empty message", chat(""), refused(InputError, "empty")),
    ("whitespace-only message", chat("  \n\t  \r\n "), refused(InputError, "empty")),
    ("1 MB message", chat("a" * 1_000_000), refused(InputError, "4000")),
    ("4097-character message", chat("b" * 4097), refused(InputError, "4000")),
    ("4000-character message", chat("c" * 4000), stored("c" * 4000)),
    ("lone surrogate", chat("hi \ud800 there"), stored("hi ? there")),
    ("invalid UTF-8 (surrogateescape)", chat(b"\xff\xfe hello".decode("utf-8", "surrogateescape")), stored("?? hello")),
    ("bytes instead of text", chat(b"hello"), refused(InputError, "text")),
    ("None instead of text", chat(None), refused(InputError, "text")),
    ("control characters", chat("\x00he\x07llo\x1b[31m\x7f"), stored("hello[31m")),
    ("only control characters", chat("\x00\x01\x02\x1b"), refused(InputError, "empty")),
    ("zero-width-only text", chat("\u200b\u200c\u200d\u2060\ufeff"), refused(InputError, "empty")),
    ("emoji, RTL and combining marks", chat("שלום 👨‍👩‍👧 e\u0301"), stored("שלום 👨‍👩‍👧 e\u0301")),
    ("SQL in a message", chat("'); DROP TABLE requests; --"), stored("'); DROP TABLE requests; --")),
    # replies that try to ping
    ("@everyone in a reply", reply("hey @everyone look"), pings_nobody("hey @everyone look")),
    ("@here in a reply", reply("@here @HERE @Everyone"), pings_nobody("@here @HERE @Everyone")),
    ("role mention", reply("ping <@&123456789012345678>"), pings_nobody("ping <@&123456789012345678>")),
    ("user mentions", reply("<@42> and <@!43>"), pings_nobody("<@42> and <@!43>")),
    ("@everyone across a split point", reply("x" * 1995 + " @everyone"), pings_nobody("x" * 1995 + " @everyone")),
    (
        "a mention at every split point",
        reply(("y" * 17 + "<@&99>") * 200, limit=20),
        pings_nobody(("y" * 17 + "<@&99>") * 200),
    ),
    (
        "Telegram @username",
        reply("ask @durov or @admin", usernames=True),
        pings_nobody("ask @durov or @admin", telegram=True),
    ),
    # templates and settings
    ("template with a bad placeholder", settings(template="{user}: {message}"), refused(InputError, "placeholder")),
    ("template with a positional placeholder", settings(template="{message} {0}"), refused(InputError, "placeholder")),
    ("malformed template", settings(template="{message"), refused(InputError, "exactly once")),
    (
        "template with a format spec (12.1)",
        settings(template="{message:>20000000}"),
        refused(InputError, "placeholder"),
    ),
    (
        "template with attribute access (12.1)",
        settings(template="{message.__class__}"),
        refused(InputError, "placeholder"),
    ),
    (
        "template with {message} twice (12.1)",
        settings(template="{message}{message}"),
        refused(InputError, "exactly once"),
    ),
    ("template of 2,000 characters (12.1)", settings(template="{message}" + "x" * 2000), refused(InputError, "1000")),
    ("unknown setting", settings(colour="blue"), refused(InputError, "colour")),
    ("setting of the wrong type", settings(temperature="hot"), refused(InputError, "temperature")),
    # config files
    ("config: unknown key", config_file("[batch]\nmax_sise = 3\n"), refused(ConfigError, "batch.max_sise")),
    ("config: unknown table", config_file("[batchh]\nmax_size = 3\n"), refused(ConfigError, "batchh")),
    ("config: wrong type", config_file('[batch]\nmax_size = "big"\n'), refused(ConfigError, "batch.max_size")),
    ("config: bool as string", config_file('[web]\nenabled = "yes"\n'), refused(ConfigError, "web.enabled")),
    (
        "config: token pasted into the file",
        config_file(f'[discord]\ntoken_env = "{PASTED_TOKEN}"\n'),
        refused(ConfigError, "discord.token_env", "environment variable"),
    ),
    ("config: missing token env", missing_secret(), refused(ConfigError, "BOTKIT_RELIABILITY_UNSET_TOKEN")),
    ("config: not TOML", config_file("this is = = not toml\n"), refused(ConfigError, "TOML")),
    ("config: not UTF-8", config_file(b'[chat]\ntemplate = "\xff{message}"\n'), refused(ConfigError, "UTF-8")),
    (
        "config: bad template",
        config_file('[chat]\ntemplate = "{user}: {message}"\n'),
        refused(ConfigError, "placeholder"),
    ),
    (
        "config: batch.max_size = 0 (a bot that never answers)",
        config_file("[batch]\nmax_size = 0\n"),
        refused(ConfigError, "batch.max_size", "bot.toml"),
    ),
    (
        "config: negative batch.timeout_s",
        config_file("[batch]\ntimeout_s = -1.0\n"),
        refused(ConfigError, "batch.timeout_s"),
    ),
    (
        "config: batch.timeout_s = nan",
        config_file("[batch]\ntimeout_s = nan\n"),
        refused(ConfigError, "batch.timeout_s"),
    ),
    (
        "config: batch.timeout_s = inf",
        config_file("[batch]\ntimeout_s = inf\n"),
        refused(ConfigError, "batch.timeout_s"),
    ),
    (
        "config: negative batch.max_queue",
        config_file("[batch]\nmax_queue = -5\n"),
        refused(ConfigError, "batch.max_queue"),
    ),
    (
        "config: negative web.max_body_bytes",
        config_file("[web]\nmax_body_bytes = -1\n"),
        refused(ConfigError, "web.max_body_bytes"),
    ),
    ("config: web.max_n = 0", config_file("[web]\nmax_n = 0\n"), refused(ConfigError, "web.max_n")),
    ("config: web.port = 70000", config_file("[web]\nport = 70000\n"), refused(ConfigError, "web.port", "65535")),
    ("config: web.port = -1", config_file("[web]\nport = -1\n"), refused(ConfigError, "web.port", "65535")),
    (
        "config: limits.max_message_chars = 0",
        config_file("[limits]\nmax_message_chars = 0\n"),
        refused(ConfigError, "limits.max_message_chars"),
    ),
    (
        "config: negative discord.typing_interval_s",
        config_file("[discord]\ntyping_interval_s = -5.0\n"),
        refused(ConfigError, "discord.typing_interval_s"),
    ),
    (
        "config: unknown model.backend",
        config_file('[model]\nbackend = "cloud"\n'),
        refused(ConfigError, "model.backend", "remote"),
    ),
    (
        "config: unknown telegram.mode",
        config_file('[telegram]\nmode = "push"\n'),
        refused(ConfigError, "telegram.mode", "webhook"),
    ),
    (
        "config: arrays nested 20,000 deep",
        config_file("[batch]\nmax_size = " + "[" * 20_000 + "]" * 20_000 + "\n"),
        refused(ConfigError, "deep"),
    ),
    (
        "config: inline tables nested 20,000 deep",
        config_file("a = " + "{b = " * 20_000 + "1" + "}" * 20_000 + "\n"),
        refused(ConfigError, "deep"),
    ),
    (
        "config: a UTF-8 byte-order mark",
        config_file(b"\xef\xbb\xbf[batch]\nmax_size = 3\n"),
        loaded(lambda c: c.batch.max_size == 3),
    ),
    (
        "config: a secret of an unrecognised shape in token_env",
        config_file(f'[discord]\ntoken_env = "{ODD_SECRET}"\n'),
        refused_unechoed(ODD_SECRET, "discord.token_env", "environment variable"),
    ),
    (
        "config: a secret pasted into a key of the wrong type",
        config_file(f'[web]\nenabled = "{ODD_SECRET}"\n'),
        refused_unechoed(ODD_SECRET, "web.enabled"),
    ),
    # datasets
    ("dataset: empty", dataset("empty.txt", b""), refused(DatasetError, "empty")),
    ("dataset: whitespace only", dataset("blank.txt", b"\n\n   \n"), refused(DatasetError, "empty")),
    ("dataset: binary", dataset("model.txt", bytes(range(256)) * 10), refused(DatasetError, "binary")),
    ("dataset: wrong encoding", dataset("latin1.txt", "café crème".encode("latin-1")), refused(DatasetError, "UTF-8")),
    ("dataset: a 2 MB line", dataset("long.txt", LONG_LINE.encode()), documents(1, len(LONG_LINE))),
    (
        "dataset: JSONL with a broken line",
        dataset("bad.jsonl", b'{"text": "ok"}\n{"text": \n'),
        refused(DatasetError, "line 2"),
    ),
    (
        "dataset: CSV with two columns",
        dataset("two.csv", b"text,label\nhello,1\n"),
        refused(DatasetError, "one column"),
    ),
    # the command line
    ("CLI: run --port 70000", cli("run", "--port", "70000"), cli_refused("--port", "web.port", "65535")),
    ("CLI: generate --seed 2^70", cli("generate", "--seed", str(2**70), "--length", "3"), cli_refused("seed")),
    ("CLI: generate --top-k 2^64", cli("generate", "--top-k", str(2**64), "--length", "3"), cli_refused("top_k")),
    (
        "CLI: generate --destination-path in a missing folder (refused before the model loads)",
        cli(
            "generate",
            "--model",
            "{tmp}/model",
            "--destination-path",
            "{tmp}/missing/out.txt",
            prepare=damaged_model(lambda b: b[:100]),
        ),
        cli_refused("missing"),
    ),
    (
        "CLI: a truncated model.safetensors",
        cli("generate", "--model", "{tmp}/model", prepare=damaged_model(lambda b: b[: len(b) // 2])),
        cli_refused("model.safetensors"),
    ),
    (
        "CLI: an empty model.safetensors",
        cli("generate", "--model", "{tmp}/model", prepare=damaged_model(lambda b: b"")),
        cli_refused("model.safetensors"),
    ),
    (
        "CLI: model.safetensors with a bad header",
        cli(
            "generate",
            "--model",
            "{tmp}/model",
            prepare=damaged_model(lambda b: b"\x10" + bytes(7) + b"{not json}" + b[18:]),
        ),
        cli_refused("model.safetensors"),
    ),
    (
        "CLI: finetune --n-head 0",
        cli("finetune", "--dataset", "{tmp}/data.txt", "--n-head", "0", prepare=text_dataset),
        cli_refused("n_head"),
    ),
    (
        "CLI: finetune --block-size -5",
        cli("finetune", "--dataset", "{tmp}/data.txt", "--block-size", "-5", prepare=text_dataset),
        cli_refused("block_size"),
    ),
    (
        "CLI: finetune --weight-decay nan",
        cli("finetune", "--dataset", "{tmp}/data.txt", "--weight-decay", "nan", prepare=text_dataset),
        cli_refused("weight_decay"),
    ),
    (
        "CLI: finetune --checkpoint-dir that is a file",
        cli("finetune", "--dataset", "{tmp}/data.txt", "--checkpoint-dir", "{tmp}/data.txt", prepare=text_dataset),
        cli_refused("checkpoint_dir"),
    ),
    # HTTP bodies
    ("HTTP: oversize body", http(json.dumps({"prompt": "z" * 70_000})), http_error(413, "limit")),
    ("HTTP: not JSON", http("prompt=hello"), http_error(400, "JSON")),
    ("HTTP: invalid UTF-8 body", http(b'{"prompt": "\xff"}'), http_error(400, "JSON")),
    ("HTTP: a form post", http("prompt=hello", "application/x-www-form-urlencoded"), http_error(415, "JSON")),
    ("HTTP: JSON that is not an object", http("[1, 2, 3]"), http_error(400, "object")),
    ("HTTP: max_tokens out of range", http('{"prompt": "hi", "max_tokens": 1000000}'), http_error(400, "max_tokens")),
    ("HTTP: negative temperature", http('{"prompt": "hi", "temperature": -1}'), http_error(400, "temperature")),
    ("HTTP: n too large", http('{"prompt": "hi", "n": 1000}'), http_error(400, "n ")),
    ("HTTP: token-id prompt", http('{"prompt": [1, 2, 3]}'), http_error(400, "prompt")),
    ("HTTP: string where a number goes", http('{"prompt": "hi", "top_p": "high"}'), http_error(400, "top_p")),
    (
        "HTTP: playground length out of range",
        http('{"prefix": "hi", "length": 0}', path="/api/generate"),
        http_error(400, "length"),
    ),
    ("HTTP: arrays nested 30,000 deep", http("[" * 30_000 + "]" * 30_000), http_error(400, "JSON")),
    (
        "HTTP: objects nested 9,000 deep in a field",
        http('{"prompt": ' + '{"a": ' * 9_000 + "1" + "}" * 9_000 + "}"),
        http_error(400, "JSON"),
    ),
    (
        "HTTP: an integer of 5,000 digits",
        http('{"prompt": "hi", "max_tokens": ' + "9" * 5_000 + "}"),
        http_error(400, "number"),
    ),
    (
        "HTTP: max_tokens of 4,000 digits",
        http('{"prompt": "hi", "max_tokens": ' + "9" * 4_000 + "}"),
        http_error(400, "max_tokens"),
    ),
    ("HTTP: max_tokens 1e400 (infinity)", http('{"prompt": "hi", "max_tokens": 1e400}'), http_error(400, "max_tokens")),
    ("HTTP: temperature NaN", http('{"prompt": "hi", "temperature": NaN}'), http_error(400, "temperature")),
    ("HTTP: top_p -Infinity", http('{"prompt": "hi", "top_p": -Infinity}'), http_error(400, "top_p")),
    ("HTTP: n 1e300", http('{"prompt": "hi", "n": 1e300}'), http_error(400, "n ")),
    ("HTTP: seed 2^70", http(f'{{"prompt": "hi", "seed": {2**70}}}'), http_error(400, "seed")),
    ("HTTP: top_k 2^64", http(f'{{"prompt": "hi", "top_k": {2**64}}}'), http_error(400, "top_k")),
    ("HTTP: top_k 1e300", http('{"prompt": "hi", "top_k": 1e300}'), http_error(400, "top_k")),
    (
        "HTTP: playground seed 2^70",
        http(f'{{"prefix": "hi", "seed": {2**70}}}', path="/api/generate"),
        http_error(400, "seed"),
    ),
    ("HTTP: an unknown field", http('{"prompt": "hi", "max_token": 5}'), http_error(400, "max_token")),
    (
        "HTTP: an unknown playground field",
        http('{"prefix": "hi", "lenght": 5}', path="/api/generate"),
        http_error(400, "lenght"),
    ),
    (
        "HTTP: an unknown stream_options field",
        http('{"prompt": "hi", "stream": true, "stream_options": {"usage": true}}'),
        http_error(400, "usage"),
    ),
    (
        "HTTP: logit_bias that would change the text",
        http('{"prompt": "hi", "logit_bias": {"50256": -100}}'),
        http_error(400, "logit_bias"),
    ),
    (
        "HTTP: presence_penalty out of OpenAI's range",
        http('{"prompt": "hi", "presence_penalty": 2.5}'),
        http_error(400, "presence_penalty"),
    ),
    (
        "HTTP: min_tokens above max_tokens",
        http('{"prompt": "hi", "max_tokens": 3, "min_tokens": 4}'),
        http_error(400, "min_tokens"),
    ),
    (
        "HTTP: a DRY breaker that is not text",
        http('{"prompt": "hi", "dry_sequence_breakers": [1]}'),
        http_error(400, "dry_sequence_breakers"),
    ),
    (
        "HTTP: OpenAI's neutral values and model/user are accepted",
        http(
            '{"prompt": "hi", "model": "gpt-3.5-turbo-instruct", "user": "u1", "logit_bias": {}, "presence_penalty": 0,'
            ' "frequency_penalty": 0, "logprobs": null, "echo": false, "suffix": null, "best_of": 1, "max_tokens": 3}'
        ),
        http_ok(),
    ),
    (
        "HTTP: Authorization with non-ASCII bytes",
        raw_http(
            b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer \xff\xfe{key}\r\n"
            b"Content-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
        ),
        http_error(401, "API key"),
    ),
    (
        "HTTP: Authorization in UTF-8",
        raw_http(
            "GET /api/stats HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer é"
            "\r\nConnection: close\r\n\r\n".encode()
        ),
        http_error(401, "API key"),
    ),
    (
        "HTTP: a malformed header line (aiohttp's own 400)",
        raw_http(b"GET /v1/models HTTP/1.1\r\nHost localhost\r\n\r\n"),
        http_error(400, "HTTP"),
    ),
    (
        "HTTP: a request line over 8 KB",
        raw_http(b"GET /" + b"a" * 9_000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n"),
        http_error(400, "HTTP"),
    ),
    (
        "HTTP: not HTTP at all",
        raw_http(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 TLS hello\r\n\r\n"),
        http_error(400, "HTTP"),
    ),
    (
        "HTTP: a bad chunk size",
        raw_http(
            b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {key}\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n{}\r\n0\r\n\r\n"
        ),
        http_error(400, "HTTP"),
    ),
]


def test_the_table_has_at_least_25_cases():
    assert len(CASES) >= 25
    assert len({name for name, _, _ in CASES}) == len(CASES)


@pytest.fixture
async def env(tmp_path):
    config = make_config()
    async with (
        Store.open(tmp_path / "bot.db") as store,
        EchoBackend() as backend,
        Core(backend, store, config) as core,
        WebAdapter(core, dataclasses.replace(config.web, port=0), KEY) as web,
        aiohttp.ClientSession(base_url=web.url, headers={"Authorization": f"Bearer {KEY}"}) as client,
    ):
        yield Env(core, store, tmp_path, client, web)


async def count_requests(store: Store) -> int:
    return (await store._rows("SELECT COUNT(*) FROM requests"))[0][0]


@pytest.mark.parametrize("name, run, check", CASES, ids=[c[0] for c in CASES])
async def test_bad_input(env, name, run, check, caplog):
    before = await count_requests(env.store)
    try:
        outcome = await run(env)
    except BotkitError as exc:
        outcome = exc
    check(outcome)
    tracebacks = [r.getMessage() for r in caplog.records if r.exc_info]
    assert not tracebacks, f"bad input logged a traceback: {tracebacks}"
    if isinstance(outcome, BotkitError) or (isinstance(outcome, tuple) and outcome[0] >= 400):
        assert await count_requests(env.store) == before, "a refused input left a request behind"


async def test_an_accepted_http_request_is_in_the_store(env):
    async with env.http.post("/v1/completions", json={"prompt": "bad \ud800 input?", "max_tokens": 3}) as response:
        assert response.status == 200
        body = await response.json()
    assert body["choices"][0]["text"] == "ok"
    rows = await env.core.recent(limit=5)
    assert [(r["text"], r["status"]) for r in rows] == [("bad ? input?", "done")]


def test_a_valid_default_settings_object_is_not_refused():
    """The refusals above are about the input, not the settings machinery."""
    assert ChatSettings().replace(template="{message} says:", temperature="0.5").temperature == 0.5
