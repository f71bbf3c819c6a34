"""Does a reply parrot its training texts or the chat it answers?

At fine-tune time the run folder gets an index of the training text's token n-grams (`copy_index.u64`
and `copy_index.json`): the sorted, distinct 64-bit hashes of every NGRAM-token window that does
not cross a document end. A reply is checked by hashing its own windows and looking them up with
`np.searchsorted`; runs of consecutive hits are the spans it shares with the training text. The
chat's recent context is small, so it is compared exactly (difflib's longest common block).

Why not a library: a suffix array (pydivsufsort) answers "longest shared span" exactly but needs the
whole text and 4-8 bytes per token in memory, and Bloom filters (rbloom) cannot hold 8 bytes a
window at an error rate a per-window check tolerates. A sorted array of hashes is 8 bytes per
distinct window, exact up to 64-bit collisions (~N / 2^64 per lookup), built in bounded memory
(bucket passes of MAX_BUILD_BYTES), and memory-mapped when served, so the index of a big dataset
costs page cache, not process memory. Lookups take microseconds: the engine asks once per sampled
token of a `unique` row (`contains`: would this token complete a training n-gram?) and once per
finished reply (`check_copying`).

    index = CopyIndex.load(run_dir)                     # None for a run without one
    report = check_copying(reply_ids, index, context_ids)
    if report.is_copy: ...                              # resample; report.share scores candidates

Token ids must be the tokenizer's own encoding of the text (`tokenizer.encode(reply_text)`): a
sampled sequence can spell the same text with other tokens.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from botkit.engine.training_texts import TrainingTexts

INDEX_FILE = "copy_index.u64"  # little-endian uint64 hashes, sorted, distinct
INDEX_JSON = "copy_index.json"
HASH_NAME = "poly64-splitmix-v1"  # changes if the hash does, so an old index is never misread
NGRAM = 8  # tokens per window: a reply never shares an 8-token span with the training text
MAX_BUILD_BYTES = 256 * 1024 * 1024  # building holds about this much at a time, whatever the dataset's size
CHUNK_WINDOWS = 1 << 18  # windows hashed per step: 2 MB of hashes, ~10 MB with their temporaries
MAX_SHARE = 0.5  # a reply sharing a run of more than half its tokens copies ...
MIN_SHARE_TOKENS = 4  # ... if that run is at least this long ("yes I agree" may repeat "I agree")

_P = np.uint64(0x9E3779B97F4A7C15)  # odd multiplier of the polynomial hash (2^64 / golden ratio)


def ngram_hashes(ids: np.ndarray | Sequence[int], n: int = NGRAM, eos_id: int | None = None) -> np.ndarray:
    """(len(ids) - n + 1,) uint64: a hash of each n-token window; windows holding `eos_id` are left out.
    Polynomial over the ids (wrapping uint64), then splitmix64's finaliser so the top bits are uniform."""
    ids = np.asarray(ids, dtype=np.int64)
    num = len(ids) - n + 1
    if num <= 0:
        return np.zeros(0, dtype=np.uint64)
    values = ids.astype(np.uint64) + np.uint64(1)
    h = np.zeros(num, dtype=np.uint64)
    for j in range(n):
        h *= _P
        h += values[j : j + num]
    h ^= h >> np.uint64(30)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(27)
    h *= np.uint64(0x94D049BB133111EB)
    h ^= h >> np.uint64(31)
    if eos_id is not None:
        ends = np.concatenate(([0], np.cumsum(ids == eos_id)))  # ends[k]: end tokens before position k
        h = h[ends[n : n + num] == ends[:num]]
    return h


def write_index(
    run_dir: str | os.PathLike, tokens: np.ndarray, eos_id: int | None, n: int = NGRAM, max_bytes: int = MAX_BUILD_BYTES
) -> Path:
    """Index the n-grams of `tokens` (a run's whole token stream) into `run_dir`. Windows are hashed
    in chunks and split by their hash's top bits into as many buckets as keep one bucket's hashes
    (held about three times while sorted) within `max_bytes`; buckets are written in order, so the
    file is sorted without ever holding it whole."""
    run_dir = Path(run_dir)
    num_windows = max(0, len(tokens) - n + 1)
    bits = 0
    while num_windows * 8 * 3 > max_bytes << bits:
        bits += 1
    path, tmp = run_dir / INDEX_FILE, run_dir / (INDEX_FILE + ".tmp")
    count = 0
    with tmp.open("wb") as out:
        for bucket in range(1 << bits):
            parts = []
            for start in range(0, num_windows, CHUNK_WINDOWS):
                h = ngram_hashes(tokens[start : start + CHUNK_WINDOWS + n - 1], n, eos_id)
                parts.append(h[(h >> np.uint64(64 - bits)) == bucket] if bits else h)  # (≤ CHUNK_WINDOWS,) uint64
            unique = _sorted_unique(np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64))
            del parts
            unique.astype("<u8", copy=False).tofile(out)
            count += len(unique)
    os.replace(tmp, path)
    meta = {"n": n, "hash": HASH_NAME, "num_ngrams": count, "num_tokens": int(len(tokens)), "eos_id": eos_id}
    (run_dir / INDEX_JSON).write_text(json.dumps(meta) + "\n", encoding="utf-8")
    return path


@dataclass(frozen=True)
class CopyReport:
    num_tokens: int  # tokens in the reply
    training_span: int  # longest run of the reply found in the training text (0: none of NGRAM tokens or more)
    training_share: float  # share of the reply's tokens inside such runs
    context_span: int  # longest run of the reply found in the chat's context (exact)
    is_copy: bool
    reason: str  # "" or what crossed the threshold, for logs

    @property
    def share(self) -> float:
        """How much of the reply is copied, 0 to 1 (a penalty for ranking candidates)."""
        return max(self.training_share, self.context_span / self.num_tokens if self.num_tokens else 0.0)


