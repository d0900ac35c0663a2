"""Reading training sources into records: folders, JSONL and parquet manifests, webdataset shards.

Nothing here trusts a file. Every file is opened only if it is a regular file (a named pipe would block the run
forever waiting for a writer; a device could be read without end), text must be UTF-8, metadata a JSON object.
A sample whose own file fails (a caption, a sidecar, a manifest line) is skipped with a one-line warning naming
the file and the reason, and counted; a source that fails as a whole (a manifest or shard that cannot be read)
is a :class:`DataError` naming it. Skips depend on the files alone, so every epoch and every resumed run sees
the same samples.
"""

from __future__ import annotations

import json
import os
import re
import stat
import sys
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")  # .bmp is found so that its refusal is reported
_TAR_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_CAPTION_KEYS = ("caption", "text", "TEXT", "prompt")
_IMAGE_KEYS = ("image", "file", "file_name", "path", "jpg", "png")
# A caption is a sentence and a sidecar a few numbers: a bigger file is a mistake, not something to hold in memory.
MAX_TEXT_BYTES = 1 << 20
# Warnings past this many are counted but not printed: a crawl with thousands of dead links must not bury the log.
MAX_WARNINGS = 100


class DataError(ValueError):
    """A training source that cannot be used at all: unreadable, or without one usable example."""


