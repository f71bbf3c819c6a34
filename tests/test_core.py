"""The async core: batching across chats, flow control, fairness, durability, failure isolation."""

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from botkit.chat.chats import Chats, Prompt
from botkit.config import Config
from botkit.engine.engine import Engine
from botkit.errors import (
    BusyError,
    GenerationError,
    InputError,
    ModelLoadError,
    RateLimitedError,
    RequestCancelled,
    RequestTimeout,
)
from botkit.params import SamplingParams
from botkit.serve.backends import LocalBackend
from botkit.serve.core import Core, Who
from botkit.serve.scheduler import FairQueue
from botkit.serve.store import Store


def make_config(**sections):
    config = Config()
    for name, changes in sections.items():
        config = dataclasses.replace(config, **{name: dataclasses.replace(getattr(config, name), **changes)})
    return config


NO_LIMITS = dict(user_per_minute=0, chat_per_minute=0)


@pytest.fixture
async def serve(tiny_lm, tmp_path):
    """serve(config=..., max_batch_size=..., before_step=...) -> (core, store, backend), closed after the test."""
    stack = []

    async def start(config=None, max_batch_size=8, before_step=None):
        store_cm = Store.open(tmp_path / "bot.db")
        store = await store_cm.__aenter__()
        backend = await LocalBackend(tiny_lm, max_batch_size=max_batch_size, before_step=before_step).__aenter__()
        core = await Core(backend, store, config or make_config(limits=NO_LIMITS)).__aenter__()
        stack.append((core, backend, store_cm))
        return core, store, backend

    yield start
    for core, backend, store_cm in reversed(stack):
        await core.__aexit__(None, None, None)
        await backend.__aexit__(None, None, None)
        await store_cm.__aexit__(None, None, None)


def greedy(n, stop=()):
    return SamplingParams(max_new_tokens=n, temperature=0, stop=stop)


def alone(lm, prompt, params):
    engine = Engine(lm, 1)
    seq = engine.add(lm.tokenizer(prompt).input_ids, params)
    while engine.has_work:
        engine.step()
    return seq.text


async def test_chats_share_forward_passes_and_match_single_request_output(serve, tiny_lm):
    passes = []
    core, store, _ = await serve(before_step=lambda rows: passes.append(len(rows)))
    cases = [
        ("Hello there", greedy(12)),
        ("The quick brown fox", greedy(20, ("e",))),
        ("A", greedy(5)),
        ("Once upon a", greedy(16, (" the",))),
    ]
    tickets = [
        await core.submit(p, params, who=Who(chat_id=f"c{i}", user_id=f"u{i}")) for i, (p, params) in enumerate(cases)
    ]
    replies = [await t.result() for t in tickets]
    for (prompt, params), reply in zip(cases, replies, strict=True):
        assert reply.text == alone(tiny_lm, prompt, params)
        assert reply.num_tokens <= params.max_new_tokens
    assert max(passes) > 1  # several chats in one forward pass
    assert len(passes) < sum(r.num_tokens for r in replies)
    rows = [await store.request(t.request_id) for t in tickets]
    assert [r["status"] for r in rows] == ["done"] * 4 and [r["reply"] for r in rows] == [r.text for r in replies]
    assert all(r["started_at"] >= r["received_at"] and r["done_at"] >= r["started_at"] for r in rows)


async def test_chat_prompt_uses_template_and_recent_context_within_the_window(serve):
    core, store, backend = await serve()
    chats = Chats(core, store, core.config)
    await chats.update_settings("tg", "chat", template="<|startoftext|>{message}\n", length=10, truncate="\n")
    first = await (await chats.submit(Prompt("tg", "chat", "u1", "first message"))).result()
    second = await chats.submit(Prompt("tg", "chat", "u1", "second message"))
    await second.result()
    assert second.prompt == f"<|startoftext|>first message\n{first.text}\n<|startoftext|>second message\n"
    await chats.reset_context("tg", "chat")
    third = await chats.submit(Prompt("tg", "chat", "u1", "third"))
    assert third.prompt == "<|startoftext|>third\n"
    long_history = await chats.submit(Prompt("tg", "other", "u1", "x " * 1000))  # over the window: no context fits
    await long_history.result()
    follow = await chats.submit(Prompt("tg", "other", "u1", "next"))
    assert backend.count_tokens(follow.prompt) <= backend.max_context - 10


async def test_queue_full_is_busy_at_once(serve):
    core, _, _ = await serve(make_config(batch=dict(max_queue=3), limits=NO_LIMITS), max_batch_size=1)
    tickets = [await core.submit("hi", greedy(30), who=Who(user_id=f"u{i}")) for i in range(4)]  # 1 running + 3 queued
    await asyncio.sleep(0)
    with pytest.raises(BusyError, match="busy"):
        for i in range(3):
            tickets.append(await core.submit("hi", greedy(30), who=Who(user_id=f"v{i}")))
    for t in tickets:
        await t.result()


