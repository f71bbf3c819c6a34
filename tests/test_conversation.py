"""The conversation layer's promises that span a restart or several turns, tested against the real
adapters (tests/platforms.py): the empty-reply retry, duplicate events, replies after a restart,
and channel context."""

from __future__ import annotations

import contextlib
import dataclasses
import sqlite3

import pytest
from platforms import GROUP, PRIVATE, fake_server, platform, until
from scripted import ScriptedBackend, deliveries

from botkit.chat.chats import Prompt
from botkit.chat.conversation import EMPTY_REPLY, SORRY
from botkit.config import Config, ConversationConfig, LimitsConfig
from botkit.params import ChatSettings

QUICK = ChatSettings(truncate="", length=8)
NO_LIMITS = LimitsConfig(user_per_minute=0, chat_per_minute=0)
CHATS = ("discord", "telegram")  # platforms with messages to reply to after a restart


def config(**changes) -> Config:
    return dataclasses.replace(Config(chat=QUICK, limits=NO_LIMITS), **changes)


def rows(tmp_path, sql: str) -> list[tuple]:
    with contextlib.closing(sqlite3.connect(tmp_path / "bot.db")) as db:
        return db.execute(sql).fetchall()


@pytest.mark.parametrize("name", ["discord", "telegram", "console"])
async def test_an_empty_reply_is_retried_in_the_same_slot_and_never_becomes_context(tmp_path, monkeypatch, name):
    replies = iter(["", "second try", " \n", "", "third"])
    backend = ScriptedBackend(lambda prompt: next(replies))
    limits = LimitsConfig(user_per_minute=3, chat_per_minute=0)  # a retry through admission would use a 4th slot
    async with platform(name, tmp_path, monkeypatch, backend, config(limits=limits)) as bot:
        answers = []
        for text in ("one", "two", "three"):
            message = await bot.send(PRIVATE, "plain", text)
            await until(lambda message=message: bot.answers(message))
            answers.append(bot.answers(message))
    assert answers == [["second try"], [EMPTY_REPLY], ["third"]]
    assert len(backend.prompts) == 5 and backend.prompts[2] == backend.prompts[3]  # each retry: the same prompt
    assert "one" in backend.prompts[2] and "second try" in backend.prompts[2]  # the good exchange is context,
    assert "two" not in backend.prompts[4] and "one" in backend.prompts[4]  # the empty one is not
    assert rows(tmp_path, "SELECT status, reply FROM requests ORDER BY id") == [
        ("done", "second try"),
        ("done", ""),
        ("done", "third"),
    ]


@pytest.mark.parametrize("name", CHATS)
async def test_a_redelivered_event_is_recognised_through_the_store_after_a_restart(tmp_path, monkeypatch, name):
    async with fake_server(name, monkeypatch) as fake:
        async with platform(name, tmp_path, monkeypatch, ScriptedBackend(), config(), fake=fake) as bot:
            message = await bot.send(GROUP, "mention", "hello")
            command = await bot.send(GROUP, "command", "a command")
            await until(lambda: bot.answers(message) and bot.answers(command))
        backend = ScriptedBackend()
        async with platform(name, tmp_path, monkeypatch, backend, config(), fake=fake) as bot:
            for event in (message, command):  # a gateway replay, or Telegram resending an unconfirmed update
                if name == "discord":
                    await fake.dispatch("INTERACTION_CREATE" if "token" in event else "MESSAGE_CREATE", event)
                else:
                    fake.push_update({"message": event})
            sentinel = await bot.send(GROUP, "mention", "sentinel")
            await until(lambda: bot.answers(sentinel))
            await bot.adapter.conversation.idle()  # the replays came first; their handlers have ended too
            assert len(bot.answers(message)) == 1 and len(bot.answers(command)) == 1
        assert len(backend.prompts) == 1 and backend.prompts[0].endswith("sentinel\n")


@pytest.mark.parametrize("name", CHATS)
@pytest.mark.parametrize("age_limit_s, answer", [(600.0, "a scripted reply"), (0.0, SORRY)])
async def test_a_request_interrupted_by_a_shutdown_is_answered_once_after_the_restart(
    tmp_path, monkeypatch, name, age_limit_s, answer
):
    stuck = ScriptedBackend()
    stuck.gate.clear()  # generation never ends before the shutdown
    async with fake_server(name, monkeypatch) as fake:
        async with platform(name, tmp_path, monkeypatch, stuck, config(), fake=fake) as bot:
            message = await bot.send(GROUP, "mention", "hello")
            await until(lambda: stuck.prompts)
        assert rows(tmp_path, "SELECT status, error FROM requests") == [
            ("failed", "interrupted: botkit stopped before this finished")
        ]
        assert bot.answers(message) == []
        backend = ScriptedBackend()
        restarted = config(conversation=ConversationConfig(resume_max_age_s=age_limit_s))
        async with platform(name, tmp_path, monkeypatch, backend, restarted, fake=fake) as bot:
            await until(lambda: bot.answers(message))
            await bot.adapter.conversation.idle()  # what the restart owed is given
            assert bot.answers(message) == [answer]  # a reply to the original message, once
        async with platform(name, tmp_path, monkeypatch, ScriptedBackend(), restarted, fake=fake) as bot:
            await until(lambda: bot.core.connections.states().get(name))  # connected: it looked for what it owes
            await bot.adapter.conversation.idle()  # a third start owes nothing
            assert bot.answers(message) == [answer]
    # run again with the prompt it was accepted with
    assert backend.prompts == (stuck.prompts if answer != SORRY else [])
    ((request_id, _),) = deliveries(tmp_path)
    assert rows(tmp_path, "SELECT request_id, kind FROM answers") == [
        (request_id, "reply" if answer != SORRY else "sorry")
    ]


