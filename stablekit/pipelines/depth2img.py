"""Depth-to-image (SD 2 ``512-depth``): img2img whose UNet also sees the input's depth map as a fifth channel,
so the result keeps the input's layout while the prompt changes its content.

The depth comes from the caller (a depth map image or array: larger = nearer, as MiDaS's relative inverse depth
and the usual depth PNGs have it) or from a depth estimator (our MiDaS DPT-Hybrid, ``--depth-model``). Either way
it is resized bicubically to the latent size and normalised per image to [-1, 1], as
``StableDiffusionDepth2ImgPipeline`` prepares it.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from stablekit.depth import DepthEstimator
from stablekit.images import to_rgb
from stablekit.pipelines.core import Pipeline
from stablekit.pipelines.denoise import Prepared, denoise, randn
from stablekit.pipelines.events import Event, Notice
from stablekit.pipelines.inputs import check_strength, default_size, pixels, require_family, require_image
from stablekit.pipelines.params import GenerationParams, resolve

DepthMap = Image.Image | np.ndarray | Tensor


NEEDS_DEPTH = (
    "depth-to-image needs a depth map (--depth-map D.png) or a MiDaS depth model "
    "(--depth-model dpt_hybrid-midas-501f0c75.pt, or a transformers DPTForDepthEstimation folder)"
)


def depth_array(depth: DepthMap) -> Tensor:
    """A depth map as given -> (1, H, W) float32. Images keep their stored precision (16-bit PNGs included)."""
    if isinstance(depth, Image.Image):
        if depth.mode in ("I", "I;16", "I;16B", "I;16L", "F", "L"):
            arr = np.asarray(depth, dtype=np.float32)
        else:
            arr = np.asarray(to_rgb(depth).convert("L"), dtype=np.float32)
        t = torch.from_numpy(arr.copy())
    elif isinstance(depth, np.ndarray):
        t = torch.from_numpy(np.asarray(depth, dtype=np.float32).copy())
    elif isinstance(depth, Tensor):
        t = depth.detach().float().cpu()
    else:
        raise ValueError(f"a depth map must be an image, a NumPy array or a tensor, got {type(depth).__name__}")
    if t.ndim == 3 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 2 or min(t.shape) < 1:
        raise ValueError(f"a depth map must be one channel (H, W), got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError("the depth map holds NaN or infinite values")
    return t[None]


def normalised(depth: Tensor, size: tuple[int, int]) -> tuple[Tensor, bool]:
    """(1, H, W) depth -> (1, 1, h, w) in [-1, 1] at latent ``size``, and whether it was flat (then all 0)."""
    d = F.interpolate(depth[:, None].float(), size=size, mode="bicubic", align_corners=False)
    lo, hi = d.amin(dim=(1, 2, 3), keepdim=True), d.amax(dim=(1, 2, 3), keepdim=True)
    if bool((hi <= lo).any()):
        return torch.zeros_like(d), True
    return 2.0 * (d - lo) / (hi - lo) - 1.0, False


def depth2img(
    pipe: Pipeline,
    params: GenerationParams,
    image: Image.Image,
    *,
    depth_map: DepthMap | None = None,
    depth_model: DepthEstimator | None = None,
    strength: float = 0.8,
) -> Iterator[Event]:
    cfg = pipe.config
    require_family(cfg, "depth2img", ("depth",))
    image = require_image(image, "image")
    strength = check_strength(strength)
    r = resolve(cfg, params, size=default_size(image, cfg.vae.downsample), limits=pipe.limits)
    f = cfg.vae.downsample
    if depth_map is not None:
        depth = depth_array(depth_map)
    elif depth_model is not None:
        depth = depth_model.estimate([to_rgb(image)]).float().cpu()  # (1, h', w')
    else:
        raise ValueError(NEEDS_DEPTH)
    d, flat = normalised(depth, (r.height // f, r.width // f))
    if flat:
        yield Notice("the depth map is flat (one value everywhere): the model gets no depth information")
    x = pixels(image, r.width, r.height).repeat(r.per_batch, 1, 1, 1)  # (B, 3, H, W)
    concat = d.repeat(r.per_batch, 1, 1, 1).to(pipe.dtype)  # (B, 1, h, w)

    def prepare(gens: list[torch.Generator]) -> Prepared:
        init = pipe.encode(x, gens)
        noise = randn(gens, tuple(init.shape[1:]), pipe.dtype)
        return Prepared(noise=noise, concat=concat, init=init, strength=strength)

    yield from denoise(pipe, r, prepare, settings={"Denoising strength": strength})
