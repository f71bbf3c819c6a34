"""Soak: load + SIGKILLs + worker faults + a burst + pinging replies + a secret scan, in one run.

    python benchmarks/soak.py --quick      # about 2-3 minutes on 2 CPU cores
    python benchmarks/soak.py              # longer: more kills, longer bursts

The last line is JSON: lost, duplicated, mass_pings and secrets_leaked must all be 0; peak_rss_mb
(the largest process: a bot under kills, or the burst) and recovery_s (restart to ready, the worst)
are the figures RELIABILITY.md quotes. Exit status 1 if any of the four counts is not 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import random
import re
import secrets
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from botkit.backends import Completion, Job
from botkit.config import Config

ROOT = Path(__file__).resolve().parents[1]
PINGS = re.compile(r"@(everyone|here)\b|<@[!&]?\d+>", re.IGNORECASE)


def soak_config(max_queue: int = 64, timeout_s: float = 30.0) -> Config:
    config = Config()
    return dataclasses.replace(
        config,
        batch=dataclasses.replace(config.batch, max_queue=max_queue, timeout_s=timeout_s),
        limits=dataclasses.replace(config.limits, user_per_minute=0, chat_per_minute=0),
        chat=dataclasses.replace(config.chat, length=8),
    )


# -- the bot under kills (a child process) ---------------------------------------------------------

async def child(db: str, run: int, fault_every: int) -> None:
    """A bot under load: prints ACCEPTED <id> as soon as a prompt is accepted, DELIVERED <id> after
    recording its delivery; every `fault_every`-th step raises (a worker fault) until it is killed."""
    import torch
    from transformers import GPT2Config

    from botkit.backends import LocalBackend
    from botkit.core import Core, Prompt
    from botkit.errors import BotkitError, BusyError
    from botkit.models import load_model
    from botkit.store import Store

    torch.set_num_threads(1)
    steps = 0

    def faults(seqs) -> None:
        nonlocal steps
        steps += 1
        if fault_every and steps % fault_every == 0:
            raise torch.OutOfMemoryError("simulated out of memory") if steps % 2 else RuntimeError("simulated fault")

    rng = random.Random(run)
    lm = load_model(GPT2Config(n_layer=2, n_head=2, n_embd=32), device="cpu", seed=0)
    async with Store.open(db) as store, LocalBackend(lm, max_batch_size=8, before_step=faults) as backend, \
            Core(backend, store, soak_config()) as core:
        print("READY", flush=True)

        async def deliver(ticket):
            try:
                reply = await ticket.result()
            except BotkitError:
                return
            if not await core.is_delivered(reply.request_id):
                await core.record_delivery(reply.request_id, [f"msg-{reply.request_id}-{i}" for i in range(1 + reply.request_id % 3)])
                print(f"DELIVERED {reply.request_id}", flush=True)

        tasks, n = set(), 0
        while True:
            n += 1
            try:
                ticket = await core.submit(Prompt("soak", f"chat{n % 5}", f"user{n % 7}", f"message {n} of run {run}", str(n)))
            except BusyError:
                await asyncio.sleep(0.05)
                continue
            print(f"ACCEPTED {ticket.request_id}", flush=True)
            task = asyncio.create_task(deliver(ticket))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            await asyncio.sleep(rng.uniform(0, 0.01))


def ids(text: str, kind: str) -> list[int]:
    return [int(m) for m in re.findall(rf"^{kind} (\d+)$", text, re.MULTILINE)]


def kills(workdir: Path, num_kills: int, seed: int) -> dict:
    rng = random.Random(seed)
    db = workdir / "kills.db"
    accepted, delivered, recovery_s, lost, peak_rss_mb, not_ended = [], [], [], set(), 0.0, 0
    for run in range(num_kills + 1):
        out = workdir / f"run{run}.out"
        started = time.monotonic()
        with out.open("w") as stdout:
            proc = subprocess.Popen([sys.executable, __file__, "--child", str(db), str(run)], stdout=stdout,
                                    stderr=subprocess.DEVNULL, cwd=ROOT)
        while "READY" not in out.read_text():
            if proc.poll() is not None or time.monotonic() - started > 180:
                raise SystemExit(f"the bot did not start (run {run}, exit {proc.returncode})")
            time.sleep(0.05)
        recovery_s.append(time.monotonic() - started)
        with contextlib.closing(sqlite3.connect(db)) as conn:  # after recovery: every earlier prompt has ended
            rows = dict(conn.execute("SELECT id, status FROM requests WHERE status IN ('done', 'failed', 'cancelled')"
                                     " AND (status != 'failed' OR COALESCE(error, '') != '')"))
        lost |= {i for i in accepted if i not in rows}
        deadline = time.monotonic() + rng.uniform(1.0, 4.0)
        while run < num_kills and time.monotonic() < deadline:
            with contextlib.suppress(psutil.Error):
                peak_rss_mb = max(peak_rss_mb, psutil.Process(proc.pid).memory_info().rss / 2**20)
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        text = out.read_text()
        accepted += ids(text, "ACCEPTED")
        delivered += ids(text, "DELIVERED")
        with contextlib.closing(sqlite3.connect(db)) as conn:
            if conn.execute("PRAGMA integrity_check").fetchall() != [("ok",)]:
                raise SystemExit(f"integrity_check failed after kill {run}")
            bad_deliveries = conn.execute("SELECT COUNT(*) FROM (SELECT request_id, COUNT(*) AS n FROM deliveries"
                                          " GROUP BY request_id HAVING n != 1 + request_id % 3)").fetchone()[0]
            statuses = dict(conn.execute("SELECT status, COUNT(*) FROM requests GROUP BY status"))
    return {
        "kills": num_kills, "accepted": len(accepted), "delivered": len(delivered), "statuses": statuses,
        "lost": len(lost) + not_ended,
        "duplicated": (len(accepted) - len(set(accepted))) + (len(delivered) - len(set(delivered))) + bad_deliveries,
        "recovery_s": round(max(recovery_s[1:]), 2), "peak_rss_mb": round(peak_rss_mb),
    }


# -- a burst, pinging replies and a secret scan, in this process -------------------------------------

class PingingBackend:
    """Replies with text that tries to ping everyone; fails prompts that contain FAIL."""

    name = "pinging"
    max_batch_size = 32
    max_context = 1024
    REPLIES = ["@everyone wake up", "hi <@&1234> and <@!42>", "@here " + "x" * 1990 + " @everyone", "<@7>" * 700]

    def count_tokens(self, text: str) -> int:
        return len(text.split()) + 1

    async def generate(self, job: Job) -> Completion:
        await asyncio.sleep(0)
        if "FAIL" in job.prompt:
            raise RuntimeError("simulated worker crash")
        return Completion(self.REPLIES[job.id % len(self.REPLIES)], "stop", 1, 1)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return None


async def burst_and_scan(workdir: Path, num_prompts: int) -> dict:
    import aiohttp
    from botkit.adapters.web_adapter import WebAdapter

    from botkit.config import WebConfig
    from botkit.core import Core, Prompt
    from botkit.errors import BotkitError, BusyError
    from botkit.replies import defuse_mentions, split_reply
    from botkit.store import Store

    key = "sk-" + secrets.token_urlsafe(32)
    log_path = workdir / "soak.log"
    handler = logging.FileHandler(log_path)
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("botkit").setLevel(logging.DEBUG)
    process = psutil.Process()
    peak_rss_mb, max_lag_s, outcomes, replies_sent = process.memory_info().rss / 2**20, 0.0, [], []

    async def heartbeat():
        nonlocal peak_rss_mb, max_lag_s
        while True:
            before = time.monotonic()
            await asyncio.sleep(0.01)
            max_lag_s = max(max_lag_s, time.monotonic() - before - 0.01)
            peak_rss_mb = max(peak_rss_mb, process.memory_info().rss / 2**20)

    async with Store.open(workdir / "burst.db") as store, PingingBackend() as backend, \
            Core(backend, store, soak_config(max_queue=256, timeout_s=60)) as core, \
            WebAdapter(core, WebConfig(port=0), key) as web:
        beating = asyncio.create_task(heartbeat())

        async def one(i: int) -> str:
            text = f"prompt {i}" + (" FAIL" if i % 97 == 0 else "")
            try:
                ticket = await core.submit(Prompt("discord", f"chat{i % 50}", f"user{i}", text, str(i)))
            except BusyError:
                return "busy"
            try:  # a ticket the core never settles would hang its caller: counted as lost
                reply = await asyncio.wait_for(ticket.result(), timeout=90)
            except TimeoutError:
                return "never answered"
            except BotkitError as exc:
                replies_sent.append(str(exc))
                return "failed"
            parts = split_reply(defuse_mentions(reply.text), 2000, 3)
            replies_sent.extend(parts)
            await core.record_delivery(reply.request_id, [f"m{reply.request_id}-{k}" for k in range(len(parts))])
            return "done"

        started = time.monotonic()
        tasks = []
        for i in range(num_prompts):
            tasks.append(asyncio.create_task(one(i)))
            if i % 100 == 99:
                await asyncio.sleep(0)
        outcomes = await asyncio.gather(*tasks)
        burst_s = time.monotonic() - started
        async with aiohttp.ClientSession() as http:
            for headers, body in [({"Authorization": f"Bearer {key}"}, {"prompt": "web FAIL", "max_tokens": 3}),
                                  ({"Authorization": f"Bearer {key}x"}, {"prompt": "hi"}),
                                  ({"Authorization": f"Bearer {key}"}, {"prompt": "hi", "max_tokens": 0})]:
                async with http.post(web.url + "v1/completions", headers=headers, json=body) as response:
                    replies_sent.append(await response.text())
            async with http.get(web.url + "api/stats", headers={"Authorization": f"Bearer {key}"}) as response:
                replies_sent.append(await response.text())
        replies_sent.append(core.stats().summary())
        beating.cancel()
        accepted = sum(1 for o in outcomes if o != "busy")
        stored = (await store._rows("SELECT COUNT(*) FROM requests WHERE status IN ('done', 'failed') AND kind='chat'"))[0][0]
    logging.getLogger().removeHandler(handler)
    handler.close()
    written = [p.read_bytes() for p in workdir.iterdir() if p.name.startswith(("burst.db", "soak.log"))]
    written += [r.encode() for r in replies_sent]
    return {
        "burst_prompts": num_prompts, "burst_answered": outcomes.count("done"), "burst_failed": outcomes.count("failed"),
        "burst_busy": outcomes.count("busy"), "burst_s": round(burst_s, 1), "max_loop_lag_ms": round(max_lag_s * 1000),
        "lost": accepted - stored + outcomes.count("never answered"), "mass_pings": sum(1 for r in replies_sent if PINGS.search(r)),
        "secrets_leaked": sum(blob.count(key.encode()) for blob in written), "burst_peak_rss_mb": round(peak_rss_mb),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="about 2-3 minutes")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--child", nargs=2, metavar=("DB", "RUN"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        asyncio.run(child(args.child[0], int(args.child[1]), fault_every=23))
        return 0
    num_kills, num_prompts = (10, 10_000) if args.quick else (40, 30_000)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="botkit-soak-") as tmp:
        workdir = Path(tmp)
        crash = kills(workdir, num_kills, args.seed)
        print(json.dumps({"kills": crash}), flush=True)
        burst = asyncio.run(burst_and_scan(workdir, num_prompts))
        print(json.dumps({"burst": burst}), flush=True)
    result = {
        "lost": crash["lost"] + burst["lost"],
        "duplicated": crash["duplicated"],
        "mass_pings": burst["mass_pings"],
        "secrets_leaked": burst["secrets_leaked"],
        "peak_rss_mb": max(crash["peak_rss_mb"], burst["burst_peak_rss_mb"]),
        "recovery_s": crash["recovery_s"],
        "kills": num_kills, "accepted_under_kills": crash["accepted"], "burst_busy": burst["burst_busy"],
        "max_loop_lag_ms": burst["max_loop_lag_ms"], "elapsed_s": round(time.monotonic() - started, 1),
    }
    print(json.dumps(result))
    return int(any(result[k] for k in ("lost", "duplicated", "mass_pings", "secrets_leaked")))


if __name__ == "__main__":
    sys.exit(main())
