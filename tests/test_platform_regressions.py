"""Command replies never ping, and an unreachable Telegram at start is one sentence: regressions of
the conversation layer and the Telegram adapter, each failed before its fix."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from botkit.adapters.telegram_adapter import TelegramAdapter
from platforms import GROUP, platform, until
from scripted import ScriptedBackend

from botkit.chat.chats import Chats
from botkit.config import Config, TelegramConfig
from botkit.errors import BotkitError
from botkit.serve.core import Core
from botkit.serve.store import Store

# What each platform turns into a notification: Telegram any @username, Discord ids and mass mentions.
PINGS = {"telegram": re.compile(r"(?<!\w)@\w"), "discord": re.compile(r"<@[!&]?\d+>|@(everyone|here)\b")}
CLOSED_PORT_URL = "http://127.0.0.1:9"  # the discard port: nothing listens on it here


@pytest.mark.parametrize("name", ["telegram", "discord"])
async def test_command_replies_never_ping(tmp_path, monkeypatch, name):
    """`/settings @victim` answered with a live mention; an admin template with `@name` pinged on every listing."""
    async with platform(name, tmp_path, monkeypatch, ScriptedBackend(), Config()) as bot:
        template = "@victim <@123456789012345678> @everyone says: {message}"
        texts = []
        for args, admin in [
            (("settings", "@victim"), False),
            (("settings", "<@123456789012345678>"), False),
            (("settings", f"template {template}"), True),
            (("settings",), False),
            (("forget", "@here"), False),
        ]:
            asked = await bot.command(GROUP, *args, admin=admin)
            await until(lambda asked=asked: bot.answers(asked))
            texts += bot.answers(asked)
        settings = await bot.adapter.conversation.chats.settings(name, str(bot.chat_id(GROUP)))
    assert settings.template == template  # stored as typed; only what is sent is defused
    assert "victim" in texts[0] and "victim" in texts[3] and "everyone" in texts[3]
    assert not [t for t in texts if PINGS[name].search(t) or PINGS["discord"].search(t)], texts


async def test_telegram_unreachable_at_start_is_one_sentence(tmp_path, monkeypatch):
    """The Telegram API unreachable at start gave a 126-line traceback."""
    monkeypatch.setenv("PTB_TIMEDELTA", "1")
    config = TelegramConfig(enabled=True, base_url=CLOSED_PORT_URL, request_timeout_s=2.0)
    async with Store.open(tmp_path / "bot.db") as store, ScriptedBackend() as backend, Core(backend, store) as core:
        with pytest.raises(BotkitError) as caught:
            async with TelegramAdapter(Chats(core, store, core.config), config, "1000:SECRET-TOKEN-VALUE"):
                pass
    message = str(caught.value)
    assert message == (
        "Could not reach Telegram's Bot API at 127.0.0.1:9 (NetworkError); check the network"
        " (and [telegram] base_url), then start again."
    )
    assert caught.value.__cause__ is not None and caught.value.__suppress_context__  # the CLI shows only the sentence


def test_botkit_run_says_one_sentence_when_telegram_is_unreachable(tmp_path, tiny_lm):
    tiny_lm.model.save_pretrained(tmp_path / "model")
    config = tmp_path / "bot.toml"
    config.write_text(
        f'[model]\nsource = "{tmp_path / "model"}"\ndevice = "cpu"\n[store]\npath = '
        f'"{tmp_path / "bot.db"}"\n'
        f'[web]\nenabled = false\n[telegram]\nenabled = true\ntoken_env = "BOTKIT_TEST_TELEGRAM"\n'
        f'base_url = "{CLOSED_PORT_URL}"\nrequest_timeout_s = 2.0\n'
    )
    env = {**os.environ, "BOTKIT_TEST_TELEGRAM": "1000:SECRET-TOKEN-VALUE", "PTB_TIMEDELTA": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "botkit", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
        env=env,
    )
    errors = [
        line for line in out.stderr.splitlines() if line.startswith("botkit:") or "Traceback" in line or "Error" in line
    ]
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert errors == [
        "botkit: Could not reach Telegram's Bot API at 127.0.0.1:9 (NetworkError); check the network"
        " (and [telegram] base_url), then start again."
    ], out.stderr
    assert "SECRET-TOKEN-VALUE" not in out.stderr + out.stdout
