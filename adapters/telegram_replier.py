"""What botkit sends on Telegram: the conversation layer's `Replier` protocol in Bot API calls, as
plain text (no parse_mode: model output cannot add markup) without link previews."""

from __future__ import annotations

import asyncio

import httpx
from telegram import Bot, LinkPreviewOptions, ReplyParameters
from telegram.constants import ChatAction
from telegram.error import BadRequest, NetworkError, TimedOut

NO_PREVIEW = LinkPreviewOptions(is_disabled=True)
_RETRY_BACKOFF_S = 0.5  # first wait before trying again; doubles


class ChatReplier:
    """Replies to one message in a chat, as plain text without link previews."""

    def __init__(self, bot: Bot, chat_id: int, message_id: int | None, max_retries: int):
        self.bot, self.chat_id, self.message_id, self.max_retries = bot, chat_id, message_id, max_retries
        self.is_private = chat_id > 0  # a private chat's id is its user's; groups' and channels' are negative

    async def reply(self, text: str, *, private: bool = False) -> str:
        to = ReplyParameters(self.message_id, allow_sending_without_reply=True) if self.message_id else None
        sent = await self._retrying(
            lambda: self.bot.send_message(self.chat_id, text, reply_parameters=to, link_preview_options=NO_PREVIEW),
            only_unsent=True,
        )
        return str(sent.message_id)

    async def edit(self, message_id: str, text: str) -> str:
        try:
            await self._retrying(
                lambda: self.bot.edit_message_text(
                    text, chat_id=self.chat_id, message_id=int(message_id), link_preview_options=NO_PREVIEW
                )
            )
        except BadRequest as exc:
            if "not modified" not in exc.message:  # it already reads so (a streamed reply shown whole before a restart)
                raise
        return message_id

    async def typing(self) -> None:
        await self.bot.send_chat_action(self.chat_id, ChatAction.TYPING)  # Telegram shows it for 5 s

    async def draft(self, draft_id: int, text: str) -> bool:
        """Bot API 9.5 sendMessageDraft: private chats only; the reply's sendMessage then replaces it."""
        if not self.is_private:
            return False
        await self.bot.send_message_draft(self.chat_id, draft_id, text)  # not retried: the next draft follows soon
        return True

    async def delete(self, message_id: str) -> None:
        await self._retrying(lambda: self.bot.delete_message(self.chat_id, int(message_id)))

    async def _retrying(self, send, *, only_unsent: bool = False):
        """Call again after a 5xx or a dropped connection (429s are retried by PacedRateLimiter). With
        `only_unsent` (a new message), only when the request never reached Telegram (no connection):
        after a timeout, a 5xx or a connection dropped mid-call Telegram may have posted the message,
        and a duplicate is worse than a lost reply (see README, "sent but not recorded")."""
        for attempt in range(self.max_retries + 1):
            try:
                return await send()
            except TimedOut:
                raise
            except NetworkError as exc:
                if attempt == self.max_retries or (only_unsent and not isinstance(exc.__cause__, httpx.ConnectError)):
                    raise
                await asyncio.sleep(_RETRY_BACKOFF_S * 2**attempt)
