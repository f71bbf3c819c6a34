"""Issue 24, the first hour: a community's Discord and Telegram exports (written by hand in the
documented shapes: prefix commands, a bot the Telegram export does not mark, multi-line messages)
become clean training text, and fine-tuning says what it kept before it trains."""

import json
from pathlib import Path

import pytest
from scripted import tiny_run

from botkit.chat_format import ChatFormat
from botkit.cli import main
from botkit.errors import InputError
from botkit.train.conversations import ChatMessage, ConversationOptions, conversations
from botkit.train.dataset_files import DatasetReader

COMMUNITY = Path(__file__).parent / "fixtures" / "community"
COMMANDS = ("!rank", "?weather", ".play", "/poll", "/roll", "!forecast", "rank #3", "rolled 4", "Sunday: sunny", "14°C")


def read(name: str, **options):
    reader = DatasetReader(COMMUNITY / name, chats=ConversationOptions.of(**options))
    return list(reader.documents()), reader.summary


def test_discord_prefix_commands_and_their_bots_answers_are_dropped():
    docs, summary = read("discord_export.json")
    text = "".join(docs)
    for command in COMMANDS:
        assert command not in text
    assert "Ben: - that is early... but ok\n" in text  # "- " then a word is a list or a dash, not a command
    assert summary.dropped["bot commands"] == 4
    assert summary.num_kept == 8 and len(summary.speakers) == 3 and summary.num_conversations == 2


def test_telegram_commands_and_an_unmarked_bots_answers_are_dropped():
    docs, summary = read("telegram_export.json")
    assert docs == [
        "Anna: evening all, lakes it is on sunday\nBen: great, I will bring:<br>map<br>snacks\n"
        "Anna: sunny! bring sunscreen\n<|endoftext|>"
    ]
    assert summary.dropped == {"bot commands": 2, "answers to a bot command": 2}


def test_command_prefixes_are_configurable():
    docs, summary = read("telegram_export.json", command_prefixes="/")
    assert "!forecast sunday" in docs[0] and "/roll" not in docs[0] and "DiceBot: Sunday" in docs[0]
    docs, _ = read("telegram_export.json", command_prefixes="")
    assert "/roll@DiceBot" in docs[0]
    with pytest.raises(InputError, match="command_prefixes must be punctuation"):
        ConversationOptions.of(command_prefixes="x")


def test_a_person_answering_after_a_few_seconds_is_kept():
    at = [
        ChatMessage("c", "ann", "!rank", 0.0),
        ChatMessage("c", "bob", "what does rank do?", 20.0),
        ChatMessage("c", "bot", "ann: rank 3", 21.0),
    ]
    assert [m.text for c in conversations(at, options=ConversationOptions()) for m in c] == [
        "what does rank do?",
        "ann: rank 3",
    ]


def test_a_multi_line_message_stays_one_line_of_its_speaker_and_decodes_back():
    docs, _ = read("discord_export.json")
    assert "\nChloe: count me in<br>packing list:<br>- water 2l<br>- rain jacket\n" in docs[0]
    for line in docs[0].splitlines()[:-1]:
        assert line.split(": ", 1)[0] in ("Anna", "Ben", "Chloe")  # every line starts with its speaker
    fmt = ChatFormat()
    assert fmt.decode("packing list:<br>- water") == "packing list:\n- water"
    assert fmt.line("Ann", "a\r\nb\u2028c") == "Ann: a<br>b<br>c\n"
    assert ChatFormat(line_break="").line("Ann", "a\nb") == "Ann: a\nb\n"
    with pytest.raises(InputError, match="line_break"):
        ChatFormat(line_break="\n")


def test_dry_run_prints_the_data_summary_and_writes_nothing(tmp_path, capsys):
    code = main(
        [
            "finetune",
            "--dataset",
            str(COMMUNITY / "discord_export.json"),
            "--model",
            "scratch",
            "--n-layer",
            "1",
            "--n-embd",
            "32",
            "--n-head",
            "2",
            "--n-ctx",
            "32",
            "--steps",
            "200",
            "--batch-size",
            "2",
            "--checkpoint-dir",
            str(tmp_path / "checkpoint"),
            "--dry-run",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "Chat messages: 8 of 14 kept, from 3 speakers in 2 conversations." in out
    assert "dropped 4: bot commands" in out and "dropped 2: system messages, marked bots" in out
    assert "200 steps of 64 tokens read the training part about" in out and "many passes over small data" in out
    assert "--- conversation 1 as the model sees it ---\nAnna: morning!" in out
    assert "dry run" in out and not (tmp_path / "checkpoint").exists()


def test_every_run_starts_with_the_summary_and_small_data_gets_a_held_out_block(tmp_path, caplog):
    data = tmp_path / "small.txt"
    data.write_text("the ridge walk is on saturday, bring water and a jacket.\n" * 40)
    result = tiny_run(tmp_path, data, steps=12, val_fraction=0.01, learning_rate=1e-2)
    assert "Held out: the last 32 tokens (one block, more than val_fraction)." in result.summary
    assert "Tokens:" in caplog.text and "Held out" in caplog.text  # logged before training
    rows = (result.run_dir / "loss.csv").read_text().splitlines()
    header = rows[0].split(",")
    num_evals = sum(1 for row in rows[1:] if row.split(",")[header.index("val_loss")])
    assert num_evals >= 6  # val_every 0: about ten evaluations a run
    # early stopping is on by default with held-out data
    assert (result.run_dir / "best" / "model.safetensors").is_file()


def test_data_too_small_to_hold_out_a_block_trains_without_and_says_why(tmp_path):
    data = tmp_path / "tiny.txt"
    data.write_text("hello there, hikers. " * 12)
    result = tiny_run(tmp_path, data, steps=2, val_fraction=0.05)
    assert (
        result.val_loss is None
        and "No held-out part:" in result.summary
        and "too few to hold out a block of 32" in result.summary
    )


def test_summary_samples_are_bounded(tmp_path):
    export = {
        "messages": [
            {
                "type": "Default",
                "timestamp": f"2025-01-01T00:{i:02d}:00+00:00",
                "content": "x" * 900,
                "author": {"name": f"p{i}", "isBot": False},
            }
            for i in range(3)
        ]
    }
    (tmp_path / "e.json").write_text(json.dumps(export))
    reader = DatasetReader(tmp_path / "e.json", chats=ConversationOptions.of())
    list(reader.documents())
    assert len(reader.summary.samples) == 1 and len(reader.summary.samples[0]) < 700


def test_a_dry_run_on_data_smaller_than_a_block_still_shows_the_data_and_says_what_to_do(tmp_path, capsys):
    code = main(
        [
            "finetune",
            "--dataset",
            str(COMMUNITY / "discord_export.json"),
            "--steps",
            "30",
            "--dry-run",
            "--checkpoint-dir",
            str(tmp_path / "checkpoint"),
        ]
    )  # the bundled demo model: blocks of 256 tokens
    out = capsys.readouterr().out
    assert code == 0 and "Chat messages: 8 of 14 kept" in out
    assert "Training with these options would stop at once: The dataset has" in out and "lower block_size" in out
