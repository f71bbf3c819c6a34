"""The web adapter over a real core, store and tiny model, driven over HTTP with aiohttp's client."""

import asyncio
import contextlib
import json
import threading

import aiohttp
import pytest
from botkit.adapters.web_adapter import WebAdapter, is_loopback

from botkit.config import BatchConfig, Config, LimitsConfig, WebConfig
from botkit.errors import ConfigError
from botkit.serve.backends import LocalBackend
from botkit.serve.core import Core
from botkit.serve.store import Store

UNLIMITED = LimitsConfig(user_per_minute=0, chat_per_minute=0)


@contextlib.asynccontextmanager
async def serving(tmp_path, lm, *, config=None, web_config=None, api_key=None, before_step=None, max_batch_size=8):
    """A whole botkit (store, local backend, core, web adapter on a free port) and an HTTP client."""
    config = config or Config(limits=UNLIMITED)
    async with (
        Store.open(tmp_path / "bot.db") as store,
        LocalBackend(lm, max_batch_size=max_batch_size, before_step=before_step) as backend,
        Core(backend, store, config) as core,
        WebAdapter(core, web_config or WebConfig(port=0), api_key) as web,
        aiohttp.ClientSession(base_url=web.url) as http,
    ):
        yield core, web, http


def sse_events(body: str) -> list[str]:
    return [line[len("data: ") :] for line in body.split("\n\n") if line.startswith("data: ")]


def assert_sentence(body: dict) -> str:
    message = body["error"]["message"]
    assert message.endswith(".") and "\n" not in message and "Traceback" not in message, message
    return message


async def test_completion_has_the_openai_shape(tmp_path, tiny_lm):
    async with serving(tmp_path, tiny_lm) as (core, web, http):
        body = {"prompt": ["Once upon a time", "The weather"], "max_tokens": 5, "n": 2, "seed": 3}
        async with http.post("/v1/completions", json=body) as response:
            assert response.status == 200
            result = await response.json()
    assert result["object"] == "text_completion" and result["id"].startswith("cmpl-")
    assert result["model"] == "random-gpt2" and isinstance(result["created"], int)
    assert [c["index"] for c in result["choices"]] == [0, 1, 2, 3]
    assert all(c["text"] and c["logprobs"] is None and c["finish_reason"] == "length" for c in result["choices"])
    assert result["choices"][0]["text"] != result["choices"][1]["text"]  # seed + j: the n samples differ
    usage = result["usage"]
    assert usage["completion_tokens"] == 4 * 5
    # "Once upon a time" is 4 GPT-2 tokens, "The weather" 2, each n=2 times
    assert usage["prompt_tokens"] == 2 * (4 + 2)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_streamed_completion_matches_the_plain_one(tmp_path, tiny_lm):
    body = {"prompt": "Hello there", "max_tokens": 12, "temperature": 0.9, "top_p": 0.9, "seed": 7}
    async with serving(tmp_path, tiny_lm) as (core, web, http):
        async with http.post("/v1/completions", json=body) as response:
            plain = (await response.json())["choices"][0]
        stream_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        async with http.post("/v1/completions", json=stream_body) as response:
            assert response.status == 200 and response.content_type == "text/event-stream"
            events = sse_events(await response.text())
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    assert len(choices) > 2  # text arrived in pieces, not at the end
    assert "".join(c["text"] for c in choices) == plain["text"]
    assert [c["finish_reason"] for c in choices][-1] == "length" and choices[0]["finish_reason"] is None
    assert chunks[-1]["usage"]["completion_tokens"] == 12 and chunks[-1]["choices"] == []


