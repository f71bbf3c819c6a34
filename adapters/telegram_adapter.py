"""Telegram adapter: python-telegram-bot's messages in as `ChatEvent`s, the conversation layer's texts
out as plain-text replies (no parse_mode: model output cannot add markup; botkit/chat/conversation.py
holds the policy). The composition root owns the event loop, so never `run_polling()`:

    async with TelegramAdapter(chats, config.telegram, secret(config.telegram.token_env, "Telegram")):
        await stop_event.wait()
"""

from __future__ import annotations

import functools
import logging
import random
import re
from collections.abc import Callable
from urllib.parse import urlparse

from botkit.adapters.telegram_pacing import PacedRateLimiter
from botkit.adapters.telegram_replier import ChatReplier
from telegram import BotCommand, Message, MessageEntity, Update
from telegram.constants import ChatMemberStatus, ChatType, MessageLimit
from telegram.error import InvalidToken, NetworkError, TelegramError
from telegram.ext import Application, ApplicationBuilder, ContextTypes, MessageHandler, filters
from telegram.request import HTTPXRequest

from botkit.chat.chats import Chats
from botkit.chat.commands import COMMANDS
from botkit.chat.conversation import Conversation
from botkit.chat.events import ChatEvent, Platform
from botkit.config import TelegramConfig, secret
from botkit.errors import BotkitError, ConfigError

log = logging.getLogger(__name__)

PLATFORM = "telegram"


