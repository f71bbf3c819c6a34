"""The one way botkit sends text on a platform, and the courtesies around waiting for a reply.

Every text, a generated reply or a command's answer, is defused (`@everyone`, `@here`, user and
role mentions, and `@names` where those notify) and split to the platform's limit before it reaches
a `Replier`. The answer to a request is sent at most once: `Store.claim_answer` is read (and
written) before the first part goes out, and each part's message id is recorded as it is sent.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from botkit.chat.events import Platform, Replier
from botkit.chat.replies import defuse_mentions, split_reply
from botkit.serve.core import Reply, Ticket
from botkit.serve.store import Store

log = logging.getLogger("botkit.conversation")


@dataclass
class Notice:
    """The "n-th in line" message, once sent: the reply's first part replaces its text."""

    message_id: str | None = None
    text: str = ""
    taken: bool = False  # a streamed reply (live_reply.py) shows its text in the notice's message now
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one update of that message at a time


class Outbox:
    def __init__(self, platform: Platform, store: Store):
        self.platform = platform
        self.store = store

    def parts(self, text: str) -> list[str]:
        """`text` as the messages to send, without leading whitespace (a chat prompt ends at "bot:", so
        replies start with a space): defused first, then split (so no part ends inside an escape)."""
        defused = defuse_mentions(text.lstrip(), usernames=self.platform.usernames_ping)
        return [p for p in split_reply(defused, self.platform.max_chars, self.platform.max_parts) if p.strip()]

    async def say(self, replier: Replier, text: str, *, private: bool = False) -> list[str]:
        """Send text that answers no request (a command's answer, a refusal); a failure is logged, not raised."""
        sent: list[str] = []
        try:
            for part in self.parts(text):
                sent.append(await replier.reply(part, private=private))
        except Exception as exc:  # noqa: BLE001 - the platform refused or is unreachable: nothing more to do
            log.warning("%s: could not send a message (%s: %s)", self.platform.name, type(exc).__name__, exc)
        return sent

    async def edit(self, replier: Replier, message_id: str, text: str) -> None:
        try:
            await replier.edit(message_id, self.parts(text)[0])
        except Exception as exc:  # noqa: BLE001 - a notice is a courtesy
            log.info("%s: could not update a notice (%s: %s)", self.platform.name, type(exc).__name__, exc)

    async def deliver(
        self, replier: Replier, request_id: int, text: str, kind: str, shown: list[tuple[str, str]] = ()
    ) -> None:
        """Send the answer to request `request_id` unless one was already begun (at most once, across
        restarts). The messages on `shown` ((id, text): the queue notice, a streamed reply's parts) become
        its first parts, edited where they differ; those left over are deleted. Each sent part is recorded."""
        if not await self.store.claim_answer(request_id, kind):
            log.info("%s: request %d was answered already; not sending it again", self.platform.name, request_id)
            return
        sent: list[str] = []
        parts = self.parts(text)
        try:
            for i, part in enumerate(parts):
                if i < len(shown):
                    message_id, was = shown[i]
                    sent.append(await replier.edit(message_id, part) if part != was else message_id)
                else:
                    sent.append(await replier.reply(part))
        except Exception as exc:  # noqa: BLE001 - logged; the parts that went out are still recorded
            log.warning(
                "%s: could not send the answer to request %d (%s: %s)",
                self.platform.name,
                request_id,
                type(exc).__name__,
                exc,
            )
        finally:
            if sent:
                await self.store.record_delivery(request_id, sent)
        # streamed parts not needed now
        for message_id, _ in shown[len(parts) if len(sent) == len(parts) else len(shown) :]:
            try:
                await replier.delete(message_id)
            except Exception as exc:  # noqa: BLE001 - a leftover part is a blemish; the answer is out
                log.info(
                    "%s: could not delete a streamed message (%s: %s)", self.platform.name, type(exc).__name__, exc
                )

    async def wait(self, ticket: Ticket, replier: Replier, notice: Notice) -> Reply:
        """The ticket's reply; while it is still queued after `queue_notice_s`, a notice says where it
        is in line (edited as it moves up). Cancelling this leaves the ticket running."""
        result = asyncio.ensure_future(ticket.result())
        try:
            done, _ = await asyncio.wait({result}, timeout=self.platform.queue_notice_s)
            while not done:
                await self._update_notice(ticket, replier, notice)
                done, _ = await asyncio.wait({result}, timeout=self.platform.typing_interval_s)
            return result.result()
        finally:
            result.cancel()  # only the waiting: the ticket runs on, to be delivered now or after a restart

    async def _update_notice(self, ticket: Ticket, replier: Replier, notice: Notice) -> None:
        position = ticket.position()
        text = (
            f"⏳ You're number {position} in line; your reply will appear here."
            if position
            else "⏳ Writing your reply…"
        )
        async with notice.lock:
            if notice.taken:
                return
            if notice.message_id is None and position:
                sent = await self.say(replier, text)
                notice.message_id, notice.text = (sent[0], text) if sent else (None, "")
            elif notice.message_id is not None and notice.text != text:
                await self.edit(replier, notice.message_id, text)
                notice.text = text


class Typing:
    """Keeps "typing…" on until `stop()`. The first indicator is sent before `start()` returns (a
    Discord slash command must be acknowledged within 3 s); a refused one never holds up the reply."""

    def __init__(self, replier: Replier, interval_s: float):
        self.replier, self.interval_s = replier, interval_s
        self._task: asyncio.Task | None = None

    async def start(self) -> Typing:
        await self._once()
        self._task = asyncio.create_task(self._keep())
        return self

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _keep(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self._once()

    async def _once(self) -> None:
        try:
            await self.replier.typing()
        except Exception as exc:  # noqa: BLE001 - the indicator is a courtesy
            log.debug("typing indicator refused: %s", exc)
