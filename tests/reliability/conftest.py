import dataclasses

import pytest
import torch

from botkit.config import Config


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
