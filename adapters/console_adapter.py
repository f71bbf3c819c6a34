"""Terminal chat (`botkit chat`): each line you type is a message to the bot in one private chat,
through the same core as every other platform; the reply is printed as it is generated. Ctrl-D
(end of input) or /quit ends it.

    async with ConsoleAdapter(core, config.console) as console:
        await console.run()
"""

from __future__ import annotations

import asyncio
import getpass
import itertools
import logging
import sys
import threading
from typing import TextIO

from botkit.config import ConsoleConfig
from botkit.errors import BotkitError

log = logging.getLogger("botkit.console")

HELP = """Type a message and press Enter; the bot answers below it.
  /reset              forget this chat's context
  /settings           show this chat's settings
  /set NAME VALUE     change one, e.g. /set temperature 0.5 (\\n is a new line)
  /quit or Ctrl-D     leave"""

PLATFORM, CHAT_ID = "console", "console"


class ConsoleAdapter:
    """Reads `stdin` in a daemon thread (a blocking readline must never hold up the event loop, and
    a daemon thread cannot keep the process alive at exit); writes to `stdout`."""

    def __init__(self, core, config: ConsoleConfig, *, stdin: TextIO | None = None, stdout: TextIO | None = None):
        self.core = core
        self.config = config
        if stdin is None and hasattr(sys.stdin, "reconfigure"):
            sys.stdin.reconfigure(errors="replace")  # a stray invalid byte must not end the chat
        self.stdin = stdin or sys.stdin
        self.stdout = stdout or sys.stdout
        self.user_name = _login_name()
        self._lines: asyncio.Queue[str | None] = asyncio.Queue()
        self._message_ids = itertools.count(1)

    async def __aenter__(self) -> ConsoleAdapter:
        loop = asyncio.get_running_loop()
        threading.Thread(target=self._read_lines, args=(loop,), name="botkit-console-stdin", daemon=True).start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        pass  # the reader thread is a daemon; nothing else to close

    async def run(self) -> None:
        """Chat until end of input or /quit."""
        self._write(f"botkit chat. {HELP.splitlines()[0]} /help lists commands; Ctrl-D quits.\n")
        while True:
            self._prompt()
            line = await self._lines.get()
            if line is None or line.strip() == "/quit":
                self._write("\n" if line is None else "")
                return
            text = line.rstrip("\r\n")
            if not text.strip():
                continue
            try:
                if text.startswith("/"):
                    await self._command(text)
                else:
                    await self._chat(text)
            except BotkitError as exc:
                self._write(f"! {exc}\n")

    async def _chat(self, text: str) -> None:
        from botkit.core import Prompt  # the core's public surface; imported late so the CLI starts fast

        prompt = Prompt(platform=PLATFORM, chat_id=CHAT_ID, user_id=self.user_name, text=text,
                        message_id=str(next(self._message_ids)), user_name=self.user_name)
        ticket = await self.core.submit(prompt)
        self._write("bot> ")
        started = False
        async for delta in ticket.stream():
            if not started:  # GPT-2 replies usually begin with a space or a newline
                delta = delta.lstrip()
                started = bool(delta)
            self._write(delta)
        reply = await ticket.result()
        self._write("\n")
        await self.core.record_delivery(reply.request_id, ["console"])

    async def _command(self, text: str) -> None:
        name, _, rest = text.partition(" ")
        if name == "/help":
            self._write(HELP + "\n")
        elif name == "/reset":
            await self.core.reset_context(PLATFORM, CHAT_ID)
            self._write("Context forgotten.\n")
        elif name == "/settings":
            settings = await self.core.get_settings(PLATFORM, CHAT_ID)
            self._write("".join(f"  {k} = {v!r}\n" for k, v in settings.to_dict().items()))
        elif name == "/set" and len(rest.split(None, 1)) == 2:
            key, value = rest.split(None, 1)
            settings = await self.core.update_settings(PLATFORM, CHAT_ID, **{key: value})
            self._write(f"  {key} = {getattr(settings, key)!r}\n")
        else:
            self._write(f"Unknown command {text!r}.\n{HELP}\n")

    def _read_lines(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            for line in iter(self.stdin.readline, ""):
                loop.call_soon_threadsafe(self._lines.put_nowait, line)
        except (OSError, ValueError, UnicodeDecodeError) as exc:  # stdin closed, or not text
            log.warning("Stopped reading the terminal: %s", exc)
        finally:
            try:
                loop.call_soon_threadsafe(self._lines.put_nowait, None)
            except RuntimeError:  # the loop already closed: nobody is listening
                pass

    def _prompt(self) -> None:
        if self.stdin.isatty():
            self._write("you> ")

    def _write(self, text: str) -> None:
        self.stdout.write(text)
        self.stdout.flush()


def _login_name() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name in a bare container
        return "you"
