"""Where text is generated: the Backend interface and the default in-process worker.

The core hands a backend one job at a time (at most `max_batch_size` in flight) and awaits its
completion; the backend batches whatever is in flight. `LocalBackend` runs botkit's engine in its
own thread so the event loop never waits on torch; `botkit.serve.remote.RemoteBackend` sends the same
jobs to an OpenAI-style completions server.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from botkit.errors import GenerationError, ModelLoadError
from botkit.params import SamplingParams

if TYPE_CHECKING:  # torch loads with the worker, not with the core
    from botkit.engine.engine import Engine, Event, Sequence
    from botkit.model.loading import LoadedModel

log = logging.getLogger("botkit")


@dataclass
class Job:
    id: int
    prompt: str
    params: SamplingParams
    on_text: Callable[[str], None] = lambda delta: None  # called on the event loop with each new piece of text
    # Called on the event loop with the whole text so far of a draw that is judged when it ends ("" when
    # it is drawn again): a preview, never the reply; backends that judge nothing never call it.
    on_draft: Callable[[str], None] = lambda text: None


@dataclass
class Completion:
    text: str
    finish_reason: str  # stop | length
    num_prompt_tokens: int
    num_tokens: int
    seed: int | None = None
    first_token_at: float | None = None  # time.time() of the first generated text
    num_draws: int = 0  # samples drawn and judged for it (candidates and redraws; 0: not judged)
    copies: bool = False  # it was sent although it copies (every draw did; it is the least copying)


class Backend(Protocol):
    name: str
    max_batch_size: int  # jobs in flight at once
    max_context: int  # the model window, in tokens

    def count_tokens(self, text: str) -> int: ...

    async def generate(self, job: Job) -> Completion:
        """Run one job; cancelling the awaiting task frees its slot. Raises GenerationError."""
        ...

    async def __aenter__(self) -> Backend: ...

    async def __aexit__(self, *exc) -> None: ...


@dataclass
class _Pending:
    job: Job
    prompt_ids: list[int]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    first_token_at: float | None = None


class LocalBackend:
    """botkit's continuous-batching engine in a worker thread.

    A step that raises (an exception, out of memory) fails only the sequence that causes it: the
    engine runs the step's sequences in smaller groups until the culprit fails alone, while this
    worker keeps reading its inbox (cancellations, timeouts, new jobs) between steps. `before_step`
    is called in the worker with a step's sequences before its forward pass (fault injection in tests).

    Keep torch work off every other long-lived thread: each thread that runs a parallel torch op
    keeps an OpenMP team, and once libgomp manages more threads than there are CPUs it stops
    spinning between parallel regions. Measured on 2 cores: decode 35-40 % slower in this worker
    when the main thread had run torch first (`botkit run` loads the model in a thread that exits).
    """

    def __init__(
        self,
        lm: LoadedModel,
        max_batch_size: int = 32,
        before_step: Callable[[list[Sequence]], None] | None = None,
        cache_mb: int | None = None,
        prepack: bool = True,
    ):
        self.lm = lm
        self.prepack = prepack
        self.name = lm.name
        self.max_batch_size = max_batch_size
        self.max_context = lm.max_context
        self.before_step = before_step
        self.cache_mb = cache_mb
        self.engine: Engine | None = None  # the worker's; read its counters only
        # A fast tokenizer is not safe to share between threads: the event loop counts and encodes
        # with its own copy, and jobs reach the worker as token ids.
        self._tokenizer = copy.deepcopy(lm.tokenizer)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._started = threading.Event()  # the engine is built and warm, or failed (_start_error)
        self._start_error: Exception | None = None
        self._by_seq: dict[int, _Pending] = {}

    def count_tokens(self, text: str) -> int:
        return len(self.encode(text))

    def encode(self, text: str) -> list[int]:
        return self._tokenizer(text, verbose=False).input_ids  # not verbose: long chats are slid, not truncated

    async def __aenter__(self) -> LocalBackend:
        """Returns once the engine is built and warm: until then nothing would be served (/healthz, the
        first reply), and an engine that cannot start stops botkit with its reason."""
        self._thread = threading.Thread(target=self._run, name="botkit-generation", daemon=True)
        self._thread.start()
        await asyncio.to_thread(self._started.wait)
        if self._start_error is not None:
            await asyncio.to_thread(self._thread.join)
            error = self._start_error
            raise ModelLoadError(f"The generation engine could not start ({type(error).__name__}: {error}).")
        return self

    async def __aexit__(self, *exc) -> None:
        self._inbox.put(None)
        await asyncio.to_thread(self._thread.join)

    def is_alive(self) -> bool:
        """Whether the worker thread runs (GET /healthz)."""
        return self._thread is not None and self._thread.is_alive()

    async def generate(self, job: Job) -> Completion:
        loop = asyncio.get_running_loop()
        pending = _Pending(job, self.encode(job.prompt), loop, loop.create_future())
        pending.future.add_done_callback(lambda f: f.cancelled() or f.exception())  # a caller that timed out is gone
        self._inbox.put(("add", pending))
        try:
            return await asyncio.shield(pending.future)
        except asyncio.CancelledError:
            self._inbox.put(("cancel", job.id))
            raise

    async def drop_cached_prefixes(self, request_ids: frozenset[int] = frozenset()) -> None:
        """Drop the engine's kept conversations (their tokens' keys and values), and never keep those
        in flight or the jobs `request_ids` (still queued in the core); returns once done."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._inbox.put(("drop_cache", (loop, done, request_ids)))
        await done

    # -- the worker thread ------------------------------------------------------------------

    def _run(self) -> None:
        import torch

        from botkit.engine.engine import Engine

        torch.set_grad_enabled(False)
        try:
            engine = self.engine = Engine(
                self.lm, self.max_batch_size, cache_mb=self.cache_mb, before_step=self.before_step, prepack=self.prepack
            )
            engine.warm_up()
        except Exception as exc:  # noqa: BLE001 - __aenter__ raises it with botkit's sentence
            self._start_error = exc
            return
        finally:
            self._started.set()
        while True:
            try:
                message = self._inbox.get(block=not engine.has_work)
            except queue.Empty:
                message = ()
            while message is not None:
                if message:
                    self._handle(engine, *message)
                try:
                    message = self._inbox.get_nowait()
                except queue.Empty:
                    break
            if message is None:
                self._fail_all(engine.reset(), "botkit is shutting down")
                return
            if engine.has_work:
                self._step(engine)

    def _handle(self, engine: Engine, kind: str, arg) -> None:
        if kind == "add":
            pending: _Pending = arg
            try:
                engine.add(pending.prompt_ids, pending.job.params, seq_id=pending.job.id)
            except Exception as exc:  # noqa: BLE001 - a bad job fails alone
                self._resolve(pending, error=GenerationError(f"Could not start generating: {exc}."))
                return
            self._by_seq[pending.job.id] = pending
        elif kind == "cancel":
            engine.cancel(arg)
            self._by_seq.pop(arg, None)
        elif kind == "drop_cache":
            loop, done, request_ids = arg
            engine.drop_cached_prefixes(request_ids)
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))

    def _step(self, engine: Engine) -> None:
        try:
            events = engine.step()
        except Exception as exc:  # noqa: BLE001 - a bug outside the model's step: fail what is in flight, keep serving
            log.exception("The generation engine failed; failing the requests in flight.")
            self._fail_all(engine.reset(), f"the generation engine failed ({type(exc).__name__})")
            return
        # One wake-up of each event loop per step, not one per row: at 64 rows, 64 wake-ups a step
        # made the loop thread take the GIL from this one between every pair of torch calls.
        calls: dict[asyncio.AbstractEventLoop, list[Callable[[], None]]] = {}
        for event in events:
            self._deliver(event, calls)
        for loop, todo in calls.items():
            try:
                loop.call_soon_threadsafe(_call_all, todo)
            except RuntimeError:  # the event loop is closed: nobody is waiting any more
                pass

    def _deliver(self, event: Event, calls: dict) -> None:
        pending = self._by_seq.get(event.seq.id)
        if pending is None:
            return
        todo = calls.setdefault(pending.loop, [])
        if event.delta:
            if pending.first_token_at is None:
                pending.first_token_at = time.time()
            todo.append(functools.partial(pending.job.on_text, event.delta))
        if event.draft is not None:
            todo.append(functools.partial(pending.job.on_draft, event.draft))
        if event.finished:
            del self._by_seq[event.seq.id]
            seq = event.seq
            if seq.finish_reason == "error":
                error = GenerationError(f"Generation failed ({seq.error}); please try again.")
                todo.append(functools.partial(_settle, pending.future, error=error))
                return
            judged = seq.result  # the draw a judged request sends (judging.py), or None
            completion = Completion(
                seq.text,
                seq.finish_reason,
                len(seq.prompt_ids),
                judged.num_tokens if judged else len(seq.generated),
                seq.seed,
                pending.first_token_at,
                num_draws=sum(len(m.attempts) for m in (seq.group or [seq])),
                copies=bool(judged and judged.copies),
            )
            todo.append(functools.partial(_settle, pending.future, result=completion))

    def _fail_all(self, seqs: list[Sequence], reason: str) -> None:
        for seq in seqs:
            pending = self._by_seq.pop(seq.id, None)
            if pending:
                self._resolve(pending, error=GenerationError(f"Generation stopped: {reason}."))

    @staticmethod
    def _resolve(pending: _Pending, result: Completion | None = None, error: Exception | None = None) -> None:
        try:
            pending.loop.call_soon_threadsafe(functools.partial(_settle, pending.future, result, error))
        except RuntimeError:  # the event loop is closed: nobody is waiting any more
            pass


def _settle(future: asyncio.Future, result: Completion | None = None, error: Exception | None = None) -> None:
    if not future.done():
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


def _call_all(calls: list[Callable[[], None]]) -> None:
    for call in calls:  # each alone, as separate callbacks were: one that fails does not stop the others
        try:
            call()
        except Exception:  # noqa: BLE001
            log.exception("A reply's callback failed.")
