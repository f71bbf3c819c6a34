"""TensorFlow's checkpoint format (the "tensor bundle" that `tf.train.Saver` writes), read with numpy
and no TensorFlow.

    <prefix>.index                    an SSTable (LevelDB's table format): key "" holds a
                                      BundleHeaderProto, each other key is a tensor name holding a
                                      BundleEntryProto (dtype, shape, shard, offset, size, crc32c)
    <prefix>.data-00000-of-0000N      the shards: each tensor's raw bytes at its offset

Written by hand because no library does it without TensorFlow: the one on PyPI that says so
(`tensorflow-checkpoint-reader` 0.2.2, 2023) describes itself as unfinished, pins protobuf<3.19 and
computes zlib's CRC-32 where TensorFlow uses CRC-32C. The format is small: the table is a footer, an
index block and data blocks; the two messages have a few scalar fields each, parsed here from the
protobuf wire format directly. CRC-32C is google-crc32c's (hardware-accelerated).

Every file is treated as hostile: each length and offset is checked against the file before it is
used, and every failure is one ModelLoadError sentence.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path

import google_crc32c
import numpy as np

from botkit.errors import ModelLoadError

TABLE_MAGIC = 0xDB4775248B80FB57  # LevelDB's (and TensorFlow's) table magic number, the file's last 8 bytes
FOOTER_BYTES = 48  # two block handles padded to 40 bytes, then the magic number
BLOCK_TRAILER_BYTES = 5  # compression type (1 byte) + masked CRC-32C (4 bytes)
MAX_INDEX_BYTES = 256 * 1024**2  # GPT-2 1558M's index is 14 KB; anything near this is not a checkpoint
READ_CHUNK_BYTES = 64 * 1024**2
# A hostile index can make its prefix-compressed keys grow with every entry (a 10 MiB index would
# expand to hundreds of GiB); variable names are short and GPT-2 1558M has about 600 of them.
MAX_KEY_BYTES = 1024
MAX_ENTRIES = 20_000  # keys of at most MAX_KEY_BYTES: at most 20 MB of names

# TensorFlow DataType enum values (types.proto) -> numpy dtype; bfloat16 is widened to float32 on read.
DTYPES = {
    1: "f4",
    2: "f8",
    3: "i4",
    4: "u1",
    5: "i2",
    6: "i1",
    9: "i8",
    10: "?",
    14: "u2",
    17: "u2",
    19: "f2",
    22: "u4",
    23: "u8",
}
DT_BFLOAT16 = 14


class Damaged(Exception):
    """The bytes do not follow the format (caught and reworded at the public functions)."""


@dataclass(frozen=True)
class Entry:
    """Where one tensor lives (BundleEntryProto)."""

    name: str
    dtype: int  # TensorFlow DataType enum value
    shape: tuple[int, ...]
    shard: int
    offset: int  # bytes into the shard
    size: int  # bytes
    crc32c: int | None  # masked CRC-32C of the bytes, when the writer stored one
    is_sliced: bool  # a partitioned variable (stored as slices), which botkit does not read


@dataclass(frozen=True)
class Bundle:
    """A checkpoint's table of contents; `read` fetches one tensor."""

    prefix: Path
    num_shards: int
    is_big_endian: bool
    entries: dict[str, Entry]

    def shard_path(self, shard: int) -> Path:
        return self.prefix.with_name(f"{self.prefix.name}.data-{shard:05d}-of-{self.num_shards:05d}")

    def read(self, name: str) -> np.ndarray:
        """The tensor's values as a numpy array of its shape (checksum verified when stored)."""
        entry = self.entries[name]
        if entry.is_sliced:
            raise ModelLoadError(
                f"{name} in {self.prefix.name} is stored as a partitioned variable, which botkit "
                "cannot read: save it unpartitioned."
            )
        if entry.dtype not in DTYPES:
            raise ModelLoadError(
                f"{name} in {self.prefix.name} has TensorFlow dtype {entry.dtype}, which botkit cannot read."
            )
        dtype = np.dtype(DTYPES[entry.dtype]).newbyteorder(">" if self.is_big_endian else "<")
        count = math.prod(entry.shape)
        if count * dtype.itemsize != entry.size:
            raise ModelLoadError(
                f"{name} in {self.prefix.name} says shape {list(entry.shape)} but {entry.size} bytes: "
                "the checkpoint is damaged."
            )
        if entry.shard >= self.num_shards:
            raise ModelLoadError(
                f"{name} in {self.prefix.name} names data shard {entry.shard} of {self.num_shards}: "
                "the index is damaged."
            )
        path = self.shard_path(entry.shard)
        if not path.is_file():
            raise ModelLoadError(
                f"{path.name} is missing beside {self.prefix.name}.index: copy every file of the checkpoint."
            )
        if entry.offset + entry.size > path.stat().st_size:
            raise ModelLoadError(f"{path.name} is shorter than its index says (cut off while copying?): copy it again.")
        values = np.empty(count, dtype)
        raw = memoryview(values).cast("B")
        checksum = google_crc32c.Checksum()
        with path.open("rb") as f:
            f.seek(entry.offset)
            for start in range(0, entry.size, READ_CHUNK_BYTES):
                chunk = f.read(min(READ_CHUNK_BYTES, entry.size - start))  # bytes: google-crc32c takes no memoryview
                if len(chunk) != min(READ_CHUNK_BYTES, entry.size - start):
                    raise ModelLoadError(f"{path.name} could not be read in full: copy it again.")
                raw[start : start + len(chunk)] = chunk
                if entry.crc32c is not None:
                    checksum.update(chunk)
        if entry.crc32c is not None and mask(int.from_bytes(checksum.digest(), "big")) != entry.crc32c:
            raise ModelLoadError(
                f"{name} in {path.name} fails its checksum (the file is damaged): copy the checkpoint again."
            )
        if entry.dtype == DT_BFLOAT16:  # the top half of a float32, exactly
            values = (values.astype(np.uint32) << 16).view(np.float32)
        return values.reshape(entry.shape)


