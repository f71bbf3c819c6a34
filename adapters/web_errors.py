"""botkit's one error shape over HTTP, `{"error": {"message": <sentence>, "type": ..., "code": ...}}`,
for every refusal: the routes', the middlewares' and aiohttp's own (a malformed request, a connection
over the cap), so no client ever sees a plain-text page or a traceback."""

from __future__ import annotations

from aiohttp import web

from botkit.errors import BotkitError, BusyError, InputError, RateLimitedError, RequestTimeout

# (status, OpenAI error type) per error class; the first match wins, so subclasses come first.
ERROR_STATUS = (
    (InputError, 400, "invalid_request_error"),
    (RateLimitedError, 429, "rate_limit_error"),
    (BusyError, 503, "server_busy"),
    (RequestTimeout, 504, "timeout"),
    (BotkitError, 500, "server_error"),
)
HTTP_SENTENCES = {
    400: "The request is not valid HTTP/1.1: check its request line, headers and body framing.",
    401: "This server needs an API key: send the header Authorization: Bearer <key>.",
    404: "There is nothing at this path: the API is POST /v1/completions, GET /v1/models and GET /api/stats.",
    405: "This path does not accept that method: see the API routes on the playground page.",
    408: "The request body did not arrive in time: send it whole, at once.",
    500: "The server failed to answer this request; the details are in its log.",
    503: "The server has too many open connections right now; please try again in a moment.",
}


def error_response(status: int, message: str, kind: str | None = None, headers=None) -> web.Response:
    keep = {k: v for k, v in (headers or {}).items() if k in ("WWW-Authenticate", "Retry-After", "Allow")}
    kind = kind or ("server_error" if status >= 500 else "invalid_request_error")
    body = {"error": {"message": message, "type": kind, "code": status}}
    return web.json_response(body, status=status, headers=keep)


def botkit_error_response(exc: BotkitError) -> web.Response:
    for cls, status, kind in ERROR_STATUS:
        if isinstance(exc, cls):
            headers = {"Retry-After": "5"} if status in (429, 503) else None
            return error_response(status, str(exc), kind, headers)
    raise AssertionError("BotkitError is the last row of ERROR_STATUS")
