"""Small layers shared by the models: fp32 GroupNorm and the sinusoidal timestep embedding."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class GroupNorm32(nn.GroupNorm):
    """GroupNorm whose statistics are computed in fp32 and cast back to the input dtype.

    Half-precision variance over a whole 64×64×C group loses enough bits to shift images visibly, so the
    original code (``ldm...util.GroupNorm32``) normalises in fp32 whatever the weights' dtype.
    """

    def forward(self, x: Tensor) -> Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return nn.functional.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding, cos half first: (B,) -> (B, dim), always fp32.

    Frequencies are exp(-ln(max_period)·i/half), i = 0..half-1 (``openaimodel.timestep_embedding``;
    diffusers' ``flip_sin_to_cos=True, freq_shift=0``). An odd ``dim`` gets a zero last column.
    """
    half = dim // 2
    i = torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(-math.log(max_period) * i / half)
    args = timesteps.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = nn.functional.pad(emb, (0, 1))
    return emb
