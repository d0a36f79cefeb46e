"""Sharded state (FSDP2, DTensor) on torch.distributed.checkpoint, with no pickle on any path.

Every rank writes its own part in parallel into the one checkpoint directory:

    shard-00000.bin   written by rank 0: a header (its rank, a digest of its items: shard_layout.py),
                      then raw little-endian tensor bytes (and JSON values)
    shard-00001.bin   ... by rank 1 (a rank with nothing to write writes no file)
    shards.json       DCP's Metadata as JSON (dcp_metadata.py), written by rank 0

DCP's planners do the sharding and resharding (a checkpoint of N ranks loads
into M). Its FileSystemWriter/Reader are not used: they pickle the metadata
and `torch.save` every tensor, and DefaultLoadPlanner unpickles non-tensor
values (`torch.load(weights_only=False)`). Here tensors are raw bytes whose
dtype and shape come from the verified metadata, and non-tensor values
(optimizer param_groups) are JSON. Each rank hashes its own file while
writing; the digests reach rank 0 with DCP's own gather of write results.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import xxhash
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException as CheckpointException  # for the callers
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, SavePlan, WriteItemType
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from ..fsutil import create_file, open_regular, read_regular
from . import dcp_metadata
from .layout import CHECKSUM, SHARD_FILE, SHARDS_METADATA
from .shard_layout import (
    HEADER_SIZE,
    Item,
    ShardedFormatError,
    ShardHeader,
    check_shard_layout,
    file_rank,
    items_digest,
)
from .tree import HostStaging
from .writer import write_durably

if sys.byteorder != "little":
    raise ImportError("the sharded checkpoint format stores raw little-endian tensor bytes")


# -- non-tensor values as JSON -------------------------------------------------------------------
def _encode(v: Any) -> Any:
    if v is None or type(v) in (bool, int, str):
        return v
    if type(v) is float:
        return v if math.isfinite(v) else {"$float": repr(v)}
    if type(v) is tuple:
        return {"$tuple": [_encode(x) for x in v]}
    if type(v) is list:
        return [_encode(x) for x in v]
    if type(v) is dict:
        if not all(type(k) is str for k in v):
            raise TypeError("only str dict keys can be saved in a sharded state")
        return {"$dict": {k: _encode(x) for k, x in v.items()}}
    raise TypeError(f"a value of type {type(v).__name__} cannot be saved in a sharded state (not JSON)")


def _decode(o: Any) -> Any:
    if o is None or type(o) in (bool, int, float, str):
        return o
    if type(o) is list:
        return [_decode(x) for x in o]
    if type(o) is dict and len(o) == 1:
        ((k, x),) = o.items()
        if k == "$float" and x in ("nan", "inf", "-inf"):
            return float(x)
        if k == "$tuple" and type(x) is list:
            return tuple(_decode(e) for e in x)
        if k == "$dict" and type(x) is dict:
            return {kk: _decode(e) for kk, e in x.items()}
    raise ShardedFormatError(f"invalid JSON value encoding: {o!r:.100}")


def encode_value(v: Any) -> bytes:
    return json.dumps(_encode(v), allow_nan=False, separators=(",", ":")).encode()


def decode_value(b: bytes) -> Any:
    try:
        return _decode(json.loads(b.decode("utf-8")))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ShardedFormatError(f"a non-tensor value does not decode ({e})") from None


class JsonSavePlanner(DefaultSavePlanner):
    """DefaultSavePlanner whose non-tensor payloads are JSON instead of torch.save (pickle)."""

    def transform_object(self, write_item: Any, object: Any) -> Any:
        if write_item.type == WriteItemType.BYTE_IO:
            return io.BytesIO(encode_value(object))
        return object


class JsonLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner that decodes non-tensor payloads as JSON (never torch.load)."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        obj = decode_value(value.getvalue())
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


# -- writing --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Written:
    """One item's place in its rank's file, with the whole file's size and checksum (gathered by DCP)."""

    relative_path: str
    offset: int
    length: int
    file_size: int
    file_checksum: str


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().cpu().resolve_conj().resolve_neg().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().data