async def test_stop_string_ends_the_text_before_it(tmp_path, tiny_lm):
    body = {"prompt": "A list:", "max_tokens": 20, "seed": 11}
    async with serving(tmp_path, tiny_lm) as (core, web, http):
        async with http.post("/v1/completions", json=body) as response:
            full = (await response.json())["choices"][0]["text"]
        stop = full[len(full) // 2 :][:3]  # three characters from the middle of the sample
        async with http.post("/v1/completions", json={**body, "stop": [stop]}) as response:
            stopped = (await response.json())["choices"][0]
    assert stopped["text"] == full[: full.index(stop)]
    assert stopped["finish_reason"] == "stop"


@pytest.mark.parametrize(
    "body, word",
    [
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "max_tokens": 100000}, "max_tokens"),
        ({"prompt": "x", "max_tokens": "ten"}, "max_tokens"),
        ({"prompt": "x", "temperature": -1}, "temperature"),
        ({"prompt": "x", "temperature": "hot"}, "temperature"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "top_p": 1.5}, "top_p"),
        ({"prompt": "x", "n": 0}, "n "),
        ({"prompt": "x", "n": 100}, "n "),
        ({"prompt": ["x"] * 5, "n": 2}, "prompts"),
        ({"prompt": "x", "stop": 5}, "stop"),
        ({"prompt": "x", "stop": ["a"] * 20}, "stop"),
        ({"prompt": "x", "seed": "abc"}, "seed"),
        ({"prompt": "x", "stream": "yes"}, "stream"),
        ({"prompt": "x", "logprobs": 5}, "logprobs"),
        ({"prompt": "x", "echo": True}, "echo"),
        ({"prompt": "x", "min_p": 2}, "min_p"),
        ({"prompt": "x", "presence_penalty": 3}, "presence_penalty"),
        ({"prompt": "x", "frequency_penalty": "lots"}, "frequency_penalty"),
        ({"prompt": "x", "dry_sequence_breakers": "\n"}, "dry_sequence_breakers"),
        ({"prompt": "x", "min_tokens": 20}, "min_tokens"),
        ({"prompt": [1, 2, 3]}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({}, "prompt"),
        ([1, 2], "JSON object"),
        ({"prompt": "word " * 3000}, "window of 1024 tokens"),  # bounded by tokens, not characters
    ],
)
async def test_bad_parameters_are_400_with_a_sentence(tmp_path, tiny_lm, body, word):
    async with serving(tmp_path, tiny_lm, web_config=WebConfig(port=0, max_n=8)) as (core, web, http):
        async with http.post("/v1/completions", json=body) as response:
            assert response.status == 400
            assert word in assert_sentence(await response.json())
        assert core.stats().num_done == 0 and await core.recent() == []  # nothing was queued


async def test_samplers_are_honoured_per_request(tmp_path, tiny_lm):
    """min_tokens keeps a stop string from emptying a reply; the other samplers are accepted and change the text."""
    async with serving(tmp_path, tiny_lm) as (core, web, http):

        async def complete(**fields):
            async with http.post(
                "/v1/completions",
                json={"prompt": "The meaning of life is", "max_tokens": 6, "temperature": 0, **fields},
            ) as r:
                assert r.status == 200, await r.text()
                return (await r.json())["choices"][0]["text"]

        plain = await complete()
        first = tiny_lm.tokenizer.decode(tiny_lm.tokenizer(plain).input_ids[:1])
        assert await complete(stop=first) == ""
        assert len(await complete(stop=first, min_tokens=3)) > 0
        penalised = await complete(
            presence_penalty=2,
            frequency_penalty=2,
            min_p=0.1,
            typical_p=0.9,
            dry_multiplier=0.8,
            dry_sequence_breakers=["\n"],
            max_tokens=16,
        )
        assert penalised and penalised != await complete(max_tokens=16)


async def test_bad_playground_parameters_are_400(tmp_path, tiny_lm):
    async with serving(tmp_path, tiny_lm) as (core, web, http):
        for body, word in [
            ({"prefix": "x", "nsamples": 9}, "nsamples"),
            ({"prefix": "x", "top_k": -1}, "top_k"),
            ({"prefix": 3}, "prefix"),
            ({"prefix": "x", "length": 0}, "length"),
        ]:
            async with http.post("/api/generate", json=body) as response:
                assert response.status == 400
                assert word in assert_sentence(await response.json())


