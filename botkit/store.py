"""The durable record: every accepted prompt, its parameters and its fate, in one SQLite file (WAL).

A request row is committed before the request enters the queue, so a crash never loses an accepted
prompt: on the next start, rows left queued or running are marked failed with the reason. Deliveries
record the platform message ids sent for a reply, so a reply is never sent twice. Every write is one
transaction that commits whole or not at all. One botkit at a time uses a database: `open` takes an
exclusive lock (`<database>.lock`, released by the kernel when the process ends, even on SIGKILL)
before anything reads or changes the records.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiosqlite

from .errors import ConfigError, StoreUnavailable

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
        if path.is_dir():
            raise ConfigError(f"The database path {path} is a folder: set [store] path to a file name such as {path / 'botkit.db'}.")
        with _instance_lock(path):
            try:
                db = await aiosqlite.connect(path, timeout=10)
            except sqlite3.Error as exc:
                raise ConfigError(f"Cannot open the database {path} ({exc}): check [store] path and its permissions.") from None
            try:
                db.row_factory = aiosqlite.Row
                store = cls(db)
                await store._prepare(path)
                yield store
            finally:
                await db.close()

    async def _prepare(self, path: Path) -> None:
        try:
            await self.db.execute("PRAGMA journal_mode=WAL")
            await self.db.execute("PRAGMA synchronous=NORMAL")  # with WAL: durable across a process crash
            await self.db.execute("PRAGMA busy_timeout=5000")
            await self.db.execute("PRAGMA foreign_keys=ON")
            await self._migrate()
        except sqlite3.DatabaseError as exc:
            text = str(exc)
            if "not a database" in text or "malformed" in text:
                raise ConfigError(f"{path} is not a botkit database, or it is damaged ({text}): move it away, or set [store] path to another file.") from None
            if "readonly" in text or "unable to open" in text:
                raise ConfigError(f"botkit cannot write the database {path} or its folder ({text}): give the user running botkit write access to both.") from None
            raise ConfigError(f"The database {path} cannot be used ({text}): check the file and the disk.") from None

    async def _migrate(self) -> None:
        (version,) = await (await self.db.execute("PRAGMA user_version")).fetchone()
        for i, script in enumerate(MIGRATIONS[version:], start=version):
            await self.db.executescript(f"BEGIN; {script}; PRAGMA user_version={i + 1}; COMMIT;")

    async def _transaction(self, work):
        """Run `await work(db)` in one transaction that commits whole or not at all, retrying while
        another connection holds the lock. SQLite failures become StoreUnavailable (a sentence)."""
        for attempt in range(BUSY_RETRIES):
            async with self._lock:
                try:
                    result = await work(self.db)
                    await self.db.commit()
                    return result
                except BaseException as exc:
                    await self.db.rollback()  # nothing half-written stays for the next commit
                    is_busy = isinstance(exc, sqlite3.OperationalError) and ("locked" in str(exc) or "busy" in str(exc))
                    if isinstance(exc, sqlite3.Error) and (not is_busy or attempt == BUSY_RETRIES - 1):
                        raise _unavailable(exc) from exc
                    if not is_busy:
                        raise
            await asyncio.sleep(0.05 * 2**attempt)

    async def _write(self, sql: str, args=()) -> int:
        async def work(db):
            return (await db.execute(sql, args)).lastrowid

        return await self._transaction(work)

    async def _rows(self, sql: str, args=()) -> list[aiosqlite.Row]:
        async with self._lock:
            try:
                return list(await (await self.db.execute(sql, args)).fetchall())
            except sqlite3.Error as exc:
                raise _unavailable(exc) from exc

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

    async def keep_newest_context(self, platform: str, chat_id: str, keep: int) -> None:
        """From now on the chat's context starts after its `keep` newest answered exchanges' predecessor."""
        rows = await self._rows(
            "SELECT r.id FROM requests r JOIN messages m ON m.id = r.message_id"
            " WHERE m.platform=? AND m.chat_id=? AND r.kind='chat' AND r.status='done'"
            " ORDER BY r.id DESC LIMIT 1 OFFSET ?", (platform, chat_id, keep))
        if rows:
            await self._write("INSERT INTO chats (platform, chat_id, context_since) VALUES (?, ?, ?)"
                              " ON CONFLICT DO UPDATE SET context_since=MAX(context_since, excluded.context_since)",
                              (platform, chat_id, rows[0][0]))

    async def context(self, platform: str, chat_id: str, limit: int) -> list[tuple[str, str]]:
        """The chat's last `limit` answered (message, reply) pairs since its /reset, oldest first."""
        rows = await self._rows(
            "SELECT m.text, r.reply FROM requests r JOIN messages m ON m.id = r.message_id"
            " WHERE m.platform=? AND m.chat_id=? AND r.kind='chat' AND r.status='done'"
            " AND r.id > COALESCE((SELECT context_since FROM chats WHERE platform=? AND chat_id=?), 0)"
            " ORDER BY r.id DESC LIMIT ?", (platform, chat_id, platform, chat_id, limit))
        return [(r["text"], r["reply"]) for r in reversed(rows)]


def _unavailable(exc: sqlite3.Error) -> StoreUnavailable:
    text = str(exc)
    if "full" in text:
        why = "my disk is full, so I can't record anything; please tell whoever runs me"
    elif "locked" in text or "busy" in text:
        why = "my database is busy right now; please try again in a moment"
    else:
        why = f"my database can't be written right now ({text}); please tell whoever runs me"
    return StoreUnavailable(why[0].upper() + why[1:] + ".")


class _instance_lock:
    """An exclusive, non-blocking flock on `<database>.lock` holding the owner's process id; the
    kernel drops it when the process ends, however it ends."""

    def __init__(self, db_path: Path):
        self.path = db_path.with_name(db_path.name + ".lock")
        self.fd: int | None = None

    def __enter__(self):
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ConfigError(f"botkit cannot create {self.path} ({exc.strerror}): give the user running botkit write access to that folder.") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(self.fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(self.fd)
            raise ConfigError(f"Another botkit (process {owner}) is already using the database {self.path.with_suffix('')}: "
                              "stop it first, or set [store] path to another file.") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)  # releases the lock; the file stays (deleting it would race a starting instance)
