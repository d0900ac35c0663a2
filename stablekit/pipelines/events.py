"""The events every pipeline yields: the CLI's progress bar, the server's progress stream and previews all read
the same sequence (any number of :class:`Notice`, then per batch its :class:`Progress` steps and one
:class:`Generated`)."""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image
from torch import Tensor


@dataclass
class Notice:
    """Something the user should know before the images arrive (a truncated prompt, an assumption)."""

    message: str


@dataclass
class Progress:
    batch: int  # 0-based index within batch_count
    step: int  # 1-based
    total: int
    latents: Tensor  # (B, C, h, w) after this step
    denoised: Tensor  # (B, C, h, w) x0 estimate, for previews


@dataclass
class Generated:
    batch: int
    images: list[Image.Image]
    seeds: list[int]
    parameters: list[str]  # A1111-style "parameters" text, one per image
    nsfw: list[bool] | None = None  # the safety checker's verdict per image; None when the pipeline has none


Event = Notice | Progress | Generated
