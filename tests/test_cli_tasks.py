"""The image commands (img2img, inpaint, depth2img, upscale) from the command line: what they write, and every
bad input answered with one line, exit status 1 and no PNG.

Models here are tiny random-weight files of each family written by our own ``save_model``: these tests are
about the commands' behaviour, not about parity (that is ``test_tasks_parity.py``, against diffusers).
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from stablekit.cli import main
from stablekit.config import ModelConfig
from stablekit.images import read_parameters
from stablekit.models.ldm import LatentDiffusion
from stablekit.weights import save_model
from tests.tiny import TINY_SD1, TINY_SD1_INPAINT, TINY_SD2_DEPTH, TINY_X4


def _model_file(cfg: ModelConfig, folder: Path) -> Path:
    torch.manual_seed(0)
    path = folder / f"{cfg.name}.safetensors"
    save_model(LatentDiffusion(cfg), cfg, path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    return {c.conditioning: _model_file(c, folder) for c in (TINY_SD1, TINY_SD1_INPAINT, TINY_SD2_DEPTH, TINY_X4)}


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A valid PNG that declares a huge canvas but holds a few bytes of data: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    paths = {name: d / f"{name}.png" for name in ("rgb", "rgba", "grey", "mask", "small_mask", "depth16", "low")}
    rgb.save(paths["rgb"])
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.new("L", (64, 64), 128))
    rgba.save(paths["rgba"])
    rgb.convert("L").save(paths["grey"])
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle([16, 16, 47, 47], fill=255)
    mask.save(paths["mask"])
    mask.resize((32, 32)).save(paths["small_mask"])
    ramp = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    Image.fromarray(ramp).save(paths["depth16"])
    rgb.resize((16, 16)).save(paths["low"])
    paths["cmyk"] = d / "cmyk.jpg"
    rgb.convert("CMYK").save(paths["cmyk"])
    paths["corrupt"] = d / "corrupt.png"
    paths["corrupt"].write_bytes(paths["rgb"].read_bytes()[:200])
    paths["text"] = d / "text.png"
    paths["text"].write_text("not an image\n")
    paths["bomb"] = d / "bomb.png"
    _png_header_only(paths["bomb"], 100_000, 100_000)
    paths["missing"] = d / "missing.png"
    return paths


FAST = ["--steps", "2", "--seed", "3"]


def _run(capsys: pytest.CaptureFixture[str], args: list[str]) -> tuple[int, str]:
    rc = main(args)
    return rc, capsys.readouterr().err


def _assert_refused(rc: int, err: str, message: str, out: Path) -> None:
    assert rc == 1, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], err
    assert not out.exists()
    assert not list(out.parent.glob(".*.partial"))


def test_img2img_writes_png_with_strength(models, images, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "o.png"
    args = ["img2img", "a cat", "--image", str(images["rgb"]), "--strength", "0.5", "--model", str(models["txt2img"])]
    rc, err = _run(capsys, [*args, *FAST, "-o", str(out)])
    assert rc == 0, err
    text = read_parameters(out)
    assert text is not None and "Denoising strength: 0.5" in text and "Seed: 3" in text
    with Image.open(out) as im:
        assert im.size == (64, 64)


@pytest.mark.parametrize("kind", ["rgba", "grey", "cmyk"])
def test_img2img_takes_any_image_mode(models, images, tmp_path, capsys, kind: str) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "o.png"
    args = ["img2img", "x", "--image", str(images[kind]), "--model", str(models["txt2img"]), *FAST, "-o", str(out)]
    rc, err = _run(capsys, args)
    assert rc == 0, err
    with Image.open(out) as im:
        assert im.mode == "RGB" and im.size == (64, 64)


def test_inpaint_depth_and_upscale_write_their_pngs(models, images, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    runs = {
        "inpaint": ["inpaint", "x", "--image", str(images["rgb"]), "--mask", str(images["mask"])],
        "inpaint4": ["inpaint", "x", "--image", str(images["rgb"]), "--mask", str(images["mask"])],
        "depth": ["depth2img", "x", "--image", str(images["rgb"]), "--depth-map", str(images["depth16"])],
        "upscale": ["upscale", str(images["low"]), "--prompt", "x"],
    }
    model = {"inpaint": "inpaint", "inpaint4": "txt2img", "depth": "depth", "upscale": "upscale"}
    sizes = {"inpaint": 64, "inpaint4": 64, "depth": 64, "upscale": 16 * TINY_X4.vae.downsample}
    for name, args in runs.items():
        out = tmp_path / f"{name}.png"
        rc, err = _run(capsys, [*args, "--model", str(models[model[name]]), *FAST, "-o", str(out)])
        assert rc == 0, (name, err)
        with Image.open(out) as im:
            assert im.size == (sizes[name], sizes[name]), name
    text = read_parameters(tmp_path / "upscale.png")
    assert text is not None and "Noise level: 20" in text


def test_generate_on_an_inpainting_model_masks_everything(models, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "o.png"
    args = ["generate", "x", "--model", str(models["inpaint"]), "-W", "64", "-H", "64", *FAST, "-o", str(out)]
    rc, err = _run(capsys, args)
    assert rc == 0, err
    assert out.is_file()


BAD_IMAGES = [
    ("missing", "does not exist"),
    ("corrupt", "corrupt or truncated"),
    ("text", "not a readable image"),
    ("bomb", "pixel limit"),
]


@pytest.mark.parametrize(("kind", "message"), BAD_IMAGES, ids=[k for k, _ in BAD_IMAGES])
@pytest.mark.parametrize("command", ["img2img", "inpaint", "depth2img", "upscale"])
def test_bad_input_image_is_refused(models, images, tmp_path, capsys, command: str, kind: str, message: str) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "o.png"
    bad = str(images[kind])
    model = {"img2img": "txt2img", "inpaint": "inpaint", "depth2img": "depth", "upscale": "upscale"}[command]
    args = {
        "img2img": ["img2img", "x", "--image", bad],
        "inpaint": ["inpaint", "x", "--image", bad, "--mask", str(images["mask"])],
        "depth2img": ["depth2img", "x", "--image", bad, "--depth-map", str(images["depth16"])],
        "upscale": ["upscale", bad],
    }[command]
    rc, err = _run(capsys, [*args, "--model", str(models[model]), *FAST, "-o", str(out)])
    _assert_refused(rc, err, message, out)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["img2img", "x", "--image", "{rgb}", "--strength", "1.5", "--model", "{txt2img}"], "strength"),
        (["img2img", "x", "--image", "{rgb}", "--strength", "-0.1", "--model", "{txt2img}"], "strength"),
        (["inpaint", "x", "--image", "{rgb}", "--mask", "{small_mask}", "--model", "{inpaint}"], "mask is 32x32"),
        (["inpaint", "x", "--image", "{rgb}", "--mask", "{text}", "--model", "{inpaint}"], "mask"),
        (
            ["inpaint", "x", "--image", "{rgb}", "--mask", "{rgb}", "--strength", "2", "--model", "{inpaint}"],
            "strength",
        ),
        (["upscale", "{low}", "--noise-level", "351", "--model", "{upscale}"], "noise level must be in [0, 350]"),
        (["upscale", "{low}", "--noise-level", "-1", "--model", "{upscale}"], "noise level"),
        (["depth2img", "x", "--image", "{rgb}", "--model", "{depth}"], "--depth-map"),
        (["depth2img", "x", "--image", "{rgb}", "--depth-map", "{text}", "--model", "{depth}"], "depth map"),
        (["depth2img", "x", "--image", "{rgb}", "--depth-model", "{txt2img}", "--model", "{depth}"], "depth"),
        # A model given to the wrong command names the right one.
        (["generate", "x", "--model", "{upscale}"], "stablekit upscale"),
        (["generate", "x", "--model", "{depth}"], "stablekit depth2img"),
        (["img2img", "x", "--image", "{rgb}", "--model", "{upscale}"], "stablekit upscale"),
        (["inpaint", "x", "--image", "{rgb}", "--mask", "{mask}", "--model", "{depth}"], "stablekit depth2img"),
        (["upscale", "{low}", "--model", "{txt2img}"], "stablekit generate"),
        (["depth2img", "x", "--image", "{rgb}", "--depth-map", "{depth16}", "--model", "{txt2img}"], "generate"),
    ],
)
def test_bad_arguments_are_refused(models, images, tmp_path, capsys, args: list[str], message: str) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "o.png"
    paths = {**{k: str(v) for k, v in images.items()}, **{k: str(v) for k, v in models.items()}}
    filled = [a.format(**paths) for a in args]
    rc, err = _run(capsys, [*filled, *FAST, "-o", str(out)])
    _assert_refused(rc, err, message, out)


def test_depth2img_estimates_depth_with_a_transformers_dpt_folder(models, images, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from transformers import DPTForDepthEstimation

    from tests.test_midas import _diffusers_fixture_config

    torch.manual_seed(0)
    folder = tmp_path / "dpt"
    DPTForDepthEstimation(_diffusers_fixture_config()).eval().save_pretrained(folder)
    out = tmp_path / "o.png"
    args = [
        "depth2img",
        "x",
        "--image",
        str(images["rgb"]),
        "--depth-model",
        str(folder),
        "--model",
        str(models["depth"]),
    ]
    rc, err = _run(capsys, [*args, *FAST, "-o", str(out)])
    assert rc == 0, err
    assert out.is_file()
