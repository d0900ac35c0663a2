"""Training data sources, LAION-style filters and robustness to broken images."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from stablekit.train.data import collate, open_dataset, resize_crop
from stablekit.train.filters import Filters


def _png(color: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_folder_skips_and_counts_broken_and_uncaptioned(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(_png((255, 0, 0)))
    (tmp_path / "a.txt").write_text("a red thing\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.png").write_bytes(_png((0, 0, 255)))
    (tmp_path / "sub" / "b.txt").write_text("a blue thing")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "broken.txt").write_text("never used")
    (tmp_path / "nocap.png").write_bytes(_png((0, 255, 0)))
    ds = open_dataset(tmp_path, size=16)
    assert len(ds) == 2
    assert ds.report() == {"kept": 2, "unreadable": 1, "no caption": 1}
    images, captions = collate([ds[0], ds[1]])
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.float32
    assert captions == ["a red thing", "a blue thing"]
    assert torch.allclose(images[0, 0], torch.ones(16, 16)) and torch.allclose(images[0, 2], -torch.ones(16, 16))


def test_image_that_breaks_after_opening_is_replaced_and_counted(tmp_path: Path) -> None:
    for name, color in (("a", (255, 0, 0)), ("b", (0, 0, 255))):
        (tmp_path / f"{name}.png").write_bytes(_png(color))
        (tmp_path / f"{name}.txt").write_text(name)
    ds = open_dataset(tmp_path, size=8)
    (tmp_path / "a.png").write_bytes(b"gone")  # e.g. a network filesystem hiccup mid-run
    assert ds[0].caption == "b"
    assert ds.report()["unreadable at load"] == 1


def _rows() -> list[dict]:
    return [
        {
            "file": "0.png",
            "caption": "keep",
            "WIDTH": 1024,
            "HEIGHT": 768,
            "AESTHETIC_SCORE": 6.1,
            "punsafe": 0.01,
            "pwatermark": 0.1,
        },
        {
            "file": "1.png",
            "caption": "small",
            "WIDTH": 300,
            "HEIGHT": 200,
            "AESTHETIC_SCORE": 6.5,
            "punsafe": 0.0,
            "pwatermark": 0.0,
        },
        {
            "file": "2.png",
            "caption": "ugly",
            "WIDTH": 800,
            "HEIGHT": 800,
            "AESTHETIC_SCORE": 4.0,
            "punsafe": 0.0,
            "pwatermark": 0.0,
        },
        {
            "file": "3.png",
            "caption": "nsfw",
            "WIDTH": 800,
            "HEIGHT": 800,
            "AESTHETIC_SCORE": 7.0,
            "punsafe": 0.9,
            "pwatermark": 0.0,
        },
        {
            "file": "4.png",
            "caption": "marked",
            "WIDTH": 800,
            "HEIGHT": 800,
            "AESTHETIC_SCORE": 7.0,
            "punsafe": 0.0,
            "pwatermark": 0.8,
        },
        {"file": "5.png", "caption": "unscored", "WIDTH": 800, "HEIGHT": 800},
    ]


FILTERS = Filters(min_size=512, min_aesthetic=5.0, max_punsafe=0.1, max_watermark=0.5)
EXPECTED = {"kept": 1, "min_size": 1, "min_aesthetic": 1, "max_punsafe": 1, "max_watermark": 1, "missing aesthetic": 1}


def test_jsonl_manifest_with_laion_filters(tmp_path: Path) -> None:
    rows = _rows()
    for i, _ in enumerate(rows):
        (tmp_path / f"{i}.png").write_bytes(_png((i * 40, 0, 0)))
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds = open_dataset(tmp_path / "m.jsonl", size=8, filters=FILTERS)
    assert [ds[i].caption for i in range(len(ds))] == ["keep"]
    assert ds.report() == EXPECTED
    assert len(open_dataset(tmp_path / "m.jsonl", size=8)) == 6  # no filters: everything readable is kept


def test_parquet_manifest_with_inline_bytes(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = _rows()
    for i, r in enumerate(rows):
        r["image"] = {"bytes": _png((0, i * 40, 0)), "path": None}
        del r["file"]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    ds = open_dataset(tmp_path / "m.parquet", size=8, filters=FILTERS)
    assert ds.report() == EXPECTED and ds[0].caption == "keep"


def _shard(path: Path, items: list[tuple[str, bytes | None, str]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, image, caption in items:
            for ext, data in (("png", image), ("txt", caption.encode()), ("json", b'{"punsafe": 0.0}')):
                if data is None:
                    continue
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards_by_pattern_and_folder(tmp_path: Path) -> None:
    _shard(tmp_path / "s-000.tar", [("a", _png((1, 2, 3)), "first"), ("b", b"junk", "broken")])
    _shard(tmp_path / "s-001.tar", [("c", _png((4, 5, 6)), "second"), ("d", None, "no image")])
    by_pattern = open_dataset(str(tmp_path / "s-{000..001}.tar"), size=8)
    assert [by_pattern[i].caption for i in range(len(by_pattern))] == ["first", "second"]
    assert by_pattern.report() == {"kept": 2, "unreadable": 2}
    by_folder = open_dataset(tmp_path, size=8)
    assert len(by_folder) == 2


def test_resize_then_centre_crop() -> None:
    image = Image.new("RGB", (80, 20), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 10, 20))  # a white strip far left, well outside the centre square
    out = resize_crop(image, 10)
    assert out.size == (10, 10)
    assert max(out.getdata()) == (0, 0, 0)


@pytest.mark.parametrize("bad", ["missing-folder", "data.csv"])
def test_bad_sources_are_clear_errors(tmp_path: Path, bad: str) -> None:
    if bad.endswith(".csv"):
        (tmp_path / bad).write_text("x")
    with pytest.raises((FileNotFoundError, ValueError), match=bad):
        open_dataset(tmp_path / bad, size=8)


def test_empty_source_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no usable examples"):
        open_dataset(tmp_path, size=8)
