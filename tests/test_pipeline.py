"""Text-to-image end to end against diffusers' StableDiffusionPipeline on identical tiny random weights.

The diffusers pipeline is built from our tiny configs, saved with ``save_pretrained``, and loaded by OUR loader
from that folder, so this also exercises the diffusers-folder path (key tables, configs, scheduler config).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stablekit.config import ModelConfig
from stablekit.images import read_parameters
from stablekit.pipelines import Generated, GenerationParams, Pipeline, Progress, generate, txt2img
from tests.oracles import hf_clip_tokenizer, require
from tests.tiny import TINY_SD1, TINY_SD2_V

diffusers = require("diffusers")
transformers = require("transformers")

PROMPT = "a red circle on a blue background"
NEGATIVE = "blurry, low quality"


def _perturb(module: torch.nn.Module, gen: torch.Generator) -> None:
    # Default inits leave norms at 1/0 and some convs at 0; perturb everything so no term is trivially neutral.
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def build_diffusers_folder(cfg: ModelConfig, root: Path) -> Path:
    from stablekit.weights.tables.text import diffusers_text_config
    from stablekit.weights.tables.unet import diffusers_unet_config
    from stablekit.weights.tables.vae import diffusers_vae_config

    gen = torch.Generator().manual_seed(1234)
    torch.manual_seed(1234)
    unet = diffusers.UNet2DConditionModel(**diffusers_unet_config(cfg.unet, 32))
    vae = diffusers.AutoencoderKL(**diffusers_vae_config(cfg.vae))
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**diffusers_text_config(cfg.text)))
    for m in (unet, vae, text):
        _perturb(m, gen)
    tokenizer = hf_clip_tokenizer(root / "tokenizer-src", pad_token="!" if cfg.text.pad_token == 0 else None)
    scheduler = diffusers.DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="v_prediction" if cfg.schedule.prediction == "v" else "epsilon",
    )
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    folder = root / cfg.name
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=[TINY_SD1, TINY_SD2_V], ids=lambda c: c.name)
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    cfg: ModelConfig = request.param
    folder = build_diffusers_folder(cfg, tmp_path_factory.mktemp(cfg.name))
    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    ours = Pipeline.from_file(folder, device="cpu", dtype=torch.float32)
    return ours, ref, folder


@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_txt2img_matches_diffusers_ddim(pair, guidance: float) -> None:  # type: ignore[no-untyped-def]
    ours, ref, _ = pair
    seed, n, steps = 42, 2, 6
    params = GenerationParams(
        PROMPT,
        NEGATIVE,
        width=64,
        height=64,
        steps=steps,
        guidance_scale=guidance,
        seed=seed,
        batch_size=n,
        sampler="ddim",
    )
    events = list(txt2img(ours, params))
    progress = [e for e in events if isinstance(e, Progress)]
    assert [e.step for e in progress] == list(range(1, steps + 1))
    latents = progress[-1].latents

    def run(output_type: str):  # type: ignore[no-untyped-def]
        return ref(
            PROMPT,
            negative_prompt=NEGATIVE,
            height=64,
            width=64,
            num_inference_steps=steps,
            guidance_scale=guidance,
            num_images_per_prompt=n,
            output_type=output_type,
            generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(n)],
        ).images

    want_latents = run("latent")
    diff = (latents - want_latents).abs().max().item()
    assert diff <= 1e-4, diff
    want_pixels = run("np")  # (B, H, W, 3) in [0, 1]
    got_pixels = (ours.decode(latents) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert np.abs(got_pixels - want_pixels).max() <= 1e-4
    images = [im for e in events if isinstance(e, Generated) for im in e.images]
    want_u8 = (want_pixels * 255).round().astype(np.uint8)
    for im, w in zip(images, want_u8, strict=True):
        assert np.abs(np.asarray(im).astype(int) - w.astype(int)).max() <= 1


@pytest.mark.parametrize(
    ("sampler", "scheduler_class"),
    [
        ("pndm", "PNDMScheduler:plms"),
        ("euler", "EulerDiscreteScheduler"),
        ("dpmpp_2m", "DPMSolverMultistepScheduler"),
        ("Euler a", "EulerAncestralDiscreteScheduler"),  # per-step noise from the per-image generators
        ("DPM++ 2M Karras", "DPMSolverMultistepScheduler:karras"),
    ],
)
def test_sampler_by_name_matches_diffusers_from_config(pair, sampler: str, scheduler_class: str) -> None:  # type: ignore[no-untyped-def]
    """A sampler chosen by name takes the model's own schedule settings, as the model cards'
    ``XScheduler.from_config(pipe.scheduler.config)`` does, and gives the same image for the same seed."""
    ours, ref, _ = pair
    name, _, variant = scheduler_class.partition(":")
    original = ref.scheduler
    # The released SD configs set skip_prk_steps (PLMS); the DDIM config saved here lacks the key.
    extra = {"karras": {"use_karras_sigmas": True}, "plms": {"skip_prk_steps": True}}.get(variant, {})
    ref.scheduler = getattr(diffusers, name).from_config(original.config, **extra)
    try:
        seed, n, steps = 3, 2, 5
        want = ref(
            PROMPT,
            negative_prompt=NEGATIVE,
            height=64,
            width=64,
            num_inference_steps=steps,
            guidance_scale=6.0,
            num_images_per_prompt=n,
            output_type="latent",
            generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(n)],
        ).images
    finally:
        ref.scheduler = original
    params = GenerationParams(
        PROMPT, NEGATIVE, width=64, height=64, steps=steps, guidance_scale=6.0, seed=seed, batch_size=n, sampler=sampler
    )
    latents = [e for e in txt2img(ours, params) if isinstance(e, Progress)][-1].latents
    # fp32 rounding grows with the latents' magnitude (several units for these random weights).
    diff = (latents - want).abs().max().item()
    assert diff <= 1e-4 * max(1.0, want.abs().max().item()), diff


def test_prompt_list_matches_diffusers(pair) -> None:  # type: ignore[no-untyped-def]
    """Several prompts in one call: prompt-major order, one negative per prompt, seeds counted across the batch,
    as diffusers does with ``prompt=[...]`` and ``num_images_per_prompt``."""
    ours, ref, _ = pair
    prompts, negatives, per_prompt, seed, steps = ["a red circle", "a blue square"], ["green", ""], 2, 3, 4
    params = GenerationParams(
        prompts, negatives, width=64, height=64, steps=steps, guidance_scale=6.0, seed=seed,
        batch_size=per_prompt, sampler="ddim",
    )  # fmt: skip
    events = list(txt2img(ours, params))
    latents = [e for e in events if isinstance(e, Progress)][-1].latents
    done = [e for e in events if isinstance(e, Generated)]
    n = len(prompts) * per_prompt
    want = ref(
        prompts,
        negative_prompt=negatives,
        height=64,
        width=64,
        num_inference_steps=steps,
        guidance_scale=6.0,
        num_images_per_prompt=per_prompt,
        output_type="latent",
        generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(n)],
    ).images
    assert (latents - want).abs().max().item() <= 1e-4
    assert done[0].seeds == [3, 4, 5, 6]
    firsts = [text.split("\n")[0] for text in done[0].parameters]
    assert firsts == ["a red circle", "a red circle", "a blue square", "a blue square"]


@pytest.mark.parametrize(
    ("prompt", "negative", "message"),
    [([], "", "no prompt"), (["a", "b"], ["x", "y", "z"], "3 negative prompts for 2 prompts"), ([1], "", "string")],
)
def test_bad_prompt_lists_are_clear_errors(pair, prompt, negative, message: str) -> None:  # type: ignore[no-untyped-def]
    ours, _, _ = pair
    with pytest.raises(ValueError, match=message):
        list(txt2img(ours, GenerationParams(prompt, negative, width=64, height=64, steps=2)))


def test_seed_is_independent_of_batch_position(pair) -> None:  # type: ignore[no-untyped-def]
    ours, _, _ = pair
    common = dict(width=64, height=64, steps=3, guidance_scale=5.0, sampler="ddim")
    batch = generate(ours, GenerationParams(PROMPT, seed=7, batch_size=3, **common))
    alone = generate(ours, GenerationParams(PROMPT, seed=9, **common))
    counted = generate(ours, GenerationParams(PROMPT, seed=7, batch_count=3, **common))

    def u8(im) -> np.ndarray:  # type: ignore[no-untyped-def]
        return np.asarray(im).astype(int)

    # The noise is identical; batched convolutions round differently from single ones, so a pixel may land
    # one uint8 level away. A different seed gives a different image altogether.
    assert np.array_equal(u8(counted[2]), u8(alone[0]))
    assert np.abs(u8(batch[2]) - u8(alone[0])).max() <= 1
    assert np.abs(u8(batch[0]) - u8(batch[1])).mean() > 10


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(width=100), "multiple of 8"),
        (dict(height=0), "multiple of 8"),
        (dict(steps=0), "steps"),
        (dict(guidance_scale=-1.0), "guidance"),
        (dict(batch_size=0), "batch"),
        (dict(seed=-5), "seed"),
        (dict(sampler="no-such-sampler"), "no-such-sampler"),
    ],
)
def test_bad_parameters_are_clear_errors(pair, change: dict, message: str) -> None:  # type: ignore[no-untyped-def]
    ours, _, _ = pair
    params = GenerationParams(PROMPT, **{"width": 64, "height": 64, "steps": 2, **change})
    with pytest.raises(ValueError, match=message):
        list(txt2img(ours, params))


# A1111's infotext line: `Key: value, Key: "quoted, value", ...` (modules/infotext_utils.py parses it with a
# regex of this shape; we check our line splits into the fields we wrote).
_FIELD = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def test_png_carries_a1111_parameters(pair, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from stablekit.cli import main

    _, _, folder = pair
    out = tmp_path / "img.png"
    rc = main(
        [
            "generate",
            "a cat, sitting: on a mat",
            "--model",
            str(folder),
            "--negative",
            "dog",
            "--steps",
            "2",
            "--sampler",
            "dpmpp_2m_karras",
            "--seed",
            "5",
            "-W",
            "64",
            "-H",
            "64",
            "--batch-size",
            "2",
            "-o",
            str(out),
        ]
    )
    assert rc == 0
    for i in range(2):
        text = read_parameters(tmp_path / f"img-{i}.png")
        assert text is not None
        prompt, negative, settings = text.split("\n")
        assert prompt == "a cat, sitting: on a mat"
        assert negative == "Negative prompt: dog"
        fields = dict(_FIELD.findall(settings))
        assert fields["Steps"] == "2"
        assert fields["Seed"] == str(5 + i)
        assert fields["Size"] == "64x64"
        assert fields["Sampler"] == "DPM++ 2M Karras"  # A1111's name, whatever spelling was asked for


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--width", "100"], "multiple of 8"),
        (["--steps", "0"], "steps"),
        (["-o", "out.jpg"], ".png"),
    ],
)
def test_cli_bad_input_exits_1(pair, tmp_path: Path, capsys, args: list[str], message: str) -> None:  # type: ignore[no-untyped-def]
    from stablekit.cli import main

    _, _, folder = pair
    rc = main(["generate", "x", "--model", str(folder), "-o", str(tmp_path / "o.png"), *args])
    assert rc == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()


def test_cli_missing_model_exits_1(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from stablekit.cli import main

    rc = main(["generate", "x", "--model", str(tmp_path / "nope.safetensors"), "-o", str(tmp_path / "o.png")])
    assert rc == 1
    assert "nope.safetensors" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_generation_is_finite_and_close(pair, dtype: torch.dtype) -> None:  # type: ignore[no-untyped-def]
    _, _, folder = pair
    params = GenerationParams(PROMPT, width=64, height=64, steps=3, guidance_scale=7.5, seed=11, sampler="ddim")
    full = generate(Pipeline.from_file(folder, device="cpu", dtype=torch.float32), params)[0]
    half = generate(Pipeline.from_file(folder, device="cpu", dtype=dtype), params)[0]
    diff = np.abs(np.asarray(full).astype(int) - np.asarray(half).astype(int))
    # bf16 keeps 8 mantissa bits to fp16's 11: its images drift further from fp32's.
    mean_limit = 3 if dtype == torch.float16 else 8
    assert diff.mean() < mean_limit and diff.max() < 64, (diff.mean(), diff.max())


def test_nan_is_an_error_not_a_black_png(pair, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from stablekit.cli import main
    from stablekit.pipelines import NonFiniteError
    from stablekit.weights import load_model, save_model

    _, _, folder = pair
    loaded = load_model(folder)
    with torch.no_grad():
        # Finite weights (a file holding NaN is refused at load) whose output overflows while sampling.
        loaded.model.model.diffusion_model.out[2].weight.fill_(3e38)
    broken = tmp_path / "broken.safetensors"
    save_model(loaded, None, broken)
    params = GenerationParams(PROMPT, width=64, height=64, steps=2, seed=1, sampler="ddim")
    with pytest.raises(NonFiniteError, match="NaN"):
        generate(Pipeline.from_file(broken, device="cpu", dtype=torch.float32), params)
    out = tmp_path / "black.png"
    args = ["generate", "x", "--model", str(broken), "--steps", "2", "-W", "64", "-H", "64", "-o", str(out)]
    assert main(args) == 1
    assert "NaN" in capsys.readouterr().err
    assert not out.exists()


def test_cli_sampler_overrides(pair, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from stablekit.cli import main

    _, _, folder = pair
    base = ["generate", "x", "--model", str(folder), "-W", "64", "-H", "64", "--steps", "3", "--seed", "2"]
    assert main([*base, "--sampler", "ddim", "-o", str(tmp_path / "a.png")]) == 0
    assert main([*base, "--sampler", "ddim", "--eta", "1", "-o", str(tmp_path / "b.png")]) == 0
    a, b = (np.asarray(Image.open(tmp_path / n)).astype(int) for n in ("a.png", "b.png"))
    assert np.abs(a - b).mean() > 1  # eta=1 draws fresh noise each step: a different image
    assert main([*base, "--sampler", "pndm", "--eta", "0.5", "-o", str(tmp_path / "c.png")]) == 1
    assert "no option 'eta'" in capsys.readouterr().err
