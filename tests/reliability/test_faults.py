"""Faults inside the bot: a generation step raises, runs out of memory or hangs; the database is locked.

Only the affected requests fail, each with its reason in the store; the others are answered; the
worker keeps serving without a restart. Faults are injected with LocalBackend's `before_step`.
"""

import asyncio
import sqlite3
import threading
import time
from contextlib import closing

import pytest
import torch

from botkit.chat.chats import Chats, Prompt
from botkit.errors import BotkitError, GenerationError, RequestTimeout
from botkit.params import SamplingParams
from botkit.serve.backends import LocalBackend
from botkit.serve.core import Core, Who
from botkit.serve.store import Store

from .conftest import EchoBackend, make_config

pytestmark = pytest.mark.usefixtures("one_thread")


def prompt(text: str, n: int = 0) -> Prompt:
    return Prompt("test", f"chat{n}", f"user{n}", text, message_id=str(n))


class Poison:
    """A `before_step` that raises `error` whenever a sequence whose prompt has `marker` is in the step."""

    def __init__(self, tokenizer, marker: str, error: Exception, times: int = 10**9):
        self.tokenizer, self.marker, self.error, self.times = tokenizer, marker, error, times
        self.num_raised = 0

    def __call__(self, seqs) -> None:
        if self.num_raised < self.times and any(self.marker in self.tokenizer.decode(s.prompt_ids) for s in seqs):
            self.num_raised += 1
            raise self.error


async def row(store: Store, request_id: int) -> dict:
    return await store.request(request_id)


async def settle(tickets):
    return await asyncio.gather(*(t.result() for t in tickets), return_exceptions=True)


@pytest.mark.parametrize(
    "error, reason",
    [
        (RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED"), "RuntimeError"),
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "OutOfMemoryError"),
    ],
)
async def test_a_failing_request_fails_alone_and_the_worker_keeps_serving(tiny_lm, tmp_path, error, reason):
    poison = Poison(tiny_lm.tokenizer, "POISON", error)
    async with (
        Store.open(tmp_path / "bot.db") as store,
        LocalBackend(tiny_lm, max_batch_size=8, before_step=poison) as backend,
        Core(backend, store, make_config()) as core,
    ):
        chats = Chats(core, store, core.config)
        tickets = [await chats.submit(prompt(f"hello number {i}", i)) for i in range(5)]
        bad = await chats.submit(prompt("this one is POISON", 99))
        tickets += [await chats.submit(prompt(f"more text {i}", 10 + i)) for i in range(3)]
        results = await settle([*tickets, bad])

        assert poison.num_raised >= 2, "the fault was not injected (batch, then alone)"
        assert all(not isinstance(r, BaseException) for r in results[:-1]), results
        assert isinstance(results[-1], GenerationError)
        assert reason in str(results[-1])
        assert "Traceback" not in str(results[-1]) and str(results[-1]).endswith(".")
        for ticket in tickets:
            assert (await row(store, ticket.request_id))["status"] == "done"
        failed = await row(store, bad.request_id)
        assert failed["status"] == "failed" and reason in failed["error"]

        after = await (await chats.submit(prompt("and after the fault", 5))).result()  # no restart needed
        assert (await row(store, after.request_id))["status"] == "done"
        assert core.stats().num_failed == 1


@pytest.mark.parametrize("error", [RuntimeError("transient"), torch.OutOfMemoryError("CUDA out of memory")])
async def test_a_step_that_fails_once_is_retried_and_nobody_sees_it(tiny_lm, tmp_path, error):
    poison = Poison(tiny_lm.tokenizer, "hello", error, times=1)
    async with (
        Store.open(tmp_path / "bot.db") as store,
        LocalBackend(tiny_lm, max_batch_size=8, before_step=poison) as backend,
        Core(backend, store, make_config()) as core,
    ):
        chats = Chats(core, store, core.config)
        tickets = [await chats.submit(prompt(f"hello number {i}", i)) for i in range(4)]
        results = await settle(tickets)
        assert poison.num_raised == 1
        assert all(not isinstance(r, BaseException) for r in results), results
        assert [(await row(store, t.request_id))["status"] for t in tickets] == ["done"] * 4


async def test_a_fault_inside_the_forward_pass_loses_none_of_the_prompts_joining(tiny_lm, tmp_path):
    """The model itself raises (a forward pre-hook) in the step that takes the prompts in: each is retried alone."""
    raised = []

    def fail_once(module, args, kwargs):
        if not raised:
            raised.append(True)
            raise RuntimeError("fault inside the forward pass")

    async with (
        Store.open(tmp_path / "bot.db") as store,
        LocalBackend(tiny_lm, max_batch_size=8) as backend,
        Core(backend, store, make_config()) as core,
    ):
        hook = tiny_lm.model.register_forward_pre_hook(fail_once, with_kwargs=True)  # after the engine's warm-up
        try:
            chats = Chats(core, store, core.config)
            tickets = [await chats.submit(prompt(f"hello number {i}", i)) for i in range(4)]
            results = await asyncio.wait_for(settle(tickets), 60)
            assert raised and all(not isinstance(r, BaseException) for r in results), results
            assert [(await row(store, t.request_id))["status"] for t in tickets] == ["done"] * 4
        finally:
            hook.remove()


class FailAfterSteps:
    """Raises once, at the `n`-th step, after the callers have already streamed some text."""

    def __init__(self, n: int):
        self.n, self.num_steps = n, 0

    def __call__(self, seqs) -> None:
        self.num_steps += 1
        if self.num_steps == self.n:
            raise RuntimeError("transient failure mid-generation")


