"""Exact, pickle-free JSON (de)serialization of torch.distributed.checkpoint Metadata (shards.json).

DCP's own FileSystemWriter pickles its `.metadata`, and its reader unpickles
it: loading such a checkpoint can run code. This codec writes the same
Metadata as JSON and reads it back into the same dataclasses.

Covers what DefaultSavePlanner + a FileSystem-style writer put in Metadata (torch 2.13):
  state_dict_metadata: {fqn: TensorStorageMetadata | BytesStorageMetadata}
  planner_data:        None | {flat_fqn: tuple[str | int, ...]}   (flatten mapping)
  storage_data:        None | {MetadataIndex: _StorageInfo}
  storage_meta:        None | StorageMeta
  version:             None | str
Anything else is refused (TypeError on save, ValueError on load). Loading only builds
dataclasses from an allow-list; no name is ever resolved dynamically. It relies on
DCP's dataclasses as of torch 2.13 (tests/unit/test_sharded.py round-trips a real one).
"""

import json
from pathlib import Path, PurePath

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

FORMAT = "torch-dcp-metadata+json"
FORMAT_VERSION = 1

_DTYPES = {str(d): d for d in vars(torch).values() if isinstance(d, torch.dtype)}
_LAYOUTS = {str(x): x for x in vars(torch).values() if isinstance(x, torch.layout)}
_MEMFMTS = {
    str(x): x for x in (torch.contiguous_format, torch.channels_last, torch.channels_last_3d, torch.preserve_format)
}


# ----------------------------------------------------------------- encode
def _ints(s):
    if not all(type(i) is int for i in s):
        raise TypeError(f"expected ints, got {s!r}")
    return list(s)


def _enc_props(p: TensorProperties):
    return {
        "dtype": str(p.dtype),
        "layout": str(p.layout),
        "requires_grad": bool(p.requires_grad),
        "memory_format": str(p.memory_format),
        "pin_memory": bool(p.pin_memory),
    }


def _enc_sdm(v):
    if isinstance(v, BytesStorageMetadata):
        return {"type": "bytes"}
    if isinstance(v, TensorStorageMetadata):
        return {
            "type": "tensor",
            "properties": _enc_props(v.properties),
            "size": _ints(v.size),
            "chunks": [{"offsets": _ints(c.offsets), "sizes": _ints(c.sizes)} for c in v.chunks],
        }
    raise TypeError(f"unsupported storage metadata {type(v)}")


def _enc_index(i: MetadataIndex):
    return {"fqn": i.fqn, "offset": None if i.offset is None else _ints(i.offset), "index": i.index}


def _enc_sinfo(s):
    if not isinstance(s, _StorageInfo):
        raise TypeError(f"unsupported storage_data value {type(s)}")
    return {
        "relative_path": s.relative_path,
        "offset": int(s.offset),
        "length": int(s.length),
        "transform_descriptors": None if s.transform_descriptors is None else [str(d) for d in s.transform_descriptors],
    }


def _enc_ckpt_id(c):
    if c is None or isinstance(c, str):
        return c
    if isinstance(c, PurePath):
        return {"path": str(c)}
    raise TypeError(f"unsupported checkpoint_id {type(c)}")


def metadata_to_obj(md: Metadata) -> dict:
    if md.planner_data is not None:
        if not isinstance(md.planner_data, dict):
            raise TypeError("planner_data must be None or a flatten mapping")
        for k, path in md.planner_data.items():
            if not isinstance(k, str) or not isinstance(path, tuple) or not all(type(p) in (str, int) for p in path):
                raise TypeError(f"bad planner_data entry {k!r}: {path!r}")
    if md.storage_data is not None and not isinstance(md.storage_data, dict):
        raise TypeError("storage_data must be None or a dict")
    sm = md.storage_meta
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "byteorder": "little",
        "version": md.version,
        "state_dict_metadata": {k: _enc_sdm(v) for k, v in md.state_dict_metadata.items()},
        # list of [key, path] pairs: keeps order, path items keep str/int distinction
        "planner_data": None if md.planner_data is None else [[k, list(p)] for k, p in md.planner_data.items()],
        "storage_data": None
        if md.storage_data is None
        else [[_enc_index(i), _enc_sinfo(s)] for i, s in md.storage_data.items()],
        "storage_meta": None
        if sm is None
        else {
            "checkpoint_id": _enc_ckpt_id(sm.checkpoint_id),
            "save_id": sm.save_id,
            "load_id": sm.load_id,
            "modules": list(sm.modules),
        },
    }


def dumps(md: Metadata) -> bytes:
    return json.dumps(metadata_to_obj(md), allow_nan=False, separators=(",", ":")).encode("utf-8")


# ----------------------------------------------------------------- decode
def _fail(msg):
    raise ValueError(f"invalid DCP JSON metadata: {msg}")


def _dict(o, keys, what):
    if not isinstance(o, dict) or set(o) != set(keys):
        _fail(f"{what}: expected keys {sorted(keys)}, got {o!r:.200}")
    return o


def _int(x, what, nonneg=True):
    if type(x) is not int or (nonneg and x < 0):
        _fail(f"{what}: expected non-negative int, got {x!r}")
    return x


def _str(x, what, optional=False):
    if optional and x is None:
        return None
    if not isinstance(x, str):
        _fail(f"{what}: expected str, got {x!r}")
    return x


def _size(x, what):
    if not isinstance(x, list):
        _fail(f"{what}: expected list")
    return torch.Size([_int(i, what) for i in x])


def _bool(x, what):
    if type(x) is not bool:
        _fail(f"{what}: expected bool")
    return x


