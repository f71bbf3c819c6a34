"""The per-token rules (botkit/engine/rules.py), each against a reference: transformers' warpers,
OpenAI's penalty formula, a hand-computed DRY case; min_tokens in the engine; the vllm_xargs round trip."""

import dataclasses

import pytest
import torch
from transformers import MinPLogitsWarper, TypicalLogitsWarper

import botkit
from botkit.engine.engine import Engine
from botkit.engine.rule_args import from_xargs, to_xargs
from botkit.engine.rules import RowRules, RuleContext, apply_rules, dry_match_lengths
from botkit.engine.token_bytes import TokenBytes
from botkit.errors import InputError
from botkit.params import ChatSettings, SamplingParams


def _ctx(lm=None):
    if lm is None:
        return RuleContext(None, 50256)
    return RuleContext(TokenBytes.of(lm.tokenizer), lm.eos_token_id)


def _logits(rows=3, vocab=200, seed=0):
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def _applied(params, logits, prompt=(1, 2), reply=(), ctx=None):
    ctx = ctx or _ctx()
    rows = []
    for _ in range(logits.shape[0]):
        row = RowRules(ctx, params, list(prompt))
        for t in reply:
            row.append(t)
        rows.append(row)
    out = logits.clone()
    apply_rules(ctx, rows, out)
    return out


@pytest.mark.parametrize("min_p", [0.05, 0.3])
@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_min_p_keeps_what_transformers_min_p_warper_keeps(min_p, temperature):
    logits = _logits()
    ours = _applied(SamplingParams(temperature=temperature, min_p=min_p), logits)
    reference = MinPLogitsWarper(min_p)(None, logits / temperature)
    assert torch.equal(torch.isinf(ours), torch.isinf(reference))
    assert 0 < int(torch.isinf(ours).sum()) < ours.numel()  # it removed some, not all
    kept = ~torch.isinf(ours)
    assert torch.equal(ours[kept], logits[kept])  # the survivors are untouched (temperature is the sampler's)


@pytest.mark.parametrize("mass", [0.2, 0.9])
def test_typical_p_keeps_what_transformers_typical_warper_keeps(mass):
    logits = _logits(seed=1)
    ours = _applied(SamplingParams(temperature=0.9, typical_p=mass), logits)
    reference = TypicalLogitsWarper(mass)(None, logits / 0.9)
    assert torch.equal(torch.isinf(ours), torch.isinf(reference))
    assert 0 < int(torch.isinf(ours).sum()) < ours.numel()


def test_greedy_rows_skip_min_p_and_typical_p():
    logits = _logits()
    assert torch.equal(_applied(SamplingParams(temperature=0, min_p=0.5, typical_p=0.2), logits), logits)


def test_presence_and_frequency_penalties_follow_openais_formula():
    """OpenAI: mu[j] -> mu[j] - c[j] * alpha_frequency - float(c[j] > 0) * alpha_presence, c over the reply only."""
    logits = _logits(rows=1)
    ours = _applied(
        SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), logits, prompt=(9, 9, 9), reply=(5, 5, 7)
    )
    expected = logits.clone()
    expected[0, 5] -= 2 * 0.25 + 0.5
    expected[0, 7] -= 1 * 0.25 + 0.5
    assert torch.allclose(ours, expected)
    assert ours[0, 9] == logits[0, 9]  # prompt tokens are not counted


def test_dry_penalises_the_token_that_would_extend_a_repeat_by_hand():
    # ... 1 2 3 4 9 1 2 3: "1 2 3" was followed by 4, so 4 would extend a 3-token repeat
    tokens = [1, 2, 3, 4, 9, 1, 2, 3]
    assert dry_match_lengths(tokens, frozenset()) == {4: 3}
    assert dry_match_lengths(tokens, frozenset({2})) == {4: 1}  # the repeat cannot run across the breaker 2
    assert dry_match_lengths(tokens, frozenset({4})) == {}  # nor be extended by one
    logits = _logits(rows=1, vocab=20)
    params = SamplingParams(dry_multiplier=0.8, dry_base=2.0, dry_allowed_length=2)
    ours = _applied(params, logits, prompt=tokens[:5], reply=tokens[5:])
    expected = logits.clone()
    expected[0, 4] -= 0.8 * 2.0 ** (3 - 2)
    assert torch.allclose(ours, expected)
    assert torch.equal(
        _applied(dataclasses.replace(params, dry_allowed_length=4), logits, tokens[:5], tokens[5:]), logits
    )


def test_dry_breakers_are_the_tokens_holding_a_breaker_string(tiny_lm):
    ctx = _ctx(tiny_lm)
    ids = tiny_lm.tokenizer("a b c:\nd a b c:\nd a b", verbose=False).input_ids
    newline = tiny_lm.tokenizer("\n").input_ids[0]
    assert newline in ctx.breakers(("\n",))
    # "\nd a b" was followed by " c": " c" would extend a 3-token repeat ("d a b"; the newline breaks it)
    assert dry_match_lengths(ids, ctx.breakers(("\n",))) == {ids[2]: 3}
    assert dry_match_lengths(ids, ctx.breakers((" a",))) == {ids[2]: 1}  # " a" breaks: only " b" counts


