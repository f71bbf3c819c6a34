"""Conversation KV reuse (prefix_cache.py) and the hot path's incremental text (token_bytes.py)."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import GPT2Config

from botkit.engine import Engine
from botkit.models import load_model
from botkit.params import SamplingParams
from botkit.prefix_cache import BLOCK, PrefixCache
from botkit.token_bytes import TokenBytes

GREEDY = SamplingParams(max_new_tokens=12, temperature=0)


def hf_greedy(lm, ids, n):
    ids = torch.tensor([ids])
    out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n, min_new_tokens=n,
                            pad_token_id=lm.eos_token_id)
    return out[0, ids.shape[1]:].tolist()


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
        assert seq.generated == hf_greedy(lm, seq.prompt_ids[seq.offset:], 12)


def test_chats_sharing_a_template_reuse_it(tiny_lm):
    engine = Engine(tiny_lm, 4, cache_mb=64)
    template = tiny_lm.tokenizer("You are a friendly bot in a Discord server about gardening. Keep replies short.\n" * 2).input_ids
    first = run(engine, template + tiny_lm.tokenizer("Alice: hi").input_ids)
    second = run(engine, template + tiny_lm.tokenizer("Bob: how do I water cacti?").input_ids)
    assert first.num_reused == 0 and second.num_reused >= len(template) // BLOCK * BLOCK
    assert second.generated == hf_greedy(tiny_lm, second.prompt_ids, 12)


def test_a_tiny_cache_evicts_the_least_recently_used_and_stays_within_its_bytes(tiny_lm):
    engine = Engine(tiny_lm, 2, cache_mb=1)
    per_token = 2 * 2 * 32 * 4  # layers x (k, v) x width x bytes
    prompts = [torch.randint(0, 50000, (1500,), generator=torch.Generator().manual_seed(i)).tolist()[:1000] for i in range(8)]
    for prompt in prompts:
        run(engine, prompt, SamplingParams(max_new_tokens=4, temperature=0))
        assert engine.prefix_cache.nbytes <= 2**20
    assert len(engine.prefix_cache.entries) == 2**20 // (1003 * per_token)  # the newest that fit
    assert run(engine, prompts[-1] + [5, 6], SamplingParams(max_new_tokens=2, temperature=0)).num_reused > 990
    assert run(engine, prompts[0] + [5, 6], SamplingParams(max_new_tokens=2, temperature=0)).num_reused == 0  # evicted


def test_the_prefix_cache_drops_an_entry_its_newer_turn_contains():
    cache = PrefixCache(max_bytes=2**30)
    kv = lambda n: torch.zeros(1, 2, 1, n, 4)  # noqa: E731
    turn1 = list(range(40))
    cache.add(turn1, kv(40))
    entry, matched = cache.lookup(turn1 + [99, 98])
    assert matched == 40 and entry.tokens == turn1
    cache.add(turn1 + [99, 98, 97], kv(43))
    assert len(cache.entries) == 1 and cache.nbytes == kv(43).numel() * 4
    assert cache.lookup(turn1[:20] + [7] * 30)[1] == 20  # a shared start, then the match ends
    assert cache.lookup([5] * 40)[0] is None


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
    seq = run(engine, tiny_lm.tokenizer("你好，").input_ids, SamplingParams(max_new_tokens=24, temperature=temperature, top_k=0, seed=seed))
    assert "\ufffd" not in seq.text
    assert "\ufffd" not in tiny_lm.tokenizer.decode(seq.generated).rstrip("\ufffd")  # only a cut at the length may be unfinished


async def test_a_long_chat_trims_its_context_in_halves_so_most_turns_extend_the_last(tmp_path):
    import dataclasses

    from botkit.backends import LocalBackend
    from botkit.config import Config
    from botkit.core import Core, Prompt
    from botkit.store import Store

    lm = load_model(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=128), device="cpu", seed=0)
    config = Config()
    config = dataclasses.replace(config, limits=dataclasses.replace(config.limits, user_per_minute=0, chat_per_minute=0, context_messages=6),
                                 chat=dataclasses.replace(config.chat, length=8, temperature=0, truncate=""))
    prompts = []
    async with Store.open(tmp_path / "bot.db") as store, LocalBackend(lm, 4, cache_mb=64) as backend, Core(backend, store, config) as core:
        for turn in range(16):
            ticket = await core.submit(Prompt("test", "chat", "user", f"message number {turn} from the user"))
            await ticket.result()
            prompts.append((await store.request(ticket.request_id))["prompt"])
        reused = backend.engine.prefix_cache.stats()["reused_share"]
    extends = [prompts[t].startswith(prompts[t - 1]) for t in range(1, len(prompts))]
    assert extends.count(False) <= 4, extends  # a cut every few turns, not one on every turn
    assert reused > 0.5, reused


def test_the_gpu_path_one_padded_attention_call_per_layer_gives_the_same_greedy_tokens_on_cpu(tiny_lm):
    """On a GPU, decode attention is one padded call per layer (padded_decode); rows of different
    lengths, joining mid-flight, must still write what the per-row path writes."""
    prompts = [tiny_lm.tokenizer(p).input_ids for p in ("Hello world", "The quick brown fox jumps over the lazy", "A", "In the beginning")]

    def greedy(padded):
        engine = Engine(tiny_lm, 3, padded_decode=padded)
        seqs = [engine.add(p, SamplingParams(max_new_tokens=20, temperature=0)) for p in prompts]
        while engine.has_work:
            engine.step()
        return [s.generated for s in seqs]

    assert greedy(True) == greedy(False)


async def test_a_long_channel_trims_its_context_in_halves_too(tmp_path):
    import dataclasses

    from botkit.backends import LocalBackend
    from botkit.config import Config
    from botkit.core import Core, Prompt
    from botkit.store import Store

    lm = load_model(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=128), device="cpu", seed=0)
    config = Config()
    chat = dataclasses.replace(config.chat, length=8, temperature=0, truncate="\n", context="channel", unique=False)
    config = dataclasses.replace(config, chat=chat, limits=dataclasses.replace(config.limits, user_per_minute=0, chat_per_minute=0,
                                                                                context_messages=8))
    prompts = []
    async with Store.open(tmp_path / "bot.db") as store, LocalBackend(lm, 4, cache_mb=64) as backend, Core(backend, store, config) as core:
        for turn in range(16):
            await store.add_channel_message(platform="t", chat_id="c", user_id="u2", user_name="bob", platform_message_id=f"x{turn}",
                                            text=f"chatter {turn}", keep=50)
            ticket = await core.submit(Prompt("t", "c", "u", f"question {turn} for the bot", message_id=f"q{turn}", user_name="alice"))
            await ticket.result()
            prompts.append((await store.request(ticket.request_id))["prompt"])
    starts = [p.split("\n")[0] for p in prompts]
    assert len(set(starts)) <= 5, starts  # the context's first line changes at the cuts only, not on every turn


def test_candidates_read_their_shared_prompt_once_and_attend_as_one_call_per_row_would():
    """A request's candidates hold the same prompt columns; their decode attention reads them once for
    the group (kvcache._decode_sharing_prompts). Equal to one SDPA call per row up to rounding, with
    garbage (NaN) past each row's end, and rows outside any group unchanged."""
    from botkit.kvcache import Step, rows_attention

    torch.manual_seed(0)
    heads, dim, capacity, shared = 4, 16, 96, 70
    key, value = torch.full((6, heads, capacity, dim), float("nan")), torch.full((6, heads, capacity, dim), float("nan"))
    lengths = [75, 71, 90, 80, 40, 72]
    for r, n in enumerate(lengths):
        key[r, :, :n], value[r, :, :n] = torch.randn(heads, n, dim), torch.randn(heads, n, dim)
    for r in (1, 2, 5):  # rows 0, 1, 2 and 5 hold row 0's first 70 columns
        key[r, :, :shared], value[r, :, :shared] = key[0, :, :shared], value[0, :, :shared]
    query = torch.randn(1, heads, 6, dim)
    decode = [(r, n) for r, n in enumerate(lengths)]
    where = torch.zeros(1, dtype=torch.long)

    def attend(step):
        return rows_attention(None, query, key, value, None, step=step, scaling=dim**-0.5)[0]

    one_per_row = attend(Step(decode, [], where))
    grouped = attend(Step(decode, [], where, shared=[([0, 1, 2, 5], shared)]))
    assert not grouped.isnan().any()
    torch.testing.assert_close(grouped, one_per_row, rtol=1e-5, atol=1e-6)
    assert torch.equal(grouped[:, [3, 4]], one_per_row[:, [3, 4]])  # the others: the same calls


def test_candidates_decoding_together_draw_what_they_would_with_one_attention_call_per_row(tiny_lm, monkeypatch):
    import botkit.engine
    import botkit.kvcache

    ids = tiny_lm.tokenizer("The history of the Roman empire " * 20).input_ids  # 140 tokens
    calls = []
    grouped_attention = botkit.kvcache._decode_sharing_prompts
    monkeypatch.setattr(botkit.kvcache, "_decode_sharing_prompts", lambda *a: calls.append(a[3].shared) or grouped_attention(*a))

    def draws():
        seq = run(Engine(tiny_lm, 8, cache_mb=0), ids, SamplingParams(max_new_tokens=12, temperature=1.0, top_k=0, seed=3, candidates=4))
        return sorted(a.text for m in seq.group for a in m.attempts)

    shared = draws()
    assert calls and calls[0] == [([0, 1, 2, 3], len(ids) - 1)]  # the four candidates, all but the prompt's last token
    calls.clear()
    monkeypatch.setattr(botkit.engine, "MIN_SHARED_COLUMNS", 10**9)  # never grouped: one call per row
    assert shared == draws() and not calls
