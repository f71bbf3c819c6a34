"""A burst: 10,000 prompts arrive at once. Each is answered or told "busy"; memory stays bounded; the
event loop keeps running (a heartbeat task is never late by much). The backend is a fast fake on the
Backend protocol, so the test measures the core and the store, not the model."""

import asyncio
import time

import psutil

from botkit.chat.chats import Chats, Prompt
from botkit.errors import BusyError
from botkit.serve.backends import Completion, Job
from botkit.serve.core import Core
from botkit.serve.store import Store

from .conftest import EchoBackend, make_config

NUM_PROMPTS = 10_000
MAX_QUEUE = 256
MAX_LAG_S = 2.0  # generous: the machine is shared; a Discord heartbeat tolerates far more
MAX_RSS_GROWTH_MB = 400


class Heartbeat:
    """Wakes every 10 ms and records how late it woke, the queue depth and the process's RSS."""

    def __init__(self, core: Core):
        self.core = core
        self.process = psutil.Process()
        self.max_lag_s = 0.0
        self.max_queue_depth = 0
        self.peak_rss_mb = self.process.memory_info().rss / 2**20

    async def run(self) -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(0.01)
            self.max_lag_s = max(self.max_lag_s, time.monotonic() - before - 0.01)
            self.max_queue_depth = max(self.max_queue_depth, self.core.stats().queue_depth)
            self.peak_rss_mb = max(self.peak_rss_mb, self.process.memory_info().rss / 2**20)


async def test_ten_thousand_prompts_at_once(tmp_path, record_property):
    async with (
        Store.open(tmp_path / "bot.db") as store,
        EchoBackend() as backend,
        Core(backend, store, make_config(max_queue=MAX_QUEUE)) as core,
    ):
        chats = Chats(core, store, core.config)
        heartbeat = Heartbeat(core)
        rss_before_mb = heartbeat.peak_rss_mb
        beating = asyncio.create_task(heartbeat.run())

        async def one(i: int) -> str:
            try:
                ticket = await chats.submit(Prompt("test", f"chat{i % 50}", f"user{i}", f"prompt number {i}", str(i)))
            except BusyError as exc:
                assert str(exc).endswith(".") and "busy" in str(exc)
                return "busy"
            reply = await ticket.result()
            assert reply.text == "ok"
            return f"done {ticket.request_id}"

        started = time.monotonic()
        tasks = []
        for i in range(NUM_PROMPTS):  # all within a few ms, 100 per loop turn as a socket would hand them over
            tasks.append(asyncio.create_task(one(i)))
            if i % 100 == 99:
                await asyncio.sleep(0)
        outcomes = await asyncio.gather(*tasks)
        elapsed_s = time.monotonic() - started
        beating.cancel()
        assert heartbeat.max_queue_depth > 0, "the heartbeat never saw the queue: it did not run during the burst"

        done = [int(o.split()[1]) for o in outcomes if o.startswith("done")]
        num_busy = outcomes.count("busy")
        assert len(done) + num_busy == NUM_PROMPTS
        assert done, "nothing was answered"
        rows = await store._rows("SELECT status, COUNT(*) FROM requests GROUP BY status")
        assert {r[0]: r[1] for r in rows} == {"done": len(done)}, "every accepted prompt is in the store, done"
        assert backend.num_jobs == len(done)

    growth_mb = heartbeat.peak_rss_mb - rss_before_mb
    for key, value in [
        ("accepted", len(done)),
        ("busy", num_busy),
        ("peak_rss_mb", round(heartbeat.peak_rss_mb)),
        ("rss_growth_mb", round(growth_mb)),
        ("max_loop_lag_ms", round(heartbeat.max_lag_s * 1000)),
        ("max_queue_depth", heartbeat.max_queue_depth),
        ("elapsed_s", round(elapsed_s, 1)),
    ]:
        record_property(key, value)
    print(
        f"\nburst: {len(done)} answered, {num_busy} busy, peak RSS {heartbeat.peak_rss_mb:.0f} MB "
        f"(+{growth_mb:.0f}), "
        f"max loop lag {heartbeat.max_lag_s * 1000:.0f} ms, max queue {heartbeat.max_queue_depth}, {elapsed_s:.1f} s"
    )
    assert heartbeat.max_lag_s < MAX_LAG_S
    assert growth_mb < MAX_RSS_GROWTH_MB
    assert heartbeat.max_queue_depth <= MAX_QUEUE, "the queue grew past batch.max_queue"
    assert num_busy > 0, "nobody was told busy: the burst did not fill the queue"


class StuckBackend(EchoBackend):
    """Never finishes a job until `release` is set: whatever arrives meanwhile has to queue."""

    max_batch_size = 2

    def __init__(self):
        super().__init__()
        self.release = asyncio.Event()

    async def generate(self, job: Job) -> Completion:
        await self.release.wait()
        return await super().generate(job)


async def test_concurrent_submits_never_grow_the_queue_past_max_queue(tmp_path):
    async with (
        Store.open(tmp_path / "bot.db") as store,
        StuckBackend() as backend,
        Core(backend, store, make_config(max_queue=10)) as core,
    ):
        chats = Chats(core, store, core.config)
        results = await asyncio.gather(
            *(chats.submit(Prompt("test", "c", f"u{i}", f"hi {i}")) for i in range(100)), return_exceptions=True
        )
        tickets = [r for r in results if not isinstance(r, BaseException)]
        busy = [r for r in results if isinstance(r, BusyError)]
        try:
            assert len(tickets) + len(busy) == 100
            assert core.stats().queue_depth <= 10
            assert len(tickets) <= 10 + backend.max_batch_size
        finally:
            backend.release.set()
            await asyncio.gather(*(t.result() for t in tickets), return_exceptions=True)