def test_min_tokens_bans_end_of_text_and_stop_strings_until_reached(tiny_lm):
    ctx, tok = _ctx(tiny_lm), tiny_lm.tokenizer
    vocab = len(tok)
    params = SamplingParams(min_tokens=2, stop=("\n", "ab!"), max_new_tokens=10)
    row = RowRules(ctx, params, [464])
    row.append(tok("ab", verbose=False).input_ids[0])  # the reply so far ends with "ab"
    logits = torch.zeros(1, vocab)
    apply_rules(ctx, [row], logits)
    banned = set(torch.isinf(logits[0]).nonzero().flatten().tolist())
    assert tiny_lm.eos_token_id in banned
    assert tok("\n").input_ids[0] in banned and tok(".\n\n").input_ids[-1] in banned
    assert tok("!").input_ids[0] in banned  # "ab" + "!" would complete "ab!"
    assert tok(" hello").input_ids[0] not in banned
    row.append(tok(" hello").input_ids[0])  # 2 tokens: the ending is free again
    logits = torch.zeros(1, vocab)
    apply_rules(ctx, [row], logits)
    assert torch.isfinite(logits[0, [tiny_lm.eos_token_id, tok("\n").input_ids[0], tok("!").input_ids[0]]]).all()


def test_min_tokens_in_the_engine_means_never_an_empty_reply(tiny_lm):
    """A greedy reply whose first token is its stop string is empty; with min_tokens it is not."""
    tok, prompt = tiny_lm.tokenizer, tiny_lm.tokenizer("The meaning of life is").input_ids
    first = Engine(tiny_lm, 1)
    seq = first.add(prompt, SamplingParams(max_new_tokens=6, temperature=0))
    while first.has_work:
        first.step()
    stop = tok.decode(seq.generated[:1])
    assert stop.strip()  # a visible first token, so it can be a stop string
    engine = Engine(tiny_lm, 2)
    empty = engine.add(prompt, SamplingParams(max_new_tokens=6, temperature=0, stop=(stop,)))
    held = engine.add(prompt, SamplingParams(max_new_tokens=6, temperature=0, stop=(stop,), min_tokens=3))
    while engine.has_work:
        engine.step()
    assert empty.text == "" and empty.finish_reason == "stop"
    assert len(held.generated) >= 3 and stop not in tok.decode(held.generated[:3])


def test_the_utf8_mask_follows_each_rows_bytes(tiny_lm):
    ctx, tok = _ctx(tiny_lm), tiny_lm.tokenizer
    lead = tok("你").input_ids[0]  # a token holding a character's first bytes only
    row = RowRules(ctx, SamplingParams(), [464])
    row.append(lead)
    logits = torch.zeros(1, len(tok))
    apply_rules(ctx, [row], logits)
    assert torch.isinf(logits[0, tok(" hello").input_ids[0]])  # ASCII cannot follow a lead byte
    assert torch.isfinite(logits[0, tok("你").input_ids[1]])


def test_xargs_round_trip_and_hostile_input():
    params = SamplingParams(
        max_new_tokens=30,
        temperature=0.7,
        top_k=0,
        min_p=0.05,
        typical_p=0.9,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        repetition_penalty=1.2,
        no_repeat_ngram_size=3,
        dry_multiplier=0.8,
        dry_sequence_breakers=("\n", "@"),
        min_tokens=4,
        unique=True,
        stop=("\n",),
    )
    xargs = to_xargs(params)
    assert all(isinstance(v, str | int | float | list) and not isinstance(v, bool) for v in xargs.values())
    back = from_xargs(xargs, temperature=0.7, top_k=0, max_new_tokens=30, stop=("\n",))
    assert back == params
    assert to_xargs(SamplingParams()) == {"botkit_rules": 1}
    for bad, says in [
        ({"botkit_min_p": 7}, "min_p"),
        ({"botkit_unique": "yes"}, "0 or 1"),
        ({"botkit_min_p": "0.1"}, "number"),
        ({"botkit_dry_sequence_breakers": "\n"}, "list of strings"),
        ({"botkit_rules": 2}, "version"),
        ({"botkit_typical_p": float("nan")}, "number"),
        ({"botkit_evil": 1}, "Unknown"),
        ({"botkit_min_tokens": 99}, "min_tokens"),
    ]:
        with pytest.raises(InputError, match=says):
            from_xargs(bad)
    assert from_xargs({"other_processor": {"x": 1}}) == SamplingParams()  # another processor's arguments are not ours


def test_samplers_in_generate_and_as_chat_settings(tiny_lm):
    texts = botkit.generate(
        tiny_lm,
        prefix="Hi",
        length=6,
        nsamples=2,
        batch_size=2,
        seed=1,
        return_as_list=True,
        temperature=1.0,
        min_p=0.05,
        typical_p=0.95,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        dry_multiplier=0.8,
        min_tokens=6,
        truncate=" the",
    )
    assert len(texts) == 2 and all(len(tiny_lm.tokenizer(t[2:]).input_ids) >= 5 for t in texts)
    with pytest.raises(InputError, match="typical_p"):
        botkit.generate(tiny_lm, prefix="Hi", length=6, typical_p=0, return_as_list=True)
    settings = ChatSettings().replace(min_p="0.05", dry_multiplier="0.8", min_tokens="3", presence_penalty="-1")
    params = settings.sampling()
    assert (params.min_p, params.dry_multiplier, params.min_tokens, params.presence_penalty) == (0.05, 0.8, 3, -1.0)
    with pytest.raises(InputError, match="min_tokens"):
        ChatSettings(length=5).replace(min_tokens="9")
    with pytest.raises(InputError, match="frequency_penalty"):
        ChatSettings().replace(frequency_penalty="nan")
