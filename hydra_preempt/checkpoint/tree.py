"""Split a nested state into a JSON skeleton and a flat list of arrays, and join them back.

A state is what `state_dict()` methods return: dicts, lists, tuples, None,
bool, int, float, str, torch tensors and NumPy arrays. Loading builds only
these types, so a checkpoint cannot run code (no pickle anywhere).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch

from ..errors import UnsupportedStateError

_TENSOR, _NDARRAY, _TUPLE, _DICT = "__tensor__", "__ndarray__", "__tuple__", "__dict__"
_MARKERS = frozenset({_TENSOR, _NDARRAY, _TUPLE, _DICT})

Array = Union[torch.Tensor, np.ndarray]


@dataclass(frozen=True)
class ArraySpec:
    """Where one array's bytes lie in the data file and how to rebuild it."""

    kind: str  # "torch" or "numpy"
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    def to_json(self) -> dict:
        return {
            "kind": self.kind,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "offset": self.offset,
            "nbytes": self.nbytes,
        }

    @classmethod
    def from_json(cls, d: dict) -> ArraySpec:
        return cls(d["kind"], d["dtype"], tuple(int(n) for n in d["shape"]), int(d["offset"]), int(d["nbytes"]))


def flatten(tree: Any) -> tuple[Any, list[Array]]:
    """Return (skeleton, arrays): the skeleton is JSON-able; arrays are on the host, contiguous.

    CUDA tensors are copied to pinned host memory (one synchronize at the
    end), so the returned arrays are a snapshot that a writer may consume
    later while training goes on. CPU tensors are not copied.
    """
    arrays: list[Array] = []
    has_cuda = [False]

    def encode(value: Any, path: str) -> Any:
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, np.generic):
            return value
        if isinstance(value, np.generic):  # NumPy scalar: keep its value, as a Python scalar
            return value.item()
        if isinstance(value, torch.Tensor):
            arrays.append(_host_tensor(value, path, has_cuda))
            return {_TENSOR: len(arrays) - 1}
        if isinstance(value, np.ndarray):
            if value.dtype.hasobject:
                raise UnsupportedStateError(
                    f"state at '{path}' is a NumPy array of Python objects, which cannot be stored without pickle"
                )
            arrays.append(np.ascontiguousarray(value))
            return {_NDARRAY: len(arrays) - 1}
        if isinstance(value, tuple):
            return {_TUPLE: [encode(v, f"{path}.{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [encode(v, f"{path}.{i}") for i, v in enumerate(value)]
        if isinstance(value, dict):
            if all(isinstance(k, str) for k in value) and not (_MARKERS & value.keys()):
                return {k: encode(v, f"{path}.{k}") for k, v in value.items()}
            return {_DICT: [[encode(k, f"{path}.<key>"), encode(v, f"{path}.{k}")] for k, v in value.items()]}
        raise UnsupportedStateError(
            f"state at '{path}' has type {type(value).__name__}, which a checkpoint cannot store; "
            "state_dict() values must be tensors, arrays, numbers, strings, None, or lists/tuples/dicts of them"
        )

    skeleton = encode(tree, "state")
    if has_cuda[0]:
        torch.cuda.synchronize()
    return skeleton, arrays


def _host_tensor(t: torch.Tensor, path: str, has_cuda: list[bool]) -> torch.Tensor:
    if t.is_sparse or t.is_quantized or t.device.type == "meta" or t.is_nested:
        raise UnsupportedStateError(f"tensor at '{path}' has an unsupported layout ({t.layout}, {t.device.type})")
    t = t.detach()
    if t.device.type != "cpu":
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=torch.cuda.is_available())
        host.copy_(t, non_blocking=True)
        has_cuda[0] = True
        return host
    return t.contiguous()


def unflatten(skeleton: Any, arrays: list[Array]) -> Any:
    def decode(node: Any) -> Any:
        if isinstance(node, list):
            return [decode(v) for v in node]
        if isinstance(node, dict):
            if len(node) == 1:
                ((key, value),) = node.items()
                if key in (_TENSOR, _NDARRAY):
                    return arrays[value]
                if key == _TUPLE:
                    return tuple(decode(v) for v in value)
                if key == _DICT:
                    return {_hashable(decode(k)): decode(v) for k, v in value}
            return {k: decode(v) for k, v in node.items()}
        return node

    return decode(skeleton)


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, (list, tuple)) else key


def array_bytes(array: Array) -> memoryview:
    """The raw bytes of a contiguous host array, without a copy (any dtype, bfloat16 included)."""
    if isinstance(array, torch.Tensor):
        flat = array.reshape(-1)
        if flat.numel() == 0:
            return memoryview(b"")
        return flat.view(torch.uint8).numpy().data
    return array.reshape(-1).view(np.uint8).data


def array_spec(array: Array, offset: int) -> ArraySpec:
    if isinstance(array, torch.Tensor):
        return ArraySpec(
            "torch",
            str(array.dtype).removeprefix("torch."),
            tuple(array.shape),
            offset,
            array.numel() * array.element_size(),
        )
    return ArraySpec("numpy", array.dtype.str, tuple(array.shape), offset, array.nbytes)


def empty_array(spec: ArraySpec) -> tuple[Array, memoryview]:
    """An uninitialised array for `spec` and a writable byte view of it to read into."""
    if spec.kind == "torch":
        dtype = getattr(torch, spec.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown torch dtype {spec.dtype!r}")
        t = torch.empty(spec.shape, dtype=dtype)
        return t, (array_bytes(t) if spec.nbytes else memoryview(bytearray()))
    if spec.kind == "numpy":
        a = np.empty(spec.shape, dtype=np.dtype(spec.dtype))
        if a.dtype.hasobject:
            raise ValueError("object arrays are not allowed")
        return a, a.reshape(-1).view(np.uint8).data
    raise ValueError(f"unknown array kind {spec.kind!r}")
