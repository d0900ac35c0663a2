"""img2img, inpaint, depth2img and upscale against diffusers' own pipelines, on identical tiny random weights.

Each reference pipeline is built from the components of diffusers' own fast tests (``get_dummy_components`` in
``tests/pipelines/stable_diffusion/test_stable_diffusion_{img2img,inpaint}.py`` and
``tests/pipelines/stable_diffusion_2/test_stable_diffusion_{depth,upscale}.py``), typed in here, with every weight
perturbed, and written with diffusers' ``save_pretrained``; OUR loader reads that folder, and diffusers'
``from_pretrained`` reads it back for the reference.

Changed from the fixtures here (``tests/test_diffusers_fixtures.py`` runs them unchanged, with their own small
vocabulary and tokenizer files):

- the CLIP text config: ``intermediate_size`` 37 -> 128 and ``vocab_size`` 1000 -> 49408, with the full CLIP
  tokenizer from :func:`hf_clip_tokenizer`, so these cases also exercise the released tokenizer;
- depth's ``DPTImageProcessor`` is built here rather than downloaded, resizing to the tiny DPT's own 32x32 input
  (transformers refuses any other size for it); with a depth map given it is unused, without one both sides
  estimate depth through it.

Seeds: our image ``i`` uses ``Generator("cpu").manual_seed(seed + i)``, i.e. diffusers called with one generator
per image and the input image (and mask) repeated once per image, so that each image's posterior sample comes from
its own generator. Latents are compared after every step (the final one is what ``output_type="latent"`` returns)
to 1e-4 of their scale, images as uint8 to 2 levels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor

from stablekit.images import from_pil
from stablekit.pipelines import (
    Event,
    Generated,
    GenerationParams,
    Pipeline,
    Progress,
    depth2img,
    img2img,
    inpaint,
    upscale,
)
from stablekit.weights.midas import load_depth_model
from tests.oracles import hf_clip_tokenizer, require
from tests.test_midas import _diffusers_fixture_config

diffusers = require("diffusers")
transformers = require("transformers")

PROMPT = "a red circle on a blue background"
NEGATIVE = "blurry, low quality"
STEPS, GUIDANCE, SEED = 4, 6.0, 5


def _perturb(module: torch.nn.Module, gen: torch.Generator) -> None:
    # Default inits leave norms at 1/0 and some convs at 0; perturb everything so no term is trivially neutral.
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)


# --- diffusers' fixture components --------------------------------------------------------------------------------


def _text_encoder(openclip: bool) -> Any:
    torch.manual_seed(0)
    sd2 = {"hidden_act": "gelu", "projection_dim": 512} if openclip else {}  # the upscale fixture's SD2 values
    config = transformers.CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=2,
        hidden_size=32,
        intermediate_size=128,  # fixture: 37 (see the module docstring)
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=5,
        pad_token_id=1,
        vocab_size=49408,  # fixture: 1000 (see the module docstring)
        **sd2,
    )
    return transformers.CLIPTextModel(config)


def _vae(block_out_channels: list[int], **extra: Any) -> Any:
    torch.manual_seed(0)
    levels = len(block_out_channels)
    return diffusers.AutoencoderKL(
        block_out_channels=block_out_channels,
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        latent_channels=4,
        **extra,
    )


def _unet(in_channels: int, **extra: Any) -> Any:
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        **extra,
    )


def _upscale_unet() -> Any:
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        block_out_channels=(32, 32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=7,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        use_linear_projection=True,
        only_cross_attention=(True, True, False),
        num_class_embeds=100,
    )


def _depth_estimator() -> Any:
    # diffusers' depth fixture's DPT, as test_midas.py types it in
    return transformers.DPTForDepthEstimation(_diffusers_fixture_config()).eval()


def _reference(kind: str, tokenizer: Callable[[str | None], Any]) -> Any:
    """The diffusers pipeline of ``kind``, with the fixture's own scheduler, its networks perturbed."""
    gen = torch.Generator().manual_seed(1234)
    # img2img-v: the same networks under a v_prediction scheduler config (the fixtures have no v model but upscale).
    pndm = diffusers.PNDMScheduler(
        skip_prk_steps=True, prediction_type="v_prediction" if kind.endswith("-v") else "epsilon"
    )
    if kind == "upscale":
        unet, vae, text = _upscale_unet(), _vae([32, 32, 64]), _text_encoder(openclip=True)
    else:
        in_channels = {"img2img": 4, "img2img-v": 4, "inpaint": 9, "inpaint-4ch": 4, "depth": 5}[kind]
        depth = {"attention_head_dim": (2, 4), "use_linear_projection": True} if kind == "depth" else {}
        unet, vae, text = _unet(in_channels, **depth), _vae([32, 64]), _text_encoder(openclip=False)
    for m in (unet, vae, text):
        _perturb(m, gen)
    common = {"vae": vae, "text_encoder": text, "unet": unet}
    if kind == "upscale":
        return diffusers.StableDiffusionUpscalePipeline(
            **common,
            tokenizer=tokenizer("!"),  # OpenCLIP pads with "!" (id 0), as the SD2 tokenizers do
            low_res_scheduler=diffusers.DDPMScheduler(),
            scheduler=diffusers.DDIMScheduler(prediction_type="v_prediction"),
            max_noise_level=350,
        )
    if kind == "depth":
        return diffusers.StableDiffusionDepth2ImgPipeline(
            **common,
            tokenizer=tokenizer(None),
            scheduler=pndm,
            depth_estimator=_depth_estimator(),
            feature_extractor=transformers.DPTImageProcessor(size={"height": 32, "width": 32}),
        )
    cls = (
        diffusers.StableDiffusionImg2ImgPipeline
        if kind.startswith("img2img")
        else diffusers.StableDiffusionInpaintPipeline
    )
    return cls(
        **common,
        tokenizer=tokenizer(None),
        scheduler=pndm,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@dataclass
class Pair:
    ours: Pipeline
    ref: Any
    folder: Path


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Pair]:
    """``pairs(kind)``: our pipeline loaded from the folder diffusers wrote, and diffusers' pipeline; built once."""
    root = tmp_path_factory.mktemp("tasks")
    tokenizers: dict[str | None, Any] = {}
    built: dict[str, Pair] = {}

    def tokenizer(pad: str | None) -> Any:
        if pad not in tokenizers:
            tokenizers[pad] = hf_clip_tokenizer(root / f"tokenizer-{pad or 'eot'}", pad_token=pad)
        return tokenizers[pad]

    def get(kind: str) -> Pair:
        if kind not in built:
            folder = root / kind
            made = _reference(kind, tokenizer)
            made.save_pretrained(folder)
            # Reloaded: an in-memory scheduler config lists the values its class defaulted, and
            # ``from_config`` gives another class its own defaults for those; from the file every value holds.
            ref = type(made).from_pretrained(folder, local_files_only=True)
            ref.set_progress_bar_config(disable=True)
            built[kind] = Pair(Pipeline.from_file(folder, device="cpu", dtype=torch.float32), ref, folder)
        return built[kind]

    return get


