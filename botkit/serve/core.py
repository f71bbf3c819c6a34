"""The async core: accept a prompt, record it, queue it fairly, generate it in batches, answer.

Callers hand `submit` a finished prompt, its sampling parameters and who asked (the web API its
completions, the chat layer its chat prompts, botkit/chat/chats.py) and get a Ticket to await. Nothing
here knows chats: no templates, context, chat settings or chat rate limits. The request is committed to the store
before it is queued; it
ends done, failed (with the reason) or cancelled, in the store and for the caller. A dispatcher task
hands queued requests to the backend, at most `backend.max_batch_size` at once, serving users in turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from botkit.config import Config
from botkit.errors import (
    BotkitError,
    BusyError,
    GenerationError,
    InputError,
    RequestCancelled,
    RequestTimeout,
    StoreUnavailable,
)
from botkit.params import SamplingParams
from botkit.serve.backends import Backend, Job
from botkit.serve.health import Connections
from botkit.serve.metrics import Metrics, Stats
from botkit.serve.scheduler import FairQueue, RateLimiter
from botkit.serve.store import Store

# a prompt longer than this many characters per window token cannot fit: refused before tokenizing it
MAX_CHARS_PER_TOKEN = 64
log = logging.getLogger("botkit")

SETTLE_RETRY_S = 2.0  # how often a settlement the store refused (disk full) is tried again
# The reason stored for a request stopped by a crash (Store.recover) or a shutdown: the conversation
# layer runs such chat requests again after the restart (Store.requeue matches this prefix).
INTERRUPTED = "interrupted: botkit stopped before this finished"


@dataclass(frozen=True)
class Who:
    """Who asked: recorded with the request, and the key its user is served fairly by."""

    platform: str = "api"
    chat_id: str = "api"
    user_id: str = "api"
    user_name: str = ""
    message_id: str | None = None  # the platform's id of the message asking, when there is one


@dataclass(frozen=True)
class Reply:
    request_id: int
    text: str
    finish_reason: str
    num_tokens: int


class Ticket:
    """A queued request: await `result()`, or follow `stream()` or `draft`, ask `position()`, or `cancel()`."""

    def __init__(
        self,
        core: Core,
        request_id: int,
        user_key: tuple,
        prompt: str,
        params: SamplingParams,
        *,
        retry_empty: bool = False,
    ):
        self.request_id = request_id
        self.user_key = user_key
        self.prompt = prompt
        self.params = params
        # a blank sample is drawn again once, in the same slot, before anything is stored
        self.retry_empty = retry_empty
        self.accepted_at = time.monotonic()
        self._core = core
        self._future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._future.add_done_callback(lambda f: f.cancelled() or f.exception())  # an unawaited failure is not an error
        self._deltas: asyncio.Queue[str | None] = asyncio.Queue()
        self.draft = ""  # the reply as written so far, not judged yet (see `draft_changed`)
        self._draft_changed = asyncio.Event()
        self._previewed = False  # the backend sends previews (Job.on_draft): its deltas are judged text only
        self._task: asyncio.Task | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._stop_error: GenerationError | None = None

    @property
    def done(self) -> bool:
        return self._future.done()

    def position(self) -> int:
        """0 while generating (or finished), otherwise 1 + the number of requests served before it."""
        if self._task is not None or self.done:
            return 0
        return self._core._queue.ahead_of(self.user_key, self) + 1

    async def result(self) -> Reply:
        return await asyncio.shield(self._future)

    async def stream(self) -> AsyncIterator[str]:
        """The reply's text piece by piece as it is generated; raises like `result()` on failure."""
        while (delta := await self._deltas.get()) is not None:
            yield delta
        await self.result()

    async def draft_changed(self) -> None:
        """Wait until `draft` changes (it may start over, when a draw is drawn again) or the ticket is done."""
        await self._draft_changed.wait()
        self._draft_changed.clear()

    def cancel(self) -> None:
        self._core._stop(self, RequestCancelled("The request was cancelled."))

    def _on_text(self, delta: str) -> None:
        self._deltas.put_nowait(delta)
        if not self._previewed:
            self._set_draft(self.draft + delta)

    def _on_draft(self, text: str) -> None:
        self._previewed = True
        self._set_draft(text)

    def _set_draft(self, text: str) -> None:
        self.draft = text
        self._draft_changed.set()

    def _settle(self, reply: Reply | None = None, error: BaseException | None = None) -> None:
        if self._timer:
            self._timer.cancel()
        if not self._future.done():
            self._future.set_exception(error) if error else self._future.set_result(reply)
        self._deltas.put_nowait(None)
        self._draft_changed.set()