@pytest.mark.parametrize("name", CHATS)
async def test_a_reply_done_but_never_sent_is_sent_after_the_restart_and_one_begun_is_not(tmp_path, monkeypatch, name):
    async with fake_server(name, monkeypatch) as fake:
        async with platform(name, tmp_path, monkeypatch, ScriptedBackend(), config(), fake=fake) as bot:
            await bot.send(GROUP, "mention", "warm up")  # a conversation exists (the DM/chat ids are known)
            await until(lambda: len(rows(tmp_path, "SELECT * FROM deliveries")) == 1)
            # Two requests the bot finished but did not send before it died: one never begun, one begun
            # (its answers row written, the platform's confirmation lost): only the first is sent.
            chat_id = rows(tmp_path, "SELECT chat_id FROM messages")[0][0]
            originals = [await bot.send(GROUP, "plain", text) for text in ("unsent", "begun")]
            ids = [str(m.get("id") or m.get("message_id")) for m in originals]
            tickets = [
                await bot.adapter.conversation.chats.submit(Prompt(name, chat_id, "7", text, message_id, "alice"))
                for text, message_id in zip(("unsent", "begun"), ids, strict=True)
            ]
            for ticket in tickets:
                await ticket.result()
            assert await bot.store.claim_answer(tickets[1].request_id, "reply")
        async with platform(name, tmp_path, monkeypatch, ScriptedBackend(), config(), fake=fake) as bot:
            await until(lambda: bot.answers(originals[0]))
            await bot.adapter.conversation.idle()
            assert bot.answers(originals[0]) == ["a scripted reply"] and bot.answers(originals[1]) == []


@pytest.mark.parametrize("name", CHATS)
async def test_channel_context_reads_the_room_with_names_and_forgets_on_reset(tmp_path, monkeypatch, name):
    backend = ScriptedBackend(lambda prompt: "I agree")
    settings = dataclasses.replace(QUICK, context="channel")
    kept = ConversationConfig(max_channel_messages=3)
    async with platform(name, tmp_path, monkeypatch, backend, config(chat=settings, conversation=kept)) as bot:
        for text in ("first", "second", "third", "fourth"):
            await bot.send(GROUP, "plain", f"the {text} message")
        await until(lambda: len(rows(tmp_path, "SELECT * FROM messages")) == 3)  # the retention bound: the newest 3
        asked = await bot.send(GROUP, "mention", "what do you think?")
        await until(lambda: bot.answers(asked))
        after = await bot.send(GROUP, "mention", "and now?")
        await until(lambda: bot.answers(after))
        reset = await bot.send(GROUP, "command", "")  # /gen with nothing: a usage sentence, not a message
        await until(lambda: bot.answers(reset))
    author, bot_name = ("alice", "botkit") if name == "discord" else ("alice", "Botkit")
    assert backend.prompts[0] == (
        f"{author}: the second message\n{author}: the third message\n{author}: the fourth "
        "message\n"
        f"{author}: what do you think?\n{bot_name}:"
    )
    assert backend.prompts[1].endswith(
        f"{author}: what do you think?\n{bot_name}: I agree\n{author}: and now?\n{bot_name}:"
    )
    assert "the first message" not in "".join(backend.prompts)


@pytest.mark.parametrize("name", CHATS)
async def test_a_multi_line_message_stays_one_line_of_its_author_and_a_replys_line_breaks_are_sent(
    tmp_path, monkeypatch, name
):
    backend = ScriptedBackend(lambda prompt: "bring:<br>- water<br>- a jacket")
    settings = dataclasses.replace(QUICK, context="channel")
    async with platform(name, tmp_path, monkeypatch, backend, config(chat=settings)) as bot:
        asked = await bot.send(GROUP, "mention", "count me in\npacking list?")
        await until(lambda: bot.answers(asked))
    assert backend.prompts[0].endswith(": count me in<br>packing list?\n" + backend.prompts[0].rsplit("\n", 1)[1])
    assert backend.prompts[0].count("\n") == 1  # one line of its author, then the bot's turn
    assert bot.answers(asked) == ["bring:\n- water\n- a jacket"]
