"""The demo x4 upscaler: the shipped file, the upscaler training stage (its conditioning, loss and exact resume)
and the ``stablekit train demo-upscaler`` command."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

import stablekit.demo
from stablekit.config import DEMO, DEMO_X4, PRESETS
from stablekit.models.ldm import LatentDiffusion
from stablekit.train.stages import StepContext, UpscalerStage, lanczos_downsample
from stablekit.train.trainer import Trainer
from tests.test_resume import _state
from tests.test_trainer import SIZE, quick, toy_data
from tests.tiny import TINY_X4

# --- the shipped file ------------------------------------------------------------------------------------------


def test_shipped_upscaler_loads_strictly_as_demo_x4() -> None:
    from stablekit.weights import load_model, read_checkpoint

    path = stablekit.demo.upscaler_path()
    assert path == stablekit.demo.UPSCALER and path.parent == stablekit.demo.MODEL.parent
    loaded = load_model(path)  # strict: a missing, extra or mis-shaped tensor raises
    assert loaded.family == "x4-upscaler" and loaded.absent == []
    assert loaded.schedule_source == "the file's stablekit config"
    # Everything but the measured latent scale is the preset's.
    assert replace(loaded.config, vae=replace(loaded.config.vae, scale_factor=1.0)) == replace(
        DEMO_X4, vae=replace(DEMO_X4.vae, scale_factor=1.0)
    )
    assert 0.05 < loaded.config.vae.scale_factor < 20
    tensors = read_checkpoint(path).tensors
    assert tensors is not None
    assert {t.dtype for t in tensors.values() if t.is_floating_point()} == {torch.float16}
    assert all(torch.isfinite(t.float()).all() for t in tensors.values() if t.is_floating_point())


def test_shipped_upscaler_reuses_the_demo_text_tower() -> None:
    from stablekit.weights import read_checkpoint

    ours, demo = read_checkpoint(stablekit.demo.upscaler_path()), read_checkpoint(stablekit.demo.model_path())
    assert ours.tensors is not None and demo.tensors is not None
    text = sorted(k for k in demo.tensors if k.startswith("cond_stage_model."))
    assert text and text == sorted(k for k in ours.tensors if k.startswith("cond_stage_model."))
    assert all(torch.equal(ours.tensors[k], demo.tensors[k]) for k in text)


def test_the_package_demo_weights_stay_under_40_mb() -> None:
    files = sorted(stablekit.demo.MODEL.parent.glob("*.safetensors"))
    assert stablekit.demo.UPSCALER in files and stablekit.demo.MODEL in files
    assert sum(f.stat().st_size for f in files) < 40_000_000


def test_shipped_upscaler_beats_bicubic_on_held_out_shapes() -> None:
    """Its defaults (through the pipeline API) on the demo's 64 px renders, against the same drawings at 256 px:
    closer than PIL's bicubic on average. Not on every image: its edges are sharp but not always in place."""
    import numpy as np
    from PIL import Image

    from stablekit.pipelines import GenerationParams, Pipeline, collect, upscale
    from stablekit.train.demo_data import held_out_prompts, render

    def psnr(a: Image.Image, b: Image.Image) -> float:
        err = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
        return float(10 * np.log10(255.0**2 / np.mean(err**2)))

    pipe = Pipeline.from_file(stablekit.demo.upscaler_path(), device="cpu")
    ours, bicubic = [], []
    for i, (prompt, attrs) in enumerate(held_out_prompts(6)):
        low, ref = render(attrs, 64), render(attrs, 256)
        (out,) = collect(upscale(pipe, GenerationParams(prompt, seed=i), low))
        assert out.size == (256, 256)
        ours.append(psnr(out, ref))
        bicubic.append(psnr(low.resize((256, 256), Image.Resampling.BICUBIC), ref))
    assert np.mean(ours) > np.mean(bicubic) + 0.3, (ours, bicubic)


def test_demo_x4_preset() -> None:
    assert PRESETS["demo-x4"] is DEMO_X4
    cfg = DEMO_X4
    assert cfg.conditioning == "upscale" and cfg.schedule.prediction == "v" and cfg.low_res_schedule is not None
    assert cfg.vae.downsample == 4 and cfg.unet.in_channels == cfg.vae.embed_dim + 3
    assert cfg.unet.num_classes is not None and cfg.unet.num_classes >= cfg.max_noise_level + 1
    assert cfg.text == DEMO.text and cfg.default_size == 4 * DEMO.default_size


def test_a_missing_upscaler_says_how_to_make_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(stablekit.demo, "UPSCALER", tmp_path / "upscaler.safetensors")
    with pytest.raises(FileNotFoundError, match="stablekit train demo-upscaler"):
        stablekit.demo.upscaler_path()


# --- the training stage ----------------------------------------------------------------------------------------


def _stage(config: Any = TINY_X4, seed: int = 0, **kw: Any) -> UpscalerStage:
    torch.manual_seed(seed)
    return UpscalerStage(LatentDiffusion(config), config, **kw)


