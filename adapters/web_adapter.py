"""The web adapter: the playground page and an HTTP JSON API (OpenAI-style `/v1/completions`,
`/v1/chat/completions`, `/v1/models`, `/api/stats`, `/api/recent`) and, for people who run bots, `GET /healthz` and
`GET /metrics` (Prometheus), around one core, served by aiohttp.

Safe by default: bound to 127.0.0.1, and it refuses to bind elsewhere without an API key. With a key
every API route needs `Authorization: Bearer <key>`; without one it answers only requests addressed to
localhost (a DNS-rebinding page cannot reach it) and only JSON POSTs (a cross-site form cannot).
Connections are bounded in number and in time (web_connections.py), so idle or half-sent ones cannot
hold the server.

    async with WebAdapter(core, config.web, api_key) as web:
        print(web.url)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hmac
import ipaddress
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web
from botkit.adapters.web_connections import (
    Connections,
    GuardedRequestHandler,
    LogLimiter,
    accept_errors_logged_once,
    usable_connections,
)
from botkit.adapters.web_errors import HTTP_SENTENCES, botkit_error_response, error_response
from botkit.adapters.web_params import CompletionRequest, chat_prompt, parse_chat, parse_completion, parse_playground

from botkit.chat_format import ChatFormat, ReplyDecoder
from botkit.config import WebConfig
from botkit.errors import BotkitError, ConfigError, InputError
from botkit.serve import health
from botkit.serve.core import Who

log = logging.getLogger("botkit.web")

PAGE_PATH = Path(__file__).parent / "static" / "playground.html"
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")
BACKLOG = 128  # connections the kernel queues for us, and the most asyncio accepts at once (aiohttp's default)
LINGER_S = 2.0  # after an early answer (401, 413, 408), read the rest of the body this long, then close


def is_loopback(host: str) -> bool:
    if host.strip("[]") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere


class WebAdapter:
    """Serves the playground and the API on `config.host:config.port` (port 0 picks a free one)."""

    def __init__(self, core, config: WebConfig, api_key: str | None = None, chat_format: ChatFormat | None = None):
        self.core = core
        self.config = config
        self.chat_format = chat_format or ChatFormat()  # a chat run's own; else the documented default
        self.api_key = api_key or None
        self.url = ""
        self.connections = Connections(config.max_connections, config.header_timeout_s)
        self._page = PAGE_PATH.read_bytes()
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.AbstractServer | None = None
        self._exit = contextlib.ExitStack()
        self._streams: set[asyncio.Task] = set()  # open streaming responses, ended on shutdown
        self._metrics = None  # a prometheus_client registry, made at the first scrape

    async def __aenter__(self) -> WebAdapter:
        if not is_loopback(self.config.host) and not self.api_key:
            raise ConfigError(
                f"web.host is {self.config.host!r}, which other machines can reach: set web.api_key_env to an "
                "environment variable holding an API key, or bind to 127.0.0.1."
            )
        # handler_cancellation: a client that hangs up cancels its handler, which cancels its tickets.
        self._runner = web.AppRunner(self.build_app(), shutdown_timeout=2.0, handler_cancellation=True)
        await self._runner.setup()
        loop = asyncio.get_running_loop()
        self.connections.max_connections = usable_connections(self.config.max_connections, BACKLOG)
        limiter = LogLimiter()
        # aiohttp's Server is the documented protocol factory for loop.create_server; this one makes the
        # guarded handler instead of aiohttp's own (aiohttp's TCPSite has no hook for that).
        handler_args = dict(
            loop=loop, access_log=None, keepalive_timeout=self.config.keepalive_timeout_s, lingering_time=LINGER_S
        )
        try:
            self._listener = await loop.create_server(
                functools.partial(
                    GuardedRequestHandler, self._runner.server, self.connections, limiter, **handler_args
                ),
                self.config.host,
                self.config.port,
                backlog=BACKLOG,
            )
        except OSError as exc:
            await self._runner.cleanup()
            raise ConfigError(
                f"The web adapter cannot listen on {self.config.host}:{self.config.port} ({exc.strerror}): "
                "set web.port to a free port."
            ) from None
        self._exit.enter_context(accept_errors_logged_once(self._listener, limiter))
        host, port = self._listener.sockets[0].getsockname()[:2]
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{port}/"
        log.info("Web playground and API at %s", self.url)
        return self

    async def __aexit__(self, *exc_info) -> None:
        for task in list(self._streams):
            task.cancel()
        if self._listener is not None:
            self._listener.close()  # no new connections; the runner closes the open ones
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._listener is not None:
            await self._listener.wait_closed()
            self._listener = None
        self._exit.close()

    def build_app(self) -> web.Application:
        # client_max_size makes aiohttp refuse a bigger body with 413, even one sent chunked.
        app = web.Application(client_max_size=self.config.max_body_bytes, middlewares=[self._errors, self._guard])
        app.router.add_get("/", self.page)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/api/generate", self.generate)
        app.router.add_get("/api/recent", self.recent)
        app.router.add_get("/api/stats", self.stats)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/metrics", self.metrics)
        return app

    # -- middlewares -----------------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        """Every failure becomes `{"error": {"message": <sentence>}}`; a traceback goes to the log only.
        While a request runs, its connection counts as busy (never closed to make room at the cap)."""
        self.connections.request_started(request.protocol)
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            if exc.status == 413:
                message = (
                    f"The request body is over the {self.config.max_body_bytes}-byte limit: send a shorter prompt."
                )
            else:
                message = HTTP_SENTENCES.get(exc.status) or exc.text or exc.reason
            return error_response(exc.status, message, "invalid_request_error", headers=exc.headers)
        except BotkitError as exc:
            return botkit_error_response(exc)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("Unexpected error answering %s %s", request.method, request.path)
            return error_response(500, HTTP_SENTENCES[500], "server_error")
        finally:
            self.connections.request_ended(request.protocol)

    @web.middleware
    async def _guard(self, request: web.Request, handler):
        if request.path == "/":  # the page holds no data; it asks for a key when the API answers 401
            return await handler(request)
        if self.api_key:
            # As bytes: a header may hold any byte (aiohttp keeps non-UTF-8 ones as surrogates).
            given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
            if not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
                raise web.HTTPUnauthorized(headers={"WWW-Authenticate": "Bearer"})
        elif request.host.rsplit(":", 1)[0] not in LOCAL_NAMES:
            raise web.HTTPForbidden(
                text="This server answers only requests addressed to localhost; set web.api_key_env to serve others."
            )
        if request.method == "POST":
            if request.content_type != "application/json":
                raise web.HTTPUnsupportedMediaType(
                    text="Send the body as JSON with the header Content-Type: application/json."
                )
            if (request.content_length or 0) > self.config.max_body_bytes:
                raise web.HTTPRequestEntityTooLarge(
                    max_size=self.config.max_body_bytes, actual_size=request.content_length
                )
        return await handler(request)

    # -- routes ----------------------------------------------------------------------------------

    async def page(self, request: web.Request) -> web.Response:
        return web.Response(body=self._page, content_type="text/html", charset="utf-8")

    async def models(self, request: web.Request) -> web.Response:
        model = {"id": self.model_name, "object": "model", "created": 0, "owned_by": "botkit"}
        return web.json_response({"object": "list", "data": [model]})

    async def stats(self, request: web.Request) -> web.Response:
        stats = self.core.stats()
        return web.json_response({**dataclasses.asdict(stats), "summary": stats.summary()}, dumps=_dumps)

    async def healthz(self, request: web.Request) -> web.Response:
        """200 while every enabled platform is connected and the worker alive; 503 with the reasons otherwise."""
        problems = health.problems(self.core)
        body = {"status": "unhealthy", "problems": problems} if problems else {"status": "ok"}
        return web.json_response(
            {**body, "platforms": self.core.connections.states(), "details": health.details(self.core)},
            status=503 if problems else 200,
        )

    async def metrics(self, request: web.Request) -> web.Response:
        from botkit.serve import prometheus  # prometheus_client loads on the first scrape, not with botkit

        self._metrics = self._metrics or prometheus.registry_for(self.core)
        body, content_type = prometheus.exposition(self._metrics, request.headers.get("Accept", ""))
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def recent(self, request: web.Request) -> web.Response:
        try:
            limit = min(max(int(request.query.get("limit", "20")), 1), 100)
        except ValueError:
            raise InputError("limit must be a whole number from 1 to 100.") from None
        platform = None if self.config.recent_all_platforms else "web"  # private chats stay off the API unless asked
        return web.json_response({"recent": await self.core.recent(limit=limit, platform=platform)}, dumps=_dumps)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        req = parse_completion(await read_json(request, self.config.body_timeout_s), max_n=self.config.max_n)
        tickets = await self._submit(request, req)
        with cancelling(tickets):
            if req.stream:
                return await self._stream_openai(request, req, tickets)
            replies = await asyncio.gather(*(t.result() for t in tickets))
        choices = [
            {"text": r.text, "index": i, "logprobs": None, "finish_reason": finish_reason(r.finish_reason)}
            for i, r in enumerate(replies)
        ]
        body = self._envelope(choices)
        body["usage"] = self._usage(tickets, sum(r.num_tokens for r in replies))
        return web.json_response(body)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        """OpenAI's chat route: the messages in the run's chat format, trimmed oldest first to the
        window, then the assistant's turn; each reply ends at the end of its message."""
        fmt = self.chat_format
        body = await read_json(request, self.config.body_timeout_s)
        messages, req = parse_chat(body, max_n=self.config.max_n, default_stop=(fmt.truncate,) if fmt.truncate else ())
        window = self.core.backend.max_context
        # the local engine slides past the window; a remote one would not
        budget = window - min(req.params.max_new_tokens, window // 2)
        prompt, _ = chat_prompt(messages, fmt, budget, self.core.backend.count_tokens)
        req = dataclasses.replace(req, prompts=(prompt,))
        tickets = await self._submit(request, req)
        with cancelling(tickets):
            if req.stream:
                return await self._stream_chat(request, req, tickets)
            replies = await asyncio.gather(*(t.result() for t in tickets))
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": fmt.decode(r.text)},
                "logprobs": None,
                "finish_reason": finish_reason(r.finish_reason),
            }
            for i, r in enumerate(replies)
        ]
        body = {**self._envelope(choices), "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion"}
        body["usage"] = self._usage(tickets, sum(r.num_tokens for r in replies))
        return web.json_response(body)

    async def _stream_chat(self, request, req: CompletionRequest, tickets: list) -> web.StreamResponse:
        response = await self._open_sse(request)
        envelope = {**self._envelope([]), "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk"}
        decoders = [ReplyDecoder(self.chat_format.line_break) for _ in tickets]
        for index in range(len(tickets)):
            await _send(
                response,
                {
                    **envelope,
                    "choices": [
                        {
                            "index": index,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ],
                },
            )
        num_tokens = 0
        async with contextlib.aclosing(self._sse_events(response, tickets)) as events:
            async for index, kind, value in events:
                if kind == "delta":
                    text = decoders[index].feed(value)
                    if text:
                        await _send(
                            response,
                            {
                                **envelope,
                                "choices": [
                                    {
                                        "index": index,
                                        "delta": {"content": text},
                                        "logprobs": None,
                                        "finish_reason": None,
                                    }
                                ],
                            },
                        )
                    continue
                num_tokens += value.num_tokens
                held = decoders[index].flush()
                delta = {"content": held} if held else {}
                await _send(
                    response,
                    {
                        **envelope,
                        "choices": [
                            {
                                "index": index,
                                "delta": delta,
                                "logprobs": None,
                                "finish_reason": finish_reason(value.finish_reason),
                            }
                        ],
                    },
                )
        if req.include_usage:
            await _send(response, {**envelope, "choices": [], "usage": self._usage(tickets, num_tokens)})
        await response.write(b"data: [DONE]\n\n")
        return response

    async def generate(self, request: web.Request) -> web.StreamResponse:
        """The playground: samples stream as server-sent events, one JSON object per event."""
        req = parse_playground(await read_json(request, self.config.body_timeout_s), max_n=self.config.max_n)
        tickets = await self._submit(request, req)
        with cancelling(tickets):
            response = await self._open_sse(request)
            await _send(response, {"type": "start", "samples": [t.request_id for t in tickets]})
            async with contextlib.aclosing(merge_streams(tickets, self._streams)) as events:
                async for index, kind, value in events:
                    if kind == "delta":
                        await _send(response, {"type": "delta", "index": index, "text": value})
                    elif kind == "waiting":
                        await _send(response, {"type": "waiting", "index": index, "position": value})
                    elif kind == "done":
                        done = {
                            "type": "done",
                            "index": index,
                            "text": value.text,
                            "finish_reason": finish_reason(value.finish_reason),
                            "num_tokens": value.num_tokens,
                            "note": empty_sample_note(value, req.params.stop),
                        }
                        await _send(response, done)
                    else:
                        await _send(response, {"type": "error", "index": index, "message": value})
        await _send(response, {"type": "end"})
        return response

    # -- helpers ---------------------------------------------------------------------------------

    async def _submit(self, request: web.Request, req: CompletionRequest) -> list:
        """One ticket per sample, all or none: a refusal part-way cancels those already queued."""
        tickets = []
        try:
            for prompt, params in req.samples():
                tickets.append(
                    await self.core.submit(
                        prompt, params, who=Who(platform="web", chat_id="web", user_id=request.remote or "web")
                    )
                )
        except BaseException:
            for ticket in tickets:
                ticket.cancel()
            raise
        return tickets

    async def _open_sse(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        return response

    async def _stream_openai(self, request, req: CompletionRequest, tickets: list) -> web.StreamResponse:
        response = await self._open_sse(request)
        envelope = self._envelope([])
        num_tokens = 0
        async with contextlib.aclosing(self._sse_events(response, tickets)) as events:
            async for index, kind, value in events:
                if kind == "delta":
                    choice = {"text": value, "index": index, "logprobs": None, "finish_reason": None}
                else:
                    num_tokens += value.num_tokens
                    choice = {
                        "text": "",
                        "index": index,
                        "logprobs": None,
                        "finish_reason": finish_reason(value.finish_reason),
                    }
                await _send(response, {**envelope, "choices": [choice]})
        if req.include_usage:
            await _send(response, {**envelope, "choices": [], "usage": self._usage(tickets, num_tokens)})
        await response.write(b"data: [DONE]\n\n")
        return response

    async def _sse_events(self, response: web.StreamResponse, tickets: list):
        """The samples' (index, "delta" | "done", text | reply) events; waiting in line and a sample's
        failure are written to the stream here, the same way for every streamed route."""
        async with contextlib.aclosing(merge_streams(tickets, self._streams)) as events:
            async for index, kind, value in events:
                if kind == "waiting":
                    await response.write(b": waiting in line\n\n")  # an SSE comment: clients skip it
                elif kind == "error":
                    await _send(response, {"error": {"message": value, "type": "server_error", "code": 500}})
                else:
                    yield index, kind, value

    @property
    def model_name(self) -> str:
        return self.core.backend.name  # a remote backend learns its name only once started

    def _envelope(self, choices: list) -> dict:
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": choices,
        }

    def _usage(self, tickets: list, completion_tokens: int) -> dict:
        # Each sample's prompt as the core accepted it (lone surrogates replaced), not the raw JSON text,
        # which a tokenizer may refuse after the request was generated and stored.
        # n samples, one prompt
        prompt_tokens = sum(
            k * self.core.backend.count_tokens(p) for p, k in Counter(t.prompt for t in tickets).items()
        )
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }


