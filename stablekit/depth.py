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

    def __init__(self, model: DPTDepthModel, size: tuple[int, int] | None = None) -> None:
        self.model = model.eval().requires_grad_(False)
        # (height, width) the processor resizes to; a pipeline folder's feature_extractor says, else the model's.
        self._size = size

    @property
    def config(self) -> DepthConfig:
        return self.model.config

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the model's input: the feature extractor's size where a folder has one, else the
        training resolution (384x384 for the released model)."""
        return self._size or (self.config.image_size, self.config.image_size)

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
        """(B, 3, height, width) float32 in [-1, 1], on the CPU."""
        if isinstance(images, Image.Image):
            images = [images]
        if not images:
            raise ValueError("DepthEstimator: no images given")
        batch = []
        for image in images:
            # The processor reads the image as stored; RGB is the only mode its 3-channel mean fits.
            rgb = image if image.mode == "RGB" else image.convert("RGB")
            resized = rgb.resize((self.size[1], self.size[0]), Image.Resampling.BICUBIC)
            pixels = torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy())  # (H, W, 3)
            scaled = (pixels.double() * (1 / 255)).float()
            batch.append(((scaled - 0.5) / 0.5).permute(2, 0, 1))
        return torch.stack(batch)

    def estimate(self, images: Sequence[Image.Image]) -> Tensor:
        """(B, height, width) float32 relative inverse depth (larger = nearer), on the model's device."""
        x = self.preprocess(images).to(device=self.device, dtype=self.dtype)
        with torch.inference_mode():
            return self.model(x).float()
