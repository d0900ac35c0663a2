"""Image-to-image (SDEdit, Meng et al. 2022): the input image's latents, noised to the level ``strength`` picks,
then denoised under the prompt. Strength 1 starts from (almost) pure noise; 0 returns the input unchanged up to
the autoencoder round trip. The number of steps run is diffusers' ``int(steps · strength)``.

On an inpainting model this is inpainting with the whole image masked, as A1111 runs it.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from PIL import Image

from stablekit.pipelines.core import Pipeline
from stablekit.pipelines.denoise import Prepared, denoise, randn
from stablekit.pipelines.events import Event
from stablekit.pipelines.inpaint import inpaint
from stablekit.pipelines.inputs import check_strength, default_size, pixels, require_family, require_image
from stablekit.pipelines.params import GenerationParams, resolve


def img2img(pipe: Pipeline, params: GenerationParams, image: Image.Image, strength: float = 0.75) -> Iterator[Event]:
    cfg = pipe.config
    require_family(cfg, "img2img", ("txt2img", "inpaint"))
    image = require_image(image, "image")
    strength = check_strength(strength)
    if cfg.conditioning == "inpaint":
        yield from inpaint(pipe, params, image, Image.new("L", image.size, 255), strength)
        return
    r = resolve(cfg, params, size=default_size(image, cfg.vae.downsample), limits=pipe.limits)
    x = pixels(image, r.width, r.height).repeat(r.per_batch, 1, 1, 1)  # (B, 3, H, W)

    def prepare(gens: list[torch.Generator]) -> Prepared:
        init = pipe.encode(x, gens)  # one posterior draw per image, then its noise, as diffusers draws them
        return Prepared(noise=randn(gens, tuple(init.shape[1:]), pipe.dtype), init=init, strength=strength)

    yield from denoise(pipe, r, prepare, settings={"Denoising strength": strength})
