"""Every adapter driven the same way, so that one behaviour is tested once against all of them: the
real discord.py and python-telegram-bot clients against tests/fake_discord.py and fake_telegram.py,
the console through its line handler; the real core and store (SQLite in tmp_path) behind each.

    async with platform("telegram", tmp_path, monkeypatch, backend, config) as bot:
        message = await bot.send("group", "mention", "hello")
        await until(lambda: bot.answers(message))
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import warnings

import yarl
from fake_discord import (
    ALICE,
    BOB,
    BOT,
    CHANNEL_ID,
    DM_CHANNEL_ID,
    MANAGE_GUILD,
    MEMBER_PERMISSIONS,
    OTHER_BOT,
    FakeDiscord,
)
from fake_telegram import FakeTelegram

from botkit.chat.chats import Chats
from botkit.config import Config, DiscordConfig, TelegramConfig
from botkit.serve.core import Core
from botkit.serve.store import Store

with warnings.catch_warnings():  # discord.py imports audioop, deprecated since Python 3.11 (voice only)
    warnings.filterwarnings("ignore", "'audioop' is deprecated", DeprecationWarning)
    import discord
from botkit.adapters.console_adapter import ConsoleAdapter
from botkit.adapters.discord_adapter import DiscordAdapter
from botkit.adapters.telegram_adapter import TelegramAdapter

GROUP, PRIVATE = "group", "private"
PLATFORMS = ("discord", "telegram", "console")
# What a user can do: plain text, @mention the bot, reply to one of its messages, the text prefix
# (!gen), the platform's command (/gen), mention it with nothing else, or be another bot mentioning it.
KINDS = ("plain", "mention", "reply", "prefix", "command", "empty mention", "bot")
USERS = {"alice": ALICE, "bob": BOB}


async def until(predicate, timeout_s: float = 10.0) -> None:
    for _ in range(int(timeout_s / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"not true within {timeout_s} s: {predicate}")


class DiscordDriver:
    chats = (GROUP, PRIVATE)
    kinds = KINDS

    def __init__(self, fake: FakeDiscord):
        self.fake = fake

    def chat_id(self, chat: str) -> int:
        return CHANNEL_ID if chat == GROUP else DM_CHANNEL_ID

    async def send(self, chat: str, kind: str, text: str, *, user: str = "alice") -> dict:
        channel_id = CHANNEL_ID if chat == GROUP else DM_CHANNEL_ID
        if kind == "command":
            return await self.fake.use_command("gen", {"prefix": text}, channel_id=channel_id)
        reply_to = (
            await self.fake.send_message("earlier", author=BOT, channel_id=channel_id) if kind == "reply" else None
        )
        return await self.fake.send_message(
            "" if kind == "empty mention" else f"!gen {text}" if kind == "prefix" else text,
            channel_id=channel_id,
            author=OTHER_BOT if kind == "bot" else USERS[user],
            mention_bot=kind in ("mention", "empty mention", "bot"),
            reply_to=reply_to,
        )

    async def command(self, chat: str, name: str, args: str = "", *, user: str = "alice", admin: bool = False) -> dict:
        """A slash command; `args` go to its first option (for /settings: "key value")."""
        channel_id = CHANNEL_ID if chat == GROUP else DM_CHANNEL_ID
        options = {"settings": ["key", "value"], "forget": ["scope"], "gen": ["prefix"]}.get(name, [])
        values = args.split(maxsplit=len(options) - 1) if options and args else []
        return await self.fake.use_command(
            name,
            dict(zip(options, values, strict=False)),
            author=USERS[user],
            channel_id=channel_id,
            permissions=MANAGE_GUILD if admin else MEMBER_PERMISSIONS,
        )

    def updates(self) -> list[str]:
        """Every text the bot put on screen, in order: messages sent and edits."""
        return [
            r.json["content"]
            for r in self.fake.requests
            if r.method in ("POST", "PATCH")
            and "/messages" in r.path
            and isinstance(r.json, dict)
            and "content" in r.json
        ]

    def showing(self, sent: dict) -> list[str]:
        """What the bot shows in answer to `sent` now."""
        return self.answers(sent)

    def answers(self, sent: dict) -> list[str]:
        if "token" in sent:  # a slash command: its response and followups
            return [
                m["content"]
                for m in self.fake.bot_messages()
                if m.get("interaction_token") == sent["token"] and m["content"]
            ]
        return [
            m["content"]
            for m in self.fake.bot_messages()
            if m.get("message_reference", {}).get("message_id") == sent["id"]
        ]


class TelegramDriver:
    chats = (GROUP, PRIVATE)
    kinds = KINDS
    chat_ids = {GROUP: -100, PRIVATE: 42}

    def __init__(self, fake: FakeTelegram):
        self.fake = fake

    def chat_id(self, chat: str) -> int:
        return self.chat_ids[chat]

    user_ids = {"alice": 42, "bob": 7}

    async def send(self, chat: str, kind: str, text: str, *, user: str = "alice") -> dict:
        chat_id, bot = self.chat_ids[chat], f"@{self.fake.bot['username']}"
        if kind == "bot":
            return self.fake.push_message(chat_id, f"{bot} {text}", user_id=9, is_bot=True, username="otherbot")
        reply_to = None
        if kind == "reply":
            reply_to = self.fake.push_message(
                chat_id, "earlier", user_id=self.fake.bot["id"], is_bot=True, username=self.fake.bot["username"]
            )
        written = {
            "mention": f"{bot} {text}",
            "empty mention": bot,
            "prefix": f"!gen {text}",
            "command": f"/gen {text}",
        }
        return self.fake.push_message(
            chat_id,
            written.get(kind, text),
            reply_to=reply_to,
            user_id=self.user_ids[user],
            username=user,
            first_name=user.title(),
        )

    async def command(self, chat: str, name: str, args: str = "", *, user: str = "alice", admin: bool = False) -> dict:
        if admin:
            self.fake.set_admin(self.chat_ids[chat], self.user_ids[user])
        return self.fake.push_message(
            self.chat_ids[chat],
            f"/{name} {args}".strip(),
            user_id=self.user_ids[user],
            username=user,
            first_name=user.title(),
        )

    def updates(self) -> list[str]:
        """Every text the bot put on screen, in order: messages sent, edits and drafts."""
        return [
            c.params.get("text", "")
            for c in self.fake.calls
            if c.outcome == "ok" and c.method.lower() in ("sendmessage", "editmessagetext", "sendmessagedraft")
        ]

    def showing(self, sent: dict) -> list[str]:
        """What the bot shows in answer to `sent` now: its messages, else (a private chat) its draft."""
        drafts = self.fake.drafts[sent["chat"]["id"]]
        return self.answers(sent) or [drafts[-1][1]] if drafts else self.answers(sent)

    def answers(self, sent: dict) -> list[str]:
        return [
            m["text"]
            for m in self.fake.sent(sent["chat"]["id"])
            if m.get("reply_to_message", {}).get("message_id") == sent["message_id"]
        ]


class ConsoleDriver:
    """One private chat; a line's answers are what the adapter printed while it handled that line."""

    chats = (PRIVATE,)
    kinds = ("plain", "prefix", "command")

    def __init__(self, console: ConsoleAdapter, out: io.StringIO):
        self.console, self.out = console, out

    async def send(self, chat: str, kind: str, text: str) -> list[str]:
        start = len(self.out.getvalue())
        await self.console.handle_line({"prefix": f"!gen {text}", "command": f"/gen {text}"}.get(kind, text))
        return [
            line.removeprefix("bot> ") for line in self.out.getvalue()[start:].splitlines() if line.startswith("bot> ")
        ]

    async def command(
        self, chat: str, name: str, args: str = "", *, user: str = "alice", admin: bool = False
    ) -> list[str]:
        return await self.send(chat, "plain", f"/{name} {args}".strip())

    def answers(self, sent: list[str]) -> list[str]:
        return sent


