"""Reading torch pickle checkpoints (``.ckpt``/``.bin``/``.pt``) without running anything they name.

A pickle may name any importable global and call it; ``sd-v1-4.ckpt`` names pytorch_lightning callbacks,
and a hostile file could name ``os.system``. Our unpickler resolves a short allowlist to *our own*
functions (tensor rebuilding that validates offsets and sizes against the storage, storage dtypes,
``OrderedDict``) and turns every other global into an inert :class:`Placeholder` that records its name and
arguments but never imports or calls anything.

Two container layouts are read: the zip archive torch has written since 1.6 (``data.pkl`` plus one member
per storage, memory-mapped copy-on-write so nothing is read until used) and the older single-stream
layout (magic number, protocol, sys-info and data pickles, then the raw storages in key order).
"""

from __future__ import annotations

import io
import mmap
import pickle
import pickletools
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
}
_DTYPES = {str(d).removeprefix("torch."): d for d in vars(torch).values() if isinstance(d, torch.dtype)}


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle stream is malformed or tries something a checkpoint never needs."""


class Placeholder:
    """Stands in for a pickled object of a class we refuse to import; keeps what the pickle gave it."""

    module = ""
    name = ""
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    state: Any
    items: list[Any]

    def __new__(cls, *args: Any, **kwargs: Any) -> Placeholder:
        self = object.__new__(cls)
        self.args = args
        self.kwargs = kwargs
        self.state = None
        self.items = []
        return self

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items.append((key, value))

    def append(self, value: Any) -> None:
        self.items.append(value)

    def extend(self, values: Any) -> None:
        self.items.extend(values)

    def __repr__(self) -> str:
        return f"<not loaded: {self.module}.{self.name}>"


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


class _Storage:
    """A storage named by a persistent id; its bytes are attached once known (at once for zip files,
    after the data pickle for legacy files)."""

    def __init__(self, key: str, dtype: torch.dtype, numel: int) -> None:
        self.key = key
        self.dtype = dtype
        self.nbytes = numel * dtype.itemsize
        self.raw: Tensor | None = None  # (nbytes,) uint8

    def typed(self, dtype: torch.dtype) -> Tensor:
        assert self.raw is not None
        raw = self.raw
        if raw.data_ptr() % dtype.itemsize:
            raw = raw.clone()  # unaligned member: reinterpreting in place would be unaligned access
        usable = raw.numel() - raw.numel() % dtype.itemsize
        return raw[:usable].view(dtype)


@dataclass
class TensorRef:
    """A tensor as the pickle describes it; built only after its storage bytes are attached."""

    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype

    def build(self) -> Tensor:
        data = self.storage.typed(self.dtype)
        if any(s == 0 for s in self.size):
            return torch.empty(self.size, dtype=self.dtype)
        extent = self.offset + sum((n - 1) * st for n, st in zip(self.size, self.stride, strict=True)) + 1
        if extent > data.numel():
            raise UnsafePickleError(
                f"tensor of size {self.size} at offset {self.offset} runs past its storage "
                f"{self.storage.key!r} ({data.numel()} elements)"
            )
        return data.as_strided(self.size, self.stride, self.offset)


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple | list) or not all(type(v) is int and v >= 0 for v in value):
        raise UnsafePickleError(f"{what} must be a sequence of non-negative ints, got {value!r}")
    return tuple(value)


def _tensor_ref(storage: Any, offset: Any, size: Any, stride: Any, dtype: torch.dtype | None = None) -> TensorRef:
    if not isinstance(storage, _Storage):
        raise UnsafePickleError(f"tensor rebuilt from {type(storage).__name__}, not a file storage")
    if type(offset) is not int or offset < 0:
        raise UnsafePickleError(f"bad storage offset {offset!r}")
    size_t, stride_t = _ints(size, "size"), _ints(stride, "stride")
    if len(size_t) != len(stride_t):
        raise UnsafePickleError(f"size {size_t} and stride {stride_t} differ in length")
    return TensorRef(storage, offset, size_t, stride_t, dtype or storage.dtype)


def _rebuild_v1(storage: Any, offset: Any, size: Any, stride: Any) -> TensorRef:
    return _tensor_ref(storage, offset, size, stride)


def _rebuild_v2(storage: Any, offset: Any, size: Any, stride: Any, *_grad_hooks_meta: Any) -> TensorRef:
    return _tensor_ref(storage, offset, size, stride)


def _rebuild_v3(
    storage: Any, offset: Any, size: Any, stride: Any, _grad: Any, _hooks: Any, dtype: Any, *_meta: Any
) -> TensorRef:
    if not isinstance(dtype, torch.dtype):
        raise UnsafePickleError(f"_rebuild_tensor_v3 got dtype {dtype!r}")
    return _tensor_ref(storage, offset, size, stride, dtype)


def _rebuild_parameter(data: Any, *_grad_hooks_state: Any) -> Any:
    return data


def _rebuild_from_type(func: Any, _new_type: Any, args: Any, _state: Any) -> Any:
    # Tensor subclasses (Parameter) pickle as "rebuild a plain tensor, then retype it"; keep the tensor.
    if func in _REBUILDERS and isinstance(args, tuple):
        return func(*args)
    return Placeholder(func, args)


_REBUILDERS: set[Callable[..., Any]] = {_rebuild_v1, _rebuild_v2, _rebuild_v3, _rebuild_parameter}
_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_v1,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type,
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    **{("torch", n): _StorageType(d) for n, d in _STORAGE_DTYPES.items()},
    # Untyped storages count bytes; _rebuild_tensor_v3 then names the element dtype.
    ("torch.storage", "UntypedStorage"): _StorageType(torch.uint8),
    **{("torch", n): d for n, d in _DTYPES.items()},
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, stream: io.IOBase, storage: Callable[[str, torch.dtype, int], _Storage]) -> None:
        super().__init__(stream)
        self._storage = storage
        self.placeholders: set[str] = set()

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED.get((module, name))
        if allowed is not None:
            return allowed
        self.placeholders.add(f"{module}.{name}")
        return type(name, (Placeholder,), {"module": module, "name": name})

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and pid[:1] == ("module",):
            return Placeholder(*pid)  # legacy files pickle nn.Module sources this way
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise UnsafePickleError(f"unknown persistent id {pid!r:.80}")
        _, kind, key, _location, numel, *view = pid
        if not isinstance(kind, _StorageType) or not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise UnsafePickleError(f"malformed storage id {pid!r:.80}")
        if view and view[0] is not None:
            raise UnsafePickleError("legacy storage views are not supported")
        return self._storage(key, kind.dtype, numel)


def _resolve(obj: Any, depth: int = 0) -> Any:
    """Build every tensor reference reachable through plain containers."""
    if isinstance(obj, TensorRef):
        return obj.build()
    if depth > 4:
        return obj
    if isinstance(obj, dict):
        return {k: _resolve(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_resolve(v, depth + 1) for v in obj)
    return obj


@dataclass
class Unpickled:
    obj: Any
    placeholders: list[str] = field(default_factory=list)


# torch writes every member uncompressed; a deflated member comes from a re-zipped file. Its bytes cost memory
# (a stored member is only mapped), so inflation is bounded: never past the size the pickle declares for the
# storage, and in total to what a plausible compression ratio allows. Deflate can reach ~1000:1 on zeros, which
# is how a 2 MB file claims gigabytes; real weights deflate to about 0.9 of their size.
MAX_INFLATION_RATIO = 32
INFLATION_FLOOR = 64 * 2**20  # bytes any file may inflate to, so a small, legitimately sparse file still loads
MAX_PICKLE_BYTES = 256 * 2**20  # data.pkl of a full SD checkpoint is well under 1 MB


def _inflate_budget(path_size: int) -> int:
    return INFLATION_FLOOR + MAX_INFLATION_RATIO * path_size


def _member_view(mm: mmap.mmap, zf: zipfile.ZipFile, info: zipfile.ZipInfo, nbytes: int) -> Tensor:
    """The first ``nbytes`` of a member: a copy-on-write view of the mapped file when stored uncompressed
    (torch's default), else inflated, stopping at ``nbytes`` whatever the member holds."""
    if info.compress_type == zipfile.ZIP_DEFLATED:
        with zf.open(info) as member:
            data = member.read(nbytes)
        if len(data) < nbytes:
            raise UnsafePickleError(f"zip member {info.filename} inflates to fewer bytes than it declares")
        return torch.frombuffer(bytearray(data), dtype=torch.uint8) if nbytes else torch.empty(0, dtype=torch.uint8)
    if info.compress_type != zipfile.ZIP_STORED:
        raise UnsafePickleError(f"zip member {info.filename}: compression method {info.compress_type} is not read")
    header = mm[info.header_offset : info.header_offset + 30]
    if len(header) < 30 or header[:4] != b"PK\x03\x04":
        raise UnsafePickleError(f"zip member {info.filename} has no local header")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    start = info.header_offset + 30 + name_len + extra_len
    if start + info.file_size > len(mm):
        raise UnsafePickleError(f"zip member {info.filename} runs past the end of the file (truncated?)")
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(mm, dtype=torch.uint8, count=nbytes, offset=start)


def load_zip(path: str) -> Unpickled:
    """Unpickle ``data.pkl`` of a torch zip checkpoint; storages map lazily onto their members."""
    with open(path, "rb") as f, zipfile.ZipFile(f) as zf:
        pickles = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise UnsafePickleError(f"expected one <name>/data.pkl in the archive, found {len(pickles)}")
        root = pickles[0].removesuffix("data.pkl")
        order = zf.NameToInfo.get(root + "byteorder")
        if order and order.file_size < 16 and zf.read(order) == b"big":
            raise UnsafePickleError("big-endian checkpoints are not supported")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        storages: dict[str, _Storage] = {}
        budget = _inflate_budget(len(mm))

        def storage(key: str, dtype: torch.dtype, numel: int) -> _Storage:
            nonlocal budget
            if key in storages:
                return storages[key]
            info = zf.NameToInfo.get(f"{root}data/{key}")
            if info is None:
                raise UnsafePickleError(f"storage {key!r} has no member in the archive")
            st = _Storage(key, dtype, numel)
            if info.file_size < st.nbytes:
                raise UnsafePickleError(f"storage {key!r} needs {st.nbytes} bytes, member has {info.file_size}")
            if info.compress_type != zipfile.ZIP_STORED:
                # Checked before inflating anything; the sum also covers members that share compressed bytes.
                budget -= st.nbytes
                if budget < 0:
                    raise UnsafePickleError(
                        f"compressed storages would inflate past {_inflate_budget(len(mm))} bytes, "
                        f"{MAX_INFLATION_RATIO}x the file's size: refused as a zip bomb"
                    )
            st.raw = _member_view(mm, zf, info, st.nbytes)
            storages[key] = st
            return st

        info = zf.NameToInfo[pickles[0]]
        if info.file_size > MAX_PICKLE_BYTES:
            raise UnsafePickleError(f"{pickles[0]} declares {info.file_size} bytes; a checkpoint's is under 1 MB")
        with zf.open(info) as stream:  # zipfile stops inflating at the declared size
            data = stream.read()
        _scan(io.BytesIO(data))
        unpickler = _Unpickler(io.BytesIO(data), storage)  # type: ignore[arg-type]
        obj = unpickler.load()
        return Unpickled(_resolve(obj), sorted(unpickler.placeholders))


_MEMO_PUTS = ("PUT", "BINPUT", "LONG_BINPUT")


def _scan(stream: Any) -> int:
    """Parse one pickle without running anything; the offset just past its STOP.

    ``stream`` must answer a read past its end with fewer bytes (an mmap, a BytesIO), so a length the pickle
    declares beyond the data is an error, not an allocation of that size. Memo indices must be ones a pickler
    assigns (each new one the next integer): CPython's unpickler sizes its memo by the largest index it sees, so
    ``LONG_BINPUT 0x7fffffff`` in a 9-byte pickle would otherwise allocate gigabytes.
    """
    puts = 0
    try:
        for op, arg, at in pickletools.genops(stream):
            if op.name in _MEMO_PUTS:
                if not isinstance(arg, int) or arg > puts:
                    raise UnsafePickleError(f"memo index {arg} at byte {at}: a pickler numbers them from 0")
                puts += arg == puts
            elif op.name == "MEMOIZE":
                puts += 1
            elif op.name == "STOP":
                return (at or 0) + 1
    except (ValueError, struct.error, EOFError) as e:  # pickletools' word for a malformed or truncated stream
        raise UnsafePickleError(f"malformed pickle: {e}") from e
    raise UnsafePickleError("pickle stream has no end (truncated?)")


def load_legacy(path: str) -> Unpickled:
    """Read the pre-zip single-stream layout (``torch.save(..., _use_new_zipfile_serialization=False)``)."""
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        return _legacy(f, mm)


def _legacy(f: io.BufferedReader, mm: mmap.mmap) -> Unpickled:
    placeholders: set[str] = set()

    def next_pickle(storage: Callable[[str, torch.dtype, int], _Storage] | None = None) -> Any:
        # Find where this pickle ends without executing it (genops only parses), then unpickle exactly that. The
        # scan reads the mapping, not the file: a file object would allocate whatever length a pickle declares.
        start = f.tell()
        mm.seek(start)
        end = _scan(mm)
        unpickler = _Unpickler(io.BytesIO(mm[start:end]), storage or _no_storage)  # type: ignore[arg-type]
        f.seek(end)
        obj = unpickler.load()
        placeholders.update(unpickler.placeholders)
        return obj

    if next_pickle() != _LEGACY_MAGIC:
        raise UnsafePickleError("not a torch checkpoint (bad magic number)")
    if next_pickle() != _LEGACY_PROTOCOL:
        raise UnsafePickleError("unsupported legacy torch protocol version")
    sys_info = next_pickle()
    if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
        raise UnsafePickleError("big-endian checkpoints are not supported")
    storages: dict[str, _Storage] = {}

    def storage(key: str, dtype: torch.dtype, numel: int) -> _Storage:
        return storages.setdefault(key, _Storage(key, dtype, numel))

    obj = next_pickle(storage)
    keys = next_pickle()
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise UnsafePickleError("malformed storage key list")
    pos = f.tell()
    for key in keys:
        if key not in storages:
            raise UnsafePickleError(f"storage {key!r} is listed but never used")
        st = storages[key]
        if pos + 8 > len(mm):
            raise UnsafePickleError("file ends inside the storage records (truncated?)")
        (numel,) = struct.unpack("<q", mm[pos : pos + 8])
        nbytes = numel * st.dtype.itemsize
        if numel < 0 or nbytes < st.nbytes or pos + 8 + nbytes > len(mm):
            raise UnsafePickleError(f"storage {key!r} record is inconsistent with the file (truncated?)")
        st.raw = (
            torch.frombuffer(mm, dtype=torch.uint8, count=st.nbytes, offset=pos + 8)
            if st.nbytes
            else (torch.empty(0, dtype=torch.uint8))
        )
        pos += 8 + nbytes
    missing = [k for k, s in storages.items() if s.raw is None]
    if missing:
        raise UnsafePickleError(f"storages {missing[:3]} have no data in the file")
    return Unpickled(_resolve(obj), sorted(placeholders))


def _no_storage(key: str, dtype: torch.dtype, numel: int) -> _Storage:
    raise UnsafePickleError("a header pickle refers to a storage")
