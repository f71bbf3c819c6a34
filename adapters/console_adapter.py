"""Terminal chat (`botkit chat`): each line you type is a message to the bot in one private chat,
through the same conversation layer as every other platform; its answers are printed as "bot> …".
Ctrl-D (end of input) or /quit ends it.

    async with ConsoleAdapter(chats, config.console) as console:
        await console.run()
"""

from __future__ import annotations

import asyncio
import getpass
import logging
import sys
import threading
import time
from typing import TextIO

from botkit.chat.chats import Chats
from botkit.chat.conversation import Conversation
from botkit.chat.events import ChatEvent, Platform
from botkit.config import ConsoleConfig

log = logging.getLogger("botkit.console")

PLATFORM, CHAT_ID = "console", "console"
MAX_LINE_CHARS = 1_000_000  # a terminal has no message limit; this only bounds one printed answer


class ConsoleAdapter:
    """Reads `stdin` in a daemon thread (a blocking readline must never hold up the event loop, and
    a daemon thread cannot keep the process alive at exit); writes to `stdout`."""

    def __init__(
        self, chats: Chats, config: ConsoleConfig, *, stdin: TextIO | None = None, stdout: TextIO | None = None
    ):
        self.config = config
        if stdin is None and hasattr(sys.stdin, "reconfigure"):
            sys.stdin.reconfigure(errors="replace")  # a stray invalid byte must not end the chat
        self.stdin = stdin or sys.stdin
        self.stdout = stdout or sys.stdout
        self.user_name = _login_name()
        platform = Platform(
            PLATFORM,
            MAX_LINE_CHARS,
            max_parts=1,
            typing_interval_s=60.0,
            queue_notice_s=5.0,
            bot_name="bot",
            mention_hint="just write",
        )
        self.conversation = Conversation(chats, platform, lambda chat_id, message_id: self)
        self._lines: asyncio.Queue[str | None] = asyncio.Queue()

    async def __aenter__(self) -> ConsoleAdapter:
        await self.conversation.__aenter__()
        loop = asyncio.get_running_loop()
        threading.Thread(target=self._read_lines, args=(loop,), name="botkit-console-stdin", daemon=True).start()
        self.conversation.connected()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.conversation.close()  # the reader thread is a daemon; nothing else to close

    async def run(self) -> None:
        """Chat until end of input or /quit."""
        self._write("botkit chat. Type a message and press Enter; /help lists commands; Ctrl-D quits.\n")
        while True:
            self._prompt()
            line = await self._lines.get()
            if line is None or line.strip() == "/quit":
                self._write("\n" if line is None else "")
                return
            if line.strip():
                await self.handle_line(line.rstrip("\r\n"))

    async def handle_line(self, text: str) -> None:
        """One line typed: a command if it starts with "/", otherwise a message."""
        command, args = None, text
        if text.startswith("/"):
            command, _, args = text[1:].partition(" ")
        await self.conversation.handle(
            ChatEvent(
                chat_id=CHAT_ID,
                event_id=f"line-{time.time_ns()}",
                user_id=self.user_name,
                user_name=self.user_name,
                text=args,
                is_private=True,
                command=command,
            ),
            self,
        )

    # -- the replier: the terminal ---------------------------------------------------------------

    async def reply(self, text: str, *, private: bool = False) -> str:
        self._write(f"bot> {text.strip()}\n")
        return f"out-{time.time_ns()}"

    async def edit(self, message_id: str, text: str) -> str:
        return await self.reply(text)  # a terminal cannot change a line already printed: print it anew

    async def typing(self) -> None:
        pass

    async def draft(self, draft_id: int, text: str) -> bool:
        return False  # never asked: the console does not stream (Platform.stream_interval_s is None)

    async def delete(self, message_id: str) -> None:
        pass  # a printed line stays; never asked either

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
