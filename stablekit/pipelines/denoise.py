"""The one denoising generator under every task.

A task (txt2img, img2img, inpaint, depth2img, upscale) resolves its parameters, prepares its images once, and
hands :func:`denoise` a ``prepare`` function that sets up one batch: the starting noise, the extra conditioning
(:class:`Prepared`), an img2img start and an inpainting blend. Everything else is here, once: prompt encoding,
seeds and their generators, guidance, the sampler loop, decoding and the PNG parameters.

Seeds follow diffusers called with one ``torch.Generator("cpu").manual_seed(seed + i)`` per image: image ``i``
gets its own generator, which draws (in the order the diffusers pipeline of the task draws them) its posterior
samples, its starting noise and any per-step noise, so an image is the same whatever the batch size, its position
in the batch or the device.

Model calls run under ``torch.inference_mode()`` one step at a time; the generator yields outside it, so the
caller's own code between steps (a server's, a progress bar's) never runs in inference mode.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from stablekit.diffusion import SAMPLERS, SampleStep, sample
from stablekit.images import format_parameters, to_pil
from stablekit.pipelines.conditioning import Conditioning, conditioned
from stablekit.pipelines.core import Pipeline
from stablekit.pipelines.events import Event, Generated, Notice, Progress
from stablekit.pipelines.networks import loras_merged, prompt_loras
from stablekit.pipelines.params import Resolved


@dataclass(frozen=True)
class Prepared:
    """One batch of B images as a task sets it up."""

    noise: Tensor  # (B, C, h, w) standard normal, from the per-image generators
    concat: Tensor | None = None  # (B, C_extra, h, w) extra UNet input channels
    y: Tensor | None = None  # (B,) class labels
    init: Tensor | None = None  # (B, C, h, w) clean, VAE-scaled latents to start from (img2img)
    strength: float = 1.0  # how much of the schedule runs from ``init``
    repaint: Tensor | None = None  # (B, 1, h, w) 1 where the image is regenerated; 0 keeps ``original``
    original: Tensor | None = None  # (B, C, h, w) clean latents pasted back outside ``repaint`` at every step


Prepare = Callable[[list[torch.Generator]], Prepared]


def generators(seeds: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(s) for s in seeds]


def randn(gens: Sequence[torch.Generator], shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """One (1, *shape) standard-normal draw per generator, stacked: diffusers' ``randn_tensor`` with a list."""
    return torch.cat([torch.randn((1, *shape), generator=g, dtype=dtype) for g in gens])


def _blend(repaint: Tensor, original: Tensor) -> Callable[[Tensor, Callable[[Tensor], Tensor]], Tensor]:
    def paste(x: Tensor, renoise: Callable[[Tensor], Tensor]) -> Tensor:
        # diffusers' order of terms, so the blend rounds as it does
        return (1 - repaint) * renoise(original) + repaint * x

    return paste


def _advance(steps: Iterator[SampleStep]) -> SampleStep | None:
    with torch.inference_mode():
        return next(steps, None)


def denoise(
    pipe: Pipeline,
    r: Resolved,
    prepare: Prepare,
    *,
    settings: Mapping[str, object] = {},
    tile: bool = False,
) -> Iterator[Event]:
    """Run ``r.batch_count`` batches: encode the prompts once, then per batch prepare, sample, decode.

    ``settings`` are the task's own entries in the PNG ``parameters`` text (e.g. ``Denoising strength``);
    ``tile`` lets the UNet run in the pipeline's overlapping tiles on large latents.
    """
    if pipe.watermark is not None:
        pipe.watermark.require_size(r.width, r.height)  # refused before any compute, not after sampling
    texts, loras = prompt_loras(pipe, r.prompts)  # <lora:NAME:W> tags out of the text, checked before any compute
    with loras_merged(pipe, loras):
        yield from _denoise(pipe, r, prepare, texts, settings, tile)


def _denoise(
    pipe: Pipeline, r: Resolved, prepare: Prepare, texts: list[str], settings: Mapping[str, object], tile: bool
) -> Iterator[Event]:
    cfg = pipe.config
    cond, uncond = pipe.encode_prompts(texts, r.negatives if r.guidance > 1 else None)
    text = {
        "Steps": r.steps,
        "Sampler": SAMPLERS[r.sampler].display_name,
        "CFG scale": r.guidance,
        "Seed": None,
        "Size": f"{r.width}x{r.height}",
        "Model": pipe.name,
        "Clip skip": pipe.clip_skip if pipe.clip_skip > 1 else None,  # A1111 writes it only when set
        **settings,
        "Version": f"stablekit {pipe.version}",
    }
    for batch in range(r.batch_count):
        seeds = r.seeds(batch)
        gens = generators(seeds)
        with torch.inference_mode():
            prep = prepare(gens)
        bundle = Conditioning(cond, uncond, _on(prep.concat, pipe), _on(prep.y, pipe))
        model = conditioned(
            pipe.unet,
            bundle,
            r.guidance,
            tile=pipe.unet_tile if tile else None,
            overlap=pipe.unet_tile // 4,
        )
        blend = None
        if prep.repaint is not None and prep.original is not None:
            blend = _blend(prep.repaint.to(pipe.device), prep.original.to(pipe.device).float())
        noise = prep.noise.to(pipe.device)
        init = _on(prep.init, pipe)
        if init is not None and int(r.steps * prep.strength) < 1:
            latents = init  # no step to run: the input itself, through the autoencoder
        else:
            latents = noise
            with torch.inference_mode():
                steps = sample(
                    model,
                    noise,
                    sampler=r.sampler,
                    steps=r.steps,
                    schedule=cfg.schedule,
                    strength=prep.strength,
                    init=init,
                    generator=gens,
                    mask_callback=blend,
                    **r.sampler_options,
                )
            while (step := _advance(steps)) is not None:
                latents = step.x
                yield Progress(batch, step.index + 1, step.total, step.x, step.denoised)
        pixels = pipe.decode(latents)
        texts = [
            format_parameters(q, n, {**text, "Seed": s}) for q, n, s in zip(r.prompts, r.negatives, seeds, strict=True)
        ]
        images, nsfw = to_pil(pixels), None
        if pipe.safety_checker is not None:
            images, nsfw = pipe.safety_checker.filter(images, blackout=pipe.safety_action == "blackout")
        if pipe.watermark is not None:
            images = pipe.watermark.apply(images)  # after the safety check, as the reference scripts mark
            for i in pipe.watermark.unreadable(images):
                yield Notice(f"the watermark of seed {seeds[i]}'s image does not decode: too flat or small an image")
        yield Generated(batch, images, seeds, texts, nsfw)


def _on(t: Tensor | None, pipe: Pipeline) -> Tensor | None:
    return None if t is None else t.to(pipe.device)