async def test_body_that_is_not_json_is_400(tmp_path, tiny_lm):
    async with serving(tmp_path, tiny_lm) as (core, web, http):
        for raw in [b"{not json", b"\xff\xfe", b""]:
            async with http.post("/v1/completions", data=raw, headers={"Content-Type": "application/json"}) as response:
                assert response.status == 400
                assert "not valid JSON" in assert_sentence(await response.json())
        # a form, as a cross-site page could send
        async with http.post("/v1/completions", data=b"prompt=x") as response:
            assert response.status == 415
            assert "application/json" in assert_sentence(await response.json())


async def test_oversize_body_is_413_with_a_sentence(tmp_path, tiny_lm):
    async with serving(tmp_path, tiny_lm, web_config=WebConfig(port=0, max_body_bytes=1000)) as (core, web, http):
        body = json.dumps({"prompt": "x" * 2000})
        async with http.post("/v1/completions", data=body, headers={"Content-Type": "application/json"}) as response:
            assert response.status == 413
            assert "1000-byte limit" in assert_sentence(await response.json())

        async def chunked():  # no Content-Length: the limit must hold while reading
            for _ in range(10):
                yield b" " * 500

        async with http.post(
            "/v1/completions", data=chunked(), headers={"Content-Type": "application/json"}
        ) as response:
            assert response.status == 413
            assert "limit" in assert_sentence(await response.json())
        assert await core.recent() == []


async def test_unknown_paths_and_methods_answer_json(tmp_path, tiny_lm):
    async with serving(tmp_path, tiny_lm) as (core, web, http):
        async with http.get("/v1/nothing") as response:
            assert response.status == 404
            assert "/v1/completions" in assert_sentence(await response.json())
        async with http.get("/v1/completions") as response:
            assert response.status == 405
            assert_sentence(await response.json())


async def test_models_stats_and_page(tmp_path, tiny_lm):
    async with serving(tmp_path, tiny_lm) as (core, web, http):
        async with http.get("/v1/models") as response:
            models = await response.json()
        async with http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3}) as response:
            assert response.status == 200
        async with http.get("/api/stats") as response:
            stats = await response.json()
        async with http.get("/") as response:
            page = await response.text()
            assert response.content_type == "text/html"
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["random-gpt2"]
    assert stats["num_done"] == 1 and stats["num_failed"] == 0 and stats["model"] == "random-gpt2"
    assert "1 done" in stats["summary"]
    assert 'id="prefix"' in page and "<script>" in page
    assert 'src="http' not in page and 'href="http' not in page and "@import" not in page  # no CDN: works offline


async def test_playground_streams_each_sample_and_lists_it_as_recent(tmp_path, tiny_lm):
    body = {
        "prefix": "The cat",
        "length": 10,
        "nsamples": 3,
        "temperature": 1.0,
        "top_k": 0,
        "top_p": 1.0,
        "truncate": "",
        "seed": 5,
    }
    async with serving(tmp_path, tiny_lm) as (core, web, http):
        async with http.post("/api/generate", json=body) as response:
            assert response.status == 200 and response.content_type == "text/event-stream"
            events = [json.loads(e) for e in sse_events(await response.text())]
        async with http.get("/api/recent", params={"limit": "5"}) as response:
            recent = (await response.json())["recent"]
    assert events[0]["type"] == "start" and len(events[0]["samples"]) == 3
    assert events[-1] == {"type": "end"}
    done = {e["index"]: e for e in events if e["type"] == "done"}
    assert sorted(done) == [0, 1, 2]
    for index, event in done.items():
        deltas = [e["text"] for e in events if e["type"] == "delta" and e["index"] == index]
        assert len(deltas) > 1 and "".join(deltas) == event["text"]
    assert len({e["text"] for e in done.values()}) == 3
    assert sorted(r["reply"] for r in recent) == sorted(e["text"] for e in done.values())
    assert {(r["text"], r["status"], r["platform"]) for r in recent} == {("The cat", "done", "web")}


