"""Fine-tuning datasets: read text from the formats gpt-2-simple accepts, encode it to one token
stream, cache it (`botkit encode`), and split off a held-out tail."""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase

from .errors import DatasetError

START = "<|startoftext|>"
END = "<|endoftext|>"
CACHE_SUFFIX = ".npz"
ENCODE_BATCH_DOCS = 1000  # documents per call to the fast tokenizer (it parallelises inside a batch)


@dataclass
class TokenStream:
    """A whole dataset as one 1-D array of token ids, documents separated by the end-of-text token."""

    tokens: np.ndarray  # (num_tokens,) int32
    source: str

    def __len__(self) -> int:
        return len(self.tokens)

    def split(self, val_fraction: float) -> tuple[TokenStream, TokenStream | None]:
        """The last `val_fraction` of the tokens become the held-out set (the tail, so no window overlaps)."""
        if val_fraction <= 0:
            return self, None
        cut = int(len(self.tokens) * (1 - val_fraction))
        return TokenStream(self.tokens[:cut], self.source), TokenStream(self.tokens[cut:], self.source + " (held out)")


def dataset_paths(dataset: str | os.PathLike) -> list[Path]:
    """The files a dataset argument names: one file, every .txt file under a folder, or a glob."""
    text = str(dataset)
    if any(ch in text for ch in "*?["):
        paths = [Path(p) for p in sorted(glob.glob(text, recursive=True)) if Path(p).is_file()]
        if not paths:
            raise DatasetError(f"No files match {text}: check the pattern (quote it so the shell does not expand it).")
        return paths
    path = Path(text).expanduser()
    if path.is_dir():
        paths = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not paths:
            raise DatasetError(f"The folder {path} has no .txt files: put your text in .txt files there, or pass a file.")
        return paths
    if not path.is_file():
        raise DatasetError(f"Dataset {path} does not exist: check the path.")
    return [path]


def read_documents(dataset: str | os.PathLike, text_field: str = "text") -> list[str]:
    """Each document's text. CSV rows come wrapped in <|startoftext|> ... <|endoftext|> (gpt-2-simple's
    convention, so `generate(prefix="<|startoftext|>", truncate="<|endoftext|>")` yields one row)."""
    docs: list[str] = []
    for path in dataset_paths(dataset):
        text = _read_text(path)
        suffix = path.suffix.lower()
        if suffix == ".csv":
            docs.extend(_csv_rows(path, text))
        elif suffix == ".jsonl":
            docs.extend(_jsonl_texts(path, text, text_field))
        else:
            docs.append(text)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DatasetError(f"Dataset {dataset} is empty: add some text to it.")
    return docs


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    if b"\x00" in data[:65536]:
        raise DatasetError(f"{path} looks like a binary file, not text: pass UTF-8 text, CSV or JSONL.")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path} is not UTF-8 text (bad byte at offset {exc.start}): convert it to UTF-8.") from None


def _csv_rows(path: Path, text: str) -> list[str]:
    rows = list(csv.reader(text.splitlines()))
    widths = {len(row) for row in rows if row}
    if widths - {1}:
        raise DatasetError(f"{path} has rows with {max(widths)} columns: a CSV dataset must have exactly one column of text.")
    return [f"{START}{row[0]}{END}" for row in rows[1:] if row and row[0].strip()]  # row 0 is the header


def _jsonl_texts(path: Path, text: str, text_field: str) -> list[str]:
    texts = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise DatasetError(f"{path} line {line_no} is not valid JSON: each line must be one JSON object.") from None
        value = record if isinstance(record, str) else record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(value, str):
            raise DatasetError(f"{path} line {line_no} has no string field {text_field!r}: set --text-field to the field holding the text.")
        texts.append(value)
    return texts


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A short hash of the vocabulary, so a cache file is never used with another tokenizer."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode()
    return hashlib.sha256(vocab).hexdigest()[:16]


def encode_documents(docs: list[str], tokenizer: PreTrainedTokenizerBase) -> np.ndarray:
    """Token ids of all documents, each followed by the end-of-text token (as gpt-2-simple joins files)."""
    eos = tokenizer.eos_token_id
    pieces = []
    for start in range(0, len(docs), ENCODE_BATCH_DOCS):
        batch = docs[start : start + ENCODE_BATCH_DOCS]
        # The backend tokenizer has no model_max_length, so long documents raise no length warning.
        for encoding in tokenizer.backend_tokenizer.encode_batch(batch, add_special_tokens=False):
            ids = encoding.ids
            pieces.append(np.asarray(ids + ([eos] if not ids or ids[-1] != eos else []), dtype=np.int32))
    return np.concatenate(pieces)


def load_tokens(dataset: str | os.PathLike, tokenizer: PreTrainedTokenizerBase, text_field: str = "text") -> TokenStream:
    """The dataset as a token stream: from a cache written by `botkit encode`, or read and encoded now."""
    if str(dataset).endswith(CACHE_SUFFIX) and Path(dataset).is_file():
        return _load_cache(Path(dataset), tokenizer)
    return TokenStream(encode_documents(read_documents(dataset, text_field), tokenizer), str(dataset))


def encode_dataset(dataset, tokenizer: PreTrainedTokenizerBase, out_path, text_field: str = "text") -> TokenStream:
    """Pre-tokenise a dataset into a compressed .npz cache (gpt-2-simple's `encode_dataset`)."""
    stream = load_tokens(dataset, tokenizer, text_field)
    out_path = Path(out_path)
    if out_path.suffix != CACHE_SUFFIX:
        raise DatasetError(f"The cache file must end in {CACHE_SUFFIX}, not {out_path.name}: rename --out.")
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max else np.int32  # halves the file for GPT-2's vocab
    out_path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out_path, tokens=stream.tokens.astype(dtype), tokenizer=tokenizer_fingerprint(tokenizer))
    return stream


def _load_cache(path: Path, tokenizer: PreTrainedTokenizerBase) -> TokenStream:
    try:
        with np.load(path) as data:
            tokens, fingerprint = data["tokens"].astype(np.int32), str(data["tokenizer"])
    except (OSError, ValueError, KeyError) as exc:
        raise DatasetError(f"{path} is not a cache written by `botkit encode` ({exc.__class__.__name__}): re-encode the dataset.") from None
    if fingerprint != tokenizer_fingerprint(tokenizer):
        raise DatasetError(f"{path} was encoded with another tokenizer: re-run `botkit encode` with the model you fine-tune.")
    if len(tokens) == 0:
        raise DatasetError(f"Dataset {path} is empty: add some text to it.")
    return TokenStream(tokens, str(path))


def train_tokenizer(docs: list[str], vocab_size: int) -> PreTrainedTokenizerBase:
    """A byte-level BPE tokenizer (GPT-2's kind) trained on the dataset: for languages and scripts that
    GPT-2's English vocabulary splits into many tokens. Byte-level, so any UTF-8 text stays encodable."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(docs, vocab_size=vocab_size, min_frequency=2, special_tokens=[END, START], show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=END, eos_token=END, unk_token=END)
    tokenizer.pad_token = END  # GPT-2 convention: no pad token of its own; padded columns are masked
    tokenizer.padding_side = "left"
    return tokenizer