def _lookup(table, x, what):
    if not isinstance(x, str) or x not in table:
        _fail(f"{what}: unknown {x!r}")
    return table[x]


def _dec_sdm(fqn, o):
    if not isinstance(o, dict) or o.get("type") not in ("bytes", "tensor"):
        _fail(f"{fqn}: bad entry")
    if o["type"] == "bytes":
        _dict(o, {"type"}, fqn)
        return BytesStorageMetadata()
    _dict(o, {"type", "properties", "size", "chunks"}, fqn)
    p = _dict(o["properties"], {"dtype", "layout", "requires_grad", "memory_format", "pin_memory"}, fqn)
    props = TensorProperties(
        dtype=_lookup(_DTYPES, p["dtype"], "dtype"),
        layout=_lookup(_LAYOUTS, p["layout"], "layout"),
        requires_grad=_bool(p["requires_grad"], "requires_grad"),
        memory_format=_lookup(_MEMFMTS, p["memory_format"], "memory_format"),
        pin_memory=_bool(p["pin_memory"], "pin_memory"),
    )
    size = _size(o["size"], fqn)
    if not isinstance(o["chunks"], list):
        _fail(f"{fqn}: chunks")
    chunks = []
    for c in o["chunks"]:
        _dict(c, {"offsets", "sizes"}, fqn)
        ch = ChunkStorageMetadata(offsets=_size(c["offsets"], fqn), sizes=_size(c["sizes"], fqn))
        if (
            len(ch.offsets) != len(size)
            or len(ch.sizes) != len(size)
            or any(off + n > s for off, n, s in zip(ch.offsets, ch.sizes, size))
        ):
            _fail(f"{fqn}: chunk {ch} out of bounds of {size}")
        chunks.append(ch)
    return TensorStorageMetadata(properties=props, size=size, chunks=chunks)


def _no_dupes(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            _fail(f"duplicate key {k!r}")
        d[k] = v
    return d


def _bad_const(c):
    _fail(f"non-finite constant {c}")


def metadata_from_obj(o) -> Metadata:
    _dict(
        o,
        {
            "format",
            "format_version",
            "byteorder",
            "version",
            "state_dict_metadata",
            "planner_data",
            "storage_data",
            "storage_meta",
        },
        "top level",
    )
    if o["format"] != FORMAT or o["format_version"] != FORMAT_VERSION or o["byteorder"] != "little":
        _fail("unsupported format/version/byteorder")
    if not isinstance(o["state_dict_metadata"], dict):
        _fail("state_dict_metadata")
    sdm = {_str(k, "fqn"): _dec_sdm(k, v) for k, v in o["state_dict_metadata"].items()}

    planner_data = None
    if o["planner_data"] is not None:
        if not isinstance(o["planner_data"], list):
            _fail("planner_data")
        planner_data = {}
        for e in o["planner_data"]:
            if not (
                isinstance(e, list)
                and len(e) == 2
                and isinstance(e[0], str)
                and isinstance(e[1], list)
                and all(type(p) is str or type(p) is int for p in e[1])
            ):
                _fail(f"planner_data entry {e!r:.200}")
            if e[0] in planner_data:
                _fail(f"duplicate planner_data key {e[0]!r}")
            planner_data[e[0]] = tuple(e[1])

    storage_data = None
    if o["storage_data"] is not None:
        if not isinstance(o["storage_data"], list):
            _fail("storage_data")
        storage_data = {}
        for e in o["storage_data"]:
            if not (isinstance(e, list) and len(e) == 2):
                _fail("storage_data entry")
            i = _dict(e[0], {"fqn", "offset", "index"}, "MetadataIndex")
            s = _dict(e[1], {"relative_path", "offset", "length", "transform_descriptors"}, "_StorageInfo")
            idx = MetadataIndex(
                fqn=_str(i["fqn"], "fqn"),
                offset=None if i["offset"] is None else _size(i["offset"], "index.offset"),
                index=None if i["index"] is None else _int(i["index"], "index.index"),
            )
            td = s["transform_descriptors"]
            if td is not None and not (isinstance(td, list) and all(isinstance(t, str) for t in td)):
                _fail("transform_descriptors")
            if idx in storage_data:
                _fail(f"duplicate storage_data key {idx}")
            storage_data[idx] = _StorageInfo(
                relative_path=_str(s["relative_path"], "relative_path"),
                offset=_int(s["offset"], "offset"),
                length=_int(s["length"], "length"),
                transform_descriptors=td,
            )

    storage_meta = None
    if o["storage_meta"] is not None:
        sm = _dict(o["storage_meta"], {"checkpoint_id", "save_id", "load_id", "modules"}, "storage_meta")
        cid = sm["checkpoint_id"]
        if isinstance(cid, dict):
            cid = Path(_str(_dict(cid, {"path"}, "checkpoint_id")["path"], "checkpoint_id"))
        else:
            cid = _str(cid, "checkpoint_id", optional=True)
        if not isinstance(sm["modules"], list):
            _fail("modules")
        storage_meta = StorageMeta(
            checkpoint_id=cid,
            save_id=_str(sm["save_id"], "save_id", optional=True),
            load_id=_str(sm["load_id"], "load_id", optional=True),
            modules=[_str(m, "module") for m in sm["modules"]],
        )
    return Metadata(
        state_dict_metadata=sdm,
        planner_data=planner_data,
        storage_data=storage_data,
        storage_meta=storage_meta,
        version=_str(o["version"], "version", optional=True),
    )


def loads(data: bytes) -> Metadata:
    o = json.loads(data.decode("utf-8"), object_pairs_hook=_no_dupes, parse_constant=_bad_const)
    return metadata_from_obj(o)
