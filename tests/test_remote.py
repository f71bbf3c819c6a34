"""RemoteBackend: a second botkit generating through the first one's /v1/completions, and a small
fake vLLM server on 127.0.0.1 for its wire format, retries, concurrency limit and failures."""

import asyncio
import contextlib
import json
import socket
from dataclasses import replace

import pytest
from aiohttp import web
from botkit.adapters.web_adapter import WebAdapter

from botkit.chat.chats import Chats, Prompt
from botkit.config import Config, LimitsConfig, ModelConfig, WebConfig
from botkit.errors import ConfigError, GenerationError, ModelLoadError
from botkit.params import ChatSettings, SamplingParams
from botkit.serve import capabilities
from botkit.serve.backends import Job, LocalBackend
from botkit.serve.core import Core
from botkit.serve.remote import RemoteBackend, completions_url
from botkit.serve.store import Store

UNLIMITED = Config(limits=LimitsConfig(user_per_minute=0, chat_per_minute=0))


@contextlib.asynccontextmanager
async def first_botkit(tmp_path, lm, api_key=None):
    """The serving botkit: local model, store, core and web adapter on a free port."""
    async with (
        Store.open(tmp_path / "first.db") as store,
        LocalBackend(lm, max_batch_size=8) as backend,
        Core(backend, store, UNLIMITED) as core,
        WebAdapter(core, WebConfig(port=0), api_key) as web,
    ):
        yield core, web


@contextlib.asynccontextmanager
async def second_botkit(tmp_path, config):
    """The front botkit: no model of its own, `[model] backend = "remote"`."""
    async with (
        Store.open(tmp_path / "second.db") as store,
        RemoteBackend.from_config(config) as backend,
        Core(backend, store, config) as core,
    ):
        yield core


def remote_config(url, **model):
    return Config(model=ModelConfig(backend="remote", url=url, **model), limits=UNLIMITED.limits)


async def test_a_second_botkit_gets_completions_from_the_first(tmp_path, tiny_lm):
    async with (
        first_botkit(tmp_path, tiny_lm) as (first, web),
        second_botkit(tmp_path, remote_config(web.url + "v1")) as second,
    ):
        assert second.backend.name == "random-gpt2"  # learnt from the first's /v1/models
        prompt = Prompt(platform="discord", chat_id="1", user_id="2", text="hello", message_id="9")
        settings = ChatSettings(length=8, truncate="", unique=False)  # unjudged: streamed (a judged reply comes whole)
        ticket = await Chats(second, second.store, second.config).submit(prompt, settings)
        deltas = [d async for d in ticket.stream()]
        reply = await ticket.result()
        served = (await first.recent(limit=1))[0]
    assert reply.text and len(deltas) > 1 and "".join(deltas) == reply.text
    assert served["reply"] == reply.text and served["status"] == "done" and served["platform"] == "web"
    assert served["text"] == "hello\n"  # the second botkit applied the chat template; the first got a raw completion
    assert reply.num_tokens == served["num_tokens"]