async def test_a_retried_request_streams_exactly_the_reply_it_ends_with(tiny_lm, tmp_path):
    """The streamed deltas joined are the final reply: the retry neither repeats nor changes sent text."""
    async with (
        Store.open(tmp_path / "bot.db") as store,
        LocalBackend(tiny_lm, max_batch_size=4, before_step=FailAfterSteps(6)) as backend,
        Core(backend, store, make_config()) as core,
    ):
        params = SamplingParams(max_new_tokens=20, temperature=1.0)
        tickets = [await core.submit(f"Story {i}:", params, who=Who(user_id=str(i))) for i in range(3)]

        async def streamed(ticket):
            return "".join([d async for d in ticket.stream()])

        texts = await asyncio.gather(*(streamed(t) for t in tickets))
        replies = [await t.result() for t in tickets]
        assert all(r.num_tokens == 20 for r in replies)
        for text, reply in zip(texts, replies, strict=True):
            assert text == reply.text
            assert (await row(store, reply.request_id))["reply"] == text


async def test_a_hang_past_the_timeout_fails_that_request_and_the_bot_recovers(tiny_lm, tmp_path):
    hung = threading.Event()

    def hang_once(seqs):
        if not hung.is_set() and any("HANG" in tiny_lm.tokenizer.decode(s.prompt_ids) for s in seqs):
            hung.set()
            time.sleep(2.0)  # the worker is stuck in this step, past the 1 s timeout

    async with (
        Store.open(tmp_path / "bot.db") as store,
        LocalBackend(tiny_lm, max_batch_size=8, before_step=hang_once) as backend,
        Core(backend, store, make_config(timeout_s=1.0)) as core,
    ):
        chats = Chats(core, store, core.config)
        ticket = await chats.submit(prompt("please HANG here"))
        with pytest.raises(RequestTimeout) as caught:
            await ticket.result()
        assert hung.is_set()
        assert "1 s" in str(caught.value) and str(caught.value).endswith(".")
        failed = await row(store, ticket.request_id)
        assert failed["status"] == "failed" and "No reply within" in failed["error"]

        await asyncio.sleep(1.2)  # the worker finishes the stuck step and drops the cancelled sequence
        later = await (await chats.submit(prompt("are you back?", 1))).result()
        assert (await row(store, later.request_id))["status"] == "done"
        assert core.stats().running == 0


def hold_write_lock(path, seconds: float, locked: threading.Event) -> None:
    """Another process's writer: holds the database's write lock for `seconds`."""
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("BEGIN IMMEDIATE")
        locked.set()
        time.sleep(seconds)
        conn.execute("COMMIT")


@pytest.mark.parametrize("busy_timeout_ms", [5000, 50])  # sqlite's own wait; 50 ms exercises the store's retries
async def test_a_locked_database_delays_writes_and_loses_none(tiny_lm, tmp_path, busy_timeout_ms):
    path = tmp_path / "bot.db"
    async with (
        Store.open(path) as store,
        LocalBackend(tiny_lm, max_batch_size=8) as backend,
        Core(backend, store, make_config()) as core,
    ):
        chats = Chats(core, store, core.config)
        await store.db.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
        locked = threading.Event()
        holder = threading.Thread(target=hold_write_lock, args=(path, 0.4, locked))
        holder.start()
        await asyncio.to_thread(locked.wait)
        started = time.monotonic()
        tickets = await asyncio.gather(*(chats.submit(prompt(f"while locked {i}", i)) for i in range(6)))
        waited_s = time.monotonic() - started
        results = await settle(tickets)
        await asyncio.to_thread(holder.join)

        assert waited_s >= 0.2, "the writes did not wait for the lock: it was not held"
        assert all(not isinstance(r, BaseException) for r in results), results
        ids = [t.request_id for t in tickets]
        assert len(set(ids)) == 6
        assert [(await row(store, i))["status"] for i in ids] == ["done"] * 6


async def test_a_database_locked_for_too_long_is_answered_with_a_sentence(tiny_lm, tmp_path):
    path = tmp_path / "bot.db"
    async with (
        Store.open(path) as store,
        LocalBackend(tiny_lm, max_batch_size=8) as backend,
        Core(backend, store, make_config()) as core,
    ):
        chats = Chats(core, store, core.config)
        await store.db.execute("PRAGMA busy_timeout=10")
        locked = threading.Event()
        holder = threading.Thread(target=hold_write_lock, args=(path, 3.0, locked))
        holder.start()
        await asyncio.to_thread(locked.wait)
        try:
            with pytest.raises(BotkitError):
                await chats.submit(prompt("while locked for a long time"))
        finally:
            await asyncio.to_thread(holder.join)


async def test_a_request_stopped_just_as_it_is_dispatched_is_still_answered(tmp_path):
    async with (
        Store.open(tmp_path / "bot.db") as store,
        EchoBackend() as backend,
        Core(backend, store, make_config()) as core,
    ):
        chats = Chats(core, store, core.config)
        ticket = await chats.submit(prompt("cancel me at the worst moment"))
        while ticket.position() != 0:  # the dispatcher has handed it a task, which has not run yet
            await asyncio.sleep(0)
        ticket.cancel()  # the same happens when its timeout fires at this moment
        with pytest.raises(GenerationError):
            await asyncio.wait_for(ticket.result(), timeout=2.0)
        assert (await row(store, ticket.request_id))["status"] == "cancelled"
        assert core.stats().running == 0
