"""One KV pool for running rows and cached conversations (kvcache.py, runner.py, prefix_cache.py):
a chat's next turn takes its conversation's slot over with no copy, eviction frees slots, the pool
never grows past what was planned, and a failed step leaves the cache as it was."""

import torch
from scripted import hf_greedy
from transformers import GPT2Config

from botkit.engine.engine import Engine
from botkit.model.loading import load_model
from botkit.params import SamplingParams

GREEDY = SamplingParams(max_new_tokens=12, temperature=0)
SLOT_MB = 2 * 2 * 32 * 4 * 1024 / 2**20  # tiny_lm: layers x (k, v) x width x fp32 bytes x window = 0.5 MB


def random_ids(n, seed):
    return torch.randint(0, 50000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run(engine, prompt_ids, params=GREEDY, after_step=lambda: None):
    seq = engine.add(prompt_ids, params)
    while engine.has_work:
        engine.step()
        after_step()
    return seq


def assert_pool_consistent(engine):
    """Every slot is exactly one of: free, a running row's, a cached conversation's; each holds its tokens."""
    runner, cache = engine.runner, engine.runner.cache
    cached = list(engine.prefix_cache.entries.values())
    assert cache.num_slots == runner.num_slots
    assert sorted(runner.slots + [e.slot for e in cached] + cache.free) == list(range(runner.num_slots))
    assert len(cached) <= engine.prefix_cache.max_entries
    assert [cache.lengths[s] for s in runner.slots] == [len(seq.context) - 1 for seq in engine.rows]
    assert [cache.lengths[e.slot] for e in cached] == [len(e.tokens) for e in cached]


def test_a_chats_next_turn_takes_its_conversations_slot_over_with_no_copy(tiny_lm):
    engine = Engine(tiny_lm, 2, cache_mb=4)
    prompt, slots = random_ids(40, 0), []
    for turn in range(5):
        seq = run(engine, prompt)
        assert seq.num_reused == (0 if turn == 0 else len(prompt) - 10)  # all but this turn's 9 new tokens and the
        # last token of the reply (a row holds its context but the token it drew last)
        (entry,) = engine.prefix_cache.entries.values()
        assert entry.tokens == seq.context[:-1]
        slots.append(entry.slot)
        prompt = seq.context + random_ids(9, turn + 1)
    assert slots == [slots[0]] * 5  # the same slot all along
    assert engine.runner.cache.num_copied_tokens == 0
    assert seq.generated == hf_greedy(tiny_lm, seq.prompt_ids, 12)


def test_a_turn_that_retokenised_the_end_of_the_reply_still_takes_the_slot_over(tiny_lm):
    """The core sends the reply's text back, and its last tokens may come back as other tokens: the
    turn matches all of the conversation but its end, and writes over those columns."""
    engine = Engine(tiny_lm, 2, cache_mb=4)
    first = run(engine, random_ids(40, 0))
    prompt = first.context[:-4] + random_ids(9, 1)
    second = run(engine, prompt)
    assert second.num_reused == len(first.context) - 4
    assert engine.runner.cache.num_copied_tokens == 0 and len(engine.prefix_cache.entries) == 1
    assert second.generated == hf_greedy(tiny_lm, prompt, 12)


def test_a_turn_that_cut_the_reply_and_retokenised_the_prompts_end_still_takes_the_slot_over(tiny_lm):
    """A chat may cut the reply (a stop string, a speaker line), and the prompt's last token (a trailing
    space) may merge with the reply's first characters: the turn still continues that conversation."""
    engine = Engine(tiny_lm, 2, cache_mb=4)
    first = run(engine, random_ids(40, 0), SamplingParams(max_new_tokens=30, temperature=0))
    prompt = first.prompt_ids[:-1] + random_ids(12, 1)
    second = run(engine, prompt)
    assert second.num_reused == 39 and engine.runner.cache.num_copied_tokens == 0
    assert len(engine.prefix_cache.entries) == 1
    assert second.generated == hf_greedy(tiny_lm, prompt, 12)


def test_a_template_two_chats_share_is_copied_and_both_conversations_stay(tiny_lm):
    engine = Engine(tiny_lm, 2, cache_mb=4)
    template = random_ids(48, 0)
    alice = run(engine, template + random_ids(20, 1))
    bob = run(engine, template + random_ids(20, 2))
    assert bob.num_reused == 48 and engine.runner.cache.num_copied_tokens == 48
    assert sorted(len(e.tokens) for e in engine.prefix_cache.entries.values()) == [79, 79]
    assert bob.generated == hf_greedy(tiny_lm, bob.prompt_ids, 12)
    again = run(engine, alice.context + random_ids(5, 3))  # alice's conversation was not taken by bob's turn
    assert again.num_reused == len(alice.context) - 1


def test_an_evicted_conversation_frees_its_slot_and_the_pool_keeps_its_size(tiny_lm):
    engine = Engine(tiny_lm, 1, cache_mb=round(2 * SLOT_MB))  # one row and two cached conversations
    assert engine.runner.num_slots == 3
    chats = [run(engine, random_ids(30, c)) for c in range(3)]
    kept = {e.slot for e in engine.prefix_cache.entries.values()}
    assert len(kept) == 2 and engine.runner.cache.free == list({0, 1, 2} - kept)  # the first chat's slot
    assert run(engine, chats[0].context + [5]).num_reused == 0  # evicted
    assert run(engine, chats[2].context + [5]).num_reused == len(chats[2].context) - 1
    assert engine.runner.cache.layers[0].k.shape[0] == 3
    assert_pool_consistent(engine)


def test_the_pool_never_holds_more_slots_than_planned(tiny_lm):
    """Chats, candidates, a redraw, a cancellation and slid rows, with more conversations than the cache holds."""
    lm = load_model(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=128), device="cpu", seed=0)
    engine = Engine(lm, 3, cache_mb=1)  # 1 MB: 16 conversations of a 128-token window
    assert engine.runner.num_slots == 3 + 16
    engine.runner.prefix_cache.max_entries = 4  # fewer, so that they are evicted in this short test
    contexts = [random_ids(20, c) for c in range(6)]
    for turn in range(4):
        seqs = [engine.add(ctx + random_ids(5, 10 * turn + c), GREEDY) for c, ctx in enumerate(contexts)]
        seqs.append(engine.add(random_ids(20, turn), SamplingParams(max_new_tokens=6, temperature=1.0, candidates=3)))
        seqs.append(engine.add(random_ids(30, 99), SamplingParams(max_new_tokens=100, temperature=0)))  # slides
        for step in range(200):
            if not engine.has_work:
                break
            engine.step()
            assert_pool_consistent(engine)
            if step == 3:
                engine.cancel(seqs[0].id)
        contexts = [s.context for s in seqs[:6]]
    assert engine.runner.cache.num_taken_slots <= 3 + 4  # rows + cached conversations: nothing more was touched
    assert engine.prefix_cache.stats()["hits"] > 10


