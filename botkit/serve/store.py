"""The durable record: every accepted prompt, its parameters and its fate, in one SQLite file (WAL).

A request row is committed before the request enters the queue, so a crash never loses an accepted
prompt: on the next start, rows left queued or running are marked failed with the reason
("interrupted: …"), and the conversation layer runs chat requests again (`requeue`). `answers`
says an answer began to be sent and `deliveries` which platform messages carry it, so a reply is
never sent twice. Every write is one transaction that commits whole or not at all. One botkit at a
time uses a database: `open` takes an exclusive lock (`<database>.lock`, released by the kernel when
the process ends, even on SIGKILL) before anything reads or changes the records.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiosqlite

from botkit.errors import ConfigError, StoreUnavailable

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
    # 2: the conversation layer. `answers` records that an answer to a chat request began to be sent
    # (read before sending: at most one answer per request, across restarts); requests with none are
    # owed one after a restart, from `answers_owed_after` on (older rows predate this record).
    # `events` remembers handled platform events that made no request, so a redelivered one is
    # dropped; a message that made a request is recognised by its `messages` row. Messages with no
    # request are channel context (chat setting context = channel).
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value);
    INSERT INTO meta VALUES ('answers_owed_after', (SELECT COALESCE(MAX(id), 0) FROM requests));
    CREATE TABLE answers (
        request_id INTEGER PRIMARY KEY REFERENCES requests(id) ON DELETE CASCADE,
        kind TEXT NOT NULL,                         -- reply | error | sorry
        started_at REAL NOT NULL
    );
    CREATE TABLE events (
        platform TEXT NOT NULL,
        chat_id TEXT NOT NULL,
        event_id TEXT NOT NULL,
        seen_at REAL NOT NULL,
        PRIMARY KEY (platform, chat_id, event_id)
    );
    CREATE INDEX events_seen ON events(seen_at);
    CREATE INDEX messages_event ON messages(platform, chat_id, platform_message_id);
    CREATE INDEX messages_received ON messages(received_at);
    CREATE INDEX requests_message ON requests(message_id);
    ALTER TABLE chats ADD COLUMN context_since_message INTEGER NOT NULL DEFAULT 0;
    """,
    # export-dataset takes a chat's messages with a larger id only: those sent after it opted in
    "ALTER TABLE chats ADD COLUMN export_since_message INTEGER NOT NULL DEFAULT 0",
    # 4: streamed replies (chat setting stream). `previews` holds the messages a reply was shown in
    # while it was written, so that after a crash its answer edits them instead of leaving a stale half.
    """
    CREATE TABLE previews (
        request_id INTEGER NOT NULL REFERENCES requests(id) ON DELETE CASCADE,
        part INTEGER NOT NULL,
        platform_message_id TEXT NOT NULL,
        PRIMARY KEY (request_id, part)
    );
    """,
]

log = logging.getLogger("botkit.store")

BUSY_RETRIES = 5
WAL_RETRY_S = (0.1, 30.0)  # first and longest wait between tries to empty the WAL after an erase
BLANK = " \t\r\n"  # trim(reply, BLANK) = '' for a reply with nothing to read: never context