class ShardWriter(StorageWriter):
    """DCP storage writer: rank r writes shard-r.bin; rank 0 writes shards.json in finish().

    With `staging`, write_data copies this rank's items into host buffers instead of writing
    them (their places in the file are known from their sizes), and `write_staged()` writes
    the file later, from a thread, with no collective. The shard files' checksums in `files`
    are then empty until each rank reports its own.
    """

    def __init__(self, directory: Path, staging: HostStaging | None = None) -> None:
        super().__init__()
        self.directory = Path(directory)
        self.staging = staging
        self.files: dict[str, dict[str, Any]] = {}  # rank 0, after finish(): name -> size and checksum
        self.staged: tuple[str, list[Any]] | None = None  # (file name, host copies of this rank's items)

    def reset(self, checkpoint_id: Any = None) -> None:
        pass

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        pass

    def storage_meta(self) -> None:
        return None  # nothing of this host (paths, ids) goes into the checkpoint

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return [dataclasses.replace(p, storage_data=f"shard-{rank:05d}.bin") for rank, p in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: Any) -> Future[list[WriteResult]]:
        future: Future[list[WriteResult]] = Future()
        if not plan.items:
            future.set_result([])
            return future
        if not isinstance(planner, JsonSavePlanner):
            raise TypeError("sharded checkpoints are written with JsonSavePlanner (DCP's default pickles values)")
        name = str(plan.storage_data)
        spans = []
        items: list[Item] = []  # what this rank writes, for the file's header (shard_layout.py)
        position = HEADER_SIZE
        views = []
        slots = 0  # staging buffers are numbered by tensor, so that they line up from one save to the next
        for item in plan.items:
            data = planner.resolve_data(item)
            if isinstance(data, io.BytesIO):
                view = memoryview(data.getvalue())
                items.append((item.index.fqn, None, None, "bytes", position, view.nbytes))
            else:
                tensor = data
                if self.staging is not None:  # a copy: training may change the tensor once this returns
                    staged = self.staging.copy(slots, data.detach())
                    slots += 1
                    assert isinstance(staged, torch.Tensor)
                    tensor = staged
                view = _tensor_bytes(tensor)
                assert item.tensor_data is not None
                chunk, dtype = item.tensor_data.chunk, item.tensor_data.properties.dtype
                expected = math.prod(chunk.sizes) * dtype.itemsize
                if view.nbytes != expected:
                    raise RuntimeError(f"{item.index.fqn}: {view.nbytes} bytes, the plan says {expected}")
                items.append(
                    (item.index.fqn, tuple(chunk.offsets), tuple(chunk.sizes), str(dtype), position, view.nbytes)
                )
            views.append(view)
            spans.append((item.index, position, view.nbytes))
            position += view.nbytes
        views.insert(0, memoryview(ShardHeader(file_rank(name), items_digest(items)).to_bytes()))
        checksum = ""
        if self.staging is not None:
            self.staging.copied(slots)
            self.staged = (name, views)
        else:
            checksum = _write_file(self.directory / name, views)
        future.set_result(
            [WriteResult(index, n, _Written(name, offset, n, position, checksum)) for index, offset, n in spans]
        )
        return future

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        storage: dict[MetadataIndex, _StorageInfo] = {}
        files: dict[str, dict[str, Any]] = {}
        for result in (r for rank_results in results for r in rank_results):
            w: _Written = result.storage_data
            storage[result.index] = _StorageInfo(w.relative_path, w.offset, w.length)
            files[w.relative_path] = {"size": w.file_size, CHECKSUM: w.file_checksum}
        metadata.storage_data = storage
        metadata.storage_meta = None
        metadata.version = "1.0.0"
        data = dcp_metadata.dumps(metadata)
        write_durably(self.directory / SHARDS_METADATA, data)
        files[SHARDS_METADATA] = {"size": len(data), CHECKSUM: xxhash.xxh3_128_hexdigest(data)}
        self.files = files

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return False  # never picked by DCP on its own: passed explicitly

    def write_staged(self) -> dict[str, dict[str, Any]]:
        """Write this rank's staged items (no collective: safe in a thread); its file's size and checksum."""
        if self.staged is None:
            return {}
        name, views = self.staged
        if self.staging is not None:
            self.staging.wait()
        checksum = _write_file(self.directory / name, views)
        return {name: {"size": sum(v.nbytes for v in views), CHECKSUM: checksum}}


def _write_file(path: Path, views: list[Any]) -> str:
    """Write the views one after the other, fsync; their xxh3-128."""
    digest = xxhash.xxh3_128()
    with create_file(path) as f:
        for view in views:
            f.write(view)
            digest.update(view)
        f.flush()
        os.fsync(f.fileno())
    return digest.hexdigest()


def save_shards(directory: Path, state: dict[str, Any], staging: HostStaging | None = None) -> ShardWriter:
    """Write `state` (a collective: every rank its own part); rank 0's writer knows every file written.

    With `staging`, only shards.json is written: every rank's items are copied to host memory
    for `writer.write_staged()`."""
    writer = ShardWriter(directory, staging)
    with _single_process_quiet():
        dcp.save(state, storage_writer=writer, planner=JsonSavePlanner(), no_dist=not dist.is_initialized())
    return writer


