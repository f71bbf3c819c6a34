"""Issue 22.1: replies streamed into chats (chat setting `stream`, botkit/chat/live_reply.py), on every
platform through the real SDK clients and the fake servers: a Telegram private chat shows drafts, a
group and Discord a message sent early and edited; the final text is the stored reply, delivered
once; no banned word is ever on screen; a draw drawn again replaces what was shown."""

from __future__ import annotations

import asyncio
import dataclasses
import random

import pytest
from platforms import GROUP, PRIVATE, fake_server, platform, until
from scripted import ScriptedBackend, SteppedBackend, delivered, deliveries

from botkit.banned_words import banned_word_in
from botkit.chat.live_reply import WRITING, visible_text
from botkit.config import Config, LimitsConfig
from botkit.engine.engine import Engine
from botkit.params import ChatSettings, SamplingParams

NO_LIMITS = LimitsConfig(user_per_minute=0, chat_per_minute=0)
FAST = {"discord": dict(stream_interval_s=0.05), "telegram": dict(stream_interval_s=0.05, group_stream_interval_s=0.05)}
CASES = [("discord", GROUP), ("discord", PRIVATE), ("telegram", GROUP), ("telegram", PRIVATE)]


def config(**settings) -> Config:
    return Config(chat=ChatSettings(truncate="", length=8, **settings), limits=NO_LIMITS)


# -- what may be shown ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("draft", "visible"),
    [
        ("I say ba", "I say"),  # "ba" may still become "bad"
        ("I say bad", "I say"),
        ("I say bad things", "I say"),
        ("fine, b.a.d", "fine,"),  # spelled out, held as one word
        ("fine b a d and more", "fine b a"),  # spelled with spaces: never the last letter
        ("a Sh1t day", "a"),
        ("no such word here", "no such word"),
    ],
)
def test_the_word_being_written_is_held_back_and_nothing_from_a_banned_word_on(draft, visible):
    assert visible_text(draft, ("bad", "shit")) == visible
    assert visible_text(draft, ()) == draft  # no banned words: all of it


def test_no_prefix_of_any_text_shows_a_banned_word_and_what_shows_only_grows():
    rng = random.Random(0)
    pieces = ["b", "a", "d", " ", ".", "sh", "1", "t", "x", "bad", "ok", "\n", "B", "4", "D"]
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randrange(1, 30)))
        shown = [visible_text(text[:n], ("bad", "shit")) for n in range(len(text) + 1)]
        assert all(banned_word_in(s, ("bad", "shit")) is None for s in shown), text
        assert all(b.startswith(a) for a, b in zip(shown, shown[1:], strict=False)), text


# -- every platform ---------------------------------------------------------------------------


async def send(bot, chat: str, text: str):
    return await bot.send(chat, "mention" if chat == GROUP else "plain", text)


@pytest.mark.parametrize(("name", "chat"), CASES)
async def test_a_reply_shows_while_it_is_written_and_ends_as_the_stored_reply(tmp_path, monkeypatch, name, chat):
    backend = SteppedBackend([("text", " Hello"), ("text", " there,"), ("text", " friend")], " Hello there, friend")
    async with platform(name, tmp_path, monkeypatch, backend, config(), **FAST[name]) as bot:
        message = await send(bot, chat, "hi")
        for shown in ("Hello", "Hello there,", "Hello there, friend"):
            backend.step()
            await until(lambda shown=shown: bot.showing(message) == [shown])
        backend.step()
        await until(lambda: bot.answers(message) == ["Hello there, friend"])
        [(request_id, message_id)] = await delivered(tmp_path, 1)
    updates = bot.updates()
    if (name, chat) == ("telegram", PRIVATE):  # drafts, then the reply sent once as a message
        assert bot.fake.drafts[42] == [
            (request_id, "Hello"),
            (request_id, "Hello there,"),
            (request_id, "Hello there, friend"),
        ]
        assert updates[-1] == "Hello there, friend" and len(bot.fake.calls_of("sendMessage")) == 1
    else:  # one message, sent early and edited: the delivery records it
        assert updates == ["Hello", "Hello there,", "Hello there, friend"]
        assert message_id == str(bot_message_id(bot, message))


