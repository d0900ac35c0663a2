"""The conditioning bundle every task hands the denoising loop, and the UNet call it turns into.

Tasks differ only in what they add to the text: inpainting concatenates the mask and the masked image's latents
to the UNet input, depth-to-image the depth map, the x4 upscaler the noised low-resolution image and its noise
level as the class label ``y``. Classifier-free guidance runs the unconditional and the conditional pass as one
batch of 2B; the extra channels and labels are the same for both halves, as diffusers doubles them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from stablekit.diffusion import ModelFn, guided
from stablekit.nn.tiling import tiled

UNetFn = Callable[[Tensor, Tensor, Tensor, Tensor | None], Tensor]
"""(x (N, C_in, h, w), t (N,), context (N, T, D), y (N,) or None) -> the raw UNet output (N, C, h, w)."""


@dataclass(frozen=True)
class Conditioning:
    context: Tensor  # (B, T, D) prompt embeddings
    uncond: Tensor | None = None  # (B, T, D) negative-prompt embeddings; needed when guidance > 1
    concat: Tensor | None = None  # (B, C_extra, h, w) appended to the latents' channels
    y: Tensor | None = None  # (B,) class labels (the x4 upscaler's noise level)


def conditioned(
    unet: UNetFn, cond: Conditioning, guidance: float, *, tile: int | None = None, overlap: int = 0
) -> ModelFn:
    """The model of (x, t) the samplers drive: ``unet`` with the bundle's extras, under guidance.

    With ``tile``, the UNet runs over overlapping ``tile``×``tile`` windows of the latent (and of the extra
    channels with it) whose outputs are cross-faded: memory stays that of one window, at the cost of each
    window seeing only its own context (used for the x4 upscaler on large images).
    """
    b = cond.context.shape[0]
    # The extras as the UNet batch needs them, made once rather than at every step: 2B under guidance
    # ([uncond half, cond half], the same extras for both), B without.
    reps = 2 if guidance > 1 else 1
    concat = None if cond.concat is None else cond.concat.repeat(reps, 1, 1, 1)  # (N, C_extra, h, w)
    labels = None if cond.y is None else cond.y.repeat(reps)  # (N,)

    def with_extras(x: Tensor, t: Tensor, context: Tensor) -> Tensor:
        if x.shape[0] != reps * b:
            raise ValueError(f"expected a UNet batch of {reps * b}, got {x.shape[0]}")
        inp = x if concat is None else torch.cat([x, concat.to(x.dtype)], dim=1)
        y = labels
        if tile is None or max(inp.shape[-2:]) <= tile:
            return unet(inp, t, context, y)
        return tiled(
            lambda part: unet(part, t, context, y), inp, inp.shape[-2:], tile, overlap, in_scale=1, out_scale=1
        )

    return guided(with_extras, cond.context, cond.uncond, guidance)