async def test_remote_samples_equal_local_ones_for_the_same_parameters(tmp_path, tiny_lm):
    params = SamplingParams(max_new_tokens=10, temperature=0.7, top_k=30, top_p=0.9, repetition_penalty=1.3, seed=42)
    async with (
        first_botkit(tmp_path, tiny_lm) as (first, web),
        second_botkit(tmp_path, remote_config(web.url)) as second,
    ):
        local = await (await first.submit("The river", params)).result()
        remote = await (await second.submit("The river", params)).result()
        stop = local.text[len(local.text) // 2 :][:3]
        stopped = await (await second.submit("The river", replace(params, stop=(stop,)))).result()
        other_seed = await (await second.submit("The river", replace(params, seed=43))).result()
    assert remote.text == local.text and remote.finish_reason == "length" and remote.num_tokens == 10
    assert stopped.text == local.text[: local.text.index(stop)] and stopped.finish_reason == "stop"
    assert other_seed.text != local.text


async def test_api_key_comes_from_the_environment(tmp_path, tiny_lm, monkeypatch):
    async with first_botkit(tmp_path, tiny_lm, api_key="right-key-123") as (first, web):
        monkeypatch.setenv("FIRST_KEY", "right-key-123")
        async with second_botkit(tmp_path, remote_config(web.url + "v1", api_key_env="FIRST_KEY")) as second:
            assert (await (await second.submit("x", SamplingParams(max_new_tokens=2))).result()).num_tokens == 2
        monkeypatch.setenv("FIRST_KEY", "wrong-key-456")
        with pytest.raises(ModelLoadError, match="refused the API key.*model.api_key_env") as refused:
            async with second_botkit(tmp_path, remote_config(web.url + "v1", api_key_env="FIRST_KEY")):
                pass
        assert "wrong-key-456" not in str(refused.value)
        monkeypatch.delenv("FIRST_KEY")
        with pytest.raises(ConfigError, match="FIRST_KEY"):
            RemoteBackend.from_config(remote_config(web.url, api_key_env="FIRST_KEY"))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_unreachable_server_is_one_clear_sentence(tmp_path, tiny_lm):
    with pytest.raises(ModelLoadError, match=r"cannot be reached \(Connection refused\): check model.url"):
        async with RemoteBackend(f"http://127.0.0.1:{closed_port()}/v1"):
            pass
    with pytest.raises(ConfigError, match="model.url is empty"):
        RemoteBackend.from_config(remote_config(""))
    with pytest.raises(ConfigError, match="http"):
        RemoteBackend.from_config(remote_config("gpu-box:8000"))


async def test_a_server_that_goes_away_fails_only_those_requests(tmp_path, tiny_lm):
    async with first_botkit(tmp_path, tiny_lm) as (first, web):
        second_context = second_botkit(tmp_path, remote_config(web.url))
        second = await second_context.__aenter__()
    try:  # the first botkit is gone now
        ticket = await second.submit("x", SamplingParams(max_new_tokens=2))
        with pytest.raises(GenerationError, match="cannot be reached"):
            await ticket.result()
        failed = (await second.recent(limit=1))[0]
        assert failed["status"] == "failed" and "cannot be reached" in failed["error"]
    finally:
        await second_context.__aexit__(None, None, None)


@pytest.mark.parametrize(
    "url, expected",
    [
        ("http://gpu:8000/v1", "http://gpu:8000/v1/completions"),
        ("http://gpu:8000/v1/", "http://gpu:8000/v1/completions"),
        ("http://gpu:8000", "http://gpu:8000/v1/completions"),
        ("https://gpu/api/v1/completions", "https://gpu/api/v1/completions"),
    ],
)
def test_completions_url(url, expected):
    assert str(completions_url(url)) == expected


class FakeVLLM:
    """Speaks like `vllm serve`: its /v1/models, its stream chunks (finish_reason on the last text
    chunk, then a usage chunk), its older error body; scripted busy answers; counts what is in flight."""

    def __init__(self, busy_answers=0, hold_s=0.0, has_models=True, drop_mid_answer=False, drop_before_answer=0):
        self.busy_answers = busy_answers
        self.hold_s = hold_s
        self.has_models = has_models
        self.drop_mid_answer = drop_mid_answer
        self.drop_before_answer = drop_before_answer  # requests whose connection closes with no answer at all
        self.bodies = []
        self.in_flight = self.max_in_flight = 0

    def app(self):
        app = web.Application()
        if self.has_models:
            app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.completions)
        return app

    async def models(self, request):
        return web.json_response({"object": "list", "data": [{"id": "gpt2", "object": "model", "max_model_len": 1024}]})

    async def completions(self, request):
        body = await request.json()
        if not body.get("stream"):  # botkit's probes at start (capabilities.py): vLLM without botkit's processor
            logprobs = {"token_logprobs": [-1.0]} if body.get("logprobs") is not None else None
            return web.json_response(
                {"choices": [{"index": 0, "text": " one", "logprobs": logprobs, "finish_reason": "length"}]}
            )
        self.bodies.append(body)
        if self.drop_before_answer:
            self.drop_before_answer -= 1
            request.transport.close()  # as an idle kept-alive connection the server had closed
            return web.Response()
        if self.busy_answers:
            self.busy_answers -= 1
            return web.json_response(
                {"object": "error", "message": "overloaded"}, status=503, headers={"Retry-After": "0"}
            )
        if body["model"] != "gpt2":
            return web.json_response(
                {"object": "error", "message": f"The model `{body['model']}` does not exist."}, status=404
            )
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.hold_s)
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            pieces = [" one", " two", " three"]
            for i, piece in enumerate(pieces):
                last = i == len(pieces) - 1
                chunk = {
                    "id": "cmpl-1",
                    "object": "text_completion",
                    "created": 1,
                    "model": "gpt2",
                    "choices": [
                        {
                            "index": 0,
                            "text": piece,
                            "logprobs": None,
                            "finish_reason": "length" if last else None,
                            "stop_reason": None,
                        }
                    ],
                    "usage": None,
                }
                await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
                if self.drop_mid_answer:
                    request.transport.close()  # the engine crashed
                    return response
            usage = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
            await response.write(
                f"data: {json.dumps({'id': 'cmpl-1', 'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n".encode()
            )
            return response
        finally:
            self.in_flight -= 1