class Store:
    def __init__(self, db: aiosqlite.Connection):
        self.db = db
        self._lock = asyncio.Lock()  # one transaction at a time on the shared connection
        self._wal_holds_erased = asyncio.Event()  # set by an erase whose WAL could not be emptied yet
        # request in flight -> the erased texts its prompt quoted, in memory until it settles: a reply
        # that copied one is not stored (see finish)
        self._erased_quotes: dict[int, list[str]] = {}

    @classmethod
    @asynccontextmanager
    async def open(cls, path: str | Path) -> AsyncIterator[Store]:
        path = Path(path)
        if not path.parent.is_dir():
            raise ConfigError(f"The folder for the database {path} does not exist: create it or set [store] path.")
        if path.is_dir():
            raise ConfigError(
                f"The database path {path} is a folder: set [store] path to a file name such as {path / 'botkit.db'}."
            )
        with _instance_lock(path):
            try:
                db = await aiosqlite.connect(path, timeout=10)
            except sqlite3.Error as exc:
                raise ConfigError(
                    f"Cannot open the database {path} ({exc}): check [store] path and its permissions."
                ) from None
            try:
                db.row_factory = aiosqlite.Row
                store = cls(db)
                await store._prepare(path)
                emptier = asyncio.create_task(store._keep_emptying_wal())
                try:
                    yield store
                finally:
                    emptier.cancel()
                    await asyncio.gather(emptier, return_exceptions=True)
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
                raise ConfigError(
                    f"{path} is not a botkit database, or it is damaged ({text}): move it away, or set "
                    "[store] path to another file."
                ) from None
            if "readonly" in text or "unable to open" in text:
                raise ConfigError(
                    f"botkit cannot write the database {path} or its folder ({text}): give the user "
                    "running botkit write access to both."
                ) from None
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

    async def add_request(
        self,
        *,
        kind: str,
        platform: str,
        chat_id: str,
        user_id: str,
        user_name: str,
        platform_message_id: str | None,
        text: str,
        prompt: str,
        params: dict,
    ) -> int:
        """Record an incoming message and its request (queued); committed when this returns."""
        now = time.time()

        async def work(db):
            cur = await db.execute(
                "INSERT INTO messages (platform, chat_id, user_id, user_name, platform_message_id, text, received_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (platform, chat_id, user_id, user_name, platform_message_id, text, now),
            )
            cur = await db.execute(
                "INSERT INTO requests (message_id, kind, prompt, params, seed, status, received_at)"
                " VALUES (?, ?, ?, ?, ?, 'queued', ?)",
                (cur.lastrowid, kind, prompt, json.dumps(params), params.get("seed"), now),
            )
            return cur.lastrowid

        return await self._transaction(work)

    async def mark_running(self, request_id: int) -> None:
        await self._write("UPDATE requests SET status='running', started_at=? WHERE id=?", (time.time(), request_id))

    async def finish(
        self,
        request_id: int,
        *,
        reply: str,
        finish_reason: str,
        num_prompt_tokens: int,
        num_tokens: int,
        seed: int | None,
        first_token_at: float | None,
    ) -> None:
        if any(text in reply for text in self._erased_quotes.pop(request_id, ())):
            reply = ""  # it copied a message /forget erased while it ran: sent, but never stored or context
        await self._write(
            "UPDATE requests SET status='done', reply=?, finish_reason=?, num_prompt_tokens=?, num_tokens=?,"
            " seed=COALESCE(?, seed), first_token_at=?, done_at=? WHERE id=?",
            (reply, finish_reason, num_prompt_tokens, num_tokens, seed, first_token_at, time.time(), request_id),
        )

    async def fail(self, request_id: int, reason: str, status: str = "failed") -> None:
        self._erased_quotes.pop(request_id, None)
        await self._write(
            "UPDATE requests SET status=?, error=?, done_at=? WHERE id=? AND status IN ('queued', 'running')",
            (status, reason, time.time(), request_id),
        )

    async def recover(self) -> int:
        """After a crash or restart: requests left queued or running are failed with the reason."""
        cur_rows = await self._rows("SELECT COUNT(*) FROM requests WHERE status IN ('queued', 'running')")
        await self._write(
            "UPDATE requests SET status='failed', error='interrupted: botkit restarted before this "
            "finished',"
            " done_at=? WHERE status IN ('queued', 'running')",
            (time.time(),),
        )
        return cur_rows[0][0]

    async def request(self, request_id: int) -> dict | None:
        rows = await self._rows(
            "SELECT r.*, m.platform, m.chat_id, m.user_id, m.text FROM requests r"
            " JOIN messages m ON m.id = r.message_id WHERE r.id=?",
            (request_id,),
        )
        return dict(rows[0]) if rows else None

    async def recent(self, limit: int = 20, platform: str | None = None) -> list[dict]:
        rows = await self._rows(
            "SELECT r.id, r.kind, r.status, r.error, r.reply, r.finish_reason, r.num_tokens, r.received_at, r.done_at,"
            " m.platform, m.chat_id, m.text FROM requests r JOIN messages m ON m.id = r.message_id"
            " WHERE ? IS NULL OR m.platform = ? ORDER BY r.id DESC LIMIT ?",
            (platform, platform, limit),
        )
        return [dict(r) for r in rows]

    # -- deliveries -------------------------------------------------------------------------

    async def record_delivery(self, request_id: int, platform_message_ids: list[str]) -> None:
        """Record which platform messages carry the answer; nothing if /forget erased the request meanwhile."""
        rows = [(request_id, i, str(mid), time.time(), request_id) for i, mid in enumerate(platform_message_ids)]

        async def work(db):
            await db.executemany(
                "INSERT OR IGNORE INTO deliveries SELECT ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM requests WHERE id = ?)",
                rows,
            )

        await self._transaction(work)

    async def record_preview(self, request_id: int, part: int, platform_message_id: str | None) -> None:
        """Part `part` of a streamed reply shows in this message now (None: it was deleted)."""
        if platform_message_id is None:
            await self._write("DELETE FROM previews WHERE request_id=? AND part=?", (request_id, part))
        else:
            await self._write(
                "INSERT OR REPLACE INTO previews VALUES (?, ?, ?)", (request_id, part, str(platform_message_id))
            )

    async def previews(self, request_id: int) -> list[str]:
        """The messages a streamed reply showed in, part by part (none if it was not streamed)."""
        rows = await self._rows(
            "SELECT platform_message_id FROM previews WHERE request_id=? ORDER BY part", (request_id,)
        )
        return [r[0] for r in rows]

    async def is_delivered(self, request_id: int) -> bool:
        return bool(await self._rows("SELECT 1 FROM deliveries WHERE request_id=? LIMIT 1", (request_id,)))

    # -- chats ------------------------------------------------------------------------------

    async def chat_settings(self, platform: str, chat_id: str) -> dict:
        rows = await self._rows("SELECT settings FROM chats WHERE platform=? AND chat_id=?", (platform, chat_id))
        return json.loads(rows[0]["settings"]) if rows else {}

    async def set_chat_settings(self, platform: str, chat_id: str, settings: dict) -> None:
        await self._write(
            "INSERT INTO chats (platform, chat_id, settings) VALUES (?, ?, ?)"
            " ON CONFLICT DO UPDATE SET settings=excluded.settings",
            (platform, chat_id, json.dumps(settings)),
        )

    async def start_export(self, platform: str, chat_id: str) -> None:
        """Only messages the chat receives from now on may be exported (`botkit export-dataset`)."""
        await self._write(
            "INSERT INTO chats (platform, chat_id, export_since_message) VALUES (?, ?, (SELECT "
            "COALESCE(MAX(id), 0) FROM messages))"
            " ON CONFLICT DO UPDATE SET export_since_message=excluded.export_since_message",
            (platform, chat_id),
        )

    async def reset_context(self, platform: str, chat_id: str) -> None:
        last, last_message = (
            await self._rows(
                "SELECT (SELECT COALESCE(MAX(id), 0) FROM requests), (SELECT COALESCE(MAX(id), 0) FROM messages)"
            )
        )[0]
        await self._write(
            "INSERT INTO chats (platform, chat_id, context_since, context_since_message) VALUES (?, ?, "
            "?, ?)"
            " ON CONFLICT DO UPDATE SET context_since=excluded.context_since,"
            " context_since_message=excluded.context_since_message",
            (platform, chat_id, last, last_message),
        )

    async def keep_newest_context(self, platform: str, chat_id: str, keep: int) -> None:
        """From now on the chat's context starts after its `keep` newest answered exchanges' predecessor."""
        rows = await self._rows(
            "SELECT r.id FROM requests r JOIN messages m ON m.id = r.message_id"
            " WHERE m.platform=? AND m.chat_id=? AND r.kind='chat' AND r.status='done'"
            " ORDER BY r.id DESC LIMIT 1 OFFSET ?",
            (platform, chat_id, keep),
        )
        if rows:
            await self._write(
                "INSERT INTO chats (platform, chat_id, context_since) VALUES (?, ?, ?)"
                " ON CONFLICT DO UPDATE SET context_since=MAX(context_since, excluded.context_since)",
                (platform, chat_id, rows[0][0]),
            )

    async def context(self, platform: str, chat_id: str, limit: int) -> list[tuple[str, str]]:
        """The chat's last `limit` answered (message, reply) pairs since its /reset, oldest first."""
        rows = await self._rows(
            "SELECT m.text, r.reply FROM requests r JOIN messages m ON m.id = r.message_id"
            " WHERE m.platform=? AND m.chat_id=? AND r.kind='chat' AND r.status='done' AND trim(r.reply, ?) != ''"
            " AND r.id > COALESCE((SELECT context_since FROM chats WHERE platform=? AND chat_id=?), 0)"
            " ORDER BY r.id DESC LIMIT ?",
            (platform, chat_id, BLANK, platform, chat_id, limit),
        )
        return [(r["text"], r["reply"]) for r in reversed(rows)]

    # -- conversations (botkit/chat/conversation.py) ---------------------------------------------

    async def seen(self, platform: str, chat_id: str, event_id: str) -> bool:
        """Whether a platform event was handled already: it made a request or a context message, or was marked seen."""
        rows = await self._rows(
            "SELECT 1 FROM messages WHERE platform=? AND chat_id=? AND platform_message_id=?"
            " UNION ALL SELECT 1 FROM events WHERE platform=? AND chat_id=? AND event_id=? LIMIT 1",
            (platform, chat_id, event_id) * 2,
        )
        return bool(rows)

    async def mark_seen(self, platform: str, chat_id: str, event_id: str) -> None:
        await self._write(
            "INSERT OR IGNORE INTO events VALUES (?, ?, ?, ?)", (platform, chat_id, event_id, time.time())
        )

    async def add_channel_message(
        self,
        *,
        platform: str,
        chat_id: str,
        user_id: str,
        user_name: str,
        platform_message_id: str,
        text: str,
        keep: int,
    ) -> None:
        """Record a message that asked for nothing, as channel context; the chat keeps its newest `keep` of them."""

        async def work(db):
            await db.execute(
                "INSERT INTO messages (platform, chat_id, user_id, user_name, platform_message_id, text, received_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (platform, chat_id, user_id, user_name, platform_message_id, text, time.time()),
            )
            await db.execute(
                "DELETE FROM messages WHERE id IN (SELECT m.id FROM messages m WHERE m.platform=? AND m.chat_id=?"
                " AND NOT EXISTS (SELECT 1 FROM requests r WHERE r.message_id = m.id) ORDER BY m.id DESC LIMIT -1 "
                "OFFSET ?)",
                (platform, chat_id, keep),
            )

        await self._transaction(work)

    async def keep_newest_channel_context(self, platform: str, chat_id: str, keep: int) -> None:
        """From now on the chat's channel context starts after its `keep` newest messages' predecessor."""
        rows = await self._rows(
            "SELECT m.id FROM messages m LEFT JOIN requests r ON r.message_id = m.id"
            " WHERE m.platform=? AND m.chat_id=? AND (r.id IS NULL OR r.kind = 'chat') ORDER BY m.id DESC LIMIT 1 "
            "OFFSET ?",
            (platform, chat_id, keep),
        )
        if rows:
            await self._write(
                "INSERT INTO chats (platform, chat_id, context_since_message) VALUES (?, ?, ?) ON "
                "CONFLICT DO UPDATE"
                " SET context_since_message=MAX(context_since_message, excluded.context_since_message)",
                (platform, chat_id, rows[0][0]),
            )

    async def channel_context(self, platform: str, chat_id: str, limit: int) -> list[tuple[str, str, str | None]]:
        """The chat's last `limit` messages since its /reset, oldest first: (author, text, the bot's reply or None)."""
        rows = await self._rows(
            "SELECT m.user_name, m.text, CASE WHEN r.status = 'done' AND trim(r.reply, ?) != '' THEN r.reply END AS "
            "reply"
            " FROM messages m LEFT JOIN requests r ON r.message_id = m.id"
            " WHERE m.platform=? AND m.chat_id=? AND (r.id IS NULL OR r.kind = 'chat')"
            " AND m.id > COALESCE((SELECT context_since_message FROM chats WHERE platform=? AND chat_id=?), 0)"
            " ORDER BY m.id DESC LIMIT ?",
            (BLANK, platform, chat_id, platform, chat_id, limit),
        )
        return [(r["user_name"], r["text"], r["reply"]) for r in reversed(rows)]

    async def max_request_id(self) -> int:
        return (await self._rows("SELECT COALESCE(MAX(id), 0) FROM requests"))[0][0]

    async def claim_answer(self, request_id: int, kind: str) -> bool:
        """Record that an answer to `request_id` starts being sent now; False if one already was (or a
        delivery is recorded). From this moment the request counts as answered, even if botkit dies
        before the platform confirms the message: a reply is never sent twice. A request that /forget
        erased while it was in flight is answered once, from memory, and nothing about it is recorded."""

        async def work(db):
            if not await (await db.execute("SELECT 1 FROM requests WHERE id=?", (request_id,))).fetchone():
                return True
            if await (
                await db.execute("SELECT 1 FROM deliveries WHERE request_id=? LIMIT 1", (request_id,))
            ).fetchone():
                return False
            cur = await db.execute("INSERT OR IGNORE INTO answers VALUES (?, ?, ?)", (request_id, kind, time.time()))
            return cur.rowcount == 1

        return await self._transaction(work)

    async def owed_answers(self, platform: str, up_to_id: int) -> list[dict]:
        """Chat requests of `platform` (ids up to `up_to_id`) whose answer never began to be sent, oldest first."""
        rows = await self._rows(
            "SELECT r.id, r.status, r.error, r.reply, r.received_at, m.chat_id, m.platform_message_id FROM requests r"
            " JOIN messages m ON m.id = r.message_id WHERE m.platform=? AND r.kind='chat' AND r.id <= ?"
            " AND r.id > COALESCE((SELECT value FROM meta WHERE key = 'answers_owed_after:' || ?),"
            " (SELECT value FROM meta WHERE key = 'answers_owed_after'))"
            " AND NOT EXISTS (SELECT 1 FROM answers a WHERE a.request_id = r.id)"
            " AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.request_id = r.id) ORDER BY r.id",
            (platform, up_to_id, platform),
        )
        return [dict(r) for r in rows]

    async def settle_owed(self, platform: str, up_to_id: int) -> None:
        """Every answer `platform` owed up to `up_to_id` was given: later restarts look only past it."""
        await self._write(
            "INSERT INTO meta VALUES ('answers_owed_after:' || ?, ?)"
            " ON CONFLICT(key) DO UPDATE SET value = MAX(value, excluded.value)",
            (platform, up_to_id),
        )

    async def requeue(self, request_id: int) -> bool:
        """Put a request interrupted by a restart back in the queued state; False if it is not one (or
        /forget blanked its prompt)."""

        async def work(db):
            cur = await db.execute(
                "UPDATE requests SET status='queued', error=NULL, done_at=NULL, started_at=NULL"
                " WHERE id=? AND status='failed' AND error LIKE 'interrupted:%' AND prompt != ''",
                (request_id,),
            )
            return cur.rowcount == 1

        return await self._transaction(work)

    # -- privacy ----------------------------------------------------------------------------

    async def blank_prompt(self, request_id: int) -> None:
        """Blank one request's stored prompt (built from context that /forget erased meanwhile)."""
        await self._write("UPDATE requests SET prompt = '' WHERE id=?", (request_id,))
        if not await self._try_emptying_wal():
            self._wal_holds_erased.set()

    async def forget(self, platform: str, chat_id: str, user_id: str | None = None) -> int:
        """Erase a member's messages in a chat (everyone's if `user_id` is None); see `_erase`."""
        who = "platform=? AND chat_id=?" + (" AND user_id=?" if user_id is not None else "")
        args = (platform, chat_id) + ((user_id,) if user_id is not None else ())
        return await self._erase(f"SELECT id FROM messages WHERE {who}", args)

    async def prune(self, older_than: float) -> int:
        """Erase messages received before `older_than` (a time.time()); requests still in flight are kept."""
        return await self._erase(
            "SELECT m.id FROM messages m WHERE m.received_at < ? AND NOT EXISTS"
            " (SELECT 1 FROM requests r WHERE r.message_id = m.id AND r.status IN ('queued', "
            "'running'))",
            (older_than,),
        )

    async def forget_events(self, older_than: float) -> None:
        """Drop duplicate-event markers older than `older_than`: platforms redeliver within minutes."""
        await self._write("DELETE FROM events WHERE seen_at < ?", (older_than,))

    async def vacuum(self) -> None:
        """Rewrite the file without its free pages (erased rows leave them) and empty the WAL."""
        async with self._lock:
            await self._run_to_end("VACUUM")
            await self._run_to_end("PRAGMA wal_checkpoint(TRUNCATE)")

    async def _run_to_end(self, sql: str) -> None:
        """A statement outside any transaction, stepped to its end (an unfinished one would block VACUUM)."""
        async with self.db.execute(sql) as cursor:
            await cursor.fetchall()

    async def _erase(self, select_messages: str, args: tuple) -> int:
        """Erase the messages `select_messages` picks, with their requests, the replies and delivery
        records, and blank the stored prompts of the chat's other requests that quote one of them as
        context (those in flight too: their prompt is in memory, and a blank one is never requeued); the text is
        overwritten on disk (secure_delete, then the WAL is truncated).
        Returns how many messages were erased."""
        requests = f"SELECT id FROM requests WHERE message_id IN ({select_messages})"
        quoting = (
            "UPDATE requests SET prompt = '' WHERE prompt != ''"
            " AND EXISTS (SELECT 1 FROM messages q JOIN messages f ON f.platform = q.platform AND f.chat_id = "
            "q.chat_id"
            f" WHERE q.id = requests.message_id AND f.id IN ({select_messages}) AND instr(requests.prompt, "
            "f.text) > 0)"
        )

        in_flight_quotes = (
            "SELECT r.id, f.text FROM requests r JOIN messages q ON q.id = r.message_id"
            " JOIN messages f ON f.platform = q.platform AND f.chat_id = q.chat_id"
            f" WHERE r.status IN ('queued', 'running') AND f.id IN ({select_messages})"
            " AND f.text != '' AND instr(r.prompt, f.text) > 0"
        )

        async def work(db):
            for request_id, text in await (await db.execute(in_flight_quotes, args)).fetchall():
                self._erased_quotes.setdefault(request_id, []).append(text)
            await db.execute(quoting, args)
            for table in ("deliveries", "answers", "previews"):
                await db.execute(f"DELETE FROM {table} WHERE request_id IN ({requests})", args)
            await db.execute(f"DELETE FROM requests WHERE message_id IN ({select_messages})", args)
            return (await db.execute(f"DELETE FROM messages WHERE id IN ({select_messages})", args)).rowcount

        async with self._lock:
            await self._run_to_end("PRAGMA secure_delete=ON")  # erased text is overwritten, not left in free pages
        erased = await self._transaction(work)
        if not await self._try_emptying_wal():  # the WAL's copies of those pages go too, now or once readers let go
            self._wal_holds_erased.set()
        return erased

    async def _try_emptying_wal(self) -> bool:
        """One try at emptying the WAL that waits for nobody: False while another connection (a backup
        tool such as Litestream) reads a snapshot that still needs the WAL's old pages."""
        async with self._lock:
            try:
                await self._run_to_end("PRAGMA busy_timeout=0")
                try:
                    async with self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)") as cursor:
                        is_busy, num_wal_frames, _ = await cursor.fetchone()
                finally:
                    await self._run_to_end("PRAGMA busy_timeout=5000")
            except sqlite3.Error as exc:
                log.warning("emptying the WAL after an erase failed (%s); retrying", exc)
                return False
        return not is_busy and num_wal_frames <= 0

    async def _keep_emptying_wal(self) -> None:
        """While the store is open: after an erase whose WAL could not be emptied at once, retry (backing
        off) until it is, so the erased text leaves the disk as soon as the last old reader ends."""
        while True:
            await self._wal_holds_erased.wait()
            self._wal_holds_erased.clear()  # an erase during the tries below sets it again: one more round
            wait_s = WAL_RETRY_S[0]
            while not await self._try_emptying_wal():
                await asyncio.sleep(wait_s)
                wait_s = min(2 * wait_s, WAL_RETRY_S[1])


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
            raise ConfigError(
                f"botkit cannot create {self.path} ({exc.strerror}): give the user running botkit write "
                "access to that folder."
            ) from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(self.fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(self.fd)
            raise ConfigError(
                f"Another botkit (process {owner}) is already using the database "
                f"{self.path.with_suffix('')}: "
                "stop it first, or set [store] path to another file."
            ) from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)  # releases the lock; the file stays (deleting it would race a starting instance)
