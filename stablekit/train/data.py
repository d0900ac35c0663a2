"""Image/caption training data from a folder, a JSONL or parquet manifest, or webdataset shards.

Every source becomes a list of records (key, where the image bytes are, caption, metadata; see
:mod:`stablekit.train.sources`). Opening a source reads captions and metadata, checks each image's header (cheap:
no pixel decoding), and applies the filters; pixels are decoded only when an example is asked for. A sample whose
files cannot be read (a broken image, a caption that is not UTF-8, a sidecar that is not a JSON object, a named
pipe) is skipped with a one-line warning naming the file, and counted, never a crash: most are caught when the
source opens, and an image that still fails to decode later (a truncated file, a file changed under a running
job) is replaced by the next readable record. Both depend on the files alone, so every epoch and every resumed
run draws the same examples. Images are read by the package's input decoders only (PNG, JPEG, WebP) under its
pixel cap, as every other input is (:func:`stablekit.images.load_image`).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from stablekit.images import INPUT_FORMATS, MAX_INPUT_PIXELS, from_pil, to_rgb
from stablekit.train.filters import HEIGHT_COLUMNS, WIDTH_COLUMNS, Filters
from stablekit.train.sources import DataError, Record, Skips, Source, one_line, open_regular, read_records

__all__ = ["DataError", "Example", "ImageCaptionDataset", "collate", "open_dataset", "resize_crop"]


@dataclass(frozen=True)
class Example:
    image: Tensor  # (3, S, S) float32 in [-1, 1]
    caption: str
    key: str


class _BadImage(Exception):
    pass


def _image_file(src: Source) -> IO[bytes]:
    try:
        if src is None:
            raise _BadImage("the record names no image")
        if isinstance(src, bytes):
            return io.BytesIO(src)
        if isinstance(src, Path):
            return open_regular(src)
        with open_regular(src.shard) as f:
            f.seek(src.offset)
            return io.BytesIO(f.read(src.size))
    except OSError as e:
        raise _BadImage(e.strerror or str(e)) from e


def _open_image(f: IO[bytes]) -> Image.Image:
    """The image in ``f``, its header read (no pixels), by the input decoders and under the pixel cap, or
    _BadImage saying why not: the rules of :func:`stablekit.images.load_image`, which reads paths only."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(f, formats=INPUT_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _BadImage(f"over the {MAX_INPUT_PIXELS:,}-pixel limit for inputs ({e})") from e
    except UnidentifiedImageError as e:
        raise _BadImage("not a PNG, JPEG or WebP image") from e
    except Exception as e:  # PIL reports a corrupt header with many types (OSError, SyntaxError, struct.error, ...)
        raise _BadImage(f"corrupt ({type(e).__name__}: {e})") from e
    w, h = im.size
    if w * h > MAX_INPUT_PIXELS or w < 1 or h < 1:
        im.close()
        raise _BadImage(f"empty ({w}x{h})" if w * h == 0 else f"{w}x{h}, over the {MAX_INPUT_PIXELS:,}-pixel limit")
    return im


def _header_size(src: Source) -> tuple[int, int]:
    """The image's (width, height) from its header; _BadImage if it cannot be used."""
    with _image_file(src) as f, _open_image(f) as im:
        return im.size


def _decode(src: Source) -> Image.Image:
    with _image_file(src) as f, _open_image(f) as raw:
        try:
            raw.load()
            im = ImageOps.exif_transpose(raw)  # phone photos are stored sideways with an orientation tag
        except OSError as e:  # "image file is truncated", "broken data stream"
            raise _BadImage(f"corrupt or truncated ({e})") from e
        except Exception as e:  # a decoder's or the EXIF parser's report of bad data, with many types
            raise _BadImage(f"corrupt ({type(e).__name__}: {e})") from e
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

    def __init__(self, records: list[Record], size: int, counts: dict[str, int], source: str = "the dataset") -> None:
        self.records = records
        self.size = size
        self.counts = counts
        self.source = source
        self._broken: set[int] = set()  # records that passed the header check but failed to decode
        self._skips = Skips({})  # warns for those (their count is len(_broken), kept apart from the open counts)

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
            except _BadImage as e:  # a bad file must not end a training run: the next readable record stands in
                self._broken.add(i)
                self._skips.skip("unreadable_at_load", rec.where, str(e))
                continue
            assert rec.caption is not None  # records without one were dropped when opening
            return Example(from_pil(resize_crop(image, self.size))[0], rec.caption, rec.key)
        raise DataError(f"{one_line(self.source)}: no readable image left ({len(self._broken)} failed to decode)")

    def report(self) -> dict[str, int]:
        """Examples kept and what was dropped: per filter, ``no_caption``, ``unreadable`` (an image, at open time),
        ``unreadable_text`` (a caption, sidecar or manifest line) and ``unreadable_at_load`` (an image replaced
        since, in this process)."""
        return {"kept": len(self.records), **self.counts, "unreadable_at_load": len(self._broken)}

    def skipped(self) -> int:
        """Samples skipped because a file of theirs could not be read (not those the filters dropped)."""
        return self.counts["unreadable"] + self.counts["unreadable_text"] + len(self._broken)


def open_dataset(source: str | Path, *, size: int, filters: Filters | None = None) -> ImageCaptionDataset:
    """Open a folder (images + same-stem .txt captions, recursive), a ``.jsonl`` or ``.parquet`` manifest (image
    path relative to the manifest, or inline bytes; ``caption``/``text``; metadata columns), or webdataset
    shards (a ``.tar``, a folder of them, or ``shards-{000..009}.tar``). Images become ``size`` x ``size``.

    Samples that cannot be read are skipped with a warning on stderr (see the module's notes); a source that
    cannot be read, or leaves no usable example, is a :class:`DataError` naming it."""
    filters = filters or Filters()
    counts = {"unreadable": 0, "unreadable_text": 0, "no_caption": 0, **filters.empty_counts()}
    skips = Skips(counts)
    records = read_records(source, skips)
    kept = []
    for rec in records:
        try:
            wh = _header_size(rec.source)
        except _BadImage as e:
            skips.skip("unreadable", rec.where, str(e))
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
        what = counts if records or any(counts.values()) else "the source is empty"
        raise DataError(f"{one_line(str(source))}: no usable examples ({what})")
    return ImageCaptionDataset(kept, size, counts, str(source))


def collate(batch: list[Example]) -> tuple[Tensor, list[str]]:
    """Examples -> (images (B, 3, S, S), captions)."""
    return torch.stack([e.image for e in batch]), [e.caption for e in batch]
