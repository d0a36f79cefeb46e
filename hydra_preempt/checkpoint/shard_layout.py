"""The one check of a sharded checkpoint's metadata against its files, before any rank reads a byte.

Pure: plain data in (DCP's Metadata as decoded from shards.json, the verified size of every file
the manifest lists, the header each shard file begins with), ShardedFormatError with a one-line
message out. Resume and export both call it (sharded.read_shards_metadata).

A checksum detects damage, not intent: a file edited and re-signed verifies. So nothing in
shards.json is taken on trust; what it says must agree with the files:

- every storage entry names a shard file the manifest lists; every item lies inside its file,
  and a file's items cover it exactly once (no byte unaccounted for, none read twice);
- every tensor's chunks tile its global shape exactly once (no gap, no overlap, none outside),
  each item is exactly its chunk's bytes, and its dtype is one a model's state holds (no
  quantized or complex types, whose bytes torch cannot take as they are): so a tensor's size
  is bounded by the verified bytes that fill it, and nothing allocates more;
- each shard file begins with a header its writer wrote: its rank (which must be the file's
  number) and a digest of the items it wrote (names, chunks, dtypes, places in the file).
  What shards.json says of that file must have that digest: a swapped file, a changed dtype or
  a moved chunk is caught even when every file verifies. Files of checkpoints written before
  the header existed (they do not begin with it) are checked for everything else.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch
import xxhash
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, TensorStorageMetadata

from .layout import SHARD_FILE, ShardedFormatError

HEADER_MAGIC = b"HPSHARD1"
HEADER_SIZE = len(HEADER_MAGIC) + 8 + 16  # magic, rank (little-endian u64), xxh3-128 of the item table
MAX_DIMS = 32
ALLOWED_DTYPES = frozenset(
    {
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.float8_e4m3fn,
        torch.float8_e5m2,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    }
)


@dataclass(frozen=True)
class ShardHeader:
    """What a shard file's first HEADER_SIZE bytes say: the rank that wrote it, and the digest of its items."""

    rank: int
    items_digest: bytes

    def to_bytes(self) -> bytes:
        return HEADER_MAGIC + self.rank.to_bytes(8, "little") + self.items_digest

    @classmethod
    def from_bytes(cls, data: bytes) -> ShardHeader | None:
        """The header at the start of a file (its first HEADER_SIZE bytes), or None: a file without one."""
        if len(data) < HEADER_SIZE or not data.startswith(HEADER_MAGIC):
            return None
        start = len(HEADER_MAGIC)
        return cls(int.from_bytes(data[start : start + 8], "little"), data[start + 8 : HEADER_SIZE])


# (fqn, chunk offsets or None for a non-tensor value, chunk sizes or None, dtype or "bytes", offset, length)
Item = tuple[str, tuple[int, ...] | None, tuple[int, ...] | None, str, int, int]


def items_digest(items: list[Item]) -> bytes:
    """The digest of a file's items, in the order of their places in the file (the header's second part)."""
    table = [list(item) for item in sorted(items, key=lambda i: i[4])]  # tuples become JSON lists
    return xxhash.xxh3_128_digest(json.dumps(table, separators=(",", ":")).encode())


def file_rank(name: str) -> int:
    """The rank whose file `name` is (shard-00003.bin: 3)."""
    return int(name[len("shard-") : len("shard-") + 5])