@contextlib.asynccontextmanager
async def fake_vllm(fake):
    runner = web.AppRunner(fake.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    finally:
        await runner.cleanup()


async def test_speaks_vllms_dialect(tmp_path):
    fake = FakeVLLM()
    async with fake_vllm(fake) as url, RemoteBackend(url) as backend:
        seen = []
        params = SamplingParams(max_new_tokens=3, temperature=0.5, top_k=40, top_p=0.9, stop=("\n",), seed=1)
        done = await backend.generate(Job(1, "Hello", params, on_text=seen.append))
        unseeded = await backend.generate(Job(2, "Hello", SamplingParams(top_k=0)))
        details = backend.health_details()
    assert backend.name == "gpt2"
    assert seen == [" one", " two", " three"] and done.text == " one two three"
    assert (done.finish_reason, done.num_tokens, done.num_prompt_tokens, done.seed) == ("length", 3, 7, 1)
    sent = fake.bodies[0]
    assert sent == {
        "model": "gpt2",
        "prompt": "Hello",
        "max_tokens": 3,
        "temperature": 0.5,
        "top_p": 0.9,
        "stream": True,
        "stream_options": {"include_usage": True},
        "stop": ["\n"],
        "seed": 1,
        "top_k": 40,
    }
    assert "top_k" not in fake.bodies[1]  # OpenAI's API has no top_k; off means absent
    # as on the own engine, every sample has a seed, stored with it
    assert fake.bodies[1]["seed"] == unseeded.seed is not None
    # This fake is vLLM without botkit's processor: said at start and in /healthz, and no vllm_xargs are sent
    assert (
        "vllm_xargs" not in sent
        and details["unsupported"] == [capabilities.RULES]
        and "--logits-processors" in details["note"]
    )


async def test_busy_server_is_retried_then_reported(tmp_path):
    fake = FakeVLLM(busy_answers=2)
    async with fake_vllm(fake) as url, RemoteBackend(url) as backend:
        assert (await backend.generate(Job(1, "x", SamplingParams()))).text == " one two three"
        assert len(fake.bodies) == 3
        fake.busy_answers = 5
        with pytest.raises(GenerationError, match="busy"):
            await backend.generate(Job(2, "x", SamplingParams()))


async def test_server_errors_are_passed_on_as_a_sentence(tmp_path):
    async with fake_vllm(FakeVLLM()) as url, RemoteBackend(url, model="llama") as backend:
        with pytest.raises(GenerationError, match=r"refused the request \(404: The model `llama` does not exist.\)"):
            await backend.generate(Job(1, "x", SamplingParams()))


class EchoingVLLM(FakeVLLM):
    async def completions(self, request):  # a careless server that repeats the request's key in its error
        return web.json_response(
            {"object": "error", "message": f"bad request from {request.headers['Authorization']}"}, status=400
        )


async def test_a_server_that_echoes_the_api_key_never_leaks_it(tmp_path):
    async with fake_vllm(EchoingVLLM()) as url, RemoteBackend(url, api_key="sk-secret-123") as backend:
        with pytest.raises(GenerationError) as info:
            await backend.generate(Job(1, "x", SamplingParams()))
    assert "sk-secret-123" not in str(info.value) and "[redacted]" in str(info.value)


async def test_at_most_max_batch_size_requests_are_in_flight(tmp_path):
    fake = FakeVLLM(hold_s=0.05)
    async with fake_vllm(fake) as url, RemoteBackend(url, max_batch_size=2) as backend:
        done = await asyncio.gather(*(backend.generate(Job(i, "x", SamplingParams())) for i in range(6)))
    assert len(done) == 6 and fake.max_in_flight == 2


async def test_a_prompt_longer_than_the_remote_window_keeps_its_end(tmp_path):
    fake = FakeVLLM()
    async with fake_vllm(fake) as url, RemoteBackend(url, max_context=64) as backend:
        await backend.generate(Job(1, "word " * 200 + "THE END", SamplingParams(max_new_tokens=20)))
        await backend.generate(Job(2, "short", SamplingParams(max_new_tokens=100)))
        await backend.generate(Job(3, "", SamplingParams(max_new_tokens=5)))
    long, short, empty = fake.bodies
    assert long["prompt"].endswith("THE END") and backend.count_tokens(long["prompt"]) == 64 - 20
    assert long["max_tokens"] == 20
    assert short["prompt"] == "short" and short["max_tokens"] == 64 - 1  # "short" is one token
    assert empty["prompt"] == "<|endoftext|>"  # as the local engine does, GPT-2's unconditional start


async def test_a_server_without_a_model_list_needs_remote_model(tmp_path):
    async with fake_vllm(FakeVLLM(has_models=False)) as url:
        with pytest.raises(ModelLoadError, match="set model.remote_model"):
            async with RemoteBackend(url):
                pass
        async with RemoteBackend(url, model="gpt2") as backend:
            assert (await backend.generate(Job(1, "x", SamplingParams()))).text == " one two three"


async def test_a_connection_dropped_mid_answer_fails_that_request(tmp_path):
    async with fake_vllm(FakeVLLM(drop_mid_answer=True)) as url, RemoteBackend(url) as backend:
        seen = []
        with pytest.raises(GenerationError, match="remote model server http://127.0.0.1:[0-9]+ "):
            await backend.generate(Job(1, "x", SamplingParams(), on_text=seen.append))
    assert seen == [" one"]


async def test_candidates_and_banned_words_are_judged_here_as_on_the_own_engine(tmp_path):
    fake = FakeVLLM()  # it always answers " one two three"
    async with fake_vllm(fake) as url, RemoteBackend(url) as backend:
        done = await backend.generate(Job(1, "Hello", SamplingParams(candidates=3, seed=10)))
        # seed + i, as the engine
        assert [b["seed"] for b in fake.bodies] == [10, 11, 12] and all(b["logprobs"] == 0 for b in fake.bodies)
        assert (done.text, done.num_draws, done.seed) == (" one two three", 3, 10)
        fake.bodies.clear()
        with pytest.raises(GenerationError, match=r"each of 4 draws held a banned word"):
            # leetspeak, any case
            await backend.generate(Job(2, "Hello", SamplingParams(banned_words=("Tw0",), seed=1)))
    # redrawn with the engine's next seed
    assert len(fake.bodies) == 4 and fake.bodies[1]["seed"] == (1 + 0x9E3779B97F4A7C15) % 2**63
    assert not any("Tw0" in json.dumps(b) for b in fake.bodies)  # banned words are never sent


async def test_a_connection_closed_before_any_answer_is_sent_again(tmp_path):
    fake = FakeVLLM(drop_before_answer=1)
    async with fake_vllm(fake) as url, RemoteBackend(url) as backend:
        done = await backend.generate(Job(1, "Hello", SamplingParams(seed=1)))
    assert done.text == " one two three" and len(fake.bodies) == 2 and fake.bodies[0] == fake.bodies[1]