def _low_res_alphas_cumprod() -> torch.Tensor:
    from diffusers import DDPMScheduler

    # diffusers' StableDiffusionUpscalePipeline low_res_scheduler (the released x4's), as a reference.
    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02, num_train_timesteps=1000)
    return ref.alphas_cumprod.float()  # type: ignore[attr-defined]


def test_lanczos_downsample_matches_pil() -> None:
    from PIL import Image

    from stablekit.images import from_pil

    g = torch.Generator().manual_seed(0)
    # Values in [0.2, 0.8]: PIL keeps 8 bits between its two passes, so an overshoot past 0 or 1 would be clipped.
    coarse = 0.2 + 0.6 * torch.rand(1, 3, 12, 10, generator=g)
    smooth = torch.nn.functional.interpolate(coarse, size=(96, 80), mode="bilinear")
    image = Image.fromarray((smooth[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
    ours = lanczos_downsample(from_pil(image), 4)
    ref = from_pil(image.resize((20, 24), Image.Resampling.LANCZOS))  # PIL: (width, height)
    assert ours.shape == ref.shape == (1, 3, 24, 20)
    # Away from the border (where PIL renormalises a clipped kernel) they differ by PIL's rounding to 8 bits.
    inner = (slice(None), slice(None), slice(3, -3), slice(3, -3))
    torch.testing.assert_close(ours[inner], ref[inner], atol=1.01 / 127.5, rtol=0)
    assert (ours - ref).abs().max() < 0.05
    with pytest.raises(ValueError, match="multiple"):
        lanczos_downsample(torch.zeros(1, 3, 10, 10), 4)


@pytest.mark.parametrize("low_res_filter", ["bicubic", "lanczos"])
def test_the_unet_sees_noised_low_res_crops_and_their_noise_level(low_res_filter: Any) -> None:
    """cat[z_t, √ᾱ_ℓ·lr + √(1-ᾱ_ℓ)·n] with y = ℓ: the low-res half checked against the crop's downsample and the
    reference schedule, the label against the training range."""
    crop, b = 16, 64
    stage = _stage(crop=crop, low_res_filter=low_res_filter)
    seen: dict[str, torch.Tensor] = {}

    def spy(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen["x"], seen["t"], seen["context"], seen["y"] = args

    stage.module.register_forward_pre_hook(spy, with_kwargs=True)
    g = torch.Generator().manual_seed(1)
    # Images whose every crop differs: a smooth random field, so a wrong crop or scale shows.
    images = torch.nn.functional.interpolate(torch.rand(b, 3, 6, 6, generator=g) * 2 - 1, size=(SIZE, SIZE))
    ctx = StepContext(0, 0, slice(0, b), b, 1, 1, torch.device("cpu"), lambda x: x)
    loss, value = stage.loss((images, ["a red circle"] * b), ctx)
    assert torch.isfinite(loss) and loss.requires_grad and value == loss.detach()

    x, y = seen["x"], seen["y"]
    f = TINY_X4.vae.downsample
    assert x.shape == (b, 4 + 3, crop // f, crop // f)
    assert y.dtype == torch.long and 0 <= int(y.min()) and int(y.max()) <= TINY_X4.max_noise_level
    assert len(set(y.tolist())) > b // 2  # drawn per example
    ac = _low_res_alphas_cumprod()[y].reshape(-1, 1, 1, 1)
    low = x[:, 4:]
    # Each row must be some crop's antialiased downsample, noised: find the crop by least residual.
    windows = images.unfold(2, crop, 1).unfold(3, crop, 1)  # (b, 3, nY, nX, crop, crop)
    n_y, n_x = windows.shape[2:4]
    for i in range(b):
        cand = windows[i].permute(1, 2, 0, 3, 4).reshape(n_y * n_x, 3, crop, crop)
        if low_res_filter == "lanczos":
            down = lanczos_downsample(cand, f).clamp(-1, 1)  # checked against PIL above
        else:
            down = torch.nn.functional.interpolate(cand, scale_factor=1 / f, mode="bicubic", antialias=True)
            down = down.clamp(-1, 1)
        resid = low[i] - ac[i].sqrt() * down  # (candidates, 3, h, w): √(1-ᾱ)·n for the right crop
        best = int(resid.square().mean(dim=(1, 2, 3)).argmin())
        std = float(resid[best].std())
        assert std == pytest.approx(float((1 - ac[i]).sqrt()), rel=0.25, abs=2e-3), (i, int(y[i]))
    # The text context is the (partly dropped) caption's, the timesteps cover the training range.
    assert seen["context"].shape[:2] == (b, TINY_X4.text.context_length)
    assert seen["t"].min() >= 0 and seen["t"].max() < TINY_X4.schedule.num_train_timesteps


def test_an_upscaler_stage_needs_an_upscaler_config() -> None:
    from tests.tiny import TINY_SD2_V

    with pytest.raises(ValueError, match="upscale"):
        UpscalerStage(LatentDiffusion(TINY_SD2_V), TINY_SD2_V)
    few_labels = replace(TINY_X4, unet=replace(TINY_X4.unet, num_classes=100))
    with pytest.raises(ValueError, match="class labels"):
        UpscalerStage(LatentDiffusion(few_labels), few_labels)


def test_a_few_upscaler_steps_lower_the_loss(tmp_path: Path) -> None:
    data = toy_data(16)
    stage = _stage(crop=16)
    labels = stage.module.label_emb.weight
    assert not labels.any()  # zero-initialised: an untrained level's row adds nothing to the time embedding
    Trainer(stage, data, quick(steps=30, log_every=5, lr=2e-3, warmup=5), tmp_path).fit()
    trained = labels.detach().abs().sum(dim=1) > 0
    assert 0 < int(trained.sum()) < TINY_X4.max_noise_level + 1  # the levels drawn, not the others
    losses = [json.loads(line)["loss"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and all(map(torch.isfinite, torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0]
    assert (tmp_path / "model.safetensors").is_file()


def test_upscaler_resume_continues_exactly(tmp_path: Path) -> None:
    data = toy_data(10)
    n, k = 4, 2
    cfg = dict(checkpoint_every=100, log_every=1)
    straight = Trainer(_stage(crop=16), data, quick(steps=n, **cfg), tmp_path / "straight")
    straight.fit()
    Trainer(_stage(crop=16), data, quick(steps=k, **cfg), tmp_path / "split").fit()
    stage = _stage(crop=16, seed=7)  # other initial weights: every trained one must come from the checkpoint
    stage.model.first_stage_model.load_state_dict(straight.stage.model.first_stage_model.state_dict())  # type: ignore[attr-defined]
    stage.model.cond_stage_model.load_state_dict(straight.stage.model.cond_stage_model.state_dict())  # type: ignore[attr-defined]
    resumed = Trainer(stage, data, quick(steps=n, **cfg), tmp_path / "split")
    torch.manual_seed(123)
    resumed.fit(resume=True)
    assert resumed.resumed_from == k and resumed.step == n
    a, b = _state(straight), _state(resumed)
    assert a.keys() == b.keys()
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different, different[:5]
    logs = [(tmp_path / run / "log.jsonl").read_text() for run in ("straight", "split")]
    assert logs[0].count("\n") == n and [json.loads(r)["loss"] for r in logs[0].splitlines()] == [
        json.loads(r)["loss"] for r in logs[1].splitlines()
    ]


def test_the_decoder_stage_keeps_the_encoder_and_the_latent_scale(tmp_path: Path) -> None:
    from stablekit.train.stages import DecoderStage, VAEStage
    from stablekit.weights import read_checkpoint
    from stablekit.weights.detect import METADATA_KEY, config_from_json

    data = toy_data(8)
    torch.manual_seed(0)
    Trainer(VAEStage(TINY_X4), data, quick(steps=2), tmp_path / "vae").fit()
    before = read_checkpoint(tmp_path / "vae" / "vae.safetensors")
    stage = DecoderStage(tmp_path / "vae" / "vae.safetensors", crop=16)
    assert stage.name == "decoder" and not any(p.requires_grad for p in stage.module.encoder.parameters())
    Trainer(stage, data, quick(steps=3, lr=1e-2), tmp_path / "decoder").fit()
    after = read_checkpoint(tmp_path / "decoder" / "vae.safetensors")
    assert before.tensors is not None and after.tensors is not None and before.tensors.keys() == after.tensors.keys()
    changed = {k for k in before.tensors if not torch.equal(before.tensors[k], after.tensors[k])}
    decoder_side = ("first_stage_model.decoder.", "first_stage_model.post_quant_conv.")
    assert changed and all(k.startswith(decoder_side) for k in changed)
    assert {k.split(".")[1] for k in after.tensors} >= {"encoder", "quant_conv", "post_quant_conv", "decoder"}
    scale = [config_from_json(c.metadata[METADATA_KEY]).vae.scale_factor for c in (before, after)]
    assert scale[0] == scale[1]


# --- the command -----------------------------------------------------------------------------------------------


def test_train_demo_upscaler_reaches_the_recipe(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import stablekit.train.recipe as recipe
    from stablekit.cli import main

    calls: list[tuple[Any, Any, Any]] = []

    def fake(out: Any, rec: Any, *, install: Any) -> dict[str, Any]:
        calls.append((out, rec, install))
        return {"upscaler": {"steps": rec.unet.steps}, "recipe": {}}

    monkeypatch.setattr(recipe, "train_demo_upscaler", fake)
    assert main(["train", "demo-upscaler", "--out", str(tmp_path / "x4"), "--seed", "3"]) == 0
    assert main(["train", "demo-upscaler", "--out", "o", "--install", str(tmp_path / "u.safetensors")]) == 0
    (out, rec, install), (_, rec2, install2) = calls
    assert out == str(tmp_path / "x4") and isinstance(rec, recipe.UpscalerRecipe) and rec.seed == 3
    assert rec.config is DEMO_X4 and rec.text_from == stablekit.demo.MODEL
    assert install == stablekit.demo.UPSCALER and install2 == tmp_path / "u.safetensors" and rec2.seed == 0
