"""Reading and writing single checkpoint files, safely.

The format is decided by a file's first bytes, never its name: safetensors (an 8-byte little-endian header
length, then a JSON header), a torch zip archive (``PK``), or a legacy torch pickle stream (``\\x80``).
A safetensors header is validated against the file size before anything is allocated, and torch pickles go
through :mod:`stablekit.weights.pickle_safe`, which never imports what a file names. Every failure is a
:class:`CheckpointError` naming the file and what is wrong with it.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from math import prod
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from stablekit.atomic import WriteError, replacing_file
from stablekit.weights.pickle_safe import Placeholder, Unpickled, load_legacy, load_zip

FileFormat = Literal["safetensors", "torch-zip", "torch-legacy"]

# The safetensors reference implementation refuses headers above 100 MB; a real SD header is ~100 kB.
MAX_HEADER_BYTES = 100 * 2**20

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

# First bytes of files people mistake for checkpoints, for a useful message.
_KNOWN_MAGIC = {
    b"\x89PNG": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"GGUF": "a GGUF file (llama.cpp/stable-diffusion.cpp format)",
    b"version https://git-lfs": "a Git LFS pointer (the weights were never downloaded)",
    b"<": "an HTML/XML page",
    b"{": "a JSON document",
}


class CheckpointError(ValueError):
    """A file cannot be read as a checkpoint; the message names the file and the problem."""


def one_line(what: object, limit: int = 300) -> str:
    # A library's message quotes the file's own bytes (a pickled class name, a header string): keep it one
    # bounded line, so that a hostile file cannot flood or forge the lines of a log.
    text = str(what).replace("\r", "\\r").replace("\n", "\\n")
    return text if len(text) <= limit else text[:limit] + "..."


@dataclass
class Checkpoint:
    """What a file holds: tensors (absent when only shapes were read), shapes and dtypes always."""

    path: str
    format: FileFormat
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    tensors: dict[str, Tensor] | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    global_step: int | None = None
    notes: list[str] = field(default_factory=list)


def sniff(path: str) -> FileFormat:
    """The container format from the first bytes; :class:`CheckpointError` if it is none we read."""
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file")
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            # Opening a named pipe blocks until someone writes to it; a device may never end.
            raise CheckpointError(f"{path}: not a regular file (a named pipe, device or socket)")
        size = st.st_size
        with open(path, "rb") as f:
            head = f.read(32)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open: {e.strerror or e}") from e
    if size == 0:
        raise CheckpointError(f"{path}: file is empty (0 bytes)")
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "torch-zip"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "torch-legacy"
    for magic, what in _KNOWN_MAGIC.items():
        if head.startswith(magic):
            raise CheckpointError(f"{path}: this is {what}, not a checkpoint")
    if len(head) < 9:
        raise CheckpointError(f"{path}: only {size} bytes, too short for any checkpoint format")
    raise CheckpointError(f"{path}: not a safetensors, torch zip or torch pickle file (first bytes {head[:8]!r})")


def _safetensors_header(path: str) -> tuple[dict[str, Any], dict[str, str]]:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            raise CheckpointError(
                f"{path}: safetensors header claims {n} bytes but the file has only {size - 8} after the "
                "length (truncated or not safetensors)"
            )
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: safetensors header of {n} bytes is absurdly large")
        raw = f.read(n)
    try:
        header = json.loads(raw, object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON: {e}") from e
    except _DuplicateKey as e:
        raise CheckpointError(f"{path}: safetensors header names {e.args[0]!r} twice") from e
    except RecursionError as e:  # json recurses once per nesting level; "[[[[..." is no header anyway
        raise CheckpointError(f"{path}: safetensors header is nested too deeply to be a header") from e
    except ValueError as e:  # valid JSON that Python refuses to hold: an integer of over 4300 digits
        raise CheckpointError(f"{path}: safetensors header cannot be read: {one_line(e)}") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{path}: safetensors __metadata__ must map strings to strings")
    data_len = size - 8 - n
    for name, entry in header.items():
        _check_entry(path, name, entry, data_len)
    _check_layout(path, header, data_len)
    return header, meta


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json keeps the last of two equal names silently; two tensors under one name is a damaged header.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _check_layout(path: str, header: dict[str, Any], data_len: int) -> None:
    """The tensors tile the data section exactly, as the reference library requires: sorted by offset, each
    starts where the previous ended, and the last ends at the end of the file."""
    end, prev = 0, None
    for name, entry in sorted(header.items(), key=lambda kv: tuple(kv[1]["data_offsets"])):
        start, stop = entry["data_offsets"]
        if start < end:
            raise CheckpointError(f"{path}: safetensors entries {prev!r} and {name!r} overlap")
        if start > end:
            raise CheckpointError(f"{path}: safetensors data has a gap of {start - end} bytes before {name!r}")
        end, prev = stop, name
    if end != data_len:
        raise CheckpointError(f"{path}: {data_len - end} bytes after the last safetensors tensor")


def _check_entry(path: str, name: str, entry: Any, data_len: int) -> None:
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: safetensors entry {name!r}: {why}")

    if not isinstance(entry, dict):
        raise bad("not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:  # a list or object is unhashable
        raise bad(f"unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
        raise bad(f"bad shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise bad(f"bad data_offsets {offsets!r}")
    if offsets[1] > data_len:
        raise bad(f"data ends at byte {offsets[1]} but the file holds {data_len} data bytes (truncated?)")
    if offsets[1] - offsets[0] != prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize:
        raise bad(f"{offsets[1] - offsets[0]} bytes do not hold shape {shape} of {dtype}")


def _read_safetensors(path: str, shapes_only: bool) -> Checkpoint:
    header, meta = _safetensors_header(path)
    ckpt = Checkpoint(
        path,
        "safetensors",
        shapes={k: tuple(e["shape"]) for k, e in header.items()},
        dtypes={k: SAFETENSORS_DTYPES[e["dtype"]] for k, e in header.items()},
        metadata=dict(meta),
    )
    if not shapes_only:
        try:
            with safe_open(path, framework="pt") as f:
                ckpt.tensors = {k: f.get_tensor(k) for k in header}
        except Exception as e:  # the library's own checks (overlapping offsets...) after ours
            raise CheckpointError(f"{path}: safetensors data cannot be read: {one_line(e)}") from e
    return ckpt


def _read_torch(path: str, fmt: FileFormat) -> Checkpoint:
    try:
        got: Unpickled = load_zip(path) if fmt == "torch-zip" else load_legacy(path)
    except Exception as e:  # anything a malformed or hostile stream raises while we parse it
        kind = "torch zip checkpoint" if fmt == "torch-zip" else "legacy torch checkpoint"
        detail = f"{type(e).__name__}: {one_line(e)}" if str(e) else type(e).__name__  # MemoryError has no text
        raise CheckpointError(f"{path}: cannot read {kind}: {detail}") from e
    obj, notes = got.obj, []
    if got.placeholders:
        notes.append(
            f"the pickle names {len(got.placeholders)} object type(s) that were not imported (not weights): "
            + ", ".join(got.placeholders[:6])
        )
    global_step = None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        step = obj.get("global_step")
        if type(step) is int:
            global_step = step
        elif step is not None:
            notes.append(f"global_step is a {type(step).__name__}, ignored")
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        what = repr(obj) if isinstance(obj, Placeholder) else type(obj).__name__
        raise CheckpointError(f"{path}: the pickle holds {one_line(what)}, not a state dict")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}
    others = [str(k) for k in obj if k not in tensors]
    if others:
        notes.append(f"{len(others)} non-tensor entr(y/ies) skipped: {', '.join(others[:5])}")
    return Checkpoint(
        path,
        fmt,
        shapes={k: tuple(t.shape) for k, t in tensors.items()},
        dtypes={k: t.dtype for k, t in tensors.items()},
        tensors=tensors,
        global_step=global_step,
        notes=notes,
    )


def read_checkpoint(path: str | os.PathLike[str], *, shapes_only: bool = False) -> Checkpoint:
    """Read a checkpoint file. ``shapes_only`` reads just the safetensors header (torch pickles must be
    unpickled either way, but their storages are only mapped, not read)."""
    path = os.fspath(path)
    fmt = sniff(path)
    ckpt = _read_safetensors(path, shapes_only) if fmt == "safetensors" else _read_torch(path, fmt)
    if shapes_only:
        ckpt.tensors = None
    return ckpt


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """All tensors of a checkpoint file (``state_dict`` unwrapped), by original key."""
    tensors = read_checkpoint(path).tensors
    assert tensors is not None
    return tensors


def read_shapes(path: str | os.PathLike[str]) -> dict[str, tuple[int, ...]]:
    return read_checkpoint(path, shapes_only=True).shapes


def write_safetensors(
    path: str | os.PathLike[str], tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Write ``tensors`` atomically (a temporary file renamed into place, so a source mapped from the same
    path stays valid while we write)."""
    path = os.fspath(path)
    seen: set[int] = set()
    flat: dict[str, Tensor] = {}
    for key, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        # safetensors refuses tensors that share memory (tied or sliced weights); give each its own copy.
        flat[key] = t.clone() if ptr in seen and t.numel() else t
        seen.add(ptr)
    with replacing_file(path) as tmp:
        try:
            save_file(flat, tmp, metadata=dict(metadata or {}))
        except Exception as e:  # the library's SafetensorError wraps the OS error (a full disk, a quota)
            raise WriteError(f"cannot write {path}: {e}") from e
