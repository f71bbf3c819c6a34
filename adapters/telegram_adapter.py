"""Telegram adapter: python-telegram-bot in, botkit's core out.

A message that triggers the bot becomes a `Prompt`; the `Reply` goes back as plain text (no
parse_mode, so model output cannot inject markup; `@names` defused, so nobody is pinged), split at
Telegram's 4096 characters, as a reply to the triggering message, with "typing…" shown from
queueing until sending. The composition root owns the event loop:

    async with TelegramAdapter(core, config.telegram, secret(config.telegram.token_env, "Telegram")):
        await stop_event.wait()

Never `run_polling()`: it would take over the event loop the other adapters share.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
from collections.abc import Callable
from urllib.parse import urlparse

from telegram import BotCommand, LinkPreviewOptions, Message, MessageEntity, ReplyParameters, Update
from telegram.constants import ChatAction, ChatMemberStatus, ChatType, MessageLimit
from telegram.error import InvalidToken, NetworkError, TelegramError, TimedOut
from telegram.ext import (
    AIORateLimiter,
    Application,
    ApplicationBuilder,
    ApplicationHandlerStop,
    CommandHandler,
    ContextTypes,
    MessageHandler,
    TypeHandler,
    filters,
)
from telegram.request import HTTPXRequest

from botkit.config import TelegramConfig, secret
from botkit.core import Core, Prompt, Reply, Ticket
from botkit.errors import BotkitError, ConfigError
from botkit.replies import defuse_mentions, split_reply

log = logging.getLogger(__name__)

PLATFORM = "telegram"
COMMANDS = [
    BotCommand("gen", "Write a continuation of the text after the command"),
    BotCommand("settings", "Show this chat's settings, or set one: /settings temperature 0.7"),
    BotCommand("reset", "Forget this chat's conversation context"),
    BotCommand("stats", "Queue depth, speed and latency"),
    BotCommand("help", "How to talk to this bot"),
]
EMPTY_REPLY = "The model had nothing to say twice in a row; try a longer message or /settings length 80."
_SEND_ENDPOINTS = {"sendMessage", "editMessageText"}  # only messages count against Telegram's flood limits
_RETRY_BACKOFF_S = 0.5  # first wait before resending after a 5xx or a dropped connection; doubles


class PacedRateLimiter(AIORateLimiter):
    """PTB's AIORateLimiter (30 messages/s overall, N per group per minute, waits out a 429's
    retry_after and sends again) plus one message per chat per interval, applied to sends only:
    "typing" actions and reads must not use up a group's 20 messages a minute."""

    def __init__(self, chat_interval_s: float, group_per_minute: int, max_retries: int):
        super().__init__(group_max_rate=group_per_minute, group_time_period=60 if group_per_minute else 0,
                         max_retries=max_retries)
        self._chat_interval_s = chat_interval_s
        self._chat_locks: dict[str, asyncio.Lock] = {}
        self._chat_last_send: dict[str, float] = {}

    async def process_request(self, callback, args, kwargs, endpoint, data, rate_limit_args):
        if endpoint not in _SEND_ENDPOINTS:
            return await callback(*args, **kwargs)
        chat = str(data.get("chat_id"))
        if len(self._chat_locks) > 1024:  # forget idle chats so the dicts stay small
            for key in [k for k, lock in self._chat_locks.items() if not lock.locked()]:
                del self._chat_locks[key]
                self._chat_last_send.pop(key, None)
        async with self._chat_locks.setdefault(chat, asyncio.Lock()):
            loop = asyncio.get_running_loop()
            wait_s = self._chat_last_send.get(chat, -1e9) + self._chat_interval_s - loop.time()
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            try:
                return await super().process_request(callback, args, kwargs, endpoint, data, rate_limit_args)
            finally:
                self._chat_last_send[chat] = loop.time()


