"""The composition root: `botkit run` with web, Discord and Telegram around one core and one model."""

import asyncio
import contextlib
import os
import sqlite3
import subprocess
import sys
import warnings

import aiohttp
import pytest
import yarl
from fake_discord import CHANNEL_ID, FakeDiscord
from fake_telegram import FakeTelegram
from scripted import serving

from botkit.cli import serve
from botkit.config import Config, DiscordConfig, LimitsConfig, ModelConfig, StoreConfig, TelegramConfig, WebConfig
from botkit.params import ChatSettings

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "'audioop' is deprecated", DeprecationWarning)
    import discord


@pytest.fixture
def model_dir(tmp_path, tiny_lm):
    tiny_lm.model.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


async def test_web_discord_and_telegram_answer_concurrently_in_one_process(tmp_path, model_dir, monkeypatch):
    monkeypatch.setenv("PTB_TIMEDELTA", "1")
    async with FakeDiscord() as dfake, FakeTelegram() as tfake:
        monkeypatch.setattr(discord.http.Route, "BASE", dfake.api_url)
        monkeypatch.setattr(discord.gateway.DiscordWebSocket, "DEFAULT_GATEWAY", yarl.URL(dfake.gateway_url))
        monkeypatch.setenv("TEST_DISCORD_TOKEN", dfake.token)
        monkeypatch.setenv("TEST_TELEGRAM_TOKEN", tfake.token)
        config = Config(
            model=ModelConfig(source=str(model_dir), device="cpu"),
            store=StoreConfig(path=str(tmp_path / "bot.db")),
            chat=ChatSettings(truncate="", length=8),
            limits=LimitsConfig(user_per_minute=0, chat_per_minute=0),
            web=WebConfig(port=0),
            discord=DiscordConfig(enabled=True, token_env="TEST_DISCORD_TOKEN", connect_timeout_s=10),
            telegram=TelegramConfig(
                enabled=True, token_env="TEST_TELEGRAM_TOKEN", base_url=tfake.url, chat_send_interval_s=0
            ),
        )
        stop = asyncio.Event()
        running = asyncio.create_task(serve(config, stop=stop))
        await dfake.wait_connected(timeout_s=30)
        await tfake.wait_for("getUpdates", timeout_s=30)

        dmsg = await dfake.send_message("Once upon a time", mention_bot=True)
        tmsg = tfake.push_message(42, "Once upon a time")  # a private chat: every message is a prompt
        await dfake.wait_for(
            lambda: any(
                m.get("message_reference", {}).get("message_id") == dmsg["id"] for m in dfake.bot_messages(CHANNEL_ID)
            ),
            timeout_s=30,
        )
        await tfake.wait_for(
            "sendMessage", where=lambda p: p.get("reply_parameters", {}).get("message_id") == tmsg["message_id"]
        )
        stop.set()
        await asyncio.wait_for(running, 60)

    with contextlib.closing(sqlite3.connect(tmp_path / "bot.db")) as db:
        rows = db.execute(
            "SELECT m.platform, r.status FROM requests r JOIN messages m ON m.id = r.message_id"
        ).fetchall()
        delivered = db.execute("SELECT COUNT(DISTINCT request_id) FROM deliveries").fetchone()[0]
    assert sorted(rows) == [("discord", "done"), ("telegram", "done")] and delivered == 2


async def test_run_prints_its_database_path_and_the_url_of_a_working_playground(tmp_path, model_dir, capsys):
    config = Config(
        model=ModelConfig(source=str(model_dir), device="cpu"),
        store=StoreConfig(path=str(tmp_path / "b.db")),
        web=WebConfig(port=0),
    )
    async with serving(config, capsys) as (url, printed), aiohttp.ClientSession() as http:
        assert f"prompts and replies in {tmp_path / 'b.db'}\n" in printed  # where its database is, as an absolute path
        async with http.get(url) as page:
            assert page.status == 200 and "<textarea" in (await page.text())
        body = {"prompt": "Hello", "max_tokens": 5, "temperature": 0}
        async with http.post(url + "v1/completions", json=body) as answer:
            assert answer.status == 200 and (await answer.json())["object"] == "text_completion"


@pytest.mark.parametrize(
    ("toml", "env", "says"),
    [
        ("[discord]\nenabled = true\ntoken_env = 'BOTKIT_NO_SUCH_TOKEN'\n", {}, "BOTKIT_NO_SUCH_TOKEN"),
        ("[model]\nsource = './no/such/dir'\n", {}, "does not exist"),
        ("[batch]\nmax_sise = 1\n", {}, "unknown key 'batch.max_sise'"),
    ],
)
def test_run_with_a_broken_config_says_one_sentence(tmp_path, toml, env, says):
    path = tmp_path / "c.toml"
    path.write_text(toml)
    out = subprocess.run(
        [sys.executable, "-m", "botkit", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, **env},
    )
    assert out.returncode == 2 and says in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