class CopyIndex:
    """A run's training n-grams: `CopyIndex.load(run_dir)`, then `check_copying(ids, index, context)`."""

    def __init__(self, hashes: np.ndarray, n: int = NGRAM, texts: TrainingTexts | None = None):
        self.hashes = hashes  # (num_ngrams,) sorted uint64, often a read-only memory map
        self.n = n
        self.texts = texts  # the whole training texts (training_texts.py), for runs that have them

    def __len__(self) -> int:
        return len(self.hashes)

    @classmethod
    def build(cls, tokens: np.ndarray, eos_id: int | None = None, n: int = NGRAM) -> CopyIndex:
        """An in-memory index (tests, small texts); a run's index is written by `write_index`."""
        return cls(_sorted_unique(ngram_hashes(tokens, n, eos_id)), n)

    @classmethod
    def load(cls, run_dir: str | os.PathLike) -> CopyIndex | None:
        """The index in `run_dir`, memory-mapped; None if the run has none (or one from another botkit)."""
        run_dir = Path(run_dir)
        try:
            meta = json.loads((run_dir / INDEX_JSON).read_text(encoding="utf-8"))
            size = (run_dir / INDEX_FILE).stat().st_size
        except (OSError, ValueError):
            return None
        if (
            not isinstance(meta, dict)
            or meta.get("hash") != HASH_NAME
            or not isinstance(meta.get("n"), int)
            or size != 8 * meta.get("num_ngrams", -1)
        ):
            return None
        hashes = np.memmap(run_dir / INDEX_FILE, dtype="<u8", mode="r") if size else np.zeros(0, dtype=np.uint64)
        return cls(hashes, meta["n"], TrainingTexts.load(run_dir))

    def hits(self, ids: Sequence[int]) -> np.ndarray:
        """(len(ids) - n + 1,) bool: whether each window of `ids` occurs in the training text."""
        return self._found(ngram_hashes(ids, self.n))

    def contains(self, windows: np.ndarray) -> np.ndarray:
        """(R,) bool: whether each row of `windows` ((R, n) token ids) is an n-gram of the training text."""
        windows = np.asarray(windows, dtype=np.int64)
        return self._found(ngram_hashes(windows.reshape(-1), self.n)[:: self.n])  # the windows that start a row

    def _found(self, h: np.ndarray) -> np.ndarray:
        if not len(self.hashes) or not len(h):
            return np.zeros(len(h), dtype=bool)
        pos = np.minimum(np.searchsorted(self.hashes, h), len(self.hashes) - 1)
        return np.asarray(self.hashes[pos]) == h


def check_copying(
    reply_ids: Sequence[int],
    index: CopyIndex | None = None,
    context_ids: Sequence[int] | None = None,
    *,
    span_tokens: int = NGRAM,
    max_share: float = MAX_SHARE,
    min_share_tokens: int = MIN_SHARE_TOKENS,
) -> CopyReport:
    """How much `reply_ids` copies the training text (through `index`) and `context_ids` (the
    chat's recent messages). A copy shares a run of `span_tokens` or more with either, or a run of
    at least `min_share_tokens` that is more than `max_share` of the reply, or has more than
    `max_share` of its tokens inside training runs. The index finds runs of its n tokens or more
    only, so a `span_tokens` below its n applies to the context alone."""
    reply = [int(t) for t in reply_ids]
    training_span, training_share = 0, 0.0
    if index is not None and len(reply) >= index.n:
        hit = index.hits(reply)
        if hit.any():
            training_span = _longest_run(hit) + index.n - 1
            covered = np.convolve(hit.astype(np.int32), np.ones(index.n, dtype=np.int32))[: len(reply)] > 0
            training_share = float(covered.mean())
    context_span = 0
    if context_ids is not None and len(context_ids) and reply:
        context = [int(t) for t in context_ids]
        context_span = (
            difflib.SequenceMatcher(None, reply, context, autojunk=False)
            .find_longest_match(0, len(reply), 0, len(context))
            .size
        )
    reason = ""
    longest = max(training_span, context_span)
    where = "a training text" if training_span >= context_span else "the chat's context"
    if longest >= span_tokens:
        reason = f"shares a {longest}-token run with {where}"
    elif longest >= min_share_tokens and longest > max_share * len(reply):
        reason = f"shares {longest} of its {len(reply)} tokens in one run with {where}"
    elif training_share > max_share:
        reason = f"has {training_share:.0%} of its tokens in runs found in training texts"
    return CopyReport(len(reply), training_span, training_share, context_span, bool(reason), reason)


def _sorted_unique(values: np.ndarray) -> np.ndarray:
    """`np.unique` for a 1-D array it may sort in place: numpy 2.4's np.unique takes 12 s for 4.7M
    uint64 here (a hashing path), sort and compare 0.6 s, without its extra copies."""
    values.sort()
    keep = np.empty(len(values), dtype=bool)
    keep[:1] = True
    np.not_equal(values[1:], values[:-1], out=keep[1:])
    return values[keep]


def _longest_run(mask: np.ndarray) -> int:
    """Length of the longest run of True in a 1-D bool array."""
    padded = np.concatenate(([0], mask.astype(np.int8), [0]))
    edges = np.flatnonzero(np.diff(padded))  # starts at even positions, ends at odd ones
    return int((edges[1::2] - edges[::2]).max()) if len(edges) else 0
