"""What botkit keeps about people, and how they erase it: /privacy, /forget, /forget all, and
`[store] retention_days`, checked against the real SQLite file (rows gone, their text no longer
anywhere in the file or its WAL, the file compacted) and against the next prompts (no longer context)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import sqlite3
import time

import pytest
from platforms import GROUP, platform, until
from scripted import ScriptedBackend

from botkit.chat.chats import Chats, Prompt
from botkit.config import Config, LimitsConfig, StoreConfig
from botkit.engine.engine import Engine
from botkit.params import ChatSettings, SamplingParams
from botkit.serve.backends import LocalBackend
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
    async with platform(
        name, tmp_path, monkeypatch, backend, Config(chat=ChatSettings(truncate="", length=8), limits=NO_LIMITS)
    ) as bot:
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


@pytest.mark.parametrize(
    ("store", "chat", "says"),
    [
        (StoreConfig(), ChatSettings(), "until erased"),
        (StoreConfig(retention_days=30), ChatSettings(), "for 30 days, then erased"),
        (
            StoreConfig(retention_days=7),
            ChatSettings(context="channel"),
            "also keep the last 50 messages not addressed to me",
        ),
    ],
)
async def test_privacy_says_what_is_kept_and_for_how_long(tmp_path, monkeypatch, store, chat, says):
    async with platform("telegram", tmp_path, monkeypatch, ScriptedBackend(), Config(store=store, chat=chat)) as bot:
        asked = await bot.command(GROUP, "privacy")
        await until(lambda: bot.answers(asked))
    (text,) = bot.answers(asked)
    assert says in text and "/forget" in text and "@" not in text.replace("@\u200b", "")


async def test_retention_erases_old_rows_on_schedule_and_vacuums_the_file(tmp_path):
    now = [time.time()]
    config = StoreConfig(retention_days=1, prune_interval_s=0.05, vacuum_interval_s=0.2)
    async with (
        Store.open(tmp_path / "bot.db") as store,
        ScriptedBackend() as backend,
        Core(backend, store, Config(limits=NO_LIMITS)) as core,
    ):
        chats = Chats(core, store, core.config)
        for i in range(200):  # old enough to fill pages that VACUUM gives back
            ticket = await chats.submit(
                Prompt("telegram", "-100", "42", f"{SECRET} number {i} " + "x" * 200, str(i), "alice")
            )
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
            await until(
                lambda: (
                    count(tmp_path, "PRAGMA freelist_count") == 0 and (tmp_path / "bot.db").stat().st_size < size_before
                )
            )
        history = await store.context("telegram", "-100", 50)
    assert [text for text, _ in history] == ["a fresh message"]
    assert (
        count(tmp_path, "SELECT COUNT(*) FROM requests") == 1
        and count(tmp_path, "SELECT COUNT(*) FROM deliveries") == 0
    )
    assert SECRET.encode() not in file_bytes(tmp_path)


async def test_without_retention_nothing_is_erased(tmp_path):
    async with (
        Store.open(tmp_path / "bot.db") as store,
        ScriptedBackend() as backend,
        Core(backend, store, Config(limits=NO_LIMITS)) as core,
    ):
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


@pytest.mark.parametrize("name", ["discord", "telegram"])
async def test_forget_erases_the_text_from_prompts_still_generating(tmp_path, monkeypatch, name):
    backend = ScriptedBackend(lambda prompt: "noted")
    async with platform(
        name, tmp_path, monkeypatch, backend, Config(chat=ChatSettings(truncate="", length=8), limits=NO_LIMITS)
    ) as bot:
        secret = await bot.send(GROUP, "mention", f"my password is {SECRET}")
        await until(lambda: bot.answers(secret))
        backend.gate.clear()  # Bob's reply, whose prompt quotes Alice, is still generating when she forgets
        bobs = await bot.send(GROUP, "mention", "hello from bob", user="bob")
        await until(lambda: len(backend.prompts) == 2)
        assert SECRET in backend.prompts[1] and SECRET.encode() in file_bytes(tmp_path)
        forget = await bot.command(GROUP, "forget")
        await until(lambda: bot.answers(forget))
        assert SECRET.encode() not in file_bytes(tmp_path)
        backend.gate.set()
        await until(lambda: bot.answers(bobs))
        assert bot.answers(bobs) == ["noted"]
        assert SECRET.encode() not in file_bytes(tmp_path)


@pytest.mark.parametrize("name", ["discord", "telegram"])
async def test_forget_during_the_members_own_pending_request_still_answers_it_and_keeps_nothing(
    tmp_path, monkeypatch, caplog, name
):
    backend = ScriptedBackend(lambda prompt: "noted")
    async with platform(name, tmp_path, monkeypatch, backend, Config(limits=NO_LIMITS)) as bot:
        backend.gate.clear()
        asked = await bot.send(GROUP, "mention", f"my password is {SECRET}")
        await until(lambda: len(backend.prompts) == 1)
        forget = await bot.command(GROUP, "forget")
        await until(lambda: bot.answers(forget))
        assert bot.answers(forget) == ["Done: I erased 1 message I kept from you in this chat, and my replies to them."]
        backend.gate.set()
        await until(lambda: bot.answers(asked))
        assert bot.answers(asked) == ["noted"]
        await asyncio.sleep(0.2)  # the adapter records the delivery just after sending: let it try
    assert SECRET.encode() not in file_bytes(tmp_path)
    assert count(tmp_path, "SELECT COUNT(*) FROM requests") == count(tmp_path, "SELECT COUNT(*) FROM deliveries") == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("botkit")]


async def test_forget_empties_the_wal_once_a_concurrent_reader_lets_go(tmp_path):
    async with Store.open(tmp_path / "bot.db") as store:
        await store.add_request(
            kind="chat",
            platform="telegram",
            chat_id="-100",
            user_id="42",
            user_name="alice",
            platform_message_id="1",
            text=f"my password is {SECRET}",
            prompt=SECRET,
            params={},
        )
        reader = sqlite3.connect(tmp_path / "bot.db")  # a backup tool (Litestream) keeps a read transaction open
        reader.execute("BEGIN")
        assert reader.execute("SELECT COUNT(*) FROM messages").fetchone() == (1,)
        assert await store.forget("telegram", "-100", "42") == 1
        assert SECRET.encode() in file_bytes(tmp_path)  # the reader's snapshot still holds it: SQLite must keep it
        assert await store.context("telegram", "-100", 10) == []  # the store is not held meanwhile
        reader.rollback()
        reader.close()
        await until(lambda: SECRET.encode() not in file_bytes(tmp_path))


async def test_forget_drops_the_conversations_the_engine_keeps_for_reuse(tmp_path, tiny_lm):
    settings = ChatSettings(template="{message}", truncate="", length=4, unique=False)
    config = Config(limits=NO_LIMITS)
    async with (
        Store.open(tmp_path / "bot.db") as store,
        LocalBackend(tiny_lm, 2, cache_mb=64) as backend,
        Core(backend, store, config) as core,
    ):
        chats = Chats(core, store, config)
        text = f"my password is {SECRET}, " * 8  # past one 16-token block: worth keeping
        await (await chats.submit(Prompt("telegram", "-100", "42", text, "1", "alice"), settings)).result()
        secret_ids = tiny_lm.tokenizer(f" {SECRET}").input_ids
        kept = [e.tokens for e in backend.engine.prefix_cache.entries.values()]
        assert any(contains(tokens, secret_ids) for tokens in kept)
        assert await chats.forget("telegram", "-100", "42") == 1
        assert not backend.engine.prefix_cache.entries and backend.engine.prefix_cache.nbytes == 0


def test_a_sequence_in_flight_during_forget_is_not_kept_for_reuse(tiny_lm):
    engine = Engine(tiny_lm, 2, cache_mb=64)
    engine.add(tiny_lm.tokenizer(f"my password is {SECRET}, " * 8).input_ids, SamplingParams(max_new_tokens=4, seed=0))
    engine.step()
    engine.drop_cached_prefixes()
    while engine.has_work:
        engine.step()
    assert not engine.prefix_cache.entries


def contains(tokens: list[int], part: list[int]) -> bool:
    return any(tokens[i : i + len(part)] == part for i in range(len(tokens) - len(part) + 1))


def test_a_request_queued_before_forget_is_not_kept_for_reuse_when_it_runs_later(tiny_lm):
    engine = Engine(tiny_lm, 2, cache_mb=64)
    engine.drop_cached_prefixes(not_reusable_ids={7})  # request 7 still waits in the core's queue
    engine.add(
        tiny_lm.tokenizer(f"my password is {SECRET}, " * 8).input_ids,
        SamplingParams(max_new_tokens=4, seed=0),
        seq_id=7,
    )
    while engine.has_work:
        engine.step()
    assert not engine.prefix_cache.entries


async def test_a_prompt_built_while_forget_runs_is_not_kept(tmp_path):
    """A prompt assembled from context just before /forget erased it, and recorded just after."""
    backend = ScriptedBackend(lambda prompt: "noted")
    config = Config(chat=ChatSettings(truncate="", length=8), limits=NO_LIMITS)
    async with Store.open(tmp_path / "bot.db") as store, backend, Core(backend, store, config) as core:
        chats = Chats(core, store, config)
        await (
            await chats.submit(Prompt("telegram", "-100", "alice", f"my password is {SECRET}", "1", "alice"))
        ).result()
        context = store.context

        async def context_then_forget(*args):  # the member's /forget lands between the read and the write
            history = await context(*args)
            await chats.forget("telegram", "-100", "alice")
            return history

        store.context = context_then_forget
        ticket = await chats.submit(Prompt("telegram", "-100", "bob", "hello from bob", "2", "bob"))
        store.context = context
        await ticket.result()
        assert SECRET in backend.prompts[1]
    assert SECRET.encode() not in file_bytes(tmp_path)


async def test_a_reply_in_flight_that_copies_the_forgotten_text_is_not_stored(tmp_path):
    backend = ScriptedBackend(lambda prompt: prompt[-200:])  # a model that parrots its context
    config = Config(chat=ChatSettings(truncate="", length=8), limits=NO_LIMITS)
    async with Store.open(tmp_path / "bot.db") as store, backend, Core(backend, store, config) as core:
        chats = Chats(core, store, config)
        await (
            await chats.submit(Prompt("telegram", "-100", "alice", f"my password is {SECRET}", "1", "alice"))
        ).result()
        backend.gate.clear()
        bobs = await chats.submit(Prompt("telegram", "-100", "bob", "hello from bob", "2", "bob"))
        await until(lambda: len(backend.prompts) == 2)
        assert await chats.forget("telegram", "-100", "alice") == 1
        backend.gate.set()
        assert SECRET in (await bobs.result()).text  # sent: it answers Bob, who asked
        assert count(tmp_path, "SELECT COUNT(*) FROM requests WHERE status = 'done'") == 1
    assert SECRET.encode() not in file_bytes(tmp_path)
