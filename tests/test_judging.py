"""Issue 14 at generation time: banned words, copying, best of n, no repeated n-grams, and the run's
chat format in serving. Each sample is judged before anyone sees it (botkit/engine/judging.py)."""

import dataclasses

import pytest

import botkit
from botkit.banned_words import banned_word_in, normalize
from botkit.chat.chats import Chats, Prompt
from botkit.chat_format import ChatFormat
from botkit.cli import with_run_chat_format
from botkit.config import Config
from botkit.engine.copy_index import CopyIndex
from botkit.engine.engine import Engine
from botkit.errors import GenerationError
from botkit.params import ChatSettings, SamplingParams
from botkit.serve.backends import LocalBackend
from botkit.serve.core import Core
from botkit.serve.store import Store


@pytest.mark.parametrize(
    ("text", "banned", "hit"),
    [
        ("you are a Sh1t", ("shit",), "shit"),
        ("ŞHİT happens", ("shit",), "shit"),
        ("s\u200bh\u200bi\u200bt", ("shit",), "shit"),
        ("a b.a.d word", ("bad",), "bad"),
        ("he is BÄD", ("bad",), "bad"),
        ("badminton is fun", ("bad",), None),
        ("a bad, bad day", ("very bad",), None),
        ("a very  bad day", ("very bad",), "very bad"),
        ("€vil 5cheme", ("evil scheme",), "evil scheme"),
        *[
            (f"you sh{c}it", ("shit",), "shit")
            for c in (
                "\ufe0f",
                "\u034f",
                "\u2066",
                "\u2069",
                "\u061c",
                "\u180b",
                "\U000e0041",
                "\u17b4",
                "\ufff9",
                "\U0001d173",
            )
        ],
        ("you are a \u0455\u04bb\u0456t", ("shit",), "shit"),  # Cyrillic lookalikes
        ("\u03bf\u03ba", ("ok",), "ok"),  # Greek lookalikes
        ("\u202etihs\u202c happens", ("shit",), "shit"),  # shown right to left: reads "shit"
        ("you sh.it", ("shit",), "shit"),
        ("what sh-it", ("shit",), "shit"),
        ("dog days", ("god",), None),
        ("pen.island", ("penis",), None),
    ],
)
def test_banned_words_are_found_in_any_case_accent_spacing_and_leetspeak(text, banned, hit):
    assert banned_word_in(text, banned) == hit
    assert normalize(text) == normalize(normalize(text))


def run(engine, ids, params):
    seq = engine.add(ids, params)
    while engine.has_work:
        engine.step()
    return seq


def first_word(text: str) -> str:
    return next(w for w in normalize(text).split() if len(w) > 2)


def test_a_reply_holding_a_banned_word_is_drawn_again_and_the_one_sent_holds_none(tiny_lm):
    ids = tiny_lm.tokenizer("Once upon a time").input_ids
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_k=0, seed=3)
    plain = run(Engine(tiny_lm, 4), ids, params)
    word = first_word(plain.text)
    judged = run(Engine(tiny_lm, 4), ids, dataclasses.replace(params, banned_words=(word,)))
    assert len(judged.attempts) >= 2 and judged.attempts[0].text == plain.text and judged.attempts[0].banned == word
    assert banned_word_in(judged.text, (word,)) is None and judged.text == judged.result.text


async def test_a_greedy_reply_that_is_banned_is_never_sent(tmp_path, tiny_lm):
    ids = tiny_lm.tokenizer("Once upon a time").input_ids
    word = first_word(run(Engine(tiny_lm, 2), ids, SamplingParams(max_new_tokens=16, temperature=0)).text)
    config = Config()
    config = dataclasses.replace(
        config, limits=dataclasses.replace(config.limits, user_per_minute=0, banned_words=(word.upper(),))
    )
    settings = ChatSettings(template="{message}", truncate="", temperature=0, length=16, unique=False)
    async with (
        Store.open(tmp_path / "bot.db") as store,
        LocalBackend(tiny_lm, 2) as backend,
        Core(backend, store, config) as core,
    ):
        chats = Chats(core, store, core.config)
        # the operator's list holds in every chat
        ticket = await chats.submit(Prompt("t", "c", "u", "Once upon a time"), settings)
        with pytest.raises(GenerationError, match="banned word"):
            await ticket.result()
        row = await store.request(ticket.request_id)
        assert row["status"] == "failed" and not row["reply"]
        assert await store.context("t", "c", 10) == []  # never context either


