"""Fine-tuning datasets: read text and chat exports (`dataset_files.py`), encode them to one token
stream in bounded memory, cache it (`botkit encode`), and split off a held-out tail.

Memory: text is read and tokenized a segment at a time and the token ids are
spilled to a temporary file, so encoding peaks at about the final int32 array plus one batch's token
objects (benchmarks/encode_memory.py), not at ~160x the text as when the whole file went to the
tokenizer at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase

from botkit.chat_format import ChatFormat
from botkit.errors import DatasetError
from botkit.train.conversations import ConversationOptions
from botkit.train.data_summary import DataSummary
from botkit.train.dataset_files import END, START, DatasetReader, Segment, dataset_paths  # noqa: F401 - part of this module's API

CACHE_SUFFIX = ".npz"
ENCODE_BATCH_CHARS = 32 * 1024  # text per call to the fast tokenizer (it parallelises across a batch's items)
ENCODE_BATCH_DOCS = 1000
SPILL_BYTES = 1024 * 1024  # token ids held in memory before they go to the temporary file
WRITE_TOKENS = 256 * 1024  # tokens converted and (de)compressed at a time when writing or reading a cache


@dataclass
class TokenStream:
    """A whole dataset as one 1-D array of token ids, documents separated by the end-of-text token."""

    tokens: np.ndarray  # (num_tokens,) int32
    source: str
    chat_format: ChatFormat | None = None  # how its conversations were rendered; None: no chat export in it
    summary: DataSummary | None = None  # what its chat messages became; None: read from a cache or no chats

    def __len__(self) -> int:
        return len(self.tokens)

    def split(self, val_fraction: float) -> tuple[TokenStream, TokenStream | None]:
        """The last `val_fraction` of the tokens become the held-out set (the tail, so no window overlaps)."""
        if val_fraction <= 0:
            return self, None
        cut = int(len(self.tokens) * (1 - val_fraction))
        return (
            TokenStream(self.tokens[:cut], self.source, self.chat_format),
            TokenStream(self.tokens[cut:], self.source + " (held out)", self.chat_format),
        )


def read_documents(
    dataset: str | os.PathLike, text_field: str = "text", chats: ConversationOptions | None = None
) -> list[str]:
    """Each document's text. CSV rows come wrapped in <|startoftext|> ... <|endoftext|> (gpt-2-simple's
    convention, so `generate(prefix="<|startoftext|>", truncate="<|endoftext|>")` yields one row);
    chat exports become one document per conversation. Holds everything in memory: for small data."""
    docs = list(DatasetReader(dataset, text_field, chats).documents())
    if not docs:
        raise DatasetError(f"Dataset {dataset} is empty: add some text to it.")
    return docs


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A short hash of the vocabulary, so a cache file is never used with another tokenizer."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode()
    return hashlib.sha256(vocab).hexdigest()[:16]


def encode_documents(docs: Iterable[str], tokenizer: PreTrainedTokenizerBase) -> np.ndarray:
    """Token ids of all documents, each followed by the end-of-text token (as gpt-2-simple joins files)."""
    return encode_segments(((doc, True) for doc in docs), tokenizer)


def encode_segments(segments: Iterable[Segment], tokenizer: PreTrainedTokenizerBase) -> np.ndarray:
    """Token ids of a stream of (text, ends_document) segments, with the end-of-text token after each
    document (unless it already ends with one); blank documents leave nothing. Batches go to the
    fast tokenizer (the backend has no model_max_length, so long documents raise no warning) and
    the ids to a temporary file once SPILL_BYTES have gathered: memory holds the final array once."""
    eos = tokenizer.eos_token_id
    encode = tokenizer.backend_tokenizer.encode_batch_fast  # the ids without offsets: less to allocate
    held: list[np.ndarray] = []
    held_bytes, last_id, has_text = 0, None, False
    with tempfile.TemporaryFile(prefix="botkit-tokens-") as spill:
        spilled = False
        for batch in _batches(segments):
            texts = [text for text, _ in batch]
            for encoding, (_, ends) in zip(encode(texts, add_special_tokens=False), batch, strict=True):
                ids = encoding.ids
                has_text = has_text or bool(ids)
                if ends and has_text and (ids[-1] if ids else last_id) != eos:
                    ids.append(eos)
                if ids:
                    held.append(np.asarray(ids, dtype=np.int32))
                    held_bytes += 4 * len(ids)
                    last_id = ids[-1]
                has_text = has_text and not ends
            if held_bytes >= SPILL_BYTES:
                np.concatenate(held).tofile(spill)
                held, held_bytes, spilled = [], 0, True
        if not spilled:
            return np.concatenate(held) if held else np.zeros(0, dtype=np.int32)
        if held:
            np.concatenate(held).tofile(spill)
            held = []
        spill.seek(0)
        return np.fromfile(spill, dtype=np.int32)


def _batches(segments: Iterable[Segment]) -> Iterator[list[Segment]]:
    """Segments grouped up to ENCODE_BATCH_CHARS characters; a blank segment that would start a
    document is dropped (with its end mark), so a blank document leaves no tokens."""
    batch: list[Segment] = []
    chars, in_document = 0, False
    for text, ends in segments:
        if not in_document and not text.strip():
            continue
        in_document = not ends
        batch.append((text, ends))
        chars += len(text)
        if chars >= ENCODE_BATCH_CHARS or len(batch) >= ENCODE_BATCH_DOCS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def load_tokens(
    dataset: str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase,
    text_field: str = "text",
    chats: ConversationOptions | None = None,
) -> TokenStream:
    """The dataset as a token stream: from a cache written by `botkit encode`, or read and encoded now."""
    if str(dataset).endswith(CACHE_SUFFIX) and Path(dataset).is_file():
        return _load_cache(Path(dataset), tokenizer)
    reader = DatasetReader(dataset, text_field, chats)
    tokens = encode_segments(reader.segments(), tokenizer)
    if len(tokens) == 0:
        raise DatasetError(f"Dataset {dataset} is empty: add some text to it.")
    return TokenStream(tokens, str(dataset), reader.chat_format, reader.summary if reader.chat_format else None)


def encode_dataset(
    dataset,
    tokenizer: PreTrainedTokenizerBase,
    out_path,
    text_field: str = "text",
    chats: ConversationOptions | None = None,
) -> TokenStream:
    """Pre-tokenise a dataset into a compressed .npz cache (gpt-2-simple's `encode_dataset`); a chat
    export's format goes into the cache too, so a run trained from it records the format."""
    out_path = Path(out_path)
    if out_path.suffix != CACHE_SUFFIX:
        raise DatasetError(f"The cache file must end in {CACHE_SUFFIX}, not {out_path.name}: rename --out.")
    # Before the tokens exist: the vocabulary's copies (~13 MB for GPT-2's) would add to their peak.
    fingerprint = tokenizer_fingerprint(tokenizer)
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max else np.int32  # halves the file for GPT-2's vocab
    stream = load_tokens(dataset, tokenizer, text_field, chats)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    chat_format = json.dumps(stream.chat_format.to_dict()) if stream.chat_format else ""
    _write_cache(out_path, stream.tokens, dtype, fingerprint, chat_format)
    return stream


def _write_cache(path: Path, tokens: np.ndarray, dtype, fingerprint: str, chat_format: str) -> None:
    """What `np.savez_compressed` writes (np.load reads it), but the tokens converted and written a
    slice at a time: savez would hold a converted copy plus 16 MiB write buffers."""
    fmt = np.lib.format
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as archive:
        with archive.open("tokens.npy", "w", force_zip64=True) as f:
            fmt.write_array_header_1_0(
                f, {"descr": fmt.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tokens.shape}
            )
            for start in range(0, len(tokens), WRITE_TOKENS):
                f.write(tokens[start : start + WRITE_TOKENS].astype(dtype).tobytes())
        for name, value in (("tokenizer", fingerprint), ("chat_format", chat_format)):
            with archive.open(f"{name}.npy", "w") as f:
                fmt.write_array(f, np.asarray(value))
    os.replace(tmp, path)


def _load_cache(path: Path, tokenizer: PreTrainedTokenizerBase) -> TokenStream:
    try:
        with path.open("rb") as f:  # opened here: np.load leaks its own file when the zip is damaged
            with np.load(f) as data:
                if str(data["tokenizer"]) != tokenizer_fingerprint(tokenizer):  # checked first: no tokens in memory yet
                    raise DatasetError(
                        f"{path} was encoded with another tokenizer: re-run `botkit encode` with the "
                        "model you fine-tune."
                    )
                raw = str(data["chat_format"]) if "chat_format" in data.files else ""
                chat_format = json.loads(raw) if raw else None
            tokens = _read_tokens(f)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise DatasetError(
            f"{path} is not a cache written by `botkit encode` ({exc.__class__.__name__}): re-encode the dataset."
        ) from None
    if len(tokens) == 0:
        raise DatasetError(f"Dataset {path} is empty: add some text to it.")
    return TokenStream(
        tokens, str(path), ChatFormat.from_dict(chat_format, str(path)) if chat_format is not None else None
    )


def _read_tokens(file) -> np.ndarray:
    """The cache's token array as int32, filled a slice at a time from the compressed member (np.load
    would hold the stored uint16 array and its int32 copy at once)."""
    fmt = np.lib.format
    with zipfile.ZipFile(file) as archive, archive.open("tokens.npy") as f:
        version = fmt.read_magic(f)
        shape, fortran_order, dtype = (
            fmt.read_array_header_1_0(f) if version == (1, 0) else fmt.read_array_header_2_0(f)
        )
        if dtype not in (np.dtype(np.uint16), np.dtype(np.int32)) or len(shape) != 1:
            raise ValueError(f"tokens of dtype {dtype} and shape {shape}")
        tokens = np.empty(shape[0], dtype=np.int32)
        for start in range(0, len(tokens), WRITE_TOKENS):
            count = min(WRITE_TOKENS, len(tokens) - start)
            data = f.read(count * dtype.itemsize)
            if len(data) != count * dtype.itemsize:
                raise ValueError("tokens cut short")
            tokens[start : start + count] = np.frombuffer(data, dtype=dtype)
    return tokens


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerBase:
    """A byte-level BPE tokenizer (GPT-2's kind) trained on the dataset: for languages and scripts that
    GPT-2's English vocabulary splits into many tokens. Byte-level, so any UTF-8 text stays encodable.
    `texts` may be a stream (a DatasetReader's segments): BPE training only counts pre-tokens."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[END, START], show_progress=False
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=END, eos_token=END, unk_token=END)
    tokenizer.pad_token = END  # GPT-2 convention: no pad token of its own; padded columns are masked
    tokenizer.padding_side = "left"
    return tokenizer