# -- reading --------------------------------------------------------------------------------------
def read_shards_metadata(directory: Path, files: dict[str, dict[str, Any]]) -> Metadata:
    """shards.json, checked against the manifest's size and checksum on the very bytes that are parsed,
    then against the files themselves (shard_layout.check_shard_layout) before any rank reads a byte.

    `files`: the verified manifest's files (name -> size and checksum); the shard files' contents
    are verified by whoever reads them (their checksums), their headers read here."""
    entry = files.get(SHARDS_METADATA)
    if entry is None:
        raise ShardedFormatError(f"the manifest lists no {SHARDS_METADATA}")
    size, checksum = entry["size"], entry[CHECKSUM]
    try:
        data = read_regular(directory / SHARDS_METADATA, size)
    except OSError as e:
        raise ShardedFormatError(f"{SHARDS_METADATA} cannot be read ({e.strerror or e})") from None
    if len(data) != size or xxhash.xxh3_128_hexdigest(data) != checksum:
        raise ShardedFormatError(f"{SHARDS_METADATA} does not match its size and checksum")
    try:
        metadata = dcp_metadata.loads(data)
    except (ValueError, TypeError, RecursionError, UnicodeDecodeError) as e:
        raise ShardedFormatError(f"{SHARDS_METADATA} does not decode ({_short(e)})") from None
    headers = {}
    for name in files:
        if SHARD_FILE.fullmatch(name):
            try:
                f, _ = open_regular(directory / name)
                with f:
                    headers[name] = ShardHeader.from_bytes(f.read(HEADER_SIZE))
            except OSError as e:
                raise ShardedFormatError(f"{name} cannot be read ({e.strerror or e})") from None
    check_shard_layout(metadata, {name: e["size"] for name, e in files.items()}, headers)
    return metadata


def _short(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


class ShardReader(StorageReader):
    """DCP storage reader over verified metadata: reads only regular files, within their sizes."""

    def __init__(self, directory: Path, metadata: Metadata) -> None:
        super().__init__()
        self.directory = Path(directory)
        self.metadata = metadata

    def reset(self, checkpoint_id: Any = None) -> None:
        pass

    def read_metadata(self) -> Metadata:  # no **kwargs: DCP then never looks for rank-local metadata files
        return self.metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        pass

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: Any) -> Future[None]:
        if not isinstance(planner, JsonLoadPlanner):
            raise TypeError("sharded checkpoints are read with JsonLoadPlanner (DCP's default unpickles values)")
        storage = self.metadata.storage_data
        by_file: dict[str, list] = {}
        for request in plan.items:
            by_file.setdefault(storage[request.storage_index].relative_path, []).append(request)
        for name, requests in by_file.items():
            f, size = open_regular(self.directory / name)
            with f:
                for request in requests:
                    self._read_item(f, size, name, request, planner)
        future: Future[None] = Future()
        future.set_result(None)
        return future

    def _read_item(self, f: io.BufferedReader, size: int, name: str, request: Any, planner: Any) -> None:
        info: _StorageInfo = self.metadata.storage_data[request.storage_index]
        if info.offset + info.length > size:
            raise ShardedFormatError(f"{name}: an item lies past the end of the file")
        f.seek(info.offset)
        buffer = bytearray(info.length)
        if f.readinto(buffer) != info.length:
            raise ShardedFormatError(f"{name}: short read")
        if request.type == LoadItemType.BYTE_IO:
            planner.load_bytes(request, io.BytesIO(bytes(buffer)))
            return
        entry = self.metadata.state_dict_metadata[request.storage_index.fqn]
        assert isinstance(entry, TensorStorageMetadata)
        chunk = next(c for c in entry.chunks if c.offsets == request.storage_index.offset)
        dtype = entry.properties.dtype
        tensor = (torch.frombuffer(buffer, dtype=dtype) if info.length else torch.empty(0, dtype=dtype)).reshape(
            chunk.sizes
        )
        tensor = narrow_tensor_by_index(tensor, request.storage_offsets, request.lengths)
        target = planner.resolve_tensor(request).detach()
        if target.size() != tensor.size():
            raise ShardedFormatError(f"{request.storage_index.fqn}: size {tuple(tensor.size())} in the checkpoint")
        target.copy_(tensor)
        planner.commit_tensor(request, target)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return False


def load_shards(directory: Path, metadata: Metadata, state: dict[str, Any]) -> None:
    """Fill `state` (a template of this world's shards) from the checkpoint; a collective."""
    reader = ShardReader(directory, metadata)
    with _single_process_quiet():
        dcp.load(state, storage_reader=reader, planner=JsonLoadPlanner(), no_dist=not dist.is_initialized())


def empty_template(metadata: Metadata, prefix: str) -> dict[str, torch.Tensor]:
    """Uninitialised full tensors for every tensor of the checkpoint under `prefix` (flat keys), to load
    into in a single process: what an export to another format needs."""
    return {
        key: torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
        for key, entry in metadata.state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(entry, TensorStorageMetadata)
    }


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns that it "assumes the intent" of one process whenever no process group exists (a
    single-rank run, `hydra-preempt export`): that is the intent here, not news for the user."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield
