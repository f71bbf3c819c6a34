"""The training-text index for "no parroting": hashing, spans, shares, bounded building, context."""

import json

import numpy as np
import pytest

from botkit.engine.copy_index import INDEX_FILE, INDEX_JSON, CopyIndex, check_copying, ngram_hashes, write_index
from botkit.model.loading import gpt2_tokenizer

GPT2 = gpt2_tokenizer()
EOS = GPT2.eos_token_id
LINES = [
    "the quick brown fox jumps over the lazy dog near the river bank today",
    "we should order pizza for the whole server on friday night after the game",
    "my cat refuses to sleep anywhere except on the keyboard while I work",
]
TOKENS = np.array([t for line in LINES for t in GPT2.encode(line) + [EOS]], dtype=np.int32)


def test_hashes_are_per_window_and_skip_document_ends():
    ids = np.arange(20)
    h = ngram_hashes(ids, 8)
    assert len(h) == 13 and len(set(h.tolist())) == 13 and h.dtype == np.uint64
    assert ngram_hashes(ids[3:11], 8)[0] == h[3]  # a window's hash depends on its tokens only
    assert len(ngram_hashes(ids, 8, eos_id=10)) == 13 - 8  # windows 3..10 hold token 10
    assert len(ngram_hashes(ids[:5], 8)) == 0
    assert ngram_hashes([1, 2], 2)[0] != ngram_hashes([2, 1], 2)[0]


def test_a_reply_that_copies_a_training_line_is_a_copy():
    index = CopyIndex.build(TOKENS, EOS)
    copied = GPT2.encode("lol we should order pizza for the whole server on friday, right?")
    report = check_copying(copied, index)
    # "we" starts the line: another token than " we"
    assert report.is_copy and report.training_span == len(
        GPT2.encode(" should order pizza for the whole server on friday")
    )
    assert "training text" in report.reason and 0.5 < report.training_share < 1
    fresh = check_copying(GPT2.encode("nobody here has ever seen a purple elephant dancing in the rain"), index)
    assert not fresh.is_copy and fresh.training_span == 0 and fresh.share == 0 and fresh.reason == ""
    across = GPT2.encode("lazy dog near the river bank today we should order pizza")  # spans two documents
    assert check_copying(across, index).training_span < len(across)
    assert check_copying(GPT2.encode("the lazy dog"), index).training_span == 0  # under 8 tokens: never a training hit


def test_context_copying_is_exact_and_short_replies_need_a_real_share():
    context = GPT2.encode("alice: I think the new map is way too dark\nbob: agreed, I can not see anything\n")
    echo = GPT2.encode(" I think the new map is way too dark")
    assert check_copying(echo, None, context).context_span == len(echo) and check_copying(echo, None, context).is_copy
    short = GPT2.encode(" agreed, I can not")  # 5 tokens, all in the context: over half, and at least 4
    assert check_copying(short, None, context).is_copy
    tiny = GPT2.encode(" agreed!")  # 1 token shared of 2: below min_share_tokens
    assert not check_copying(tiny, None, context).is_copy
    own = GPT2.encode(" honestly the lighting on that map could use some work")
    report = check_copying(own, None, context)
    assert not report.is_copy and report.context_span < 4
    assert check_copying(own, None, context, span_tokens=1).is_copy  # thresholds are the caller's (" the" is shared)


def test_bucketed_build_on_disk_equals_the_in_memory_index(tmp_path):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50_000, 30_000).astype(np.int32)
    tokens[rng.integers(0, 30_000, 300)] = EOS
    tokens[5000:5100] = tokens[100:200]  # a repeat: its windows are stored once
    path = write_index(tmp_path, tokens, EOS, max_bytes=100_000)  # 30,000 windows x 24 bytes: 8 buckets
    loaded = CopyIndex.load(tmp_path)
    built = CopyIndex.build(tokens, EOS)
    assert path == tmp_path / INDEX_FILE and isinstance(loaded.hashes, np.memmap)
    assert np.array_equal(np.asarray(loaded.hashes), built.hashes) and np.all(
        np.diff(built.hashes.astype(np.float64)) >= 0
    )
    meta = json.loads((tmp_path / INDEX_JSON).read_text())
    assert meta["num_ngrams"] == len(built) < 30_000 - 7 and meta["n"] == 8 and meta["num_tokens"] == 30_000
    start = next(s for s in range(20_000, 29_000) if EOS not in tokens[s : s + 30].tolist())
    assert check_copying(tokens[start : start + 30], loaded).training_span == 30


@pytest.mark.parametrize("damage", ["missing", "truncated", "other hash", "not json"])
def test_a_missing_or_foreign_index_loads_as_none(tmp_path, damage):
    write_index(tmp_path, TOKENS, EOS)
    if damage == "missing":
        (tmp_path / INDEX_FILE).unlink()
    elif damage == "truncated":
        (tmp_path / INDEX_FILE).write_bytes((tmp_path / INDEX_FILE).read_bytes()[:-3])
    elif damage == "other hash":
        meta = json.loads((tmp_path / INDEX_JSON).read_text())
        (tmp_path / INDEX_JSON).write_text(json.dumps({**meta, "hash": "md5"}))
    else:
        (tmp_path / INDEX_JSON).write_text("{")
    assert CopyIndex.load(tmp_path) is None


def test_an_empty_index_finds_nothing(tmp_path):
    write_index(tmp_path, np.array([1, 2, 3], dtype=np.int32), EOS)
    index = CopyIndex.load(tmp_path)
    assert len(index) == 0 and not check_copying(list(range(20)), index).is_copy
