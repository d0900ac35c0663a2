"""Training data sources, the LAION-style filters, preprocessing, and robustness to broken images."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import struct
import sys
import tarfile
import threading
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from stablekit.images import from_pil
from stablekit.train.data import collate, open_dataset, resize_crop
from stablekit.train.demo_data import write_demo_dataset
from stablekit.train.filters import Filters
from stablekit.train.sources import MAX_TEXT_BYTES


def _png(color: tuple[int, ...], size: tuple[int, int] = (40, 30), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def _counts(**nonzero: int) -> dict[str, int]:
    """A report with every key of the FILTERS run below at zero unless given."""
    keys = ["kept", "unreadable", "unreadable_text", "no_caption", "unreadable_at_load"]
    keys += [k for f in ("min_size", "min_aesthetic", "max_punsafe", "max_watermark") for k in (f, f"{f}_missing")]
    return {k: nonzero.get(k, 0) for k in keys}


def _plain(**nonzero: int) -> dict[str, int]:
    """A report of a source opened without filters."""
    return {k: nonzero.get(k, 0) for k in ("kept", "unreadable", "unreadable_text", "no_caption", "unreadable_at_load")}


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
    assert ds.report() == _plain(kept=2, unreadable=1, no_caption=1)
    images, captions = collate([ds[0], ds[1]])
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.float32
    assert captions == ["a red thing", "a blue thing"]
    assert [ds[0].key, ds[1].key] == ["a.png", "sub/b.png"]
    assert torch.equal(images[0], torch.tensor([1.0, -1.0, -1.0])[:, None, None].expand(3, 16, 16))


def test_image_that_breaks_after_opening_is_replaced_and_counted(tmp_path: Path) -> None:
    for name, color in (("a", (255, 0, 0)), ("b", (0, 0, 255))):
        (tmp_path / f"{name}.png").write_bytes(_png(color))
        (tmp_path / f"{name}.txt").write_text(name)
    ds = open_dataset(tmp_path, size=8)
    (tmp_path / "a.png").write_bytes(b"gone")  # e.g. a network filesystem hiccup mid-run
    assert ds[0].caption == "b" and ds[0].caption == "b"
    assert ds.report()["unreadable_at_load"] == 1  # counted once, however often it is asked for


def test_demo_dataset_folder_round_trips(tmp_path: Path) -> None:
    """The trainer's demo path: generator folder -> dataset, pixels and captions unchanged at the native size."""
    folder = write_demo_dataset(tmp_path, 3, size=32, seed=5)
    meta = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    ds = open_dataset(folder, size=32)
    assert len(ds) == 3
    for ex, row in zip((ds[i] for i in range(3)), meta, strict=True):
        assert ex.caption == row["caption"]
        assert torch.equal(ex.image, from_pil(Image.open(folder / row["file"]))[0])


ROWS: list[dict[str, Any]] = [
    {"caption": "keep", "WIDTH": 1024, "HEIGHT": 768, "AESTHETIC_SCORE": 6.1, "punsafe": 0.01, "pwatermark": 0.1},
    {"caption": "small", "WIDTH": 300, "HEIGHT": 200, "AESTHETIC_SCORE": 6.5, "punsafe": 0.0, "pwatermark": 0.0},
    {"caption": "ugly", "WIDTH": 800, "HEIGHT": 800, "AESTHETIC_SCORE": 4.0, "punsafe": 0.0, "pwatermark": 0.0},
    {"caption": "nsfw", "WIDTH": 800, "HEIGHT": 800, "AESTHETIC_SCORE": 7.0, "punsafe": 0.9, "pwatermark": 0.0},
    {"caption": "marked", "WIDTH": 800, "HEIGHT": 800, "AESTHETIC_SCORE": 7.0, "punsafe": 0.0, "pwatermark": 0.8},
    {"caption": "unscored", "WIDTH": 800, "HEIGHT": 800},
]
FILTERS = Filters(min_size=512, min_aesthetic=5.0, max_punsafe=0.1, max_watermark=0.5)
EXPECTED = _counts(kept=1, min_size=1, min_aesthetic=1, max_punsafe=1, max_watermark=1, min_aesthetic_missing=1)


