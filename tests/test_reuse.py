"""Conversation KV reuse (prefix_cache.py) and the hot path's incremental text (token_bytes.py)."""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scripted import hf_greedy
from transformers import GPT2Config

from botkit.engine.engine import Engine, default_cache_mb
from botkit.engine.prefix_cache import BLOCK, PrefixCache
from botkit.engine.token_bytes import TokenBytes
from botkit.model.loading import load_model
from botkit.params import SamplingParams

GREEDY = SamplingParams(max_new_tokens=12, temperature=0)


def run(engine, prompt_ids, params=GREEDY):
    seq = engine.add(prompt_ids, params)
    while engine.has_work:
        engine.step()
    return seq


def chat_turns(lm, engine, num_turns, message_len=9):
    """A closed-loop chat at the token level: each prompt is the last prompt, its reply and a new
    message; past the window's budget it drops to half the budget at once, as the core trims."""
    g = torch.Generator().manual_seed(1)
    budget = lm.max_context - GREEDY.max_new_tokens
    prompt, seqs = [], []
    for _ in range(num_turns):
        prompt = prompt + torch.randint(0, 50000, (message_len,), generator=g).tolist()
        if len(prompt) > budget:
            prompt = prompt[-budget // 2 :]
        seq = run(engine, prompt)
        seqs.append(seq)
        prompt = seq.context  # the prompt and its reply
    return seqs


def test_a_chat_reuses_its_earlier_turns_and_writes_what_it_writes_without_reuse():
    lm = load_model(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=128), device="cpu", seed=0)
    reused = chat_turns(lm, Engine(lm, 4, cache_mb=64), 12)  # 12 turns of 9 + 12 tokens: past the 128-token window
    plain = chat_turns(lm, Engine(lm, 4, cache_mb=0), 12)
    assert [s.generated for s in reused] == [s.generated for s in plain]
    assert all(s.num_reused == 0 for s in plain)
    assert sum(s.num_reused > 0 for s in reused) >= 9, [s.num_reused for s in reused]  # all but the first and the cuts
    assert max(s.num_reused for s in reused) >= 64
    for seq in reused[:4]:  # and equal to transformers on the whole prompt
        assert seq.generated == hf_greedy(lm, seq.prompt_ids[seq.offset :], 12)


def test_chats_sharing_a_template_reuse_it(tiny_lm):
    engine = Engine(tiny_lm, 4, cache_mb=64)
    template = tiny_lm.tokenizer(
        "You are a friendly bot in a Discord server about gardening. Keep replies short.\n" * 2
    ).input_ids
    first = run(engine, template + tiny_lm.tokenizer("Alice: hi").input_ids)
    second = run(engine, template + tiny_lm.tokenizer("Bob: how do I water cacti?").input_ids)
    assert first.num_reused == 0 and second.num_reused >= len(template) // BLOCK * BLOCK
    assert second.generated == hf_greedy(tiny_lm, second.prompt_ids, 12)


def test_a_tiny_cache_evicts_the_least_recently_used_and_stays_within_its_bytes(tiny_lm):
    engine = Engine(tiny_lm, 2, cache_mb=1)
    per_token = 2 * 2 * 32 * 4  # layers x (k, v) x width x bytes
    prompts = [
        torch.randint(0, 50000, (1500,), generator=torch.Generator().manual_seed(i)).tolist()[:1000] for i in range(8)
    ]
    for prompt in prompts:
        run(engine, prompt, SamplingParams(max_new_tokens=4, temperature=0))
        assert engine.prefix_cache.nbytes <= 2**20
    assert len(engine.prefix_cache.entries) == 2**20 // (1003 * per_token)  # the newest that fit
    assert run(engine, prompts[-1] + [5, 6], SamplingParams(max_new_tokens=2, temperature=0)).num_reused > 990
    assert run(engine, prompts[0] + [5, 6], SamplingParams(max_new_tokens=2, temperature=0)).num_reused == 0  # evicted


def test_the_prefix_cache_drops_an_entry_its_newer_turn_contains_and_frees_its_slot():
    cache = PrefixCache(max_entries=4, bytes_per_token=8)
    turn1 = list(range(40))
    assert cache.add(turn1, slot=3) == []
    entry, matched = cache.lookup(turn1 + [99, 98])
    assert matched == 40 and entry.tokens == turn1 and entry.slot == 3
    assert cache.add(turn1 + [99, 98, 97], slot=5) == [3]  # the older turn's slot is free again
    assert len(cache.entries) == 1 and cache.nbytes == 43 * 8
    assert cache.lookup(turn1[:20] + [7] * 30)[1] == 20  # a shared start, then the match ends
    assert cache.lookup([5] * 40)[0] is None


def test_past_its_slots_the_prefix_cache_evicts_the_least_recently_used_and_frees_its_slot():
    cache = PrefixCache(max_entries=2)
    chats = [[c] * 20 for c in range(3)]
    assert cache.add(chats[0], slot=0) == [] and cache.add(chats[1], slot=1) == []
    assert cache.lookup(chats[0] + [1])[1] == 20  # chat 0 is now the most recently used
    assert cache.add(chats[2], slot=2) == [1]
    assert [e.slot for e in cache.entries.values()] == [0, 2]
    assert cache.add([9] * 5, slot=7) == [7]  # shorter than a block: not worth a slot


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.integers(0, 50256), max_size=40))
def test_incremental_text_equals_decoding_the_whole_reply(tiny_lm, ids):
    detok = TokenBytes.of(tiny_lm.tokenizer).detokenizer()
    text = "".join(detok.add(i) for i in ids) + detok.flush()
    assert text == tiny_lm.tokenizer.decode(ids)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32), temperature=st.sampled_from([0.7, 1.3, 3.0]))