def mask(crc: int) -> int:
    """LevelDB's masked CRC (rotate right 15, add a constant), as TensorFlow stores its checksums."""
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def open_bundle(prefix: Path) -> Bundle:
    """Read `<prefix>.index`; the data shards are opened by `Bundle.read`."""
    index = prefix.with_name(prefix.name + ".index")
    try:
        if index.stat().st_size > MAX_INDEX_BYTES:
            raise Damaged("too large")
        data = index.read_bytes()
    except OSError as exc:
        raise ModelLoadError(
            f"Could not read {index} ({exc.strerror or exc.__class__.__name__}): check the path and its permissions."
        ) from exc
    try:
        rows = read_table(data)
        header = _fields(rows.pop(b"")) if b"" in rows else {}
        entries = {key.decode("utf-8"): _entry(key.decode("utf-8"), value) for key, value in rows.items()}
    except (Damaged, IndexError, ValueError, struct.error, UnicodeDecodeError) as exc:
        raise ModelLoadError(
            f"{index.name} is not a TensorFlow checkpoint index botkit can read (damaged or another "
            "format): copy it again."
        ) from exc
    num_shards = _one(header, 1, 1)
    if not 1 <= num_shards <= 100_000:
        raise ModelLoadError(
            f"{index.name} names {num_shards} data shards, which no checkpoint has: the index is damaged."
        )
    return Bundle(prefix, num_shards, _one(header, 2, 0) == 1, entries)


