"""Streamed replies in chats (issue 22.1): how soon text shows, and how many updates a reply costs.

8 chats at once, each sends one message that asks for a reply, through the real adapters (python-
telegram-bot, discord.py) against the test suite's fake servers, the real Core and a LocalBackend
with the bundled demo model (4 layers, width 256: the model `botkit chat` starts with), on CPU, the
chat defaults (sampled, `unique` on) but `length = 60` and no `truncate`: replies of up to 60 tokens.

Arms, one after another in this process, each with the platform's default pace:
- Telegram private chats, stream off: the reply appears whole (the baseline);
- Telegram private chats, stream on: drafts (sendMessageDraft) every 1 s, then the message;
- Telegram groups, stream on: the message sent early and edited every 6 s;
- Discord, 8 mentions in one channel, stream on: the message sent early and edited every 1 s;
- the baseline again, to show how much the shared machine drifted during the run.
A warm-up round of the baseline runs first and is not counted.

Figures per arm: time from the message to its first visible text and to its whole reply (median
over the 8 replies), and the Bot API / REST calls that showed text per reply (drafts, sends, edits).
Progress goes to stderr; the last stdout line is one JSON object.

    python benchmarks/stream.py
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the fake servers and drivers
from fake_discord import ALICE, BOB, CHANNEL_ID  # noqa: E402
from platforms import platform  # noqa: E402
from scripted import deliveries  # noqa: E402

from botkit.config import BatchConfig, Config, LimitsConfig  # noqa: E402
from botkit.model.loading import load_model  # noqa: E402
from botkit.params import ChatSettings  # noqa: E402
from botkit.serve.backends import LocalBackend  # noqa: E402

NUM_CHATS = 8
SHOWING = ("sendmessage", "sendmessagedraft", "editmessagetext")


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def config(stream: bool) -> Config:
    return Config(
        chat=ChatSettings(length=60, truncate="", use_context=False, stream=stream),
        limits=LimitsConfig(user_per_minute=0, chat_per_minute=0),
        batch=BatchConfig(timeout_s=3600),
    )


async def telegram_arm(lm, tmp: Path, *, private: bool, stream: bool) -> list[dict]:
    async with platform(
        "telegram",
        tmp,
        pytest.MonkeyPatch(),
        LocalBackend(lm, max_batch_size=NUM_CHATS),
        config(stream),
        chat_send_interval_s=1.0,
    ) as bot:
        fake, sent = bot.fake, []
        for i in range(NUM_CHATS):
            chat_id = 101 + i if private else -101 - i
            sent.append((chat_id, time.monotonic()))
            fake.push_message(chat_id, "Tell me a story" if private else "@botkit_bot tell me a story", user_id=101 + i)
        while len(deliveries(tmp)) < NUM_CHATS:
            await asyncio.sleep(0.05)
        records = []
        for chat_id, at in sent:
            calls = [
                c
                for c in fake.calls
                if c.outcome == "ok" and c.method.lower() in SHOWING and c.params["chat_id"] == chat_id
            ]
            records.append({"first_s": calls[0].at - at, "whole_s": calls[-1].at - at, "num_updates": len(calls)})
    return records


async def discord_arm(lm, tmp: Path) -> list[dict]:
    async with platform(
        "discord", tmp, pytest.MonkeyPatch(), LocalBackend(lm, max_batch_size=NUM_CHATS), config(True)
    ) as bot:
        fake, sent = bot.fake, []
        for i in range(NUM_CHATS):
            at = time.monotonic()
            sent.append(
                (
                    await fake.send_message(
                        "tell me a story", author=(ALICE, BOB)[i % 2], channel_id=CHANNEL_ID, mention_bot=True
                    ),
                    at,
                )
            )
        while len(deliveries(tmp)) < NUM_CHATS:
            await asyncio.sleep(0.05)
        records = []
        for message, at in sent:
            ids = {
                m["id"]
                for m in fake.bot_messages()
                if m.get("message_reference", {}).get("message_id") == message["id"]
            }
            calls = [
                r
                for r in fake.requests
                if isinstance(r.json, dict)
                and (
                    (r.method == "POST" and (r.json.get("message_reference") or {}).get("message_id") == message["id"])
                    or (r.method == "PATCH" and r.path.rsplit("/", 1)[-1] in ids)
                )
            ]
            records.append({"first_s": calls[0].at_s - at, "whole_s": calls[-1].at_s - at, "num_updates": len(calls)})
    return records


def summary(records: list[dict]) -> dict:
    return {
        "first_visible_s": statistics.median(r["first_s"] for r in records),
        "whole_reply_s": statistics.median(r["whole_s"] for r in records),
        "updates_per_reply": statistics.mean(r["num_updates"] for r in records),
    }


async def run(lm) -> dict:
    arms = {}
    off = lambda tmp: telegram_arm(lm, tmp, private=True, stream=False)  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:  # warm-up, not counted: the first forward passes are slower
        await off(Path(tmp))
    for name, make in [
        ("telegram private, stream off", off),
        ("telegram private, drafts", lambda tmp: telegram_arm(lm, tmp, private=True, stream=True)),
        ("telegram groups, edits", lambda tmp: telegram_arm(lm, tmp, private=False, stream=True)),
        ("discord channel, edits", lambda tmp: discord_arm(lm, tmp)),
        ("telegram private, stream off, again", off),
    ]:  # the machine's drift over the run
        with tempfile.TemporaryDirectory() as tmp:
            arms[name] = summary(await make(Path(tmp)))
        a = arms[name]
        log(
            f"{name}: first text {a['first_visible_s']:.2f} s, whole reply {a['whole_reply_s']:.2f} s,"
            f" {a['updates_per_reply']:.1f} updates per reply"
        )
    return arms


def main() -> None:
    log("loading the bundled demo model")
    lm = load_model(device="cpu")  # no name: the bundled demo model
    arms = asyncio.run(run(lm))
    base = arms["telegram private, stream off"]["whole_reply_s"]
    for figures in arms.values():
        figures["first_visible_vs_whole_off"] = figures["first_visible_s"] / base
    print(json.dumps({"num_chats": NUM_CHATS, "arms": arms}))


if __name__ == "__main__":
    main()
