"""The torch engine: our modules, run eagerly in the pipeline's device and dtype."""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from stablekit.engines import EngineName
from stablekit.models.ldm import LatentDiffusion


class TorchEngine:
    """Runs a :class:`LatentDiffusion`'s networks as they are. The caller holds inference mode and the attention
    backend in force (they are pipeline settings, not the engine's)."""

    name: EngineName = "torch"

    def __init__(self, model: LatentDiffusion) -> None:
        self.model = model

    def text(self, ids: Tensor, skip: int) -> Tensor:
        return self.model.cond_stage_model(ids, skip=skip)

    def unet(self, x: Tensor, t: Tensor, context: Tensor, y: Tensor | None) -> Tensor:
        return self.model.model.diffusion_model(x, t, context, y)

    def moments(self, pixels: Tensor) -> Tensor:
        return self.model.first_stage_model.moments(pixels)

    def decode(self, z: Tensor) -> Tensor:
        return self.model.first_stage_model.decode(z)

    def decode_fp32(self, z: Tensor) -> Tensor:
        # A private copy: the shared model is never changed, so concurrent calls cannot race on it.
        return copy.deepcopy(self.model.first_stage_model).float().decode(z.float())

    def describe(self) -> str:
        p = next(self.model.parameters())
        return f"torch {torch.__version__} eager, {str(p.dtype).removeprefix('torch.')} on {p.device}"
