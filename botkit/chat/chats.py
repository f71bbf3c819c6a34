"""What the chat layer keeps about each chat, and how a chat message becomes a request.

Each chat's settings, its context (the bot's exchanges, or the channel's recent messages), the rate
limits per user and per chat, and the banned words of the chat and the operator: all of it is here,
over the store, so the serving core stays chat-agnostic. It is handed a finished prompt, its
sampling parameters and who asked (`Core.submit`), like the web API's completions.

    chats = Chats(core, store, config)
    ticket = await chats.submit(Prompt("discord", chat_id, user_id, "hello", message_id, "alice", "gptbot"))
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

from botkit.chat.channel_context import build_channel_prompt, channel_lines_to_keep
from botkit.chat_format import ChatFormat
from botkit.config import Config
from botkit.errors import InputError
from botkit.params import ChatSettings
from botkit.prompting import build_prompt, clean_message, history_to_keep
from botkit.serve.core import Core, Ticket, Who
from botkit.serve.scheduler import RateLimiter
from botkit.serve.store import Store

log = logging.getLogger("botkit")


@dataclass(frozen=True)
class Prompt:
    """A chat message that asks for a reply."""

    platform: str
    chat_id: str
    user_id: str
    text: str
    message_id: str | None = None
    user_name: str = ""
    # how the bot is called in this chat: its lines in channel context (chat setting context = channel)
    bot_name: str = ""

    def who(self) -> Who:
        return Who(self.platform, self.chat_id, self.user_id, self.user_name, self.message_id)


class Chats:
    def __init__(self, core: Core, store: Store, config: Config):
        self.core = core
        self.store = store
        self.config = config
        self._user_limit = RateLimiter(config.limits.user_per_minute)
        self._chat_limit = RateLimiter(config.limits.chat_per_minute)
        self._num_forgets: Counter[tuple[str, str]] = Counter()  # per chat: a /forget during a prompt's assembly

    async def submit(
        self, prompt: Prompt, settings: ChatSettings | None = None, *, retry_empty: bool = False
    ) -> Ticket:
        """Queue a chat message for a reply (BusyError, RateLimitedError, InputError at once). With
        `retry_empty`, a blank sample is drawn once more in the same slot (no second rate-limit slot,
        and the blank one is never stored)."""
        text = clean_message(prompt.text, self.config.limits.max_message_chars)
        self.core.check_room()  # a full queue refuses before a rate-limit slot is spent
        self._user_limit.check((prompt.platform, prompt.user_id), "You're")
        self._chat_limit.check((prompt.platform, prompt.chat_id), "This chat is")
        settings = settings or await self.settings(prompt.platform, prompt.chat_id)
        num_forgets = self._num_forgets[prompt.platform, prompt.chat_id]
        full = await self._chat_prompt(prompt, text, settings)
        # the operator's banned words are added by the core, for every request (Core._with_operator_rules)
        ticket = await self.core.submit(
            full, settings.sampling(), who=prompt.who(), kind="chat", message=text, retry_empty=retry_empty
        )
        # its context may quote what /forget erased
        if self._num_forgets[prompt.platform, prompt.chat_id] != num_forgets:
            await self.store.blank_prompt(ticket.request_id)
            await self.core.drop_cached_prefixes()
        return ticket

    async def _chat_prompt(self, prompt: Prompt, text: str, settings: ChatSettings) -> str:
        """The template and the chat's context around `text`, trimmed to the window minus the reply length."""
        budget, limit = self.core.max_context - settings.length, self.config.limits.context_messages
        count_tokens = self.core.count_tokens
        if settings.use_context and settings.context == "channel":
            author, bot = prompt.user_name or prompt.user_id, prompt.bot_name or "bot"
            fmt = ChatFormat.from_line(settings.chat_format, settings.truncate)
            history = await self.store.channel_context(prompt.platform, prompt.chat_id, limit + 1)
            keep = len(history) if len(history) <= limit else limit // 2  # past the limit, half at once (see below)
            keep = channel_lines_to_keep(fmt, history[len(history) - keep :], author, text, bot, budget, count_tokens)
            if keep < len(history):
                await self.store.keep_newest_channel_context(prompt.platform, prompt.chat_id, keep)
            return build_channel_prompt(fmt, history[len(history) - keep :], author, text, bot, budget, count_tokens)
        separator = settings.truncate or "\n"
        history = await self._stable_history(prompt, settings, text, budget, separator) if settings.use_context else []
        return build_prompt(settings.template, text, history, separator, budget, count_tokens)

    async def _stable_history(
        self, prompt: Prompt, settings: ChatSettings, text: str, budget: int, separator: str
    ) -> list:
        """The chat's context, trimmed in halves (see prompting.history_to_keep): past `context_messages`
        exchanges or past the token budget, the oldest are dropped for good, so that the following
        turns start the same way and reuse the engine's cache."""
        limit = self.config.limits.context_messages
        history = await self.store.context(prompt.platform, prompt.chat_id, limit + 1)
        keep = len(history) if len(history) <= limit else limit // 2
        keep = history_to_keep(
            settings.template, text, history[len(history) - keep :], separator, budget, self.core.count_tokens
        )
        if keep < len(history):
            await self.store.keep_newest_context(prompt.platform, prompt.chat_id, keep)
        return history[len(history) - keep :]

    async def settings(self, platform: str, chat_id: str) -> ChatSettings:
        changes = await self.store.chat_settings(platform, chat_id)
        try:
            return self.config.chat.replace(**changes)
        except InputError:
            log.warning("Stored settings for %s/%s are no longer valid; using the defaults.", platform, chat_id)
            return self.config.chat

    async def update_settings(self, platform: str, chat_id: str, **changes) -> ChatSettings:
        before = await self.settings(platform, chat_id)
        settings = before.replace(**changes)
        defaults = self.config.chat.to_dict()
        await self.store.set_chat_settings(
            platform, chat_id, {k: v for k, v in settings.to_dict().items() if v != defaults[k]}
        )
        if settings.dataset_opt_in and not before.dataset_opt_in:
            await self.store.start_export(platform, chat_id)  # training data counts from the moment of opting in
        return settings

    async def reset_context(self, platform: str, chat_id: str) -> None:
        await self.store.reset_context(platform, chat_id)

    async def forget(self, platform: str, chat_id: str, user_id: str | None = None) -> int:
        """/forget: erase a member's (or everyone's) messages from the store, and every conversation the
        engine keeps for reuse, which may hold them too; returns how many messages were erased."""
        self._num_forgets[platform, chat_id] += 1
        erased = await self.store.forget(platform, chat_id, user_id)
        await self.core.drop_cached_prefixes()
        return erased
