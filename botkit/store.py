"""The durable record: every accepted prompt, its parameters and its fate, in one SQLite file (WAL).

A request row is committed before the request enters the queue, so a crash never loses an accepted
prompt: on the next start, rows left queued or running are marked failed with the reason. Deliveries
record the platform message ids sent for a reply, so a reply is never sent twice.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiosqlite

from .errors import ConfigError

# Each entry migrates the schema from version i to i + 1 (PRAGMA user_version).
MIGRATIONS = [
    """
    CREATE TABLE chats (
        platform TEXT NOT NULL,
        chat_id TEXT NOT NULL,
        settings TEXT NOT NULL DEFAULT '{}',        -- JSON of changed ChatSettings fields
        context_since INTEGER NOT NULL DEFAULT 0,   -- /reset: only requests with a larger id are context
        PRIMARY KEY (platform, chat_id)
    );
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY,
        platform TEXT NOT NULL,
        chat_id TEXT NOT NULL,
        user_id TEXT NOT NULL,
        user_name TEXT NOT NULL DEFAULT '',
        platform_message_id TEXT,
        text TEXT NOT NULL,
        received_at REAL NOT NULL
    );
    CREATE TABLE requests (
        id INTEGER PRIMARY KEY,
        message_id INTEGER NOT NULL REFERENCES messages(id),
        kind TEXT NOT NULL,                         -- chat | completion
        prompt TEXT NOT NULL,                       -- what the model was given (template + context)
        params TEXT NOT NULL,                       -- JSON of SamplingParams
        seed INTEGER,
        status TEXT NOT NULL,                       -- queued | running | done | failed | cancelled
        error TEXT,
        reply TEXT,
        finish_reason TEXT,
        num_prompt_tokens INTEGER,
        num_tokens INTEGER,
        received_at REAL NOT NULL,
        started_at REAL,
        first_token_at REAL,
        done_at REAL
    );
    CREATE INDEX requests_status ON requests(status);
    CREATE INDEX messages_chat ON messages(platform, chat_id, id);
    CREATE TABLE deliveries (
        request_id INTEGER NOT NULL REFERENCES requests(id),
        part INTEGER NOT NULL,
        platform_message_id TEXT NOT NULL,
        delivered_at REAL NOT NULL,
        PRIMARY KEY (request_id, part)
    );
    """,
]

BUSY_RETRIES = 5


class Store:
    def __init__(self, db: aiosqlite.Connection):
        self.db = db
        self._lock = asyncio.Lock()  # one transaction at a time on the shared connection

    @classmethod
    @asynccontextmanager
    async def open(cls, path: str | Path) -> AsyncIterator[Store]:
        path = Path(path)
        if not path.parent.is_dir():
            raise ConfigError(f"The folder for the database {path} does not exist: create it or set [store] path.")
        try:
            db = await aiosqlite.connect(path, timeout=10)
        except sqlite3.Error as exc:
            raise ConfigError(f"Cannot open the database {path} ({exc}): check [store] path and its permissions.") from None
        try:
            db.row_factory = aiosqlite.Row
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA synchronous=NORMAL")  # with WAL: durable across a process crash
            await db.execute("PRAGMA busy_timeout=5000")
            await db.execute("PRAGMA foreign_keys=ON")
            store = cls(db)
            await store._migrate()
            yield store
        finally:
            await db.close()

    async def _migrate(self) -> None:
        (version,) = await (await self.db.execute("PRAGMA user_version")).fetchone()
        for i, script in enumerate(MIGRATIONS[version:], start=version):
            await self.db.executescript(f"BEGIN; {script}; PRAGMA user_version={i + 1}; COMMIT;")

    async def _transaction(self, work):
        """Run `await work(db)` in one transaction, retrying while another process holds the lock."""
        for attempt in range(BUSY_RETRIES):
            async with self._lock:
                try:
                    result = await work(self.db)
                    await self.db.commit()
                    return result
                except sqlite3.OperationalError as exc:
                    await self.db.rollback()
                    if ("locked" not in str(exc) and "busy" not in str(exc)) or attempt == BUSY_RETRIES - 1:
                        raise
            await asyncio.sleep(0.05 * 2**attempt)

    async def _write(self, sql: str, args=()) -> int:
        async def work(db):
            return (await db.execute(sql, args)).lastrowid

        return await self._transaction(work)

    async def _rows(self, sql: str, args=()) -> list[aiosqlite.Row]:
        async with self._lock:
            return list(await (await self.db.execute(sql, args)).fetchall())

    # -- requests ---------------------------------------------------------------------------

    async def add_request(self, *, kind: str, platform: str, chat_id: str, user_id: str, user_name: str,
                          platform_message_id: str | None, text: str, prompt: str, params: dict) -> int:
        """Record an incoming message and its request (queued); committed when this returns."""
        now = time.time()

        async def work(db):
            cur = await db.execute(
                "INSERT INTO messages (platform, chat_id, user_id, user_name, platform_message_id, text, received_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)", (platform, chat_id, user_id, user_name, platform_message_id, text, now))
            cur = await db.execute(
                "INSERT INTO requests (message_id, kind, prompt, params, seed, status, received_at)"
                " VALUES (?, ?, ?, ?, ?, 'queued', ?)", (cur.lastrowid, kind, prompt, json.dumps(params), params.get("seed"), now))
            return cur.lastrowid

        return await self._transaction(work)

    async def mark_running(self, request_id: int) -> None:
        await self._write("UPDATE requests SET status='running', started_at=? WHERE id=?", (time.time(), request_id))

    async def finish(self, request_id: int, *, reply: str, finish_reason: str, num_prompt_tokens: int,
                     num_tokens: int, seed: int | None, first_token_at: float | None) -> None:
        await self._write(
            "UPDATE requests SET status='done', reply=?, finish_reason=?, num_prompt_tokens=?, num_tokens=?,"
            " seed=COALESCE(?, seed), first_token_at=?, done_at=? WHERE id=?",
            (reply, finish_reason, num_prompt_tokens, num_tokens, seed, first_token_at, time.time(), request_id))

    async def fail(self, request_id: int, reason: str, status: str = "failed") -> None:
        await self._write("UPDATE requests SET status=?, error=?, done_at=? WHERE id=? AND status IN ('queued', 'running')",
                          (status, reason, time.time(), request_id))

    async def recover(self) -> int:
        """After a crash or restart: requests left queued or running are failed with the reason."""
        cur_rows = await self._rows("SELECT COUNT(*) FROM requests WHERE status IN ('queued', 'running')")
        await self._write("UPDATE requests SET status='failed', error='interrupted: botkit restarted before this finished',"
                          " done_at=? WHERE status IN ('queued', 'running')", (time.time(),))
        return cur_rows[0][0]

    async def request(self, request_id: int) -> dict | None:
        rows = await self._rows("SELECT r.*, m.platform, m.chat_id, m.user_id, m.text FROM requests r"
                                " JOIN messages m ON m.id = r.message_id WHERE r.id=?", (request_id,))
        return dict(rows[0]) if rows else None

    async def recent(self, limit: int = 20, platform: str | None = None) -> list[dict]:
        rows = await self._rows(
            "SELECT r.id, r.kind, r.status, r.error, r.reply, r.finish_reason, r.num_tokens, r.received_at, r.done_at,"
            " m.platform, m.chat_id, m.text FROM requests r JOIN messages m ON m.id = r.message_id"
            " WHERE ? IS NULL OR m.platform = ? ORDER BY r.id DESC LIMIT ?", (platform, platform, limit))
        return [dict(r) for r in rows]

    # -- deliveries -------------------------------------------------------------------------

    async def record_delivery(self, request_id: int, platform_message_ids: list[str]) -> None:
        rows = [(request_id, i, str(mid), time.time()) for i, mid in enumerate(platform_message_ids)]

        async def work(db):
            await db.executemany("INSERT OR IGNORE INTO deliveries VALUES (?, ?, ?, ?)", rows)

        await self._transaction(work)

    async def is_delivered(self, request_id: int) -> bool:
        return bool(await self._rows("SELECT 1 FROM deliveries WHERE request_id=? LIMIT 1", (request_id,)))

    # -- chats ------------------------------------------------------------------------------

    async def chat_settings(self, platform: str, chat_id: str) -> dict:
        rows = await self._rows("SELECT settings FROM chats WHERE platform=? AND chat_id=?", (platform, chat_id))
        return json.loads(rows[0]["settings"]) if rows else {}

    async def set_chat_settings(self, platform: str, chat_id: str, settings: dict) -> None:
        await self._write("INSERT INTO chats (platform, chat_id, settings) VALUES (?, ?, ?)"
                          " ON CONFLICT DO UPDATE SET settings=excluded.settings", (platform, chat_id, json.dumps(settings)))

    async def reset_context(self, platform: str, chat_id: str) -> None:
        last = (await self._rows("SELECT COALESCE(MAX(id), 0) FROM requests"))[0][0]
        await self._write("INSERT INTO chats (platform, chat_id, context_since) VALUES (?, ?, ?)"
                          " ON CONFLICT DO UPDATE SET context_since=excluded.context_since", (platform, chat_id, last))

    async def context(self, platform: str, chat_id: str, limit: int) -> list[tuple[str, str]]:
        """The chat's last `limit` answered (message, reply) pairs since its /reset, oldest first."""
        rows = await self._rows(
            "SELECT m.text, r.reply FROM requests r JOIN messages m ON m.id = r.message_id"
            " WHERE m.platform=? AND m.chat_id=? AND r.kind='chat' AND r.status='done'"
            " AND r.id > COALESCE((SELECT context_since FROM chats WHERE platform=? AND chat_id=?), 0)"
            " ORDER BY r.id DESC LIMIT ?", (platform, chat_id, platform, chat_id, limit))
        return [(r["text"], r["reply"]) for r in reversed(rows)]
