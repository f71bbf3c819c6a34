"""config.example.toml documents every key; bad configs get one sentence naming the key."""

import dataclasses
import typing
from pathlib import Path

import pytest

from botkit.config import Config, load_config, secret
from botkit.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"


def test_example_documents_every_key_with_its_default():
    defaults = Config()  # its paths count from the file's folder
    assert load_config(EXAMPLE) == dataclasses.replace(
        defaults,
        model=dataclasses.replace(defaults.model, checkpoint_dir=str(EXAMPLE.parent / "checkpoint")),
        store=dataclasses.replace(defaults.store, path=str(EXAMPLE.parent / "botkit.db")),
    )
    lines = EXAMPLE.read_text().splitlines()
    for section in dataclasses.fields(Config):
        assert f"[{section.name}]" in lines
        for field in dataclasses.fields(typing.get_type_hints(Config)[section.name]):
            line = next(x for x in lines[lines.index(f"[{section.name}]") :] if x.startswith(f"{field.name} = "))
            assert "  # " in line, f"{section.name}.{field.name} has no comment"


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("[batch]\nmax_sise = 3", "unknown key 'batch.max_sise'"),
        ("[nope]\nx = 1", "unknown key 'nope'"),
        ("[batch]\nmax_size = 'big'", "batch.max_size must be a whole number"),
        ("[discord]\nallowed_channels = 5", "discord.allowed_channels must be a list"),
        ("[chat]\ntemplate = '{msg}'", "placeholder {message}"),
        ("[chat]\ntop_p = 3.0", "top_p"),
        ("[telegram]\ntoken_env = '123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsawxyz'", "looks like a secret"),
        ("[batch\n", "not valid TOML"),
        (
            "[limits]\nbanned_words = [" + ", ".join(f"'w{i}'" for i in range(201)) + "]",
            "limits.banned_words: a banned-word list holds at most 200",
        ),
        (
            "[limits]\nbanned_words = ['" + "x" * 65 + "']",
            "limits.banned_words: a banned-word list holds at most 200 words of at most 64",
        ),
    ],
)
def test_bad_config_is_one_sentence_naming_the_key(tmp_path, text, says):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert says in str(info.value) and str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_file_and_missing_secret(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.toml")
    monkeypatch.delenv("BOTKIT_TEST_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="BOTKIT_TEST_TOKEN"):
        secret("BOTKIT_TEST_TOKEN", "Discord")
    monkeypatch.setenv("BOTKIT_TEST_TOKEN", "s3cret")
    assert secret("BOTKIT_TEST_TOKEN", "Discord") == "s3cret"


def test_values_are_typed(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[discord]\nenabled = true\nallowed_channels = [123, '456']\n[chat]\ntemperature = 1\n")
    config = load_config(path)
    assert config.discord.allowed_channels == ("123", "456") and config.chat.temperature == 1.0
