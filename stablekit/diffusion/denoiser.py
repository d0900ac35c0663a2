"""The one place that knows whether the UNet predicts ε or v.

Samplers ask a :class:`Denoiser` for the clean-image estimate x̂₀ (and, for the variance-preserving ones, the
matching ε̂); they never see the raw model output. Two parameterisations of the noisy state are served:

- variance preserving, x = α·x₀ + σ·ε with α² + σ² = 1 (DDIM, PNDM, DPM-Solver, UniPC): the UNet sees x as is;
- σ-space, x = x₀ + σ·ε (Karras et al. 2022, the Euler family): the UNet sees c_in·x with c_in = 1/√(σ²+1),
  and x̂₀ = c_skip·x + c_out·F with (c_skip, c_out) = (1, -σ) for ε and (1/(σ²+1), -σ/√(σ²+1)) for v.

v-prediction (Salimans & Ho 2022): v = α·ε - σ·x₀, so x₀ = α·x - σ·v and ε = α·v + σ·x.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from stablekit.config import Prediction

ModelFn = Callable[[Tensor, Tensor], Tensor]
"""(x (B, C, h, w), t (B,) float timesteps) -> the raw UNet output (ε or v), (B, C, h, w)."""


class Denoiser:
    """Wraps a raw ε- or v-predicting model; samplers keep their state in float32 and the model runs in ``dtype``."""

    def __init__(self, model: ModelFn, prediction: Prediction, dtype: torch.dtype = torch.float32) -> None:
        if prediction not in ("eps", "v"):
            raise ValueError(f"unknown prediction type {prediction!r}; expected 'eps' or 'v'")
        self.model = model
        self.prediction = prediction
        self.dtype = dtype

    def raw(self, x: Tensor, t: Tensor) -> Tensor:
        """The model output at a variance-preserving state x (the UNet's own input scale), in float32."""
        tt = t.to(device=x.device, dtype=torch.float32).expand(x.shape[0])  # (B,)
        return self.model(x.to(self.dtype), tt).float()

    def split(self, out: Tensor, x: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """(x̂₀, ε̂) from a raw output (or a linear combination of raw outputs) at x = α·x₀ + σ·ε."""
        if self.prediction == "eps":
            return (x - sigma * out) / alpha, out
        return alpha * x - sigma * out, alpha * out + sigma * x

    def vp(self, x: Tensor, t: Tensor, alpha: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """(x̂₀, ε̂) for a variance-preserving state x = α·x₀ + σ·ε at timestep t."""
        return self.split(self.raw(x, t), x, alpha, sigma)

    def karras(self, x: Tensor, t: Tensor, sigma: Tensor) -> Tensor:
        """x̂₀ for a σ-space state x = x₀ + σ·ε at timestep t."""
        out = self.raw(x / ((sigma**2 + 1) ** 0.5), t)
        if self.prediction == "eps":
            return x - sigma * out
        return out * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)


def training_target(x0: Tensor, noise: Tensor, alpha: Tensor, sigma: Tensor, prediction: Prediction) -> Tensor:
    """What the UNet is trained to output at x = α·x₀ + σ·ε: ε itself, or v = α·ε - σ·x₀.

    The inverse of :meth:`Denoiser.split`: split(target, x, α, σ) gives back (x₀, ε). ``alpha`` and ``sigma``
    broadcast against x₀ (e.g. (B, 1, 1, 1)).
    """
    if prediction == "eps":
        return noise
    if prediction == "v":
        return alpha * noise - sigma * x0
    raise ValueError(f"unknown prediction type {prediction!r}; expected 'eps' or 'v'")
