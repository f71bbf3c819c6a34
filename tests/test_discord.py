"""The Discord adapter end to end: the real discord.py client against tests/fake_discord.py, the real
core and store (SQLite in tmp_path), and either the tiny random GPT-2 or a scripted backend whose
replies are a plain function of the prompt."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import yarl

with warnings.catch_warnings():  # discord.py imports audioop, deprecated since Python 3.11 (voice only)
    warnings.filterwarnings("ignore", "'audioop' is deprecated", DeprecationWarning)
    import discord
from botkit.adapters.discord_adapter import DiscordAdapter
from fake_discord import (
    BOB,
    CHANNEL_ID,
    DM_CHANNEL_ID,
    MANAGE_GUILD,
    OTHER_BOT,
    OTHER_CHANNEL_ID,
    FakeDiscord,
)
from scripted import ScriptedBackend, delivered, deliveries

from botkit.chat.chats import Chats
from botkit.chat.conversation import EMPTY_REPLY
from botkit.chat.replies import defuse_mentions
from botkit.config import BatchConfig, Config, DiscordConfig, LimitsConfig
from botkit.errors import ConfigError
from botkit.params import ChatSettings
from botkit.serve.backends import LocalBackend
from botkit.serve.core import Core
from botkit.serve.store import Store

QUICK = ChatSettings(truncate="", length=8)  # the tiny model's replies: short and never cut to nothing
NO_PINGS = {"parse": []}  # AllowedMentions.none() as sent to Discord
SEND = r"/channels/\d+/messages"
COMMANDS = {"gen", "settings", "reset", "stats", "help", "privacy", "forget"}


@pytest.fixture
async def fake(monkeypatch):
    async with FakeDiscord() as fake:
        monkeypatch.setattr(discord.http.Route, "BASE", fake.api_url)
        monkeypatch.setattr(discord.gateway.DiscordWebSocket, "DEFAULT_GATEWAY", yarl.URL(fake.gateway_url))
        yield fake


@contextlib.asynccontextmanager
async def running(tmp_path, fake, backend, *, config: Config | None = None, chance=lambda: 0.5, **discord_config):
    """A core on SQLite in tmp_path and the adapter connected to the fake; yields (core, store, adapter)."""
    config = config or Config(chat=QUICK, limits=LimitsConfig(user_per_minute=0, chat_per_minute=0))
    settings = dict(enabled=True, typing_interval_s=0.2, queue_notice_s=30.0, connect_timeout_s=5.0) | discord_config
    async with (
        Store.open(tmp_path / "bot.db") as store,
        backend,
        Core(backend, store, config) as core,
        DiscordAdapter(
            Chats(core, store, core.config), DiscordConfig(**settings), fake.token, chance=chance
        ) as adapter,
    ):
        yield core, store, adapter


def replies_to(fake: FakeDiscord, message: dict) -> list[dict]:
    """The bot's messages that answer `message` (Discord replies to it)."""
    return [m for m in fake.bot_messages() if m.get("message_reference", {}).get("message_id") == message["id"]]


async def answered(fake: FakeDiscord, message: dict, count: int = 1) -> list[dict]:
    await fake.wait_for(lambda: len(replies_to(fake, message)) >= count)
    return replies_to(fake, message)


async def interaction_messages(fake: FakeDiscord, interaction: dict, count: int = 1) -> list[dict]:
    """The messages answering a slash command, once `count` of them are filled in (not "thinking…")."""

    def filled():
        return [m for m in fake.bot_messages() if m.get("interaction_token") == interaction["token"] and m["content"]]

    await fake.wait_for(lambda: len(filled()) >= count)
    return filled()


async def test_a_mention_is_answered_by_the_model_as_a_reply_and_recorded(tmp_path, fake, tiny_lm):
    async with running(tmp_path, fake, LocalBackend(tiny_lm, max_batch_size=4)) as (core, store, _):
        assert {c["name"] for c in fake.commands} == COMMANDS  # slash commands synced at start
        assert fake.identifies[0]["intents"] & discord.Intents(message_content=True).value
        message = await fake.send_message("Once upon a time", mention_bot=True)
        (reply,) = await answered(fake, message)
        ((request_id, message_id),) = await delivered(tmp_path, 1)
        row = await store.request(request_id)
    assert message_id == reply["id"]
    assert row["status"] == "done" and row["text"] == "Once upon a time" and row["chat_id"] == str(CHANNEL_ID)
    # sent without leading whitespace
    assert reply["content"].strip() and reply["content"] == defuse_mentions(row["reply"].lstrip())
    assert reply["sent_payload"]["allowed_mentions"] == NO_PINGS
    typing = fake.requests_to("POST", rf"/channels/{CHANNEL_ID}/typing")
    assert typing and typing[0].at_s <= fake.requests_to("POST", SEND)[0].at_s


