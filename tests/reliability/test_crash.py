"""Crash safety: a bot process under load is SIGKILLed at random points and restarted, several times.

After each restart every prompt the bot had accepted is done, or failed with a reason; a request id
is never reused (a lost row would be); a reply is never recorded as delivered twice; the SQLite file
passes `PRAGMA integrity_check`. The driver prints `ACCEPTED <id>` as soon as `submit` returns, so
the test knows exactly which prompts the bot promised to keep.
"""

import random
import re
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

NUM_KILLS = 3
SEED = 20240611
READY_TIMEOUT_S = 120.0

DRIVER = """
import asyncio, dataclasses, random, sys
import torch
from transformers import GPT2Config
from botkit.serve.backends import LocalBackend
from botkit.config import Config
from botkit.chat.chats import Chats, Prompt
from botkit.serve.core import Core
from botkit.errors import BotkitError, BusyError
from botkit.model.loading import load_model
from botkit.serve.store import Store


def parts_for(request_id):
    return [f"msg-{request_id}-{i}" for i in range(1 + request_id % 3)]


async def main(db, run):
    torch.set_num_threads(1)  # on a busy 2-core machine more threads only contend (10x slower steps)
    rng = random.Random(run)
    lm = load_model(GPT2Config(n_layer=2, n_head=2, n_embd=32), device="cpu", seed=0)
    config = Config()
    config = dataclasses.replace(
        config,
        limits=dataclasses.replace(config.limits, user_per_minute=0, chat_per_minute=0),
        batch=dataclasses.replace(config.batch, max_queue=64),
        chat=dataclasses.replace(config.chat, length=8),  # short replies: many finish between kills
    )
    async with Store.open(db) as store, LocalBackend(lm, max_batch_size=8) as backend, \
            Core(backend, store, config) as core:
        chats = Chats(core, store, core.config)
        print("READY", flush=True)

        async def deliver(ticket):
            try:
                reply = await ticket.result()
            except BotkitError:
                return
            if not await store.is_delivered(reply.request_id):
                await store.record_delivery(reply.request_id, parts_for(reply.request_id))
                print(f"DELIVERED {reply.request_id}", flush=True)

        tasks = set()
        n = 0
        while True:
            n += 1
            prompt = Prompt("test", f"chat{n % 5}", f"user{n % 7}", f"message {n} of run {run}", message_id=str(n))
            try:
                ticket = await chats.submit(prompt)
            except BusyError:
                await asyncio.sleep(0.05)
                continue
            print(f"ACCEPTED {ticket.request_id}", flush=True)
            task = asyncio.create_task(deliver(ticket))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            await asyncio.sleep(rng.uniform(0, 0.01))


asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


def _lines(path: Path, kind: str) -> list[int]:
    return [int(m.group(1)) for m in re.finditer(rf"^{kind} (\d+)$", path.read_text(), re.MULTILINE)]


def _start(driver: Path, db: Path, out: Path, run: int) -> tuple[subprocess.Popen, float]:
    started = time.monotonic()
    with out.open("w") as stdout:
        proc = subprocess.Popen(
            [sys.executable, str(driver), str(db), str(run)],
            stdout=stdout,
            stderr=subprocess.DEVNULL,
            cwd=Path(__file__).parents[2],
        )
    while "READY" not in out.read_text():
        assert proc.poll() is None, f"the driver exited with {proc.returncode} before it was ready"
        assert time.monotonic() - started < READY_TIMEOUT_S, "the driver never became ready"
        time.sleep(0.05)
    return proc, time.monotonic() - started


def _wait_for(out: Path, kind: str, proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    started = time.monotonic()
    while not _lines(out, kind):
        assert proc.poll() is None, f"the driver exited with {proc.returncode}"
        assert time.monotonic() - started < timeout_s, f"no {kind} line within {timeout_s} s"
        time.sleep(0.05)


def _check_recovered(db: Path, accepted: list[int]) -> dict[str, int]:
    """Every earlier accepted request ended, with a reason if it failed; returns counts by status."""
    with closing(sqlite3.connect(db)) as conn:
        rows = dict(
            conn.execute(
                f"SELECT id, status || '|' || COALESCE(error, '') || '|' || COALESCE(reply, 'NULL') FROM requests"
                f" WHERE id IN ({','.join(map(str, accepted))})"
            )
        )
    missing = set(accepted) - set(rows)
    assert not missing, f"accepted prompts lost after a kill: {sorted(missing)[:10]}"
    counts: dict[str, int] = {}
    for request_id, value in rows.items():
        status, error, reply = value.split("|", 2)
        assert status in ("done", "failed", "cancelled"), f"request {request_id} is still {status} after the restart"
        if status == "failed":
            assert error.strip(), f"request {request_id} failed without a reason"
        if status == "done":
            assert reply != "NULL", f"request {request_id} is done without a reply"
        counts[status] = counts.get(status, 0) + 1
    return counts


def _check_file(db: Path) -> None:
    with closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        per_request = conn.execute(
            "SELECT request_id, COUNT(*), COUNT(DISTINCT part) FROM deliveries GROUP BY request_id"
        ).fetchall()
    for request_id, num_rows, num_parts in per_request:
        assert num_rows == num_parts == 1 + request_id % 3, f"request {request_id} has {num_rows} delivery rows"


def test_sigkill_under_load_loses_nothing(tmp_path):
    rng = random.Random(SEED)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    db = tmp_path / "bot.db"
    accepted: list[int] = []
    delivered: list[int] = []
    statuses: dict[str, int] = {}
    recovery_s = []
    for run in range(NUM_KILLS + 1):
        out = tmp_path / f"run{run}.out"
        proc, ready_s = _start(driver, db, out, run)
        recovery_s.append(ready_s)
        if accepted:  # the restart ran recovery before READY: everything accepted earlier has ended
            statuses = _check_recovered(db, accepted)
        if run < NUM_KILLS:  # under load: once replies are flowing, at a random moment
            _wait_for(out, "DELIVERED", proc)
            time.sleep(rng.uniform(0.0, 1.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if run < NUM_KILLS:
            new = _lines(out, "ACCEPTED")
            assert new, f"run {run} accepted nothing before the kill: the load did not reach the bot"
            accepted += new
            delivered += _lines(out, "DELIVERED")
        _check_file(db)

    assert len(accepted) == len(set(accepted)), "a request id was handed out twice: a committed row was lost"
    assert len(delivered) == len(set(delivered)), "a reply was delivered twice"
    with closing(sqlite3.connect(db)) as conn:
        recorded = {r for (r,) in conn.execute("SELECT DISTINCT request_id FROM deliveries")}
        interrupted = conn.execute("SELECT COUNT(*) FROM requests WHERE error LIKE 'interrupted:%'").fetchone()[0]
    assert set(delivered) <= recorded, "a delivery the bot reported is missing from the store"
    assert interrupted > 0, "no kill hit a request in flight, so recovery was not exercised"
    assert statuses.get("done", 0) > 0, "no accepted request was done before a kill"
    print(
        f"\ncrash: {NUM_KILLS} kills, {len(accepted)} accepted, statuses {statuses}, {len(delivered)} delivered, "
        f"{interrupted} interrupted, restart-to-ready max {max(recovery_s[1:]):.1f} s"
    )