def test_a_failed_step_gives_back_the_conversation_it_took_over(tiny_lm):
    plain = run(Engine(tiny_lm, 2, cache_mb=0), random_ids(40, 0))
    prompt = plain.context + random_ids(9, 1)
    expected = run(Engine(tiny_lm, 2, cache_mb=0), prompt).generated

    engine = Engine(tiny_lm, 2, cache_mb=4)
    run(engine, random_ids(40, 0))
    (entry,) = engine.prefix_cache.entries.values()
    raised = []

    def fail_once(module, args, kwargs):
        if not raised:
            raised.append(True)
            raise RuntimeError("fault inside the forward pass")

    hook = tiny_lm.model.register_forward_pre_hook(fail_once, with_kwargs=True)
    try:
        seq = engine.add(prompt, GREEDY)
        engine.step()
        assert raised and list(engine.prefix_cache.entries.values()) == [entry]  # back, in its slot
        assert_pool_consistent(engine)
        while engine.has_work:
            engine.step()
    finally:
        hook.remove()
    assert seq.generated == expected and seq.num_reused == len(prompt) - 10


def test_memory_per_cached_token_is_one_tokens_keys_and_values(tiny_lm):
    engine = Engine(tiny_lm, 2, cache_mb=4)
    seq = run(engine, random_ids(100, 0))
    cache = engine.runner.cache
    column_bytes = sum(t[0, :, 0].nbytes for layer in cache.layers for t in (layer.k, layer.v))
    assert engine.runner.bytes_per_token == column_bytes == 2 * 2 * 32 * 4
    assert engine.prefix_cache.nbytes == (len(seq.context) - 1) * column_bytes
    assert cache.num_copied_tokens == 0  # kept where it was written


def test_the_gpu_paths_padded_decode_reads_rows_from_any_slots(tiny_lm):
    """Rows leave and join in other slots than 0..B-1: the padded call gathers them, and its greedy
    tokens equal the per-row path's."""

    def greedy(padded):
        engine, orders = Engine(tiny_lm, 3, cache_mb=4, padded_decode=padded), []
        seqs = [
            engine.add(random_ids(8 + 7 * i, i), SamplingParams(max_new_tokens=6 + 5 * i, temperature=0))
            for i in range(5)
        ]
        while engine.has_work:
            engine.step()
            orders.append(list(engine.runner.slots))
        return [s.generated for s in seqs], orders

    padded, orders = greedy(True)
    assert any(o != list(range(len(o))) for o in orders), orders  # the gather was exercised
    assert padded == greedy(False)[0]