def read_table(data: bytes) -> dict[bytes, bytes]:
    """Every key and value of an SSTable held in `data`, in key order."""
    if len(data) < FOOTER_BYTES or struct.unpack_from("<Q", data, len(data) - 8)[0] != TABLE_MAGIC:
        raise Damaged("no table magic number")
    footer = data[-FOOTER_BYTES:]
    _, pos = _handle(footer, 0)  # the metaindex block: TensorFlow writes it empty
    index_handle, _ = _handle(footer, pos)
    rows, end_of_last = {}, 0
    for _, value in _block(data, index_handle):
        handle, _ = _handle(value, 0)
        if handle[0] < end_of_last:  # a table's data blocks follow each other: none is read twice
            raise Damaged("data blocks out of order or overlapping")
        end_of_last = handle[0] + handle[1] + BLOCK_TRAILER_BYTES
        rows.update(_block(data, handle))
        if len(rows) > MAX_ENTRIES:
            raise Damaged("more entries than any checkpoint has")
    return rows


def _handle(buf: bytes, pos: int) -> tuple[tuple[int, int], int]:
    offset, pos = _varint(buf, pos)
    size, pos = _varint(buf, pos)
    return (offset, size), pos


def _block(data: bytes, handle: tuple[int, int]) -> list[tuple[bytes, bytes]]:
    """The (key, value) pairs of one block: prefix-compressed keys, then restart offsets we skip."""
    offset, size = handle
    end = offset + size
    if end + BLOCK_TRAILER_BYTES > len(data):
        raise Damaged("block beyond the file")
    compression, stored_crc = data[end], struct.unpack_from("<I", data, end + 1)[0]
    if compression != 0:
        raise Damaged("compressed block")  # TensorFlow writes bundle indexes uncompressed
    if mask(google_crc32c.value(data[offset : end + 1])) != stored_crc:
        raise Damaged("block checksum")
    block = data[offset:end]
    num_restarts = struct.unpack_from("<I", block, len(block) - 4)[0]
    limit = len(block) - 4 - 4 * num_restarts
    if limit < 0:
        raise Damaged("restart array")
    pairs, key, pos = [], b"", 0
    while pos < limit:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        value_len, pos = _varint(block, pos)
        if shared > len(key) or pos + unshared + value_len > limit:
            raise Damaged("entry beyond its block")
        if shared + unshared > MAX_KEY_BYTES or len(pairs) >= MAX_ENTRIES:
            raise Damaged("key or block larger than any checkpoint has")
        key = key[:shared] + block[pos : pos + unshared]
        pos += unshared
        pairs.append((key, block[pos : pos + value_len]))
        pos += value_len
    return pairs


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = 0
    for shift in range(0, 70, 7):
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
    raise Damaged("varint longer than 10 bytes")


def _fields(buf: bytes) -> dict[int, list]:
    """A protobuf message's fields by number: ints for varint and fixed fields, bytes for the rest."""
    fields, pos = {}, 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = struct.unpack_from("<Q", buf, pos)[0], pos + 8
        elif wire == 5:
            value, pos = struct.unpack_from("<I", buf, pos)[0], pos + 4
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > len(buf):
                raise Damaged("field beyond its message")
            value, pos = buf[pos : pos + length], pos + length
        else:
            raise Damaged(f"wire type {wire}")
        fields.setdefault(number, []).append(value)
    return fields


def _one(fields: dict[int, list], number: int, default: int) -> int:
    return fields.get(number, [default])[-1]  # proto3: the last value of a scalar field wins


def _entry(name: str, value: bytes) -> Entry:
    fields = _fields(value)
    shape = _fields(fields[2][-1]) if 2 in fields else {}
    dims = []
    for dim in shape.get(2, []):  # TensorShapeProto.dim: size is field 1 (int64, two's complement)
        size = _one(_fields(dim), 1, 0)
        if size >= 1 << 63:
            raise Damaged("negative dimension")
        dims.append(size)
    return Entry(
        name=name,
        dtype=_one(fields, 1, 0),
        shape=tuple(dims),
        shard=_one(fields, 3, 0),
        offset=_one(fields, 4, 0),
        size=_one(fields, 5, 0),
        crc32c=fields[6][-1] if 6 in fields else None,
        is_sliced=7 in fields,
    )