async def test_api_key_is_required_when_configured(tmp_path, tiny_lm):
    async with serving(tmp_path, tiny_lm, api_key="s3cret-key") as (core, web, http):
        for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-key"}]:
            async with http.post("/v1/completions", json={"prompt": "x"}, headers=headers) as response:
                assert response.status == 401 and response.headers["WWW-Authenticate"] == "Bearer"
                assert "s3cret-key" not in assert_sentence(await response.json())
        async with http.get("/api/stats") as response:
            assert response.status == 401
        good = {"Authorization": "Bearer s3cret-key"}
        async with http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}, headers=good) as response:
            assert response.status == 200
        async with http.get("/") as response:  # the page holds no data; it asks for the key
            assert response.status == 200


async def test_refuses_a_public_host_without_an_api_key(tmp_path, tiny_lm):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.0.0.2")
    assert (
        not is_loopback("0.0.0.0")
        and not is_loopback("")
        and not is_loopback("192.168.1.5")
        and not is_loopback("example.com")
    )
    with pytest.raises(ConfigError, match="api_key_env"):
        async with serving(tmp_path, tiny_lm, web_config=WebConfig(host="0.0.0.0", port=0)):
            pass
    async with serving(tmp_path, tiny_lm, web_config=WebConfig(host="0.0.0.0", port=0), api_key="k") as (
        core,
        web,
        http,
    ):
        async with http.get("/v1/models", headers={"Authorization": "Bearer k"}) as response:
            assert response.status == 200


async def test_without_a_key_only_requests_addressed_to_localhost_are_answered(tmp_path, tiny_lm):
    async with serving(tmp_path, tiny_lm) as (core, web, http):
        async with http.get("/v1/models", headers={"Host": "attacker.example:8080"}) as response:
            assert response.status == 403  # a DNS-rebinding page reaches 127.0.0.1 under its own name
            assert "localhost" in assert_sentence(await response.json())
        async with http.get("/v1/models", headers={"Host": "localhost:8080"}) as response:
            assert response.status == 200


async def test_rate_limited_is_429_with_retry_after(tmp_path, tiny_lm):
    config = Config(limits=LimitsConfig(api_per_minute=1))
    async with serving(tmp_path, tiny_lm, config=config) as (core, web, http):
        async with http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}) as response:
            assert response.status == 200
        async with http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}) as response:
            assert response.status == 429 and int(response.headers["Retry-After"]) > 0
            assert "too fast" in assert_sentence(await response.json())


@contextlib.asynccontextmanager
async def held_worker(tmp_path, lm, config):
    """A botkit whose generation worker waits at its first step until the test lets it go."""
    gate = threading.Event()
    async with serving(tmp_path, lm, config=config, before_step=lambda seqs: gate.wait(10), max_batch_size=1) as served:
        try:
            yield (*served, gate)
        finally:
            gate.set()


async def test_full_queue_is_503_and_nothing_half_queued(tmp_path, tiny_lm):
    config = Config(limits=UNLIMITED, batch=BatchConfig(max_size=1, max_queue=2))
    async with held_worker(tmp_path, tiny_lm, config) as (core, web, http, gate):
        first = asyncio.create_task(http.post("/v1/completions", json={"prompt": "a", "max_tokens": 2, "n": 3}))
        while core.stats().queue_depth + core.stats().running < 3:
            await asyncio.sleep(0.01)
        async with http.post("/v1/completions", json={"prompt": "b", "max_tokens": 2, "n": 2}) as response:
            assert response.status == 503 and response.headers["Retry-After"]
            assert "busy" in assert_sentence(await response.json())
        gate.set()
        async with await first as response:
            assert response.status == 200
            assert len((await response.json())["choices"]) == 3
        statuses = [r["status"] for r in await core.recent()]
    assert statuses.count("done") == 3 and statuses.count("failed") == 0  # "b" was refused before any sample queued


