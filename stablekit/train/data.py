"""Image/caption training data from a folder, a JSONL or parquet manifest, or webdataset shards.

Every source becomes a list of records (key, where the image bytes are, caption, metadata). Opening a source
reads captions and metadata, checks each image's header (cheap: no pixel decoding), and applies the filters;
pixels are decoded only when an example is asked for. A broken or missing image is skipped and counted, never
a crash: most are caught by the header check, and one that still fails to decode later (a truncated file, a
file changed under a running job) is replaced by the next readable record, deterministically, and counted.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from PIL import Image, ImageOps
from torch import Tensor

from stablekit.images import from_pil, to_rgb
from stablekit.train.filters import HEIGHT_COLUMNS, WIDTH_COLUMNS, Filters

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_TAR_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_CAPTION_KEYS = ("caption", "text", "TEXT", "prompt")
_IMAGE_KEYS = ("image", "file", "file_name", "path", "jpg", "png")


@dataclass(frozen=True)
class Example:
    image: Tensor  # (3, S, S) float32 in [-1, 1]
    caption: str
    key: str


# Where a record's image bytes live. Plain data rather than closures, so a dataset pickles into loader workers.
@dataclass(frozen=True)
class _TarMember:
    shard: Path
    offset: int  # of the member's data in the (uncompressed) tar file
    size: int


_Source = Path | bytes | _TarMember | None  # None: the row names no image at all


@contextmanager
def _open_bytes(src: _Source) -> Iterator[IO[bytes]]:
    if src is None:
        raise FileNotFoundError("no image in this record")
    if isinstance(src, bytes):
        yield io.BytesIO(src)
    elif isinstance(src, Path):
        with open(src, "rb") as f:
            yield f
    else:
        with open(src.shard, "rb") as f:
            f.seek(src.offset)
            yield io.BytesIO(f.read(src.size))


@dataclass
class _Record:
    key: str
    source: _Source
    caption: str | None
    meta: dict[str, Any]


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _from_folder(root: Path) -> list[_Record]:
    """Images found recursively, each with a same-stem ``.txt`` caption and optional ``.json`` metadata."""
    records = []
    for img in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        txt = img.with_suffix(".txt")
        caption = txt.read_text(encoding="utf-8").strip() if txt.exists() else None
        records.append(_Record(img.relative_to(root).as_posix(), img, caption, _read_json(img.with_suffix(".json"))))
    return records


def _from_row(row: Mapping[str, Any], base: Path, index: int) -> _Record:
    caption = next((str(row[k]).strip() for k in _CAPTION_KEYS if row.get(k) is not None), None)
    image = next((row[k] for k in _IMAGE_KEYS if row.get(k) is not None), None)
    meta = {k: v for k, v in row.items() if k not in _IMAGE_KEYS}
    if isinstance(image, dict):  # the Hugging Face datasets layout: {"bytes": ..., "path": ...}
        image = image.get("bytes") or image.get("path")
    key = str(row.get("key") or (image if isinstance(image, str) else f"row{index:08d}"))
    if isinstance(image, bytes | bytearray):
        return _Record(key, bytes(image), caption, meta)
    if isinstance(image, str):
        return _Record(key, base / image, caption, meta)
    return _Record(key, None, caption, meta)


def _from_jsonl(path: Path) -> list[_Record]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [_from_row(json.loads(line), path.parent, i) for i, line in enumerate(lines) if line.strip()]


def _from_parquet(path: Path) -> list[_Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ValueError(f"{path}: reading parquet needs pyarrow (pip install 'stablekit[train]')") from e
    rows = pq.read_table(path).to_pylist()
    return [_from_row(r, path.parent, i) for i, r in enumerate(rows)]


def _expand_braces(pattern: str) -> list[str]:
    """``shards-{000..009}.tar`` -> the ten names (zero padding kept), as webdataset spells shard sets."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if m is None:
        return [pattern]
    lo, hi = m.group(1), m.group(2)
    names = [pattern[: m.start()] + str(i).zfill(len(lo)) + pattern[m.end() :] for i in range(int(lo), int(hi) + 1)]
    return [n for name in names for n in _expand_braces(name)]


def _from_tar(path: Path, counts: dict[str, int]) -> list[_Record]:
    """webdataset layout: members grouped by key, the member name up to the first dot after the last slash.

    A shard that breaks part-way (a truncated download) keeps the complete members before the break and is
    counted under ``broken_shards``."""
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    file_size = path.stat().st_size
    broken = False
    try:
        with tarfile.open(path, "r:") as tar:  # uncompressed, as webdataset writes shards: members are seekable
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
        with open(path, "rb") as f:
            f.seek(end)
            broken = broken or f.read(512) != bytes(512)
    except tarfile.TarError:
        broken = True
    if broken:
        counts["broken_shards"] = counts.get("broken_shards", 0) + 1

    def text(member: tarfile.TarInfo) -> str:
        with _open_bytes(_TarMember(path, member.offset_data, member.size)) as f:
            return f.read().decode("utf-8")

    records = []
    for key, members in groups.items():
        image = next((members[e] for e in _TAR_IMAGE_EXTS if e in members), None)
        meta = json.loads(text(members["json"])) if "json" in members else {}
        caption = text(members["txt"]).strip() if "txt" in members else None
        if caption is None:
            caption = next((str(meta[k]).strip() for k in _CAPTION_KEYS if meta.get(k) is not None), None)
        source = None if image is None else _TarMember(path, image.offset_data, image.size)
        records.append(_Record(f"{path.name}/{key}", source, caption, meta))
    return records


