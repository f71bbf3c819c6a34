"""botkit.generate: gpt-2-simple's semantics on the continuous-batching engine."""

import subprocess
import sys

import pytest
import torch
from transformers import GPT2Config

import botkit
from botkit.cli import main
from botkit.engine.engine import Engine
from botkit.errors import GenerationError, InputError
from botkit.model.loading import load_model
from botkit.params import SamplingParams

PROMPTS = ["Hello world", "The quick brown fox jumps over the lazy", "A", "In the beginning God created"]


def hf_greedy(lm, prompt, n):
    ids = lm.tokenizer(prompt, return_tensors="pt").input_ids
    out = lm.model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=n,
        min_new_tokens=n,
        pad_token_id=lm.eos_token_id,
    )
    return out[0, ids.shape[1] :].tolist()


def test_greedy_matches_transformers_token_for_token_in_a_mixed_batch(tiny_lm):
    engine = Engine(tiny_lm, max_batch_size=3)  # 4 prompts, 3 slots: one joins mid-flight
    seqs = [
        engine.add(tiny_lm.tokenizer(p).input_ids, SamplingParams(max_new_tokens=24, temperature=0)) for p in PROMPTS
    ]
    while engine.has_work:
        engine.step()
    for prompt, seq in zip(PROMPTS, seqs, strict=True):
        assert seq.generated == hf_greedy(tiny_lm, prompt, 24)


def test_each_sample_stops_at_its_own_truncate_and_frees_its_slot(tiny_lm):
    tok = tiny_lm.tokenizer
    reference = hf_greedy(tiny_lm, PROMPTS[0], 30)
    stop = tok.decode(reference[4:5])  # the text of the 5th generated token

    engine = Engine(tiny_lm, 2)
    short = engine.add(tok(PROMPTS[0]).input_ids, SamplingParams(max_new_tokens=30, temperature=0, stop=(stop,)))
    long = engine.add(tok(PROMPTS[1]).input_ids, SamplingParams(max_new_tokens=30, temperature=0))
    while engine.has_work:
        engine.step()
    assert short.finish_reason == "stop" and len(short.generated) <= 5
    assert stop not in short.text and tok.decode(reference).startswith(short.text)
    assert long.finish_reason == "length" and len(long.generated) == 30
    assert engine.num_forward_passes == 30  # one pass per token of the long one: both prompts joined in the first

    engine = Engine(tiny_lm, 1)
    alone = engine.add(tok(PROMPTS[0]).input_ids, SamplingParams(max_new_tokens=30, temperature=0, stop=(stop,)))
    while engine.has_work:
        engine.step()
    assert engine.num_forward_passes == len(alone.generated) <= 5  # it really stopped early


def test_cancelling_a_running_row_frees_it_and_the_others_go_on(tiny_lm):
    engine = Engine(tiny_lm, 3)
    seqs = [
        engine.add(tiny_lm.tokenizer(p).input_ids, SamplingParams(max_new_tokens=8, temperature=0)) for p in PROMPTS[:3]
    ]
    engine.step()
    # the last row moves into its slot
    assert engine.cancel(seqs[0].id) is seqs[0] and seqs[0].finish_reason == "cancelled"
    while engine.has_work:
        engine.step()
    for prompt, seq in zip(PROMPTS[1:3], seqs[1:], strict=True):
        assert seq.generated == hf_greedy(tiny_lm, prompt, 8)


@pytest.mark.parametrize(
    ("prefix", "truncate", "include_prefix"),
    [
        ("Hello", None, True),
        ("Hello", None, False),
        ("Hello", "e", True),
        ("Hello", "e", False),
        (None, None, True),
        (None, " ", False),
    ],
)
def test_truncate_and_include_prefix(tiny_lm, prefix, truncate, include_prefix):
    kw = dict(prefix=prefix, length=20, temperature=0, return_as_list=True)
    full = botkit.generate(tiny_lm, **kw, include_prefix=False)[0]
    (text,) = botkit.generate(tiny_lm, **kw, truncate=truncate, include_prefix=include_prefix)
    body = full.split(truncate)[0] if truncate else full
    assert text == ((prefix or "") + body if include_prefix else body).lstrip("\n")
    if truncate:
        assert truncate not in text[len(prefix or "") if include_prefix else 0 :]


def test_length_beyond_the_window_slides():
    lm = load_model(GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=32), device="cpu")
    (text,) = botkit.generate(
        lm, prefix="Hi", length=100, temperature=1.0, seed=0, return_as_list=True, include_prefix=False
    )
    assert len(lm.tokenizer(text).input_ids) >= 90  # re-tokenising may merge a few


