"""The Telegram adapter end to end: the real python-telegram-bot client against tests/fake_telegram.py,
the real core and store (SQLite in tmp_path), and either the tiny random GPT-2 or a scripted backend
whose replies are a plain function of the prompt."""

from __future__ import annotations

import contextlib

import aiohttp
import pytest
from botkit.adapters.telegram_adapter import TelegramAdapter
from fake_telegram import FakeTelegram
from platforms import until
from scripted import ScriptedBackend, delivered, deliveries

from botkit.chat.chats import Chats
from botkit.chat.conversation import EMPTY_REPLY
from botkit.config import Config, LimitsConfig, TelegramConfig
from botkit.errors import ConfigError
from botkit.params import ChatSettings
from botkit.serve.backends import LocalBackend
from botkit.serve.core import Core
from botkit.serve.store import Store

GROUP = -100  # a supergroup
ALICE = 42  # a user; her private chat with the bot has the same id
BOB = 7
BOT = "@botkit_bot"
QUICK = ChatSettings(truncate="", length=8)  # the tiny model's replies: short and never cut to nothing


@pytest.fixture(autouse=True)
def _timedelta_retry_after(monkeypatch):
    monkeypatch.setenv("PTB_TIMEDELTA", "1")  # PTB >= 22.2 warns about int retry_after unless opted in


@pytest.fixture
async def fake():
    async with FakeTelegram() as fake:
        yield fake


@contextlib.asynccontextmanager
async def running(tmp_path, fake, backend, *, config: Config | None = None, chance=lambda: 0.5, **telegram):
    """A core on SQLite in tmp_path and the adapter polling the fake; yields (core, store, adapter)."""
    config = config or Config(chat=QUICK)
    settings = (
        dict(
            enabled=True,
            base_url=fake.url,
            chat_send_interval_s=0.0,
            typing_interval_s=0.2,
            queue_notice_s=30.0,
            request_timeout_s=2.0,
        )
        | telegram
    )
    async with (
        Store.open(tmp_path / "bot.db") as store,
        backend,
        Core(backend, store, config) as core,
        TelegramAdapter(
            Chats(core, store, core.config), TelegramConfig(**settings), fake.token, chance=chance
        ) as adapter,
    ):
        yield core, store, adapter


def reply_to(message: dict):
    """A predicate for fake.wait_for: a sendMessage answering `message`."""
    return lambda params: (
        params.get("chat_id") == message["chat"]["id"]
        and params.get("reply_parameters", {}).get("message_id") == message["message_id"]
    )


async def test_private_message_is_answered_by_the_model_as_a_plain_reply_and_recorded(tmp_path, fake, tiny_lm):
    async with running(tmp_path, fake, LocalBackend(tiny_lm, max_batch_size=4)) as (core, store, _):
        question = fake.push_message(ALICE, "Once upon a time")
        [call] = await fake.wait_for("sendMessage", where=reply_to(question))
        [request] = await store.recent(limit=5)
        assert request["status"] == "done" and request["text"] == "Once upon a time"
        # only "@" defused, leading space dropped
        assert call.params["text"].replace("\u200b", "") == request["reply"].lstrip()
        assert "parse_mode" not in call.params and "entities" not in call.params  # plain text
        assert call.params["link_preview_options"] == {"is_disabled": True}
        [sent] = fake.sent(ALICE)
        assert await delivered(tmp_path, 1) == [(request["id"], str(sent["message_id"]))]
        assert fake.calls_of("sendChatAction")[0].params == {"chat_id": ALICE, "action": "typing"}
        assert [c["command"] for c in fake.commands] == [
            "gen",
            "settings",
            "reset",
            "stats",
            "help",
            "privacy",
            "forget",
        ]


