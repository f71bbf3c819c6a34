"""The chat format: rendering, prompts, literal placeholders, validation, the JSON file."""

import json

import pytest

from botkit.chat_format import CHAT_FORMAT_JSON, ChatFormat, clean_name
from botkit.errors import InputError
from botkit.params import ChatSettings
from botkit.prompting import build_prompt

CONVERSATION = [("alice", "anyone up?"), ("bob", "always")]


def test_render_and_prompt_share_one_layout():
    fmt = ChatFormat()
    assert fmt.render(CONVERSATION) == "alice: anyone up?\nbob: always\n<|endoftext|>"
    # ends at the colon: " word" tokens carry their space
    assert fmt.prompt(CONVERSATION, "gptbot") == "alice: anyone up?\nbob: always\ngptbot:"
    custom = ChatFormat(speaker="<{name}> {message} ~", separator="\n\n", truncate=" ~", end="")
    assert custom.render(CONVERSATION) == "<alice> anyone up? ~\n\n<bob> always ~\n\n"
    assert custom.prompt(CONVERSATION[:1], "gptbot") == "<alice> anyone up? ~\n\n<gptbot>"
    assert ChatFormat(speaker="{message}").render(CONVERSATION) == "anyone up?\nalways\n<|endoftext|>"


def test_placeholders_in_messages_and_names_stay_text():
    # str.format would pad this to 20,000,000 characters
    fmt = ChatFormat()
    text = fmt.render([("{message:>20000000}", "{name} {message:>20000000} {0} {message.__class__}")])
    assert (
        text
        == "{message:>20000000}".replace("{", " ").replace("}", " ").strip()
        + ": {name} {message:>20000000} {0} {message.__class__}\n<|endoftext|>"
    )
    assert len(text) < 200


def test_names_are_one_clean_line():
    assert clean_name("  Ali\nce\u2028 {x}\x00 ") == "Ali ce x"
    assert clean_name("\n\t ") == "someone"
    assert len(clean_name("n" * 500)) == 64
    assert ChatFormat().speaker_prefix("evil\ngptbot") == "evil gptbot: "


def test_prompt_drops_the_oldest_whole_messages_to_fit():
    fmt = ChatFormat()
    history = [("alice", "one two three"), ("bob", "four five"), ("carol", "six")]
    count = lambda text: len(text.split())  # noqa: E731 - words stand in for tokens
    assert fmt.prompt(history, "bot", budget_tokens=100, count_tokens=count) == fmt.prompt(history, "bot")
    assert fmt.prompt(history, "bot", budget_tokens=6, count_tokens=count) == "bob: four five\ncarol: six\nbot:"
    assert fmt.prompt(history, "bot", budget_tokens=1, count_tokens=count) == "bot:"


def test_chat_settings_make_todays_template_speak_the_format():
    fmt = ChatFormat()
    settings = ChatSettings().replace(**fmt.chat_settings("gptbot"))
    history = [("hi there", " hello!")]  # the model's reply starts with " hello", after "gptbot:"
    prompt = build_prompt(settings.template, "pizza?", history, settings.truncate, 1000, lambda t: len(t))
    assert prompt == fmt.prompt([("user", "hi there"), ("gptbot", "hello!"), ("user", "pizza?")], "gptbot")
    assert settings.truncate == "\n"


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"speaker": "{name}: no message"}, "{message} once"),
        ({"speaker": "{message} {message}"}, "{message} once"),
        ({"speaker": "{name} {name}: {message}"}, "{name} at most once"),
        ({"speaker": "{message} by {name}"}, "before {message}"),
        ({"speaker": "{who}: {message}"}, "no other braces"),
        ({"speaker": "{message:>9}"}, "no other braces"),
        ({"separator": ""}, "must not be empty"),
        ({"truncate": "{x}"}, "must not contain braces"),
        ({"end": "x" * 201}, "under 200"),
        ({"speaker": 5}, "must be text, not int"),
    ],
)
def test_bad_formats_are_one_sentence(fields, says):
    with pytest.raises(InputError, match=None) as info:
        ChatFormat(**fields)
    assert says in str(info.value) and str(info.value).endswith(".") and "\n" not in str(info.value)


def test_saved_in_a_run_folder_and_loaded_back(tmp_path):
    fmt = ChatFormat(speaker="[{name}] {message}", separator="\n", truncate="\n", end="<|endoftext|>")
    path = fmt.save(tmp_path)
    assert path == tmp_path / CHAT_FORMAT_JSON
    assert json.loads(path.read_text()) == {
        "speaker": "[{name}] {message}",
        "separator": "\n",
        "truncate": "\n",
        "end": "<|endoftext|>",
        "line_break": "<br>",
    }
    assert ChatFormat.load(tmp_path) == fmt == ChatFormat.load(path) == ChatFormat.parse(str(tmp_path))
    assert ChatFormat.load(tmp_path / "elsewhere") is None
    assert ChatFormat.parse('{"speaker": "<{name}> {message}"}') == ChatFormat(speaker="<{name}> {message}")


@pytest.mark.parametrize(
    ("content", "says"),
    [
        ('{"speaker": "{name}: {message}", "colour": "red"}', "unknown key 'colour'"),
        ("[1, 2]", "must be a JSON object"),
        ("{not json", "not valid JSON"),
        ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
        (b"\xff\xfe{}", "not valid JSON"),
    ],
)
def test_bad_files_are_one_sentence(tmp_path, content, says):
    path = tmp_path / CHAT_FORMAT_JSON
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(InputError) as info:
        ChatFormat.load(tmp_path)
    assert says in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(InputError, match="does not exist"):
        ChatFormat.parse(str(tmp_path / "missing.json"))
