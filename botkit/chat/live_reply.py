"""A reply shown while it is being written (chat setting `stream`), the same way on every platform.

What is shown is the ticket's draft (botkit/serve/core.py `Ticket.draft`), never more than
`visible_text` allows: with banned words set, the word being written is held back (it could still
become one: "ba" -> "bad"), and nothing from the first banned word on is ever shown (that draw is
drawn again, or refused). A draw that is drawn again (banned, copying, empty) starts the draft over,
and what was shown is replaced by the new draw's text.

Where it is shown: a Telegram private chat shows a draft (`Replier.draft`, Bot API sendMessageDraft)
and the reply is then sent as usual; elsewhere the first part is sent as soon as there is text and
edited as more arrives, a full part is left as it is and the next one sent (split as the final reply
is: `Outbox.parts`). Updates go out at most once per the platform's interval (`Platform.stream_interval_s`,
its rate limits); what arrives in between is shown by the next update, whole. The final reply is
delivered by the outbox, which edits these messages into the stored reply's parts.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time

from botkit.banned_words import banned_word_in
from botkit.chat.events import Replier
from botkit.chat.outbox import Notice, Outbox
from botkit.chat_format import ChatFormat, ReplyDecoder
from botkit.serve.core import Ticket

log = logging.getLogger("botkit.conversation")

LINES = ChatFormat()  # the line_break a chat-trained run writes ("<br>"), shown as a line break
WRITING = "…"  # what a streamed message shows while a draw that was drawn again has no text yet
_WORD_END = re.compile(r"\S(?=\s)")  # the last character of a word that whitespace follows


def as_written(draft: str) -> str:
    """A draft's "<br>" as line breaks, as the final reply will be (conversation.LINES), holding back a
    "<br>" still being written ("<b"), so what is shown only grows."""
    return ReplyDecoder(LINES.line_break).feed(draft)


def visible_text(draft: str, banned: tuple[str, ...]) -> str:
    """The part of a draft that may be shown. Without banned words, all of it. With them, up to the end of
    its last whole word (the word being written could still become a banned one), and never from the
    first banned word on: the longest such prefix that holds none (a prefix of a clean prefix is clean,
    so the shown text only grows while one draw is written)."""
    if not banned:
        return draft
    ends = [m.end() for m in _WORD_END.finditer(draft)]  # prefixes that end with a whole word
    low, high = 0, len(ends)  # ends[:low] are clean, ends[high:] are not
    if ends and banned_word_in(draft[: ends[-1]], banned) is None:
        low = high
    while low < high:
        middle = (low + high) // 2
        if banned_word_in(draft[: ends[middle]], banned) is None:
            low = middle + 1
        else:
            high = middle
    return draft[: ends[low - 1]] if low else ""


class LiveReply:
    """Shows one ticket's draft while it is written; `messages` are the (id, text) of the parts on show."""

    def __init__(self, outbox: Outbox, replier: Replier, notice: Notice, interval_s: float):
        self.outbox, self.replier, self.notice, self.interval_s = outbox, replier, notice, interval_s
        self.messages: list[tuple[str, str]] = []
        self.num_updates = 0  # messages sent, edited or deleted, and drafts shown, while streaming
        self.first_shown_at: float | None = None  # time.monotonic() when text first showed
        self._drafting: bool | None = None  # the replier shows drafts (None: not asked yet)
        self._task: asyncio.Task | None = None
        self._showing: asyncio.Future | None = None

    def start(self, ticket: Ticket) -> LiveReply:
        self._task = asyncio.create_task(self._follow(ticket), name=f"stream-{ticket.request_id}")
        return self

    async def stop(self) -> None:
        """Stop updating; an update under way is finished first, so that every sent part is known."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._showing is not None:
            await asyncio.gather(self._showing, return_exceptions=True)

    async def _follow(self, ticket: Ticket) -> None:
        banned, shown, last_update = ticket.params.banned_words, "", float("-inf")
        while not ticket.done:
            await ticket.draft_changed()
            await asyncio.sleep(max(0.0, last_update + self.interval_s - time.monotonic()))  # the platform's pace
            text = visible_text(as_written(ticket.draft), banned)
            if ticket.done or text == shown:
                continue
            self._showing = asyncio.ensure_future(self._show(ticket.request_id, text))
            if not await asyncio.shield(self._showing):
                return  # the platform refused an update: the reply still comes, whole, at the end
            shown, last_update = text, time.monotonic()

    async def _show(self, request_id: int, text: str) -> bool:
        """Show `text` (a draw's visible text; "" after a redraw); False if the platform refused."""
        parts = self.outbox.parts(text)
        try:
            async with self.notice.lock:  # the queue notice is not edited at the same time
                if self._drafting is not False:  # asked once; a platform without drafts says False
                    self._drafting = await self.replier.draft(request_id, parts[-1] if parts else "")
                if not self._drafting:
                    self.notice.taken = True  # from now on the notice's message is this reply's first part
                    await self._edit_messages(request_id, parts or [WRITING])
                self.num_updates += 1
        except Exception as exc:  # noqa: BLE001 - streaming is a courtesy
            log.info(
                "%s: could not update a streamed reply (%s: %s)", self.outbox.platform.name, type(exc).__name__, exc
            )
            return False
        if parts and self.first_shown_at is None:
            self.first_shown_at = time.monotonic()
        return True

    async def _edit_messages(self, request_id: int, parts: list[str]) -> None:
        """Make the messages on show hold `parts`: edit those that differ, send new ones, delete the extra.
        Each message is recorded as it is sent (Store.previews): after a crash, the answer edits it."""
        store = self.outbox.store
        if not self.messages and self.notice.message_id is not None:
            self.messages.append((self.notice.message_id, self.notice.text))  # the queue notice becomes the first part
            await store.record_preview(request_id, 0, self.notice.message_id)
        for i, part in enumerate(parts):
            if i == len(self.messages):
                self.messages.append((await self.replier.reply(part), part))
                await store.record_preview(request_id, i, self.messages[i][0])
            elif self.messages[i][1] != part:
                self.messages[i] = (await self.replier.edit(self.messages[i][0], part), part)
        while len(self.messages) > len(parts):
            await self.replier.delete(self.messages[-1][0])
            self.messages.pop()
            await store.record_preview(request_id, len(self.messages), None)