def _records(source: str | Path, counts: dict[str, int]) -> list[_Record]:
    text = str(source)
    if "{" in text:
        return [r for name in _expand_braces(text) for r in _records(name, counts)]
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"training data not found: {path}")
    if path.is_dir():
        shards = sorted(path.glob("*.tar"))
        return [r for s in shards for r in _from_tar(s, counts)] if shards else _from_folder(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _from_jsonl(path)
    if suffix == ".parquet":
        return _from_parquet(path)
    if suffix == ".tar":
        return _from_tar(path, counts)
    raise ValueError(f"{path}: not a data source (a folder, .jsonl, .parquet, .tar or a shard pattern)")


def _header_size(src: _Source) -> tuple[int, int] | None:
    """The image's (width, height) from its header, or None if it cannot be opened as an image."""
    try:
        with _open_bytes(src) as f, Image.open(f) as im:
            return im.size
    except Exception:  # PIL reports corrupt files with many types (OSError, SyntaxError, struct.error, ...)
        return None


def _decode(src: _Source) -> Image.Image:
    with _open_bytes(src) as f, Image.open(f) as raw:
        raw.load()
        im = ImageOps.exif_transpose(raw)  # phone photos are stored sideways with an orientation tag
        # Transparent pixels hold arbitrary (often black) colour; show them as the page they'd sit on.
        return to_rgb(im)


def resize_crop(image: Image.Image, size: int) -> Image.Image:
    """Shorter side to ``size`` (bicubic; PIL widens the filter when shrinking, i.e. antialiases), then the
    centre ``size`` x ``size`` square."""
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return image.crop((left, top, left + size, top + size))


class ImageCaptionDataset(torch.utils.data.Dataset[Example]):
    """Map-style: ``len()`` and ``[i]`` in a fixed order (the source's, sorted for folders)."""

    def __init__(self, records: list[_Record], size: int, counts: dict[str, int]) -> None:
        self.records = records
        self.size = size
        self.counts = counts
        self._broken: set[int] = set()  # records that passed the header check but failed to decode

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Example:
        n = len(self.records)
        for offset in range(n):
            i = (index + offset) % n
            if i in self._broken:
                continue
            rec = self.records[i]
            try:
                image = _decode(rec.source)
            except Exception:  # see _header_size: a bad file must not end a training run
                self._broken.add(i)
                continue
            assert rec.caption is not None  # records without one were dropped when opening
            return Example(from_pil(resize_crop(image, self.size))[0], rec.caption, rec.key)
        raise ValueError("no readable image left in the dataset")

    def report(self) -> dict[str, int]:
        """Examples kept and what was dropped: per filter, ``no_caption``, ``unreadable`` (at open time) and
        ``unreadable_at_load`` (replaced since, in this process)."""
        return {"kept": len(self.records), **self.counts, "unreadable_at_load": len(self._broken)}


def open_dataset(source: str | Path, *, size: int, filters: Filters | None = None) -> ImageCaptionDataset:
    """Open a folder (images + same-stem .txt captions, recursive), a ``.jsonl`` or ``.parquet`` manifest (image
    path relative to the manifest, or inline bytes; ``caption``/``text``; metadata columns), or webdataset
    shards (a ``.tar``, a folder of them, or ``shards-{000..009}.tar``). Images become ``size`` x ``size``."""
    filters = filters or Filters()
    counts = {"unreadable": 0, "no_caption": 0, **filters.empty_counts()}
    records = _records(source, counts)
    kept = []
    for rec in records:
        wh = _header_size(rec.source)
        if wh is None:
            counts["unreadable"] += 1
            continue
        if not rec.caption:
            counts["no_caption"] += 1
            continue
        if not any(c in rec.meta for c in WIDTH_COLUMNS) or not any(c in rec.meta for c in HEIGHT_COLUMNS):
            # Without size columns the file's own size is the original's (LAION's columns win when present:
            # a downloader may have resized the file).
            rec.meta["width"], rec.meta["height"] = wh
        reason = filters.reject(rec.meta)
        if reason is None:
            kept.append(rec)
        else:
            counts[reason] += 1
    if not kept:
        raise ValueError(f"{source}: no usable examples ({counts if records else 'the source is empty'})")
    return ImageCaptionDataset(kept, size, counts)


def collate(batch: list[Example]) -> tuple[Tensor, list[str]]:
    """Examples -> (images (B, 3, S, S), captions)."""
    return torch.stack([e.image for e in batch]), [e.caption for e in batch]