def bot_message_id(bot, message) -> str:
    if "chat" in message:  # Telegram
        return next(
            m["message_id"]
            for m in bot.fake.sent(message["chat"]["id"])
            if m.get("reply_to_message", {}).get("message_id") == message["message_id"]
        )
    return next(
        m["id"] for m in bot.fake.bot_messages() if m.get("message_reference", {}).get("message_id") == message["id"]
    )


@pytest.mark.parametrize(("name", "chat"), CASES)
async def test_a_banned_word_never_shows_and_the_draw_drawn_again_replaces_the_draft(tmp_path, monkeypatch, name, chat):
    script = [
        ("draft", " I say ba"),
        ("draft", " I say bad"),
        ("draft", " I say bad things"),
        ("draft", ""),
        ("draft", " Kind words"),
        ("draft", " Kind words only"),
    ]
    backend = SteppedBackend(script, " Kind words only")
    async with platform(name, tmp_path, monkeypatch, backend, config(banned_words="bad"), **FAST[name]) as bot:
        message = await send(bot, chat, "hi")
        backend.step()
        await until(lambda: bot.showing(message) == ["I say"])
        backend.step(3)  # "bad" is written, then the draw is drawn again
        await until(lambda: bot.showing(message) == ["" if name == "telegram" and chat == PRIVATE else WRITING])
        backend.step(2)
        await until(lambda: bot.showing(message) == ["Kind words"])
        backend.step()
        await until(lambda: bot.answers(message) == ["Kind words only"])
        await until(lambda: deliveries(tmp_path))  # recorded once sent: the platform shows it a moment before
        assert len(deliveries(tmp_path)) == 1
    assert all("bad" not in text for text in bot.updates()), bot.updates()
    assert "I say" in bot.updates()  # the first draw did show, up to the word that could become banned


@pytest.mark.parametrize(("name", "chat"), CASES)
async def test_candidates_are_judged_whole_so_not_streamed(tmp_path, monkeypatch, name, chat):
    backend = SteppedBackend([("text", " one"), ("text", " two")], " one two")
    async with platform(name, tmp_path, monkeypatch, backend, config(candidates=2), **FAST[name]) as bot:
        message = await send(bot, chat, "hi")
        backend.step(2)
        typing = len(typing_calls(bot))
        # the bot went on past the text: had it streamed, it would show
        await until(lambda: len(typing_calls(bot)) >= typing + 2)
        assert bot.showing(message) == []
        backend.step()
        await until(lambda: bot.answers(message) == ["one two"])
    assert bot.updates() == ["one two"]


def typing_calls(bot) -> list:
    if hasattr(bot.fake, "calls_of"):  # Telegram
        return bot.fake.calls_of("sendChatAction")
    return [r for r in bot.fake.requests if r.path.endswith("/typing")]


@pytest.mark.parametrize(("name", "chat"), CASES)
async def test_a_failure_mid_stream_replaces_the_text_shown(tmp_path, monkeypatch, name, chat):
    backend = SteppedBackend([("text", " half a")], "!out of memory")
    async with platform(name, tmp_path, monkeypatch, backend, config(), **FAST[name]) as bot:
        message = await send(bot, chat, "hi")
        backend.step()
        await until(lambda: bot.showing(message) == ["half a"])
        backend.step()
        await until(lambda: bot.answers(message) == ["out of memory"])
        await until(lambda: deliveries(tmp_path))  # recorded once sent: the platform shows it a moment before
        assert len(deliveries(tmp_path)) == 1


async def test_the_setting_stream_off_sends_the_reply_whole(tmp_path, monkeypatch):
    backend = SteppedBackend([("text", " one"), ("text", " two")], " one two")
    async with platform("telegram", tmp_path, monkeypatch, backend, config(stream=False), **FAST["telegram"]) as bot:
        message = await send(bot, PRIVATE, "hi")
        backend.step(2)
        typing = len(typing_calls(bot))
        await until(lambda: len(typing_calls(bot)) >= typing + 2)
        backend.step()
        await until(lambda: bot.answers(message) == ["one two"])
    assert bot.updates() == ["one two"] and not bot.fake.drafts[42]


