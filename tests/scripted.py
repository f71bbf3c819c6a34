"""Test helpers shared by several test modules: a scripted backend, the store's delivery records,
a tiny fine-tuning run, `botkit run` serving in a task, and botkit installed beside vLLM."""

import asyncio
import contextlib
import os
import re
import sqlite3
import subprocess
from pathlib import Path

from botkit.serve.backends import Completion


class ScriptedBackend:
    """A backend whose reply is `reply(prompt)`; generation waits while `gate` is clear. With `stream`,
    the reply is handed out word by word (Job.on_text) before it is returned, as the engine does."""

    name = "scripted"
    max_context = 1024

    def __init__(self, reply=lambda prompt: "a scripted reply", max_batch_size: int = 8, *, stream: bool = False):
        self.reply, self.max_batch_size, self.stream = reply, max_batch_size, stream
        self.prompts: list[str] = []
        self.gate = asyncio.Event()
        self.gate.set()

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    async def generate(self, job) -> Completion:
        self.prompts.append(job.prompt)
        await self.gate.wait()
        text = self.reply(job.prompt)
        if self.stream:
            for word in re.findall(r"\s*\S+", text):
                job.on_text(word)
                await asyncio.sleep(0)  # the event loop runs between pieces, as between the engine's steps
        return Completion(
            text=text, finish_reason="stop", num_prompt_tokens=len(job.prompt.split()), num_tokens=len(text.split())
        )

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


def tiny_run(tmp_path, dataset, **kwargs):
    """`botkit.finetune` of a tiny new model with a small trained tokenizer: each step takes milliseconds."""
    from botkit.train.finetune import finetune

    args = dict(
        model="scratch",
        train_tokenizer=True,
        vocab_size=300,
        n_layer=2,
        n_embd=32,
        n_head=2,
        n_ctx=32,
        steps=6,
        batch_size=4,
        learning_rate=3e-3,
        sample_every=0,
        save_every=100,
        progress=False,
        checkpoint_dir=str(tmp_path / "checkpoint"),
        sample_dir=str(tmp_path / "samples"),
        device="cpu",
    )
    return finetune(str(dataset), **{**args, **kwargs})


@contextlib.asynccontextmanager
async def serving(config, capsys):
    """`botkit run`'s serve(config) in a task while the block runs: yields (its URL, what it printed)."""
    from botkit.cli import serve

    stop = asyncio.Event()
    running = asyncio.create_task(serve(config, stop=stop))
    printed = ""
    while not (url := re.search(r"open (http://\S+)", printed)) and not running.done():
        await asyncio.sleep(0.05)
        printed += capsys.readouterr().out
    try:
        yield url[1], printed
    finally:
        stop.set()
        await asyncio.wait_for(running, 30)


class SteppedBackend:
    """A backend that writes its reply one `step()` at a time, as the engine does: ("text", delta) is a
    piece of an unjudged reply (Job.on_text), ("draft", text) a judged draw's preview (Job.on_draft; ""
    when it is drawn again); after the script, one more step returns `reply`. Every prompt gets the script."""

    name = "stepped"
    max_context = 1024
    max_batch_size = 8

    def __init__(self, script: list[tuple[str, str]], reply: str):
        self.script, self.reply = script, reply
        self.prompts: list[str] = []
        self._steps = asyncio.Semaphore(0)

    def step(self, num_steps: int = 1) -> None:
        for _ in range(num_steps):
            self._steps.release()

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    async def generate(self, job) -> Completion:
        self.prompts.append(job.prompt)
        for kind, value in self.script:
            await self._steps.acquire()
            (job.on_text if kind == "text" else job.on_draft)(value)
        await self._steps.acquire()
        if self.reply.startswith("!"):  # "!reason": the request fails
            from botkit.errors import GenerationError

            raise GenerationError(self.reply[1:])
        if any(kind == "draft" for kind, _ in self.script):  # a judged reply comes whole, at the end
            job.on_text(self.reply)
        return Completion(
            text=self.reply, finish_reason="stop", num_prompt_tokens=1, num_tokens=len(self.reply.split())
        )

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        pass


ROOT = Path(__file__).resolve().parent.parent
VLLM_VENV = Path(os.environ.get("BOTKIT_VLLM_VENV", ROOT / ".vllm-venv"))  # scripts/vllm_venv.sh makes it
VLLM_PYTHON = VLLM_VENV / "bin" / "python"


def install_beside_vllm(target: Path) -> Path:
    """This checkout of botkit installed for vLLM's python as a user does (`pip install --no-deps`), into
    `target`, a folder to put on its PYTHONPATH so that a shared venv stays untouched. With
    --no-build-isolation the venv's own setuptools builds botkit: nothing is downloaded."""
    command = [str(VLLM_PYTHON), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target"]
    subprocess.run([*command, str(target), str(ROOT)], check=True, capture_output=True, timeout=300)
    return target


def hf_greedy(lm, ids: list[int], n: int) -> list[int]:
    """transformers' greedy continuation of token ids `ids` alone: exactly n new tokens."""
    import torch

    ids = torch.tensor([ids])
    out = lm.model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=n,
        min_new_tokens=n,
        pad_token_id=lm.eos_token_id,
    )
    return out[0, ids.shape[1] :].tolist()
