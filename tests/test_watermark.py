"""The invisible watermark against the reference scripts' own encoder and checker.

The oracle is ``invisible-watermark`` itself, used as CompVis' and Stability-AI's scripts use it: their
``put_watermark`` (typed in below) for the marked bytes, and their ``scripts/tests/test_watermark.py`` (``cv2.imread``
of the saved file, ``WatermarkDecoder('bytes', 8 * len(mark)).decode(bgr, 'dwtDct')``) for the decoding. Images are
1/f noise, the spectrum of photographs: dwtDct needs texture (``benchmarks/watermark_limits.py`` measures flat
images, JPEG, resizing and cropping), and the 136-bit v1 mark needs about 512 px, so it is round-tripped at 512
and 512x768 and shown to fail, with a notice, at 256.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from imwatermark import WatermarkDecoder, WatermarkEncoder
from PIL import Image

from stablekit.cli import build_parser, main
from stablekit.cli.options import load_pipeline
from stablekit.images import save_png
from stablekit.models.ldm import LatentDiffusion
from stablekit.pipelines import Generated, GenerationParams, Notice, Pipeline, txt2img
from stablekit.watermark import (
    INSTALL,
    WATERMARKS,
    Watermarker,
    WatermarkError,
    WatermarkSizeError,
    check,
    default_watermark,
)
from tests.tiny import TINY_SD1, TINY_SD2, TINY_VAE

# f = 8, as the released autoencoder: a 256 px image is 32x32 latents, a second on a CPU (TINY_VAE's f = 2 is 90 s).
TINY_SD1_F8 = replace(TINY_SD1, vae=replace(TINY_VAE, ch_mult=(1, 2, 2, 2)))


def textured(width: int, height: int, seed: int) -> Image.Image:
    """1/f amplitude noise per channel, mean 128, std 40."""
    rng = np.random.default_rng(seed)
    f = np.sqrt(np.fft.fftfreq(height)[:, None] ** 2 + np.fft.rfftfreq(width)[None, :] ** 2)
    f[0, 0] = 1.0
    channels = []
    for _ in range(3):
        spectrum = (rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape)) / f
        spectrum[0, 0] = 0
        x = np.fft.irfft2(spectrum, s=(height, width))
        channels.append((x - x.mean()) / x.std())
    return Image.fromarray(np.clip(np.stack(channels, -1) * 40 + 128, 0, 255).round().astype(np.uint8))


def put_watermark(img: Image.Image, wm_encoder: WatermarkEncoder) -> Image.Image:
    """The reference scripts' function (CompVis/stable-diffusion and Stability-AI/stablediffusion txt2img.py)."""
    img = cv2.cvtColor(np.array(img), cv2.COLOR_RGB2BGR)
    img = wm_encoder.encode(img, "dwtDct")
    return Image.fromarray(img[:, :, ::-1])


def reference_decode(path: Path, name: str) -> bytes:
    """The reference scripts' checker, reading the file as they do."""
    bgr = cv2.imread(str(path))
    return WatermarkDecoder("bytes", 8 * len(WATERMARKS[name])).decode(bgr, "dwtDct")


@pytest.mark.parametrize(
    ("name", "width", "height"),
    [
        ("SDV2", 256, 256),
        ("SDV2", 512, 512),
        ("SDV2", 320, 512),
        ("SDV2", 512, 320),
        ("StableDiffusionV1", 512, 512),
        ("StableDiffusionV1", 512, 768),
    ],
)
def test_marked_pngs_decode_with_the_reference_checker(tmp_path: Path, name: str, width: int, height: int) -> None:
    reference = WatermarkEncoder()
    reference.set_watermark("bytes", name.encode("utf-8"))
    marker = Watermarker(name)
    for seed in range(3):
        image = textured(width, height, seed)
        marked = marker.apply([image])[0]
        assert marked.size == image.size and marked.mode == "RGB"
        assert np.array_equal(np.asarray(marked), np.asarray(put_watermark(image, reference)))
        assert not np.array_equal(np.asarray(marked), np.asarray(image))
        path = save_png(marked, tmp_path / f"{name}-{seed}.png", "parameters")
        with Image.open(path) as saved:  # the PNG holds exactly the marked bytes
            assert np.array_equal(np.asarray(saved.convert("RGB")), np.asarray(marked))
        assert reference_decode(path, name) == WATERMARKS[name]
        other = next(n for n in WATERMARKS if n != name)
        assert reference_decode(path, other) != WATERMARKS[other]
        assert check(marked).found == name
        assert marker.unreadable([marked]) == []
    clean = textured(width, height, 99)
    assert check(clean).found is None
    assert all(0.25 < a < 0.75 for a in check(clean).agreement.values())


def test_the_v1_mark_does_not_survive_256_px_and_a_run_says_so() -> None:
    image = textured(256, 256, 0)
    marked = Watermarker("StableDiffusionV1").apply([image])[0]
    decoded = WatermarkDecoder("bytes", 136).decode(cv2.cvtColor(np.asarray(marked), cv2.COLOR_RGB2BGR), "dwtDct")
    assert decoded != b"StableDiffusionV1"  # the reference library's own limit, measured in the benchmark
    assert check(marked).agreement["StableDiffusionV1"] > 0.85
    assert Watermarker("StableDiffusionV1").unreadable([marked]) == [0]


def test_images_under_256_px_a_side_are_refused() -> None:
    marker = Watermarker("SDV2")
    for size in ((255, 512), (512, 200), (64, 64)):
        with pytest.raises(WatermarkSizeError, match="at least 256 px on each side"):
            marker.apply([textured(*size, 0)])
        with pytest.raises(WatermarkSizeError, match="at least 256 px"):
            check(textured(*size, 0))
    with pytest.raises(WatermarkError, match="unknown watermark 'SDXL'"):
        Watermarker("SDXL")


