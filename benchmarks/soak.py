"""Soak: load, SIGKILLs, worker faults, a burst, pinging replies, a secret scan and a connection attack.

    python benchmarks/soak.py --quick      # about 2-4 minutes on 2 CPU cores
    python benchmarks/soak.py              # longer: more kills, longer bursts and attacks
    python benchmarks/soak.py --quick --only-connections   # the connection attack alone, about 1 minute
    python benchmarks/soak.py --quick --only-poison        # the poisoned request alone, about 1 minute
    python benchmarks/soak.py --quick --only-privacy       # /forget under load and a reader, about 30 s

The last line is JSON: lost, duplicated, mass_pings and secrets_leaked must all be 0; peak_rss_mb
(the largest process: a bot under kills, or the burst) and recovery_s (restart to ready, the worst)
are the figures RELIABILITY.md quotes. The connection phase adds keyed_p99_ratio (a keyed client's p99
latency under 300 idle sockets and 20 slowloris connections over its idle value, the bot allowed 1024
open files; goal <= 2), keyed_p99_ratio_over_capacity (the same attack on a bot allowed only 256),
keyed_failed and log_growth_bytes (goal <= 1 MB). The poison phase adds innocent_p99_ratio (the p99
latency of 31 requests sent with one that breaks every step it is in, over the same 32 without it;
goal <= 1.2) and innocent_failed. The privacy phase (`--only-privacy` alone, about 30 s) runs a
member's /forget while 8 requests quoting their message are generating and a second connection holds
a read transaction, then searches the raw bytes of the database, its WAL and the engine's prefix
cache for the message's secret: privacy_hits_db, privacy_hits_wal and privacy_hits_cache must be 0
(forget_max_s: the command's time; wal_clear_max_s: from the reader letting go until the secret has
left the files). Exit status 1 if any of the four counts, keyed_failed, innocent_failed or a privacy
hit is not 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import random
import re
import resource
import secrets
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from botkit.config import Config
from botkit.serve.backends import Completion, Job

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

    from botkit.chat.chats import Chats, Prompt
    from botkit.errors import BotkitError, BusyError
    from botkit.model.loading import load_model
    from botkit.serve.backends import LocalBackend
    from botkit.serve.core import Core
    from botkit.serve.store import Store

    torch.set_num_threads(1)
    steps = 0

    def faults(seqs) -> None:
        nonlocal steps
        steps += 1
        if fault_every and steps % fault_every == 0:
            raise torch.OutOfMemoryError("simulated out of memory") if steps % 2 else RuntimeError("simulated fault")

    rng = random.Random(run)
    lm = load_model(GPT2Config(n_layer=2, n_head=2, n_embd=32), device="cpu", seed=0)
    async with (
        Store.open(db) as store,
        LocalBackend(lm, max_batch_size=8, before_step=faults) as backend,
        Core(backend, store, soak_config()) as core,
    ):
        chats = Chats(core, store, core.config)
        print("READY", flush=True)

        async def deliver(ticket):
            try:
                reply = await ticket.result()
            except BotkitError:
                return
            if not await store.is_delivered(reply.request_id):
                await store.record_delivery(
                    reply.request_id, [f"msg-{reply.request_id}-{i}" for i in range(1 + reply.request_id % 3)]
                )
                print(f"DELIVERED {reply.request_id}", flush=True)

        tasks, n = set(), 0
        while True:
            n += 1
            try:
                ticket = await chats.submit(
                    Prompt("soak", f"chat{n % 5}", f"user{n % 7}", f"message {n} of run {run}", str(n))
                )
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
            proc = subprocess.Popen(
                [sys.executable, __file__, "--child", str(db), str(run)],
                stdout=stdout,
                stderr=subprocess.DEVNULL,
                cwd=ROOT,
            )
        while "READY" not in out.read_text():
            if proc.poll() is not None or time.monotonic() - started > 180:
                raise SystemExit(f"the bot did not start (run {run}, exit {proc.returncode})")
            time.sleep(0.05)
        recovery_s.append(time.monotonic() - started)
        with contextlib.closing(sqlite3.connect(db)) as conn:  # after recovery: every earlier prompt has ended
            rows = dict(
                conn.execute(
                    "SELECT id, status FROM requests WHERE status IN ('done', 'failed', 'cancelled')"
                    " AND (status != 'failed' OR COALESCE(error, '') != '')"
                )
            )
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
            bad_deliveries = conn.execute(
                "SELECT COUNT(*) FROM (SELECT request_id, COUNT(*) AS n FROM deliveries"
                " GROUP BY request_id HAVING n != 1 + request_id % 3)"
            ).fetchone()[0]
            statuses = dict(conn.execute("SELECT status, COUNT(*) FROM requests GROUP BY status"))
    return {
        "kills": num_kills,
        "accepted": len(accepted),
        "delivered": len(delivered),
        "statuses": statuses,
        "lost": len(lost) + not_ended,
        "duplicated": (len(accepted) - len(set(accepted))) + (len(delivered) - len(set(delivered))) + bad_deliveries,
        "recovery_s": round(max(recovery_s[1:]), 2),
        "peak_rss_mb": round(peak_rss_mb),
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

    from botkit.chat.chats import Chats, Prompt
    from botkit.chat.replies import defuse_mentions, split_reply
    from botkit.config import WebConfig
    from botkit.errors import BotkitError, BusyError
    from botkit.serve.core import Core
    from botkit.serve.store import Store

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

    async with (
        Store.open(workdir / "burst.db") as store,
        PingingBackend() as backend,
        Core(backend, store, soak_config(max_queue=256, timeout_s=60)) as core,
        WebAdapter(core, WebConfig(port=0), key) as web,
    ):
        chats = Chats(core, store, core.config)
        beating = asyncio.create_task(heartbeat())

        async def one(i: int) -> str:
            text = f"prompt {i}" + (" FAIL" if i % 97 == 0 else "")
            try:
                ticket = await chats.submit(Prompt("discord", f"chat{i % 50}", f"user{i}", text, str(i)))
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
            await store.record_delivery(reply.request_id, [f"m{reply.request_id}-{k}" for k in range(len(parts))])
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
            for headers, body in [
                ({"Authorization": f"Bearer {key}"}, {"prompt": "web FAIL", "max_tokens": 3}),
                ({"Authorization": f"Bearer {key}x"}, {"prompt": "hi"}),
                ({"Authorization": f"Bearer {key}"}, {"prompt": "hi", "max_tokens": 0}),
            ]:
                async with http.post(web.url + "v1/completions", headers=headers, json=body) as response:
                    replies_sent.append(await response.text())
            async with http.get(web.url + "api/stats", headers={"Authorization": f"Bearer {key}"}) as response:
                replies_sent.append(await response.text())
        replies_sent.append(core.stats().summary())
        beating.cancel()
        accepted = sum(1 for o in outcomes if o != "busy")
        stored = (
            await store._rows("SELECT COUNT(*) FROM requests WHERE status IN ('done', 'failed') AND kind='chat'")
        )[0][0]
    logging.getLogger().removeHandler(handler)
    handler.close()
    written = [p.read_bytes() for p in workdir.iterdir() if p.name.startswith(("burst.db", "soak.log"))]
    written += [r.encode() for r in replies_sent]
    return {
        "burst_prompts": num_prompts,
        "burst_answered": outcomes.count("done"),
        "burst_failed": outcomes.count("failed"),
        "burst_busy": outcomes.count("busy"),
        "burst_s": round(burst_s, 1),
        "max_loop_lag_ms": round(max_lag_s * 1000),
        "lost": accepted - stored + outcomes.count("never answered"),
        "mass_pings": sum(1 for r in replies_sent if PINGS.search(r)),
        "secrets_leaked": sum(blob.count(key.encode()) for blob in written),
        "burst_peak_rss_mb": round(peak_rss_mb),
    }


# -- connections: idle sockets and slowloris against a keyed web API ---------------------------------

# The bot's open-file limits (ulimit -n, soft and hard) the attack meets: Linux's usual 1024, where the default
# web.max_connections (512) holds all 320 attackers; and a container's 256, which 320 attackers exceed.
MAX_FILES = (1024, 256)
KEY_ENV = "BOTKIT_SOAK_WEB_KEY"


class QuickBackend(PingingBackend):
    """A few milliseconds per request, like a short reply from a small model, so latency has a floor."""

    async def generate(self, job: Job) -> Completion:
        await asyncio.sleep(0.005)
        return Completion("a quick reply", "stop", 1, 3)


async def web_child(db: str, log_path: str) -> None:
    """The bot under attack (a child process, its open files limited by the parent): a keyed web API
    with default web settings, logging everything to `log_path`; prints URL <url> when serving."""
    from botkit.adapters.web_adapter import WebAdapter

    from botkit.config import WebConfig, secret
    from botkit.serve.core import Core
    from botkit.serve.store import Store

    logging.basicConfig(filename=log_path, level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    async with (
        Store.open(db) as store,
        QuickBackend() as backend,
        Core(backend, store, soak_config(max_queue=256)) as core,
        WebAdapter(core, WebConfig(port=0), secret(KEY_ENV, "the soak's web key")) as web,
    ):
        print(f"URL {web.url}", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent closes stdin
        logging.getLogger("botkit").info("Connections at the end: %s", dict(web.connections.counts))


async def keyed_clients(url: str, key: str, seconds: float, num_clients: int = 4) -> tuple[list[float], dict]:
    """`num_clients` callers asking one short completion after another for `seconds`, each on a new
    connection (like curl or a cron job): latencies in seconds and the failures by kind."""
    latencies, failures = [], {}
    deadline = time.monotonic() + seconds

    async def client():
        import aiohttp

        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True), timeout=aiohttp.ClientTimeout(total=30)
        ) as http:
            while time.monotonic() < deadline:
                started = time.monotonic()
                try:
                    async with http.post(
                        url + "v1/completions",
                        json={"prompt": "hello", "max_tokens": 3},
                        headers={"Authorization": f"Bearer {key}"},
                    ) as response:
                        await response.read()
                        failure = None if response.status == 200 else f"HTTP {response.status}"
                except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                    failure = type(exc).__name__
                if failure:
                    failures[failure] = failures.get(failure, 0) + 1
                else:
                    latencies.append(time.monotonic() - started)

    await asyncio.gather(*(client() for _ in range(num_clients)))
    return latencies, failures


# the attack comes from another address than the keyed clients (127.0.0.1), as from another machine
ATTACKER_ADDRESS = "127.0.0.2"


async def attacker(address: tuple[str, int], stop: asyncio.Event, counts: dict, slowloris: bool) -> None:
    """One hostile connection, opened again as soon as the server closes it: idle (sends nothing) or
    slowloris (a request head that never ends, one header line a second)."""
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection(*address, local_addr=(ATTACKER_ADDRESS, 0))
        except OSError:
            counts["connect_failed"] += 1
            await asyncio.sleep(0.1)
            continue
        try:
            if slowloris:
                writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\n")
            while not stop.is_set():
                try:
                    if not await asyncio.wait_for(reader.read(4096), 1.0):
                        counts["closed_by_server"] += 1
                        break
                except TimeoutError:
                    if slowloris:
                        writer.write(b"X-Slow: 1\r\n")
        except OSError:
            counts["closed_by_server"] += 1
        finally:
            writer.close()


async def attack_child(host: str, port: int, num_idle: int, num_slowloris: int) -> None:
    """The attack, in its own process as on its own machine: runs until stdin closes, then prints its
    counts as JSON."""
    stop, counts = asyncio.Event(), {"connect_failed": 0, "closed_by_server": 0}
    attackers = [
        asyncio.create_task(attacker((host, port), stop, counts, slowloris=i < num_slowloris))
        for i in range(num_idle + num_slowloris)
    ]
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    stop.set()
    await asyncio.gather(*attackers)
    print(json.dumps(counts), flush=True)


async def connection_phase(
    workdir: Path, seconds: float, max_files: int, num_idle: int = 300, num_slowloris: int = 20
) -> dict:
    """Keyed clients alone, then the same clients while `num_idle` idle sockets and `num_slowloris`
    slowloris connections (reconnecting whenever closed) attack a bot that may open `max_files` files:
    the clients' p99 latencies and failures, and how much the bot's log grew during the attack."""
    key = "sk-" + secrets.token_urlsafe(32)
    log_path = workdir / f"web-{max_files}.log"

    def limit_files():  # soft and hard: botkit raises a low soft limit itself
        resource.setrlimit(resource.RLIMIT_NOFILE, (max_files, max_files))

    bot = subprocess.Popen(
        [sys.executable, __file__, "--web-child", str(workdir / f"web-{max_files}.db"), str(log_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
        env={**os.environ, KEY_ENV: key},
        preexec_fn=limit_files,
        text=True,
    )
    attack = None
    try:
        line = await asyncio.wait_for(asyncio.to_thread(bot.stdout.readline), 120)
        if not line.startswith("URL "):
            raise SystemExit(f"the web bot did not start (exit {bot.poll()})")
        url = line.split()[1]
        host, port = url.removeprefix("http://").rstrip("/").rsplit(":", 1)
        idle_latencies, idle_failed = await keyed_clients(url, key, seconds)
        log_before = log_path.stat().st_size
        attack = subprocess.Popen(
            [sys.executable, __file__, "--attack-child", host, port, str(num_idle), str(num_slowloris)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=ROOT,
            text=True,
        )
        await asyncio.sleep(2.0)  # let every attacker connect
        attack_latencies, attack_failed = await keyed_clients(url, key, seconds)
        log_growth = log_path.stat().st_size - log_before
        counts = json.loads(attack.communicate(input="", timeout=60)[0])
    finally:
        for proc in (p for p in (attack, bot) if p is not None):
            if proc.poll() is None:
                proc.stdin.close()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
    # no answer at all under attack (main before this phase existed): an infinite p99
    p99_idle, p99_attack = (
        statistics.quantiles(x, n=100)[98] if len(x) > 1 else float("inf") for x in (idle_latencies, attack_latencies)
    )
    return {
        "attack": f"{num_idle} idle + {num_slowloris} slowloris from {ATTACKER_ADDRESS}; the bot may open {max_files} "
        "files",
        "keyed_p99_ms_idle": round(p99_idle * 1000, 1),
        "keyed_p99_ms_attack": round(p99_attack * 1000, 1),
        "keyed_p50_ms_attack": round(statistics.median(attack_latencies) * 1000, 1) if attack_latencies else None,
        "keyed_p99_ratio": round(p99_attack / p99_idle, 2),
        "keyed_answered": [len(idle_latencies), len(attack_latencies)],
        "keyed_failed": sum(idle_failed.values()) + sum(attack_failed.values()),
        "keyed_failures": {**idle_failed, **attack_failed},
        "log_growth_bytes": log_growth,
        "attack_connections_closed_by_server": counts["closed_by_server"],
        "attack_connects_failed": counts["connect_failed"],
        "server_log_tail": log_path.read_text(errors="replace").strip().splitlines()[-1:],
    }


class PoisonStep:
    """A `before_step` that raises whenever the poisoned request is in the step (what a request that
    breaks the batch, such as a top_k past 2^63 before it was refused at the edge, did)."""

    def __init__(self):
        self.num_raised = 0

    def __call__(self, seqs) -> None:
        if any(s.params.seed == POISON_SEED for s in seqs):
            self.num_raised += 1
            raise RuntimeError("poisoned batch")


POISON_SEED = 666
PRIVACY_HITS = ("privacy_hits_db", "privacy_hits_wal", "privacy_hits_cache")


async def poison_arm(lm, workdir: Path, poisoned: bool, num_requests: int = 32) -> dict:
    """`num_requests` at once through the real Core; with `poisoned`, one of them breaks every step it is in."""
    from botkit.params import SamplingParams
    from botkit.serve.backends import LocalBackend
    from botkit.serve.core import Core, Who
    from botkit.serve.store import Store

    db = workdir / f"poison-{poisoned}-{time.monotonic_ns()}.db"
    async with (
        Store.open(db) as store,
        LocalBackend(lm, 32, before_step=PoisonStep() if poisoned else None) as backend,
        Core(backend, store, soak_config(max_queue=256, timeout_s=120)) as core,
    ):
        started = time.perf_counter()

        async def one(i: int) -> tuple[bool, float, bool]:
            bad = poisoned and i == num_requests // 2
            params = SamplingParams(max_new_tokens=40, temperature=0.8, seed=POISON_SEED if bad else i)
            ticket = await core.submit(f"Request {i}: tell me a fortune.", params, who=Who(user_id=str(i)))
            try:
                await ticket.result()
                return bad, time.perf_counter() - started, True
            except Exception:  # noqa: BLE001 - counted
                return bad, time.perf_counter() - started, False

        results = await asyncio.gather(*(one(i) for i in range(num_requests)))
    innocent = [(t, ok) for bad, t, ok in results if not bad]
    latencies = sorted(t for t, _ in innocent)
    return {
        "innocent_p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "innocent_failed": sum(not ok for _, ok in innocent),
        "poison_failed": any(bad and not ok for bad, _, ok in results),
    }


def poison_phase(workdir: Path, rounds: int) -> dict:
    """Innocent requests' p99 latency with one poisoned request among 32 over the same without it,
    arms alternating, the median of `rounds` pairs (the bundled demo model: real weights, small)."""
    from botkit.model.loading import load_model

    lm = load_model(device="cpu")
    ratios, failed, poison_failed = [], 0, True
    for _ in range(rounds):
        clean = asyncio.run(poison_arm(lm, workdir, poisoned=False))
        dirty = asyncio.run(poison_arm(lm, workdir, poisoned=True))
        ratios.append(dirty["innocent_p99_s"] / clean["innocent_p99_s"])
        failed += clean["innocent_failed"] + dirty["innocent_failed"]
        poison_failed &= dirty["poison_failed"]
    return {
        "innocent_p99_ratio": round(statistics.median(ratios), 3),
        "innocent_p99_ratios": [round(r, 3) for r in ratios],
        "innocent_failed": failed,
        "poison_failed_alone": poison_failed,
    }


# -- privacy: /forget with requests in flight and a concurrent reader ---------------------------------


async def privacy_round(lm, workdir: Path, round_no: int, num_in_flight: int = 8, reader_hold_s: float = 1.0) -> dict:
    """One member's message (with a fresh secret) is answered; others' requests quoting it as context
    are generating and a second connection holds a read transaction (a backup tool) when the member's
    /forget runs (Chats.forget, what the command calls); then the reader lets go. Counts the secret's
    hits in the raw bytes of the database and its WAL, and in the engine's prefix cache (decoded)."""
    from botkit.chat.chats import Chats, Prompt
    from botkit.params import ChatSettings
    from botkit.serve.backends import LocalBackend
    from botkit.serve.core import Core
    from botkit.serve.store import Store

    db = workdir / f"privacy-{round_no}.db"
    secret = f"PRIVATE-{secrets.token_hex(8)}"
    settings = ChatSettings(length=24, unique=False)
    async with (
        Store.open(db) as store,
        LocalBackend(lm, 32, cache_mb=256) as backend,
        Core(backend, store, soak_config(max_queue=256, timeout_s=120)) as core,
    ):
        chats = Chats(core, store, core.config)
        said = await chats.submit(
            Prompt("telegram", "-100", "alice", f"my door code is {secret}", "m0", "alice"), settings
        )
        await said.result()
        others = [
            await chats.submit(
                Prompt("telegram", "-100", f"member{i}", f"what did alice say? ({i})", f"m{i + 1}", f"member{i}"),
                settings,
            )
            for i in range(num_in_flight)
        ]
        reader = sqlite3.connect(db)
        reader.execute("BEGIN")
        reader.execute("SELECT COUNT(*) FROM messages").fetchone()  # holds its snapshot until it ends
        in_flight = sum(not t.done for t in others)
        on_disk_before = any(
            secret.encode() in p.read_bytes() for p in workdir.glob(f"privacy-{round_no}.db*") if p.is_file()
        )
        cached_before = any(
            secret in lm.tokenizer.decode(e.tokens) for e in backend.engine.prefix_cache.entries.values()
        )
        started = time.perf_counter()
        erased = await chats.forget("telegram", "-100", "alice")
        forget_s = time.perf_counter() - started
        await asyncio.sleep(reader_hold_s)
        reader.rollback()
        reader.close()
        released = time.perf_counter()
        for ticket in others:
            with contextlib.suppress(Exception):
                await ticket.result()
        wal_clear_s = None
        while time.perf_counter() - released < 30:
            if not any(
                secret.encode() in p.read_bytes() for p in workdir.glob(f"privacy-{round_no}.db*") if p.is_file()
            ):
                wal_clear_s = time.perf_counter() - released
                break
            await asyncio.sleep(0.05)
        cached = [lm.tokenizer.decode(e.tokens) for e in backend.engine.prefix_cache.entries.values()]
        hits = {
            "db": db.read_bytes().count(secret.encode()),
            "wal": db.with_name(db.name + "-wal").read_bytes().count(secret.encode())
            if db.with_name(db.name + "-wal").exists()
            else 0,
            "cache": sum(text.count(secret) for text in cached),
        }
    return {
        "erased": erased,
        "in_flight": in_flight,
        "before": on_disk_before and cached_before,
        "forget_s": forget_s,
        "wal_clear_s": wal_clear_s,
        "hits": hits,
        "num_cached": len(cached),
    }


