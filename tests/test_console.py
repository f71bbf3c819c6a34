"""Terminal chat through a real core and tiny model; the terminal is a pipe or a StringIO."""

import asyncio
import contextlib
import io
import os

from botkit.adapters.console_adapter import ConsoleAdapter

from botkit.chat.chats import Chats
from botkit.config import Config, ConsoleConfig, LimitsConfig
from botkit.params import ChatSettings
from botkit.serve.backends import LocalBackend
from botkit.serve.core import Core
from botkit.serve.store import Store


@contextlib.asynccontextmanager
async def chatting(tmp_path, lm, stdin, limits=None):
    config = Config(chat=ChatSettings(length=6, truncate=""), limits=limits or LimitsConfig())
    out = io.StringIO()
    async with (
        Store.open(tmp_path / "bot.db") as store,
        LocalBackend(lm, max_batch_size=4) as backend,
        Core(backend, store, config) as core,
        ConsoleAdapter(
            Chats(core, store, core.config), ConsoleConfig(enabled=True), stdin=stdin, stdout=out
        ) as console,
    ):
        yield core, console, out


async def test_each_line_gets_a_reply_and_commands_work(tmp_path, tiny_lm):
    lines = io.StringIO("hello bot\n   \n/settings temperature 0.5\n/settings\nsecond message\n/reset\n/bogus\n")
    async with chatting(tmp_path, tiny_lm, lines) as (core, console, out):
        await asyncio.wait_for(console.run(), 30)
        recent = await core.recent()
        settings = await console.conversation.chats.settings("console", "console")
        delivered = [await console.conversation.chats.store.is_delivered(r["id"]) for r in recent]
    text = out.getvalue()
    assert [r["text"] for r in recent] == ["second message", "hello bot"]  # the blank line was not sent
    for row in recent:
        assert f"bot> {row['reply'].lstrip()}\n" in text and row["status"] == "done" and row["num_tokens"] == 6
    assert delivered == [True, True]
    assert settings.temperature == 0.5 and "bot> temperature is now 0.5.\n" in text and "\ntemperature = 0.5\n" in text
    assert "bot> Done: I forgot this chat's conversation" in text and "bot> I don't know that command" in text


async def test_an_error_is_a_sentence_and_the_chat_goes_on(tmp_path, tiny_lm):
    lines = io.StringIO("this message is far too long\n/settings temperature hot\nok\n")
    async with chatting(tmp_path, tiny_lm, lines, LimitsConfig(max_message_chars=10)) as (core, console, out):
        await asyncio.wait_for(console.run(), 30)
        recent = await core.recent()
    text = out.getvalue()
    assert "bot> The message is 28 characters long; send at most 10.\n" in text
    assert "bot> Setting 'temperature' must be a float, not 'hot'.\n" in text
    assert [r["text"] for r in recent] == ["ok"] and f"bot> {recent[0]['reply'].lstrip()}\n" in text


async def test_ctrl_d_ends_the_chat_while_it_waits_for_input(tmp_path, tiny_lm):
    read_fd, write_fd = os.pipe()
    with open(read_fd, encoding="utf-8") as stdin, open(write_fd, "w", encoding="utf-8") as typing:
        async with chatting(tmp_path, tiny_lm, stdin) as (core, console, out):
            chat = asyncio.create_task(console.run())
            typing.write("first\n")
            typing.flush()
            while "bot> " not in out.getvalue() or not out.getvalue().endswith("\n"):
                await asyncio.sleep(0.01)
            typing.write("second\n")  # a sentinel: answered only if the chat still waits for lines
            typing.flush()
            while out.getvalue().count("bot> ") < 2 or not out.getvalue().endswith("\n"):
                assert not chat.done(), out.getvalue()
                await asyncio.sleep(0.01)
            typing.close()  # Ctrl-D
            await asyncio.wait_for(chat, 5)
            assert [r["text"] for r in await core.recent()] == ["second", "first"]