class Core:
    def __init__(self, backend: Backend, store: Store, config: Config | None = None):
        self.backend = backend
        self.store = store
        self.config = config or Config()
        self._queue: FairQueue[Ticket] = FairQueue(self.config.batch.max_queue)
        self._api_limit = RateLimiter(self.config.limits.api_per_minute)  # completions: trusted local or keyed clients
        self._running: set[Ticket] = set()
        self._arriving = 0  # submits between their queue check and their push
        self._wake = asyncio.Event()
        self._dispatcher: asyncio.Task | None = None
        self.metrics = Metrics()
        self.connections = Connections()  # adapters report whether their platform is connected (GET /healthz)
        self._pending_fails: set[asyncio.Future] = set()
        self._unsettled: list[tuple] = []  # store writes that failed (disk full), retried by _settler
        self._settler: asyncio.Task | None = None
        self._closing = False

    async def __aenter__(self) -> Core:
        interrupted = await self.store.recover()
        if interrupted:
            log.warning(
                "%d requests were interrupted by the last shutdown and are marked so; each chat's adapter"
                " runs its own again (or apologises) once connected.",
                interrupted,
            )
        self._dispatcher = asyncio.create_task(self._dispatch(), name="botkit-dispatcher")
        return self

    async def __aexit__(self, *exc) -> None:
        self._closing = True  # what is stopped now is recorded as interrupted, to be run again after a restart
        self._dispatcher.cancel()
        stopping = BusyError("botkit is shutting down; please try again in a moment.")
        while self._queue:
            self._stop(self._queue.pop(), stopping, queued=True)
        for ticket in list(self._running):
            self._stop(ticket, stopping)
        await asyncio.gather(self._dispatcher, *(t._task for t in self._running if t._task), return_exceptions=True)
        await asyncio.gather(*self._pending_fails)
        if self._settler:
            self._settler.cancel()
            # a last try; what still fails is "interrupted" at the next start
            for write, args, kwargs in self._unsettled:
                with contextlib.suppress(StoreUnavailable):
                    await write(*args, **kwargs)

    # -- accepting work ---------------------------------------------------------------------

    async def submit(
        self,
        prompt: str,
        params: SamplingParams,
        *,
        who: Who = Who(),
        kind: str = "completion",
        message: str | None = None,
        retry_empty: bool = False,
    ) -> Ticket:
        """The one way in: queue `prompt` (BusyError, RateLimitedError, InputError at once). `message` is
        the text the asker wrote when `prompt` was built around it (a chat's template and context). A
        completion (an API client's raw prefix) is bounded and rate-limited here; the chat layer bounds
        and rate-limits chat messages itself. With `retry_empty`, a blank sample is drawn once more in
        the same slot, and the blank one is never stored."""
        if kind == "completion":  # bounded by the model's window in tokens, not by a chat message's characters
            if not isinstance(prompt, str):
                raise InputError("The prompt must be text.")
            prompt = prompt.encode("utf-8", "replace").decode("utf-8")
            window = self.backend.max_context
            if len(prompt) > MAX_CHARS_PER_TOKEN * window or self.backend.count_tokens(prompt) > window:
                raise InputError(f"The prompt is longer than the model's window of {window} tokens: shorten it.")
        with self._queue_place():
            if kind == "completion":
                self._api_limit.check((who.platform, who.user_id), "You're")
            return await self._enqueue(
                kind,
                who,
                message if message is not None else prompt,
                prompt,
                self._with_operator_rules(params),
                retry_empty=retry_empty,
            )

    def _with_operator_rules(self, params: SamplingParams) -> SamplingParams:
        """The config's banned words hold for every request (every chat, the HTTP API, the playground),
        whatever a chat's admins or an API client set."""
        extra = tuple(w for w in self.config.limits.banned_words if w not in params.banned_words)
        return dataclasses.replace(params, banned_words=params.banned_words + extra) if extra else params

    async def drop_cached_prefixes(self) -> None:
        """Drop every conversation the backend keeps for reuse (its tokens' keys and values), and keep
        none of those in flight: /forget erased text they may hold."""
        drop = getattr(self.backend, "drop_cached_prefixes", None)  # only the local engine keeps any
        if drop is not None:
            await drop(frozenset(t.request_id for t in (*self._queue, *self._running)))

    async def rerun(self, request_id: int) -> Ticket | None:
        """Queue again a chat request that a crash or shutdown interrupted, with the prompt it was
        accepted with (it passed admission then: no limits now); None if it is not such a request."""
        if not await self.store.requeue(request_id):
            return None
        row = await self.store.request(request_id)
        params = SamplingParams(**json.loads(row["params"]))
        ticket = Ticket(self, request_id, (row["platform"], row["user_id"]), row["prompt"], params, retry_empty=True)
        self._push(ticket)
        return ticket

    def check_room(self) -> None:
        """BusyError when the queue is full (a caller's early check; `submit` checks again)."""
        if len(self._queue) + self._arriving >= self._queue.max_size:
            raise BusyError(f"I'm busy with {len(self._queue)} requests; please try again in a minute.")

    @contextlib.contextmanager
    def _queue_place(self):
        """Hold a place in the bounded queue while a request is being recorded, so that concurrent
        submits can never push the queue past `batch.max_queue`."""
        self.check_room()
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1

    async def _enqueue(
        self, kind: str, who: Who, text: str, full_prompt: str, params: SamplingParams, *, retry_empty: bool = False
    ) -> Ticket:
        try:
            request_id = await self.store.add_request(
                kind=kind,
                platform=who.platform,
                chat_id=who.chat_id,
                user_id=who.user_id,
                user_name=who.user_name,
                platform_message_id=who.message_id,
                text=text,
                prompt=full_prompt,
                params=dataclasses.asdict(params),
            )
        except StoreUnavailable as exc:  # not recorded, so not accepted: the caller is told why
            log.warning("Could not record a request: %s", exc.__cause__ or exc)
            raise
        ticket = Ticket(self, request_id, (who.platform, who.user_id), full_prompt, params, retry_empty=retry_empty)
        self._push(ticket)
        return ticket

    def _push(self, ticket: Ticket) -> None:
        self._queue.push(ticket.user_key, ticket)
        timeout = RequestTimeout(f"No reply within {self.config.batch.timeout_s:.0f} s; please try again.")
        ticket._timer = asyncio.get_running_loop().call_later(self.config.batch.timeout_s, self._stop, ticket, timeout)
        self._wake.set()

    # -- running work -----------------------------------------------------------------------

    async def _dispatch(self) -> None:
        while True:
            while not self._queue or len(self._running) >= self.backend.max_batch_size:
                self._wake.clear()
                await self._wake.wait()
            ticket = self._queue.pop()
            self._running.add(ticket)
            ticket._task = asyncio.create_task(self._run(ticket), name=f"botkit-request-{ticket.request_id}")
            ticket._task.add_done_callback(lambda task, ticket=ticket: self._ran(ticket))

    def _ran(self, ticket: Ticket) -> None:
        """After a request's task, however it ended; a task cancelled before it started never ran
        `_run`, so its failure is recorded here."""
        self._running.discard(ticket)
        self._wake.set()
        if not ticket.done:
            self._fail_soon(
                ticket, ticket._stop_error or RequestCancelled("botkit stopped before this request finished.")
            )

    def _fail_soon(self, ticket: Ticket, error: BaseException) -> None:
        task = asyncio.ensure_future(self._record_failure(ticket, error))
        self._pending_fails.add(task)
        task.add_done_callback(self._pending_fails.discard)

    async def _run(self, ticket: Ticket) -> None:
        try:
            with contextlib.suppress(StoreUnavailable):  # only a timestamp: generating matters more
                await self.store.mark_running(ticket.request_id)
            job = Job(
                ticket.request_id, ticket.prompt, ticket.params, on_text=ticket._on_text, on_draft=ticket._on_draft
            )
            done = await self.backend.generate(job)
            if ticket.retry_empty and not done.text.strip() and ticket.params.seed is None:
                ticket._set_draft("")  # the blank draw's preview is dropped too
                job = Job(
                    ticket.request_id, ticket.prompt, ticket.params, on_text=ticket._on_text, on_draft=ticket._on_draft
                )
                done = await self.backend.generate(job)
            await self._record(
                self.store.finish,
                ticket.request_id,
                reply=done.text,
                finish_reason=done.finish_reason,
                num_prompt_tokens=done.num_prompt_tokens,
                num_tokens=done.num_tokens,
                seed=done.seed,
                first_token_at=done.first_token_at,
            )
            self.metrics.done(time.monotonic() - ticket.accepted_at, done.num_tokens, ticket.user_key[0])
            if done.num_draws:
                self.metrics.judged(done.num_draws - ticket.params.candidates, done.copies)
            ticket._settle(Reply(ticket.request_id, done.text, done.finish_reason, done.num_tokens))
        except asyncio.CancelledError:
            error = ticket._stop_error or RequestCancelled("botkit stopped before this request finished.")
            await self._record_failure(ticket, error)
        except Exception as exc:  # noqa: BLE001 - every request ends with a recorded reason
            error = (
                exc
                if isinstance(exc, BotkitError)
                else GenerationError(f"Generation failed ({type(exc).__name__}); please try again.")
            )
            if not isinstance(exc, BotkitError):
                log.exception("Request %d failed", ticket.request_id)
            await self._record_failure(ticket, error)

    async def _record_failure(self, ticket: Ticket, error: BaseException) -> None:
        status = "cancelled" if isinstance(error, RequestCancelled) else "failed"
        self.metrics.failed(ticket.user_key[0], status)
        reason = INTERRUPTED if self._closing and status == "failed" else str(error)
        await self._record(self.store.fail, ticket.request_id, reason, status)
        ticket._settle(error=error)

    async def _record(self, write, *args, **kwargs) -> None:
        """Settle a request in the store; when the store cannot write (a full disk), keep retrying in
        the background so that no accepted request stays unsettled, while its caller is answered now."""
        try:
            await write(*args, **kwargs)
        except StoreUnavailable as exc:
            log.error(
                "Could not record the end of request %s (%s); retrying every %.0f s.", args[0], exc, SETTLE_RETRY_S
            )
            self._unsettled.append((write, args, kwargs))
            if self._settler is None or self._settler.done():
                self._settler = asyncio.create_task(self._settle_later(), name="botkit-settle-later")

    async def _settle_later(self) -> None:
        while self._unsettled:
            await asyncio.sleep(SETTLE_RETRY_S)
            write, args, kwargs = self._unsettled[0]
            with contextlib.suppress(StoreUnavailable):
                await write(*args, **kwargs)
                self._unsettled.pop(0)

    def _stop(self, ticket: Ticket, error: GenerationError | BusyError, queued: bool = False) -> None:
        """Cancel or time out a ticket wherever it is."""
        if ticket.done:
            return
        ticket._stop_error = error
        if queued or self._queue.remove(ticket.user_key, ticket):
            self._fail_soon(ticket, error)
        elif ticket._task is not None:
            ticket._task.cancel()  # the backend frees the slot; _run records the failure

    # -- reading ----------------------------------------------------------------------------

    async def recent(self, limit: int = 20, platform: str | None = None) -> list[dict]:
        """The latest requests, newest first; only `platform`'s when it is given."""
        return await self.store.recent(limit, platform)

    @property
    def max_context(self) -> int:
        """The model's window in tokens: a prompt plus its reply fit in it."""
        return self.backend.max_context

    def count_tokens(self, text: str) -> int:
        return self.backend.count_tokens(text)

    def stats(self) -> Stats:
        return self.metrics.snapshot(self.backend.name, len(self._queue), len(self._running))

    def worker_problem(self) -> str | None:
        """Why requests cannot be served now (the dispatcher or the generation worker stopped), or None."""
        if self._dispatcher is None or self._dispatcher.done():
            return "the dispatcher is not running"
        problem = getattr(self.backend, "problem", None)  # an engine botkit runs (vLLM) says why
        if problem is not None and problem():
            return problem()
        is_alive = getattr(self.backend, "is_alive", None)
        if is_alive is not None and not is_alive():
            return "the generation worker has stopped"
        return None