class TelegramAdapter:
    def __init__(
        self, chats: Chats, config: TelegramConfig, token: str, *, chance: Callable[[], float] = random.random
    ):
        if config.mode not in ("polling", "webhook"):
            raise ConfigError(f"telegram.mode must be 'polling' or 'webhook', not {config.mode!r}.")
        if config.mode == "webhook" and not config.webhook_url.startswith("https://"):
            raise ConfigError(
                "telegram.mode = 'webhook' needs telegram.webhook_url, the public https:// URL Telegram will post to."
            )
        if config.mode == "webhook" and not config.webhook_secret_env:
            raise ConfigError(
                "telegram.mode = 'webhook' needs telegram.webhook_secret_env: without it anyone who "
                "finds the URL can post "
                "updates that claim to come from an admin (/settings, /forget all); name an environment "
                "variable holding a random secret."
            )
        self._config, self._token = config, token
        platform = Platform(
            PLATFORM,
            MessageLimit.MAX_TEXT_LENGTH,
            config.max_reply_parts,
            config.command_prefix,
            usernames_ping=True,
            typing_interval_s=config.typing_interval_s,
            queue_notice_s=config.queue_notice_s,
            admin_user_ids=config.admin_user_ids,
            stream_interval_s=config.stream_interval_s,
            group_stream_interval_s=config.group_stream_interval_s,
        )
        self.conversation = Conversation(chats, platform, self._replier_for, chance=chance)
        self.application: Application | None = None
        self._requests: list[HTTPXRequest] = []

    async def __aenter__(self) -> TelegramAdapter:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def start(self) -> None:
        config, timeout_s = self._config, self._config.request_timeout_s
        await self.conversation.__aenter__()
        # Built here, not by the builder, so they can be closed even if initialize() fails (a bad token).
        polls = _WatchedRequest(
            self.conversation, connect_timeout=timeout_s, read_timeout=timeout_s, write_timeout=timeout_s
        )
        calls = HTTPXRequest(connect_timeout=timeout_s, read_timeout=timeout_s, write_timeout=timeout_s)
        self._requests = [polls, calls]
        builder = (
            ApplicationBuilder()
            .token(self._token)
            .concurrent_updates(True)
            .get_updates_request(polls)
            .request(calls)
            .rate_limiter(
                PacedRateLimiter(config.chat_send_interval_s, config.group_sends_per_minute, config.max_send_retries)
            )
        )
        if config.base_url:
            base = config.base_url.rstrip("/")
            builder = builder.base_url(f"{base}/bot").base_file_url(f"{base}/file/bot")
        app = self.application = builder.build()
        app.add_handler(MessageHandler(filters.UpdateType.MESSAGE & filters.TEXT, self._on_message))
        app.add_error_handler(self._on_error)
        try:
            await app.initialize()  # getMe: checks the token
            await app.bot.set_my_commands([BotCommand(name, about) for name, about in COMMANDS.items()])
            await app.start()
            if config.mode == "webhook":
                await app.updater.start_webhook(
                    listen=config.webhook_listen,
                    port=config.webhook_port,
                    url_path=urlparse(config.webhook_url).path,
                    webhook_url=config.webhook_url,
                    allowed_updates=["message"],
                    secret_token=secret(config.webhook_secret_env, "Telegram webhook mode")
                    if config.webhook_secret_env
                    else None,
                )
            else:
                await app.updater.start_polling(allowed_updates=["message"], error_callback=self._on_poll_error)
        except BaseException as exc:
            await self.close()
            error = _startup_error(exc, config)
            raise error from (None if error is exc else exc)
        self.conversation.platform.bot_name = app.bot.first_name or app.bot.username
        self.conversation.platform.mention_hint = f"mention me (@{app.bot.username})"
        self.conversation.connected()
        log.info("Telegram: @%s is listening (%s)", app.bot.username, config.mode)

    async def close(self) -> None:
        """Stop answering (requests in flight are answered after the restart), then disconnect."""
        await self.conversation.close()
        app, self.application = self.application, None
        if app is None:
            return
        if app.updater and app.updater.running:
            await app.updater.stop()
        if app.running:
            await app.stop()
        await app.shutdown()
        for request in self._requests:  # app.shutdown() skips them after a failed initialize()
            await request.shutdown()

    # ---- events in ------------------------------------------------------------------------

    async def _on_message(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message, bot = update.message, context.bot
        if message.from_user is None:
            return
        text, command, mentions = message.text, None, []
        for entity, written in message.parse_entities(
            [MessageEntity.BOT_COMMAND, MessageEntity.MENTION, MessageEntity.TEXT_MENTION]
        ).items():
            if entity.type == MessageEntity.BOT_COMMAND and entity.offset == 0:
                command, _, addressee = written[1:].lower().partition("@")
                if addressee and addressee != bot.username.lower():
                    return  # another bot's command
                text = text[len(written) :]
            elif written.lower() == f"@{bot.username}".lower() or (
                entity.user is not None and entity.user.id == bot.id
            ):
                mentions.append(written)
        for mention in mentions:
            text = text.replace(mention, "")
        anonymous_admin = message.sender_chat is not None and message.sender_chat.id == message.chat_id
        replied = message.reply_to_message
        await self.conversation.handle(
            ChatEvent(
                chat_id=str(message.chat_id),
                event_id=str(message.message_id),
                user_id=str(message.from_user.id),
                user_name=message.from_user.username or message.from_user.full_name,
                text=re.sub(" {2,}", " ", text).strip(),
                is_private=message.chat.type == ChatType.PRIVATE,
                mentions_bot=bool(mentions),
                replies_to_bot=bool(replied and replied.from_user and replied.from_user.id == bot.id),
                from_bot=message.from_user.is_bot and not anonymous_admin,
                command=command,
                allowed=not self._config.allowed_chats or str(message.chat_id) in self._config.allowed_chats,
                is_admin=functools.partial(_is_chat_admin, message, anonymous_admin),
            ),
            ChatReplier(bot, message.chat_id, message.message_id, self._config.max_send_retries),
        )

    def _replier_for(self, chat_id: str, message_id: str | None) -> ChatReplier:
        return ChatReplier(
            self.application.bot, int(chat_id), message_id and int(message_id), self._config.max_send_retries
        )

    async def _on_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        log.error("Telegram: handling an update failed", exc_info=context.error)

    def _on_poll_error(self, error: TelegramError) -> None:
        log.warning("Telegram: polling failed (%s); retrying", error.__class__.__name__)


class _WatchedRequest(HTTPXRequest):
    """getUpdates' connection: whether it reaches Telegram is whether the platform is connected (GET /healthz)."""

    def __init__(self, conversation: Conversation, **kwargs):
        super().__init__(**kwargs)
        self.conversation, self.failing = conversation, False

    async def do_request(self, *args, **kwargs) -> tuple[int, bytes]:
        try:
            status, payload = await super().do_request(*args, **kwargs)
        except NetworkError as exc:
            self.failing = True
            self.conversation.disconnected(f"cannot reach the Bot API ({type(exc).__name__}); retrying")
            raise
        if status >= 500:
            self.failing = True
            self.conversation.disconnected(f"the Bot API answers {status}; retrying")
        elif self.failing:
            self.failing = False
            self.conversation.connected()
        return status, payload


async def _is_chat_admin(message: Message, anonymous_admin: bool) -> bool:
    if anonymous_admin:
        return True  # an anonymous group admin, posting as the group
    member = await message.chat.get_member(message.from_user.id)
    return member.status in (ChatMemberStatus.ADMINISTRATOR, ChatMemberStatus.OWNER)


def _startup_error(exc: BaseException, config: TelegramConfig) -> BaseException:
    """One sentence for why the bot could not start; the Bot API's host, never its URL (it holds the token)."""
    if isinstance(exc, InvalidToken):
        return ConfigError(f"Telegram refused the bot token in {config.token_env}: copy it again from @BotFather.")
    if isinstance(exc, NetworkError):  # TimedOut too
        host = urlparse(config.base_url).netloc if config.base_url else "api.telegram.org"
        return BotkitError(
            f"Could not reach Telegram's Bot API at {host} ({type(exc).__name__}); check the network"
            " (and [telegram] base_url), then start again."
        )
    if isinstance(exc, TelegramError):
        return BotkitError(
            f"Telegram's Bot API refused to start the bot ({type(exc).__name__}); try again in a minute."
        )
    return exc
