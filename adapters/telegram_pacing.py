"""Telegram's flood limits, kept on the client side so that sends are paced instead of refused."""

from __future__ import annotations

import asyncio

from telegram.ext import AIORateLimiter

_SEND_ENDPOINTS = {"sendMessage", "editMessageText"}  # only messages count against Telegram's flood limits


class PacedRateLimiter(AIORateLimiter):
    """PTB's AIORateLimiter (30 messages/s overall, N per group per minute, waits out a 429's
    retry_after and sends again) plus one message per chat per interval, applied to sends only:
    "typing" actions and reads must not use up a group's 20 messages a minute."""

    def __init__(self, chat_interval_s: float, group_per_minute: int, max_retries: int):
        super().__init__(
            group_max_rate=group_per_minute, group_time_period=60 if group_per_minute else 0, max_retries=max_retries
        )
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
