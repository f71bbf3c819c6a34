"""Connections a hostile client holds open: idle ones, half-sent heads and bodies, more of them than
the server should keep, and a process out of file descriptors. A real web adapter on 127.0.0.1 with an
API key, driven over raw sockets (what slowloris does) and aiohttp's client (what a keyed caller does)."""

import asyncio
import contextlib
import dataclasses
import logging
import os
import resource
import socket
import time

import aiohttp
from botkit.adapters.web_adapter import WebAdapter
from botkit.adapters.web_connections import Connections

from botkit.config import WebConfig
from botkit.serve.backends import Completion, Job
from botkit.serve.core import Core
from botkit.serve.store import Store

from .conftest import EchoBackend, make_config

KEY = "connections-test-key-0123456789"
KEYED = {"Authorization": f"Bearer {KEY}"}
POST_HEAD = (
    b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer "
    + KEY.encode()
    + b"\r\nContent-Type: application/json\r\n"
)


class GatedBackend(EchoBackend):
    """Answers only while `gate` is set, so requests can be kept busy."""

    def __init__(self):
        super().__init__()
        self.gate = asyncio.Event()
        self.gate.set()

    async def generate(self, job: Job) -> Completion:
        await self.gate.wait()
        return await super().generate(job)


@contextlib.asynccontextmanager
async def serving(tmp_path, backend=None, **web):
    config = make_config()
    web_config = dataclasses.replace(WebConfig(port=0), **web)
    async with (
        Store.open(tmp_path / "bot.db") as store,
        backend or EchoBackend() as backend,
        Core(backend, store, config) as core,
        WebAdapter(core, web_config, KEY) as adapter,
    ):
        host, port = adapter.url.removeprefix("http://").rstrip("/").rsplit(":", 1)
        yield adapter, (host, int(port))


async def closed_after(reader: asyncio.StreamReader, limit_s: float) -> tuple[float, bytes]:
    """(seconds until the server closed the connection, what it sent before), or (inf, ...) if it did not."""
    started, received = time.monotonic(), b""
    try:
        async with asyncio.timeout(limit_s):
            while chunk := await reader.read(65536):
                received += chunk
    except TimeoutError:
        return float("inf"), received
    except ConnectionResetError:
        pass
    return time.monotonic() - started, received


async def keyed_completion(http: aiohttp.ClientSession, url: str) -> int:
    async with http.post(url + "v1/completions", json={"prompt": "hello", "max_tokens": 2}, headers=KEYED) as response:
        await response.read()
        return response.status


async def test_idle_and_half_sent_connections_are_closed(tmp_path):
    """Bug 3: idle sockets, slowloris heads, trickled and endless chunked bodies were held forever."""
    async with serving(tmp_path, header_timeout_s=0.5, body_timeout_s=0.5, keepalive_timeout_s=0.5) as (web, address):
        opened = [await asyncio.open_connection(*address) for _ in range(5)]
        (idle, _), (slow_head, slow_head_w), (slow_body, slow_body_w), (chunked, chunked_w), (kept, kept_w) = opened
        slow_head_w.write(b"GET /api/stats HTTP/1.1\r\nHost: local")  # and then a byte every 0.1 s, never the end
        slow_body_w.write(POST_HEAD + b"Content-Length: 100\r\n\r\n" + b'{"prompt": ')
        chunked_w.write(POST_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + b"1\r\n{\r\n")
        kept_w.write(
            b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer " + KEY.encode() + b"\r\n\r\n"
        )

        async def trickle(writer, piece: bytes):
            with contextlib.suppress(ConnectionError):
                while not writer.is_closing():
                    await asyncio.sleep(0.1)
                    writer.write(piece)

        tricklers = [
            asyncio.create_task(trickle(slow_head_w, b"h")),
            asyncio.create_task(trickle(chunked_w, b"1\r\n \r\n")),
        ]
        idle_s, nothing = await closed_after(idle, 5)
        head_s, nothing_either = await closed_after(slow_head, 5)
        body_s, body_answer = await closed_after(slow_body, 5)
        chunked_s, chunked_answer = await closed_after(chunked, 5)
        kept_s, kept_answer = await closed_after(kept, 5)
        for task in tricklers:
            task.cancel()
        for _, writer in opened:
            writer.close()

    assert idle_s < 3 and nothing == b"", "a connection that never sends a request is held"
    assert head_s < 3 and nothing_either == b"", "a head sent a byte at a time is held"
    for waited, answer in ((body_s, body_answer), (chunked_s, chunked_answer)):
        assert waited < 3, "a body that never arrives whole is held"
        assert (
            answer.startswith(b"HTTP/1.1 408") and b'"error": {"message": "The request body did not arrive' in answer
        ), answer
    assert kept_s < 3 and kept_answer.startswith(b"HTTP/1.1 200"), "an idle keep-alive connection is held"


