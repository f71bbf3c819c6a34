"""Which whole training texts exist, so that a `unique` reply never is one, or most of one.

The copy index (copy_index.py) catches shared runs of 8 tokens; a training text shorter than that
(a one-line excuse, a chat message) can come back whole without ever tripping it. So at fine-tune
time the run folder also gets `copy_texts.u64` and `copy_texts.json`: for every training line of at
most MAX_TEXT_WORDS words, the hash of the whole line and of each of its runs of just over half its
words (ceil((W + 1) / 2) of W words), over normalised words (lower case, each punctuation mark a word,
spaces ignored). A reply that equals one, or holds such a run of at least MIN_HALF_WORDS words,
covers more than half of a training text and is drawn again, like one that copies the chat's context.

Longer lines need no entry: more than half of a line over MAX_TEXT_WORDS words is a run of 8 tokens
or more, which the n-gram index already finds. Entries are 8 bytes each, about half a short line's
word count per line (454 one-line excuses: ~3,000 entries, 24 kB), exact up to 64-bit collisions.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np

TEXTS_FILE = "copy_texts.u64"  # little-endian uint64 hashes, sorted, distinct
TEXTS_JSON = "copy_texts.json"
HASH_NAME = "blake2b64-words-v1"
MAX_TEXT_WORDS = 32  # longer lines: half of one is at least 16 words, which the 8-token index catches
# a shorter run is not "most of a text" ("I am sorry" may be half of "I am sorry ."); whole equality still counts
MIN_HALF_WORDS = 4
_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    """Lower-cased words, each punctuation mark a word of its own: how texts are compared."""
    return _WORD.findall(text.lower())


def half_words(num_words: int) -> int:
    """The shortest run that is more than half of a text of `num_words` words."""
    return num_words // 2 + 1


def _hash(kind: str, ws: list[str]) -> int:
    digest = hashlib.blake2b(("\x1f".join([kind, *ws])).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def text_hashes(line: str) -> list[int]:
    """The entries of one training line: its whole words, and each run of just over half of them."""
    ws = words(line)
    if not ws or len(ws) > MAX_TEXT_WORDS:
        return []
    out = [_hash("=", ws)]
    k = half_words(len(ws))
    if k >= MIN_HALF_WORDS:
        out.extend(_hash(str(k), ws[i : i + k]) for i in range(len(ws) - k + 1))
    return out


def write_texts(run_dir: str | os.PathLike, lines: Iterable[str]) -> Path:
    """Index the training `lines` (each a training text, or one line of one) into `run_dir`."""
    run_dir = Path(run_dir)
    hashes, lengths, num_texts = [], set(), 0
    for line in lines:
        entries = text_hashes(line)
        if entries:
            num_texts += 1
            hashes.extend(entries)
            k = half_words(len(words(line)))
            if k >= MIN_HALF_WORDS:
                lengths.add(k)
    values = np.unique(np.array(hashes, dtype=np.uint64))
    path = run_dir / TEXTS_FILE
    values.astype("<u8").tofile(path)
    meta = {"hash": HASH_NAME, "num_hashes": len(values), "num_texts": num_texts, "run_lengths": sorted(lengths)}
    (run_dir / TEXTS_JSON).write_text(json.dumps(meta) + "\n", encoding="utf-8")
    return path


def document_lines(tokens: np.ndarray, eos_id: int | None, decode) -> Iterable[str]:
    """The lines of each document of a run's token stream (documents end at `eos_id`), decoded
    without special tokens (<|startoftext|> is not part of a text)."""
    ends = np.flatnonzero(tokens == eos_id) if eos_id is not None else np.zeros(0, dtype=np.int64)
    start = 0
    for end in [*ends.tolist(), len(tokens)]:
        if end > start:
            yield from decode(tokens[start:end].tolist(), skip_special_tokens=True).splitlines()
        start = end + 1


class TrainingTexts:
    """`TrainingTexts.load(run_dir)`, then `covered(reply)`."""

    def __init__(self, hashes: np.ndarray, run_lengths: list[int]):
        self.hashes = hashes  # (num,) sorted uint64
        self.run_lengths = run_lengths  # the half-run lengths that occur, in words

    @classmethod
    def build(cls, lines: Iterable[str]) -> TrainingTexts:
        lines = list(lines)
        hashes = np.unique(np.array([h for line in lines for h in text_hashes(line)], dtype=np.uint64))
        lengths = {half_words(len(words(x))) for x in lines if 0 < len(words(x)) <= MAX_TEXT_WORDS}
        return cls(hashes, sorted(k for k in lengths if k >= MIN_HALF_WORDS))

    @classmethod
    def load(cls, run_dir: str | os.PathLike) -> TrainingTexts | None:
        """None for a run without one (trained before botkit wrote it) or from another botkit."""
        run_dir = Path(run_dir)
        try:
            meta = json.loads((run_dir / TEXTS_JSON).read_text(encoding="utf-8"))
            hashes = np.fromfile(run_dir / TEXTS_FILE, dtype="<u8")
        except (OSError, ValueError):
            return None
        if not isinstance(meta, dict) or meta.get("hash") != HASH_NAME or meta.get("num_hashes") != len(hashes):
            return None
        lengths = meta.get("run_lengths")
        if not isinstance(lengths, list) or not all(isinstance(k, int) and 0 < k <= MAX_TEXT_WORDS for k in lengths):
            return None
        return cls(hashes, lengths)

    def _has(self, h: int) -> bool:
        if not len(self.hashes):
            return False
        pos = min(int(np.searchsorted(self.hashes, np.uint64(h))), len(self.hashes) - 1)
        return int(self.hashes[pos]) == h

    def covered(self, reply: str) -> float:
        """0 if `reply` is no training text and holds no more than half of one; else the share of
        its words that the copied run is (1.0: the reply, or a line of it, is a training text)."""
        lines = [words(line) for line in reply.splitlines()]
        if any(ws and self._has(_hash("=", ws)) for ws in [words(reply), *lines]):
            return 1.0
        ws = words(reply)
        for k in sorted(self.run_lengths, reverse=True):  # the longest run first
            if any(self._has(_hash(str(k), ws[i : i + k])) for i in range(len(ws) - k + 1)):
                return k / len(ws)
        return 0.0
