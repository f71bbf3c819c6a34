"""Security: secrets never reach the logs, the database, error replies or the stats; hostile names and
texts are stored as data (SQL is parameterised); the web adapter serves other machines only with an
API key."""

import logging
import secrets

import aiohttp
import pytest
from botkit.adapters.web_adapter import WebAdapter

from botkit.chat.chats import Chats, Prompt
from botkit.config import WebConfig, secret
from botkit.errors import ConfigError
from botkit.serve.backends import Completion, Job
from botkit.serve.core import Core
from botkit.serve.store import Store

from .conftest import EchoBackend, make_config

KEY_ENV = "BOTKIT_RELIABILITY_WEB_KEY"


class FlakyBackend(EchoBackend):
    """Fails every prompt that contains FAIL, like a worker that crashed on it."""

    async def generate(self, job: Job) -> Completion:
        if "FAIL" in job.prompt:
            raise RuntimeError(f"worker crashed on job {job.id}")
        return await super().generate(job)


def hits(secret_value: str, blobs: list[bytes]) -> int:
    needle = secret_value.encode()
    return sum(blob.count(needle) for blob in blobs)


async def test_no_secret_in_logs_database_replies_or_stats(tmp_path, monkeypatch, caplog):
    key = "sk-" + secrets.token_urlsafe(32)
    monkeypatch.setenv(KEY_ENV, key)
    caplog.set_level(logging.DEBUG)
    config = make_config()
    web_config = WebConfig(port=0, api_key_env=KEY_ENV)
    written: list[bytes] = []

    async with (
        Store.open(tmp_path / "bot.db") as store,
        FlakyBackend() as backend,
        Core(backend, store, config) as core,
        WebAdapter(core, web_config, secret(KEY_ENV, "The web API key")) as web,
    ):
        chats = Chats(core, store, core.config)
        good = {"Authorization": f"Bearer {key}"}
        calls = [
            ("POST", "v1/completions", good, {"prompt": "hello", "max_tokens": 4}),
            ("POST", "v1/completions", good, {"prompt": "please FAIL now", "max_tokens": 4}),
            ("POST", "v1/completions", good, {"prompt": "hi", "max_tokens": -1}),
            ("POST", "v1/completions", {"Authorization": f"Bearer {key}x"}, {"prompt": "wrong key"}),
            ("POST", "v1/completions", {"Authorization": f"bearer {key.upper()}"}, {"prompt": "wrong case"}),
            ("POST", "v1/completions", {}, {"prompt": "no key"}),
            ("POST", "api/generate", good, {"prefix": "FAIL streaming", "length": 3}),
            ("GET", "api/stats", good, None),
            ("GET", "api/recent", good, None),
            ("GET", "v1/models", good, None),
            ("GET", "no/such/path", {"Authorization": key}, None),
        ]
        statuses = []
        async with aiohttp.ClientSession() as http:
            for method, path, headers, body in calls:
                async with http.request(method, web.url + path, headers=headers, json=body) as response:
                    statuses.append(response.status)
                    written.append(await response.read())
                    written.append(repr(dict(response.headers)).encode())
        chat = await chats.submit(Prompt("discord", "c1", "u1", "a FAIL in chat"))
        with pytest.raises(Exception) as failure:
            await chat.result()
        written.append(str(failure.value).encode())
        written.append(core.stats().summary().encode())
        written.append(repr(await core.recent(limit=100)).encode())

    assert statuses == [200, 500, 400, 401, 401, 401, 200, 200, 200, 200, 401]
    assert any(b"worker crashed" in r for r in [caplog.text.encode()]), "the failure was not logged: nothing to scan"
    written.append(caplog.text.encode())
    for path in tmp_path.iterdir():  # the database, its WAL and anything else botkit wrote
        written.append(path.read_bytes())
    assert hits(key, [f"Authorization: Bearer {key}".encode()]) == 1  # the scan finds the key when it is there
    assert hits(key, written) == 0, "the API key was written somewhere"


HOSTILE = [
    ("discord", "1'; DROP TABLE chats; --", 'u" OR 1=1 --', "Robert'); DROP TABLE messages;--", "%' OR '1'='1"),
    ("telegram", "-100; DELETE FROM requests", "0x27", "名前 \\' \"", "'); UPDATE requests SET status='done'; --"),
    ("discord", "%", "_", "%_%", "SELECT * FROM deliveries WHERE 1=1"),
]


