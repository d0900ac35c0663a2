"""Text-to-image: prompt -> CLIP context -> sampler over the UNet from pure noise -> VAE decode -> images.

An inpainting model generates too, with the whole image masked (as A1111 does): see :func:`inpaint`.
"""

from __future__ import annotations

from collections.abc import Iterator

from PIL import Image

from stablekit.pipelines.core import Pipeline
from stablekit.pipelines.denoise import Prepared, denoise, randn
from stablekit.pipelines.events import Event, Generated
from stablekit.pipelines.inpaint import whole_image
from stablekit.pipelines.inputs import require_family
from stablekit.pipelines.params import GenerationParams, resolve


def txt2img(pipe: Pipeline, params: GenerationParams) -> Iterator[Event]:
    cfg = pipe.config
    require_family(cfg, "generate", ("txt2img", "inpaint"))
    r = resolve(cfg, params, limits=pipe.limits)
    if cfg.conditioning == "inpaint":
        yield from whole_image(pipe, r)
        return
    f = cfg.vae.downsample
    shape = (cfg.unet.out_channels, r.height // f, r.width // f)
    yield from denoise(pipe, r, lambda gens: Prepared(noise=randn(gens, shape, pipe.dtype)))


def generate(pipe: Pipeline, params: GenerationParams) -> list[Image.Image]:
    """Run :func:`txt2img` to the end and return every image."""
    return collect(txt2img(pipe, params))


def collect(events: Iterator[Event]) -> list[Image.Image]:
    """Every image of a task's event stream, in order."""
    return [im for ev in events if isinstance(ev, Generated) for im in ev.images]
