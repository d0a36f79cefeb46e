"""The pickle-free sharded format: DCP's Metadata as JSON (exact round trip), non-tensor values as JSON."""

import json
import math

import pytest
import torch
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from hydra_preempt.checkpoint import dcp_metadata
from hydra_preempt.checkpoint.layout import CHECKSUM, SHARDS_METADATA
from hydra_preempt.checkpoint.sharded import (
    ShardedFormatError,
    decode_value,
    encode_value,
    load_shards,
    read_shards_metadata,
    save_shards,
)


def strict_equal(a, b, path="metadata"):
    """Equality that also requires the same types (torch.Size vs tuple, tuple vs list) and index hints."""
    assert type(a) is type(b), f"{path}: {type(a)} != {type(b)}"
    if isinstance(a, dict):
        assert list(a) == list(b), f"{path}: keys differ"
        for (ka, va), kb in zip(a.items(), b):
            strict_equal(ka, kb, f"{path}.key")
            strict_equal(va, b[kb], f"{path}[{ka!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            strict_equal(x, y, f"{path}[{i}]")
    elif hasattr(a, "__dataclass_fields__"):
        for name in a.__dataclass_fields__:
            strict_equal(getattr(a, name), getattr(b, name), f"{path}.{name}")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def sample_state():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)).to(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, betas=(0.8, 0.9))
    model(torch.ones(2, 3, dtype=torch.bfloat16)).sum().backward()
    optimizer.step()
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optim_state, "extra": {"flag": True, "ints": torch.arange(5)}}


def test_a_real_metadata_round_trips_exactly(tmp_path):
    files = save_shards(tmp_path, sample_state()).files
    data = (tmp_path / SHARDS_METADATA).read_bytes()
    metadata = dcp_metadata.loads(data)
    assert dcp_metadata.dumps(metadata) == data
    strict_equal(dcp_metadata.loads(dcp_metadata.dumps(metadata)), metadata)
    assert files[SHARDS_METADATA]["size"] == len(data)
    assert not (tmp_path / ".metadata").exists()  # DCP's pickled metadata is never written


def test_sharded_state_reads_back_bit_for_bit(tmp_path):
    state = sample_state()
    files = save_shards(tmp_path, state).files
    metadata = read_shards_metadata(tmp_path, files)
    template = sample_state()
    for t in (template["model"]["0.weight"], template["extra"]["ints"]):
        t.zero_()
    template["optimizer"]["param_groups"][0]["lr"] = 1.0
    load_shards(tmp_path, metadata, template)
    assert torch.equal(template["model"]["0.weight"], state["model"]["0.weight"])
    assert torch.equal(template["extra"]["ints"], state["extra"]["ints"])
    assert template["optimizer"]["param_groups"][0]["lr"] == 0.01
    assert template["optimizer"]["param_groups"][0]["betas"] == (0.8, 0.9)  # a tuple, as saved


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(format="other"),
        lambda d: d["state_dict_metadata"].update({"x": {"type": "tensor"}}),
        lambda d: d["state_dict_metadata"][next(iter(d["state_dict_metadata"]))].update(type="code"),
        lambda d: d["storage_data"][0][1].update(relative_path="../../etc/passwd"),
        lambda d: d["storage_data"][0][1].update(length=10**12),
        lambda d: d.update(storage_data=None),
    ],
)
def test_malformed_metadata_is_refused_before_any_read(tmp_path, mutate):
    files = save_shards(tmp_path, sample_state()).files
    document = json.loads((tmp_path / SHARDS_METADATA).read_bytes())
    mutate(document)
    data = json.dumps(document).encode()
    (tmp_path / SHARDS_METADATA).write_bytes(data)
    files[SHARDS_METADATA] = {"size": len(data), CHECKSUM: xxhash.xxh3_128_hexdigest(data)}
    with pytest.raises(ShardedFormatError):
        read_shards_metadata(tmp_path, files)


def test_metadata_that_does_not_match_the_manifest_is_not_parsed(tmp_path):
    files = save_shards(tmp_path, sample_state()).files
    files[SHARDS_METADATA] = {**files[SHARDS_METADATA], CHECKSUM: "0" * 32}
    with pytest.raises(ShardedFormatError, match="size and checksum"):
        read_shards_metadata(tmp_path, files)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.tuples(inner, inner) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=10,
)


def same(a, b):
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return type(b) is dict and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


@given(json_values)
def test_non_tensor_values_round_trip_with_their_types(value):
    assert same(decode_value(encode_value(value)), value)


def test_values_json_cannot_hold_are_refused_at_save():
    with pytest.raises(TypeError):
        encode_value({"f": object()})
    with pytest.raises(ShardedFormatError):
        decode_value(b'{"$code": "os.system"}')
