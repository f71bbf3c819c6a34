"""`/v1/chat/completions` through OpenAI's own Python client against the real web adapter, core,
store and a tiny model: messages with names rendered in the run's chat format, n, seed, stop,
streaming, the window in tokens (oldest messages dropped first), and one-sentence refusals."""

import contextlib
import json
import sqlite3

import openai
import pytest
from botkit.adapters.web_adapter import WebAdapter
from botkit.adapters.web_params import ApiMessage, chat_prompt

from botkit.chat_format import ChatFormat, ReplyDecoder
from botkit.config import Config, LimitsConfig, WebConfig
from botkit.serve.backends import LocalBackend
from botkit.serve.core import Core
from botkit.serve.store import Store

KEY = "test-key-for-the-chat-route"


@contextlib.asynccontextmanager
async def serving(tmp_path, lm, chat_format=None):
    config = Config(limits=LimitsConfig(user_per_minute=0, chat_per_minute=0))
    async with (
        Store.open(tmp_path / "bot.db") as store,
        LocalBackend(lm, max_batch_size=4) as backend,
        Core(backend, store, config) as core,
        WebAdapter(core, WebConfig(port=0), KEY, chat_format) as web,
    ):
        async with openai.AsyncOpenAI(base_url=web.url + "v1", api_key=KEY, max_retries=0) as client:
            yield client


def prompts(tmp_path) -> list[str]:
    with contextlib.closing(sqlite3.connect(tmp_path / "bot.db")) as db:
        return [row[0] for row in db.execute("SELECT prompt FROM requests ORDER BY id")]


CONVERSATION = [
    {"role": "user", "name": "Anna", "content": "who is in for the ridge walk?\nsaturday, 7am"},
    {"role": "assistant", "name": "RidgeBot", "content": "count me in"},
    {"role": "user", "name": "Ben", "content": [{"type": "text", "text": "me too"}]},
]


async def test_a_conversation_is_rendered_in_the_runs_format_with_its_speakers(tmp_path, tiny_lm):
    async with serving(tmp_path, tiny_lm) as client:
        result = await client.chat.completions.create(
            model="any",
            messages=CONVERSATION,
            max_tokens=6,
            n=2,
            seed=3,
            temperature=0.9,
            top_p=0.95,
            stop=["zzz"],
            extra_body={"top_k": 40},
        )
    assert result.object == "chat.completion" and len(result.choices) == 2
    assert all(c.message.role == "assistant" and isinstance(c.message.content, str) for c in result.choices)
    prompt = "Anna: who is in for the ridge walk?<br>saturday, 7am\nRidgeBot: count me in\nBen: me too\nRidgeBot:"
    assert prompts(tmp_path) == [prompt] * 2
    assert (
        result.usage.prompt_tokens == 2 * len(tiny_lm.tokenizer.encode(prompt))
        and 2 <= result.usage.completion_tokens <= 12
    )


async def test_a_plain_run_gets_the_documented_default_names(tmp_path, tiny_lm):
    async with serving(tmp_path, tiny_lm) as client:
        await client.chat.completions.create(
            model="any",
            max_tokens=2,
            messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}],
        )
    assert prompts(tmp_path) == ["System: be brief\nUser: hello\nAssistant:"]


async def test_a_chat_run_speaks_its_own_format(tmp_path, tiny_lm):
    fmt = ChatFormat(speaker="<{name}> {message}", line_break=" / ")
    async with serving(tmp_path, tiny_lm, fmt) as client:
        await client.chat.completions.create(model="any", messages=CONVERSATION, max_tokens=2)
    assert prompts(tmp_path) == [
        "<Anna> who is in for the ridge walk? / saturday, 7am\n<RidgeBot> count me in\n<Ben> me too\n<RidgeBot>"
    ]


async def test_streaming_gives_the_same_reply_as_a_plain_request(tmp_path, tiny_lm):
    async with serving(tmp_path, tiny_lm, ChatFormat(truncate="")) as client:
        plain = await client.chat.completions.create(model="any", messages=CONVERSATION, max_tokens=12, temperature=0)
        stream = await client.chat.completions.create(
            model="any",
            messages=CONVERSATION,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content and len(text) > 0
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].usage.completion_tokens == 12
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


