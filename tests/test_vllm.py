"""The same reply rules on both engines: botkit's own and a real vLLM that botkit starts (backend = "vllm").

One vLLM server per session (it starts in about a minute on 2 cores), from the venv named by
BOTKIT_VLLM_VENV (default .vllm-venv, made by scripts/vllm_venv.sh), with botkit put beside it the
way a user does (`pip install --no-deps`, here into a folder on its PYTHONPATH so that a shared venv
stays untouched). It serves one tiny run trained here (head width 32: vLLM's CPU attention has no
16) with its own small byte-level tokenizer, overfit on a few Chinese lines: its byte tokens can
break characters, and its replies copy the training text unless `unique` stops them.
"""

import asyncio
import dataclasses
import re

import pytest
from scripted import VLLM_PYTHON, VLLM_VENV, install_beside_vllm

from botkit.banned_words import banned_word_in
from botkit.config import Config, LimitsConfig, ModelConfig, VllmConfig
from botkit.errors import GenerationError
from botkit.params import SamplingParams
from botkit.serve.backends import Job, LocalBackend

LINES = ["床前明月光，疑是地上霜。", "举头望明月，低头思故乡。"]
PROMPTS = ["床前", "举头", "明月", "低头", "疑是", "故乡"]

if not VLLM_PYTHON.is_file():  # before the run is trained: without vLLM this file costs nothing
    pytest.skip(
        f"no vLLM venv at {VLLM_VENV}: run scripts/vllm_venv.sh (or set BOTKIT_VLLM_VENV) to test on vLLM",
        allow_module_level=True,
    )


@pytest.fixture(scope="session")
def zh_run(tmp_path_factory):
    """A run overfit on LINES (its copy index holds them): a random GPT-2 from a GPT2Config with a
    byte-level tokenizer trained on LINES (300 tokens, 256 of them bytes that can break a character)."""
    from scripted import tiny_run

    folder = tmp_path_factory.mktemp("zh")
    (folder / "poems.txt").write_text("\n".join(LINES * 30) + "\n", encoding="utf-8")
    return tiny_run(
        folder,
        folder / "poems.txt",
        n_embd=64,
        n_head=2,
        n_ctx=64,
        steps=120,
        batch_size=4,
        learning_rate=1e-2,
        run_name="zh",
    ).run_dir


@pytest.fixture(scope="session")
def vllm_command(tmp_path_factory):
    """The command that starts vLLM's server with this checkout of botkit beside it."""
    target = install_beside_vllm(tmp_path_factory.mktemp("vllm-botkit"))
    return [
        "env",
        f"PYTHONPATH={target}",
        "OMP_NUM_THREADS=1",
        str(VLLM_PYTHON),
        "-m",
        "vllm.entrypoints.openai.api_server",
    ]


def vllm_config(run_dir, command) -> Config:
    return Config(
        model=ModelConfig(backend="vllm", source=str(run_dir), max_context=64),
        vllm=VllmConfig(command=tuple(command), args=("--dtype", "float32", "--max-num-seqs", "16"), cpu_kvcache_gb=1),
        limits=LimitsConfig(user_per_minute=0, chat_per_minute=0),
    )


@pytest.fixture(scope="session")
def session_loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="session")
def vllm_backend(zh_run, vllm_command, session_loop):
    """botkit's VllmBackend on the run: one vLLM server for the whole session."""
    from botkit.model.sources import resolve
    from botkit.serve.vllm_backend import VllmBackend

    config = vllm_config(zh_run, vllm_command)
    backend = VllmBackend.from_config(config, resolve(str(zh_run)))
    session_loop.run_until_complete(backend.__aenter__())
    yield backend
    session_loop.run_until_complete(backend.__aexit__(None, None, None))


@pytest.fixture(scope="session")
def local_backend(zh_run, session_loop):
    from botkit.model.loading import load_model

    backend = LocalBackend(load_model(str(zh_run), device="cpu"), max_batch_size=16)
    session_loop.run_until_complete(backend.__aenter__())
    yield backend
    session_loop.run_until_complete(backend.__aexit__(None, None, None))


@pytest.fixture(params=["local", "vllm"])
def engine(request, session_loop):
    """Run a coroutine function `fn(backend)` on each engine: the same behaviour test, both engines."""
    backend = request.getfixturevalue(f"{request.param}_backend")
    return lambda fn: session_loop.run_until_complete(fn(backend))