@pytest.mark.parametrize(
    "text, answered",
    [
        (f"{BOT} tell me a story", True),
        ("/gen tell me a story", True),
        (f"/gen{BOT} tell me a story", True),
        ("!gen tell me a story", True),
        ("tell me a story", False),
        ("!generate tell me a story", False),
        ("/gen@another_bot tell me a story", False),
        ("@another_bot tell me a story", False),
    ],
)
async def test_group_triggers(tmp_path, fake, text, answered):
    backend = ScriptedBackend()
    async with running(tmp_path, fake, backend) as (_, _, adapter):
        message = fake.push_message(GROUP, text)
        sentinel = fake.push_message(GROUP, f"{BOT} sentinel", user_id=7)
        await fake.wait_for("sendMessage", where=reply_to(sentinel))
        await adapter.conversation.idle()  # the first message's handler began first; now it has ended too
        assert bool([c for c in fake.calls_of("sendMessage") if reply_to(message)(c.params)]) is answered
        if answered:
            assert backend.prompts[0] == "tell me a story\n"  # trigger words stripped, the template applied


async def test_a_reply_to_the_bot_triggers_but_a_reply_to_someone_else_does_not(tmp_path, fake):
    async with running(tmp_path, fake, ScriptedBackend()) as (_, _, adapter):
        first = fake.push_message(GROUP, "/gen hello")
        [call] = await fake.wait_for("sendMessage", where=reply_to(first))
        bots_message = fake.messages[GROUP][max(fake.messages[GROUP])]
        to_someone = fake.push_message(GROUP, "I agree", reply_to=first, user_id=7)
        to_bot = fake.push_message(GROUP, "go on", reply_to=bots_message)
        await fake.wait_for("sendMessage", where=reply_to(to_bot))
        await adapter.conversation.idle()
        assert not [c for c in fake.calls_of("sendMessage") if reply_to(to_someone)(c.params)]


async def test_other_bots_and_chats_outside_the_allowlist_are_ignored(tmp_path, fake):
    async with running(tmp_path, fake, ScriptedBackend(), allowed_chats=(str(GROUP),)) as (_, _, adapter):
        from_bot = fake.push_message(GROUP, f"{BOT} hi", user_id=9, is_bot=True)
        elsewhere = fake.push_message(-200, f"{BOT} hi")
        allowed = fake.push_message(GROUP, f"{BOT} hi")
        await fake.wait_for("sendMessage", where=reply_to(allowed))
        await adapter.conversation.idle()
        answered = [c.params["reply_parameters"]["message_id"] for c in fake.calls_of("sendMessage")]
        assert answered == [allowed["message_id"]]
        assert from_bot["message_id"] not in answered and elsewhere["chat"]["id"] != GROUP


async def test_long_replies_are_split_at_4096_capped_and_defused(tmp_path, fake):
    line = "word " * 199 + "@alice\n"  # 1002 characters
    async with running(tmp_path, fake, ScriptedBackend(lambda prompt: line * 20), max_reply_parts=3) as (_, _, adapter):
        message = fake.push_message(ALICE, "go")
        calls = await fake.wait_for("sendMessage", 3, where=reply_to(message))
        await adapter.conversation.idle()  # had it sent a 4th part, it would be sent now
        texts = [c.params["text"] for c in fake.calls_of("sendMessage")]
        assert len(texts) == 3 and all(len(t) <= 4096 for t in texts) and len(texts[0]) > 3000
        assert texts[-1].endswith("…") and "@alice" not in "".join(texts) and "@\u200balice" in texts[0]
        assert len(await delivered(tmp_path, 3)) == 3 and len(calls) == 3


