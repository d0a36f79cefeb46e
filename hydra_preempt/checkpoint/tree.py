"""Split a nested state into a JSON skeleton and a flat list of arrays, and join them back.

A state is what `state_dict()` methods return: dicts, lists, tuples, None,
bool, int, float, str, torch tensors and NumPy arrays. Loading builds only
these types, so a checkpoint cannot run code (no pickle anywhere).
"""

from __future__ import annotations

import math
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
    def from_json(cls, d: Any) -> ArraySpec:
        """Raises ValueError/TypeError/KeyError on anything but the form `to_json` writes."""
        if not isinstance(d, dict) or d.get("kind") not in ("torch", "numpy") or not isinstance(d.get("dtype"), str):
            raise ValueError(f"bad array description {d!r:.80}")
        shape, numbers = d["shape"], (d["offset"], d["nbytes"])
        if not isinstance(shape, list) or not all(_is_count(n) for n in (*shape, *numbers)):
            raise ValueError(f"bad shape, offset or size in {d!r:.80}")
        return cls(d["kind"], d["dtype"], tuple(shape), *numbers)

    @property
    def itemsize(self) -> int:
        if self.kind == "torch":
            dtype = getattr(torch, self.dtype, None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"unknown torch dtype {self.dtype!r:.40}")
            return dtype.itemsize
        dtype = np.dtype(self.dtype)
        if dtype.kind not in NUMPY_KINDS or dtype.str != self.dtype:
            raise ValueError(f"unsupported NumPy dtype {self.dtype!r:.40}")
        return dtype.itemsize


NUMPY_KINDS = "biufc"  # NumPy arrays of plain numbers only: no objects, records or dates
MAX_DEPTH = 100  # containers inside containers: deeper states are refused on save and corrupt on load


def _is_count(n: Any) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 0


def check_layout(specs: list[ArraySpec], data_size: int) -> None:
    """The arrays lie one after the other and fill exactly `data_size` bytes, each of the size its
    dtype and shape give, so that reading them allocates no more than the (verified) data file holds."""
    position = 0
    for spec in specs:
        if spec.offset != position:
            raise ValueError("the arrays are not laid out one after the other")
        if math.prod(spec.shape) * spec.itemsize != spec.nbytes:
            raise ValueError(f"an array of shape {spec.shape} and dtype {spec.dtype} is not {spec.nbytes} bytes")
        position += spec.nbytes
        if position > data_size:
            raise ValueError(f"the arrays need more than the {data_size} bytes of the data file")
    if position != data_size:
        raise ValueError(f"the arrays fill {position} of the {data_size} bytes of the data file")


