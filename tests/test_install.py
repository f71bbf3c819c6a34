"""A fresh install's first contact: cheap imports, quick clear failures offline, quiet output."""

import fcntl
import logging
import os
import pty
import re
import struct
import subprocess
import sys
import termios

import pytest

HEAVY = ("torch", "transformers", "matplotlib", "accelerate", "peft")


def run_botkit(*args, env=None, cwd=None, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "botkit", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )


def test_importing_botkit_loads_no_heavy_library():
    code = (
        "import sys, botkit, botkit.cli, botkit.serve.core, botkit.serve.store, botkit.adapters.web_adapter, "
        "botkit.adapters.discord_adapter, botkit.adapters.telegram_adapter, botkit.adapters.console_adapter, "
        "botkit.model.convert, botkit.model.run_archive, botkit.model.gpt2_simple, botkit.model.sources, "
        "botkit.serve.remote, botkit.serve.vllm_backend, botkit.engine.rule_args\n"
        f"print([m for m in {HEAVY!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_nothing_registers_in_transformers_until_an_engine_is_made(tiny_lm):
    code = (
        "import botkit.engine.engine, botkit.engine.kvcache\n"
        "from transformers import AttentionInterface\n"
        "print(botkit.engine.kvcache.ROWS_ATTENTION in AttentionInterface._global_mapping)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
    from transformers import AttentionInterface

    from botkit.engine.engine import Engine

    Engine(tiny_lm)
    assert "botkit_rows" in AttentionInterface._global_mapping


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
        (
            {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"},
            "cannot be reached",
        ),  # nothing listens on port 9
    ],
)
def test_a_hub_name_offline_is_one_sentence_that_names_the_local_way(tmp_path, env, says):
    out = run_botkit("generate", "--model", "gpt2", "--length", "5", env={"HF_HOME": str(tmp_path / "hf"), **env})
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert says in out.stderr and "--model ./" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_long_contexts_are_counted_without_a_transformers_warning(tiny_lm):
    from botkit.serve.backends import LocalBackend

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        assert LocalBackend(tiny_lm).count_tokens(" word" * 3000) == 3000  # beyond the tokenizer's 1024
    finally:
        logger.removeHandler(handler)
    assert records == []


FINETUNE = [
    "finetune",
    "--model",
    "scratch",
    "--train-tokenizer",
    "--vocab-size",
    "300",
    "--n-layer",
    "2",
    "--n-embd",
    "32",
    "--n-head",
    "2",
    "--n-ctx",
    "32",
    "--steps",
    "12",
    "--batch-size",
    "2",
    "--sample-every",
    "4",
    "--sample-length",
    "8",
    "--save-every",
    "100",
    "--device",
    "cpu",
]


@pytest.fixture
def dataset(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("".join(f"The quick brown fox number {i} jumps over the lazy dog.\n" for i in range(60)))
    return path


def test_finetune_into_a_log_file_writes_plain_lines_and_no_library_warnings(tmp_path, dataset):
    out = run_botkit(*FINETUNE, "--dataset", str(dataset), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "\r" not in out.stderr  # no redrawn bar frames in a file
    assert re.search(r"^step 12/12 loss \S+ avg \S+ tok_s \S+$", out.stderr, re.M), out.stderr
    assert out.stderr.count("SAMPLE at step") == 3
    assert not re.search(r"loss_type|FutureWarning|DeprecationWarning|Token indices", out.stderr), out.stderr


def test_finetune_on_a_terminal_never_glues_a_sample_to_the_bar(tmp_path, dataset):
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    proc = subprocess.Popen(
        [sys.executable, "-m", "botkit", *FINETUNE, "--dataset", str(dataset)],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=follower,
    )
    os.close(follower)
    output = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed: the process has exited
            break
        if not chunk:
            break
        output += chunk
    proc.wait(timeout=120)
    os.close(leader)
    text = output.decode().replace("\r\n", "\n")  # the terminal turns each newline into CR LF
    assert proc.returncode == 0, text
    assert "12/12" in text and "\r" in text and "Writing model shards" not in text  # botkit's bar, and only it
    sample_lines = [line.split("\r")[-1] for line in text.split("\n") if "SAMPLE at step" in line]
    assert len(sample_lines) == 3 and all(re.match(r"\d{4}-\d\d-\d\d ", line) for line in sample_lines), sample_lines
