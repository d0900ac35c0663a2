"""Flagging generated images with the released safety checker, preprocessed as the SD pipelines do.

diffusers' pipelines hand the checker what their ``feature_extractor`` (transformers' ``CLIPImageProcessor``)
makes of each image: the shortest side resized to 224 with PIL's bicubic filter (the long side to
``int(224 * long / short)``), a centred 224×224 crop, ×1/255 and normalised by CLIP's mean and std.
:class:`ClipPreprocess` holds those values; :func:`stablekit.weights.safety.load_safety_checker` reads them
from a ``preprocessor_config.json`` when the folder has one. A flagged image is replaced by a black one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from stablekit.models.safety import SafetyScores, StableDiffusionSafetyChecker

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


SafetyAction = Literal["blackout", "flag"]
SAFETY_ACTIONS: tuple[SafetyAction, ...] = ("blackout", "flag")


@dataclass(frozen=True)
class ClipPreprocess:
    shortest_edge: int = 224
    crop_height: int = 224
    crop_width: int = 224
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255

    def __post_init__(self) -> None:
        if self.crop_height > self.shortest_edge or self.crop_width > self.shortest_edge:
            raise ValueError(f"a {self.crop_height}×{self.crop_width} crop does not fit a {self.shortest_edge} px side")

    def __call__(self, images: Sequence[Image.Image]) -> Tensor:
        """PIL images of any size -> (B, 3, crop_height, crop_width) float32."""
        return torch.stack([self._one(im) for im in images])

    def _one(self, image: Image.Image) -> Tensor:
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            # transformers' convert_to_rgb: composited over white, not the alpha dropped
            image = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image)
        image = image.convert("RGB")
        w, h = image.size
        short, long = min(w, h), max(w, h)
        new_long = int(self.shortest_edge * long / short)
        size = (self.shortest_edge, new_long) if w <= h else (new_long, self.shortest_edge)  # (W, H)
        image = image.resize(size, Image.Resampling.BICUBIC)
        top, left = (size[1] - self.crop_height) // 2, (size[0] - self.crop_width) // 2
        x = np.asarray(image)[top : top + self.crop_height, left : left + self.crop_width]  # (H, W, 3) uint8
        x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        x = (x - np.array(self.mean, dtype=np.float32)) / np.array(self.std, dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


class SafetyChecker:
    """A :class:`StableDiffusionSafetyChecker` with its preprocessing; it runs in the model's device and dtype."""

    def __init__(self, model: StableDiffusionSafetyChecker, preprocess: ClipPreprocess | None = None) -> None:
        self.model = model.eval()
        self.preprocess = preprocess or ClipPreprocess()

    def scores(self, images: Sequence[Image.Image]) -> SafetyScores:
        p = next(self.model.parameters())
        return self.model.score(self.preprocess(images).to(p.device, p.dtype))

    def check(self, images: Sequence[Image.Image]) -> list[bool]:
        """True for each image the checker flags."""
        if not images:
            return []
        return [bool(f) for f in self.scores(images).has_nsfw_concept.tolist()]

    def filter(self, images: Sequence[Image.Image], *, blackout: bool = True) -> tuple[list[Image.Image], list[bool]]:
        """The images, every flagged one replaced by a black image of its size (unless ``blackout`` is off), and
        the flags."""
        flags = self.check(images)
        if not blackout:
            return list(images), flags
        return [black(im) if f else im for im, f in zip(images, flags, strict=True)], flags


def black(image: Image.Image) -> Image.Image:
    """A black image of the same size and mode, as diffusers returns for a flagged image."""
    return Image.new(image.mode, image.size)
