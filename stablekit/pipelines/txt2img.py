"""Text-to-image: prompt -> CLIP context -> sampler over the UNet -> VAE decode -> images.

The pipeline is a generator of events (:class:`Notice`, :class:`Progress`, :class:`Generated`), so the CLI's
progress bar, the server's progress messages and previews all consume the same loop.

Seeds follow diffusers called with one ``torch.Generator("cpu").manual_seed(seed + i)`` per image: image ``i`` of
a batch gets its own generator, so its noise (and therefore the image) is the same whatever the batch size, the
position in the batch or the device.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from stablekit.diffusion import SAMPLERS, guided, resolve_sampler, sample
from stablekit.images import format_parameters, to_pil
from stablekit.pipelines.core import Pipeline

MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class GenerationParams:
    # One prompt, or several: each then gets batch_size images (prompt-major, as diffusers orders them).
    prompt: str | Sequence[str]
    negative_prompt: str | Sequence[str] = ""  # one for all prompts, or one per prompt
    width: int | None = None  # None: the family's default size
    height: int | None = None
    steps: int | None = None  # None: the family's default
    guidance_scale: float | None = None  # guidance is on when > 1
    seed: int | None = None  # None: a random seed, reported back
    batch_size: int = 1
    batch_count: int = 1
    sampler: str | None = None  # None: the family's default (from the released scheduler configs)
    sampler_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Notice:
    """Something the user should know before the images arrive (a truncated prompt, an assumption)."""

    message: str


@dataclass
class Progress:
    batch: int  # 0-based index within batch_count
    step: int  # 1-based
    total: int
    latents: Tensor  # (B, 4, h, w) after this step
    denoised: Tensor  # (B, 4, h, w) x0 estimate, for previews


@dataclass
class Generated:
    batch: int
    images: list[Image.Image]
    seeds: list[int]
    parameters: list[str]  # A1111-style "parameters" text, one per image


Event = Notice | Progress | Generated


@dataclass(frozen=True)
class _Resolved:
    width: int
    height: int
    steps: int
    guidance: float
    seed: int
    sampler: str
    prompts: list[str]  # one per image of a batch
    negatives: list[str]


def _prompt_list(value: str | Sequence[str], what: str) -> list[str]:
    items = [value] if isinstance(value, str) else list(value)
    if not all(isinstance(p, str) for p in items):
        raise ValueError(f"{what} must be a string or a list of strings")
    return items


def _resolve(pipe: Pipeline, p: GenerationParams) -> _Resolved:
    cfg = pipe.config
    width = p.width if p.width is not None else cfg.default_size
    height = p.height if p.height is not None else cfg.default_size
    for name, v in (("width", width), ("height", height)):
        if v <= 0 or v % 8:
            raise ValueError(f"{name} must be a positive multiple of 8, got {v}")
    steps = p.steps if p.steps is not None else cfg.default_steps
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    guidance = p.guidance_scale if p.guidance_scale is not None else cfg.default_guidance
    if guidance < 0:
        raise ValueError(f"guidance scale must be >= 0, got {guidance}")
    if p.batch_size < 1 or p.batch_count < 1:
        raise ValueError(f"batch size and count must be >= 1, got {p.batch_size} and {p.batch_count}")
    seed = p.seed if p.seed is not None else random.randint(0, MAX_SEED)
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be in [0, {MAX_SEED}], got {seed}")
    sampler = resolve_sampler(p.sampler if p.sampler is not None else cfg.default_sampler)
    prompts = _prompt_list(p.prompt, "prompt")
    if not prompts:
        raise ValueError("no prompt given (an empty list)")
    negatives = _prompt_list(p.negative_prompt, "negative prompt")
    if len(negatives) == 1:
        negatives *= len(prompts)
    elif len(negatives) != len(prompts):
        raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts: give one, or one per prompt")
    per_image = [(q, n) for q, n in zip(prompts, negatives, strict=True) for _ in range(p.batch_size)]
    return _Resolved(
        width, height, steps, guidance, seed, sampler, [q for q, _ in per_image], [n for _, n in per_image]
    )


def initial_noise(
    seeds: Sequence[int], shape: tuple[int, ...], dtype: torch.dtype
) -> tuple[Tensor, list[torch.Generator]]:
    """One CPU generator per image, each drawing its own (1, C, h, w) noise, as diffusers does with a list of
    generators. The generators are returned so samplers that draw per-step noise continue the same streams."""
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    noise = torch.cat([torch.randn((1, *shape), generator=g, dtype=dtype) for g in gens])
    return noise, gens


def txt2img(pipe: Pipeline, params: GenerationParams) -> Iterator[Event]:
    r = _resolve(pipe, params)
    cfg = pipe.config
    for note in pipe.notes:
        yield Notice(note)
    cond, dropped = pipe.encode_prompt(r.prompts)
    if dropped:
        yield Notice(f"prompt truncated to {cfg.text.context_length} tokens; dropped: {dropped!r}")
    uncond = None
    if r.guidance > 1:
        uncond, dropped_neg = pipe.encode_prompt(r.negatives)
        if dropped_neg:
            yield Notice(f"negative prompt truncated; dropped: {dropped_neg!r}")
    model = guided(pipe.unet_fn, cond, uncond, r.guidance)
    f = cfg.vae.downsample
    latent_shape = (cfg.unet.out_channels, r.height // f, r.width // f)
    settings = {
        "Steps": r.steps,
        "Sampler": SAMPLERS[r.sampler].display_name,
        "CFG scale": r.guidance,
        "Seed": None,
        "Size": f"{r.width}x{r.height}",
        "Model": pipe.name,
        "Version": f"stablekit {pipe.version}",
    }
    per_batch = len(r.prompts)
    for batch in range(params.batch_count):
        seeds = [r.seed + batch * per_batch + i for i in range(per_batch)]
        noise, gens = initial_noise(seeds, latent_shape, pipe.dtype)
        noise = noise.to(pipe.device)
        latents = noise
        with torch.inference_mode():
            for step in sample(
                model,
                noise,
                sampler=r.sampler,
                steps=r.steps,
                schedule=cfg.schedule,
                generator=gens,
                **params.sampler_options,
            ):
                latents = step.x
                yield Progress(batch, step.index + 1, step.total, step.x, step.denoised)
            pixels = pipe.decode(latents)
        texts = [
            format_parameters(q, n, {**settings, "Seed": s})
            for q, n, s in zip(r.prompts, r.negatives, seeds, strict=True)
        ]
        yield Generated(batch, to_pil(pixels), seeds, texts)


def generate(pipe: Pipeline, params: GenerationParams) -> list[Image.Image]:
    """Run :func:`txt2img` to the end and return every image."""
    return [im for ev in txt2img(pipe, params) if isinstance(ev, Generated) for im in ev.images]