async def test_typing_is_repeated_while_the_reply_is_generated(tmp_path, fake):
    backend = ScriptedBackend()
    backend.gate.clear()
    async with running(tmp_path, fake, backend, typing_interval_s=0.1):
        message = fake.push_message(ALICE, "hi")
        await fake.wait_for("sendChatAction", 3)
        assert fake.calls_of("sendMessage") == []
        backend.gate.set()
        await fake.wait_for("sendMessage", where=reply_to(message))
        typing_alice = lambda: [c for c in fake.calls_of("sendChatAction") if c.params["chat_id"] == ALICE]  # noqa: E731
        num_typing = len(typing_alice())
        backend.gate.clear()
        fake.push_message(BOB, "and you?", user_id=BOB)  # a sentinel: its typing shows the bot's clock running
        await fake.wait_for("sendChatAction", 3, where=lambda p: p["chat_id"] == BOB)  # two intervals later
        assert len(typing_alice()) == num_typing  # typing stopped once the reply was sent
        backend.gate.set()


async def test_queue_position_notice_becomes_the_reply(tmp_path, fake):
    backend = ScriptedBackend(max_batch_size=1)
    backend.gate.clear()
    async with running(tmp_path, fake, backend, queue_notice_s=0.2, typing_interval_s=0.1):
        first = fake.push_message(GROUP, "/gen one", user_id=1)
        await until(lambda: backend.prompts)  # the first is generating
        second = fake.push_message(GROUP, "/gen two", user_id=2)
        [notice] = await fake.wait_for("sendMessage", where=reply_to(second))
        assert "number 1 in line" in notice.params["text"]
        backend.gate.set()
        await fake.wait_for("sendMessage", where=reply_to(first))
        await fake.wait_for("editMessageText", where=lambda p: p["text"] == "a scripted reply")
        [notice_message] = [
            m for m in fake.sent(GROUP) if m.get("reply_to_message", {}).get("message_id") == second["message_id"]
        ]
        assert notice_message["text"] == "a scripted reply"  # one message: the notice turned into the reply


async def test_empty_generation_is_retried_once_then_explained(tmp_path, fake):
    replies = iter(["", "second try"])
    backend = ScriptedBackend(lambda prompt: next(replies, ""))
    async with running(tmp_path, fake, backend):
        message = fake.push_message(ALICE, "hi")
        [call] = await fake.wait_for("sendMessage", where=reply_to(message))
        assert call.params["text"] == "second try" and len(backend.prompts) == 2
        message = fake.push_message(ALICE, "again")
        [call] = await fake.wait_for("sendMessage", where=reply_to(message))
        assert call.params["text"] == EMPTY_REPLY and len(backend.prompts) == 4


async def test_core_refusals_are_answered_with_their_sentence(tmp_path, fake):
    config = Config(chat=QUICK, limits=LimitsConfig(user_per_minute=1, max_message_chars=50))
    async with running(tmp_path, fake, ScriptedBackend(), config=config):
        too_long = fake.push_message(ALICE, "x" * 60)
        [call] = await fake.wait_for("sendMessage", where=reply_to(too_long))
        assert "50" in call.params["text"]
        first = fake.push_message(GROUP, "/gen hi", user_id=7)
        await fake.wait_for("sendMessage", where=reply_to(first))
        second = fake.push_message(GROUP, "/gen hi again", user_id=7)
        [call] = await fake.wait_for("sendMessage", where=reply_to(second))
        assert call.params["text"] != "a scripted reply" and call.params["text"].endswith(".")


