"""The pipeline layer's own behaviour: what every task shares (inference mode, settings per pipeline, the fp16
decode fallback, UNet tiling) and what the tasks mean on the demo model."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import stablekit.nn.attention as attn_module
from stablekit.config import DEMO
from stablekit.demo import model_path
from stablekit.images import ImageError, load_image, to_rgb
from stablekit.models.ldm import LatentDiffusion
from stablekit.pipelines import (
    Conditioning,
    Generated,
    GenerationParams,
    Pipeline,
    Progress,
    collect,
    img2img,
    inpaint,
    txt2img,
)
from stablekit.pipelines.conditioning import conditioned
from stablekit.train.demo_data import Attributes, render
from tests.tiny import TINY_SD1


@pytest.fixture(scope="module")
def demo() -> Pipeline:
    return Pipeline.from_file(model_path(), device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def tiny() -> Pipeline:
    torch.manual_seed(0)
    return Pipeline(LatentDiffusion(TINY_SD1), TINY_SD1, device="cpu", dtype=torch.float32)


FAST = GenerationParams("a red circle on a blue background", width=32, height=32, steps=2, seed=1, sampler="ddim")


def test_events_reach_the_caller_outside_inference_mode(tiny: Pipeline) -> None:
    seen = []
    for ev in txt2img(tiny, FAST):
        seen.append(torch.is_inference_mode_enabled())
        if isinstance(ev, Progress):
            ev.latents.clone() * 2  # a caller's own tensor work between steps
    assert seen and not any(seen)


def test_load_notes_are_not_events(tiny: Pipeline) -> None:
    tiny.notes.append("an assumption made while loading")
    try:
        events = list(txt2img(tiny, FAST))
    finally:
        tiny.notes.pop()
    assert not any("assumption" in getattr(ev, "message", "") for ev in events)


def test_attention_backend_is_a_pipeline_setting(tiny: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    kernel = attn_module._math

    def recording(*args: object) -> torch.Tensor:
        calls.append(1)
        return kernel(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(attn_module, "_math", recording)
    math = Pipeline(tiny.model, tiny.config, device="cpu", dtype=torch.float32, attention="math")
    collect(txt2img(tiny, FAST))  # sdpa: never the math kernel
    assert calls == []
    collect(txt2img(math, FAST))
    assert calls
    assert attn_module.get_backend() == "sdpa"  # nothing left switched on for anyone else


def test_fp16_decode_fallback_leaves_the_shared_vae_alone() -> None:
    torch.manual_seed(0)
    pipe = Pipeline(LatentDiffusion(TINY_SD1), TINY_SD1, device="cpu", dtype=torch.float16)
    # Latents whose unscaled values (z / 0.18215 ≈ 1e5) overflow fp16 (max 65504) but not fp32, where the
    # decoder's first GroupNorm brings them back to a normal range.
    z = torch.randn(1, 4, 4, 4) * 2e4
    with torch.inference_mode():
        assert not torch.isfinite(pipe.model.first_stage_model.decode((z / 0.18215).half())).all()
    pixels = pipe.decode(z)
    assert torch.isfinite(pixels).all() and pixels.dtype == torch.float32
    assert {p.dtype for p in pipe.model.first_stage_model.parameters()} == {torch.float16}


def test_tiled_unet_is_exact_for_a_pointwise_model() -> None:
    # Tiles are cross-faded with weights that sum to one: a model without spatial context gives the same output
    # tiled or not, and every window it sees is at most the tile size.
    windows: list[tuple[int, ...]] = []

    def pointwise(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        windows.append(tuple(x.shape[-2:]))
        return x[:, :4] * 2 + x[:, 4:5] + context.mean() + (0 if y is None else y.float()[:, None, None, None])

    b, h, w = 2, 40, 56
    cond = Conditioning(torch.randn(b, 3, 8), torch.randn(b, 3, 8), torch.randn(b, 3, h, w), torch.tensor([5, 7]))
    x, t = torch.randn(b, 4, h, w), torch.full((b,), 10.0)
    whole = conditioned(pointwise, cond, 7.5)(x, t)
    windows.clear()
    tiles = conditioned(pointwise, cond, 7.5, tile=16, overlap=4)(x, t)
    torch.testing.assert_close(tiles, whole, atol=1e-5, rtol=1e-5)
    assert len(windows) > 1 and all(max(s) <= 16 for s in windows)


def test_api_refuses_what_is_not_an_image(tiny: Pipeline) -> None:
    with pytest.raises(ValueError, match="PIL image"):
        collect(img2img(tiny, FAST, np.zeros((32, 32, 3)), 0.5))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least"):
        collect(img2img(tiny, FAST, Image.new("RGB", (1, 40)), 0.5))


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    im = Image.new("RGB", (40, 24), (255, 0, 0))
    ImageDraw.Draw(im).rectangle([0, 0, 7, 7], fill=(0, 0, 255))  # a blue corner, top left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display", as phones store portrait photos
    path = tmp_path / "sideways.jpg"
    im.save(path, exif=exif.tobytes(), quality=95)
    shown = load_image(path)
    assert shown.size == (24, 40)
    assert shown.getpixel((20, 3))[2] > 200  # the stored top-left corner is now top right


def test_transparency_is_flattened_on_white() -> None:
    im = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # fully transparent black
    assert to_rgb(im).getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("fmt", ["GIF", "TIFF", "BMP", "EPS"])
def test_only_png_jpeg_and_webp_are_decoded(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"image.{fmt.lower()}"
    if fmt == "EPS":  # PIL writes EPS only through Ghostscript: these are the bytes such a file starts with
        path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n")
    else:
        Image.new("RGB", (8, 8)).save(path, format=fmt)
    with pytest.raises(ImageError, match="PNG, JPEG or WebP"):
        load_image(path)
    webp = tmp_path / "ok.webp"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(webp, format="WEBP", lossless=True)
    assert load_image(webp).getpixel((0, 0)) == (1, 2, 3)


def test_a_truncated_image_is_an_error(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buf, format="PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buf.getvalue()[:60])
    with pytest.raises(ImageError):
        load_image(path)


# --- meaning, on the demo model ---------------------------------------------------------------------------------


def _source() -> Image.Image:
    return render(Attributes("circle", "red", "blue"), DEMO.default_size)


def test_img2img_at_strength_zero_is_the_autoencoder_round_trip(demo: Pipeline) -> None:
    src = _source()
    params = GenerationParams("a red circle on a blue background", seed=7)
    events = list(img2img(demo, params, src, 0.0))
    assert not any(isinstance(ev, Progress) for ev in events)  # no step runs
    got = next(ev for ev in events if isinstance(ev, Generated)).images[0]
    x = torch.from_numpy(np.asarray(src, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    # The input encoded with seed 7's posterior draw, then decoded: computed here from the models directly.
    with torch.inference_mode():
        vae = demo.model.first_stage_model
        z = vae.encode(x).sample(torch.Generator().manual_seed(7))
        rt = vae.decode(z)
    want = ((rt[0].permute(1, 2, 0).numpy() / 2 + 0.5).clip(0, 1) * 255).round().astype(np.uint8)
    assert np.abs(np.asarray(got).astype(int) - want.astype(int)).max() <= 1
    assert np.abs(np.asarray(got).astype(int) - np.asarray(src).astype(int)).mean() < 3


def test_inpainting_changes_the_mask_and_keeps_the_rest(demo: Pipeline) -> None:
    src = _source()
    size = DEMO.default_size
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).rectangle([16, 16, 47, 47], fill=255)
    params = GenerationParams("a green square on a blue background", seed=1)
    got = np.asarray(collect(inpaint(demo, params, src, mask))[0]).astype(int)
    a = np.asarray(src).astype(int)
    inside = np.asarray(mask) > 127
    green = np.array([40, 165, 60])
    centre = got[24:40, 24:40].reshape(-1, 3).mean(0)
    assert np.abs(centre - green).max() < 40, centre  # the red circle became green
    assert np.abs(got - a)[inside].mean() > 40
    # Outside the mask, away from its edge by one latent cell (the decoder mixes neighbouring cells), the image is
    # the input up to the autoencoder round trip.
    far = np.ones_like(inside)
    far[8:56, 8:56] = False
    with torch.inference_mode():
        x = torch.from_numpy(a.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
        rt = demo.decode(demo.encode(x, sample=False))
    round_trip = np.abs(((rt[0].permute(1, 2, 0).numpy() + 1) * 127.5).round() - a)
    assert np.abs(got - a)[far].max() <= round_trip[far].max() + 8
    assert np.abs(got - a)[far].mean() <= 2 * round_trip[far].mean() + 1


def test_explicit_seeds_give_each_image_its_own_requests_image(tiny: Pipeline) -> None:
    # How the server batches requests: one UNet batch, each image with its own request's seed and prompt.
    base = GenerationParams("x", width=64, height=64, steps=3, guidance_scale=5.0, sampler="euler_a")
    alone = [collect(txt2img(tiny, replace(base, prompt=p, seed=s)))[0] for p, s in (("a cat", 7), ("a dog", 3))]
    together = collect(txt2img(tiny, replace(base, prompt=["a cat", "a dog"], seeds=[7, 3])))
    assert len(together) == 2
    for a, b in zip(alone, together, strict=True):
        diff = np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max()
        assert diff <= 1, diff  # batched matmuls may round differently in the last bit
    with pytest.raises(ValueError, match="one per image"):
        collect(txt2img(tiny, replace(base, seeds=[1, 2])))
