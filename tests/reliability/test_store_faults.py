"""The store under faults: one botkit per database, all-or-nothing writes, a full disk, and
database files that cannot be used. Each test failed before its fix."""

import asyncio
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
from contextlib import closing
from pathlib import Path

import pytest

from botkit.chat.chats import Chats, Prompt
from botkit.cli import serve
from botkit.config import Config, StoreConfig, WebConfig
from botkit.errors import BusyError, ConfigError, InputError
from botkit.params import SamplingParams
from botkit.serve.core import Core
from botkit.serve.store import Store

from .conftest import EchoBackend, make_config


def status_of(path, request_id) -> str:
    with closing(sqlite3.connect(path)) as db:
        return db.execute("SELECT status FROM requests WHERE id=?", (request_id,)).fetchone()[0]


async def queued_request(store: Store, text: str = "hello") -> int:
    return await store.add_request(
        kind="chat",
        platform="web",
        chat_id="c",
        user_id="u",
        user_name="",
        platform_message_id=None,
        text=text,
        prompt=text,
        params={},
    )


# -- a second `botkit run` on the same database ---------------------------------------------------


async def test_a_second_instance_on_the_same_database_is_refused_before_it_touches_a_record(tmp_path):
    path = tmp_path / "bot.db"
    async with Store.open(path) as first:
        live = await queued_request(first)  # a request the first instance is working on
        config = Config(store=StoreConfig(path=str(path)), web=WebConfig(port=0))
        with pytest.raises(ConfigError) as refused:
            await serve(config, stop=asyncio.Event())
        assert f"process {os.getpid()}" in str(refused.value) and "another file" in str(refused.value)
        assert status_of(path, live) == "queued"  # not marked interrupted by the second one's recovery
    async with Store.open(path):  # the lock goes with the first instance
        pass


async def test_a_taken_port_is_found_before_the_store_is_touched(tmp_path):
    path = tmp_path / "bot.db"
    async with Store.open(path) as store:
        left = await queued_request(store)  # left by a crash: the next start that succeeds recovers it
    with socket.create_server(("127.0.0.1", 0)) as taken:
        config = Config(store=StoreConfig(path=str(path)), web=WebConfig(port=taken.getsockname()[1]))
        with pytest.raises(Exception, match="cannot listen") as refused:
            await serve(config, stop=asyncio.Event())
    assert "Traceback" not in str(refused.value)
    assert status_of(path, left) == "queued"