def flatten(
    tree: Any, staging: HostStaging | None = None, later: frozenset[int] = frozenset()
) -> tuple[Any, list[Array]]:
    """Return (skeleton, arrays): the skeleton is JSON-able; arrays are on the host, contiguous.

    CUDA tensors are copied to pinned host memory (one synchronize at the
    end), so the returned arrays are a snapshot that a writer may consume
    later while training goes on. CPU tensors are not copied.

    With `staging`, every array is copied into its reused host buffers
    instead, CUDA ones without waiting (`staging.wait()` before reading);
    CPU tensors whose data_ptr() is in `later` are copied by
    `staging.copy_later()` instead (another thread, while training goes on).
    """
    arrays: list[Array] = []
    has_cuda = [False]

    def encode(value: Any, path: str, depth: int = 0) -> Any:
        if depth > MAX_DEPTH:
            raise UnsupportedStateError(f"state at '{path}' is nested more than {MAX_DEPTH} containers deep")
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, np.generic):
            return value
        if isinstance(value, np.generic):  # NumPy scalar: keep its value, as a Python scalar
            return value.item()
        if isinstance(value, torch.Tensor):
            if staging is not None:
                _check_layout(value, path)
                defer = value.device.type == "cpu" and value.data_ptr() in later
                arrays.append(staging.copy(len(arrays), value.detach(), defer))
            else:
                arrays.append(_host_tensor(value, path, has_cuda))
            return {_TENSOR: len(arrays) - 1}
        if isinstance(value, np.ndarray):
            if value.dtype.kind not in NUMPY_KINDS:
                raise UnsupportedStateError(
                    f"state at '{path}' is a NumPy array of dtype {value.dtype}; a checkpoint stores arrays of "
                    "numbers (Python objects would need pickle)"
                )
            arrays.append(staging.copy(len(arrays), value) if staging else np.ascontiguousarray(value))
            return {_NDARRAY: len(arrays) - 1}
        inner = depth + 1
        if isinstance(value, tuple):
            return {_TUPLE: [encode(v, f"{path}.{i}", inner) for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [encode(v, f"{path}.{i}", inner) for i, v in enumerate(value)]
        if isinstance(value, dict):
            if all(isinstance(k, str) for k in value) and not (_MARKERS & value.keys()):
                return {k: encode(v, f"{path}.{k}", inner) for k, v in value.items()}
            return {
                _DICT: [[encode(k, f"{path}.<key>", inner), encode(v, f"{path}.{k}", inner)] for k, v in value.items()]
            }
        raise UnsupportedStateError(
            f"state at '{path}' has type {type(value).__name__}, which a checkpoint cannot store; "
            "state_dict() values must be tensors, arrays, numbers, strings, None, or lists/tuples/dicts of them"
        )

    skeleton = encode(tree, "state")
    if staging is not None:
        staging.copied(len(arrays))
    elif has_cuda[0]:
        torch.cuda.synchronize()
    return skeleton, arrays


class HostStaging:
    """Host buffers a state is copied into for a background write, kept from one save to the next.

    Allocating and page-faulting fresh memory costs about 5x a copy into
    memory touched before (measured: ~260 vs ~50 ms per GB), and pinned
    memory is slower still to allocate, so the buffers of one state are
    kept: one state's worth of host memory for the life of the run. A
    buffer is reused while its array keeps its dtype and shape. CUDA tensors
    go to pinned buffers with non-blocking copies ordered on the current
    stream; `wait()` (the writer, before it reads) waits for them.
    """

    def __init__(self) -> None:
        self._buffers: list[Array] = []
        self._event: Any = None
        self._later: list[tuple[torch.Tensor, torch.Tensor]] = []  # (buffer, source) to copy later
        self._versions: list[tuple[torch.Tensor, int]] = []  # (source, its version counter at the capture)

    def copy(self, index: int, array: Array, later: bool = False) -> Array:
        """`array` in buffer `index`; `later`: not copied yet, but by copy_later() (a CPU tensor that
        stays as it is until then)."""
        old = self._buffers[index] if index < len(self._buffers) else None
        if isinstance(array, torch.Tensor):
            if not (isinstance(old, torch.Tensor) and old.shape == array.shape and old.dtype == array.dtype):
                old = torch.empty(array.shape, dtype=array.dtype, pin_memory=array.is_cuda)
            if later:
                self._later.append((old, array))
                self._versions.append((array, array._version))
            else:
                old.copy_(array, non_blocking=array.is_cuda)
        else:
            if not (isinstance(old, np.ndarray) and old.shape == array.shape and old.dtype == array.dtype):
                old = np.empty(array.shape, dtype=array.dtype)
            np.copyto(old, array)
        if index < len(self._buffers):
            self._buffers[index] = old
        else:
            self._buffers.append(old)
        return old

    @property
    def copies_left(self) -> bool:
        return bool(self._later)

    def copy_later(self) -> None:
        """Copy what copy() left for later (the writer thread, while training goes on)."""
        later, self._later = self._later, []
        if later:  # one call: the GIL is released once, not taken back between tensors from a busy training thread
            torch._foreach_copy_([buffer for buffer, _ in later], [source for _, source in later])

    def changed_since_capture(self) -> list[str]:
        """The sources copied later whose version counter moved since the capture: their copy may hold
        another state, or a torn one. Sound only on the thread that changes them (training), once
        every in-place operation it began has returned: a counter moves when its operation ends."""
        versions, self._versions = self._versions, []
        return [f"{tuple(source.shape)} {source.dtype}" for source, version in versions if source._version != version]

    def copied(self, count: int) -> None:
        """The state had `count` arrays: drop buffers beyond them; mark the point the copies must reach."""
        del self._buffers[count:]
        self._event = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self._event = torch.cuda.Event()
            self._event.record()

    def wait(self) -> None:
        if self._event is not None:
            self._event.synchronize()

    @property
    def nbytes(self) -> int:
        return sum(array_bytes(b).nbytes for b in self._buffers)


def _check_layout(t: torch.Tensor, path: str) -> None:
    if t.is_sparse or t.is_quantized or t.device.type == "meta" or t.is_nested:
        raise UnsupportedStateError(f"tensor at '{path}' has an unsupported layout ({t.layout}, {t.device.type})")


def _host_tensor(t: torch.Tensor, path: str, has_cuda: list[bool]) -> torch.Tensor:
    _check_layout(t, path)
    t = t.detach()
    if t.device.type != "cpu":
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=torch.cuda.is_available())
        host.copy_(t, non_blocking=True)
        has_cuda[0] = True
        return host
    return t.contiguous()


def unflatten(skeleton: Any, arrays: list[Array]) -> Any:
    """The tree `flatten` split. Raises ValueError/TypeError on a skeleton it could not have written:
    an array index out of range, used twice or of the other kind, a malformed marker, an unhashable
    dict key, nesting deeper than MAX_DEPTH."""
    used: set[int] = set()

    def array(index: Any, kind: type) -> Array:
        if not (_is_count(index) and index < len(arrays)) or index in used or not isinstance(arrays[index], kind):
            raise ValueError(f"bad array reference {index!r:.40}")
        used.add(index)
        return arrays[index]

    def decode(node: Any, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise ValueError(f"nested more than {MAX_DEPTH} containers deep")
        inner = depth + 1
        if isinstance(node, list):
            return [decode(v, inner) for v in node]
        if not isinstance(node, dict):
            return node
        if len(node) == 1 and _MARKERS & node.keys():
            ((key, value),) = node.items()
            if key == _TENSOR:
                return array(value, torch.Tensor)
            if key == _NDARRAY:
                return array(value, np.ndarray)
            if not isinstance(value, list):
                raise ValueError(f"{key} holds {type(value).__name__}, not a list")
            if key == _TUPLE:
                return tuple(decode(v, inner) for v in value)
            if not all(isinstance(pair, list) and len(pair) == 2 for pair in value):
                raise ValueError(f"{_DICT} holds something other than [key, value] pairs")
            return {_hashable(decode(k, inner)): decode(v, inner) for k, v in value}
        return {k: decode(v, inner) for k, v in node.items()}

    return decode(skeleton, 0)


def _hashable(key: Any) -> Any:
    key = tuple(_hashable(k) for k in key) if isinstance(key, (list, tuple)) else key
    hash(key)  # TypeError for a dict or an array: not a key flatten could have written
    return key


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
    spec.itemsize  # noqa: B018 (raises on a dtype we would not write)
    if spec.kind == "torch":
        t = torch.empty(spec.shape, dtype=getattr(torch, spec.dtype))
        return t, (array_bytes(t) if spec.nbytes else memoryview(bytearray()))
    if spec.kind == "numpy":
        a = np.empty(spec.shape, dtype=np.dtype(spec.dtype))
        return a, a.reshape(-1).view(np.uint8).data
    raise ValueError(f"unknown array kind {spec.kind!r}")
