"""VllmBackend: `[model] backend = "vllm"`, the remote backend on a vLLM server that botkit runs itself.

The server (vllm_server.VllmServer) starts with botkit's logits processor and the run's copy index;
jobs go to it as to any remote server (remote.py). When it dies, the requests in flight fail inside
this backend, wait until it is back, and run again, as a botkit restart reruns them: nothing lost.
Nothing is sent twice either: the rerun has the same seed (every sample has one), and of its text
only what goes beyond what was already streamed is handed on; a rerun that differs from what was
streamed fails with a sentence instead.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
from contextlib import AsyncExitStack

from botkit.config import Config
from botkit.errors import GenerationError, ModelLoadError
from botkit.serve.backends import Completion, Job
from botkit.serve.remote import RemoteBackend, run_tokenizer
from botkit.serve.vllm_server import VllmServer

log = logging.getLogger("botkit.vllm")

MAX_RERUNS = 2  # a request in flight when the server died runs again at most this often


class VllmBackend(RemoteBackend):
    def __init__(
        self,
        server: VllmServer,
        *,
        tokenizer,
        run_dir: str | None,
        name: str,
        max_batch_size: int,
        max_context: int,
        timeout_s: float,
    ):
        super().__init__(
            server.url,
            model=name,
            max_batch_size=max_batch_size,
            max_context=max_context,
            timeout_s=timeout_s,
            tokenizer=tokenizer,
            run_dir=run_dir,
        )
        self.server = server
        self._stack = AsyncExitStack()

    @classmethod
    def from_config(cls, config: Config, source) -> VllmBackend:
        """On `source` (model.sources.Source): a local folder, or a hub name vLLM downloads itself."""
        if source.kind != "hf":
            raise ModelLoadError(
                f"vLLM serves Hugging Face model folders, and {source.path} is a {source.kind} one: "
                "turn it into one with `botkit convert` and serve that folder."
            )
        run_dir = source.path if source.is_local else None
        tokenizer = run_tokenizer(source.path) if source.is_local else None
        server = VllmServer(
            config.vllm, source.path, name=source.name, run_dir=run_dir, max_context=config.model.max_context
        )
        return cls(
            server,
            tokenizer=tokenizer,
            run_dir=run_dir,
            name=source.name,
            max_batch_size=config.batch.max_size,
            max_context=config.model.max_context,
            timeout_s=config.batch.timeout_s,
        )

    async def __aenter__(self) -> VllmBackend:
        await self._stack.enter_async_context(self.server)
        try:
            await super().__aenter__()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        await super().__aexit__(*exc)
        await self._stack.aclose()

    def is_alive(self) -> bool:
        """Whether requests can be generated now (GET /healthz, /metrics)."""
        return self.server.problem() is None

    def problem(self) -> str | None:
        return self.server.problem()

    def health_details(self) -> dict:
        return {
            **super().health_details(),
            "engine": "vllm",
            "server": self.server.url,
            "starts": self.server.num_starts,
        }

    async def generate(self, job: Job) -> Completion:
        streamed: list[str] = []  # what reached job.on_text, over every run of this job
        params = (
            job.params if job.params.seed is not None else dataclasses.replace(job.params, seed=secrets.randbits(63))
        )
        for num_reruns in range(MAX_RERUNS + 1):  # every run with the same seed: a rerun draws what the first drew
            starts = self.server.num_starts
            seen: list[str] = []
            rerun = Job(
                job.id, job.prompt, params, on_text=lambda delta, seen=seen: self._hand_on(job, delta, seen, streamed)
            )
            try:
                return await super().generate(rerun)
            except GenerationError:
                if num_reruns == MAX_RERUNS or not await self.server.has_died(starts):
                    raise
            log.warning(
                "Request %d was in flight when vLLM's server died; it runs again once the server is back.", job.id
            )
            if not await self.server.wait_restarted(starts, self.server.config.start_timeout_s):
                raise GenerationError(
                    "vLLM's server died and did not come back: its lines are in botkit's log "
                    "(`botkit run -v`); please try again later."
                )
        raise AssertionError("unreachable")

    @staticmethod
    def _hand_on(job: Job, delta: str, seen: list[str], streamed: list[str]) -> None:
        """Hand on only text beyond what earlier runs streamed; a rerun that differs from it cannot be
        taken back, so it fails."""
        seen.append(delta)
        text, before = "".join(seen), "".join(streamed)
        if not (text.startswith(before) or before.startswith(text)):
            raise GenerationError(
                "vLLM's server restarted mid-reply and the rerun differs from what was streamed; please try again."
            )
        if len(text) > len(before):
            new = text[len(before) :]
            streamed.append(new)
            job.on_text(new)
