"""A small fake Telegram Bot API server on 127.0.0.1 for end-to-end tests with the real
python-telegram-bot client (reached through `base_url`).

It speaks the Bot API's wire format (form-encoded parameters whose non-string values are JSON,
answers `{"ok": true, "result": ...}`), keeps the chats' messages, long-polls getUpdates with
offsets, can POST updates to a webhook, records every request, and can be scripted to answer
429 with `parameters.retry_after`, a 5xx, or to drop the connection.

    async with FakeTelegram() as fake:
        fake.push_message(chat_id=-100, text="hi @botkit_bot")
        [call] = await fake.wait_for("sendMessage")
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

# Parameters that are plain strings on the wire; every other value is JSON (numbers, objects, lists).
_STRING_PARAMS = {"text", "action", "parse_mode", "url", "secret_token", "description", "caption"}
_ENTITY = re.compile(r"(?<!\w)(/[A-Za-z0-9_]+(?:@\w+)?|@\w{3,})")
_ADMIN_RIGHTS = (
    "can_be_edited",
    "is_anonymous",
    "can_manage_chat",
    "can_delete_messages",
    "can_manage_video_chats",
    "can_restrict_members",
    "can_promote_members",
    "can_change_info",
    "can_invite_users",
    "can_post_stories",
    "can_edit_stories",
    "can_delete_stories",
)


@dataclass
class Call:
    """One request the bot made: the method as the client spelled it, its decoded parameters,
    what the fake answered ("pending" until then, "ok", "error 429", "error 500", "dropped") and
    when it arrived (time.monotonic())."""

    method: str
    params: dict
    outcome: str = "pending"
    at: float = field(default_factory=time.monotonic)


@dataclass
class _Fault:
    status: int | str  # an HTTP status, or "drop"
    retry_after: int = 1
    after_effect: bool = False  # the call takes effect (the message is posted) before its answer is lost


def _utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def _entities(text: str) -> list[dict]:
    """bot_command and mention entities, as Telegram computes them (offsets in UTF-16 units)."""
    found = []
    for match in _ENTITY.finditer(text):
        kind = "bot_command" if match.group().startswith("/") else "mention"
        if kind == "bot_command" and match.start() != 0:
            continue  # a command only counts at the start of the message
        found.append({"type": kind, "offset": _utf16_len(text[: match.start()]), "length": _utf16_len(match.group())})
    return found


class FakeTelegram:
    def __init__(self, *, bot_id: int = 1000, bot_username: str = "botkit_bot", token: str = "1000:TEST-TOKEN"):
        self.token = token
        self.bot = {
            "id": bot_id,
            "is_bot": True,
            "first_name": "Botkit",
            "username": bot_username,
            "can_join_groups": True,
            "can_read_all_group_messages": False,
            "supports_inline_queries": False,
        }
        self.calls: list[Call] = []
        self.messages: dict[int, dict[int, dict]] = defaultdict(dict)  # chat id -> message id -> message
        self.admins: dict[int, set[int]] = defaultdict(set)  # chat id -> user ids
        self.commands: list[dict] = []
        # chat id -> (draft id, text) as shown, in order
        self.drafts: dict[int, list[tuple[int, str]]] = defaultdict(list)
        self.webhook: dict = {}  # the last setWebhook parameters; empty when polling
        self._updates: list[dict] = []  # not yet confirmed by a getUpdates offset
        self._next_update_id = 1
        self._next_message_id: dict[int, int] = defaultdict(lambda: 1)
        self._faults: dict[str, deque[_Fault]] = defaultdict(deque)
        self._changed = asyncio.Condition()  # a new update or a new call
        self._tasks: set[asyncio.Task] = set()
        self._closing = False
        self._runner: web.AppRunner | None = None
        self.url = ""  # http://127.0.0.1:PORT, what the adapter's `base_url` config points at

    async def __aenter__(self) -> FakeTelegram:
        app = web.Application()
        app.router.add_route("*", "/bot{token}/{method}", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # port 0 asked the OS for a free one
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc) -> None:
        self._closing = True
        async with self._changed:
            self._changed.notify_all()  # long polls return at once
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._runner.cleanup()

    # ---- scripting -------------------------------------------------------------------------

    def fail_next(
        self, method: str, status: int | str = 429, *, retry_after: int = 1, times: int = 1, after_effect: bool = False
    ) -> None:
        """The next `times` calls of `method` fail: 429 with retry_after, another HTTP status, or "drop"
        (the connection is closed with no answer); `after_effect`: only once the call took effect, as
        when Telegram posted the message but the answer was lost on the way back."""
        for _ in range(times):
            self._faults[method.lower()].append(_Fault(status, retry_after, after_effect))

    def push_message(
        self,
        chat_id: int,
        text: str,
        *,
        user_id: int = 42,
        first_name: str = "Alice",
        username: str = "alice",
        is_bot: bool = False,
        chat_type: str | None = None,
        reply_to: dict | None = None,
        sender_chat: dict | None = None,
    ) -> dict:
        """A user writes `text` in a chat; returns the message as the bot will receive it.
        Negative chat ids are supergroups, positive ones private chats (unless `chat_type` says)."""
        chat_type = chat_type or ("supergroup" if chat_id < 0 else "private")
        chat = {"id": chat_id, "type": chat_type}
        if chat_type == "private":
            chat["first_name"] = first_name
        else:
            chat["title"] = f"chat {chat_id}"
        message = {
            "message_id": self._new_message_id(chat_id),
            "date": int(time.time()),
            "chat": chat,
            "text": text,
            "from": {"id": user_id, "is_bot": is_bot, "first_name": first_name, "username": username},
        }
        if entities := _entities(text):
            message["entities"] = entities
        if reply_to is not None:
            message["reply_to_message"] = reply_to
        if sender_chat is not None:
            message["sender_chat"] = sender_chat
        self.messages[chat_id][message["message_id"]] = message
        self.push_update({"message": message})
        return message

    def push_update(self, update: dict) -> dict:
        """Queue a raw update (an update_id is added); in webhook mode it is POSTed to the webhook."""
        update = {"update_id": self._next_update_id, **update}
        self._next_update_id += 1
        if self.webhook.get("url"):
            task = asyncio.get_running_loop().create_task(self._post_webhook(update))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            self._updates.append(update)
            self._notify()
        return update

    def set_admin(self, chat_id: int, user_id: int) -> None:
        self.admins[chat_id].add(user_id)

    # ---- inspecting ------------------------------------------------------------------------

    def calls_of(self, method: str, *, outcome: str | None = "ok") -> list[Call]:
        """Calls of `method` (any spelling) that got `outcome` (None: all of them)."""
        return [c for c in self.calls if c.method.lower() == method.lower() and outcome in (None, c.outcome)]

    def sent(self, chat_id: int) -> list[dict]:
        """The messages the bot has in a chat, oldest first, as they read now (after edits)."""
        return [m for m in self.messages[chat_id].values() if m["from"]["id"] == self.bot["id"]]

    async def wait_for(
        self, method: str, count: int = 1, *, timeout_s: float = 10.0, where=None, outcome: str | None = "ok"
    ) -> list[Call]:
        """Wait until `count` calls of `method` with `outcome` (and matching `where(params)`) have come."""

        def matching():
            return [c for c in self.calls_of(method, outcome=outcome) if where is None or where(c.params)]

        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: len(matching()) >= count), timeout_s)
            except TimeoutError:
                raise AssertionError(
                    f"{len(matching())} of {count} {method} calls after {timeout_s} s; "
                    f"calls: {[(c.method, c.outcome) for c in self.calls]}"
                ) from None
        return matching()

    # ---- the Bot API -----------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.match_info["token"] != self.token:
            return self._error(401, "Unauthorized")
        method = request.match_info["method"]
        params = {}
        for key, value in (await request.post()).items():
            params[key] = value if key in _STRING_PARAMS else _json_or_str(value)
        call = Call(method, params)
        self.calls.append(call)
        self._notify()
        if fault := (self._faults[method.lower()] or [None])[0]:
            self._faults[method.lower()].popleft()
            if fault.after_effect and (handler := getattr(self, f"_api_{method.lower()}", None)):
                await handler(params)
            call.outcome = "dropped" if fault.status == "drop" else f"error {fault.status}"
            self._notify()
            if fault.status == "drop":
                request.transport.close()  # the client sees the connection end with no answer
                return web.Response()
            if fault.status == 429:
                return self._error(
                    429,
                    f"Too Many Requests: retry after {fault.retry_after}",
                    parameters={"retry_after": fault.retry_after},
                )
            return self._error(fault.status, "Internal Server Error")
        handler = getattr(self, f"_api_{method.lower()}", None)
        if handler is None:
            call.outcome = "error 404"
            return self._error(404, "Not Found: method not found")
        try:
            result = await handler(params)
            call.outcome = "ok"
        except _ApiError as exc:
            call.outcome = f"error {exc.code}"
            return self._error(exc.code, exc.description)
        finally:
            self._notify()
        return web.json_response({"ok": True, "result": result})

    async def _api_getme(self, params):
        return self.bot

    async def _api_deletewebhook(self, params):
        self.webhook = {}
        return True

    async def _api_setwebhook(self, params):
        self.webhook = params
        return True

    async def _api_getupdates(self, params):
        offset = int(params.get("offset", 0) or 0)
        self._updates = [u for u in self._updates if u["update_id"] >= offset]  # an offset confirms the rest
        timeout_s = float(params.get("timeout", 0) or 0)
        limit = int(params.get("limit", 100) or 100)
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: self._updates or self._closing), timeout_s)
            except TimeoutError:
                pass
        return self._updates[:limit]

    async def _api_sendmessage(self, params):
        chat_id = int(params["chat_id"])
        if not params.get("text", "").strip():
            raise _ApiError(400, "Bad Request: message text is empty")
        if _utf16_len(params["text"]) > 4096:
            raise _ApiError(400, "Bad Request: message is too long")
        message = {
            "message_id": self._new_message_id(chat_id),
            "date": int(time.time()),
            "chat": {"id": chat_id, "type": "supergroup" if chat_id < 0 else "private"},
            "from": {k: self.bot[k] for k in ("id", "is_bot", "first_name", "username")},
            "text": params["text"],
        }
        reply_to = (params.get("reply_parameters") or {}).get("message_id") or params.get("reply_to_message_id")
        if reply_to is not None and int(reply_to) in self.messages[chat_id]:
            message["reply_to_message"] = self.messages[chat_id][int(reply_to)]
        self.messages[chat_id][message["message_id"]] = message
        return message

    async def _api_editmessagetext(self, params):
        message = self.messages[int(params["chat_id"])].get(int(params["message_id"]))
        if message is None:
            raise _ApiError(400, "Bad Request: message to edit not found")
        if message["text"] == params["text"]:
            raise _ApiError(400, "Bad Request: message is not modified")
        message["text"] = params["text"]
        message["edit_date"] = int(time.time())
        return message

    async def _api_sendmessagedraft(self, params):
        """Bot API 9.5: private chats only; the text (empty: a "thinking" placeholder) is a 30 s preview."""
        chat_id, draft_id, text = int(params["chat_id"]), int(params["draft_id"]), params.get("text", "")
        if chat_id < 0:
            raise _ApiError(400, "Bad Request: drafts can be sent to private chats only")
        if draft_id == 0:
            raise _ApiError(400, "Bad Request: draft_id must be non-zero")
        if _utf16_len(text) > 4096:
            raise _ApiError(400, "Bad Request: message is too long")
        self.drafts[chat_id].append((draft_id, text))
        return True

    async def _api_deletemessage(self, params):
        if self.messages[int(params["chat_id"])].pop(int(params["message_id"]), None) is None:
            raise _ApiError(400, "Bad Request: message to delete not found")
        return True

    async def _api_sendchataction(self, params):
        return True

    async def _api_setmycommands(self, params):
        self.commands = params.get("commands", [])
        return True

    async def _api_getchatmember(self, params):
        return self._member(int(params["chat_id"]), int(params["user_id"]))

    async def _api_getchatadministrators(self, params):
        chat_id = int(params["chat_id"])
        return [self._member(chat_id, user_id) for user_id in sorted(self.admins[chat_id])]

    # ---- helpers ---------------------------------------------------------------------------

    def _member(self, chat_id: int, user_id: int) -> dict:
        user = {"id": user_id, "is_bot": False, "first_name": f"user {user_id}"}
        if user_id in self.admins[chat_id]:
            return {"status": "administrator", "user": user, **dict.fromkeys(_ADMIN_RIGHTS, False)}
        return {"status": "member", "user": user}

    async def _post_webhook(self, update: dict) -> None:
        headers = {}
        if self.webhook.get("secret_token"):
            headers["X-Telegram-Bot-Api-Secret-Token"] = self.webhook["secret_token"]
        async with aiohttp.ClientSession() as session:
            async with session.post(self.webhook["url"], json=update, headers=headers) as response:
                await response.read()

    def _new_message_id(self, chat_id: int) -> int:
        self._next_message_id[chat_id] += 1
        return self._next_message_id[chat_id] - 1

    def _notify(self) -> None:
        async def notify():
            async with self._changed:
                self._changed.notify_all()

        task = asyncio.get_running_loop().create_task(notify())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    def _error(code: int, description: str, **extra) -> web.Response:
        return web.json_response({"ok": False, "error_code": code, "description": description, **extra}, status=code)


class _ApiError(Exception):
    def __init__(self, code: int, description: str):
        super().__init__(description)
        self.code, self.description = code, description


def _json_or_str(value: str):
    try:
        return json.loads(value)
    except ValueError:
        return value
