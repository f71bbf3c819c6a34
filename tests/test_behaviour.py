"""When the bot speaks, and what it sends the model, on every platform: one table, one test.

Each column is a chat's `trigger` setting (plus random replies), each row what a user does in a
group or a private chat; a cell says whether the bot answers with a reply generated from the text
(and nothing else in the prompt), with a sentence, or stays silent. The same table runs against
Discord, Telegram and the console (tests/platforms.py), so the platforms cannot drift apart: before
the conversation layer, Telegram's `command` replied at random, its `always` left "@bot" in the
prompt, and its `never` still answered private chats while Discord's did not.
"""

from __future__ import annotations

import contextlib

import pytest
from platforms import GROUP, PLATFORMS, PRIVATE, platform, until
from scripted import ScriptedBackend

from botkit.chat.conversation import SWITCHED_OFF
from botkit.config import Config, LimitsConfig
from botkit.params import ChatSettings

EMPTY = "The message is empty: write some text for me to continue."
COLUMNS = {  # column -> (trigger, random_reply_chance); every draw is 0.5
    "always": ("always", 0.0),
    "mention": ("mention", 0.0),
    "mention+random": ("mention", 0.6),
    "command": ("command", 0.0),
    "command+random": ("command", 0.6),
    "never": ("never", 0.0),
}
# "reply": a reply generated from the message's text; "off": the sentence saying the bot is off here;
# "empty": the sentence saying the message is empty; None: silence.
TABLE = {  #                      always   mention  m+random  command  c+random  never
    (GROUP, "plain"): ("reply", None, "reply", None, None, None),
    (GROUP, "mention"): ("reply", "reply", "reply", None, None, None),
    (GROUP, "reply"): ("reply", "reply", "reply", None, None, None),
    (GROUP, "prefix"): ("reply", "reply", "reply", "reply", "reply", None),
    (GROUP, "command"): ("reply", "reply", "reply", "reply", "reply", "off"),
    (GROUP, "empty mention"): ("empty", "empty", "empty", None, None, None),
    (GROUP, "bot"): (None, None, None, None, None, None),
    (PRIVATE, "plain"): ("reply", "reply", "reply", None, None, None),
    (PRIVATE, "mention"): ("reply", "reply", "reply", None, None, None),
    (PRIVATE, "prefix"): ("reply", "reply", "reply", "reply", "reply", None),
    (PRIVATE, "command"): ("reply", "reply", "reply", "reply", "reply", "off"),
}


STREAM_FAST = {
    "discord": dict(stream_interval_s=0.01),
    "telegram": dict(stream_interval_s=0.01, group_stream_interval_s=0.01),
}


def text_of(chat: str, kind: str) -> str:
    return f"{chat} {kind} says hi"


@pytest.mark.parametrize("column", list(COLUMNS))
@pytest.mark.parametrize("name", PLATFORMS)
async def test_behaviour_table(tmp_path, monkeypatch, name, column):
    trigger, chance = COLUMNS[column]
    backend = ScriptedBackend(lambda prompt: f"re: {prompt.strip()}", stream=True)  # replies stream where they can
    settings = ChatSettings(truncate="", length=8, use_context=False, trigger=trigger, random_reply_chance=chance)
    config = Config(chat=settings, limits=LimitsConfig(user_per_minute=0, chat_per_minute=0))
    index = list(COLUMNS).index(column)
    async with platform(name, tmp_path, monkeypatch, backend, config, **STREAM_FAST.get(name, {})) as bot:
        cells = {key: row[index] for key, row in TABLE.items() if key[0] in bot.chats and key[1] in bot.kinds}
        sent = {key: await bot.send(*key, text_of(*key)) for key in cells}
        expected = {
            key: {"reply": [f"re: {text_of(*key)}"], "off": [SWITCHED_OFF], "empty": [EMPTY], None: []}[cell]
            for key, cell in cells.items()
        }
        with contextlib.suppress(AssertionError):  # a missing answer shows in the comparison below
            await until(
                lambda: all(len(bot.answers(sent[key])) >= len(answers) for key, answers in expected.items()), 5.0
            )
        await bot.adapter.conversation.idle()  # every message's handler has ended: no answer is still to come
        assert {key: bot.answers(message) for key, message in sent.items()} == expected
    assert sorted(backend.prompts) == sorted(f"{text_of(*key)}\n" for key, cell in cells.items() if cell == "reply")
