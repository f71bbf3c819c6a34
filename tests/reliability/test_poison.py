"""The generation worker under faults: one poisoned request must not stall everyone, a tiny
temperature is greedy, a request that times out while failing logs nothing, and seeds 2^32 apart
differ. Each test failed before its fix."""

import asyncio
import gc
import logging
import math

import pytest

import botkit
from botkit.chat.chats import Chats, Prompt
from botkit.engine.engine import Engine
from botkit.errors import GenerationError, InputError, RequestTimeout
from botkit.params import SamplingParams
from botkit.serve.backends import LocalBackend
from botkit.serve.core import Core, Who
from botkit.serve.store import Store

from .conftest import make_config
from .test_faults import Poison

pytestmark = pytest.mark.usefixtures("one_thread")


async def serve_all(tiny_lm, tmp_path, texts, before_step=None):
    """Submit every text at once as completions of 16 tokens; returns (results, forward passes)."""
    tmp_path.mkdir()
    async with (
        Store.open(tmp_path / "bot.db") as store,
        LocalBackend(tiny_lm, max_batch_size=32, before_step=before_step) as backend,
        Core(backend, store, make_config()) as core,
    ):
        params = SamplingParams(max_new_tokens=16, temperature=0)
        tickets = [await core.submit(text, params, who=Who(user_id=str(i))) for i, text in enumerate(texts)]
        results = await asyncio.gather(*(t.result() for t in tickets), return_exceptions=True)
        return results, backend.engine.num_forward_passes


async def test_one_poisoned_request_among_32_costs_the_others_a_few_steps_not_a_stall(tiny_lm, tmp_path):
    texts = [f"request number {i} says hello" for i in range(32)]
    clean, clean_passes = await serve_all(tiny_lm, tmp_path / "a", texts)
    poison = Poison(tiny_lm.tokenizer, "POISON", RuntimeError("top_k overflow"))
    poisoned, poisoned_passes = await serve_all(
        tiny_lm, tmp_path / "b", texts[:16] + ["this is POISON"] + texts[16:], poison
    )

    assert isinstance(poisoned[16], GenerationError) and "RuntimeError" in str(poisoned[16])
    innocent = poisoned[:16] + poisoned[17:]
    assert [r.text for r in innocent] == [r.text for r in clean]  # same greedy text, nobody else failed
    # Narrowing 33 sequences down to one takes 2 * log2(33) steps or so; re-running each alone to the
    # end (the old retry) took 33 x 16.
    assert poisoned_passes - clean_passes <= 2 * math.ceil(math.log2(33)) + 2, (clean_passes, poisoned_passes)


async def test_requests_arriving_while_a_fault_is_narrowed_down_are_served(tiny_lm, tmp_path):
    poison = Poison(tiny_lm.tokenizer, "POISON", RuntimeError("bad row"))
    async with (
        Store.open(tmp_path / "bot.db") as store,
        LocalBackend(tiny_lm, max_batch_size=8, before_step=poison) as backend,
        Core(backend, store, make_config(timeout_s=30)) as core,
    ):
        params = SamplingParams(max_new_tokens=40, temperature=0)
        long = [await core.submit(f"long one {i}", params, who=Who(user_id=str(i))) for i in range(6)]
        bad = await core.submit("POISON", params, who=Who(user_id="bad"))
        while poison.num_raised == 0:
            await asyncio.sleep(0.01)
        quick = await core.submit(
            "one token please", SamplingParams(max_new_tokens=1, temperature=0), who=Who(user_id="q")
        )
        assert (await quick.result()).num_tokens == 1
        assert not any(t.done for t in long), "the 1-token request waited for the long ones to finish"
        with pytest.raises(GenerationError):
            await bad.result()
        assert [(await t.result()).num_tokens for t in long] == [40] * 6


def test_a_temperature_below_1e_38_is_greedy_not_the_least_likely_token(tiny_lm):
    kw = dict(prefix="Hello", length=12, return_as_list=True, seed=3)
    greedy = botkit.generate(tiny_lm, temperature=0, **kw)
    for tiny in (1e-39, 1e-30, 1e-6):
        assert botkit.generate(tiny_lm, temperature=tiny, **kw) == greedy


def test_seeds_2_to_the_32_apart_give_different_text(tiny_lm):
    kw = dict(prefix="Hello", length=16, temperature=1.0, top_k=0, return_as_list=True)
    assert botkit.generate(tiny_lm, seed=5, **kw) != botkit.generate(tiny_lm, seed=5 + 2**32, **kw)
    assert botkit.generate(tiny_lm, seed=5 + 2**32, **kw) == botkit.generate(tiny_lm, seed=5 + 2**32, **kw)


@pytest.mark.parametrize("value", [2**63, 2**64, -1, 1.5, True])
def test_out_of_range_sampling_values_are_refused_at_the_edge(value):
    with pytest.raises(InputError):
        SamplingParams(top_k=value)
    with pytest.raises(InputError):
        SamplingParams(seed=value)


async def test_a_request_that_times_out_while_it_fails_logs_no_unretrieved_exception(tiny_lm, tmp_path, caplog):
    slow_poison = Poison(tiny_lm.tokenizer, "POISON", RuntimeError("slow fault"))

    def slowly(seqs):
        import time

        time.sleep(0.15)  # every step is slow, so the request times out while its fault is narrowed down
        slow_poison(seqs)

    async with (
        Store.open(tmp_path / "bot.db") as store,
        LocalBackend(tiny_lm, max_batch_size=8, before_step=slowly) as backend,
        Core(backend, store, make_config(timeout_s=0.2)) as core,
    ):
        chats = Chats(core, store, core.config)
        ticket = await chats.submit(Prompt("t", "c", "u", "POISON now"))
        with pytest.raises(RequestTimeout):
            await ticket.result()
        while backend.engine.has_work:  # the worker fails it after the caller has gone
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.1)
    gc.collect()
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        gc.collect()
        await asyncio.sleep(0)
    assert "never retrieved" not in caplog.text


def test_an_engine_failure_alone_twice_fails_only_that_sequence(tiny_lm):
    poison = Poison(tiny_lm.tokenizer, "POISON", RuntimeError("always"))
    engine = Engine(tiny_lm, 4, before_step=poison)
    good = engine.add(tiny_lm.tokenizer("fine").input_ids, SamplingParams(max_new_tokens=5, temperature=0))
    bad = engine.add(tiny_lm.tokenizer("POISON").input_ids, SamplingParams(max_new_tokens=5, temperature=0))
    while engine.has_work:
        engine.step()
    assert bad.finish_reason == "error" and bad.error == "RuntimeError"
    assert good.finish_reason == "length" and len(good.generated) == 5