def _short(value: object) -> str:
    text = str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_shard_layout(metadata: Metadata, file_sizes: dict[str, int], headers: dict[str, ShardHeader | None]) -> None:
    """Raise ShardedFormatError unless `metadata` agrees with the files (see the module's docstring).

    `file_sizes`: every file the manifest lists, with its verified size; `headers`: each listed shard
    file's header (None: it has none)."""
    sdm = metadata.state_dict_metadata
    storage = metadata.storage_data
    if not isinstance(storage, dict):
        raise ShardedFormatError("shards.json has no storage entries")
    by_file: dict[str, list[Item]] = {}
    for index, info in storage.items():
        fqn = _short(index.fqn)
        name = info.relative_path
        if not SHARD_FILE.fullmatch(name) or info.transform_descriptors:
            raise ShardedFormatError(f"shards.json: bad storage entry for {fqn}")
        if name not in file_sizes:
            raise ShardedFormatError(f"shards.json: {fqn} is in {_short(name)}, a file the manifest does not list")
        entry = sdm.get(index.fqn)
        if entry is None:
            raise ShardedFormatError(f"shards.json: storage entry for an unknown key {fqn}")
        if info.offset + info.length > file_sizes[name]:
            raise ShardedFormatError(f"shards.json: {fqn} lies past the end of {name}")
        if isinstance(entry, BytesStorageMetadata):
            if index.offset is not None:
                raise ShardedFormatError(f"shards.json: bad storage entry for {fqn}")
            by_file.setdefault(name, []).append((index.fqn, None, None, "bytes", info.offset, info.length))
            continue
        chunk = next((c for c in entry.chunks if c.offsets == index.offset), None)
        dtype = entry.properties.dtype
        if dtype not in ALLOWED_DTYPES:
            raise ShardedFormatError(f"shards.json: {fqn} has dtype {dtype}, which a model's state does not hold")
        if chunk is None or info.length != math.prod(chunk.sizes) * dtype.itemsize:
            raise ShardedFormatError(f"shards.json: storage entry of {fqn} fits no chunk")
        item = (index.fqn, tuple(chunk.offsets), tuple(chunk.sizes), str(dtype), info.offset, info.length)
        by_file.setdefault(name, []).append(item)
    stored = {(i.fqn, None if i.offset is None else tuple(i.offset)) for i in storage}
    for fqn, entry in sdm.items():
        if isinstance(entry, TensorStorageMetadata):
            _check_tiling(_short(fqn), entry)
            missing = any((fqn, tuple(c.offsets)) not in stored for c in entry.chunks)
        else:
            missing = (fqn, None) not in stored
        if missing:
            raise ShardedFormatError(f"shards.json: a part of {_short(fqn)} has no storage entry")
    for name in sorted(n for n in file_sizes if SHARD_FILE.fullmatch(n)):
        _check_file(name, file_sizes[name], headers.get(name), by_file.get(name, []))


def _check_tiling(fqn: str, entry: TensorStorageMetadata) -> None:
    """The chunks of a tensor cover its global shape exactly once."""
    size = tuple(entry.size)
    if len(size) > MAX_DIMS:
        raise ShardedFormatError(f"shards.json: {fqn} has {len(size)} dimensions")
    boxes = []
    for c in entry.chunks:
        if len(c.offsets) != len(size) or len(c.sizes) != len(size):
            raise ShardedFormatError(f"shards.json: a chunk of {fqn} has another number of dimensions")
        if any(o + n > s for o, n, s in zip(c.offsets, c.sizes, size)):
            raise ShardedFormatError(f"shards.json: a chunk of {fqn} lies outside its shape")
        if math.prod(c.sizes):
            boxes.append((tuple(c.offsets), tuple(c.offsets[d] + c.sizes[d] for d in range(len(size)))))
    if sum(math.prod(b - a for a, b in zip(lo, hi)) for lo, hi in boxes) != math.prod(size):
        raise ShardedFormatError(f"shards.json: the chunks of {fqn} do not cover its shape exactly once")
    if not size:
        return
    boxes.sort()  # a sweep along the first dimension: only boxes that meet there can overlap
    for i, (lo, hi) in enumerate(boxes):
        for lo2, hi2 in boxes[i + 1 :]:
            if lo2[0] >= hi[0]:
                break
            if all(a2 < b and a < b2 for a, b, a2, b2 in zip(lo, hi, lo2, hi2)):
                raise ShardedFormatError(f"shards.json: chunks of {fqn} overlap")


def _check_file(name: str, size: int, header: ShardHeader | None, items: list[Item]) -> None:
    """The file's items cover it exactly once after its header, and are the items its writer wrote."""
    position = HEADER_SIZE if header is not None else 0
    for item in sorted(items, key=lambda i: (i[4], i[5])):
        if item[4] != position:
            raise ShardedFormatError(f"shards.json: the items of {name} do not cover it exactly once")
        position += item[5]
    if position != size:
        raise ShardedFormatError(f"shards.json: the items of {name} do not cover it exactly once")
    if header is None:
        return
    if header.rank != file_rank(name):
        raise ShardedFormatError(f"{name} was written by rank {header.rank}, not by rank {file_rank(name)}")
    if header.items_digest != items_digest(items):
        raise ShardedFormatError(f"shards.json does not describe the items rank {header.rank} wrote in {name}")
