"""The x4 upscaler (``stable-diffusion-x4-upscaler``): a latent diffusion model whose latents are at the
low-resolution image's size and whose f=4 autoencoder decodes them to four times that size.

The UNet sees the low-resolution image itself (in pixel space, concatenated to the latents), noised with its own
linear schedule to ``noise_level``, which it also gets as the class label: more noise lets the model invent
more detail and trust the input less. Large inputs run in overlapping UNet tiles and a tiled decode (the
pipeline's ``unet_tile`` and ``vae_tile``), so memory stays that of one tile.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from PIL import Image

from stablekit.diffusion import add_noise
from stablekit.pipelines.core import Pipeline
from stablekit.pipelines.denoise import Prepared, denoise, randn
from stablekit.pipelines.events import Event
from stablekit.pipelines.inputs import default_size, pixels, require_family, require_image
from stablekit.pipelines.params import GenerationParams, resolve

DEFAULT_NOISE_LEVEL = 20


def upscale(
    pipe: Pipeline, params: GenerationParams, image: Image.Image, *, noise_level: int = DEFAULT_NOISE_LEVEL
) -> Iterator[Event]:
    cfg = pipe.config
    require_family(cfg, "upscale", ("upscale",))
    image = require_image(image, "image")
    if isinstance(noise_level, bool) or not isinstance(noise_level, int):
        raise ValueError(f"noise level must be an integer, got {noise_level!r}")
    if not 0 <= noise_level <= cfg.max_noise_level:
        raise ValueError(f"noise level must be in [0, {cfg.max_noise_level}], got {noise_level}")
    if params.width is not None or params.height is not None:
        raise ValueError("upscale sets the output size from the input (4x); resize the input image instead")
    assert cfg.low_res_schedule is not None, "an upscale family always has a low_res_schedule"
    f = cfg.vae.downsample
    w, h = default_size(image, f)
    r = resolve(cfg, params, size=(w * f, h * f), multiple=f, limits=pipe.limits)
    low = pixels(image, w, h).repeat(r.per_batch, 1, 1, 1)  # (B, 3, h, w) in [-1, 1]
    levels = torch.full((r.per_batch,), noise_level, dtype=torch.long)
    shape = (cfg.unet.out_channels, h, w)

    def prepare(gens: list[torch.Generator]) -> Prepared:
        # diffusers' draws, per image: the low-res image's noise, then the starting latents.
        image_noise = randn(gens, (3, h, w), pipe.dtype)
        noised = add_noise(low.to(pipe.dtype), image_noise, levels, cfg.low_res_schedule)  # type: ignore[arg-type]
        return Prepared(noise=randn(gens, shape, pipe.dtype), concat=noised, y=levels)

    yield from denoise(pipe, r, prepare, settings={"Noise level": noise_level}, tile=True)
