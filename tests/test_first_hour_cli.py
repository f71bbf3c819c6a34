"""Issue 24, the first hour: talk to a run in one command (`botkit chat --run-name`, `botkit run
--model`), and a config file's paths count from its own folder, with errors that name its keys."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from botkit.cli import main
from botkit.config import load_config


def botkit(*args, cwd, stdin="", timeout_s=240):
    return subprocess.run(
        [sys.executable, "-m", "botkit", *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=timeout_s,
        cwd=cwd,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def test_chat_with_a_run_by_its_name_in_one_command(tmp_path, tiny_lm):
    tiny_lm.model.save_pretrained(tmp_path / "checkpoint" / "community")
    tiny_lm.tokenizer.save_pretrained(tmp_path / "checkpoint" / "community")
    out = botkit("chat", "--run-name", "community", cwd=tmp_path, stdin="hello there\n")
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr and (tmp_path / "botkit.db").is_file()
    replies = [line for line in out.stdout.splitlines() if line.startswith("bot> ")]
    assert len(replies) == 1 and len(replies[0]) > len("bot> ")  # the run answered the line


def test_run_and_chat_name_the_flag_that_was_wrong(tmp_path, capsys):
    assert main(["chat", "--run-name", "nope", "--checkpoint-dir", str(tmp_path)]) == 2
    assert "check --run-name and --checkpoint-dir" in capsys.readouterr().err
    assert main(["run", "--model", str(tmp_path / "missing"), "--port", "0"]) == 2
    assert "(--model) does not exist" in capsys.readouterr().err
    assert main(["run", "--model", "x", "--run-name", "y"]) == 2
    assert "not both" in capsys.readouterr().err


def test_a_config_files_paths_count_from_its_folder_and_errors_name_its_keys(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "etc" / "bot"
    folder.mkdir(parents=True)
    (folder / "models" / "m").mkdir(parents=True)
    path = folder / "bot.toml"
    path.write_text('[model]\nsource = "models/m"\ncheckpoint_dir = "runs"\n[store]\npath = "data/bot.db"\n')
    monkeypatch.chdir(tmp_path)  # as systemd would: started elsewhere
    config = load_config(path)
    assert Path(config.store.path) == folder / "data" / "bot.db"
    assert Path(config.model.checkpoint_dir) == folder / "runs" and Path(config.model.source) == folder / "models" / "m"
    # a hub name stays one
    assert load_config(_write(folder / "hub.toml", '[model]\nsource = "gpt2"\n')).model.source == "gpt2"

    _write(path, '[model]\nrun_name = "community"\n')
    assert main(["chat", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"No trained model in {folder / 'checkpoint' / 'community'}" in err
    assert f"check model.run_name in {path} and model.checkpoint_dir in {path}" in err and "--run-name" not in err


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("command", ["run", "chat"])
def test_help_lists_the_model_flags(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    assert "--run-name" in out and "--model" in out and "--checkpoint-dir" in out


def test_opt_in_counts_from_the_moment_of_opting_in_as_the_readme_shows(tmp_path, tiny_lm):
    tiny_lm.model.save_pretrained(tmp_path / "m")
    tiny_lm.tokenizer.save_pretrained(tmp_path / "m")
    lines = (
        "said before anyone agreed\n/privacy\n/settings dataset_opt_in on\n"
        "anyone watching the match tonight?\n/privacy\n"
    )
    out = botkit("chat", "--model", "m", cwd=tmp_path, stdin=lines)
    assert out.returncode == 0, out.stderr
    assert "only messages sent from that moment on" in out.stdout and "dataset_opt_in is now True." in out.stdout
    assert "This chat has opted in to training data" in out.stdout
    export = botkit("export-dataset", "--out", "ours.jsonl", cwd=tmp_path)
    assert "Wrote 1 message of 1 chat to ours.jsonl" in export.stdout, export.stdout + export.stderr
    records = [json.loads(line) for line in (tmp_path / "ours.jsonl").read_text().splitlines()[1:]]
    assert [r["text"] for r in records] == ["anyone watching the match tonight?"]
