"""Conversion between PIL images and model tensors, and PNG generation metadata.

Pixel tensors are in [-1, 1] (the autoencoder's range). The uint8 conversion rounds exactly as diffusers'
``numpy_to_pil`` does (``round(x * 255)`` after mapping to [0, 1]), so our PNGs are byte-identical to diffusers'
for identical decoded tensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin
from torch import Tensor


def to_pil(pixels: Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> B RGB images."""
    x = (pixels.float() / 2 + 0.5).clamp(0, 1)
    arr = x.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in arr]


def from_pil(image: Image.Image) -> Tensor:
    """An image -> (1, 3, H, W) float32 in [-1, 1]."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
    return torch.from_numpy(arr).permute(2, 0, 1)[None] * 2 - 1


def format_parameters(prompt: str, negative_prompt: str, settings: Mapping[str, object]) -> str:
    """The ``parameters`` text A1111 writes: prompt, ``Negative prompt: ...``, then ``Key: value, ...``.

    Values containing a comma or colon are quoted as A1111 does, so its parser (and the tools that read these
    files) split the line correctly.
    """

    def value(v: object) -> str:
        s = str(v)
        if any(c in s for c in ",:\n"):
            return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
        return s

    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{k}: {value(v)}" for k, v in settings.items() if v is not None))
    return "\n".join(lines)


def save_png(image: Image.Image, path: str | Path, parameters: str) -> Path:
    """Write ``image`` with a ``parameters`` tEXt chunk. Written to a temporary name first, then renamed, so an
    interrupted run never leaves a truncated PNG under the requested name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    tmp = path.with_name(f".{path.name}.partial")
    image.save(tmp, format="PNG", pnginfo=info)
    tmp.replace(path)
    return path


def read_parameters(path: str | Path) -> str | None:
    with Image.open(path) as im:
        text = im.info.get("parameters")
    return text if isinstance(text, str) else None