def privacy_phase(workdir: Path, rounds: int) -> dict:
    """`rounds` privacy rounds on the bundled demo model; 0 hits is the goal."""
    from botkit.model.loading import load_model

    lm = load_model(device="cpu")
    results = [asyncio.run(privacy_round(lm, workdir, i)) for i in range(rounds)]
    return {
        "privacy_rounds": rounds,
        "privacy_hits_db": sum(r["hits"]["db"] for r in results),
        "privacy_hits_wal": sum(r["hits"]["wal"] for r in results),
        "privacy_hits_cache": sum(r["hits"]["cache"] for r in results),
        "forget_max_s": round(max(r["forget_s"] for r in results), 3),
        "wal_clear_max_s": None
        if any(r["wal_clear_s"] is None for r in results)
        else round(max(r["wal_clear_s"] for r in results), 3),
        "in_flight_at_forget": [r["in_flight"] for r in results],
        "erased": [r["erased"] for r in results],
        "secret_on_disk_and_cached_before": all(r["before"] for r in results),
    }  # else 0 hits would prove nothing


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="about 2-4 minutes")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--child", nargs=2, metavar=("DB", "RUN"), help=argparse.SUPPRESS)
    parser.add_argument("--web-child", nargs=2, metavar=("DB", "LOG"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--attack-child", nargs=4, metavar=("HOST", "PORT", "IDLE", "SLOWLORIS"), help=argparse.SUPPRESS
    )
    parser.add_argument("--only-connections", action="store_true", help="run only the connection phase")
    parser.add_argument("--only-poison", action="store_true", help="run only the poison phase")
    parser.add_argument("--only-privacy", action="store_true", help="run only the privacy phase")
    args = parser.parse_args()
    if args.child:
        asyncio.run(child(args.child[0], int(args.child[1]), fault_every=23))
        return 0
    if args.web_child:
        asyncio.run(web_child(*args.web_child))
        return 0
    if args.attack_child:
        host, port, num_idle, num_slowloris = args.attack_child
        asyncio.run(attack_child(host, int(port), int(num_idle), int(num_slowloris)))
        return 0
    num_kills, num_prompts, attack_s = (10, 10_000, 12.0) if args.quick else (40, 30_000, 60.0)
    if args.only_poison:
        with tempfile.TemporaryDirectory(prefix="botkit-soak-") as tmp:
            print(json.dumps({"poison": poison_phase(Path(tmp), rounds=3 if args.quick else 7)}), flush=True)
        return 0
    if args.only_privacy:
        with tempfile.TemporaryDirectory(prefix="botkit-soak-") as tmp:
            privacy = privacy_phase(Path(tmp), rounds=3 if args.quick else 10)
        print(json.dumps({"privacy": privacy}), flush=True)
        return int(any(privacy[k] for k in PRIVACY_HITS))
    if args.only_connections:
        with tempfile.TemporaryDirectory(prefix="botkit-soak-") as tmp:
            for max_files in MAX_FILES:
                print(
                    json.dumps({"connections": asyncio.run(connection_phase(Path(tmp), attack_s, max_files))}),
                    flush=True,
                )
        return 0
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="botkit-soak-") as tmp:
        workdir = Path(tmp)
        crash = kills(workdir, num_kills, args.seed)
        print(json.dumps({"kills": crash}), flush=True)
        burst = asyncio.run(burst_and_scan(workdir, num_prompts))
        print(json.dumps({"burst": burst}), flush=True)
        poison = poison_phase(workdir, rounds=3 if args.quick else 7)
        print(json.dumps({"poison": poison}), flush=True)
        privacy = privacy_phase(workdir, rounds=3 if args.quick else 10)
        print(json.dumps({"privacy": privacy}), flush=True)
        connections = []
        for max_files in MAX_FILES:
            connections.append(asyncio.run(connection_phase(workdir, attack_s, max_files)))
            print(json.dumps({"connections": connections[-1]}), flush=True)
    result = {
        "lost": crash["lost"] + burst["lost"],
        "duplicated": crash["duplicated"],
        "mass_pings": burst["mass_pings"],
        "secrets_leaked": burst["secrets_leaked"],
        "peak_rss_mb": max(crash["peak_rss_mb"], burst["burst_peak_rss_mb"]),
        "recovery_s": crash["recovery_s"],
        "kills": num_kills,
        "accepted_under_kills": crash["accepted"],
        "burst_busy": burst["burst_busy"],
        "max_loop_lag_ms": burst["max_loop_lag_ms"],
        "innocent_p99_ratio": poison["innocent_p99_ratio"],
        "innocent_failed": poison["innocent_failed"],
        # the first: at the usual limit; the over-capacity run's p99 is in its own line
        "keyed_p99_ratio": connections[0]["keyed_p99_ratio"],
        "keyed_p99_ratio_over_capacity": connections[1]["keyed_p99_ratio"],
        "keyed_failed": sum(c["keyed_failed"] for c in connections),
        **{k: privacy[k] for k in (*PRIVACY_HITS, "forget_max_s", "wal_clear_max_s")},
        "log_growth_bytes": max(c["log_growth_bytes"] for c in connections),
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    print(json.dumps(result))
    return int(
        any(
            result[k]
            for k in (
                "lost",
                "duplicated",
                "mass_pings",
                "secrets_leaked",
                "keyed_failed",
                "innocent_failed",
                *PRIVACY_HITS,
            )
        )
    )


if __name__ == "__main__":
    sys.exit(main())