async def test_rate_limits_per_user_and_chat(serve):
    core, store, _ = await serve(make_config(limits=dict(user_per_minute=2, chat_per_minute=3)))
    chats = Chats(core, store, core.config)
    await chats.submit(Prompt("d", "c1", "u1", "a"))
    await chats.submit(Prompt("d", "c1", "u1", "b"))
    with pytest.raises(RateLimitedError, match="too fast"):
        await chats.submit(Prompt("d", "c1", "u1", "c"))
    await chats.submit(Prompt("d", "c1", "u2", "d"))
    with pytest.raises(RateLimitedError, match="chat"):
        await chats.submit(Prompt("d", "c1", "u3", "e"))


async def test_empty_and_huge_messages_are_refused_with_a_sentence(serve):
    core, store, _ = await serve()
    chats = Chats(core, store, core.config)
    for text in ["", "   \n\t", "\u200b\u200b", "x" * 5000]:
        with pytest.raises(InputError):
            await chats.submit(Prompt("d", "c", "u", text))
    assert await store.recent() == []  # refused before being accepted


async def test_timeout_fails_the_request_and_frees_its_slot(serve):
    slow = lambda rows: time.sleep(0.05)  # noqa: E731
    core, store, _ = await serve(
        make_config(batch=dict(timeout_s=0.5), limits=NO_LIMITS), max_batch_size=1, before_step=slow
    )
    ticket = await core.submit("hi", greedy(1000))
    queued = await core.submit("hi", greedy(1000), who=Who(user_id="other"))
    with pytest.raises(RequestTimeout):
        await ticket.result()
    with pytest.raises(RequestTimeout):
        await queued.result()
    assert (await store.request(ticket.request_id))["status"] == "failed"
    assert "No reply within" in (await store.request(queued.request_id))["error"]
    quick = await core.submit("hi", greedy(2))
    assert (await quick.result()).num_tokens <= 2  # the slot was freed


async def test_cancel_frees_the_slot_for_the_next_request(serve):
    core, store, _ = await serve(max_batch_size=1, before_step=lambda rows: time.sleep(0.01))
    hog = await core.submit("hi", greedy(2000), who=Who(user_id="a"))
    waiting = await core.submit("hi", greedy(3), who=Who(user_id="b"))
    assert waiting.position() == 1
    await asyncio.sleep(0.2)
    hog.cancel()
    with pytest.raises(RequestCancelled):
        await hog.result()
    assert (await waiting.result()).num_tokens <= 3
    assert (await store.request(hog.request_id))["status"] == "cancelled"


def test_fair_queue_serves_users_in_turn():
    q = FairQueue(100)
    for i in range(10):
        q.push("flooder", f"f{i}")
    q.push("light", "l0")
    q.push("light", "l1")
    assert q.ahead_of("light", "l0") == 1 and q.ahead_of("light", "l1") == 3
    assert [q.pop() for _ in range(5)] == ["f0", "l0", "f1", "l1", "f2"]


async def test_a_flooding_user_does_not_starve_a_light_user(serve):
    order, submitted = [], threading.Event()
    # nothing ends before all arrive
    core, _, _ = await serve(max_batch_size=1, before_step=lambda rows: submitted.wait())
    flood = [await core.submit("hi", greedy(3), who=Who(user_id="flooder")) for _ in range(8)]
    light = await core.submit("hi", greedy(3), who=Who(user_id="light"))
    submitted.set()
    assert light.position() == 2  # behind the running flood request and one more of the flooder's
    for t in [*flood, light]:
        t._future.add_done_callback(lambda f, t=t: order.append(t))
    await asyncio.gather(*(t.result() for t in [*flood, light]))
    assert order.index(light) == 2


async def test_an_engine_that_cannot_start_stops_the_backend_with_its_reason(tiny_lm, monkeypatch):
    def out_of_memory(engine):
        raise MemoryError("cannot allocate 512 MB")

    monkeypatch.setattr(Engine, "warm_up", out_of_memory)
    with pytest.raises(ModelLoadError, match=r"engine could not start \(MemoryError: cannot allocate 512 MB\)"):
        async with LocalBackend(tiny_lm, max_batch_size=2):
            pass


async def test_the_backend_serves_once_its_engine_is_warm(tiny_lm):
    async with LocalBackend(tiny_lm, max_batch_size=2) as backend:
        assert backend.engine is not None and backend.engine.num_forward_passes == 0  # the warm-up is not a step


async def test_a_failing_step_fails_only_its_requests_after_one_retry_alone(serve, tiny_lm):
    poison = tiny_lm.tokenizer(" poison").input_ids

    def before_step(rows):
        if any(s.prompt_ids == poison for s in rows):
            raise RuntimeError("boom")

    core, store, _ = await serve(before_step=before_step)
    bad = await core.submit(" poison", greedy(5), who=Who(user_id="b"))
    same_batch = await core.submit("fine", greedy(5), who=Who(user_id="a"))
    with pytest.raises(GenerationError, match="failed"):
        await bad.result()
    assert (await same_batch.result()).num_tokens >= 1  # retried alone, it succeeded
    row = await store.request(bad.request_id)
    assert row["status"] == "failed" and "RuntimeError" in row["error"]
    after = await core.submit("fine again", greedy(5), who=Who(user_id="a"))
    assert (await after.result()).num_tokens >= 1  # the worker kept serving


