"""A dataset's files as a stream of text segments, never a whole file in memory.

A segment is (text, ends_document). A `.txt` file is one document cut into segments of about
SEGMENT_CHARS characters at places where GPT-2's pre-tokenizer splits anyway (after a line break
between two non-space characters, else before a single space between two non-space characters), so
encoding the segments gives the same tokens as encoding the whole file. CSV rows, JSONL records and
chat conversations are one document each. The shape of each file is read from its content: a CSV
with DiscordChatExporter's header, a JSONL whose first line is botkit's export header, or JSON from
DiscordChatExporter or Telegram Desktop are chat exports.
"""

from __future__ import annotations

import codecs
import csv
import glob
import json
import os
from collections.abc import Iterator
from pathlib import Path

from botkit.chat_format import ChatFormat
from botkit.errors import DatasetError
from botkit.train import chat_exports
from botkit.train.conversations import ConversationOptions, render_conversations
from botkit.train.data_summary import DataSummary

START = "<|startoftext|>"
END = "<|endoftext|>"
SUFFIXES = (".txt", ".csv", ".jsonl", ".json")  # what a folder contributes
SEGMENT_CHARS = 8 * 1024  # text per tokenizer item: larger ones leave tens of MB of allocator high water (measured)
READ_BYTES = 256 * 1024
SNIFF_BYTES = 64 * 1024  # a NUL byte in here means a binary file

Segment = tuple[str, bool]


def dataset_paths(dataset: str | os.PathLike) -> list[Path]:
    """The files a dataset argument names: one file, every dataset file under a folder, or a glob."""
    text = str(dataset)
    if any(ch in text for ch in "*?["):
        paths = [Path(p) for p in sorted(glob.glob(text, recursive=True)) if Path(p).is_file()]
        if not paths:
            raise DatasetError(f"No files match {text}: check the pattern (quote it so the shell does not expand it).")
        return paths
    path = Path(text).expanduser()
    if path.is_dir():
        paths = sorted(p for p in path.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())
        if not paths:
            raise DatasetError(
                f"The folder {path} has no .txt, .csv, .jsonl or .json files: put your text or chat "
                "exports there, or pass a file."
            )
        return paths
    if not path.is_file():
        raise DatasetError(f"Dataset {path} does not exist: check the path.")
    return [path]


