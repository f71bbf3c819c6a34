"""What the web adapter does per connection, where aiohttp offers nothing: a cap on open connections,
a deadline for a new connection's request head, botkit's JSON shape (and one log line, no traceback)
for aiohttp's own refusals of malformed requests, and a log that an accept storm cannot flood.

aiohttp does offer, and the adapter uses, `keepalive_timeout` (idle keep-alive connections),
`lingering_time` and `client_max_size`; the body deadline is the adapter's `read_json`. But aiohttp has
no connection cap, and before 3.14.4 its keep-alive timer started only after a first response, so a
connection that never finished a request head was held forever (slowloris).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import resource
import time
from collections import Counter

from aiohttp import web
from botkit.adapters.web_errors import HTTP_SENTENCES, error_response

log = logging.getLogger("botkit.web")

FD_HEADROOM = 64  # descriptors kept for the database, the model files and the chat platforms' connections


class LogLimiter:
    """At most one log line per `interval_s` for each kind of event, saying how many it held back: a
    flood of bad requests or accept errors must not become a flood of log."""

    def __init__(self, interval_s: float = 10.0):
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._held: Counter[str] = Counter()

    def __call__(self, kind: str, level: int, message: str, *args) -> None:
        now = time.monotonic()
        if now - self._last.get(kind, -self.interval_s) < self.interval_s:
            self._held[kind] += 1
            return
        self._last[kind] = now
        if held := self._held.pop(kind, 0):
            message, args = message + " (and %d more since the last such line)", (*args, held)
        log.log(level, message, *args)


class Connections:
    """The open connections: new (no request yet), busy (in a request) and idle (between requests).

    At the cap a new connection closes one from the address that holds the most: its oldest new one
    (it has sent nothing useful), else the one idle longest, as nginx reuses idle connections. So one
    address flooding the server churns only its own connections, and a client elsewhere still gets in;
    when every connection is busy the new one is refused. A new connection that has not sent a whole
    request head within `header_timeout_s` is closed."""

    def __init__(self, max_connections: int, header_timeout_s: float):
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        self._new: dict[web.RequestHandler, asyncio.TimerHandle] = {}  # insertion order: oldest first
        self._idle: dict[web.RequestHandler, None] = {}  # insertion order: idle longest first
        self._busy: set[web.RequestHandler] = set()
        self._peer: dict[web.RequestHandler, str] = {}
        self._per_peer: Counter[str] = Counter()
        self.counts: Counter[str] = Counter()  # closed at the cap, refused, past the head deadline

    def __len__(self) -> int:
        return len(self._peer)

    def admit(self, conn: web.RequestHandler, peer: str) -> bool:
        if len(self) >= self.max_connections:
            victim = self._victim()
            if victim is None:
                self.counts["refused"] += 1
                return False
            self.counts["closed_at_cap"] += 1
            self.forget(victim)
            victim.force_close()
        self._new[conn] = asyncio.get_running_loop().call_later(self.header_timeout_s, self._expire, conn)
        self._peer[conn] = peer
        self._per_peer[peer] += 1
        return True

    def _victim(self) -> web.RequestHandler | None:
        """The oldest new, else the longest-idle connection of the busiest address (of any address if
        all of that one's are busy); None when every connection is busy."""
        busiest, _ = self._per_peer.most_common(1)[0]
        for pool in (self._new, self._idle):
            for conn in pool:
                if self._peer[conn] == busiest:
                    return conn
        return next(iter(self._new), None) or next(iter(self._idle), None)

    def _expire(self, conn: web.RequestHandler) -> None:
        if conn in self._new:
            self.counts["head_too_slow"] += 1
            self.forget(conn)
            conn.force_close()

    def request_started(self, conn) -> None:
        if conn in self._new:
            self._new.pop(conn).cancel()
        elif conn not in self._idle:
            return  # not one of ours (aiohttp's test server), or already closed
        self._idle.pop(conn, None)
        self._busy.add(conn)

    def request_ended(self, conn) -> None:
        if conn in self._busy:
            self._busy.discard(conn)
            self._idle[conn] = None

    def forget(self, conn) -> None:
        if (timer := self._new.pop(conn, None)) is not None:
            timer.cancel()
        self._idle.pop(conn, None)
        self._busy.discard(conn)
        if (peer := self._peer.pop(conn, None)) is not None:
            self._per_peer[peer] -= 1
            if not self._per_peer[peer]:
                del self._per_peer[peer]


def _refusal() -> bytes:
    """A 503 in botkit's shape, written straight to the socket: a refused connection has sent no
    request yet, so there is nothing for aiohttp to answer."""
    body = json.dumps({"error": {"message": HTTP_SENTENCES[503], "type": "server_busy", "code": 503}}).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nRetry-After: 5\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


REFUSAL = _refusal()


class GuardedRequestHandler(web.RequestHandler):
    """aiohttp's connection handler, admitted by `Connections`, answering its own refusals (a malformed
    request line, header or chunk) in botkit's JSON shape with one log line instead of a traceback."""

    def __init__(self, manager: web.Server, connections: Connections, limiter: LogLimiter, **handler_args):
        super().__init__(manager, **handler_args)
        self._connections = connections
        self._limiter = limiter
        self._admitted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        if not self._connections.admit(self, str(peer[0]) if peer else ""):
            transport.write(REFUSAL)
            transport.close()
            return
        self._admitted = True
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._admitted:
            self._connections.forget(self)
            super().connection_lost(exc)

    def handle_error(self, request, status: int = 500, exc: BaseException | None = None, message: str | None = None):
        if request.writer.output_size > 0:  # as aiohttp does: a response under way cannot be replaced
            raise ConnectionError("Response is sent already, cannot send another response with the error message")
        if status >= 500:
            log.error("Unexpected error answering %s %s", request.method, request.path, exc_info=exc)
            sentence = HTTP_SENTENCES[500]
        else:  # the client's fault: no traceback, and not its bytes, which may hold its key
            self._limiter(
                "malformed",
                logging.INFO,
                "Refused a malformed HTTP request from %s (%s)",
                request.remote,
                type(exc).__name__ if exc else status,
            )
            sentence = HTTP_SENTENCES.get(status, HTTP_SENTENCES[400])
        response = error_response(status, sentence)
        response.force_close()
        return response


def usable_connections(max_connections: int, backlog: int) -> int:
    """`max_connections`, or fewer if this process cannot open enough files (ulimit -n); past that limit
    every accept fails and asyncio stops accepting for a second, which is worse than a cap. The soft
    limit is first raised as far as the hard one allows, as Go's runtime does (Linux's usual soft limit
    is 1024). Room is kept for an accept batch (up to `backlog` connections), whose descriptors open
    before those of the connections it closes are freed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_connections + FD_HEADROOM + 2 * backlog
    if soft != resource.RLIM_INFINITY and soft < wanted:
        raised = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
    if soft == resource.RLIM_INFINITY or max_connections <= soft - FD_HEADROOM - backlog:
        return max_connections
    usable = max(16, soft - FD_HEADROOM - backlog)
    log.warning(
        "web.max_connections is %d but this process may open only %d files (ulimit -n, hard limit): serving at "
        "most %d connections; raise the limit to serve more.",
        max_connections,
        soft,
        usable,
    )
    return usable


@contextlib.contextmanager
def accept_errors_logged_once(server: asyncio.AbstractServer, limiter: LogLimiter):
    """While it lasts, asyncio's 'socket.accept() out of system resource' for `server`'s sockets (logged
    with a traceback for every attempt, up to a backlog's worth per second) becomes one line per interval."""
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    fds = {sock.fileno() for sock in server.sockets}

    def handler(loop: asyncio.AbstractEventLoop, context: dict) -> None:
        sock = context.get("socket")
        if str(context.get("message", "")).startswith("socket.accept()") and sock is not None and sock.fileno() in fds:
            exc = context.get("exception")
            limiter(
                "accept",
                logging.WARNING,
                "The web adapter cannot accept new connections (%s): raise the "
                "open-file "
                "limit (ulimit -n) or lower web.max_connections.",
                getattr(exc, "strerror", None) or exc,
            )
        elif previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
    try:
        yield
    finally:
        loop.set_exception_handler(previous)
