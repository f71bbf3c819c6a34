"""What botkit keeps about people, and how they erase it: /privacy, /forget, /forget all, and
`[store] retention_days`, checked against the real SQLite file (rows gone, their text no longer
anywhere in the file or its WAL, the file compacted) and against the next prompts (no longer context)."""

from __future__ import annotations

import contextlib
import dataclasses
import sqlite3
import time

import pytest
from platforms import GROUP, platform, until
from scripted import ScriptedBackend

from botkit.chat.chats import Chats, Prompt
from botkit.config import Config, LimitsConfig, StoreConfig
from botkit.params import ChatSettings
from botkit.serve.core import Core
from botkit.serve.retention import Retention
from botkit.serve.store import Store

SECRET = "SWORDFISH-4711"
NO_LIMITS = LimitsConfig(user_per_minute=0, chat_per_minute=0)


def file_bytes(tmp_path) -> bytes:
    """Everything SQLite keeps on disk for the database: the file and its WAL."""
    return b"".join(p.read_bytes() for p in tmp_path.glob("bot.db*"))


def count(tmp_path, sql: str) -> int:
    with contextlib.closing(sqlite3.connect(tmp_path / "bot.db")) as db:
        return db.execute(sql).fetchone()[0]


@pytest.mark.parametrize("name", ["discord", "telegram"])
async def test_forget_erases_a_members_messages_from_the_file_and_from_context(tmp_path, monkeypatch, name):
    backend = ScriptedBackend(lambda prompt: "noted")
    async with platform(name, tmp_path, monkeypatch, backend, Config(chat=ChatSettings(truncate="", length=8), limits=NO_LIMITS)) as bot:
        secret = await bot.send(GROUP, "mention", f"my password is {SECRET}")
        await until(lambda: bot.answers(secret))
        bobs = await bot.send(GROUP, "mention", "hello from bob", user="bob")
        await until(lambda: bot.answers(bobs))
        assert SECRET in backend.prompts[1]  # Alice's message was context for Bob's request
        assert SECRET.encode() in file_bytes(tmp_path)
        forget = await bot.command(GROUP, "forget")
        await until(lambda: bot.answers(forget))
        assert bot.answers(forget) == ["Done: I erased 1 message I kept from you in this chat, and my replies to them."]
        after = await bot.send(GROUP, "mention", "what did alice say?", user="bob")
        await until(lambda: bot.answers(after))
        assert SECRET not in backend.prompts[2] and "hello from bob" in backend.prompts[2]
        assert SECRET.encode() not in file_bytes(tmp_path)  # overwritten, also where Bob's stored prompt quoted it
    assert count(tmp_path, "SELECT COUNT(*) FROM messages WHERE text LIKE '%password%'") == 0
    assert count(tmp_path, "SELECT COUNT(*) FROM requests") == 2  # Bob's two are kept
    assert count(tmp_path, "SELECT COUNT(*) FROM deliveries") == 2


@pytest.mark.parametrize("name", ["discord", "telegram"])
async def test_forget_all_is_for_chat_admins_and_erases_everyones(tmp_path, monkeypatch, name):
    async with platform(name, tmp_path, monkeypatch, ScriptedBackend(), Config(limits=NO_LIMITS)) as bot:
        for user in ("alice", "bob"):
            message = await bot.send(GROUP, "mention", f"I am {user}", user=user)
            await until(lambda message=message: bot.answers(message))
        refused = await bot.command(GROUP, "forget", "all", user="bob")
        await until(lambda: bot.answers(refused))
        assert "can erase everyone's" in bot.answers(refused)[0]
        assert count(tmp_path, "SELECT COUNT(*) FROM messages") == 2
        done = await bot.command(GROUP, "forget", "all", user="bob", admin=True)
        await until(lambda: bot.answers(done))
        assert bot.answers(done) == ["Done: I erased 2 messages I kept from this chat, and my replies to them."]
    assert count(tmp_path, "SELECT COUNT(*) FROM messages") == count(tmp_path, "SELECT COUNT(*) FROM requests") == 0


