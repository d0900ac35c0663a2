"""Fréchet Inception Distance (Heusel et al., NeurIPS 2017) with clean-fid's resizing (Parmar et al., CVPR 2022).

FID fits a Gaussian to the Inception pool3 features of each image set and measures
``||μ₁ - μ₂||² + Tr(Σ₁ + Σ₂ - 2 (Σ₁ Σ₂)^½)``. Values are only comparable when the resize is too: like clean-fid's
default "clean" mode, each channel of the uint8 image is resized to 299x299 by PIL's bicubic filter in float
(mode ``F``) and clipped to 0..255, never re-quantized, and the network sees that image without resizing again.

Statistics are accumulated batch by batch in float64 (:class:`FeatureAccumulator`), so a sweep never holds every
feature, and saved as ``.npz`` with pytorch-fid's ``mu``/``sigma`` names (plus ``count``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from stablekit.atomic import replacing_file
from stablekit.models.inception import FID_SIZE, InceptionV3


class FIDError(ValueError):
    """Statistics that cannot be computed or compared (too few images, different feature sizes, a bad file)."""


def resize_clean(images: Tensor, size: int = FID_SIZE) -> Tensor:
    """(B, 3, H, W) uint8 -> (B, 3, size, size) float32 in 0..255: clean-fid's per-channel float bicubic."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise FIDError(f"images must be (B, 3, H, W) uint8, got {tuple(images.shape)} {images.dtype}")
    pixels = images.cpu().numpy().astype(np.float32)
    out = np.empty((*pixels.shape[:2], size, size), dtype=np.float32)
    for b in range(pixels.shape[0]):
        for c in range(3):
            channel = Image.fromarray(pixels[b, c], mode="F").resize((size, size), Image.Resampling.BICUBIC)
            # Bicubic overshoots at edges; clean-fid clips what lies outside the pixel range.
            out[b, c] = np.asarray(channel).clip(0, 255)
    return torch.from_numpy(out)


def inception_features(model: InceptionV3, images: Tensor) -> Tensor:
    """(B, 3, H, W) uint8 -> (B, 2048) float64 pool3 features, resized as clean-fid does."""
    param = next(model.parameters())
    x = resize_clean(images).to(param.device, param.dtype) / 255  # (B, 3, 299, 299) in [0, 1]
    with torch.inference_mode():
        return model(x).double()


@dataclass(frozen=True)
class FeatureStats:
    """The Gaussian fitted to a set's features: ``mu`` (D,) and ``sigma`` (D, D) in float64, from ``count``
    images (0 when a file does not say, as pytorch-fid's do not)."""

    mu: Tensor
    sigma: Tensor
    count: int

    @classmethod
    def from_features(cls, features: Tensor) -> FeatureStats:
        """(N, D) features -> their mean and unbiased covariance (``np.cov``'s, as pytorch-fid uses)."""
        acc = FeatureAccumulator(features.shape[-1])
        acc.add(features)
        return acc.stats()

    @property
    def dim(self) -> int:
        return self.mu.shape[0]

    def save(self, path: str | os.PathLike[str]) -> None:
        with replacing_file(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, mu=self.mu.numpy(), sigma=self.sigma.numpy(), count=np.int64(self.count))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FeatureStats:
        """Our ``.npz`` or pytorch-fid's (``mu``, ``sigma``); never unpickles."""
        try:
            with np.load(path, allow_pickle=False) as f:
                mu, sigma = np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)
                count = int(f["count"]) if "count" in f.files else 0
        except (OSError, ValueError, KeyError) as e:
            raise FIDError(f"{os.fspath(path)}: not an FID statistics file: {e}") from e
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise FIDError(f"{os.fspath(path)}: mu {mu.shape} and sigma {sigma.shape} do not fit together")
        return cls(torch.from_numpy(mu), torch.from_numpy(sigma), count)


class FeatureAccumulator:
    """Running sums for :class:`FeatureStats`, one batch at a time."""

    def __init__(self, dim: int = 2048) -> None:
        self.dim = dim
        self.count = 0
        # Sums are of features minus the first batch's mean: Σ(x - s)(x - s)ᵀ - n(μ - s)(μ - s)ᵀ keeps its
        # precision where the raw Σxxᵀ - nμμᵀ would cancel (features whose mean dwarfs their spread).
        self._shift = torch.zeros(dim, dtype=torch.float64)
        self._sum = torch.zeros(dim, dtype=torch.float64)
        self._outer = torch.zeros(dim, dim, dtype=torch.float64)

    def add(self, features: Tensor) -> None:
        """(B, D) features, any float dtype."""
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise FIDError(f"features must be (B, {self.dim}), got {tuple(features.shape)}")
        f = features.detach().to("cpu", torch.float64)
        if self.count == 0 and f.shape[0]:
            self._shift = f.mean(0)
        f = f - self._shift
        self._sum += f.sum(0)
        self._outer += f.T @ f
        self.count += f.shape[0]

    def stats(self) -> FeatureStats:
        n = self.count
        if n < 2:
            raise FIDError(f"FID needs at least 2 images for a covariance, got {n}")
        mean = self._sum / n  # μ - s
        sigma = (self._outer - n * torch.outer(mean, mean)) / (n - 1)
        return FeatureStats(mean + self._shift, (sigma + sigma.T) / 2, n)


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """``||μ₁ - μ₂||² + Tr(Σ₁) + Tr(Σ₂) - 2 Tr((Σ₁ Σ₂)^½)``.

    Σ₁Σ₂ is not symmetric, so its square root (scipy's ``sqrtm``, as pytorch-fid takes it) goes through a complex
    Schur form and loses accuracy when the covariances are singular (fewer images than dimensions). Only the trace
    is needed, and Σ₁Σ₂ is similar to the symmetric PSD ``Σ₁^½ Σ₂ Σ₁^½`` (same eigenvalues), so
    ``Tr((Σ₁Σ₂)^½)`` is the sum of the square roots of that matrix's eigenvalues: two real ``eigh`` calls.
    With fewer images than dimensions most eigenvalues are zero, and rounding leaves them at about ``eps·max``;
    their square roots (~1e-8·max½ each, thousands of them) would bias the trace by 1e-4, so every eigenvalue
    below the rounding floor ``D·eps·max`` (numpy's ``matrix_rank`` tolerance) counts as zero.
    """
    if a.dim != b.dim:
        raise FIDError(f"statistics of different feature sizes: {a.dim} and {b.dim}")
    mu1, mu2 = a.mu.double(), b.mu.double()
    s1, s2 = a.sigma.double(), b.sigma.double()
    w, v = torch.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * w.clamp(min=0).sqrt()) @ v.T  # Σ₁^½
    m = root1 @ s2 @ root1
    eig = torch.linalg.eigvalsh((m + m.T) / 2)
    floor = eig.max().clamp(min=0) * eig.shape[0] * torch.finfo(eig.dtype).eps
    tr_covmean = torch.where(eig > floor, eig, 0).sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + s1.trace() + s2.trace() - 2 * tr_covmean)
