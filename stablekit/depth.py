"""Depth maps from PIL images with MiDaS, preprocessed as diffusers' depth-to-image pipeline does.

diffusers' ``StableDiffusionDepth2ImgPipeline`` runs the SD2-depth ``feature_extractor`` (transformers'
``DPTImageProcessor``: resize to 384×384 ignoring the aspect ratio, PIL bicubic, ×1/255, mean = std = 0.5) and
takes the ``predicted_depth`` of its ``depth_estimator``. :class:`DepthEstimator` reproduces that: the resize is
PIL's bicubic on the 8-bit RGB image (transformers' PIL backend, and its only backend before v5), the
rescale is done in float64 and rounded to float32 before the normalisation, as NumPy does there.
Resizing the map to latent size and normalising it to [-1, 1] is the pipeline's business.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from stablekit.models.midas import DepthConfig, DPTDepthModel


class DepthEstimator:
    """A :class:`DPTDepthModel` with its preprocessing; it runs in the model's device and dtype."""

    def __init__(self, model: DPTDepthModel) -> None:
        self.model = model.eval().requires_grad_(False)

    @property
    def config(self) -> DepthConfig:
        return self.model.config

    @property
    def size(self) -> int:
        """The square input size: the training resolution (384 for the released model)."""
        return self.config.image_size

    @property
    def device(self) -> torch.device:
        return self.model.pretrained.model.pos_embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.pretrained.model.pos_embed.dtype

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> DepthEstimator:
        self.model.to(device=device, dtype=dtype)
        return self

    def preprocess(self, images: Sequence[Image.Image]) -> Tensor:
        """(B, 3, size, size) float32 in [-1, 1], on the CPU."""
        if isinstance(images, Image.Image):
            images = [images]
        if not images:
            raise ValueError("DepthEstimator: no images given")
        batch = []
        for image in images:
            # The processor reads the image as stored; RGB is the only mode its 3-channel mean fits.
            rgb = image if image.mode == "RGB" else image.convert("RGB")
            resized = rgb.resize((self.size, self.size), Image.Resampling.BICUBIC)
            pixels = torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy())  # (H, W, 3)
            scaled = (pixels.double() * (1 / 255)).float()
            batch.append(((scaled - 0.5) / 0.5).permute(2, 0, 1))
        return torch.stack(batch)

    def estimate(self, images: Sequence[Image.Image]) -> Tensor:
        """(B, size, size) float32 relative inverse depth (larger = nearer), on the model's device."""
        x = self.preprocess(images).to(device=self.device, dtype=self.dtype)
        with torch.inference_mode():
            return self.model(x).float()