def test_same_seed_same_text_and_batches_do_not_change_it(tiny_lm):
    kw = dict(
        prefix=["Hello", "Goodbye"],
        length=15,
        temperature=1.0,
        top_k=40,
        top_p=0.9,
        nsamples=2,
        seed=7,
        return_as_list=True,
    )
    a = botkit.generate(tiny_lm, batch_size=1, **kw)
    assert a == botkit.generate(tiny_lm, batch_size=1, **kw)
    assert a == botkit.generate(tiny_lm, batch_size=2, **kw)
    assert len(set(a)) == 4
    one_each = {**kw, "nsamples": 1}
    # two prompts, one batch
    assert botkit.generate(tiny_lm, **one_each, batch_size=2) == botkit.generate(tiny_lm, **one_each, batch_size=1)
    assert botkit.generate(tiny_lm, batch_size=1, **{**kw, "seed": 8}) != a


def test_no_broken_characters_at_a_cut(tiny_lm):
    texts = botkit.generate(
        tiny_lm, prefix="你好", length=3, temperature=1.0, nsamples=16, batch_size=8, seed=0, return_as_list=True
    )
    tok = tiny_lm.tokenizer
    ids = [i for i in range(tok.vocab_size) if "\ufffd" in tok.decode([i])][:50]  # tokens holding half a character
    engine = Engine(tiny_lm, 1)
    seq = engine.add(tok("x").input_ids, SamplingParams(max_new_tokens=1, temperature=0))
    seq.generated = ids[:1]
    engine.post.add_text(seq, ids[0])
    seq.finish_reason = "length"
    assert "\ufffd" not in engine.post.take_delta(seq) and "\ufffd" not in seq.text
    assert all(t.startswith("你好") for t in texts)


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        (dict(top_k=-1), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(nsamples=3, batch_size=2), "multiple of batch_size"),
        (dict(length=0), "length"),
    ],
)
def test_bad_parameters_get_one_sentence(tiny_lm, kwargs, says):
    with pytest.raises(InputError, match=says) as info:
        botkit.generate(tiny_lm, return_as_list=True, **kwargs)
    assert str(info.value).endswith(".")


def test_long_prefix_is_left_trimmed_with_a_warning(tiny_lm, caplog):
    lm = load_model(GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=32), device="cpu")
    (text,) = botkit.generate(lm, prefix="word " * 100, length=5, temperature=0, return_as_list=True)
    assert text.startswith("word ") and "keeping its last" in caplog.text


def test_writes_samples_to_a_file(tiny_lm, tmp_path):
    path = tmp_path / "out.txt"
    botkit.generate_to_file(
        tiny_lm, destination_path=str(path), prefix="Hi", length=5, nsamples=2, batch_size=2, seed=1
    )
    assert path.read_text().count("=" * 20 + "\n") == 2


def test_cli_generate_runs_offline(tmp_path):
    lm = load_model(GPT2Config(n_layer=1, n_head=2, n_embd=16), device="cpu")
    lm.model.save_pretrained(tmp_path / "m")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "botkit",
            "generate",
            "--model",
            str(tmp_path / "m"),
            "--prefix",
            "Hello",
            "--truncate",
            "\\n",
            "--nsamples",
            "4",
            "--batch-size",
            "2",
            "--length",
            "8",
            "--seed",
            "1",
            "--min-p",
            "0.05",
            "--dry-multiplier",
            "0.8",
            "--dry-sequence-breaker",
            "\\n",
            "--min-tokens",
            "8",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("=" * 20) == 4 and out.stdout.startswith("Hello")
    samples = [s.rstrip("\n") for s in out.stdout.split("=" * 20 + "\n") if s]
    # --min-tokens 8 of --length 8: never cut by --truncate
    assert len(samples) == 4 and not any("\n" in s for s in samples)
    bad = subprocess.run(
        [sys.executable, "-m", "botkit", "generate", "--model", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr
    wrong = subprocess.run(
        [sys.executable, "-m", "botkit", "generate", "--model", str(tmp_path / "m"), "--min-p", "7"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        wrong.returncode == 2
        and "min_p must be between 0 (off) and 1" in wrong.stderr
        and "Traceback" not in wrong.stderr
    )


def test_a_sample_that_fails_is_an_error_not_a_finished_text(tmp_path, capsys):
    lm = load_model(GPT2Config(n_layer=1, n_head=2, n_embd=8, n_positions=1), device="cpu", seed=0)  # a 1-token window
    with pytest.raises(GenerationError, match="could not be generated") as info:
        botkit.generate(lm, prefix="Hello world", length=4, return_as_list=True, seed=1)
    assert str(info.value).count(". ") == 0
    lm.model.save_pretrained(tmp_path / "model")
    lm.tokenizer.save_pretrained(tmp_path / "model")
    capsys.readouterr()
    assert (
        main(
            ["generate", "--model", str(tmp_path / "model"), "--prefix", "Hello world", "--length", "4", "--seed", "1"]
        )
        == 2
    )
    out = capsys.readouterr()
    assert out.out == "" and "could not be generated" in out.err