class DatasetReader:
    """Reads a dataset as segments; `chat_format` is set once a chat export has been read."""

    def __init__(self, dataset: str | os.PathLike, text_field: str = "text", chats: ConversationOptions | None = None):
        self.paths = dataset_paths(dataset)
        self.text_field = text_field
        self.chats = chats or ConversationOptions()
        self.chat_format: ChatFormat | None = None
        self.pseudonyms: dict[str, str] = {}  # with anonymize_speakers: one pseudonym per name across all files
        self.summary = DataSummary()  # what the chat exports' messages became (kept, dropped by reason, samples)

    def segments(self) -> Iterator[Segment]:
        for path in self.paths:
            yield from self._file(path)

    def documents(self) -> Iterator[str]:
        """Whole documents (a large .txt file is then one large string: prefer `segments`)."""
        pieces: list[str] = []
        for text, ends in self.segments():
            pieces.append(text)
            if ends:
                document = "".join(pieces)
                pieces = []
                if document.strip():
                    yield document

    def _file(self, path: Path) -> Iterator[Segment]:
        with path.open("rb") as f:
            head = f.read(SNIFF_BYTES)
        if b"\x00" in head:
            raise DatasetError(
                f"{path} looks like a binary file, not text: pass UTF-8 text, CSV, JSONL or a chat export."
            )
        suffix = path.suffix.lower()
        if suffix == ".csv":
            yield from self._csv(path)
        elif suffix == ".jsonl":
            yield from self._jsonl(path)
        elif suffix == ".json" or (suffix != ".txt" and head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"{")):
            yield from self._chats(path, chat_exports.json_messages(path, self.summary))
        else:
            yield from text_segments(path)

    def _chats(self, path: Path, messages) -> Iterator[Segment]:
        self.chat_format = self.chats.chat_format
        for conversation in render_conversations(messages, self.chats, self.pseudonyms, self.summary):
            yield conversation, True

    def _csv(self, path: Path) -> Iterator[Segment]:
        chat_exports.raise_csv_limit()
        with _open_text(path, newline="") as f:  # newline="": line breaks inside quoted fields stay
            rows = csv.reader(f)
            try:
                header = next(rows, None)
                if header is not None and chat_exports.is_discord_csv(header):
                    yield from self._chats(path, chat_exports.discord_csv_messages(path, rows))
                    return
                for row in [header] if header is not None else []:
                    if len(row) > 1:
                        raise DatasetError(
                            f"{path} has rows with {len(row)} columns: a CSV dataset must have exactly "
                            "one column of text."
                        )
                for row in rows:  # the header is skipped
                    if len(row) > 1:
                        raise DatasetError(
                            f"{path} line {rows.line_num} has {len(row)} columns: a CSV dataset must "
                            "have exactly one column of text."
                        )
                    if row and row[0].strip():
                        yield f"{START}{row[0]}{END}", True
            except csv.Error as exc:
                raise DatasetError(
                    f"{path} line {rows.line_num} is not valid CSV ({exc}): fix or re-export the file."
                ) from None
            except UnicodeDecodeError:
                raise DatasetError(f"{path} is not UTF-8 text: convert it to UTF-8.") from None

    def _jsonl(self, path: Path) -> Iterator[Segment]:
        with _open_text(path) as f:
            try:
                lines = ((n, line) for n, line in enumerate(f, 1))
                for line_no, line in lines:
                    if not line.strip():
                        continue
                    if line_no == 1 and chat_exports.is_botkit_header(line):
                        yield from self._chats(path, chat_exports.botkit_messages(path, lines))
                        return
                    yield self._jsonl_text(path, line_no, line), True
            except UnicodeDecodeError:
                raise DatasetError(f"{path} is not UTF-8 text: convert it to UTF-8.") from None

    def _jsonl_text(self, path: Path, line_no: int, line: str) -> str:
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            raise DatasetError(f"{path} line {line_no} is not valid JSON: each line must be one JSON object.") from None
        value = record if isinstance(record, str) else record.get(self.text_field) if isinstance(record, dict) else None
        if not isinstance(value, str):
            raise DatasetError(
                f"{path} line {line_no} has no string field {self.text_field!r}: set --text-field to "
                "the field holding the text."
            )
        return value


def _open_text(path: Path, newline: str | None = None):
    return path.open("r", encoding="utf-8-sig", newline=newline)


def text_segments(path: Path, segment_chars: int = SEGMENT_CHARS) -> Iterator[Segment]:
    """A text file as one document in segments (see the module docstring); reads READ_BYTES at a time.
    Blank space before the first text is dropped, however the file is cut, and a blank file yields
    only the end mark."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    pending, offset, has_text = "", 0, False
    with path.open("rb") as f:
        while True:
            data = f.read(READ_BYTES)
            buffered = len(decoder.getstate()[0])
            try:
                pending += decoder.decode(data, final=not data)
            except UnicodeDecodeError as exc:
                raise DatasetError(
                    f"{path} is not UTF-8 text (bad byte at offset {offset - buffered + exc.start}): "
                    "convert it to UTF-8."
                ) from None
            offset += len(data)
            if not has_text:
                pending = pending.lstrip()
                has_text = bool(pending)
            while len(pending) > segment_chars:
                cut = _cut(pending, segment_chars)
                segment, pending = pending[:cut], pending[cut:]
                yield segment, False
            if not data:
                break
    yield pending, True


def _cut(text: str, target: int) -> int:
    """Where to end a segment of `text` (longer than `target`): a pre-token boundary at or before
    `target`, searched back to target // 2; else `target` itself (tokens at that seam may differ
    from the whole file's, as they would for any cut inside a word)."""
    low = target // 2
    i = text.rfind("\n", low, target)
    while i > 0:
        if not text[i - 1].isspace() and not text[i + 1].isspace():
            return i + 1  # "word\n|Next": the line break is a pre-token of its own either way
        i = text.rfind("\n", low, i)
    i = text.rfind(" ", low, target)
    while i > 0:
        if not text[i - 1].isspace() and not text[i + 1].isspace():
            return i  # "word| next": GPT-2 attaches a single space to the word after it
        i = text.rfind(" ", low, i)
    return target