def test_sampled_text_never_holds_a_broken_character(tiny_lm, seed, temperature):
    """A random model samples bytes at random: without the UTF-8 mask most of these would hold U+FFFD."""
    engine = Engine(tiny_lm, 1, cache_mb=0)
    seq = run(
        engine,
        tiny_lm.tokenizer("你好，").input_ids,
        SamplingParams(max_new_tokens=24, temperature=temperature, top_k=0, seed=seed),
    )
    assert "\ufffd" not in seq.text
    # only a cut at the length may be unfinished
    assert "\ufffd" not in tiny_lm.tokenizer.decode(seq.generated).rstrip("\ufffd")


async def test_a_long_chat_trims_its_context_in_halves_so_most_turns_extend_the_last(tmp_path):
    import dataclasses

    from botkit.chat.chats import Chats, Prompt
    from botkit.config import Config
    from botkit.serve.backends import LocalBackend
    from botkit.serve.core import Core
    from botkit.serve.store import Store

    lm = load_model(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=128), device="cpu", seed=0)
    config = Config()
    config = dataclasses.replace(
        config,
        limits=dataclasses.replace(config.limits, user_per_minute=0, chat_per_minute=0, context_messages=6),
        chat=dataclasses.replace(config.chat, length=8, temperature=0, truncate=""),
    )
    prompts = []
    async with (
        Store.open(tmp_path / "bot.db") as store,
        LocalBackend(lm, 4, cache_mb=64) as backend,
        Core(backend, store, config) as core,
    ):
        chats = Chats(core, store, core.config)
        for turn in range(16):
            ticket = await chats.submit(Prompt("test", "chat", "user", f"message number {turn} from the user"))
            await ticket.result()
            prompts.append((await store.request(ticket.request_id))["prompt"])
        reused = backend.engine.prefix_cache.stats()["reused_share"]
        num_copied = backend.engine.runner.cache.num_copied_tokens
    extends = [prompts[t].startswith(prompts[t - 1]) for t in range(1, len(prompts))]
    assert extends.count(False) <= 4, extends  # a cut every few turns, not one on every turn
    assert reused > 0.5, reused
    assert num_copied == 0  # each turn took its conversation's slot over (the reply's text tokenised afresh included)


def test_the_gpu_path_one_padded_attention_call_per_layer_gives_the_same_greedy_tokens_on_cpu(tiny_lm):
    """On a GPU, decode attention is one padded call per layer (padded_decode); rows of different
    lengths, joining mid-flight, must still write what the per-row path writes."""
    prompts = [
        tiny_lm.tokenizer(p).input_ids
        for p in ("Hello world", "The quick brown fox jumps over the lazy", "A", "In the beginning")
    ]

    def greedy(padded):
        engine = Engine(tiny_lm, 3, padded_decode=padded)
        seqs = [engine.add(p, SamplingParams(max_new_tokens=20, temperature=0)) for p in prompts]
        while engine.has_work:
            engine.step()
        return [s.generated for s in seqs]

    assert greedy(True) == greedy(False)


async def test_a_long_channel_trims_its_context_in_halves_too(tmp_path):
    import dataclasses

    from botkit.chat.chats import Chats, Prompt
    from botkit.config import Config
    from botkit.serve.backends import LocalBackend
    from botkit.serve.core import Core
    from botkit.serve.store import Store

    lm = load_model(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=128), device="cpu", seed=0)
    config = Config()
    chat = dataclasses.replace(config.chat, length=8, temperature=0, truncate="\n", context="channel", unique=False)
    config = dataclasses.replace(
        config,
        chat=chat,
        limits=dataclasses.replace(config.limits, user_per_minute=0, chat_per_minute=0, context_messages=8),
    )
    prompts = []
    async with (
        Store.open(tmp_path / "bot.db") as store,
        LocalBackend(lm, 4, cache_mb=64) as backend,
        Core(backend, store, config) as core,
    ):
        chats = Chats(core, store, core.config)
        for turn in range(16):
            await store.add_channel_message(
                platform="t",
                chat_id="c",
                user_id="u2",
                user_name="bob",
                platform_message_id=f"x{turn}",
                text=f"chatter {turn}",
                keep=50,
            )
            ticket = await chats.submit(
                Prompt("t", "c", "u", f"question {turn} for the bot", message_id=f"q{turn}", user_name="alice")
            )
            await ticket.result()
            prompts.append((await store.request(ticket.request_id))["prompt"])
    starts = [p.split("\n")[0] for p in prompts]
    assert len(set(starts)) <= 5, starts  # the context's first line changes at the cuts only, not on every turn


@pytest.mark.parametrize(
    ("files", "limit_bytes"),
    [
        ({"memory.max": "536870912\n"}, 512 * 2**20),  # cgroup v2: a 512 MiB container
        ({"memory/memory.limit_in_bytes": "268435456\n"}, 256 * 2**20),  # cgroup v1
        ({"memory.max": "max\n"}, None),  # no limit: the machine's memory
        ({}, None),  # no cgroup file system
    ],
)
def test_the_default_cache_is_a_quarter_of_the_containers_memory_limit(tmp_path, files, limit_bytes):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    expected = min(physical, limit_bytes or physical) // 4 // 2**20
    assert default_cache_mb(torch.device("cpu"), cgroup_root=tmp_path) == expected
    assert limit_bytes is None or expected == limit_bytes // 4 // 2**20