async def test_settings_show_change_by_admins_only_and_persist_across_restart(tmp_path, fake):
    async with running(tmp_path, fake, ScriptedBackend()):
        shown = fake.push_message(GROUP, "/settings")
        [call] = await fake.wait_for("sendMessage", where=reply_to(shown))
        assert "temperature = 0.8" in call.params["text"]
        refused = fake.push_message(GROUP, "/settings temperature 0.3", user_id=7)
        [call] = await fake.wait_for("sendMessage", where=reply_to(refused))
        assert "admins" in call.params["text"]
        fake.set_admin(GROUP, 7)
        changed = fake.push_message(GROUP, "/settings temperature 0.3", user_id=7)
        [call] = await fake.wait_for("sendMessage", where=reply_to(changed))
        assert call.params["text"] == "temperature is now 0.3."
        bad = fake.push_message(GROUP, "/settings temperature hot", user_id=7)
        [call] = await fake.wait_for("sendMessage", where=reply_to(bad))
        assert "temperature" in call.params["text"] and "hot" in call.params["text"]
        template = fake.push_message(GROUP, "/settings template Q: {message} A:", user_id=7)
        [call] = await fake.wait_for("sendMessage", where=reply_to(template))
        assert call.params["text"] == "template is now 'Q: {message} A:'."
    async with running(tmp_path, fake, ScriptedBackend(), admin_user_ids=("8",)) as (core, store, _):
        assert (await Chats(core, store, core.config).settings("telegram", str(GROUP))).temperature == 0.3
        by_configured_admin = fake.push_message(GROUP, "/settings trigger always", user_id=8)
        [call] = await fake.wait_for("sendMessage", where=reply_to(by_configured_admin))
        assert (await Chats(core, store, core.config).settings("telegram", str(GROUP))).trigger == "always"


async def test_reset_forgets_the_chats_context(tmp_path, fake):
    backend = ScriptedBackend()
    async with running(tmp_path, fake, backend):
        for text in ("alpha", "beta"):
            message = fake.push_message(ALICE, text)
            await fake.wait_for("sendMessage", where=reply_to(message))
        assert "alpha" in backend.prompts[-1]
        reset = fake.push_message(ALICE, "/reset")
        [call] = await fake.wait_for("sendMessage", where=reply_to(reset))
        assert "I forgot" in call.params["text"]
        message = fake.push_message(ALICE, "gamma")
        await fake.wait_for("sendMessage", where=reply_to(message))
        assert "alpha" not in backend.prompts[-1] and "beta" not in backend.prompts[-1]


async def test_stats_and_help(tmp_path, fake):
    async with running(tmp_path, fake, ScriptedBackend()) as (core, store, _):
        stats = fake.push_message(GROUP, "/stats")
        [call] = await fake.wait_for("sendMessage", where=reply_to(stats))
        assert call.params["text"] == core.stats().summary()
        help_ = fake.push_message(GROUP, f"/help{BOT}")
        [call] = await fake.wait_for("sendMessage", where=reply_to(help_))
        # defused, like every text
        assert "@\u200bbotkit_bot" in call.params["text"] and "/settings" in call.params["text"]


async def test_a_429_is_retried_after_retry_after_and_the_reply_appears_once(tmp_path, fake):
    async with running(tmp_path, fake, ScriptedBackend()) as (_, _, adapter):
        fake.fail_next("sendMessage", 429, retry_after=1)
        message = fake.push_message(ALICE, "hi")
        [call] = await fake.wait_for("sendMessage", where=reply_to(message))
        [refused, accepted] = fake.calls_of("sendMessage", outcome=None)
        assert refused.outcome == "error 429" and accepted.at - refused.at >= 1.0
        assert [m["text"] for m in fake.sent(ALICE)] == ["a scripted reply"]
        assert len(await delivered(tmp_path, 1)) == 1
        await adapter.conversation.idle()
        assert len(deliveries(tmp_path)) == 1 and len(fake.calls_of("sendMessage")) == 1


