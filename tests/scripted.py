"""Test helpers shared by the adapter tests: a scripted backend and the store's delivery records."""

import asyncio
import contextlib
import sqlite3

from botkit.backends import Completion


class ScriptedBackend:
    """A backend whose reply is `reply(prompt)`; generation waits while `gate` is clear."""

    name = "scripted"
    max_context = 1024

    def __init__(self, reply=lambda prompt: "a scripted reply", max_batch_size: int = 8):
        self.reply, self.max_batch_size = reply, max_batch_size
        self.prompts: list[str] = []
        self.gate = asyncio.Event()
        self.gate.set()

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    async def generate(self, job) -> Completion:
        self.prompts.append(job.prompt)
        await self.gate.wait()
        text = self.reply(job.prompt)
        return Completion(text=text, finish_reason="stop", num_prompt_tokens=len(job.prompt.split()), num_tokens=len(text.split()))

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        pass


def deliveries(tmp_path) -> list[tuple[int, str]]:
    with contextlib.closing(sqlite3.connect(tmp_path / "bot.db")) as db:
        return db.execute("SELECT request_id, platform_message_id FROM deliveries ORDER BY request_id, part").fetchall()


async def delivered(tmp_path, count: int, timeout_s: float = 5.0) -> list[tuple[int, str]]:
    """The deliveries table once it has `count` rows (the adapter records them just after sending)."""
    for _ in range(int(timeout_s / 0.02)):
        if len(rows := deliveries(tmp_path)) >= count:
            return rows
        await asyncio.sleep(0.02)
    return deliveries(tmp_path)