# --- inputs ------------------------------------------------------------------------------------------------------


def _rgb(size: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


IMAGE = _rgb(32)
LOW_RES = _rgb(16, seed=1)  # the x4 upscaler's input: a 64x64 output
_mask = np.zeros((32, 32), dtype=np.uint8)
_mask[7:23, 5:19] = 255  # odd edges: the latent mask (nearest, /2) must round them as diffusers does
MASK = Image.fromarray(_mask)
# Relative inverse depth at another size than the latents (16x16), so both sides resize it bicubically.
DEPTH = torch.rand(1, 24, 20, generator=torch.Generator().manual_seed(3)) * 5 + 1


# --- running both ------------------------------------------------------------------------------------------------

SCHEDULERS = {
    # A sampler named by the caller starts from its own defaults, so our "ddim" does not clip x̂₀ to [-1, 1] (the
    # released SD scheduler configs all say clip_sample=false), but DDIMScheduler's class default does, and
    # from_config keeps it when a config lacks the key (PNDM's) or sets it (the upscale fixture's DDIMScheduler):
    # the reference runs without it.
    "ddim": ("DDIMScheduler", {"clip_sample": False}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
}


@dataclass
class Run:
    latents: list[Tensor]  # (B, 4, h, w) after each step
    images: list[Image.Image]


def _ours(events: Iterator[Event]) -> Run:
    evs = list(events)
    return Run(
        [e.latents for e in evs if isinstance(e, Progress)],
        [im for e in evs if isinstance(e, Generated) for im in e.images],
    )


def _theirs(ref: Any, sampler: str, seeds: list[int], **call: Any) -> Run:
    """The reference with ``XScheduler.from_config(its own config)``, one generator and one input per image."""
    name, extra = SCHEDULERS[sampler]
    original = ref.scheduler
    ref.scheduler = getattr(diffusers, name).from_config(original.config, **extra)
    latents: list[Tensor] = []
    n = len(seeds)
    if isinstance(ref, diffusers.StableDiffusionUpscalePipeline):  # no callback_on_step_end there
        hook: dict[str, Any] = {"callback": lambda i, t, x: latents.append(x.clone())}
    else:

        def keep(pipe: Any, i: int, t: Tensor, kwargs: dict[str, Tensor]) -> dict[str, Tensor]:
            latents.append(kwargs["latents"].clone())
            return {}

        hook = {"callback_on_step_end": keep}
    try:
        images = ref(
            prompt=[PROMPT] * n,
            negative_prompt=[NEGATIVE] * n,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
            output_type="pil",
            **hook,
            **{k: [v] * n if isinstance(v, Image.Image) else v for k, v in call.items()},
        ).images
    finally:
        ref.scheduler = original
    return Run(latents, images)


def _params(sampler: str, seed: int = SEED, n: int = 2) -> GenerationParams:
    return GenerationParams(
        PROMPT, NEGATIVE, steps=STEPS, guidance_scale=GUIDANCE, seed=seed, batch_size=n, sampler=sampler
    )


def _latent_diff(got: list[Tensor], want: list[Tensor]) -> float:
    """Max abs difference over all steps, each step's relative to its scale: fp32 rounding grows with the
    latents, which reach tens of units at strength 1 with these random networks (their ε guesses are poor)."""
    assert len(got) == len(want), (len(got), len(want))
    return max(((g - w).abs().max() / max(1.0, w.abs().max().item())).item() for g, w in zip(got, want, strict=True))


def _pixel_diff(got: list[Image.Image], want: list[Image.Image]) -> int:
    assert len(got) == len(want)
    return max(
        int(np.abs(np.asarray(g).astype(int) - np.asarray(w).astype(int)).max()) for g, w in zip(got, want, strict=True)
    )


def _assert_same(got: Run, want: Run) -> None:
    lat, px = _latent_diff(got.latents, want.latents), _pixel_diff(got.images, want.images)
    assert lat <= 1e-4 and px <= 2, (lat, px)


def _task(kind: str, pair: Pair, params: GenerationParams, strength: float) -> tuple[Iterator[Event], dict[str, Any]]:
    """Our task's events and the reference call's task arguments, for one input."""
    if kind.startswith("img2img"):
        return img2img(pair.ours, params, IMAGE, strength=strength), {"image": IMAGE, "strength": strength}
    if kind.startswith("inpaint"):
        # diffusers' inpainting defaults to the UNet's sample_size x the VAE factor (64 here), ours to the input's.
        call = {"image": IMAGE, "mask_image": MASK, "strength": strength, "height": 32, "width": 32}
        return inpaint(pair.ours, params, IMAGE, MASK, strength=strength), call
    if kind == "depth":
        call = {"image": IMAGE, "depth_map": DEPTH, "strength": strength}
        return depth2img(pair.ours, params, IMAGE, depth_map=DEPTH, strength=strength), call
    return upscale(pair.ours, params, LOW_RES, noise_level=20), {"image": LOW_RES, "noise_level": 20}


# --- the tests ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "sampler"),
    [
        ("img2img", "ddim"),
        ("img2img", "dpmpp_2m"),
        ("img2img-v", "ddim"),
        ("img2img-v", "euler_a"),
    ],
)
def test_img2img_matches_diffusers(pairs, kind: str, sampler: str) -> None:  # type: ignore[no-untyped-def]
    pair = pairs(kind)
    assert pair.ours.config.schedule.prediction == ("v" if kind.endswith("-v") else "eps")
    events, call = _task(kind, pair, _params(sampler), 0.6)
    got = _ours(events)
    assert len(got.latents) == int(STEPS * 0.6)  # diffusers' get_timesteps
    _assert_same(got, _theirs(pair.ref, sampler, [SEED, SEED + 1], **call))


@pytest.mark.parametrize("sampler", ["ddim", "euler_a"])
@pytest.mark.parametrize("strength", [1.0, 0.6])
@pytest.mark.parametrize("kind", ["inpaint", "inpaint-4ch"])
def test_inpaint_matches_diffusers(pairs, kind: str, strength: float, sampler: str) -> None:  # type: ignore[no-untyped-def]
    """The 9-channel inpainting UNet (mask and masked-image latents concatenated), and a 4-channel UNet (the
    latents outside the mask replaced by the noised original after every step)."""
    pair = pairs(kind)
    assert pair.ours.config.conditioning == ("inpaint" if kind == "inpaint" else "txt2img")
    events, call = _task(kind, pair, _params(sampler), strength)
    got = _ours(events)
    want = _theirs(pair.ref, sampler, [SEED, SEED + 1], **call)
    _assert_same(got, want)
    if kind == "inpaint-4ch":
        # Latent blending: outside the mask the final latents are the input's own posterior sample (each image's
        # first draw from its generator), whatever the strength.
        gens = [torch.Generator("cpu").manual_seed(SEED + i) for i in range(2)]
        original = pair.ours.encode(from_pil(IMAGE).repeat(2, 1, 1, 1), gens)
        keep = torch.from_numpy(_mask[::2, ::2] == 0)  # the latent mask: nearest, every second pixel
        assert (got.latents[-1] - original)[..., keep].abs().max().item() <= 1e-5
        assert (got.latents[-1] - original)[..., ~keep].abs().max().item() > 0.1


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_depth2img_matches_diffusers(pairs, sampler: str) -> None:  # type: ignore[no-untyped-def]
    pair = pairs("depth")
    assert pair.ours.config.conditioning == "depth"
    events, call = _task("depth", pair, _params(sampler), 0.8)
    _assert_same(_ours(events), _theirs(pair.ref, sampler, [SEED, SEED + 1], **call))


def test_depth2img_with_estimated_depth_matches_diffusers(pairs) -> None:  # type: ignore[no-untyped-def]
    # No depth map: diffusers runs the folder's DPT depth_estimator through its feature_extractor; we load that
    # folder's depth_estimator/ and feature_extractor size with our own MiDaS.
    pair = pairs("depth")
    estimator = load_depth_model(pair.folder)
    assert estimator.size == (32, 32)  # read from the folder's feature_extractor/
    events = depth2img(pair.ours, _params("ddim"), IMAGE, depth_model=estimator, strength=0.8)
    _assert_same(_ours(events), _theirs(pair.ref, "ddim", [SEED, SEED + 1], image=IMAGE, strength=0.8))


def test_depth2img_command_uses_the_folders_own_estimator(pairs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from stablekit.cli import main

    pair = pairs("depth")
    IMAGE.save(tmp_path / "in.png")
    out = tmp_path / "out.png"
    args = ["depth2img", "x", "-i", str(tmp_path / "in.png"), "--model", str(pair.folder), "--steps", "2"]
    assert main([*args, "--seed", str(SEED), "--sampler", "ddim", "--strength", "0.8", "-o", str(out)]) == 0
    params = GenerationParams("x", steps=2, seed=SEED, sampler="ddim")
    estimator = load_depth_model(pair.folder)
    want = _ours(depth2img(pair.ours, params, IMAGE, depth_model=estimator, strength=0.8)).images[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(want))


@pytest.mark.parametrize("sampler", ["ddim", "euler_a"])
def test_upscale_matches_diffusers(pairs, sampler: str) -> None:  # type: ignore[no-untyped-def]
    pair = pairs("upscale")
    cfg = pair.ours.config
    assert (cfg.conditioning, cfg.schedule.prediction, cfg.max_noise_level) == ("upscale", "v", 350)
    events, call = _task("upscale", pair, _params(sampler), 1.0)
    got = _ours(events)
    assert {im.size for im in got.images} == {(64, 64)}
    _assert_same(got, _theirs(pair.ref, sampler, [SEED, SEED + 1], **call))


def test_a_clipping_ddim_config_becomes_the_default_samplers_option(pairs) -> None:  # type: ignore[no-untyped-def]
    # diffusers' upscale fixture saves DDIMScheduler with its class default clip_sample=True: our DDIM clips too
    # when no sampler is named (tests/test_scheduler_configs.py compares the images).
    assert pairs("upscale").ref.scheduler.config.clip_sample
    assert ("clip_sample", True) in pairs("upscale").ours.config.default_sampler_options
    assert not any("clip_sample" in n for n in pairs("upscale").ours.notes)


@pytest.mark.parametrize("kind", ["img2img", "inpaint", "inpaint-4ch", "depth", "upscale"])
def test_batch_of_two_is_two_single_runs(pairs, kind: str) -> None:  # type: ignore[no-untyped-def]
    """Seeds s, s+1 in one batch give the images of two runs with seeds s and s+1, and diffusers' with two
    generators. Euler a draws fresh noise every step, so each image's generator is followed to the end."""
    pair, seed, sampler = pairs(kind), 11, "euler_a"
    strength = 1.0 if kind in ("inpaint", "upscale") else 0.75
    batch = _ours(_task(kind, pair, _params(sampler, seed, n=2), strength)[0])
    singles = [_ours(_task(kind, pair, _params(sampler, s, n=1), strength)[0]) for s in (seed, seed + 1)]
    joined = Run(
        [torch.cat([a, b]) for a, b in zip(singles[0].latents, singles[1].latents, strict=True)],
        singles[0].images + singles[1].images,
    )
    # Batched convolutions round differently from single ones, hence a tolerance rather than equality.
    _assert_same(batch, joined)
    assert _pixel_diff(batch.images[:1], batch.images[1:]) > 32  # two seeds, two different images
    call = _task(kind, pair, _params(sampler, seed, n=2), strength)[1]
    _assert_same(batch, _theirs(pair.ref, sampler, [seed, seed + 1], **call))