def test_jsonl_manifest_with_laion_filters(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    for i in range(len(ROWS)):
        (tmp_path / "img" / f"{i}.png").write_bytes(_png((i * 40, 0, 0)))
    rows = [{"file": f"img/{i}.png", **r} for i, r in enumerate(ROWS)]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds = open_dataset(tmp_path / "m.jsonl", size=8, filters=FILTERS)
    assert [ds[i].caption for i in range(len(ds))] == ["keep"]
    assert ds.report() == EXPECTED
    assert len(open_dataset(tmp_path / "m.jsonl", size=8)) == 6  # no filters: everything readable is kept


def test_parquet_manifest_with_inline_bytes(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [{"image": {"bytes": _png((0, i * 40, 0)), "path": None}, **r} for i, r in enumerate(ROWS)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    ds = open_dataset(tmp_path / "m.parquet", size=8, filters=FILTERS)
    assert ds.report() == EXPECTED and ds[0].caption == "keep"
    assert torch.equal(ds[0].image, torch.full((3, 8, 8), -1.0))


def test_parquet_without_pyarrow_says_how_to_get_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "m.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # makes the import raise ImportError
    with pytest.raises(ValueError, match=r"stablekit\[train\]"):
        open_dataset(tmp_path / "m.parquet", size=8)


def _shard(path: Path, items: list[tuple[str, bytes | None, str]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, image, caption in items:
            for ext, data in (("png", image), ("txt", caption.encode()), ("json", b'{"punsafe": 0.0}')):
                if data is None:
                    continue
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards_by_pattern_folder_and_file(tmp_path: Path) -> None:
    _shard(tmp_path / "s-000.tar", [("a", _png((1, 2, 3)), "first"), ("b", b"junk", "broken")])
    _shard(tmp_path / "s-001.tar", [("dir/c", _png((255, 5, 6)), "second"), ("d", None, "no image")])
    by_pattern = open_dataset(str(tmp_path / "s-{000..001}.tar"), size=8, filters=Filters(max_punsafe=0.5))
    assert [by_pattern[i].caption for i in range(len(by_pattern))] == ["first", "second"]
    assert [by_pattern[i].key for i in range(len(by_pattern))] == ["s-000.tar/a", "s-001.tar/dir/c"]
    assert by_pattern.report() == {
        "kept": 2,
        "unreadable": 2,
        "unreadable_text": 0,
        "no_caption": 0,
        "max_punsafe": 0,
        "max_punsafe_missing": 0,
        "unreadable_at_load": 0,
    }
    assert by_pattern[1].image[0, 0, 0] == 1.0  # the red channel of (255, 5, 6), read from the right offset
    assert len(open_dataset(tmp_path, size=8)) == 2
    assert len(open_dataset(tmp_path / "s-001.tar", size=8)) == 1


@pytest.mark.parametrize("cut", [0, 100, 600])
def test_truncated_shard_keeps_what_came_before(tmp_path: Path, cut: int) -> None:
    """Cut inside b's image header, inside its data, or after its header followed by garbage."""
    items = [("a", _png((1, 2, 3)), "first"), ("b", _png((4, 5, 6)), "second")]
    _shard(tmp_path / "s.tar", items)
    data = (tmp_path / "s.tar").read_bytes()
    a_end = 3 * 1024  # three members of one header block and one data block each
    assert data[a_end + 257 : a_end + 262] == b"ustar"  # b.png's header starts there
    (tmp_path / "s.tar").write_bytes(data[: a_end + cut] + (b"\x01" * 600 if cut == 600 else b""))
    ds = open_dataset(tmp_path / "s.tar", size=8)
    assert [ds[i].caption for i in range(len(ds))] == ["first"]
    assert ds.report()["broken_shards"] == 1


def test_resize_then_centre_crop() -> None:
    image = Image.new("RGB", (80, 20), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 10, 20))  # a white strip far left, well outside the centre square
    image.paste((255, 0, 0), (38, 0, 42, 20))  # a red bar in the middle: it must survive the crop, centred
    out = np.asarray(resize_crop(image, 10))
    assert out.shape == (10, 10, 3)
    assert out[..., 2].max() == 0  # no white leaked in
    assert out[:, 4:6, 0].min() > 100 and out[:, 0, 0].max() == 0 and out[:, -1, 0].max() == 0


def test_downscaling_is_antialiased() -> None:
    """A 1-pixel checkerboard shrunk 4x must come out flat grey; point sampling would keep one colour."""
    board = (np.indices((64, 64)).sum(0) % 2 * 255).astype(np.uint8)
    out = np.asarray(resize_crop(Image.fromarray(board).convert("RGB"), 16)).astype(np.float32)
    assert abs(out.mean() - 127.5) < 2 and out.std() < 2


def test_transparent_pixels_become_white(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(_png((0, 0, 0, 0), (8, 8), mode="RGBA"))
    (tmp_path / "a.txt").write_text("nothing")
    assert torch.equal(open_dataset(tmp_path, size=8)[0].image, torch.ones(3, 8, 8))


def test_filter_thresholds_follow_the_cards() -> None:
    f = Filters(min_size=512, min_aesthetic=5.0, max_punsafe=0.1, max_watermark=0.5)
    base = {"width": 512, "height": 512, "aesthetic": 5.0, "punsafe": 0.0999, "pwatermark": 0.4999}
    assert f.reject(base) is None  # minimums inclusive ("original size >= 512x512")
    assert f.reject({**base, "pwatermark": 0.5}) == "max_watermark"  # "watermark probability < 0.5"
    assert f.reject({**base, "punsafe": 0.1}) == "max_punsafe"
    assert f.reject({**base, "height": 511}) == "min_size"
    # LAION's original size wins over the resized one img2dataset also stores.
    assert f.reject({**base, "original_width": 300, "original_height": 900}) == "min_size"
    assert f.reject({**base, "aesthetic": float("nan")}) == "min_aesthetic_missing"
    assert f.reject({**base, "punsafe": None}) == "max_punsafe_missing"
    assert Filters().reject({}) is None


def test_filters_apply_counts_each_drop_once() -> None:
    everything_wrong = {"caption": "bad", "WIDTH": 10, "HEIGHT": 10, "AESTHETIC_SCORE": 1.0, "punsafe": 1.0}
    kept, counts = FILTERS.apply([*ROWS, everything_wrong])
    assert [r["caption"] for r in kept] == ["keep"]
    assert counts == {
        "min_size": 2,  # everything_wrong counts under the first filter it fails only
        "min_size_missing": 0,
        "min_aesthetic": 1,
        "min_aesthetic_missing": 1,
        "max_punsafe": 1,
        "max_punsafe_missing": 0,
        "max_watermark": 1,
        "max_watermark_missing": 0,
    }


def test_folder_min_size_uses_the_files_own_size(tmp_path: Path) -> None:
    for name, wh in (("big", (64, 48)), ("tiny", (16, 16))):
        (tmp_path / f"{name}.png").write_bytes(_png((9, 9, 9), wh))
        (tmp_path / f"{name}.txt").write_text(name)
    ds = open_dataset(tmp_path, size=8, filters=Filters(min_size=32))
    assert [ds[i].caption for i in range(len(ds))] == ["big"] and ds.report()["min_size"] == 1


@pytest.mark.parametrize("bad", ["missing-folder", "data.csv"])
def test_bad_sources_are_clear_errors(tmp_path: Path, bad: str) -> None:
    if bad.endswith(".csv"):
        (tmp_path / bad).write_text("x")
    with pytest.raises((FileNotFoundError, ValueError), match=bad):
        open_dataset(tmp_path / bad, size=8)


def test_empty_source_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no usable examples"):
        open_dataset(tmp_path, size=8)


# --- hostile inputs: a sample whose files cannot be read is skipped with a warning naming the file ---------


def _without_hanging(fn: Callable[[], Any], fifos: list[Path], seconds: float = 20.0) -> Any:
    """``fn()``, failing (rather than hanging the suite) if it blocks on one of ``fifos``: opening a named pipe
    for reading waits for a writer, so the test becomes that writer to let the thread finish."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = fn()
        except BaseException as e:  # handed to the test thread
            result["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        for fifo in fifos:
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(seconds)
        pytest.fail(f"blocked reading a named pipe among {[f.name for f in fifos]}")
    if "error" in result:
        raise result["error"]
    return result["value"]


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("stablekit train: skipping ")]


def _sample(folder: Path, name: str, caption: str | bytes | None = "fine", image: bytes | None = None) -> None:
    (folder / f"{name}.png").write_bytes(image if image is not None else _png((10, 20, 30)))
    if isinstance(caption, str):
        (folder / f"{name}.txt").write_text(caption)
    elif isinstance(caption, bytes):
        (folder / f"{name}.txt").write_bytes(caption)


def test_folder_skips_unreadable_captions_and_sidecars(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _sample(tmp_path, "a", "good")
    _sample(tmp_path, "b", b"caf\xe9 au lait")  # Latin-1, not UTF-8
    _sample(tmp_path, "c")
    (tmp_path / "c.json").write_text('{"punsafe": 0.0,')  # cut short
    _sample(tmp_path, "d")
    (tmp_path / "d.json").write_text("[1, 2]")  # valid JSON, not an object of metadata
    _sample(tmp_path, "e", None)
    os.mkfifo(tmp_path / "e.txt")  # opening a pipe for reading waits for a writer that never comes
    _sample(tmp_path, "f", None)
    (tmp_path / "f.txt").mkdir()
    _sample(tmp_path, "g")
    (tmp_path / "g.json").write_bytes(b'{"caption": "\xff"}')
    _sample(tmp_path, "h", "\ufeffa caption saved by Notepad")  # a byte-order mark is not part of the caption
    _sample(tmp_path, "i", "word " * (MAX_TEXT_BYTES // 5 + 1))  # not a caption: a file written by mistake
    ds = _without_hanging(lambda: open_dataset(tmp_path, size=8), [tmp_path / "e.txt"])
    assert [ds[i].caption for i in range(len(ds))] == ["good", "a caption saved by Notepad"]
    assert ds.report() == _plain(kept=2, unreadable_text=7)
    warned = _warnings(capsys.readouterr().err)
    assert len(warned) == 7
    for name, reason in (
        ("b.txt", "not valid UTF-8"),
        ("c.json", "malformed JSON"),
        ("d.json", "not a JSON object"),
        ("e.txt", "not a regular file"),
        ("f.txt", "not a regular file"),
        ("g.json", "not valid UTF-8"),
        ("i.txt", "larger than"),
    ):
        assert any(str(tmp_path / name) in w and reason in w for w in warned), (name, warned)
    # Deterministic: the same samples are skipped every time the source is opened (as after a resume).
    again = _without_hanging(lambda: open_dataset(tmp_path, size=8), [tmp_path / "e.txt"])
    assert [r.key for r in again.records] == [r.key for r in ds.records]


def test_images_are_read_only_by_the_input_decoders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """PNG, JPEG and WebP only, under the pixel cap, as every other input of the package."""
    _sample(tmp_path, "a")
    bmp, gif = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (8, 8)).save(bmp, format="BMP")
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    _sample(tmp_path, "bmp", image=bmp.getvalue())
    _sample(tmp_path, "gif", image=gif.getvalue())  # a GIF named .png
    _sample(tmp_path, "text", image=b"hello, I am not an image\n")

    # A small file declaring a 9000 x 9000 canvas: over the package's cap (though under PIL's own), so refused
    # from its header before a pixel is decoded.
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", 9000, 9000, 8, 2, 0, 0, 0))
    bomb = b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(bytes(1000))) + chunk(b"IEND", b"")
    _sample(tmp_path, "bomb", image=bomb)
    ds = open_dataset(tmp_path, size=8)
    assert [r.key for r in ds.records] == ["a.png"]
    assert ds.report() == _plain(kept=1, unreadable=4)
    warned = _warnings(capsys.readouterr().err)
    for name, reason in (
        ("bmp.png", "not a PNG, JPEG or WebP image"),
        ("gif.png", "not a PNG, JPEG or WebP image"),
        ("text.png", "not a PNG, JPEG or WebP image"),
        ("bomb.png", "pixel limit"),
    ):
        assert any(str(tmp_path / name) in w and reason in w for w in warned), (name, warned)


def test_truncated_image_is_skipped_at_load_with_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    big = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(big, format="PNG")
    _sample(tmp_path, "a", "cut", image=big.getvalue()[: len(big.getvalue()) // 2])  # header intact, data cut
    _sample(tmp_path, "b", "whole")
    ds = open_dataset(tmp_path, size=8)
    assert len(ds) == 2  # the header check passes: only decoding finds the damage
    assert ds[0].caption == ds[0].caption == "whole"
    assert ds.report()["unreadable_at_load"] == 1 and ds.skipped() == 1
    warned = _warnings(capsys.readouterr().err)
    assert len(warned) == 1 and str(tmp_path / "a.png") in warned[0] and "truncated" in warned[0]


def test_all_images_broken_at_load_names_the_source(tmp_path: Path) -> None:
    _sample(tmp_path, "a")
    ds = open_dataset(tmp_path, size=8)
    (tmp_path / "a.png").write_bytes(_png((1, 1, 1))[:40])
    with pytest.raises(ValueError, match=f"{tmp_path}.*no readable image"):
        ds[0]


def test_jsonl_skips_bad_lines_and_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "ok.png").write_bytes(_png((1, 2, 3)))
    os.mkfifo(tmp_path / "pipe.png")
    lines = [
        json.dumps({"file": "ok.png", "caption": "good"}).encode(),
        b'{"file": "ok.png", "caption": "caf\xe9"}',  # line 2: not UTF-8
        b'{"file": "ok.png", "caption": ',  # line 3: cut short
        b'["ok.png", "a list"]',  # line 4: not an object
        json.dumps({"file": "ok.png", "caption": ["not", "text"]}).encode(),  # line 5
        json.dumps({"file": "pipe.png", "caption": "a pipe"}).encode(),  # line 6: not a regular file
        json.dumps({"file": "no\u0000such.png", "caption": "a NUL in the path"}).encode(),  # line 7
        b"[" * 100_000,  # line 8: nested past the parser's recursion limit
    ]
    (tmp_path / "m.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    ds = _without_hanging(lambda: open_dataset(tmp_path / "m.jsonl", size=8), [tmp_path / "pipe.png"])
    assert [ds[i].caption for i in range(len(ds))] == ["good"]
    report = ds.report()
    assert report["unreadable_text"] == 5 and report["unreadable"] == 2
    warned = _warnings(capsys.readouterr().err)
    assert len(warned) == 7
    for where, reason in (
        ("m.jsonl line 2", "not valid UTF-8"),
        ("m.jsonl line 3", "malformed JSON"),
        ("m.jsonl line 4", "not a JSON object"),
        ("m.jsonl line 5", "caption"),
        ("pipe.png", "not a regular file"),
        ("m.jsonl line 7", "null"),
        ("m.jsonl line 8", "nested"),
    ):
        assert any(where in w and reason in w for w in warned), (where, warned)


def test_shard_skips_unreadable_text_members(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = _png((1, 2, 3))
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for name, data in (
            ("a.png", good),
            ("a.txt", b"first"),
            ("b.png", good),
            ("b.txt", b"\xff\xfe"),
            ("c.png", good),
            ("c.txt", b"third"),
            ("c.json", b"{not json"),
            ("d.png", good),
            ("d.json", b'"a string"'),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    ds = open_dataset(tmp_path / "s.tar", size=8)
    assert [ds[i].caption for i in range(len(ds))] == ["first"]
    assert ds.report()["unreadable_text"] == 3
    warned = _warnings(capsys.readouterr().err)
    for member, reason in (("b.txt", "not valid UTF-8"), ("c.json", "malformed JSON"), ("d.json", "not a JSON object")):
        assert any(f"{member} in {tmp_path / 's.tar'}" in w and reason in w for w in warned), (member, warned)


# Not a corrupt .tar: a shard that breaks is kept up to the break (test_truncated_shard_keeps_what_came_before).
@pytest.mark.parametrize(
    "kind, suffix",
    [
        (k, s)
        for k in ("fifo", "folder", "corrupt")
        for s in (".jsonl", ".parquet", ".tar")
        if (k, s) != ("corrupt", ".tar")
    ],
)
def test_an_unreadable_manifest_is_an_error_naming_it(tmp_path: Path, kind: str, suffix: str) -> None:
    source = path = tmp_path / f"m{suffix}"  # what is opened; what the error must name
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()  # read as a folder of images, here none: "no usable examples"
        if suffix == ".tar":  # a folder of shards, one of them a named pipe
            (path / "a.tar").write_bytes(bytes(1024))
            path = path / "b.tar"
            os.mkfifo(path)
    else:
        path.write_bytes(b"\xff\xfe\x00garbage" * 100)
    with pytest.raises(ValueError, match=re.escape(str(path))) as e:
        _without_hanging(lambda: open_dataset(source, size=8), [path])
    assert "\n" not in str(e.value)