@pytest.mark.parametrize(("store", "chat", "says"), [
    (StoreConfig(), ChatSettings(), "until erased"),
    (StoreConfig(retention_days=30), ChatSettings(), "for 30 days, then erased"),
    (StoreConfig(retention_days=7), ChatSettings(context="channel"), "also keep the last 50 messages not addressed to me"),
])
async def test_privacy_says_what_is_kept_and_for_how_long(tmp_path, monkeypatch, store, chat, says):
    async with platform("telegram", tmp_path, monkeypatch, ScriptedBackend(), Config(store=store, chat=chat)) as bot:
        asked = await bot.command(GROUP, "privacy")
        await until(lambda: bot.answers(asked))
    (text,) = bot.answers(asked)
    assert says in text and "/forget" in text and "@" not in text.replace("@\u200b", "")


async def test_retention_erases_old_rows_on_schedule_and_vacuums_the_file(tmp_path):
    now = [time.time()]
    config = StoreConfig(retention_days=1, prune_interval_s=0.05, vacuum_interval_s=0.2)
    async with Store.open(tmp_path / "bot.db") as store, ScriptedBackend() as backend, \
            Core(backend, store, Config(limits=NO_LIMITS)) as core:
        chats = Chats(core, store, core.config)
        for i in range(200):  # old enough to fill pages that VACUUM gives back
            ticket = await chats.submit(Prompt("telegram", "-100", "42", f"{SECRET} number {i} " + "x" * 200, str(i), "alice"))
            await ticket.result()
        await store.record_delivery(ticket.request_id, ["m1"])
        await store.claim_answer(ticket.request_id, "reply")
        with contextlib.closing(sqlite3.connect(tmp_path / "bot.db")) as db:  # two days pass for these rows
            db.execute("UPDATE messages SET received_at = received_at - 2 * 86400")
            db.commit()
        fresh = await chats.submit(Prompt("telegram", "-100", "7", "a fresh message", "fresh", "bob"))
        await fresh.result()
        size_before = (tmp_path / "bot.db").stat().st_size
        async with Retention(store, config, clock=lambda: now[0]):
            await until(lambda: count(tmp_path, "SELECT COUNT(*) FROM messages") == 1)
            await until(lambda: count(tmp_path, "PRAGMA freelist_count") == 0 and (tmp_path / "bot.db").stat().st_size < size_before)
        history = await store.context("telegram", "-100", 50)
    assert [text for text, _ in history] == ["a fresh message"]
    assert count(tmp_path, "SELECT COUNT(*) FROM requests") == 1 and count(tmp_path, "SELECT COUNT(*) FROM deliveries") == 0
    assert SECRET.encode() not in file_bytes(tmp_path)


async def test_without_retention_nothing_is_erased(tmp_path):
    async with Store.open(tmp_path / "bot.db") as store, ScriptedBackend() as backend, \
            Core(backend, store, Config(limits=NO_LIMITS)) as core:
        chats = Chats(core, store, core.config)
        await (await chats.submit(Prompt("telegram", "-100", "42", "kept", "1", "alice"))).result()
        retention = Retention(store, StoreConfig(), clock=lambda: time.time() + 10 * 365 * 86400)
        assert await retention.run_once() == 0
    assert count(tmp_path, "SELECT COUNT(*) FROM messages") == 1


def test_settings_change_of_context_is_validated():
    with pytest.raises(Exception, match="context must be one of bot, channel"):
        ChatSettings().replace(context="everything")
    for bad in ("{author}", "{message} {message}", "{author}: {message} {user}", "x" * 300 + "{message}"):
        with pytest.raises(Exception, match="chat.format"):
            dataclasses.replace(ChatSettings(), chat_format=bad)