async def test_what_triggers_a_reply(tmp_path, fake):
    backend = ScriptedBackend(lambda prompt: "ok")
    async with running(tmp_path, fake, backend) as (core, store, _):
        await fake.wait_connected()
        ignored = [
            await fake.send_message("just chatting"),
            await fake.send_message("hey bot", author=OTHER_BOT, mention_bot=True),  # no bot-to-bot loops
            await fake.send_message("!generate is not the prefix"),
        ]
        (first,) = await answered(fake, await fake.send_message("mention", mention_bot=True))
        triggers = [
            await fake.send_message("a reply to the bot", author=BOB, reply_to=first),
            await fake.send_message("!gen prefixed"),
            await fake.send_message("in private", channel_id=DM_CHANNEL_ID),
        ]
        for message in triggers:
            await answered(fake, message)
        texts = [row["text"] for row in reversed(await core.recent())]
        assert texts == ["mention", "a reply to the bot", "prefixed", "in private"]
        assert all(not replies_to(fake, m) for m in ignored)
        assert len(fake.bot_messages()) == 4  # the bot's own messages (echoed by the gateway) trigger nothing


async def test_channels_and_servers_outside_the_allowlists_are_ignored(tmp_path, fake):
    backend = ScriptedBackend()
    async with running(tmp_path, fake, backend, allowed_channels=(str(CHANNEL_ID),)):
        await fake.wait_connected()
        elsewhere = await fake.send_message("hello", mention_bot=True, channel_id=OTHER_CHANNEL_ID)
        await answered(fake, await fake.send_message("hello", mention_bot=True))
        assert not replies_to(fake, elsewhere) and len(backend.prompts) == 1
    async with running(tmp_path, fake, backend, allowed_guilds=("123",)):
        await fake.wait_connected(num_sessions=2)
        other_server = await fake.send_message("hello", mention_bot=True)
        await answered(fake, await fake.send_message("dm", channel_id=DM_CHANNEL_ID))  # DMs are not in a server
        interaction = await fake.use_command("gen", {"prefix": "hello"})
        (refusal,) = await interaction_messages(fake, interaction)
        assert "not enabled" in refusal["content"]
        assert not replies_to(fake, other_server) and len(backend.prompts) == 2
    async with running(tmp_path, fake, backend, allow_dms=False):
        await fake.wait_connected(num_sessions=3)
        dm = await fake.send_message("dm", channel_id=DM_CHANNEL_ID)
        await answered(fake, await fake.send_message("hello", mention_bot=True))
        assert not replies_to(fake, dm) and len(backend.prompts) == 3


async def test_long_replies_are_split_at_2000_capped_and_never_ping(tmp_path, fake):
    text = "@everyone <@&42> <@123> " + "word " * 1000 + "@here"
    async with running(tmp_path, fake, ScriptedBackend(lambda prompt: text), max_reply_parts=2) as (_, _, adapter):
        message = await fake.send_message("go", mention_bot=True)
        parts = await answered(fake, message, count=2)
        await adapter.conversation.idle()  # had it sent a 3rd part, it would be sent now
        assert len(replies_to(fake, message)) == 2
    contents = [p["content"] for p in parts]
    assert all(len(c) <= 2000 for c in contents) and contents[-1].endswith("word…")
    assert contents[0].startswith("@\u200beveryone <@\u200b&42> <@\u200b123> word")
    assert all(p["sent_payload"]["allowed_mentions"] == NO_PINGS for p in parts)
    assert len(await delivered(tmp_path, 2)) == 2