async def replies(backend, params: SamplingParams, prompts=PROMPTS, num_each: int = 1) -> list[str]:
    jobs = [
        Job(
            i, prompt, params if params.seed is None else SamplingParams(**{**params.__dict__, "seed": params.seed + i})
        )
        for i, prompt in enumerate(p for p in prompts for _ in range(num_each))
    ]
    return [c.text for c in await asyncio.gather(*(backend.generate(job) for job in jobs))]


def test_greedy_text_is_the_own_engines(local_backend, vllm_backend, session_loop):
    params = SamplingParams(max_new_tokens=24, temperature=0, top_k=0, stop=())
    local = session_loop.run_until_complete(replies(local_backend, params))
    remote = session_loop.run_until_complete(replies(vllm_backend, params))
    assert remote == local and all(local)


def test_no_broken_character_at_temperature_1_3(engine):
    texts = engine(
        lambda b: replies(b, SamplingParams(max_new_tokens=32, temperature=1.3, top_k=0, seed=7), num_each=4)
    )
    assert sum("\ufffd" in t for t in texts) == 0 and sum(len(t) for t in texts) > 100


def test_unique_replies_share_no_8_token_span_with_the_training_text(engine, zh_run):
    from botkit.engine.copy_index import CopyIndex

    index, tokenizer = CopyIndex.load(zh_run), None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(zh_run)
    copying = engine(
        lambda b: replies(b, SamplingParams(max_new_tokens=24, temperature=0.7, top_k=0, seed=1), num_each=2)
    )
    unique = engine(
        lambda b: replies(
            b, SamplingParams(max_new_tokens=24, temperature=0.7, top_k=0, seed=1, unique=True), num_each=2
        )
    )
    spans = lambda text: index.hits(tokenizer(text).input_ids).sum()  # noqa: E731 - 8-token windows found in the training text
    assert sum(spans(t) for t in copying) > 0  # the run is overfit: left alone, it copies its lines
    assert [spans(t) for t in unique] == [0] * len(unique) and all(unique)


def test_no_repeated_ngram(engine, zh_run):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(zh_run)
    texts = engine(
        lambda b: replies(b, SamplingParams(max_new_tokens=40, temperature=0, top_k=0, no_repeat_ngram_size=2))
    )
    for prompt, text in zip(PROMPTS, texts, strict=True):
        ids = tokenizer(prompt + text).input_ids
        pairs = list(zip(ids, ids[1:], strict=False))
        assert len(pairs) == len(set(pairs)) and len(ids) > len(tokenizer(prompt).input_ids) + 20


def test_banned_words_are_never_sent(engine):
    greedy = engine(lambda b: replies(b, SamplingParams(max_new_tokens=16, temperature=0, top_k=0), prompts=["床前"]))[
        0
    ]
    banned = max(re.split(r"[，。\n]", greedy)[1:-1], key=len)  # a whole clause: Chinese has no spaces between words
    assert banned_word_in(greedy, (banned,)) == banned  # the overfit run says it, left alone
    params = SamplingParams(max_new_tokens=16, temperature=1.3, top_k=0, banned_words=(banned,))

    async def draw(backend):  # a request whose every draw held it fails with a sentence: nothing is sent
        jobs = [Job(i, "床前", dataclasses.replace(params, seed=3 + 10 * i)) for i in range(8)]
        return await asyncio.gather(*(backend.generate(job) for job in jobs), return_exceptions=True)

    results = engine(draw)
    sent = [r.text for r in results if not isinstance(r, Exception)]
    assert all(
        isinstance(r, GenerationError) and "held a banned word" in str(r) for r in results if isinstance(r, Exception)
    )
    assert sent and [banned_word_in(t, (banned,)) for t in sent] == [None] * len(sent)
    assert sum(r.num_draws for r in results if not isinstance(r, Exception)) > len(sent)  # some were drawn again


def test_candidates_send_one_of_their_seeded_samples(engine):
    async def best_and_alone(backend):
        best = await backend.generate(
            Job(1, "床前", SamplingParams(max_new_tokens=12, temperature=1.0, top_k=0, seed=11, candidates=4))
        )
        alone = await backend.generate(
            Job(2, "床前", SamplingParams(max_new_tokens=12, temperature=1.0, top_k=0, seed=best.seed))
        )
        return best, alone

    best, alone = engine(best_and_alone)
    assert best.num_draws == 4 and best.seed in range(11, 15)  # candidate i draws with seed + i, on both engines
    assert best.text == alone.text  # the sample a seed means is the same alone and among candidates
