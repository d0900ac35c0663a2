"""Inpainting: regenerate the white part of a mask, keep the rest.

Two ways, by the model (both as diffusers' ``StableDiffusionInpaintPipeline`` runs them):

- an inpainting model (9-channel UNet) sees the mask and the masked image's latents concatenated to its input,
  and paints a region that fits what it was shown;
- any other model runs as text-to-image while, after every step, the latents outside the mask are replaced by
  the original's latents noised to the current level (latent blending), so only the masked region changes.

The mask is binarised at half grey and resized to the latents with nearest-neighbour sampling; the masked image
is the input with the repainted region set to 0 (mid grey).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from stablekit.images import mask_tensor, resized, to_mask
from stablekit.pipelines.core import Pipeline
from stablekit.pipelines.denoise import Prepared, denoise, randn
from stablekit.pipelines.events import Event
from stablekit.pipelines.inputs import check_strength, default_size, pixels, require_family, require_image
from stablekit.pipelines.params import GenerationParams, Resolved, resolve


def inpaint(
    pipe: Pipeline, params: GenerationParams, image: Image.Image, mask: Image.Image, strength: float = 1.0
) -> Iterator[Event]:
    cfg = pipe.config
    require_family(cfg, "inpaint", ("txt2img", "inpaint"))
    image = require_image(image, "image")
    mask = require_image(mask, "mask")
    if mask.size != image.size:
        raise ValueError(f"the mask is {mask.width}x{mask.height} but the image is {image.width}x{image.height}")
    strength = check_strength(strength)
    r = resolve(cfg, params, size=default_size(image, cfg.vae.downsample), limits=pipe.limits)
    x = pixels(image, r.width, r.height)  # (1, 3, H, W)
    m = mask_tensor(resized(to_mask(mask), r.width, r.height))  # (1, 1, H, W), 1 = repaint
    yield from _run(pipe, r, x, m, strength)


def whole_image(pipe: Pipeline, r: Resolved) -> Iterator[Event]:
    """Text-to-image on an inpainting model: everything masked, over a grey image (A1111's conditioning)."""
    x = torch.zeros(1, 3, r.height, r.width)
    yield from _run(pipe, r, x, torch.ones(1, 1, r.height, r.width), 1.0, settings={})


def _run(
    pipe: Pipeline,
    r: Resolved,
    x: Tensor,
    m: Tensor,
    strength: float,
    settings: dict[str, object] | None = None,
) -> Iterator[Event]:
    cfg = pipe.config
    b, f = r.per_batch, cfg.vae.downsample
    images = x.repeat(b, 1, 1, 1)  # (B, 3, H, W)
    masked = (x * (m < 0.5)).repeat(b, 1, 1, 1)
    small = F.interpolate(m, size=(r.height // f, r.width // f)).repeat(b, 1, 1, 1)  # (B, 1, h, w), nearest
    nine = cfg.unet.in_channels == cfg.unet.out_channels + 1 + cfg.vae.embed_dim
    shape = (cfg.unet.out_channels, r.height // f, r.width // f)

    def prepare(gens: list[torch.Generator]) -> Prepared:
        # diffusers' draws, per image: the image's posterior sample (when it is used), the starting noise, then the
        # masked image's posterior sample (drawn even for a 4-channel UNet, which does not use it).
        original = pipe.encode(images, gens) if (strength < 1 or not nine) else None
        noise = randn(gens, shape, pipe.dtype)
        init = original if strength < 1 else None
        if nine:
            concat = torch.cat([small.to(pipe.dtype), pipe.encode(masked, gens)], dim=1)  # (B, 5, h, w)
            return Prepared(noise=noise, concat=concat, init=init, strength=strength)
        randn(gens, (cfg.vae.embed_dim, *shape[1:]), pipe.dtype)  # the unused masked-image draw, kept in step
        return Prepared(noise=noise, init=init, strength=strength, repaint=small, original=original)

    extra = {"Denoising strength": strength} if settings is None else settings
    yield from denoise(pipe, r, prepare, settings=extra)
