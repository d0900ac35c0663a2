"""Fresh Gaussian noise for stochastic samplers, drawn the way diffusers' ``randn_tensor`` draws it.

Matching the draw (one generator for the batch, or one per sample, each filling its own (1, C, h, w); on the
generator's device; in the model's dtype) is what makes a seed give the same image as diffusers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

Generator = torch.Generator | Sequence[torch.Generator] | None


def randn(
    shape: torch.Size | tuple[int, ...], generator: Generator, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """Standard normal noise of ``shape``, returned as float32 on ``device``."""
    if isinstance(generator, Sequence) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, Sequence):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        parts = [torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=dtype) for g in generator]
        return torch.cat([p.to(device) for p in parts]).float()
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device).float()