async def test_over_the_cap_the_longest_idle_connections_close_and_keyed_clients_get_through(tmp_path):
    async with (
        serving(tmp_path, max_connections=8, header_timeout_s=60) as (web, address),
        aiohttp.ClientSession() as http,
    ):
        idle = [await asyncio.open_connection(*address) for _ in range(20)]
        await asyncio.sleep(0.2)
        statuses = [await keyed_completion(http, web.url) for _ in range(5)]
        closed = [await closed_after(reader, 0.05) for reader, _ in idle]
        for _, writer in idle:
            writer.close()
    assert statuses == [200] * 5
    num_open = sum(1 for waited, _ in closed if waited == float("inf"))
    assert num_open <= 8 - 1, f"{num_open} idle connections kept open beside the keyed client's, over the cap of 8"
    assert closed[0][0] < float("inf") and closed[-1][0] == float("inf"), "the oldest idle connections close first"


async def test_when_every_connection_is_busy_a_new_one_gets_a_503_sentence(tmp_path):
    backend = GatedBackend()
    backend.gate.clear()
    async with serving(tmp_path, backend, max_connections=2) as (web, address), aiohttp.ClientSession() as http:
        busy = [asyncio.create_task(keyed_completion(http, web.url)) for _ in range(2)]
        while len(web.core._running) < 2:
            await asyncio.sleep(0.01)
        reader, writer = await asyncio.open_connection(*address)
        waited, answer = await closed_after(reader, 5)
        writer.close()
        backend.gate.set()
        statuses = await asyncio.gather(*busy)
    assert waited < 5 and answer.startswith(b"HTTP/1.1 503"), answer
    assert b"application/json" in answer and b"too many open connections" in answer and b"Retry-After" in answer
    assert statuses == [200, 200], "the busy requests were cut off"


async def test_accept_errors_are_logged_once_not_per_attempt(tmp_path, caplog):
    """Out of file descriptors, asyncio logs 'socket.accept() out of system resource' with a traceback
    for every attempt (a 99.6 MB log in 35 s); the adapter says it once per interval, in one line."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    async with serving(tmp_path) as (web, address), aiohttp.ClientSession() as http:
        clients = [socket.socket() for _ in range(30)]
        for client in clients:
            client.setblocking(False)
        try:
            # no fd left to accept with
            resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) - 1, hard))
            for client in clients:
                client.connect_ex(address)
            await asyncio.sleep(2.5)  # asyncio retries the accept every second
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            for client in clients:
                client.close()
        assert await keyed_completion(http, web.url) == 200, "the server did not recover once descriptors were free"
    records = [r for r in caplog.records if "accept" in r.getMessage().lower()]
    assert records, "the accept errors were not logged at all"
    assert len(records) <= 2 and not any(r.exc_info for r in records), [r.getMessage() for r in records]
    assert all(r.levelno >= logging.WARNING for r in records)


async def test_a_low_soft_open_file_limit_is_raised_to_serve_max_connections(tmp_path):
    """Linux's usual soft limit (1024) is below what 512 connections and an accept batch need; running
    out of descriptors stops every accept (see above), so the adapter raises it, up to the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (300, hard))
        async with serving(tmp_path, max_connections=512) as (web, _):
            raised, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
            usable = web.connections.max_connections
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert usable == 512 and raised >= 512 + 64 + 128, (usable, raised)


class FakeConnection:
    """Stands in for aiohttp's RequestHandler: Connections only ever calls force_close()."""

    def __init__(self, name: str):
        self.name, self.closed = name, False

    def force_close(self):
        self.closed = True


async def test_at_the_cap_the_address_holding_the_most_gives_way():
    """A flood from one address churns its own connections: a newcomer from anywhere closes the oldest
    new connection of the address holding the most, never another address's, and a busy one never."""
    connections = Connections(max_connections=4, header_timeout_s=60)
    client = FakeConnection("client, new")
    assert connections.admit(client, "10.0.0.1")
    flood = [FakeConnection(f"flood {i}") for i in range(3)]
    for conn in flood:
        assert connections.admit(conn, "10.0.0.2")
    connections.request_started(flood[0])  # busy: never closed to make room

    assert connections.admit(FakeConnection("flood 3"), "10.0.0.2")
    assert connections.admit(FakeConnection("another client"), "10.0.0.3")
    assert [c.name for c in (client, *flood) if c.closed] == ["flood 1", "flood 2"]

    for conn in (client, *flood):
        connections.forget(conn)
    assert len(connections) == 2
