import asyncio
import dataclasses

import pytest
import torch

from botkit.config import Config
from botkit.serve.backends import Completion, Job


@pytest.fixture
def one_thread():
    """torch on one thread while a test runs: on a busy 2-core machine more threads only contend."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_config(*, timeout_s: float = 120.0, max_queue: int = 256, length: int = 8) -> Config:
    """Defaults with rate limits off (the tests load the bot on purpose) and short replies."""
    config = Config()
    return dataclasses.replace(
        config,
        batch=dataclasses.replace(config.batch, timeout_s=timeout_s, max_queue=max_queue),
        limits=dataclasses.replace(config.limits, user_per_minute=0, chat_per_minute=0),
        chat=dataclasses.replace(config.chat, length=length),
    )


class EchoBackend:
    """Answers every job at once with a fixed text (`reply`); `max_batch_size` jobs in flight."""

    name = "echo"
    max_batch_size = 32
    max_context = 1024

    def __init__(self, reply: str = "ok"):
        self.num_jobs = 0
        self.reply = reply

    def count_tokens(self, text: str) -> int:
        return len(text.split()) + 1

    async def generate(self, job: Job) -> Completion:
        self.num_jobs += 1
        await asyncio.sleep(0)
        job.on_text(self.reply)
        return Completion(self.reply, "stop", self.count_tokens(job.prompt), 1)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return None
