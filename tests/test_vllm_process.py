"""backend = "vllm" without vLLM: VllmServer starts, watches and restarts a stand-in server process
(tests/fake_vllm_server.py, a real process on 127.0.0.1), and VllmBackend reruns what was in flight."""

import logging
import sys
from pathlib import Path

import pytest

from botkit.config import Config, ModelConfig, VllmConfig
from botkit.errors import ModelLoadError
from botkit.model.sources import resolve
from botkit.params import SamplingParams
from botkit.serve.backends import Job
from botkit.serve.vllm_backend import VllmBackend
from botkit.serve.vllm_server import PROCESSOR, server_command

FAKE = [sys.executable, str(Path(__file__).resolve().parent / "fake_vllm_server.py")]


def backend_on_fake(**vllm) -> VllmBackend:
    config = Config(model=ModelConfig(backend="vllm"), vllm=VllmConfig(command=tuple(FAKE), start_timeout_s=30, **vllm))
    return VllmBackend.from_config(config, resolve(None))  # the bundled demo model's folder


def test_the_command_is_the_cpu_builds_module_with_botkits_processor():
    command = server_command(VllmConfig(venv="/opt/v"), "runs/zh", port=8123, max_context=512, name="zh")
    assert command[:3] == ["/opt/v/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert command[command.index("--logits-processors") + 1] == PROCESSOR and "--dtype" in command
    assert command[command.index("--model") + 1] == "runs/zh" and command[command.index("--max-model-len") + 1] == "512"
    with pytest.raises(ModelLoadError, match="vllm.args may not hold --port"):
        server_command(VllmConfig(args=("--port=9",)), "m", port=1, max_context=8, name="m")


async def test_a_dying_engine_is_restarted_and_its_request_rerun_without_repeating_text(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("DIE_ONCE", str(tmp_path / "died"))
    caplog.set_level(logging.INFO, logger="botkit.vllm")
    # `botkit run` without -v (an earlier test) sets it to WARNING
    caplog.set_level(logging.INFO, logger="botkit.vllm.server")
    async with backend_on_fake() as backend:
        assert backend.problem() is None and backend.health_details()["unsupported"] == []
        streamed = []
        done = await backend.generate(Job(1, "hi", SamplingParams(max_new_tokens=6, seed=5), on_text=streamed.append))
        assert (tmp_path / "died").exists() and backend.server.num_starts == 2 and backend.problem() is None
        assert "".join(streamed) == done.text and len(done.text.split()) == 6  # the first two words were not sent twice
        again = await backend.generate(Job(2, "hi", SamplingParams(max_new_tokens=6, seed=5)))
        (tmp_path / "died").unlink()  # the server dies again, in a request with no seed of its own
        streamed_unseeded = []
        unseeded = await backend.generate(
            Job(3, "hi", SamplingParams(max_new_tokens=6), on_text=streamed_unseeded.append)
        )
    assert again.text == done.text  # the same seed draws the same words: the rerun was that draw
    assert (
        backend.server.num_starts == 3
        and "".join(streamed_unseeded) == unseeded.text
        and len(unseeded.text.split()) == 6
    )
    assert any("restarting" in r.message for r in caplog.records) and any(
        "Starting vLLM server" in r.message for r in caplog.records
    )


async def test_a_server_that_cannot_start_is_one_sentence_with_its_last_error(monkeypatch):
    monkeypatch.setenv("EXIT_AT_START", "1")
    with pytest.raises(ModelLoadError, match=r"exited \(3\) before it was ready.*RuntimeError: no engine today"):
        async with backend_on_fake():
            pass


async def test_a_missing_venv_says_how_to_make_it(tmp_path):
    config = Config(model=ModelConfig(backend="vllm"), vllm=VllmConfig(venv=str(tmp_path / "nowhere")))
    with pytest.raises(ModelLoadError, match="run scripts/vllm_venv.sh"):
        async with VllmBackend.from_config(config, resolve(None)):
            pass