async def test_a_long_conversation_is_trimmed_oldest_first_to_the_window(tmp_path, tiny_lm):
    messages = [{"role": "user", "name": f"p{i}", "content": f"message number {i} " + "walk " * 40} for i in range(40)]
    async with serving(tmp_path, tiny_lm) as client:
        await client.chat.completions.create(model="any", messages=messages, max_tokens=100)
    (prompt,) = prompts(tmp_path)
    assert len(tiny_lm.tokenizer.encode(prompt)) <= 1024 - 100
    assert "message number 0 " not in prompt and prompt.endswith("message number 39 " + "walk " * 40 + "\nAssistant:")


@pytest.mark.parametrize(
    ("messages", "says"),
    [
        ([{"role": "robot", "content": "hi"}], "role is one of"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            "images and audio are not supported",
        ),
        ([], "non-empty list"),
        ([{"role": "user", "content": "word " * 3000}], "longer than the model's window"),
    ],
)
async def test_bad_requests_are_one_sentence(tmp_path, tiny_lm, messages, says):
    async with serving(tmp_path, tiny_lm) as client:
        with pytest.raises(openai.BadRequestError) as refused:
            await client.chat.completions.create(model="any", messages=messages, max_tokens=4)
    message = refused.value.body["message"]
    assert says in message and message.endswith(".") and "\n" not in message


def test_line_breaks_are_decoded_even_when_split_across_pieces():
    decoder = ReplyDecoder("<br>")
    pieces = ["packing list:<b", "r>- water<", "br>- jacket <", "3"]
    assert "".join(decoder.feed(p) for p in pieces) + decoder.flush() == "packing list:\n- water\n- jacket <3"


def test_the_prompt_keeps_the_newest_messages_whole():
    messages = tuple(ApiMessage("user", f"p{i}", "x " * 10) for i in range(10))
    prompt, bot = chat_prompt(messages, ChatFormat(), 40, lambda text: len(text.split()))
    assert bot == "Assistant" and prompt.startswith("p") and prompt.endswith("Assistant:")
    assert prompt.count("\n") == 3  # three whole messages fit 40 "tokens" of 11 each, then the turn


async def test_a_completion_prompt_over_4000_characters_that_fits_the_window_is_served(tmp_path, tiny_lm):
    prompt = "x" * 5000  # the old bound was max_message_chars (4,000 characters), meant for chat messages
    assert len(tiny_lm.tokenizer.encode(prompt)) < 1024
    async with serving(tmp_path, tiny_lm) as client:
        result = await client.completions.create(model="any", prompt=prompt, max_tokens=2)
    assert result.choices[0].finish_reason == "length"


async def test_the_playground_says_why_a_sample_stopped_at_once(tmp_path, tiny_lm):
    import aiohttp

    config = Config(limits=LimitsConfig(user_per_minute=0, chat_per_minute=0))
    async with (
        Store.open(tmp_path / "bot.db") as store,
        LocalBackend(tiny_lm, max_batch_size=4) as backend,
        Core(backend, store, config) as core,
        WebAdapter(core, WebConfig(port=0)) as web,
        aiohttp.ClientSession(base_url=web.url) as http,
    ):

        async def done(**fields):
            body = {"prefix": "The cat", "length": 3, "temperature": 0, **fields}
            async with http.post("/api/generate", json=body) as response:
                events = [
                    json.loads(line[6:]) for line in (await response.text()).split("\n\n") if line.startswith("data: ")
                ]
            return next(e for e in events if e["type"] == "done")

        first = (await done(truncate="", length=1))["text"]  # greedy: the token this model always writes first
        stopped = await done(truncate=first, min_tokens=0)
        assert first and stopped["text"] == "" and stopped["num_tokens"] >= 1
        assert stopped["note"].startswith(
            f"The sample stopped at once: the model's first token was the truncate text {first!r}"
        )
        by_default = await done(truncate=first)  # min_tokens 1: the first token may not end it
        assert by_default["text"] and not by_default["text"].startswith(first) and by_default["note"] == ""


def test_where_a_person_expects_text_a_sample_gets_min_tokens():
    from botkit.adapters.web_params import parse_chat, parse_completion, parse_playground

    from botkit.params import ChatSettings

    assert parse_playground({"prefix": "x"}, max_n=1).params.min_tokens == 1
    assert ChatSettings().sampling().min_tokens == 1
    # the completions API keeps OpenAI's and vLLM's default
    assert parse_completion({"prompt": "x"}, max_n=1).params.min_tokens == 0
    messages = [{"role": "user", "content": "hi"}]
    # a person reads a chat reply
    assert parse_chat({"messages": messages}, max_n=1, default_stop=("\n",))[1].params.min_tokens == 1
    assert parse_chat({"messages": messages, "min_tokens": 0}, max_n=1, default_stop=())[1].params.min_tokens == 0