def test_the_family_picks_the_mark() -> None:
    assert default_watermark(TINY_SD1) == "StableDiffusionV1"
    assert default_watermark(TINY_SD2) == "SDV2"


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    torch.manual_seed(0)
    return Pipeline(LatentDiffusion(TINY_SD1_F8), TINY_SD1_F8)


def _run(pipe: Pipeline, size: int) -> tuple[list[Image.Image], list[str]]:
    params = GenerationParams("a red circle", width=size, height=size, steps=2, seed=1, batch_size=2)
    events = list(txt2img(pipe, params))
    images = [im for ev in events if isinstance(ev, Generated) for im in ev.images]
    return images, [ev.message for ev in events if isinstance(ev, Notice)]


def test_a_pipeline_marks_its_images(pipe: Pipeline, tmp_path: Path) -> None:
    pipe.watermark = None
    plain, _ = _run(pipe, 256)
    pipe.watermark = Watermarker("SDV2")
    try:
        marked, notices = _run(pipe, 256)
        pipe.watermark = Watermarker("StableDiffusionV1")
        _, v1_notices = _run(pipe, 256)
    finally:
        pipe.watermark = None
    assert notices == []
    encoder = WatermarkEncoder()
    encoder.set_watermark("bytes", b"SDV2")
    for i, (a, b) in enumerate(zip(plain, marked, strict=True)):
        assert np.array_equal(np.asarray(b), np.asarray(put_watermark(a, encoder)))
        assert reference_decode(save_png(b, tmp_path / f"{i}.png", "p"), "SDV2") == b"SDV2"
    assert len(v1_notices) == 2 and all("does not decode" in n for n in v1_notices)


def test_a_pipeline_refuses_a_small_size_before_sampling(pipe: Pipeline) -> None:
    pipe.watermark = Watermarker()
    try:
        events = txt2img(pipe, GenerationParams("a red circle", width=64, height=64, steps=2, seed=1))
        with pytest.raises(WatermarkSizeError, match="the output is 64x64"):
            next(events)  # the first event: nothing was sampled
    finally:
        pipe.watermark = None


def test_the_server_refuses_a_small_size_before_queueing(pipe: Pipeline) -> None:
    import httpx

    from stablekit.serve import ServeSettings, Service, create_app
    from tests.serving import running

    body = {"input_data": {"data": ["a red circle"], "parameters": {"num_inference_steps": 2, "width": 64}}}
    pipe.watermark = Watermarker()
    try:
        service = Service(pipe, ServeSettings())
        with running(create_app(service)) as url:
            answer = httpx.post(f"{url}/score", json=body, timeout=60)
    finally:
        pipe.watermark = None
    assert answer.status_code == 400 and "too small for the invisible watermark" in answer.text
    assert not service.worker.jobs  # refused by the up-front check: nothing was queued


def test_the_flag_sets_the_pipelines_mark(tiny_model_file: Path) -> None:
    parser = build_parser()
    base = ["generate", "a red circle", "-m", str(tiny_model_file)]
    assert parser.parse_args(base).watermark is None
    args = parser.parse_args([*base, "--watermark"])
    pipe = load_pipeline(args, lambda: tiny_model_file, "model")
    assert pipe.watermark is not None and pipe.watermark.name == "StableDiffusionV1"
    args = parser.parse_args([*base, "--watermark", "SDV2"])
    pipe = load_pipeline(args, lambda: tiny_model_file, "model")
    assert pipe.watermark is not None and pipe.watermark.name == "SDV2"
    # serve and batch load their pipelines through the same options
    assert parser.parse_args(["serve", "--watermark"]).watermark == "auto"
    assert parser.parse_args(["batch", "rows.csv", "--out", "o", "--watermark", "SDV2"]).watermark == "SDV2"


def test_watermark_check_command(tmp_path: Path) -> None:
    marked = save_png(Watermarker("SDV2").apply([textured(512, 512, 0)])[0], tmp_path / "marked.png", "p")
    v1 = save_png(Watermarker().apply([textured(512, 512, 1)])[0], tmp_path / "v1.png", "p")
    clean = save_png(textured(512, 512, 2), tmp_path / "clean.png", "p")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "stablekit", "watermark-check", str(marked), str(v1), str(clean)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"{marked}: SDV2", f"{v1}: StableDiffusionV1", f"{clean}: none"]
    done = subprocess.run(
        [sys.executable, "-m", "stablekit", "watermark-check", "--json", str(marked)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert '"found": "SDV2"' in done.stdout and '"SDV2": 1.0' in done.stdout


def _bomb(path: Path, width: int, height: int) -> Path:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


def test_watermark_check_refuses_hostile_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    small = tmp_path / "small.png"
    textured(255, 512, 0).save(small)
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "folder.png").mkdir()
    cases = {
        tmp_path / "missing.png": "does not exist",
        tmp_path / "folder.png": "is not a file",
        fifo: "is not a file",
        tmp_path / "text.png": "is not a readable image",
        _bomb(tmp_path / "bomb.png", 100_000, 100_000): "pixel limit",
        small: "255x512, too small for the invisible watermark",
    }
    for path, message in cases.items():
        assert main(["watermark-check", str(path)]) == 1
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.count("\n") == 1 and message in err, err


def test_a_missing_package_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "imwatermark", None)  # `import imwatermark` now raises ImportError
    with pytest.raises(WatermarkError, match="pip install --no-deps invisible-watermark==0.2.0") as e:
        Watermarker()
    assert INSTALL in str(e.value)
    with pytest.raises(WatermarkError, match="opencv-python-headless PyWavelets"):
        check(textured(256, 256, 0))
