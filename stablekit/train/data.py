"""Image/caption training data from a folder, a JSONL or parquet manifest, or webdataset shards.

Every source becomes a list of records (key, how to read the image bytes, caption, metadata). Metadata filters
run when the dataset is opened; images are decoded lazily. An image that cannot be read is skipped and counted,
never a crash: its header is checked at open time, and one that still fails to decode later is replaced by the
next readable record (deterministically) and counted.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from stablekit.images import from_pil
from stablekit.train.filters import Filters, column

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_CAPTION_KEYS = ("caption", "text", "TEXT", "prompt")
_IMAGE_KEYS = ("image", "file", "file_name", "path", "jpg", "png")


@dataclass(frozen=True)
class Example:
    image: Tensor  # (3, S, S) float32 in [-1, 1]
    caption: str
    key: str


@dataclass
class _Record:
    key: str
    read: Callable[[], bytes]
    caption: str
    meta: dict[str, Any] = field(default_factory=dict)


def _file_reader(path: Path) -> Callable[[], bytes]:
    return path.read_bytes


def _bytes_reader(data: bytes) -> Callable[[], bytes]:
    return lambda: data


def _from_folder(root: Path) -> list[_Record]:
    records = []
    for img in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        txt = img.with_suffix(".txt")
        caption = txt.read_text(encoding="utf-8").strip() if txt.exists() else None
        meta_file = img.with_suffix(".json")
        meta = json.loads(meta_file.read_text(encoding="utf-8")) if meta_file.exists() else {}
        records.append(_Record(str(img.relative_to(root)), _file_reader(img), caption or "", meta))
    return records


def _from_row(row: Mapping[str, Any], base: Path, index: int) -> _Record:
    caption = next((str(row[k]) for k in _CAPTION_KEYS if row.get(k) is not None), "")
    image = next((row[k] for k in _IMAGE_KEYS if row.get(k) is not None), None)
    meta = {k: v for k, v in row.items() if k not in _IMAGE_KEYS}
    if isinstance(image, dict):  # the Hugging Face datasets layout: {"bytes": ..., "path": ...}
        image = image.get("bytes") or image.get("path")
    if isinstance(image, bytes | bytearray):
        return _Record(f"row{index}", _bytes_reader(bytes(image)), caption, meta)
    if isinstance(image, str):
        return _Record(image, _file_reader(base / image), caption, meta)
    return _Record(f"row{index}", _bytes_reader(b""), caption, meta)  # counted as unreadable


def _from_jsonl(path: Path) -> list[_Record]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [_from_row(r, path.parent, i) for i, r in enumerate(rows)]


def _from_parquet(path: Path) -> list[_Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # an optional extra: pip install 'stablekit[train]'
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


def _from_tar(path: Path) -> list[_Record]:
    """webdataset layout: members grouped by key (the name up to the first dot after the last slash)."""
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            folder, _, name = member.name.rpartition("/")
            key, _, ext = name.partition(".")
            groups.setdefault(f"{folder}/{key}" if folder else key, {})[ext.lower()] = member

    def read(member: tarfile.TarInfo) -> bytes:
        with tarfile.open(path) as tar:
            f = tar.extractfile(member)
            return f.read() if f is not None else b""

    records = []
    for key, members in groups.items():
        image = next((members[e] for e in ("jpg", "jpeg", "png", "webp") if e in members), None)
        caption = read(members["txt"]).decode("utf-8").strip() if "txt" in members else ""
        meta = json.loads(read(members["json"])) if "json" in members else {}
        reader = (lambda m=image: read(m)) if image is not None else _bytes_reader(b"")
        records.append(_Record(f"{path.name}/{key}", reader, caption, meta))
    return records


def _records(source: str | Path) -> list[_Record]:
    text = str(source)
    if "{" in text:
        return [r for name in _expand_braces(text) for r in _records(name)]
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"training data not found: {path}")
    if path.is_dir():
        shards = sorted(path.glob("*.tar"))
        return [r for s in shards for r in _from_tar(s)] if shards else _from_folder(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _from_jsonl(path)
    if suffix == ".parquet":
        return _from_parquet(path)
    if suffix == ".tar":
        return _from_tar(path)
    raise ValueError(f"{path}: not a data source (a folder, .jsonl, .parquet, .tar or a shard pattern)")


def _decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB")


def resize_crop(image: Image.Image, size: int) -> Image.Image:
    """Shorter side to ``size`` (bicubic; PIL antialiases when shrinking), then the centre square."""
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return image.crop((left, top, left + size, top + size))


class ImageCaptionDataset(torch.utils.data.Dataset[Example]):
    def __init__(self, records: list[_Record], size: int, counts: Counter[str]) -> None:
        self.records = records
        self.size = size
        self.counts = counts

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Example:
        for offset in range(len(self.records)):
            rec = self.records[(index + offset) % len(self.records)]
            try:
                image = _decode(rec.read())
            except (OSError, UnidentifiedImageError, ValueError):
                self.counts["unreadable at load"] += 1
                continue
            return Example(from_pil(resize_crop(image, self.size))[0], rec.caption, rec.key)
        raise ValueError("no readable image left in the dataset")

    def report(self) -> dict[str, int]:
        """Examples kept, and how many each filter or failure dropped."""
        return {"kept": len(self.records), **dict(self.counts)}


def open_dataset(source: str | Path, *, size: int, filters: Filters | None = None) -> ImageCaptionDataset:
    records = _records(source)
    counts: Counter[str] = Counter()
    readable = []
    for rec in records:
        try:
            with Image.open(io.BytesIO(rec.read())) as im:
                w, h = im.size  # header only: cheap
        except (OSError, UnidentifiedImageError, ValueError):
            counts["unreadable"] += 1
            continue
        if not rec.caption:
            counts["no caption"] += 1
            continue
        if column(rec.meta, "width") is None or column(rec.meta, "height") is None:
            # No size columns: the file's own size serves the min_size filter (LAION's WIDTH/HEIGHT are the
            # original image's, which a downloader may have resized, so they win when present).
            rec.meta["width"], rec.meta["height"] = w, h
        readable.append(rec)
    if filters is not None and filters.active:
        kept_meta, dropped = filters.apply([r.meta for r in readable])
        keep = {id(m) for m in kept_meta}
        readable = [r for r in readable if id(r.meta) in keep]
        counts.update(dropped)
    if not readable:
        raise ValueError(f"{source}: no usable examples ({dict(counts) or 'the source is empty'})")
    return ImageCaptionDataset(readable, size, counts)


def collate(batch: list[Example]) -> tuple[Tensor, list[str]]:
    return torch.stack([e.image for e in batch]), [e.caption for e in batch]