async def test_typing_is_kept_on_until_the_reply_is_sent(tmp_path, fake):
    backend = ScriptedBackend()
    backend.gate.clear()
    async with running(tmp_path, fake, backend, typing_interval_s=0.05):
        message = await fake.send_message("go", mention_bot=True)
        await fake.wait_for(lambda: len(fake.requests_to("POST", r"/channels/\d+/typing")) >= 4)
        backend.gate.set()
        await answered(fake, message)
        backend.gate.clear()
        # a sentinel: its typing shows the bot's clock running
        await fake.send_message("and you?", channel_id=DM_CHANNEL_ID)
        # 2 intervals on
        await fake.wait_for(lambda: len(fake.requests_to("POST", rf"/channels/{DM_CHANNEL_ID}/typing")) >= 3)
        backend.gate.set()
    (sent,) = fake.requests_to("POST", rf"/channels/{CHANNEL_ID}/messages")
    typing = fake.requests_to("POST", rf"/channels/{CHANNEL_ID}/typing")
    assert typing[-1].at_s < sent.at_s  # it stops once the reply is out


async def test_queue_position_notice_becomes_the_reply_and_a_full_queue_is_busy(tmp_path, fake):
    backend = ScriptedBackend(max_batch_size=1)
    backend.gate.clear()
    config = Config(
        chat=QUICK, batch=BatchConfig(max_queue=1), limits=LimitsConfig(user_per_minute=0, chat_per_minute=0)
    )
    async with running(tmp_path, fake, backend, config=config, queue_notice_s=0.05):
        first = await fake.send_message("first", mention_bot=True)
        await fake.wait_for(lambda: backend.prompts)
        second = await fake.send_message("second", mention_bot=True)
        (notice,) = await answered(fake, second)
        third = await fake.send_message("third", author=BOB, mention_bot=True)
        (busy,) = await answered(fake, third)
        assert "number 1 in line" in notice["content"] and "busy" in busy["content"]
        backend.gate.set()
        await answered(fake, first)
        await fake.wait_for(lambda: replies_to(fake, second)[0]["content"] == "a scripted reply")
        assert len(replies_to(fake, second)) == 1  # the notice was edited into the reply
        (edit,) = fake.requests_to("PATCH", rf"{SEND}/\d+")
        assert edit.json["allowed_mentions"] == NO_PINGS
        assert len(await delivered(tmp_path, 2)) == 2


async def test_an_empty_generation_is_retried_once_then_explained(tmp_path, fake):
    replies = iter(["", "second try", "", ""])
    backend = ScriptedBackend(lambda prompt: next(replies))
    async with running(tmp_path, fake, backend):
        (good,) = await answered(fake, await fake.send_message("one", mention_bot=True))
        (empty,) = await answered(fake, await fake.send_message("two", mention_bot=True))
    assert good["content"] == "second try" and empty["content"] == EMPTY_REPLY
    assert len(backend.prompts) == 4


async def test_core_refusals_are_answered_with_their_sentence(tmp_path, fake):
    config = Config(chat=QUICK, limits=LimitsConfig(user_per_minute=1, chat_per_minute=0))
    async with running(tmp_path, fake, ScriptedBackend(), config=config):
        await answered(fake, await fake.send_message("one", mention_bot=True))
        (limited,) = await answered(fake, await fake.send_message("two", mention_bot=True))
        (empty,) = await answered(fake, await fake.send_message("!gen", author=BOB))
    assert "too fast" in limited["content"] and "Write the start of a text" in empty["content"]
    assert all(m["sent_payload"]["allowed_mentions"] == NO_PINGS for m in (limited, empty))


async def test_slash_gen_thinks_then_answers_in_parts(tmp_path, fake):
    text = "line\n" * 700
    async with running(tmp_path, fake, ScriptedBackend(lambda prompt: text)) as (core, store, _):
        interaction = await fake.use_command("gen", {"prefix": "hello"})
        parts = await interaction_messages(fake, interaction, count=2)
        ((request_id, _), _) = await delivered(tmp_path, 2)
        assert (await store.request(request_id))["text"] == "hello"
    (callback,) = fake.requests_to("POST", rf"/interactions/{interaction['id']}/[\w-]+/callback")
    assert callback.json["type"] == 5  # deferred: "botkit is thinking…"
    assert "".join(p["content"] for p in parts) == text.strip() or "".join(p["content"] for p in parts) == text
    assert all(p["sent_payload"]["allowed_mentions"] == NO_PINGS for p in parts)
    assert [row[1] for row in deliveries(tmp_path)] == [p["id"] for p in parts]