@contextlib.asynccontextmanager
async def fake_server(name: str, monkeypatch):
    """The platform's fake server (for the console: its terminal output), to outlive several bot runs."""
    if name == "discord":
        async with FakeDiscord() as fake:
            monkeypatch.setattr(discord.http.Route, "BASE", fake.api_url)
            monkeypatch.setattr(discord.gateway.DiscordWebSocket, "DEFAULT_GATEWAY", yarl.URL(fake.gateway_url))
            yield fake
    elif name == "telegram":
        monkeypatch.setenv("PTB_TIMEDELTA", "1")  # PTB >= 22.2 warns about int retry_after unless opted in
        async with FakeTelegram() as fake:
            yield fake
    else:
        yield io.StringIO()


@contextlib.asynccontextmanager
async def platform(
    name: str, tmp_path, monkeypatch, backend, config: Config, *, fake=None, chance=lambda: 0.5, **adapter_config
):
    """The core on SQLite in tmp_path with platform `name`'s adapter connected to `fake` (a new one by
    default); yields its driver, whose `core` and `store` are the bot's."""
    async with contextlib.AsyncExitStack() as stack:
        fake = fake or await stack.enter_async_context(fake_server(name, monkeypatch))
        store = await stack.enter_async_context(Store.open(tmp_path / "bot.db"))
        await stack.enter_async_context(backend)
        core = await stack.enter_async_context(Core(backend, store, config))
        if name == "discord":
            settings = (
                dict(enabled=True, typing_interval_s=0.2, queue_notice_s=30.0, connect_timeout_s=5.0) | adapter_config
            )
            sessions = len(fake.identifies)
            adapter = await stack.enter_async_context(
                DiscordAdapter(Chats(core, store, core.config), DiscordConfig(**settings), fake.token, chance=chance)
            )
            await fake.wait_connected(num_sessions=sessions + 1)
            driver = DiscordDriver(fake)
        elif name == "telegram":
            settings = (
                dict(
                    enabled=True,
                    base_url=fake.url,
                    chat_send_interval_s=0.0,
                    typing_interval_s=0.2,
                    queue_notice_s=30.0,
                    request_timeout_s=2.0,
                )
                | adapter_config
            )
            adapter = await stack.enter_async_context(
                TelegramAdapter(Chats(core, store, core.config), TelegramConfig(**settings), fake.token, chance=chance)
            )
            driver = TelegramDriver(fake)
        else:
            adapter = await stack.enter_async_context(
                ConsoleAdapter(Chats(core, store, core.config), config.console, stdin=io.StringIO(""), stdout=fake)
            )
            adapter.conversation.chance = chance
            driver = ConsoleDriver(adapter, fake)
        driver.core, driver.store, driver.adapter = core, store, adapter
        yield driver
