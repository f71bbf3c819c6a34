"""Replies survive a crash: `botkit run` (Discord and Telegram, real clients against the fake servers)
is SIGKILLed while 10 requests are in flight, then started again. Every asker gets exactly one
answer, as a reply to their message: the reply generated after the restart, or, for requests older
than `[conversation] resume_max_age_s` (five of them are aged an hour while the bot is down, as if it
had been down that long), the "sorry, I restarted" notice. Nobody is answered twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import sys
import time
from pathlib import Path

from fake_discord import ALICE, BOB, FakeDiscord
from fake_telegram import FakeTelegram

from botkit.chat.conversation import SORRY

NUM_PER_PLATFORM = 5
READY_TIMEOUT_S = 120.0

# `botkit run` itself, with discord.py pointed at the fake (the only thing a config cannot say).
DRIVER = """
import sys, warnings, yarl
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import discord
discord.http.Route.BASE = sys.argv[2]
discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(sys.argv[3])
import time
from botkit.engine.engine import Engine
step = Engine.step
Engine.step = lambda self: (time.sleep(0.01), step(self))[1]  # a tiny model is too quick for "all in flight"
from botkit.cli import main
sys.exit(main(["run", "--config", sys.argv[1]]))
"""


def _config(tmp_path: Path, telegram_url: str) -> Path:
    path = tmp_path / "bot.toml"
    path.write_text(f"""
[model]
source = "{tmp_path / "model"}"
device = "cpu"
[batch]
max_size = 2  # the ten requests wait their turn: all are in flight when the kill comes
[store]
path = "{tmp_path / "bot.db"}"
[limits]
user_per_minute = 0
chat_per_minute = 0
[chat]
length = 300
truncate = ""
[web]
enabled = false
[discord]
enabled = true
token_env = "BOTKIT_TEST_DISCORD"
queue_notice_s = 600.0
[telegram]
enabled = true
token_env = "BOTKIT_TEST_TELEGRAM"
base_url = "{telegram_url}"
chat_send_interval_s = 0.0
queue_notice_s = 600.0
""")
    return path


def _rows(db: Path, sql: str) -> list[tuple]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return conn.execute(sql).fetchall()


async def _start(tmp_path: Path, dfake: FakeDiscord, tfake: FakeTelegram, run: int) -> asyncio.subprocess.Process:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "BOTKIT_TEST_DISCORD": dfake.token, "BOTKIT_TEST_TELEGRAM": tfake.token, "PTB_TIMEDELTA": "1"}
    with (tmp_path / f"run{run}.log").open("w") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(driver),
            str(_config(tmp_path, tfake.url)),
            dfake.api_url,
            dfake.gateway_url,
            stdout=log,
            stderr=log,
            env=env,
            cwd=tmp_path,
        )
    polls = len(tfake.calls_of("getUpdates", outcome=None))
    await dfake.wait_connected(num_sessions=run + 1, timeout_s=READY_TIMEOUT_S)
    await tfake.wait_for("getUpdates", polls + 1, outcome=None, timeout_s=READY_TIMEOUT_S)
    return proc


def _answers(dfake: FakeDiscord, tfake: FakeTelegram, asked: list[dict]) -> list[list[tuple[str, str]]]:
    """For each message asked, the bot's messages replying to it (id, text): one answer, in parts if it was long."""
    result = []
    for message in asked:
        if "message_id" in message:  # Telegram
            result.append(
                [
                    (str(m["message_id"]), m["text"])
                    for m in tfake.sent(message["chat"]["id"])
                    if m.get("reply_to_message", {}).get("message_id") == message["message_id"]
                ]
            )
        else:
            result.append(
                [
                    (str(m["id"]), m["content"])
                    for m in dfake.bot_messages()
                    if m.get("message_reference", {}).get("message_id") == message["id"]
                ]
            )
    return result