class TelegramAdapter:
    def __init__(self, core: Core, config: TelegramConfig, token: str, *, chance: Callable[[], float] = random.random):
        if config.mode not in ("polling", "webhook"):
            raise ConfigError(f"telegram.mode must be 'polling' or 'webhook', not {config.mode!r}.")
        if config.mode == "webhook" and not config.webhook_url.startswith("https://"):
            raise ConfigError("telegram.mode = 'webhook' needs telegram.webhook_url, the public https:// URL Telegram will post to.")
        self._core, self._config, self._token = core, config, token
        self._chance = chance  # random-reply draws; tests inject a fixed one
        self.application: Application | None = None
        self._requests: list[HTTPXRequest] = []

    async def __aenter__(self) -> TelegramAdapter:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def start(self) -> None:
        config = self._config
        timeout_s = config.request_timeout_s
        # Built here, not by the builder, so they can be closed even if initialize() fails (a bad token).
        self._requests = [HTTPXRequest(connect_timeout=timeout_s, read_timeout=timeout_s, write_timeout=timeout_s)
                          for _ in range(2)]  # getUpdates (long polls add their timeout) and everything else
        builder = (ApplicationBuilder().token(self._token).concurrent_updates(True)
                   .get_updates_request(self._requests[0]).request(self._requests[1])
                   .rate_limiter(PacedRateLimiter(config.chat_send_interval_s, config.group_sends_per_minute,
                                                  config.max_send_retries)))
        if config.base_url:
            builder = builder.base_url(f"{config.base_url.rstrip('/')}/bot").base_file_url(f"{config.base_url.rstrip('/')}/file/bot")
        app = self.application = builder.build()
        app.add_handler(TypeHandler(Update, self._gate), group=-1)
        only_new = filters.UpdateType.MESSAGE
        app.add_handler(CommandHandler("gen", self._on_gen, filters=only_new))
        app.add_handler(CommandHandler("settings", self._on_settings, filters=only_new))
        app.add_handler(CommandHandler("reset", self._on_reset, filters=only_new))
        app.add_handler(CommandHandler("stats", self._on_stats, filters=only_new))
        app.add_handler(CommandHandler(["help", "start"], self._on_help, filters=only_new))
        app.add_handler(MessageHandler(only_new & filters.TEXT & ~filters.COMMAND, self._on_text))
        app.add_error_handler(self._on_error)
        try:
            await app.initialize()  # getMe: checks the token
        except BaseException as exc:
            self.application = None
            for request in self._requests:
                await request.shutdown()
            if isinstance(exc, InvalidToken):
                raise ConfigError(f"Telegram refused the bot token in {config.token_env}: copy it again from @BotFather.") from None
            raise
        try:
            await app.bot.set_my_commands(COMMANDS)
            await app.start()
            if config.mode == "webhook":
                await app.updater.start_webhook(
                    listen=config.webhook_listen, port=config.webhook_port, url_path=urlparse(config.webhook_url).path,
                    webhook_url=config.webhook_url, allowed_updates=["message"],
                    secret_token=secret(config.webhook_secret_env, "Telegram webhook mode") if config.webhook_secret_env else None)
            else:
                await app.updater.start_polling(allowed_updates=["message"], error_callback=self._on_poll_error)
        except BaseException:
            await self.close()
            raise
        log.info("Telegram: @%s is listening (%s)", app.bot.username, config.mode)

    async def close(self) -> None:
        app, self.application = self.application, None
        if app is None:
            return
        if app.updater and app.updater.running:
            await app.updater.stop()
        if app.running:
            await app.stop()  # waits for the replies being written
        await app.shutdown()

    # ---- which messages the bot answers -------------------------------------------------------

    async def _gate(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Runs before every handler: drops other bots (no bot loops) and chats not allowed."""
        message = update.message
        allowed = self._config.allowed_chats
        anonymous_admin = message is not None and message.sender_chat is not None and message.sender_chat.id == message.chat_id
        if (message is None or message.from_user is None or (message.from_user.is_bot and not anonymous_admin)
                or (allowed and str(message.chat_id) not in allowed)):
            raise ApplicationHandlerStop

    def _triggered_text(self, message: Message, trigger: str, random_reply_chance: float) -> str | None:
        """The prompt text if this message should be answered, else None."""
        text, prefix = message.text, self._config.command_prefix
        is_private = message.chat.type == ChatType.PRIVATE
        if prefix and (text == prefix or text.startswith(prefix + " ") or text.startswith(prefix + "\n")):
            return text[len(prefix):].strip() if is_private or trigger != "never" else None
        if is_private or trigger == "always":
            return text
        if trigger == "never":
            return None
        bot = message.get_bot()
        mentions = [t for e, t in message.parse_entities([MessageEntity.MENTION, MessageEntity.TEXT_MENTION]).items()
                    if t.lower() == f"@{bot.username}".lower() or (e.user is not None and e.user.id == bot.id)]
        replied = message.reply_to_message
        if trigger == "mention" and (mentions or (replied and replied.from_user and replied.from_user.id == bot.id)):
            for mention in mentions:
                text = text.replace(mention, "")
            return re.sub(" {2,}", " ", text).strip()
        return text if self._chance() < random_reply_chance else None

    async def _on_text(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.message
        settings = await self._core.get_settings(PLATFORM, str(message.chat_id))
        text = self._triggered_text(message, settings.trigger, settings.random_reply_chance)
        if text is not None:
            await self._generate(message, text)

    async def _on_gen(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.message
        parts = message.text.split(maxsplit=1)
        if len(parts) < 2:
            await self._answer(message, "Write the start of a text after /gen, for example: /gen Once upon a time")
            return
        settings = await self._core.get_settings(PLATFORM, str(message.chat_id))
        if settings.trigger == "never" and message.chat.type != ChatType.PRIVATE:
            await self._answer(message, "The bot is switched off in this chat; an admin can turn it on with /settings trigger mention.")
            return
        await self._generate(message, parts[1])

    # ---- generating and replying ----------------------------------------------------------

    async def _generate(self, message: Message, text: str) -> None:
        user = message.from_user
        prompt = Prompt(platform=PLATFORM, chat_id=str(message.chat_id), user_id=str(user.id), text=text,
                        message_id=str(message.message_id), user_name=user.username or user.full_name)
        notice: list[Message] = []  # the "n-th in line" message, if one was sent; becomes the reply's first part
        async with self._typing(message.chat_id):
            try:
                ticket = await self._core.submit(prompt)
                reply = await self._wait(ticket, message, notice)
                if not reply.text.strip():  # a sample can end at once (e.g. on the truncate string): try once more
                    ticket = await self._core.submit(prompt)
                    reply = await self._wait(ticket, message, notice)
            except BotkitError as exc:  # busy, rate limited, bad input, failed generation: one sentence
                await self._deliver(None, message, str(exc), notice)
                return
            await self._deliver(reply.request_id, message, reply.text if reply.text.strip() else EMPTY_REPLY, notice)

    async def _wait(self, ticket: Ticket, message: Message, notice: list[Message]) -> Reply:
        """The ticket's reply; if it is still queued after queue_notice_s, say where it is in line."""
        result = asyncio.ensure_future(ticket.result())
        try:
            done, _ = await asyncio.wait({result}, timeout=self._config.queue_notice_s)
            while not done:
                position = ticket.position()
                text = f"⏳ You are number {position} in line; your reply will appear here." if position else "⏳ Writing your reply…"
                with contextlib.suppress(TelegramError):  # the notice is a courtesy; the reply matters
                    if not notice and position:
                        notice.append(await self._answer(message, text))
                    elif notice and notice[0].text != text:
                        notice[0] = await self._edit(notice[0], text)
                done, _ = await asyncio.wait({result}, timeout=self._config.typing_interval_s)
            return result.result()
        except asyncio.CancelledError:  # shutting down: free the batch slot
            ticket.cancel()
            result.cancel()
            raise

    async def _deliver(self, request_id: int | None, message: Message, text: str, notice: list[Message]) -> None:
        """Send `text` as plain-text replies (the notice, if any, is edited into the first part) and
        record what was delivered, so nothing is ever sent twice."""
        if request_id is not None and await self._core.is_delivered(request_id):
            return
        parts = split_reply(defuse_mentions(text, usernames=True), MessageLimit.MAX_TEXT_LENGTH, self._config.max_reply_parts)
        sent_ids: list[str] = []
        try:
            for i, part in enumerate(parts or [EMPTY_REPLY]):
                if i == 0 and notice:
                    sent = await self._with_retries(lambda p=part: self._edit(notice[0], p))
                else:
                    sent = await self._with_retries(lambda p=part: self._answer(message, p))
                sent_ids.append(str(sent.message_id))
        finally:  # a part that went out is recorded even if a later one failed: a retry must not repeat it
            if request_id is not None and sent_ids:
                await self._core.record_delivery(request_id, sent_ids)

    async def _with_retries(self, send):
        """Send again after a 5xx or a dropped connection (429s are retried by PacedRateLimiter).
        A timeout is not retried: Telegram may have posted the message, and a duplicate is worse."""
        for attempt in range(self._config.max_send_retries + 1):
            try:
                return await send()
            except TimedOut:
                raise
            except NetworkError:
                if attempt == self._config.max_send_retries:
                    raise
                await asyncio.sleep(_RETRY_BACKOFF_S * 2**attempt)

    async def _answer(self, message: Message, text: str) -> Message:
        # No parse_mode: the text is shown as typed, model output cannot add links or formatting.
        return await message.reply_text(
            text, reply_parameters=ReplyParameters(message.message_id, allow_sending_without_reply=True),
            link_preview_options=LinkPreviewOptions(is_disabled=True))

    async def _edit(self, sent: Message, text: str) -> Message:
        return await sent.edit_text(text, link_preview_options=LinkPreviewOptions(is_disabled=True))

    @contextlib.asynccontextmanager
    async def _typing(self, chat_id: int):
        """Keep "typing…" on (Telegram shows it for 5 s per action) until the block ends."""

        async def keep_typing():
            while True:
                with contextlib.suppress(TelegramError):
                    await self.application.bot.send_chat_action(chat_id, ChatAction.TYPING)
                await asyncio.sleep(self._config.typing_interval_s)

        task = asyncio.create_task(keep_typing())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # ---- commands -------------------------------------------------------------------------

    async def _on_settings(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.message
        chat_id = str(message.chat_id)
        words = message.text.split(maxsplit=2)  # /settings NAME VALUE, the value may contain spaces
        if len(words) == 1:
            settings = await self._core.get_settings(PLATFORM, chat_id)
            lines = [f"{name} = {value!r}" for name, value in settings.to_dict().items()]
            await self._answer(message, "Settings for this chat:\n" + "\n".join(lines)
                               + "\n\nChange one with /settings NAME VALUE (chat admins only).")
            return
        if len(words) == 2:
            await self._answer(message, f"Give a value too: /settings {words[1]} VALUE")
            return
        if not await self._may_change_settings(message):
            await self._answer(message, "Only this chat's admins can change its settings.")
            return
        try:
            settings = await self._core.update_settings(PLATFORM, chat_id, **{words[1]: words[2]})
        except BotkitError as exc:
            await self._answer(message, str(exc))
            return
        await self._answer(message, f"{words[1]} is now {getattr(settings, words[1])!r}.")

    async def _may_change_settings(self, message: Message) -> bool:
        if str(message.from_user.id) in self._config.admin_user_ids or message.chat.type == ChatType.PRIVATE:
            return True  # configured admins anywhere; anyone in their own private chat
        if message.sender_chat is not None and message.sender_chat.id == message.chat_id:
            return True  # an anonymous group admin, posting as the group
        member = await message.chat.get_member(message.from_user.id)
        return member.status in (ChatMemberStatus.ADMINISTRATOR, ChatMemberStatus.OWNER)

    async def _on_reset(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        await self._core.reset_context(PLATFORM, str(update.message.chat_id))
        await self._answer(update.message, "Forgot this chat's context; the next reply starts fresh.")

    async def _on_stats(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        await self._answer(update.message, self._core.stats().summary())

    async def _on_help(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        name, prefix = update.message.get_bot().username, self._config.command_prefix
        await self._answer(update.message, (
            f"I continue text with a language model. In groups, mention me (@{name}), reply to one of my "
            f"messages, or write /gen TEXT{f' or {prefix} TEXT' if prefix else ''}; in a private chat just write.\n"
            "/settings shows this chat's settings (admins: /settings NAME VALUE), /reset forgets the "
            "conversation, /stats shows the queue and speed."))

    async def _on_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        log.error("Telegram: handling an update failed", exc_info=context.error)

    def _on_poll_error(self, error: TelegramError) -> None:
        log.warning("Telegram: polling failed (%s); retrying", error.__class__.__name__)
