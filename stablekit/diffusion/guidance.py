"""Classifier-free guidance (Ho & Salimans 2022, arXiv:2207.12598) as a transform of the raw model.

Guidance is applied to the raw output (ε or v) exactly as diffusers applies it, so the denoiser downstream
stays the only place that interprets the output; for ε and v alike the combination is linear, so guiding the
raw output equals guiding x̂₀.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from stablekit.diffusion.denoiser import ModelFn

ConditionedModel = Callable[[Tensor, Tensor, Tensor], Tensor]
"""(x (N, C, h, w), t (N,), context (N, 77, D)) -> raw UNet output."""


def rescale_guidance(guided_out: Tensor, cond_out: Tensor, rescale: float) -> Tensor:
    """Match the per-sample std of the guided output to the conditional one, blended by ``rescale``
    (Lin et al. 2023, arXiv:2305.08891 §3.4): stops high guidance scales from over-exposing."""
    dims = list(range(1, cond_out.ndim))
    matched = guided_out * (cond_out.std(dim=dims, keepdim=True) / guided_out.std(dim=dims, keepdim=True))
    return rescale * matched + (1 - rescale) * guided_out


def guided(
    model: ConditionedModel, cond: Tensor, uncond: Tensor | None, scale: float, *, rescale: float = 0.0
) -> ModelFn:
    """A model of (x, t) that runs ``model`` with classifier-free guidance at ``scale``.

    With ``scale > 1`` the unconditional and conditional passes run as one batch of 2B (unconditional first,
    as diffusers batches them); with ``scale <= 1`` only the conditional pass runs and ``uncond`` is unused.
    """
    if scale <= 1:
        return lambda x, t: model(x, t, cond)
    if uncond is None:
        raise ValueError(f"guidance scale {scale} > 1 needs the unconditional (negative prompt) context")
    if uncond.shape != cond.shape:
        raise ValueError(f"uncond context {tuple(uncond.shape)} and cond context {tuple(cond.shape)} differ")
    context = torch.cat([uncond, cond])  # (2B, 77, D)

    def run(x: Tensor, t: Tensor) -> Tensor:
        out_uncond, out_cond = model(torch.cat([x, x]), torch.cat([t, t]), context).chunk(2)
        out = out_uncond + scale * (out_cond - out_uncond)
        return rescale_guidance(out, out_cond, rescale) if rescale > 0 else out

    return run
