"""Fresh Gaussian noise for stochastic samplers, drawn the way diffusers' ``randn_tensor`` draws it.

Matching the draw (one generator for the batch, or one per sample, each filling its own (1, C, h, w); on the
generator's device; in the model's dtype) is what makes a seed give the same image as diffusers. The DPM++ SDE
samplers' Brownian-tree noise (:class:`BrownianNoise`) is k-diffusion's, seeded as A1111 seeds it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from types import ModuleType

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


def require_torchsde() -> ModuleType:
    """torchsde, which the Brownian-tree samplers need: an optional extra, so a missing one is a fixable error."""
    try:
        import torchsde
    except ImportError as e:
        raise ValueError(f"this sampler needs torchsde ({e}); install it with: pip install 'stablekit[sde]'") from None
    return torchsde


class BrownianNoise:
    """Noise for an SDE step from σ to σ_next: the increment of a Brownian motion W over [σ_next, σ], scaled to
    unit variance, so that the noise of two sub-steps adds up to the noise of the whole step (k-diffusion's
    ``BrownianTreeNoiseSampler``, over a torchsde ``BrownianTree`` spanning [σ_min, σ_max]).

    Seeded as A1111 seeds it: with one generator per image, each image has its own tree whose entropy is that
    generator's seed (``initial_seed()``: the image seed of a ``manual_seed(seed)`` generator, however far it has
    been advanced), so an image does not depend on its batch position. One generator seeds one tree over the
    whole batch (k-diffusion's single seed); none draws that seed from torch's global RNG. Trees live on their
    generator's device (the CPU without one), so a CPU generator gives the same noise on any model device.
    """

    def __init__(self, shape: torch.Size, sigma_min: Tensor, sigma_max: Tensor, generator: Generator) -> None:
        torchsde = require_torchsde()
        if isinstance(generator, Sequence) and len(generator) == 1:
            generator = generator[0]
        if isinstance(generator, Sequence):
            if len(generator) != shape[0]:
                raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
            seeds, w0_shape = [(g.initial_seed(), g.device) for g in generator], shape[1:]
        elif generator is not None:
            seeds, w0_shape = [(generator.initial_seed(), generator.device)], shape
        else:
            seeds, w0_shape = [(int(torch.randint(0, 2**63 - 1, [])), torch.device("cpu"))], shape
        self.batched = isinstance(generator, Sequence)
        self.devices = [dev for _, dev in seeds]
        self.trees = [
            torchsde.BrownianTree(sigma_min.to(dev), torch.zeros(w0_shape, device=dev), sigma_max.to(dev), entropy=seed)
            for seed, dev in seeds
        ]

    def __call__(self, sigma: Tensor, sigma_next: Tensor, device: torch.device) -> Tensor:
        """Unit-variance noise (B, C, h, w) on ``device`` for the step σ -> σ_next."""
        # W(σ_next) - W(σ), read from the tree in increasing time; k-diffusion's sign and scale, term for term.
        lo, hi, sign = (sigma_next, sigma, -1) if sigma_next < sigma else (sigma, sigma_next, 1)
        with warnings.catch_warnings():
            # exp(-(-log σ)) lands an ulp outside [σ_min, σ_max] at the ends, as in k-diffusion: harmless.
            warnings.filterwarnings("ignore", message="Should have ", category=UserWarning)
            parts = [tree(lo.to(d), hi.to(d)).to(device) for tree, d in zip(self.trees, self.devices, strict=True)]
        w = torch.stack(parts) if self.batched else parts[0]
        return w * sign / (sigma_next - sigma).abs().sqrt().to(device)