async def test_the_operators_banned_words_hold_with_a_full_chat_list_and_for_the_http_api(tmp_path, tiny_lm):
    ids = tiny_lm.tokenizer("Once upon a time").input_ids
    word = first_word(run(Engine(tiny_lm, 2), ids, SamplingParams(max_new_tokens=16, temperature=0)).text)
    config = Config()
    operator = tuple(f"op{i}" for i in range(199)) + (word,)
    config = dataclasses.replace(
        config, limits=dataclasses.replace(config.limits, user_per_minute=0, banned_words=operator)
    )
    chat_list = ",".join(f"chat{i}" for i in range(200))
    settings = ChatSettings(
        template="{message}", truncate="", temperature=0, length=16, unique=False, banned_words=chat_list
    )
    greedy = SamplingParams(max_new_tokens=16, temperature=0)
    async with (
        Store.open(tmp_path / "bot.db") as store,
        LocalBackend(tiny_lm, 2) as backend,
        Core(backend, store, config) as core,
    ):
        chats = Chats(core, store, config)
        for ticket in (
            await chats.submit(Prompt("t", "c", "u", "Once upon a time"), settings),
            await core.submit("Once upon a time", greedy),
        ):  # what the HTTP API and playground call
            with pytest.raises(GenerationError, match="banned word"):
                await ticket.result()


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_a_unique_reply_never_completes_a_run_of_the_training_text(tiny_lm, temperature):
    ids = tiny_lm.tokenizer("Once upon a time").input_ids
    params = SamplingParams(max_new_tokens=40, temperature=temperature, top_k=0, seed=5)
    plain = run(Engine(tiny_lm, 2), ids, params)
    index = CopyIndex.build(plain.generated)  # what it draws without the filter is the "training text"
    assert index.hits(plain.generated).all()
    engine = Engine(tiny_lm, 2)
    engine._index = index
    judged = run(engine, ids, dataclasses.replace(params, unique=True))
    assert judged.generated[:7] == plain.generated[:7]  # the same draw up to where an 8-token run would complete...
    assert not index.hits(judged.generated).any()  # ...then no 8 of its tokens in a row are in the training text
    assert len(judged.attempts) == 1 and not judged.result.copies  # so no draw had to be thrown away


def test_a_reply_that_copies_its_prompt_is_drawn_again_then_sent_as_the_least_copying(tiny_lm):
    ids = tiny_lm.tokenizer("Once upon a time").input_ids
    loop = run(Engine(tiny_lm, 2), ids, SamplingParams(max_new_tokens=24, temperature=0))  # a random model loops
    seq = run(
        Engine(tiny_lm, 2), ids + loop.generated, SamplingParams(max_new_tokens=24, temperature=1e-3, unique=True)
    )
    # near greedy, every draw says the prompt again...
    assert len(seq.attempts) == 4 and all(a.copies for a in seq.attempts)
    # ...so the least copying goes
    assert seq.result.copies and seq.result.copy_share == min(a.copy_share for a in seq.attempts)


