"""The conversation layer: one chat policy for every platform.

An adapter translates its SDK's events into `ChatEvent`s and hands each to `handle` with a
`Replier`; this decides whether to speak (botkit/chat/triggers.py), runs commands (botkit/chat/commands.py),
builds the request, keeps "typing…" on, says where the asker is in line, and sends the answer once
through the outbox (defused, split, recorded). After a restart, `resume` answers every request of
the platform that was accepted but never answered: run again, or "sorry, I restarted" past
`[conversation] resume_max_age_s`.

    async with Conversation(chats, platform, replier_for) as conversation:
        conversation.connected()  # the platform says it is connected: answers owed since the restart go out
        await conversation.handle(event, replier)
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from collections.abc import Callable

from botkit.chat.chats import Chats, Prompt
from botkit.chat.commands import HANDLERS
from botkit.chat.events import ChatEvent, Platform, Replier
from botkit.chat.live_reply import LINES, LiveReply
from botkit.chat.outbox import Notice, Outbox, Typing
from botkit.chat.triggers import prefixed_text, wants_reply
from botkit.errors import BotkitError, InputError
from botkit.params import ChatSettings
from botkit.prompting import clean_message
from botkit.serve.core import Ticket

log = logging.getLogger("botkit.conversation")

EMPTY_REPLY = "The model had nothing to say twice in a row; try a longer message, or raise length with /settings."
SWITCHED_OFF = (
    "I'm switched off in this chat (trigger = never); an admin can turn me on with /settings trigger mention."
)
GEN_USAGE = "Write the start of a text after the command, for example: /gen Once upon a time"
NOT_ENABLED = "I'm not enabled in this chat."
UNKNOWN_COMMAND = "I don't know that command; /help lists mine."
SORRY = "Sorry, I restarted and lost track of this message; please send it again."
MAX_REMEMBERED_EVENTS = 1000


class Conversation:
    def __init__(
        self,
        chats: Chats,
        platform: Platform,
        replier_for: Callable[[str, str | None], Replier],
        *,
        chance: Callable[[], float] = random.random,
    ):
        self.chats = chats
        self.core = chats.core  # its public surface only: connections, rerun, stats
        self.platform = platform
        self.replier_for = replier_for  # (chat_id, message_id) -> a Replier answering that message, after a restart
        self.chance = chance  # () -> [0, 1): the draws for random_reply_chance (tests inject one)
        self.outbox = Outbox(platform, chats.store)
        self._recent: collections.OrderedDict[tuple[str, str], None] = collections.OrderedDict()  # events handled here
        self._handlers: set[asyncio.Task] = set()  # waiting for a reply: cancelled at close
        self._deliveries: set[asyncio.Future] = set()  # sending one: finished at close, so what went out is recorded
        self._resuming: asyncio.Task | None = None
        self._resume_up_to = 0  # requests up to this id were accepted before this start

    async def __aenter__(self) -> Conversation:
        self.core.connections.expect(self.platform.name)
        self._resume_up_to = await self.chats.store.max_request_id()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop waiting for replies. Requests keep running; one not answered now is answered after the restart."""
        waiting = [*self._handlers, *([self._resuming] if self._resuming else [])]
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, *self._deliveries, return_exceptions=True)
        self.core.connections.down(self.platform.name, "stopped")

    async def idle(self) -> None:
        """Wait until no event is being handled and the answers owed since the restart (once connected)
        are given: whatever the bot has to send for what came so far has been sent."""
        while busy := {t for t in (*self._handlers, self._resuming) if t and not t.done()} - {asyncio.current_task()}:
            await asyncio.wait(busy)

    def connected(self) -> None:
        """The platform is (again) connected; the first time, answer what was owed before this start."""
        self.core.connections.up(self.platform.name)
        if self._resuming is None:
            self._resuming = asyncio.create_task(self.resume(), name=f"{self.platform.name}-resume")

    def disconnected(self, reason: str) -> None:
        self.core.connections.down(self.platform.name, reason)

    # -- events -------------------------------------------------------------------------------

    async def handle(self, event: ChatEvent, replier: Replier) -> None:
        """Answer `event` if it asks for an answer; never raises (a failure is logged)."""
        task = asyncio.current_task()
        self._handlers.add(task)
        try:
            await self._handle(event, replier)
        except Exception:
            log.exception(
                "%s: handling message %s in chat %s failed", self.platform.name, event.event_id, event.chat_id
            )
        finally:
            self._handlers.discard(task)

    async def _handle(self, event: ChatEvent, replier: Replier) -> None:
        if event.from_bot:
            return
        if not event.allowed:
            if event.command is not None:
                await self.say(replier, NOT_ENABLED, private=True)
            return
        if not await self._first_sight(event):
            return  # a platform delivered it twice (a gateway replay, a redelivery after a restart)
        settings = await self.chats.settings(self.platform.name, event.chat_id)
        if event.command is not None:
            await self._command(event, replier, settings)
        elif (text := prefixed_text(event.text, self.platform.command_prefix)) is not None:
            if settings.trigger != "never":  # silenced: only a platform command (/gen) hears why
                await self.gen(event, text, replier, settings)
        elif wants_reply(event, settings, self.chance):
            await self.answer(event, event.text, replier, settings)
        elif settings.use_context and settings.context == "channel":
            await self._keep_as_context(event)

    async def _first_sight(self, event: ChatEvent) -> bool:
        key = (event.chat_id, event.event_id)
        if key in self._recent:
            return False
        self._recent[key] = None
        if len(self._recent) > MAX_REMEMBERED_EVENTS:
            self._recent.popitem(last=False)
        return not await self.chats.store.seen(self.platform.name, event.chat_id, event.event_id)

    async def _command(self, event: ChatEvent, replier: Replier, settings: ChatSettings) -> None:
        handler = HANDLERS.get(event.command)
        if handler is None:
            if event.is_private:  # in a group it may be another bot's
                await self.say(replier, UNKNOWN_COMMAND, private=True)
        else:
            await handler(self, event, replier, settings)
        await self._mark_seen(event)  # a /gen that made a request is known by it; marking it too is harmless

    async def _keep_as_context(self, event: ChatEvent) -> None:
        try:
            text = clean_message(event.text, self.chats.config.limits.max_message_chars)
        except InputError:
            return  # empty, or too long to be useful context
        await self.chats.store.add_channel_message(
            platform=self.platform.name,
            chat_id=event.chat_id,
            user_id=event.user_id,
            user_name=event.user_name,
            platform_message_id=event.event_id,
            text=text,
            keep=self.chats.config.conversation.max_channel_messages,
        )

    async def _mark_seen(self, event: ChatEvent) -> None:
        await self.chats.store.mark_seen(self.platform.name, event.chat_id, event.event_id)

    # -- answering ----------------------------------------------------------------------------

    async def say(self, replier: Replier, text: str, *, private: bool = False) -> None:
        await self.outbox.say(replier, text, private=private)

    async def may_administer(self, event: ChatEvent) -> bool:
        """Configured admins anywhere, anyone in their own private chat, the chat's admins."""
        return event.user_id in self.platform.admin_user_ids or event.is_private or await event.is_admin()

    async def gen(self, event: ChatEvent, text: str, replier: Replier, settings: ChatSettings) -> None:
        """An explicit request (/gen, the text prefix): answered unless the chat is switched off."""
        if settings.trigger == "never":
            await self.say(replier, SWITCHED_OFF, private=True)
        elif not text.strip():
            await self.say(replier, GEN_USAGE, private=True)
        else:
            await self.answer(event, text, replier, settings)

    async def answer(self, event: ChatEvent, text: str, replier: Replier, settings: ChatSettings) -> None:
        """Submit `text` for a reply and send it, or the sentence saying why not."""
        prompt = Prompt(
            self.platform.name,
            event.chat_id,
            event.user_id,
            text,
            event.event_id,
            event.user_name,
            bot_name=self.platform.bot_name,
        )
        typing = await Typing(replier, self.platform.typing_interval_s).start()
        try:
            try:
                ticket = await self.chats.submit(prompt, settings, retry_empty=True)
            except BotkitError as exc:  # refused (busy, rate limited, bad input): no request was made
                await typing.stop()
                await self.say(replier, str(exc))
                await self._mark_seen(event)
                return
            await self.settle(ticket, replier, typing, stream=settings.stream and self._stream_interval_s(event))
        finally:
            await typing.stop()

    def _stream_interval_s(self, event: ChatEvent) -> float | None:
        return self.platform.stream_interval_s if event.is_private else self.platform.group_stream_interval_s

    async def settle(self, ticket: Ticket, replier: Replier, typing: Typing, *, stream: float | None = None) -> None:
        """Wait for the ticket (with queue notices) and deliver its reply or its failure, once. With
        `stream` (seconds between updates), the reply shows while it is written (live_reply.py), unless
        several candidates compete: those are judged whole."""
        notice = Notice()
        live = (
            LiveReply(self.outbox, replier, notice, stream).start(ticket)
            if stream and ticket.params.candidates == 1
            else None
        )
        try:
            reply = await self.outbox.wait(ticket, replier, notice)
            text, kind = (LINES.decode(reply.text), "reply") if reply.text.strip() else (EMPTY_REPLY, "error")
        except BotkitError as exc:  # failed, timed out
            text, kind = str(exc), "error"
        finally:  # botkit stopping leaves what was shown: the answer after the restart edits it (Store.previews)
            if live is not None:
                await live.stop()
        await typing.stop()  # before sending: a late indicator would show again under the reply
        if live is not None and live.messages:
            shown = live.messages
        else:
            shown = [(notice.message_id, notice.text)] if notice.message_id else await self._previews(ticket.request_id)
        await self._deliver(replier, ticket.request_id, text, kind, shown)

    async def _previews(self, request_id: int) -> list[tuple[str, str]]:
        """The messages a reply was streamed into before a restart, to be edited into its answer."""
        return [(message_id, "") for message_id in await self.chats.store.previews(request_id)]

    async def _deliver(
        self, replier: Replier, request_id: int, text: str, kind: str, shown: list[tuple[str, str]] = ()
    ) -> None:
        """Send an answer; a shutdown waits for it to end (a half-sent answer would be recorded half)."""
        delivery = asyncio.ensure_future(self.outbox.deliver(replier, request_id, text, kind, shown))
        self._deliveries.add(delivery)
        delivery.add_done_callback(self._deliveries.discard)
        await asyncio.shield(delivery)

    # -- after a restart ----------------------------------------------------------------------

    async def resume(self) -> None:
        """Answer, once each, this platform's requests accepted before this start and never answered,
        as replies to the original messages."""
        owed = await self.chats.store.owed_answers(self.platform.name, self._resume_up_to)
        if owed:
            log.info("%s: answering %d requests interrupted by the last shutdown", self.platform.name, len(owed))
        results = await asyncio.gather(
            *(self._resume(row, self.replier_for(row["chat_id"], row["platform_message_id"])) for row in owed),
            return_exceptions=True,
        )
        failed = [(row, r) for row, r in zip(owed, results, strict=True) if isinstance(r, BaseException)]
        for row, result in failed:
            log.warning(
                "%s: could not answer request %d after the restart (%s: %s)",
                self.platform.name,
                row["id"],
                type(result).__name__,
                result,
            )
        if not failed:  # the next start looks only at later requests; otherwise it tries these again
            await self.chats.store.settle_owed(self.platform.name, self._resume_up_to)

    async def _resume(self, row: dict, replier: Replier) -> None:
        request_id, status, error = row["id"], row["status"], row["error"] or ""
        if time.time() - row["received_at"] > self.chats.config.conversation.resume_max_age_s:
            await self._deliver(replier, request_id, SORRY, "sorry", await self._previews(request_id))
        elif status == "failed" and error.startswith("interrupted:"):
            ticket = await self.core.rerun(request_id)
            if ticket is None:  # its prompt was erased (/forget): nothing to run again
                await self._deliver(replier, request_id, SORRY, "sorry", await self._previews(request_id))
                return
            typing = await Typing(replier, self.platform.typing_interval_s).start()
            try:
                await self.settle(ticket, replier, typing)
            finally:
                await typing.stop()
        elif status == "done":
            reply = row["reply"] or ""
            await self._deliver(
                replier,
                request_id,
                LINES.decode(reply) if reply.strip() else EMPTY_REPLY,
                "reply" if reply.strip() else "error",
                await self._previews(request_id),
            )
        elif status in ("failed", "cancelled"):
            await self._deliver(replier, request_id, error or SORRY, "error", await self._previews(request_id))
