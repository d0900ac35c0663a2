"""Checks and conversions every image task shares: is this model for this task, is this an image, what size."""

from __future__ import annotations

from PIL import Image
from torch import Tensor

from stablekit.config import Conditioning, ModelConfig
from stablekit.images import from_pil, resized, to_rgb

# The command (and the function of the same name) each kind of model is made for.
_COMMAND: dict[Conditioning, str] = {
    "txt2img": "generate (or img2img, inpaint)",
    "inpaint": "inpaint (or generate, img2img)",
    "depth": "depth2img",
    "upscale": "upscale",
}
_KIND: dict[Conditioning, str] = {
    "txt2img": "a text-to-image model",
    "inpaint": "an inpainting model",
    "depth": "a depth-to-image model",
    "upscale": "an x4 upscaler",
}


def require_family(cfg: ModelConfig, task: str, accepted: tuple[Conditioning, ...]) -> None:
    """A one-line error naming the right command when ``task`` is given a model made for another."""
    if cfg.conditioning not in accepted:
        raise ValueError(
            f"{task} cannot run {cfg.name!r}: it is {_KIND[cfg.conditioning]}; "
            f"use `stablekit {_COMMAND[cfg.conditioning]}`"
        )


def check_strength(strength: float) -> float:
    if isinstance(strength, bool) or not isinstance(strength, int | float) or not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be a number in [0, 1], got {strength!r}")
    return float(strength)


def require_image(image: object, what: str) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise ValueError(f"{what} must be a PIL image, got {type(image).__name__}")
    if image.width < 1 or image.height < 1:
        raise ValueError(f"{what} is empty ({image.width}x{image.height})")
    return image


def default_size(image: Image.Image, multiple: int, what: str = "image") -> tuple[int, int]:
    """(width, height) of ``image`` rounded down to ``multiple``, as diffusers sizes its inputs."""
    w, h = image.width - image.width % multiple, image.height - image.height % multiple
    if w < multiple or h < multiple:
        raise ValueError(f"{what} is {image.width}x{image.height}; it must be at least {multiple}x{multiple}")
    return w, h


def pixels(image: Image.Image, width: int, height: int) -> Tensor:
    """An input image -> (1, 3, height, width) in [-1, 1]: RGB, then resized if its size differs."""
    return from_pil(resized(to_rgb(image), width, height))