async def test_generation_failure_is_a_sentence_not_a_traceback(tmp_path, tiny_lm):
    def explode(seqs):
        raise RuntimeError("internal detail /home/secret/path.py line 3")

    async with serving(tmp_path, tiny_lm, before_step=explode) as (core, web, http):
        async with http.post("/v1/completions", json={"prompt": "x", "max_tokens": 3}) as response:
            assert response.status == 500
            message = assert_sentence(await response.json())
        async with http.post("/v1/completions", json={"prompt": "x", "max_tokens": 3, "stream": True}) as response:
            events = sse_events(await response.text())
    assert "Generation failed" in message and "/home/secret" not in message
    assert events[-1] == "[DONE]" and "Generation failed" in json.loads(events[0])["error"]["message"]


async def test_client_that_hangs_up_cancels_its_samples(tmp_path, tiny_lm):
    config = Config(limits=UNLIMITED, batch=BatchConfig(max_size=1))
    async with held_worker(tmp_path, tiny_lm, config) as (core, web, http, gate):
        response = await http.post("/api/generate", json={"prefix": "x", "nsamples": 2, "length": 50})
        assert json.loads(sse_events((await response.content.readuntil(b"\n\n")).decode())[0])["type"] == "start"
        response.close()  # the browser tab is closed
        for _ in range(200):
            statuses = {r["status"] for r in await core.recent()}
            if statuses == {"cancelled"}:
                break
            await asyncio.sleep(0.02)
        assert statuses == {"cancelled"}


async def test_queued_samples_say_their_place_in_line(tmp_path, tiny_lm):
    config = Config(limits=UNLIMITED, batch=BatchConfig(max_size=1))
    async with held_worker(tmp_path, tiny_lm, config) as (core, web, http, gate):
        first = asyncio.create_task(http.post("/v1/completions", json={"prompt": "a", "max_tokens": 2}))
        while core.stats().running < 1:
            await asyncio.sleep(0.01)
        response = await http.post("/api/generate", json={"prefix": "b", "nsamples": 2, "length": 2})
        waiting = {}
        while len(waiting) < 2:
            event = json.loads(sse_events((await response.content.readuntil(b"\n\n")).decode())[0])
            if event["type"] == "waiting":
                waiting[event["index"]] = event["position"]
        gate.set()
        rest = [json.loads(e) for e in sse_events((await response.content.read()).decode())]
        response.close()
        (await first).close()
    assert waiting == {0: 1, 1: 2}
    assert [e["type"] for e in rest if e["type"] in ("done", "end")] == ["done", "done", "end"]


@pytest.mark.parametrize("stream", [False, True])
async def test_a_lone_surrogate_in_a_prompt_is_answered_with_its_usage(tmp_path, tiny_lm, stream):
    """Bug 8: the request was generated and stored, then the tokenizer refused the raw prompt while
    counting `usage`, and the client got a 500."""
    body = {"prompt": "bad \ud800 input", "max_tokens": 3, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    async with serving(tmp_path, tiny_lm) as (core, web, http):
        async with http.post("/v1/completions", json=body) as response:
            assert response.status == 200
            text = await response.text()
        rows = await core.recent(limit=5)
    usage = (json.loads(sse_events(text)[-2]) if stream else json.loads(text))["usage"]
    assert usage["prompt_tokens"] == len(tiny_lm.tokenizer("bad ? input").input_ids)
    assert usage["completion_tokens"] == 3
    assert [(r["text"], r["status"]) for r in rows] == [("bad ? input", "done")]
