"""The one check of a sharded checkpoint's metadata against its files (shard_layout.check_shard_layout)."""

import copy
import json

import pytest
import torch
import xxhash
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)

from hydra_preempt.checkpoint.layout import CHECKSUM, SHARDS_METADATA
from hydra_preempt.checkpoint.shard_layout import (
    HEADER_SIZE,
    ShardedFormatError,
    ShardHeader,
    check_shard_layout,
    items_digest,
)
from hydra_preempt.checkpoint.sharded import load_shards, read_shards_metadata, save_shards

F0, F1 = "shard-00000.bin", "shard-00001.bin"


def two_ranks(header=True):
    """A (4, 3) float32 weight split by rows over two ranks' files, and a JSON value in rank 0's."""
    start = HEADER_SIZE if header else 0
    props = TensorProperties(dtype=torch.float32)
    weight = TensorStorageMetadata(
        properties=props,
        size=torch.Size([4, 3]),
        chunks=[
            ChunkStorageMetadata(offsets=torch.Size([0, 0]), sizes=torch.Size([2, 3])),
            ChunkStorageMetadata(offsets=torch.Size([2, 0]), sizes=torch.Size([2, 3])),
        ],
    )
    storage = {
        MetadataIndex("w", torch.Size([0, 0])): _StorageInfo(F0, start, 24),
        MetadataIndex("lr"): _StorageInfo(F0, start + 24, 5),
        MetadataIndex("w", torch.Size([2, 0])): _StorageInfo(F1, start, 24),
    }
    metadata = Metadata(state_dict_metadata={"w": weight, "lr": BytesStorageMetadata()}, storage_data=storage)
    sizes = {F0: start + 29, F1: start + 24, SHARDS_METADATA: 100}
    headers = {
        F0: ShardHeader(
            0,
            items_digest(
                [("w", (0, 0), (2, 3), "torch.float32", start, 24), ("lr", None, None, "bytes", start + 24, 5)]
            ),
        ),
        F1: ShardHeader(1, items_digest([("w", (2, 0), (2, 3), "torch.float32", start, 24)])),
    }
    return metadata, sizes, headers if header else {F0: None, F1: None}


def test_a_layout_as_written_passes_with_and_without_headers():
    check_shard_layout(*two_ranks())
    check_shard_layout(*two_ranks(header=False))  # checkpoints written before the header existed


def drop_chunk(m, s, h):
    m.state_dict_metadata["w"].chunks.pop(1)
    del m.storage_data[MetadataIndex("w", torch.Size([2, 0]))]


def empty_chunk(m, s, h):
    m.state_dict_metadata["w"].chunks[1] = ChunkStorageMetadata(torch.Size([2, 0]), torch.Size([0, 3]))
    m.storage_data[MetadataIndex("w", torch.Size([2, 0]))] = _StorageInfo(F1, HEADER_SIZE, 0)


def overlap(m, s, h):
    m.state_dict_metadata["w"].chunks[1] = ChunkStorageMetadata(torch.Size([1, 0]), torch.Size([2, 3]))
    info = m.storage_data.pop(MetadataIndex("w", torch.Size([2, 0])))
    m.storage_data[MetadataIndex("w", torch.Size([1, 0]))] = info


def dtype(name):
    def edit(m, s, h):
        m.state_dict_metadata["w"].properties.dtype = getattr(torch, name)

    return edit


def unlisted_file(m, s, h):
    m.storage_data[MetadataIndex("w", torch.Size([2, 0]))] = _StorageInfo("shard-00007.bin", HEADER_SIZE, 24)


def swapped(m, s, h):
    h[F0], h[F1] = h[F1], h[F0]


def offset(value):
    def edit(m, s, h):
        m.storage_data[MetadataIndex("w", torch.Size([2, 0]))] = _StorageInfo(F1, value, 24)

    return edit


def huge_shape(rows):
    def edit(m, s, h):
        w = m.state_dict_metadata["w"]
        w.size = torch.Size([rows, 3])
        w.chunks[1] = ChunkStorageMetadata(torch.Size([2, 0]), torch.Size([rows - 2, 3]))

    return edit


