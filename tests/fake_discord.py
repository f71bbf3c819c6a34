"""A small fake Discord on 127.0.0.1 (REST API + gateway) for testing the real discord.py client.

discord.py reaches it through `discord.http.Route.BASE = fake.api_url` and
`discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(fake.gateway_url)`. The fake speaks
JSON text frames (no compression), serves one guild with one text channel, and:

- gateway: HELLO, heartbeat ACKs, IDENTIFY -> READY (with `resume_gateway_url` pointing back here)
  + GUILD_CREATE, RESUME -> replay of missed events + RESUMED, close 4004 on a bad token and 4014
  when privileged intents are requested but not enabled;
- REST: users/@me, oauth2/applications/@me, gateway/bot, command bulk overwrite, channel messages
  (POST/PATCH), typing, interaction callbacks and followup webhooks;
- test helpers inject MESSAGE_CREATE / INTERACTION_CREATE, script 429s, 5xx and dropped
  connections, and record every request for assertions.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from aiohttp import WSMsgType, web

BOT_ID = 100_000_000_000_000_001
APP_ID = BOT_ID  # as for most bots, the application id is the bot user's id
GUILD_ID = 200_000_000_000_000_001
CHANNEL_ID = 300_000_000_000_000_001
OTHER_CHANNEL_ID = 300_000_000_000_000_002
DM_CHANNEL_ID = 400_000_000_000_000_001
MANAGE_GUILD = 1 << 5
MESSAGE_CONTENT_INTENT = 1 << 15
MEMBER_PERMISSIONS = (1 << 10) | (1 << 11) | (1 << 16)  # view channel, send messages, read history
EPHEMERAL, LOADING = 1 << 6, 1 << 7  # message flags


def _json(body, status: int = 200, headers: dict | None = None) -> web.Response:
    # exactly "application/json", no charset: discord.py only parses JSON with that content-type
    return web.Response(
        body=json.dumps(body).encode(), status=status, headers={"Content-Type": "application/json", **(headers or {})}
    )


def user(user_id: int, name: str, *, bot: bool = False) -> dict:
    return {"id": str(user_id), "username": name, "global_name": name, "discriminator": "0", "avatar": None, "bot": bot}


BOT = user(BOT_ID, "botkit", bot=True)
ALICE = user(500_000_000_000_000_001, "alice")
BOB = user(500_000_000_000_000_002, "bob")
OTHER_BOT = user(500_000_000_000_000_003, "otherbot", bot=True)


@dataclass
class Request:
    method: str
    path: str  # after /api/v10, e.g. "/channels/3/messages"
    query: dict
    json: dict | list | None
    at_s: float  # time.monotonic() when it arrived


@dataclass
class _Failure:
    method: str
    path: re.Pattern
    status: int
    retry_after_s: float
    times: int
    after_effect: bool = False  # the request takes effect (the message is posted) before the error is answered


@dataclass
class FakeDiscord:
    token: str = "fake-discord-token"
    privileged_intents: bool = True  # False: the Message Content intent is off in the developer portal
    requests: list[Request] = field(default_factory=list)
    messages: dict[int, dict] = field(default_factory=dict)  # every message, by id
    commands: list[dict] = field(default_factory=list)  # the last synced application commands
    identifies: list[dict] = field(default_factory=list)
    gateway_paths: list[str] = field(default_factory=list)  # "/gateway" or "/resume", per connection
    num_resumed: int = 0

    def __post_init__(self):
        self._ids = itertools.count(700_000_000_000_000_001)
        self._failures: list[_Failure] = []
        self._by_nonce: dict[tuple[int, str], dict] = {}
        self._changed = asyncio.Condition()
        self._ws: web.WebSocketResponse | None = None
        self._session_id = ""
        self._seq = 0
        self._history: list[dict] = []  # dispatched frames of this session, for RESUME

    # lifecycle -------------------------------------------------------------------------------------

    async def __aenter__(self) -> FakeDiscord:
        app = web.Application()
        app.router.add_get("/gateway", self._gateway)
        app.router.add_get("/resume", self._gateway)
        app.router.add_route("*", "/api/v10/{path:.*}", self._rest)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.api_url = f"http://127.0.0.1:{port}/api/v10"
        self.gateway_url = f"ws://127.0.0.1:{port}/gateway"
        self.resume_url = f"ws://127.0.0.1:{port}/resume"
        return self

    async def __aexit__(self, *exc) -> None:
        if self._ws is not None:
            await self._ws.close()
        await self._runner.cleanup()

    # test helpers ----------------------------------------------------------------------------------

    async def wait_for(self, predicate, timeout_s: float = 5.0):
        """Wait until `predicate()` is truthy (checked after every request or gateway event)."""
        async with self._changed:
            return await asyncio.wait_for(self._changed.wait_for(predicate), timeout_s)

    async def wait_connected(self, num_sessions: int = 1, timeout_s: float = 5.0) -> None:
        """Wait until the client has identified `num_sessions` times and holds a live connection."""
        await self.wait_for(lambda: len(self.identifies) >= num_sessions and self._ws is not None, timeout_s)

    def fail_next(
        self,
        method: str,
        path: str,
        status: int = 429,
        *,
        retry_after_s: float = 0.2,
        times: int = 1,
        after_effect: bool = False,
    ):
        """Answer the next `times` requests matching `method` and the regex `path` with an error;
        `after_effect`: only once the request took effect, as when Discord posted the message but a
        proxy answered 502."""
        self._failures.append(_Failure(method, re.compile(path), status, retry_after_s, times, after_effect))

    async def drop_connection(self, code: int = 4000) -> None:
        """Close the gateway connection as Discord does on a server-side error (resumable codes)."""
        ws, self._ws = self._ws, None
        await ws.close(code=code)

    def requests_to(self, method: str, path: str) -> list[Request]:
        return [r for r in self.requests if r.method == method and re.fullmatch(path, r.path)]

    def bot_messages(self, channel_id: int | None = None) -> list[dict]:
        """Messages the bot created (channel sends, interaction responses, followups), oldest first."""
        return [
            m
            for m in self.messages.values()
            if m["author"]["id"] == BOT["id"] and (channel_id is None or int(m["channel_id"]) == channel_id)
        ]

    async def send_message(
        self,
        content: str,
        *,
        author: dict = ALICE,
        channel_id: int = CHANNEL_ID,
        mention_bot: bool = False,
        reply_to: dict | None = None,
    ) -> dict:
        """A user posts in a guild channel (or the DM channel): dispatches MESSAGE_CREATE."""
        is_dm = channel_id == DM_CHANNEL_ID
        if mention_bot:
            content = f"<@{BOT_ID}> {content}"
        message = self._message(channel_id, author, content, reply_to=reply_to, guild=not is_dm)
        message["mentions"] = [BOT] if mention_bot else []
        if not is_dm:
            message["member"] = self._member(author)
            del message["member"]["user"]
        self.messages[int(message["id"])] = message
        await self.dispatch("MESSAGE_CREATE", message)
        return message

    async def use_command(
        self,
        name: str,
        options: dict | None = None,
        *,
        author: dict = ALICE,
        permissions: int = MEMBER_PERMISSIONS,
        channel_id: int = CHANNEL_ID,
    ) -> dict:
        """A guild member (or a user in the DM channel) runs a slash command: dispatches INTERACTION_CREATE."""
        interaction_id = next(self._ids)
        opts = [{"name": k, "type": 3, "value": v} for k, v in (options or {}).items()]
        interaction = {
            "id": str(interaction_id),
            "application_id": str(APP_ID),
            "type": 2,
            "token": f"itoken-{interaction_id}",
            "version": 1,
            "guild_id": str(GUILD_ID),
            "channel_id": str(CHANNEL_ID),
            "channel": {"id": str(CHANNEL_ID), "type": 0, "guild_id": str(GUILD_ID), "name": "general", "position": 0},
            "member": self._member(author, permissions),
            "data": {"id": str(next(self._ids)), "name": name, "type": 1, "options": opts},
            "app_permissions": str(MEMBER_PERMISSIONS),
            "locale": "en-US",
            "guild_locale": "en-US",
            "attachment_size_limit": 8 * 1024 * 1024,
            "entitlements": [],
            "authorizing_integration_owners": {"0": str(GUILD_ID)},
            "context": 0,
        }
        if channel_id == DM_CHANNEL_ID:  # a bot DM: no server, the user instead of a member
            del interaction["guild_id"], interaction["member"]
            interaction.update(
                channel_id=str(DM_CHANNEL_ID),
                channel={"id": str(DM_CHANNEL_ID), "type": 1},
                user=author,
                context=1,
                authorizing_integration_owners={"1": author["id"]},
            )
        await self.dispatch("INTERACTION_CREATE", interaction)
        return interaction

    async def dispatch(self, event: str, data: dict) -> None:
        """Send a DISPATCH frame; kept for replay if the client is disconnected (it will RESUME)."""
        self._seq += 1
        frame = {"op": 0, "t": event, "s": self._seq, "d": data}
        self._history.append(frame)
        if self._ws is not None:
            await self._ws.send_json(frame)

    # payloads --------------------------------------------------------------------------------------

    def _message(self, channel_id: int, author: dict, content: str, *, reply_to=None, guild=True) -> dict:
        message = {
            "id": str(next(self._ids)),
            "channel_id": str(channel_id),
            "author": author,
            "content": content,
            "timestamp": datetime.now(UTC).isoformat(),
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": False,
            "mentions": [],
            "mention_roles": [],
            "attachments": [],
            "embeds": [],
            "pinned": False,
            "type": 0,
            "flags": 0,
        }
        if guild:
            message["guild_id"] = str(GUILD_ID)
        if reply_to is not None:
            message["type"] = 19  # REPLY
            message["message_reference"] = {"message_id": reply_to["id"], "channel_id": reply_to["channel_id"]}
            message["referenced_message"] = reply_to
        return message

    def _member(self, author: dict, permissions: int = MEMBER_PERMISSIONS) -> dict:
        return {
            "user": author,
            "roles": [],
            "joined_at": "2024-01-01T00:00:00+00:00",
            "deaf": False,
            "mute": False,
            "flags": 0,
            "permissions": str(permissions),
        }

    def _guild(self) -> dict:
        channels = [
            {"id": str(cid), "type": 0, "name": name, "position": i, "permission_overwrites": [], "nsfw": False}
            for i, (cid, name) in enumerate([(CHANNEL_ID, "general"), (OTHER_CHANNEL_ID, "random")])
        ]
        everyone = {"id": str(GUILD_ID), "name": "@everyone", "permissions": str(MEMBER_PERMISSIONS), "position": 0}
        return {
            "id": str(GUILD_ID),
            "name": "Test server",
            "owner_id": ALICE["id"],
            "roles": [{**everyone, "color": 0, "hoist": False, "managed": False, "mentionable": False, "flags": 0}],
            "channels": channels,
            "members": [self._member(BOT)],
            "member_count": 3,
            "threads": [],
            "emojis": [],
            "stickers": [],
            "features": [],
            "unavailable": False,
            "large": False,
            "joined_at": "2024-01-01T00:00:00+00:00",
        }

    # gateway ---------------------------------------------------------------------------------------

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        self.gateway_paths.append(request.path)
        await ws.send_json({"op": 10, "d": {"heartbeat_interval": 45_000}, "s": None, "t": None})
        async for msg in ws:
            if msg.type is not WSMsgType.TEXT:
                continue
            payload = json.loads(msg.data)
            if payload["op"] == 1:  # HEARTBEAT
                await ws.send_json({"op": 11, "d": None, "s": None, "t": None})
            elif payload["op"] == 2:
                await self._identify(ws, payload["d"])
            elif payload["op"] == 6:
                await self._resume(ws, payload["d"])
        if self._ws is ws:
            self._ws = None
        return ws

    async def _identify(self, ws: web.WebSocketResponse, data: dict) -> None:
        if data.get("token") != self.token:
            await ws.close(code=4004, message=b"Authentication failed.")
            return
        if data.get("intents", 0) & MESSAGE_CONTENT_INTENT and not self.privileged_intents:
            await ws.close(code=4014, message=b"Disallowed intent(s).")
            return
        self._session_id, self._seq, self._history = f"session-{len(self.identifies) + 1}", 0, []
        self._ws = ws
        ready = {
            "v": 10,
            "user": BOT,
            "guilds": [{"id": str(GUILD_ID), "unavailable": True}],
            "session_id": self._session_id,
            "resume_gateway_url": self.resume_url,
            "application": {"id": str(APP_ID), "flags": 0},
        }
        await self.dispatch("READY", ready)
        await self.dispatch("GUILD_CREATE", self._guild())
        async with self._changed:
            self.identifies.append(data)
            self._changed.notify_all()

    async def _resume(self, ws: web.WebSocketResponse, data: dict) -> None:
        if data.get("token") != self.token or data.get("session_id") != self._session_id:
            await ws.send_json({"op": 9, "d": False, "s": None, "t": None})  # INVALID_SESSION, not resumable
            return
        self._ws = ws
        for frame in self._history:
            if frame["s"] > (data.get("seq") or 0):
                await ws.send_json(frame)
        await self.dispatch("RESUMED", {})
        async with self._changed:
            self.num_resumed += 1
            self._changed.notify_all()

    # REST ------------------------------------------------------------------------------------------

    async def _rest(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        path = "/" + request.match_info["path"]
        recorded = Request(
            request.method, path, dict(request.query), json.loads(body) if body else None, time.monotonic()
        )
        async with self._changed:
            self.requests.append(recorded)
            response = await self._answer(recorded, request)
            self._changed.notify_all()
        return response

    async def _answer(self, req: Request, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bot {self.token}" and not req.path.startswith(
            ("/webhooks/", "/interactions/")
        ):
            return _json({"message": "401: Unauthorized", "code": 0}, status=401)
        for failure in self._failures:
            if failure.times > 0 and failure.method == req.method and failure.path.fullmatch(req.path):
                failure.times -= 1
                if failure.after_effect:
                    await self._route(req)
                if failure.status == 429:
                    body = {
                        "message": "You are being rate limited.",
                        "retry_after": failure.retry_after_s,
                        "global": False,
                    }
                    headers = {"Via": "1.1 google", "Retry-After": str(failure.retry_after_s)}
                    return _json(body, status=429, headers=headers)
                return _json({"message": "Server error", "code": 0}, status=failure.status)
        return await self._route(req)

    async def _route(self, req: Request) -> web.StreamResponse:
        for method, pattern, handler in self._routes():
            match = re.fullmatch(pattern, req.path)
            if method == req.method and match:
                result = await handler(req, *match.groups())
                return web.Response(status=204) if result is None else _json(result)
        return _json({"message": "404: Not Found", "code": 0}, status=404)

    def _routes(self):
        return [
            ("GET", r"/users/@me", self._me),
            ("GET", r"/oauth2/applications/@me", self._application),
            ("GET", r"/gateway(?:/bot)?", self._gateway_info),
            ("PUT", r"/applications/\d+/commands", self._sync_commands),
            ("POST", r"/channels/(\d+)/typing", self._typing),
            ("POST", r"/channels/(\d+)/messages", self._create_message),
            ("PATCH", r"/channels/\d+/messages/(\d+)", self._edit_message),
            ("DELETE", r"/channels/\d+/messages/(\d+)", self._delete_message),
            ("POST", r"/interactions/(\d+)/([\w-]+)/callback", self._interaction_callback),
            ("POST", r"/webhooks/\d+/([\w-]+)", self._followup),
            ("PATCH", r"/webhooks/\d+/([\w-]+)/messages/(@original|\d+)", self._edit_webhook_message),
            ("DELETE", r"/webhooks/\d+/([\w-]+)/messages/(@original|\d+)", self._delete_webhook_message),
        ]

    async def _me(self, req):
        return BOT

    async def _application(self, req):
        return {
            "id": str(APP_ID),
            "name": "botkit",
            "icon": None,
            "description": "",
            "bot_public": True,
            "bot_require_code_grant": False,
            "owner": ALICE,
            "verify_key": "0" * 64,
            "flags": 0,
        }

    async def _gateway_info(self, req):
        limit = {"total": 1000, "remaining": 999, "reset_after": 0, "max_concurrency": 1}
        return {"url": self.gateway_url, "shards": 1, "session_start_limit": limit}

    async def _sync_commands(self, req):
        self.commands = [
            {**c, "id": str(next(self._ids)), "application_id": str(APP_ID), "version": "1"} for c in req.json
        ]
        return self.commands

    async def _typing(self, req, channel_id):
        return None

    async def _create_message(self, req, channel_id):
        nonce = req.json.get("nonce") if req.json.get("enforce_nonce") else None
        if nonce is not None and (earlier := self._by_nonce.get((int(channel_id), nonce))):
            return earlier  # Discord: "enforce_nonce" returns the message already created with this nonce
        reference = req.json.get("message_reference")
        reply_to = self.messages.get(int(reference["message_id"])) if reference else None
        message = self._message(int(channel_id), BOT, req.json.get("content", ""), reply_to=reply_to)
        message["sent_payload"] = req.json  # what the client posted, for assertions
        self.messages[int(message["id"])] = message
        if nonce is not None:
            self._by_nonce[(int(channel_id), nonce)] = message
        await self.dispatch("MESSAGE_CREATE", message)  # Discord echoes the bot's own messages
        return message

    async def _edit_message(self, req, message_id):
        message = self.messages[int(message_id)]
        message.update(
            content=req.json.get("content", message["content"]), edited_timestamp=datetime.now(UTC).isoformat()
        )
        return message

    async def _delete_message(self, req, message_id):
        self.messages.pop(int(message_id))
        return None

    async def _delete_webhook_message(self, req, token, message_id):
        if message_id == "@original":
            message_id = next(m["id"] for m in self.messages.values() if m.get("interaction_token") == token)
        self.messages.pop(int(message_id))
        return None

    async def _interaction_callback(self, req, interaction_id, token):
        kind, data = req.json["type"], req.json.get("data") or {}
        message = self._message(CHANNEL_ID, BOT, data.get("content", ""))
        message.update(flags=data.get("flags", 0) | (LOADING if kind == 5 else 0), webhook_id=str(APP_ID))
        message["interaction_token"] = token
        self.messages[int(message["id"])] = message
        loading, ephemeral = bool(message["flags"] & LOADING), bool(message["flags"] & EPHEMERAL)
        return {
            "interaction": {
                "id": interaction_id,
                "type": 2,
                "response_message_id": message["id"],
                "response_message_loading": loading,
                "response_message_ephemeral": ephemeral,
            },
            "resource": {"type": kind, "message": message},
        }

    async def _followup(self, req, token):
        message = self._message(CHANNEL_ID, BOT, req.json.get("content", ""))
        message.update(flags=req.json.get("flags", 0), webhook_id=str(APP_ID), interaction_token=token)
        message["sent_payload"] = req.json
        self.messages[int(message["id"])] = message
        return message

    async def _edit_webhook_message(self, req, token, message_id):
        if message_id == "@original":
            message = next(m for m in self.messages.values() if m.get("interaction_token") == token)
        else:
            message = self.messages[int(message_id)]
        message.update(content=req.json.get("content", message["content"]), flags=message["flags"] & ~LOADING)
        message["sent_payload"] = req.json
        return message