async def test_an_out_of_memory_in_a_big_batch_is_retried_alone(serve):
    import torch

    def before_step(rows):
        if len(rows) > 1:
            raise torch.OutOfMemoryError("simulated")

    core, store, _ = await serve(before_step=before_step)
    tickets = [await core.submit(f"x{i}", greedy(4), who=Who(user_id=f"u{i}")) for i in range(3)]
    replies = await asyncio.gather(*(t.result() for t in tickets))
    assert all(r.num_tokens >= 1 for r in replies)


async def test_event_loop_stays_responsive_while_generating(serve):
    core, _, _ = await serve()
    tickets = [await core.submit("Hello", greedy(200), who=Who(user_id=f"u{i}")) for i in range(8)]
    lags = []
    while not all(t.done for t in tickets):
        t0 = time.monotonic()
        await asyncio.sleep(0.01)
        lags.append(time.monotonic() - t0 - 0.01)
    assert len(lags) > 5 and max(lags) < 1.0  # generous: a blocked loop would stall for the whole run


async def test_stream_yields_the_reply_in_pieces(serve):
    core, _, _ = await serve()
    ticket = await core.submit("Hello", greedy(20))
    pieces = [p async for p in ticket.stream()]
    assert "".join(pieces) == (await ticket.result()).text and len(pieces) > 1


async def test_deliveries_are_recorded_once(serve):
    core, store, _ = await serve()
    chats = Chats(core, store, core.config)
    reply = await (await chats.submit(Prompt("d", "c", "u", "hello", message_id="m1"))).result()
    assert not await store.is_delivered(reply.request_id)
    await store.record_delivery(reply.request_id, ["p1", "p2"])
    await store.record_delivery(reply.request_id, ["p1", "p2"])  # a retry records nothing new
    assert await store.is_delivered(reply.request_id)
    rows = await store._rows("SELECT COUNT(*) FROM deliveries")
    assert rows[0][0] == 2


async def test_settings_persist_and_bad_values_are_refused(serve, tmp_path):
    core, store, _ = await serve()
    chats = Chats(core, store, core.config)
    await chats.update_settings("d", "c", temperature="0.3", use_context="off")
    with pytest.raises(InputError, match="top_p"):
        await chats.update_settings("d", "c", top_p="7")
    with contextlib.closing(sqlite3.connect(tmp_path / "bot.db")) as db:  # in the file, for the next start
        (stored,) = db.execute("SELECT settings FROM chats WHERE platform='d' AND chat_id='c'").fetchone()
    assert json.loads(stored) == {"temperature": 0.3, "use_context": False}


DRIVER = textwrap.dedent("""
    import asyncio, sys
    from transformers import GPT2Config
    from botkit.serve.backends import LocalBackend
    from botkit.config import Config
    from botkit.serve.core import Core, Who
    from botkit.model.loading import load_model
    from botkit.params import SamplingParams
    from botkit.serve.store import Store

    async def main():
        lm = load_model(GPT2Config(n_layer=2, n_head=2, n_embd=32), device="cpu")
        async with Store.open(sys.argv[1]) as store, LocalBackend(lm, 4) as backend, \\
                Core(backend, store, Config()) as core:
            tickets = []
            for i in range(40):
                params = SamplingParams(max_new_tokens=200, temperature=0)
                t = await core.submit(f"prompt {i}", params, who=Who(user_id=str(i)))
                print(t.request_id, flush=True)
                tickets.append(t)
            for t in tickets:
                await t.result()
    asyncio.run(main())
""")


async def test_sigkill_mid_load_then_restart_leaves_no_request_unaccounted(tmp_path, tiny_lm):
    db = tmp_path / "bot.db"
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(db)], stdout=subprocess.PIPE, text=True)
    accepted = []
    while len(accepted) < 40:
        line = proc.stdout.readline()
        assert line, "the driver died before accepting its prompts"
        accepted.append(int(line))
    await asyncio.sleep(1.0)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    async with Store.open(db) as store, LocalBackend(tiny_lm, 2) as backend, Core(backend, store, Config()):
        rows = {r["id"]: r for r in await store.recent(limit=100)}
    assert set(accepted) <= set(rows)
    assert all(rows[i]["status"] in ("done", "failed") for i in accepted)
    assert all(rows[i]["error"] for i in accepted if rows[i]["status"] == "failed")
    assert any(rows[i]["status"] == "failed" for i in accepted)  # the kill did interrupt work
    assert sqlite3.connect(db).execute("PRAGMA integrity_check").fetchone() == ("ok",)