def missing_key(m, s, h):
    del m.state_dict_metadata["lr"]
    del m.storage_data[MetadataIndex("lr")]


def padded(m, s, h):
    s[F1] += 8


@pytest.mark.parametrize(
    "edit, message",
    [
        (drop_chunk, "do not cover"),
        (empty_chunk, "do not cover its shape"),
        (overlap, "overlap"),
        (dtype("int32"), "does not describe the items rank 0 wrote"),
        (dtype("complex32"), "which a model's state does not hold"),
        (dtype("qint32"), "which a model's state does not hold"),
        (unlisted_file, "a file the manifest does not list"),
        (swapped, "written by rank 1, not by rank 0"),
        (offset(10**6), "lies past the end"),
        (offset(10**400), "lies past the end"),
        (huge_shape(2**40), "fits no chunk"),
        (huge_shape(10**400), "fits no chunk"),
        (missing_key, "do not cover it exactly once"),
        (padded, "do not cover it exactly once"),
    ],
)
def test_metadata_that_disagrees_with_the_files_is_refused_in_one_line(edit, message):
    metadata, sizes, headers = two_ranks()
    edit(metadata, sizes, headers)
    with pytest.raises(ShardedFormatError, match=message) as caught:
        check_shard_layout(metadata, sizes, headers)
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 200


# -- a property over random edits of a real shards.json --------------------------------------------
def state():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.ones(2, 3)).sum().backward()
    optimizer.step()
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optim_state}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sharded")
    files = save_shards(directory, state()).files
    return directory, files, json.loads((directory / SHARDS_METADATA).read_bytes())


def leaves(node, path=()):
    """Every (path, value) of scalars in a JSON document."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield from leaves(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from leaves(v, (*path, i))
    else:
        yield path, node


def find(document, path):
    for key in path:
        document = document[key]
    return document


replacements = st.one_of(
    st.integers(-3, 40),
    st.sampled_from([2**31, 2**40, 2**63, 10**400, -(10**400)]),
    st.sampled_from(["torch.int32", "torch.complex32", "torch.qint32", "torch.bfloat16", "torch.float64"]),
    st.sampled_from(["shard-00007.bin", "shard-00001.bin", "tensors.bin", "", None, True, [], {}]),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_random_edits_of_shards_json_never_load_other_values_and_never_crash(saved, tmp_path_factory, data):
    directory, files, document = saved
    edited = copy.deepcopy(document)
    for _ in range(data.draw(st.integers(1, 3))):
        path, _ = data.draw(st.sampled_from(sorted(leaves(edited), key=repr)))
        node = edited
        for key in path[:-1]:
            node = node[key]
        if data.draw(st.booleans()):
            node[path[-1]] = data.draw(replacements)
        else:  # remove an element of a list on the path (a chunk, a storage entry, a dimension)
            lists = [p for p in (path[:i] for i in range(len(path))) if isinstance(find(edited, p), list)]
            if lists:
                container = find(edited, data.draw(st.sampled_from(lists)))
                if container:
                    container.pop(data.draw(st.integers(0, len(container) - 1)))
    target = tmp_path_factory.mktemp("edited")
    for name in files:
        if name != SHARDS_METADATA:
            (target / name).write_bytes((directory / name).read_bytes())
    blob = json.dumps(edited).encode()
    (target / SHARDS_METADATA).write_bytes(blob)
    signed = {**files, SHARDS_METADATA: {"size": len(blob), CHECKSUM: xxhash.xxh3_128_hexdigest(blob)}}
    try:
        metadata = read_shards_metadata(target, signed)
    except ShardedFormatError as e:
        assert "\n" not in str(e)
        event("refused")
        return
    event("loaded")
    template = state()
    for value in template["model"].values():
        value.zero_()
    load_shards(target, metadata, template)  # checked metadata: loads, and only the values saved
    expected = state()
    for key, value in expected["model"].items():
        assert torch.equal(template["model"][key], value), key
    for fqn, moments in expected["optimizer"]["state"].items():
        for name, value in moments.items():
            assert torch.equal(template["optimizer"]["state"][fqn][name], value), (fqn, name)