@contextlib.contextmanager
def cancelling(tickets: list):
    """However the handler ends (a failure, the client hanging up), no sample goes on generating for
    nobody; cancelling a finished ticket does nothing."""
    try:
        yield
    finally:
        for ticket in tickets:
            ticket.cancel()


async def merge_streams(
    tickets: list, registry: set[asyncio.Task], idle_s: float = 1.0
) -> AsyncIterator[tuple[int, str, object]]:
    """(index, "delta", text), (index, "done", Reply) and (index, "error", sentence) from all tickets,
    in the order they happen, and (index, "waiting", place in line) for each queued one after every
    `idle_s` without news (which also keeps idle connections alive). Use it under
    `contextlib.aclosing`, so that a consumer that stops early ends the pumps at once."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, ticket) -> None:
        try:
            async for delta in ticket.stream():
                if delta:
                    queue.put_nowait((index, "delta", delta))
            queue.put_nowait((index, "done", await ticket.result()))
        except BotkitError as exc:
            queue.put_nowait((index, "error", str(exc)))
        except Exception:
            log.exception("Streaming request %s failed", ticket.request_id)
            queue.put_nowait((index, "error", "Generation failed on the server; the details are in its log."))

    pumps = [asyncio.create_task(pump(i, t)) for i, t in enumerate(tickets)]
    this_task = asyncio.current_task()
    registry.add(this_task)
    remaining = len(tickets)
    try:
        while remaining:
            try:
                item = await asyncio.wait_for(queue.get(), idle_s)
            except TimeoutError:
                for index, ticket in enumerate(tickets):
                    if not ticket.done and ticket.position() > 0:
                        yield index, "waiting", ticket.position()
                continue
            remaining -= item[1] not in ("delta", "waiting")  # each ticket ends with one "done" or "error"
            yield item
    finally:
        registry.discard(this_task)
        for task in pumps:
            task.cancel()


async def read_json(request: web.Request, timeout_s: float):
    """The body as JSON; a body that has not arrived whole within `timeout_s` (a client trickling it,
    or a chunked body that never ends) is answered 408, and aiohttp then closes the connection."""
    try:
        async with asyncio.timeout(timeout_s):
            raw = await request.read()  # over client_max_size: HTTPRequestEntityTooLarge, answered 413
    except TimeoutError:
        raise web.HTTPRequestTimeout(headers={"Connection": "close"}) from None
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(
            f"The request body is not valid JSON ({exc.__class__.__name__}): send a JSON object."
        ) from None
    except RecursionError:
        raise InputError(
            "The request body nests arrays or objects too deeply for JSON to read: send a flat JSON object."
        ) from None
    except ValueError:  # an integer of more than sys.get_int_max_str_digits() (4,300) digits
        raise InputError("The request body holds a number too long to read: send ordinary numbers.") from None


async def _send(response: web.StreamResponse, event: dict) -> None:
    await response.write(b"data: " + json.dumps(event).encode() + b"\n\n")


def empty_sample_note(reply, stop: tuple[str, ...]) -> str:
    """Why a playground sample holds no text, as a sentence the page shows under it ("" when it has text)."""
    if reply.text.strip():
        return ""
    if reply.finish_reason == "length":
        return f"The sample is only blank space after {reply.num_tokens} tokens: raise length, or change the prefix."
    ends = f"the truncate text {', '.join(repr(s) for s in stop)} or the end of text" if stop else "the end of text"
    return (
        f"The sample stopped at once: the model's first token was {ends}. Clear truncate, end the prefix where a "
        "text "
        "goes on (a chat-trained run: with a speaker's name and a colon), or sample again."
    )


def finish_reason(reason: str | None) -> str:
    """OpenAI's names: "length" when max_tokens ran out, otherwise "stop" (a stop string or end of text)."""
    return "length" if reason == "length" else "stop"


def _dumps(value) -> str:
    return json.dumps(value, default=str)  # timestamps and paths from the store become strings