class BadSample(Exception):
    """One sample's file cannot be used; ``where`` names the file (and line or member), ``reason`` says why."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where}: {reason}")
        self.where, self.reason = where, reason


class Skips:
    """Counts of dropped samples by kind, with a one-line warning on stderr for each unreadable one."""

    def __init__(self, counts: dict[str, int]) -> None:
        self.counts = counts
        self.warned = 0

    def skip(self, kind: str, where: str, reason: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if self.warned < MAX_WARNINGS:
            print(f"stablekit train: skipping {one_line(where)}: {one_line(reason)}", file=sys.stderr)
        elif self.warned == MAX_WARNINGS:
            print("stablekit train: more unreadable samples are counted, not listed", file=sys.stderr)
        self.warned += 1


def one_line(text: str) -> str:
    """``text`` with control characters escaped: a file name holding a newline must not split a warning."""
    return _CONTROL.sub(lambda m: ascii(m.group())[1:-1], text)


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


# Where a record's image bytes live. Plain data rather than closures, so a dataset pickles into loader workers.
@dataclass(frozen=True)
class TarMember:
    shard: Path
    offset: int  # of the member's data in the (uncompressed) tar file
    size: int


Source = Path | bytes | TarMember | None  # None: the row names no image at all


@dataclass
class Record:
    key: str
    source: Source
    caption: str | None
    meta: dict[str, Any]
    where: str  # the image's place, for messages: a path, a manifest row, a member of a shard


def _reason(e: OSError) -> str:
    return e.strerror or str(e)


def open_regular(path: Path) -> IO[bytes]:
    """``path`` opened for reading, if it is a regular file (else OSError). The type is checked before opening,
    so a device is never opened, and again on the descriptor, opened non-blocking so that a file swapped for a
    named pipe in between cannot block."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise OSError(f"not a regular file ({_kind(path)})")
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except ValueError as e:  # a NUL byte in the path
        raise OSError(f"invalid path ({e})") from e
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError("not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _kind(path: Path) -> str:
    mode = os.stat(path).st_mode
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a file"


def _text(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8-sig")  # -sig: a byte-order mark (Notepad writes one) is not part of the text
    except UnicodeDecodeError as e:
        raise BadSample(where, f"not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start})") from e


def _meta(data: bytes, where: str) -> dict[str, Any]:
    try:
        meta = json.loads(_text(data, where))
    except json.JSONDecodeError as e:
        raise BadSample(where, f"malformed JSON ({e.msg} at line {e.lineno} column {e.colno})") from e
    except RecursionError as e:
        raise BadSample(where, "malformed JSON (nested too deeply)") from e
    if not isinstance(meta, dict):
        raise BadSample(where, f"not a JSON object of metadata (a JSON {type(meta).__name__})")
    return meta


def _read_small(path: Path) -> bytes:
    try:
        with open_regular(path) as f:
            data = f.read(MAX_TEXT_BYTES + 1)
    except OSError as e:
        raise BadSample(str(path), _reason(e)) from e
    if len(data) > MAX_TEXT_BYTES:
        raise BadSample(str(path), f"larger than {MAX_TEXT_BYTES:,} bytes")
    return data


def _caption_of(row: Mapping[str, Any], where: str) -> str | None:
    for k in _CAPTION_KEYS:
        value = row.get(k)
        if value is None:
            continue
        if not isinstance(value, str):
            raise BadSample(where, f"caption {k!r} is a {type(value).__name__}, not text")
        return value.strip()
    return None


def _from_folder(root: Path, skips: Skips) -> list[Record]:
    """Images found recursively, each with a same-stem ``.txt`` caption and optional ``.json`` metadata."""
    try:
        found = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())
    except OSError as e:
        raise DataError(f"{root}: cannot list the folder ({_reason(e)})") from e
    records = []
    for img in found:
        txt, sidecar = img.with_suffix(".txt"), img.with_suffix(".json")
        try:
            # lexists: a dangling link is a caption that cannot be read, not a missing one.
            caption = _text(_read_small(txt), str(txt)).strip() if os.path.lexists(txt) else None
            meta = _meta(_read_small(sidecar), str(sidecar)) if os.path.lexists(sidecar) else {}
        except BadSample as e:
            skips.skip("unreadable_text", e.where, e.reason)
            continue
        records.append(Record(img.relative_to(root).as_posix(), img, caption, meta, str(img)))
    return records


def _from_row(row: Mapping[str, Any], base: Path, index: int, where: str) -> Record:
    caption = _caption_of(row, where)
    image = next((row[k] for k in _IMAGE_KEYS if row.get(k) is not None), None)
    meta = {k: v for k, v in row.items() if k not in _IMAGE_KEYS}
    if isinstance(image, dict):  # the Hugging Face datasets layout: {"bytes": ..., "path": ...}
        image = image.get("bytes") or image.get("path")
    key = str(row.get("key") or (image if isinstance(image, str) else f"row{index:08d}"))
    if isinstance(image, bytes | bytearray):
        return Record(key, bytes(image), caption, meta, where)
    if isinstance(image, str):
        return Record(key, base / image, caption, meta, f"{base / image} ({where})")
    return Record(key, None, caption, meta, where)


def _open_source(path: Path) -> IO[bytes]:
    try:
        return open_regular(path)
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({_reason(e)})") from e


def _from_jsonl(path: Path, skips: Skips) -> list[Record]:
    records = []
    with _open_source(path) as f:
        try:
            lines = list(f)  # bytes: each line decodes on its own, so one bad line costs one sample
        except OSError as e:
            raise DataError(f"{path}: cannot read it ({_reason(e)})") from e
    for n, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        where = f"{path} line {n}"
        try:
            records.append(_from_row(_meta(raw, where), path.parent, n - 1, where))
        except BadSample as e:
            skips.skip("unreadable_text", e.where, e.reason)
    return records


def _from_parquet(path: Path, skips: Skips) -> list[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError(f"{path}: reading parquet needs pyarrow (pip install 'stablekit[train]')") from e
    with _open_source(path) as f:
        try:
            rows = pq.read_table(f).to_pylist()
        except Exception as e:  # pyarrow reports a damaged file with several types (ArrowInvalid, OSError, ...)
            raise DataError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from e
    records = []
    for i, row in enumerate(rows):
        try:
            records.append(_from_row(row, path.parent, i, f"{path} row {i}"))
        except BadSample as e:
            skips.skip("unreadable_text", e.where, e.reason)
    return records


def expand_braces(pattern: str) -> list[str]:
    """``shards-{000..009}.tar`` -> the ten names (zero padding kept), as webdataset spells shard sets."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if m is None:
        return [pattern]
    lo, hi = m.group(1), m.group(2)
    names = [pattern[: m.start()] + str(i).zfill(len(lo)) + pattern[m.end() :] for i in range(int(lo), int(hi) + 1)]
    return [n for name in names for n in expand_braces(name)]


def _from_tar(path: Path, skips: Skips) -> list[Record]:
    """webdataset layout: members grouped by key, the member name up to the first dot after the last slash.

    A shard that breaks part-way (a truncated download) keeps the complete members before the break and is
    counted under ``broken_shards``."""
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    broken = False
    records = []
    with _open_source(path) as f:
        file_size = os.fstat(f.fileno()).st_size
        try:
            with tarfile.open(fileobj=f, mode="r:") as tar:  # uncompressed, as webdataset writes: seekable members
                for member in tar:
                    if member.offset_data + member.size > file_size:
                        broken = True
                        break
                    if member.isfile():
                        folder, _, name = member.name.rpartition("/")
                        key, _, ext = name.partition(".")
                        groups.setdefault(f"{folder}/{key}" if folder else key, {})[ext.lower()] = member
                end = tar.offset
            # tarfile stops quietly at an invalid header; a whole archive ends with a zero block instead.
            f.seek(end)
            broken = broken or f.read(512) != bytes(512)
        except tarfile.TarError:
            broken = True
        except OSError as e:
            raise DataError(f"{path}: cannot read it ({_reason(e)})") from e

        def member_bytes(member: tarfile.TarInfo) -> bytes:
            if member.size > MAX_TEXT_BYTES:
                raise BadSample(f"{member.name} in {path}", f"larger than {MAX_TEXT_BYTES:,} bytes")
            try:
                f.seek(member.offset_data)
                return f.read(member.size)
            except OSError as e:  # a bad sector, a network filesystem gone away
                raise BadSample(f"{member.name} in {path}", _reason(e)) from e

        for key, members in groups.items():
            image = next((members[e] for e in _TAR_IMAGE_EXTS if e in members), None)
            sidecar, txt = members.get("json"), members.get("txt")
            try:
                meta = _meta(member_bytes(sidecar), f"{sidecar.name} in {path}") if sidecar else {}
                caption = _text(member_bytes(txt), f"{txt.name} in {path}").strip() if txt else None
                if caption is None and sidecar:
                    caption = _caption_of(meta, f"{sidecar.name} in {path}")
            except BadSample as e:
                skips.skip("unreadable_text", e.where, e.reason)
                continue
            source = None if image is None else TarMember(path, image.offset_data, image.size)
            where = f"{image.name} in {path}" if image is not None else f"{key} in {path}"
            records.append(Record(f"{path.name}/{key}", source, caption, meta, where))
    if broken:
        skips.counts["broken_shards"] = skips.counts.get("broken_shards", 0) + 1
    return records


def read_records(source: str | Path, skips: Skips) -> list[Record]:
    """Every record of ``source``, in its order (sorted for folders), less those whose text cannot be read."""
    text = str(source)
    if "{" in text:
        return [r for name in expand_braces(text) for r in read_records(name, skips)]
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"training data not found: {path}")
    if path.is_dir():
        shards = sorted(p for p in path.glob("*.tar") if not p.is_dir())
        return [r for s in shards for r in _from_tar(s, skips)] if shards else _from_folder(path, skips)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _from_jsonl(path, skips)
    if suffix == ".parquet":
        return _from_parquet(path, skips)
    if suffix == ".tar":
        return _from_tar(path, skips)
    raise DataError(f"{path}: not a data source (a folder, .jsonl, .parquet, .tar or a shard pattern)")