async def test_the_console_prints_the_reply_once(tmp_path, monkeypatch):
    backend = SteppedBackend([("text", " one"), ("text", " two")], " one two")
    async with platform("console", tmp_path, monkeypatch, backend, config()) as bot:
        answered = asyncio.create_task(bot.send(PRIVATE, "plain", "hi"))
        backend.step(3)
        assert await answered == ["one two"]


@pytest.mark.parametrize("name", ["discord", "telegram"])
async def test_after_a_restart_mid_stream_the_answer_edits_the_part_shown_once(tmp_path, monkeypatch, name):
    async with fake_server(name, monkeypatch) as fake:
        backend = SteppedBackend([("text", " half a")], " never finished")
        async with platform(name, tmp_path, monkeypatch, backend, config(), fake=fake, **FAST[name]) as bot:
            message = await send(bot, GROUP, "hi")
            backend.step()
            await until(lambda: bot.showing(message) == ["half a"])
        [shown_id] = [str(bot_message_id(bot, message))]
        async with platform(
            name,
            tmp_path,
            monkeypatch,
            ScriptedBackend(lambda p: " the whole reply"),
            config(),
            fake=fake,
            **FAST[name],
        ) as bot:
            await until(lambda: bot.answers(message) == ["the whole reply"])  # the half shown became the answer
            assert [message_id for _, message_id in await delivered(tmp_path, 1)] == [shown_id]


# -- the engine's previews ---------------------------------------------------------------------


def drafts_and_text(engine, ids, params) -> tuple[list[str], str]:
    seq, drafts = engine.add(ids, params), []
    while engine.has_work:
        drafts += [e.draft for e in engine.step() if e.draft is not None]
    return drafts, seq.text


def test_the_engine_previews_a_judged_draw_and_starts_over_when_it_is_drawn_again(tiny_lm):
    ids = tiny_lm.tokenizer("Once upon a time").input_ids
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_k=0, seed=3)
    _, plain = drafts_and_text(Engine(tiny_lm, 4), ids, params)
    word = next(w for w in banned_words_normalized(plain) if len(w) > 2)
    drafts, text = drafts_and_text(Engine(tiny_lm, 4), ids, dataclasses.replace(params, banned_words=(word,)))
    restart = drafts.index("")
    assert drafts[:restart] and all(plain.startswith(d) for d in drafts[:restart])  # the first draw, previewed
    last_restart = len(drafts) - 1 - drafts[::-1].index("")
    assert all(text.startswith(d) for d in drafts[last_restart + 1 :])  # the draw sent, previewed
    candidates, _ = drafts_and_text(Engine(tiny_lm, 4), ids, dataclasses.replace(params, candidates=2))
    assert candidates == []  # several candidates compete: nothing before the best is chosen


def banned_words_normalized(text: str) -> list[str]:
    from botkit.banned_words import normalize

    return normalize(text).split()


@pytest.mark.parametrize("name", ["discord", "telegram"])
async def test_parts_shown_that_the_answer_no_longer_needs_are_deleted(tmp_path, monkeypatch, name):
    long = " " + "word " * 900  # two parts on Telegram (4096), three on Discord (2000)
    backend = SteppedBackend([("text", long)], "!out of memory")
    async with platform(name, tmp_path, monkeypatch, backend, config(), **FAST[name]) as bot:
        message = await send(bot, GROUP, "hi")
        backend.step()
        await until(lambda: len(bot.showing(message)) >= 2)
        backend.step()
        await until(lambda: bot.answers(message) == ["out of memory"])  # one message: the other parts are gone
        assert len(await delivered(tmp_path, 1)) == 1


def test_a_streamed_line_break_shows_as_one_and_a_half_written_one_waits():
    from botkit.chat.live_reply import as_written

    assert as_written("packing list:<br>- water<br>- rain jacket") == "packing list:\n- water\n- rain jacket"
    assert [as_written("a<br>b" + tail) for tail in ("<", "<b", "<br", "<br>")] == ["a\nb", "a\nb", "a\nb", "a\nb\n"]