def send_settled(tmp_path, caplog) -> bool:
    """The outbox is done with the first answer: its delivery is recorded, or its loss logged."""
    return bool(deliveries(tmp_path)) or any("could not send the answer" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("fault", [500, 502, "drop"])
async def test_a_reply_posted_whose_answer_was_lost_is_not_sent_again(tmp_path, fake, caplog, fault):
    async with running(tmp_path, fake, ScriptedBackend()):
        fake.fail_next("sendMessage", fault, after_effect=True)
        message = fake.push_message(ALICE, "hi")
        await until(lambda: send_settled(tmp_path, caplog))
        assert [m["text"] for m in fake.sent(ALICE)] == ["a scripted reply"]
        assert len(fake.calls_of("sendMessage", outcome=None)) == 1 and reply_to(message)(fake.calls[-1].params)


async def test_a_send_that_fails_is_given_up_and_the_bot_keeps_answering(tmp_path, fake, caplog):
    async with running(tmp_path, fake, ScriptedBackend(), max_send_retries=1) as (_, _, adapter):
        fake.fail_next("sendMessage", 500)  # Telegram may have posted it: resending could duplicate it
        lost = fake.push_message(ALICE, "hi")
        await until(lambda: send_settled(tmp_path, caplog))
        message = fake.push_message(ALICE, "hi again")
        await fake.wait_for("sendMessage", where=reply_to(message))
        await adapter.conversation.idle()
        assert not [c for c in fake.calls_of("sendMessage") if reply_to(lost)(c.params)]
        assert len(fake.calls_of("sendMessage", outcome=None)) == 2


async def test_polling_survives_a_dropped_connection(tmp_path, fake):
    async with running(tmp_path, fake, ScriptedBackend()):
        await fake.wait_for("getUpdates", outcome="pending")
        fake.fail_next("getUpdates", "drop")
        first = fake.push_message(ALICE, "one")  # answers the poll in flight; the next poll is dropped
        await fake.wait_for("sendMessage", where=reply_to(first))
        second = fake.push_message(ALICE, "two")
        await fake.wait_for("sendMessage", where=reply_to(second))
        assert [c.outcome for c in fake.calls_of("getUpdates", outcome=None)].count("dropped") == 1


async def test_sends_in_one_chat_are_paced(tmp_path, fake):
    async with running(tmp_path, fake, ScriptedBackend(), chat_send_interval_s=0.3):
        for _ in range(3):
            fake.push_message(ALICE, "/help")
        calls = await fake.wait_for("sendMessage", 3)
        gaps = [b.at - a.at for a, b in zip(calls, calls[1:], strict=False)]
        assert min(gaps) >= 0.28


async def test_webhook_mode(tmp_path, fake, monkeypatch, unused_tcp_port):
    monkeypatch.setenv("TEST_WEBHOOK_SECRET", "s3cret")
    async with running(
        tmp_path,
        fake,
        ScriptedBackend(),
        mode="webhook",
        webhook_listen="127.0.0.1",
        webhook_port=unused_tcp_port,
        webhook_url="https://bot.example/telegram",
        webhook_secret_env="TEST_WEBHOOK_SECRET",
    ):
        assert fake.webhook["url"] == "https://bot.example/telegram"
        assert fake.webhook["secret_token"] == "s3cret" and fake.calls_of("getUpdates", outcome=None) == []
        fake.webhook["url"] = f"http://127.0.0.1:{unused_tcp_port}/telegram"  # what the HTTPS proxy forwards to
        message = fake.push_message(ALICE, "hi")
        await fake.wait_for("sendMessage", where=reply_to(message))
        async with aiohttp.ClientSession() as session:  # a post without the secret is refused
            async with session.post(f"http://127.0.0.1:{unused_tcp_port}/telegram", json={"update_id": 99}) as response:
                assert response.status == 403


async def test_bad_token_and_bad_webhook_config_are_config_errors(tmp_path, fake):
    with pytest.raises(ConfigError, match="TELEGRAM_TOKEN"):
        async with Store.open(tmp_path / "bot.db") as store, Core(ScriptedBackend(), store, Config()) as core:
            async with TelegramAdapter(Chats(core, store, core.config), TelegramConfig(base_url=fake.url), "1:WRONG"):
                pass
    with pytest.raises(ConfigError, match="webhook_url"):
        TelegramAdapter(None, TelegramConfig(mode="webhook"), fake.token)
    # could forge an admin's /forget all
    with pytest.raises(ConfigError, match="webhook_secret_env: without it anyone who finds the URL"):
        TelegramAdapter(None, TelegramConfig(mode="webhook", webhook_url="https://bot.example/telegram"), fake.token)