async def test_sigkill_with_ten_requests_in_flight_then_every_asker_gets_one_answer(tmp_path, tiny_lm, monkeypatch):
    tiny_lm.model.save_pretrained(tmp_path / "model")
    db = tmp_path / "bot.db"
    async with FakeDiscord() as dfake, FakeTelegram() as tfake:
        proc = await _start(tmp_path, dfake, tfake, run=0)
        asked = []
        for i in range(NUM_PER_PLATFORM):
            asked.append(await dfake.send_message(f"discord story {i}", author=(ALICE, BOB)[i % 2], mention_bot=True))
            asked.append(tfake.push_message(-100 - i, f"@botkit_bot telegram story {i}", user_id=10 + i))
        started = time.monotonic()
        while len(_rows(db, "SELECT id FROM requests WHERE status IN ('queued', 'running')")) < 2 * NUM_PER_PLATFORM:
            assert time.monotonic() - started < 60, "the ten requests never were in flight together"
            await asyncio.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        in_flight = _rows(db, "SELECT COUNT(*) FROM requests WHERE status IN ('queued', 'running')")[0][0]
        answered_before = sum(map(len, _answers(dfake, tfake, asked)))
        # While the bot is down, every other request ages an hour, as if the bot had been down that long.
        aged = [r for (r,) in _rows(db, "SELECT id FROM requests ORDER BY id")][::2]
        with contextlib.closing(sqlite3.connect(db)) as conn:
            conn.execute(
                f"UPDATE requests SET received_at = received_at - 3600 WHERE id IN ({','.join(map(str, aged))})"
            )
            conn.commit()

        proc = await _start(tmp_path, dfake, tfake, run=1)
        try:
            started = time.monotonic()
            while not all(_answers(dfake, tfake, asked)):
                assert proc.returncode is None, (tmp_path / "run1.log").read_text()[-2000:]
                assert time.monotonic() - started < 180, (
                    f"unanswered after the restart: {_answers(dfake, tfake, asked)}"
                )
                await asyncio.sleep(0.1)
            # Sentinels, not a wait, before looking for a second answer: each platform's resume has ended (it
            # marks what it owed as given after its last answer), and a message sent now is answered (the
            # redelivered events that came before it were handled first).
            while len(_rows(db, "SELECT key FROM meta WHERE key LIKE 'answers_owed_after:%'")) < 2:
                assert time.monotonic() - started < 180, "the restart never finished answering what it owed"
                await asyncio.sleep(0.1)
            sentinels = [
                await dfake.send_message("discord sentinel", author=ALICE, mention_bot=True),
                tfake.push_message(-100, "@botkit_bot telegram sentinel", user_id=99),
            ]
            # sent whole, not streaming
            while _rows(db, "SELECT COUNT(DISTINCT request_id) FROM deliveries") != [(12,)]:
                assert time.monotonic() - started < 180, "the sentinels were not answered"
                await asyncio.sleep(0.1)
            answers = _answers(dfake, tfake, asked)
            num_sentinel_parts = sum(map(len, _answers(dfake, tfake, sentinels)))
        finally:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 60)
    assert proc.returncode == 0 and "Traceback" not in (tmp_path / "run1.log").read_text()
    assert in_flight == 2 * NUM_PER_PLATFORM and answered_before == 0
    by_request = {
        r: (chat, mid)
        for r, chat, mid in _rows(
            db, "SELECT r.id, m.chat_id, m.platform_message_id FROM requests r JOIN messages m ON m.id = r.message_id"
        )
    }
    delivered = {by_request[r]: [] for r in by_request}  # each request's answer: the parts recorded as sent, in order
    for r, mid in _rows(db, "SELECT request_id, platform_message_id FROM deliveries ORDER BY request_id, part"):
        delivered[by_request[r]].append(mid)
    sorry = {by_request[r] for r in aged}
    for message, answer in zip(asked, answers, strict=True):
        key = (
            str(message.get("channel_id") or message["chat"]["id"]),
            str(message.get("id") or message.get("message_id")),
        )
        # Exactly one answer: every message replying to it is a part of its request's one recorded answer.
        assert [mid for mid, _ in answer] == delivered[key], (key, answer, delivered[key])
        text = "".join(t for _, t in answer)
        assert (text == SORRY) == (key in sorry), (key, text)
        assert text.strip()
    kinds = _rows(db, "SELECT kind, COUNT(*) FROM answers GROUP BY kind ORDER BY kind")
    assert kinds == [("reply", NUM_PER_PLATFORM + 2), ("sorry", NUM_PER_PLATFORM)]  # + the 2 sentinels
    assert _rows(db, "SELECT COUNT(DISTINCT request_id), COUNT(*) FROM deliveries") == [
        (12, sum(map(len, answers)) + num_sentinel_parts)
    ]  # a part each message
    print(
        f"\ncrash (chat): {in_flight} in flight at the SIGKILL; after the restart {NUM_PER_PLATFORM} replies and"
        f" {NUM_PER_PLATFORM} 'sorry', each a reply to its message, 0 answered twice"
    )