async def test_hostile_names_and_texts_are_stored_and_read_back_intact(tmp_path):
    async with (
        Store.open(tmp_path / "bot.db") as store,
        EchoBackend() as backend,
        Core(backend, store, make_config()) as core,
    ):
        chats = Chats(core, store, core.config)
        innocent = await (await chats.submit(Prompt("discord", "innocent", "u0", "plain message"))).result()
        ids = []
        for platform, chat_id, user_id, user_name, text in HOSTILE:
            ticket = await chats.submit(
                Prompt(platform, chat_id, user_id, text, message_id=chat_id, user_name=user_name)
            )
            await ticket.result()
            ids.append(ticket.request_id)
            await chats.update_settings(platform, chat_id, template=f"{user_name} {{message}}")
            assert (await chats.settings(platform, chat_id)).template == f"{user_name} {{message}}"
        for request_id, (platform, chat_id, user_id, _, text) in zip(ids, HOSTILE, strict=True):
            row = await store.request(request_id)
            assert (row["platform"], row["chat_id"], row["user_id"], row["text"], row["status"]) == (
                platform,
                chat_id,
                user_id,
                text,
                "done",
            )
        names = {r[0] for r in await store._rows("SELECT user_name FROM messages")}
        assert {h[3] for h in HOSTILE} <= names
        assert await store.context("discord", "%", 10) == [(HOSTILE[2][4], "ok")]  # "%" is a name, not a pattern
        assert await store.context("discord", "innocent", 10) == [("plain message", "ok")]
        await chats.reset_context("discord", HOSTILE[0][1])
        assert await store.context("discord", HOSTILE[0][1], 10) == []
        assert await store.context("discord", "innocent", 10) == [("plain message", "ok")]
        tables = {r[0] for r in await store._rows("SELECT name FROM sqlite_master WHERE type='table'")}
        assert tables == {"chats", "messages", "requests", "deliveries", "answers", "events", "meta", "previews"}
        assert (await store.request(innocent.request_id))["status"] == "done"


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "bot.example.com"])
async def test_the_web_adapter_refuses_a_public_bind_without_an_api_key(tmp_path, host):
    async with (
        Store.open(tmp_path / "bot.db") as store,
        EchoBackend() as backend,
        Core(backend, store, make_config()) as core,
    ):
        with pytest.raises(ConfigError) as refused:
            async with WebAdapter(core, WebConfig(host=host, port=0)):
                pass
        assert "api_key_env" in str(refused.value)


async def test_a_public_bind_with_a_key_serves_only_callers_with_the_key(tmp_path):
    key = secrets.token_urlsafe(24)
    async with (
        Store.open(tmp_path / "bot.db") as store,
        EchoBackend() as backend,
        Core(backend, store, make_config()) as core,
        WebAdapter(core, WebConfig(host="0.0.0.0", port=0), key) as web,
        aiohttp.ClientSession() as http,
    ):
        url = web.url.replace("0.0.0.0", "127.0.0.1")
        async with http.get(url + "api/stats") as response:
            assert response.status == 401
        async with http.get(url + "api/stats", headers={"Authorization": f"Bearer {key}"}) as response:
            assert response.status == 200


async def test_without_a_key_only_requests_addressed_to_localhost_are_answered(tmp_path):
    async with (
        Store.open(tmp_path / "bot.db") as store,
        EchoBackend() as backend,
        Core(backend, store, make_config()) as core,
        WebAdapter(core, WebConfig(port=0)) as web,
        aiohttp.ClientSession() as http,
    ):
        async with http.get(web.url + "api/stats", headers={"Host": "evil.example:80"}) as response:
            assert response.status == 403  # a DNS-rebinding page reaches 127.0.0.1 under another name
        async with http.get(web.url + "api/stats") as response:
            assert response.status == 200


@pytest.mark.parametrize("all_platforms", [False, True])
async def test_api_recent_shows_only_the_apis_own_requests_unless_configured(tmp_path, all_platforms):
    """Anyone holding the API key could read every platform's private chats through /api/recent."""
    key = "sk-" + secrets.token_urlsafe(32)
    web_config = WebConfig(port=0, recent_all_platforms=all_platforms)
    async with (
        Store.open(tmp_path / "bot.db") as store,
        EchoBackend() as backend,
        Core(backend, store, make_config()) as core,
        WebAdapter(core, web_config, key) as web,
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as http,
    ):
        chats = Chats(core, store, core.config)
        await (await chats.submit(Prompt("telegram", "dm-42", "u42", "my private note"))).result()
        async with http.post(web.url + "v1/completions", json={"prompt": "public prompt", "max_tokens": 2}) as response:
            assert response.status == 200
        async with http.get(web.url + "api/recent") as response:
            assert response.status == 200
            listed = (await response.json())["recent"]
    assert [r["text"] for r in listed] == (["public prompt", "my private note"] if all_platforms else ["public prompt"])
