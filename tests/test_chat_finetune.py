"""One format from training to serving: a run trained on a chat export records its chat format and
a copy index; load_model exposes them; generate uses the format; a copied training line is caught."""

import shutil
from pathlib import Path

import pytest
from scripted import tiny_run

from botkit.chat_format import CHAT_FORMAT_JSON, ChatFormat
from botkit.engine.copy_index import INDEX_FILE, CopyIndex, check_copying
from botkit.engine.generate import generate
from botkit.errors import InputError
from botkit.model.loading import load_model
from botkit.params import ChatSettings

FIXTURES = Path(__file__).parent / "fixtures" / "chats"


def tiny(tmp_path, dataset, **kwargs):
    return tiny_run(tmp_path, dataset, **{"steps": 40, "learning_rate": 1e-2, **kwargs})


@pytest.fixture
def community(tmp_path):
    """A chat export big enough to train on: the fixture's conversations, each a day apart, repeated."""
    folder = tmp_path / "exports"
    folder.mkdir()
    for day in range(12):
        text = (FIXTURES / "discord_general.json").read_text().replace("2024-03-01", f"2024-04-{day + 1:02d}")
        (folder / f"general-{day}.json").write_text(text)
    return folder


def test_a_chat_run_records_its_format_and_generate_speaks_it(tmp_path, community):
    fmt = ChatFormat(speaker="{name}: {message}", separator="\n", truncate="\n")
    result = tiny(tmp_path, community, run_name="chat", chat_format='{"speaker": "{name}: {message}"}')
    assert ChatFormat.load(result.run_dir / CHAT_FORMAT_JSON) == fmt == result.lm.chat_format
    assert (result.run_dir / INDEX_FILE).stat().st_size > 0

    lm = load_model(run_name="chat", checkpoint_dir=tmp_path / "checkpoint", device="cpu")
    assert lm.chat_format == fmt and lm.path == result.run_dir
    prompt = fmt.prompt([("Alice", "who is up for pizza tonight?")], "Carol")
    kwargs = dict(
        prefix=prompt,
        nsamples=6,
        batch_size=6,
        length=24,
        temperature=1.0,
        seed=1,
        include_prefix=False,
        return_as_list=True,
    )
    whole = generate(lm, truncate="", **kwargs)
    assert any("\n" in text for text in whole)  # untruncated, the model writes further turns
    replies = generate(lm, **kwargs)  # the run's format: one message each
    assert all("\n" not in text for text in replies) and [w.split("\n")[0] for w in whole] == replies

    # The one-liner for serving: today's {message} template and truncate, from the run's format.
    settings = ChatSettings().replace(**lm.chat_format.chat_settings("Carol"))
    assert settings.template == "user: {message}\nCarol:" and settings.truncate == "\n"


def test_a_run_catches_a_reply_that_copies_its_training_text(tmp_path, community):
    result = tiny(tmp_path, community, run_name="copy", steps=2)
    index = CopyIndex.load(result.lm.path)
    tokenizer = result.lm.tokenizer
    line = tokenizer.encode(" knows a place, see <link>")
    assert check_copying(line, index).is_copy
    assert not check_copying(tokenizer.encode(" pineapple belongs on no pizza whatsoever, sorry"), index).is_copy


def test_plain_text_runs_have_no_chat_format_and_keep_gpt2_simple_defaults(tmp_path):
    dataset = tmp_path / "data.txt"
    dataset.write_text("".join(f"The quick brown fox number {i} jumps over the lazy dog.\n" for i in range(60)))
    result = tiny(tmp_path, dataset, run_name="plain", steps=2)
    assert result.lm.chat_format is None and not (result.run_dir / CHAT_FORMAT_JSON).exists()
    index = CopyIndex.load(result.run_dir)
    # each line is a training text
    assert index.texts.covered("the QUICK brown fox number 7  jumps over the lazy dog.") == 1.0
    # at most 6 of 12 words in a row
    assert index.texts.covered("the quick brown fox number 61 jumps over the lazy dog.") == 0.0
    assert index.texts.covered("Fox number 7 jumps over the lazy dog") > 0  # 8 of 12: more than half
    lm = load_model(run_name="plain", checkpoint_dir=tmp_path / "checkpoint", device="cpu")
    assert lm.chat_format is None
    [text] = generate(lm, length=40, temperature=0, return_as_list=True)
    assert text.count("\n") >= 1  # no truncate unless asked


def test_resume_keeps_the_format_and_a_bad_format_fails_before_training(tmp_path, community):
    tiny(tmp_path, community, run_name="r", steps=4, stop_at_step=2)
    resumed = tiny(tmp_path, community, run_name="r", steps=4, restore_from="latest")
    assert resumed.step == 4 and ChatFormat.load(resumed.run_dir) == ChatFormat()
    with pytest.raises(InputError, match="unknown key 'speakr'"):
        tiny(tmp_path, community, run_name="bad", chat_format='{"speakr": "x"}')
    with pytest.raises(InputError, match="conversation_gap_s must be"):
        tiny(tmp_path, community, run_name="bad", conversation_gap_s=float("nan"))
    assert not (tmp_path / "checkpoint" / "bad").exists()


def test_cli_trains_on_an_export_and_encodes_with_options(tmp_path, community, capsys):
    from botkit.cli import main

    shutil.copy(FIXTURES / "discord_general.csv", community / "general.csv")
    out = tmp_path / "c.npz"
    assert (
        main(["encode", str(community), "--out", str(out), "--exclude-speakers", "MEE6", "--conversation-gap-s", "60"])
        == 0
    )
    assert "(chat conversations)" in capsys.readouterr().out
    from botkit.train.encoding import load_tokens

    tokenizer = load_model(device="cpu").tokenizer  # `botkit encode` with no --model: the bundled demo model's
    text = tokenizer.decode(load_tokens(out, tokenizer).tokens.tolist())
    assert "MEE6" not in text and "alice_1999: who is up for pizza tonight?\n<|endoftext|>" in text  # 60 s gap: alone