def test_a_killed_instance_leaves_no_lock_behind(tmp_path):
    path = tmp_path / "bot.db"
    code = (
        "import asyncio, sys, time\nfrom botkit.serve.store import Store\n"
        "async def main():\n    async with Store.open(sys.argv[1]):\n        print('open', flush=True); "
        "time.sleep(60)\n"
        "asyncio.run(main())\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(ConfigError, match=f"process {holder.pid}"):
            asyncio.run(_open_and_close(path))
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    asyncio.run(_open_and_close(path))  # SIGKILL released it


async def _open_and_close(path):
    async with Store.open(path):
        pass


# -- a failed write leaves nothing behind ------------------------------------------------------------


async def test_a_seed_of_2_to_the_63_is_refused_with_a_sentence():
    with pytest.raises(InputError, match="2\\^63"):
        SamplingParams(seed=2**63)
    assert SamplingParams(seed=2**63 - 1).seed == 2**63 - 1


async def test_a_write_that_fails_halfway_leaves_no_orphan_rows(tmp_path):
    path = tmp_path / "bot.db"
    async with Store.open(path) as store:
        with pytest.raises(OverflowError):  # the second INSERT cannot bind the seed
            await store.add_request(
                kind="completion",
                platform="api",
                chat_id="c",
                user_id="u",
                user_name="",
                platform_message_id=None,
                text="orphan?",
                prompt="orphan?",
                params={"seed": 2**64},
            )
        ok = await queued_request(store, "the next one")
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT text FROM messages").fetchall() == [("the next one",)]
        assert db.execute("SELECT id FROM requests").fetchall() == [(ok,)]


# -- a full disk ---------------------------------------------------------------------------------------


async def fill_up(store: Store) -> None:
    """SQLite's own limit on the file's pages: every write that needs a new page fails as on a full disk."""
    for _ in range(3):  # fill the pages the tables have
        await queued_request(store, "y" * 1000)
    (pages,) = await (await store.db.execute("PRAGMA page_count")).fetchone()
    await store.db.execute(f"PRAGMA max_page_count={pages}")


async def test_a_full_disk_is_said_to_be_a_full_disk(tmp_path):
    async with (
        Store.open(tmp_path / "bot.db") as store,
        EchoBackend() as backend,
        Core(backend, store, make_config()) as core,
    ):
        chats = Chats(core, store, core.config)
        await fill_up(store)
        with pytest.raises(BusyError) as refused:
            await chats.submit(Prompt("web", "c", "u", "x" * 3000))
        assert "disk is full" in str(refused.value) and "busy" not in str(refused.value)


async def test_an_accepted_request_is_answered_and_settled_once_the_disk_has_room(tmp_path, monkeypatch):
    monkeypatch.setattr("botkit.serve.core.SETTLE_RETRY_S", 0.05)
    path = tmp_path / "bot.db"
    async with Store.open(path) as store, EchoBackend() as backend, Core(backend, store, make_config()) as core:
        chats = Chats(core, store, core.config)
        backend.reply = "z" * 20_000  # a reply that needs new pages
        await fill_up(store)
        ticket = await chats.submit(Prompt("web", "c", "u", "hi"))  # fits the free space of the last page
        reply = await asyncio.wait_for(ticket.result(), 10)
        assert reply.text == "z" * 20_000  # the caller is answered although the store could not record it
        assert status_of(path, ticket.request_id) in ("queued", "running")
        await store.db.execute("PRAGMA max_page_count=1000000")  # room again
        for _ in range(100):
            if status_of(path, ticket.request_id) == "done":
                break
            await asyncio.sleep(0.05)
        assert status_of(path, ticket.request_id) == "done"


# -- database files that cannot be used ------------------------------------------------------------


@pytest.mark.parametrize(
    "content, says",
    [
        (b"this is not a database at all\n" * 100, "not a botkit database"),
        (None, "not a botkit database"),  # a real database cut in half
    ],
)
async def test_a_garbage_or_truncated_database_is_one_sentence(tmp_path, content, says):
    path = tmp_path / "bot.db"
    if content is None:
        async with Store.open(path) as store:
            for i in range(200):
                await queued_request(store, f"message {i} " * 50)
        with closing(sqlite3.connect(path)) as db:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        content = path.read_bytes()[: path.stat().st_size // 2]
        for extra in ("bot.db-wal", "bot.db-shm"):
            (tmp_path / extra).unlink(missing_ok=True)
    path.write_bytes(content)
    with pytest.raises(ConfigError) as refused:
        async with Store.open(path) as store:
            await store.recover()
    message = str(refused.value)
    assert says in message and "\n" not in message and message.endswith(".")


async def test_a_store_path_that_is_a_folder_is_one_sentence(tmp_path):
    with pytest.raises(ConfigError, match="is a folder"):
        async with Store.open(tmp_path):
            pass


def run_as_another_user(code: str, *args: str) -> subprocess.CompletedProcess:
    """Root ignores file modes, so the check runs as `nobody` when the tests run as root."""
    drop = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.getuid() == 0 else []
    if drop and not shutil.which("setpriv"):
        pytest.skip("needs setpriv to drop root's privileges")
    return subprocess.run([*drop, sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60)


OPEN = (
    "import asyncio, sys\nfrom botkit.serve.store import Store\nfrom botkit.errors import BotkitError\n"
    "async def main():\n    async with Store.open(sys.argv[1]) as s:\n        await s.recover()\n"
    "try:\n    asyncio.run(main()); print('opened')\nexcept BotkitError as e:\n    print(e)\n"
)


@pytest.mark.parametrize("what", ["file", "folder"])
def test_a_read_only_database_or_folder_is_one_sentence(what):
    folder = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        path = folder / "bot.db"
        asyncio.run(_open_and_close(path))
        for extra in ("bot.db-wal", "bot.db-shm"):
            (folder / extra).unlink(missing_ok=True)
        os.chmod(path, 0o666 if what == "folder" else 0o444)
        os.chmod(folder, 0o555 if what == "folder" else 0o777)
        out = run_as_another_user(OPEN, str(path))
        assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
        message = out.stdout.strip()
        assert "write access" in message and "\n" not in message and message.endswith("."), message
    finally:
        os.chmod(folder, 0o755)
        shutil.rmtree(folder)