def test_candidates_draw_together_share_the_prompt_and_the_likeliest_is_sent(tiny_lm):
    ids = tiny_lm.tokenizer("The history of the Roman empire " * 20).input_ids  # 140 tokens
    engine = Engine(tiny_lm, 8, cache_mb=0)
    seq = run(engine, ids, SamplingParams(max_new_tokens=10, temperature=1.0, top_k=0, seed=9, candidates=4))
    attempts = [a for m in seq.group for a in m.attempts]
    assert len(seq.group) == 4 and len(attempts) == 4 and len({a.text for a in attempts}) > 1
    assert seq.result is max(attempts, key=lambda a: a.score) and seq.text == seq.result.text
    assert engine.num_prompt_tokens_computed <= len(ids) + 3  # the prompt once, then one token per other candidate


def test_no_repeated_ngram_in_prompt_and_reply(tiny_lm):
    ids = tiny_lm.tokenizer("the cat sat on the mat and the cat sat on").input_ids
    loops = run(Engine(tiny_lm, 2), ids, SamplingParams(max_new_tokens=60, temperature=0))
    trigrams = lambda t: [tuple(t[i : i + 3]) for i in range(len(t) - 2)]  # noqa: E731
    assert len(set(trigrams(loops.context))) < len(trigrams(loops.context))  # greedy repeats itself
    seq = run(Engine(tiny_lm, 2), ids, SamplingParams(max_new_tokens=60, temperature=0, no_repeat_ngram_size=3))
    context = seq.prompt_ids + seq.generated
    new = trigrams(context)[len(ids) - 2 :]
    assert len(new) == len(set(new)) and not set(new) & set(trigrams(ids)[: len(ids) - 2])


def test_generate_unique_and_no_repeat_for_gpt2_simple_users(tiny_lm):
    texts = botkit.generate(
        tiny_lm,
        prefix="Hello",
        length=20,
        temperature=0,
        nsamples=2,
        batch_size=2,
        unique=True,
        no_repeat_ngram_size=2,
        return_as_list=True,
    )
    assert len(texts) == 2 and all(t.startswith("Hello") for t in texts)


async def test_a_chat_run_serves_in_the_format_it_was_trained_on(tmp_path, tiny_lm):
    fmt = ChatFormat(speaker="<{name}> {message}", separator="\n", truncate="\n")
    config = with_run_chat_format(Config(), fmt)
    assert config.chat.template == "<user> {message}\n<bot>" and config.chat.truncate == "\n"
    assert config.chat.chat_format == "<{name}> {message}\n" and config.chat.context == "channel"  # read the room
    own = dataclasses.replace(Config(), chat=ChatSettings(template="Q: {message}\nA:"))
    assert with_run_chat_format(own, fmt).chat.template == "Q: {message}\nA:"  # the config's own template wins
    assert with_run_chat_format(own, fmt).chat.context == "bot"
    config = dataclasses.replace(config, limits=dataclasses.replace(config.limits, user_per_minute=0))
    async with (
        Store.open(tmp_path / "bot.db") as store,
        LocalBackend(tiny_lm, 2) as backend,
        Core(backend, store, config) as core,
    ):
        chats = Chats(core, store, core.config)
        ticket = await chats.submit(Prompt("t", "c", "u", "pizza tonight?", user_name="Anna", bot_name="RidgeBot"))
        await ticket.result()
        # the asker's and the bot's own names, never a "user"/"bot" the model never saw; " word" tokens follow the colon
        assert (await store.request(ticket.request_id))["prompt"] == "<Anna> pizza tonight?\n<RidgeBot>"


def test_no_repeated_ngram_holds_past_the_window_slide():
    """A row that fills the window restarts on its last half (its context gets shorter): the n-grams
    it writes after that are still recorded and banned."""
    from transformers import GPT2Config

    from botkit.model.loading import load_model

    lm = load_model(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64), device="cpu", seed=0)
    ids = lm.tokenizer("the cat sat on the mat").input_ids
    seq = run(Engine(lm, 2), ids, SamplingParams(max_new_tokens=150, temperature=0, no_repeat_ngram_size=2))
    assert seq.offset > 0  # it slid
    bigrams = [tuple(seq.generated[i : i + 2]) for i in range(len(seq.generated) - 1)]
    assert len(bigrams) == len(set(bigrams))