async def test_settings_show_change_by_managers_only_and_persist_across_restart(tmp_path, fake):
    async def command(name, options=None, **kwargs) -> str:
        interaction = await fake.use_command(name, options, **kwargs)
        return (await interaction_messages(fake, interaction))[0]["content"]

    async with running(tmp_path, fake, ScriptedBackend(), admin_user_ids=(BOB["id"],)) as (core, store, _):
        refused = await command("settings", {"key": "temperature", "value": "0.5"})
        manager = await command("settings", {"key": "temperature", "value": "0.5"}, permissions=MANAGE_GUILD)
        admin = await command("settings", {"key": "trigger", "value": "always"}, author=BOB)
        invalid = await command("settings", {"key": "top_p", "value": "7"}, permissions=MANAGE_GUILD)
    assert "Manage Server" in refused and manager == "temperature is now 0.5." and admin == "trigger is now 'always'."
    assert "top_p" in invalid
    async with running(tmp_path, fake, ScriptedBackend()) as (core, store, _):
        shown = await command("settings")
        assert (await Chats(core, store, core.config).settings("discord", str(CHANNEL_ID))).temperature == 0.5
    assert "temperature = 0.5" in shown and "trigger = 'always'" in shown and "top_p = 0.95" in shown


async def test_reset_stats_and_help(tmp_path, fake):
    async with running(tmp_path, fake, ScriptedBackend()) as (core, store, _):
        await answered(fake, await fake.send_message("remember me", mention_bot=True))
        assert await store.context("discord", str(CHANNEL_ID), 10) == [("remember me", "a scripted reply")]
        for name, expected in [("reset", "I forgot"), ("stats", "1 done"), ("help", "/gen")]:
            interaction = await fake.use_command(name)
            (answer,) = await interaction_messages(fake, interaction)
            assert expected in answer["content"]
        assert await store.context("discord", str(CHANNEL_ID), 10) == []


@pytest.mark.parametrize("status", [429, 502])
async def test_a_refused_send_is_retried_and_the_reply_appears_once(tmp_path, fake, status):
    fake.fail_next("POST", SEND, status, retry_after_s=0.3)
    async with running(tmp_path, fake, ScriptedBackend()) as (_, _, adapter):
        message = await fake.send_message("go", mention_bot=True)
        await answered(fake, message)
        await adapter.conversation.idle()
        assert len(replies_to(fake, message)) == 1 and len(await delivered(tmp_path, 1)) == 1
    refused, accepted = fake.requests_to("POST", SEND)
    assert accepted.at_s - refused.at_s >= 0.3  # discord.py waited out retry_after (1 s for a 5xx)


@pytest.mark.parametrize("status", [500, 502])
async def test_a_reply_posted_whose_answer_was_lost_appears_once(tmp_path, fake, status):
    fake.fail_next("POST", SEND, status, after_effect=True)  # discord.py retries a 5xx itself, with the same nonce
    async with running(tmp_path, fake, ScriptedBackend()):
        message = await fake.send_message("go", mention_bot=True)
        await answered(fake, message)
        assert len(await delivered(tmp_path, 1)) == 1
        assert len(fake.requests_to("POST", SEND)) == 2 and len(replies_to(fake, message)) == 1


async def test_a_dropped_gateway_connection_resumes_and_the_bot_keeps_answering(tmp_path, fake):
    async with running(tmp_path, fake, ScriptedBackend()):
        await answered(fake, await fake.send_message("before", mention_bot=True))
        await fake.drop_connection()
        while_away = await fake.send_message("while away", mention_bot=True)  # replayed on RESUME
        await fake.wait_for(lambda: fake.num_resumed == 1)
        after = await fake.send_message("after", mention_bot=True)
        await fake.dispatch("MESSAGE_CREATE", after)  # Discord may deliver an event twice around a resume
        for message in (while_away, after):
            assert len(await answered(fake, message)) == 1
        await answered(fake, await fake.send_message("last", mention_bot=True))
        assert len(replies_to(fake, after)) == 1
    assert fake.gateway_paths == ["/gateway", "/resume"] and len(fake.identifies) == 1


async def test_bad_token_and_missing_intent_are_config_errors(tmp_path, fake):
    async with Store.open(tmp_path / "bot.db") as store, Core(ScriptedBackend(), store) as core:
        with pytest.raises(ConfigError, match="DISCORD_TOKEN"):
            await DiscordAdapter(Chats(core, store, core.config), DiscordConfig(), "wrong-token").start()
        fake.privileged_intents = False
        with pytest.raises(ConfigError, match="Message Content"):
            async with DiscordAdapter(
                Chats(core, store, core.config), DiscordConfig(connect_timeout_s=5.0), fake.token
            ):
                pass
