"""Image files in and out: reading user images safely, converting them to model tensors, and PNG metadata.

Pixel tensors are in [-1, 1] (the autoencoder's range). The uint8 conversion rounds exactly as diffusers'
``numpy_to_pil`` does (``round(x * 255)`` after mapping to [0, 1]), so our PNGs are byte-identical to diffusers'
for identical decoded tensors. Resizing uses PIL's Lanczos filter, as diffusers' ``VaeImageProcessor`` does.
"""

from __future__ import annotations

import io
import struct
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError
from torch import Tensor

from stablekit.atomic import replacing_file

# An input larger than this is refused from its header, before a pixel is decoded: a small file that declares a
# huge canvas (a decompression bomb) must not take the machine's memory. 8192x8192 is far above any SD input.
MAX_INPUT_PIXELS = 8192 * 8192
# Only these decoders ever see an input's bytes: PIL's others (EPS through Ghostscript, PDF, FITS, ...) have had
# code-execution and memory bugs, and no user of an image generator needs them.
INPUT_FORMATS = ("PNG", "JPEG", "WEBP")


class ImageError(ValueError):
    """An input image that cannot be used: missing, not an image, corrupt, or too large."""


def load_image(path: str | Path, *, what: str = "image", max_pixels: int = MAX_INPUT_PIXELS) -> Image.Image:
    """Open and fully decode an image file, with its EXIF orientation applied. The mode is left as stored."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{what} {str(path)!r} does not exist")
    if not path.is_file():
        raise ImageError(f"{what} {str(path)!r} is not a file")
    return _decode(path, f"{what} {str(path)!r}", max_pixels)


def decode_image(data: bytes, *, what: str = "image", max_pixels: int = MAX_INPUT_PIXELS) -> Image.Image:
    """:func:`load_image` for bytes already in memory (an upload, a base64 field), with the same rules."""
    return _decode(io.BytesIO(data), what, max_pixels)


def _decode(source: Path | io.BytesIO, name: str, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source, formats=INPUT_FORMATS) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise ImageError(f"{name} is {w}x{h}, over the {max_pixels:,}-pixel limit for inputs")
                im.load()
                image = ImageOps.exif_transpose(im)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        # PIL's own guard fires at open for canvases far above ours; the same refusal, worded the same way.
        raise ImageError(f"{name} is over the {max_pixels:,}-pixel limit for inputs ({e})") from e
    except UnidentifiedImageError as e:
        raise ImageError(f"{name} is not a readable image: inputs must be PNG, JPEG or WebP") from e
    except (OSError, SyntaxError, ValueError, struct.error) as e:
        # PIL reports truncated and corrupt data as OSError/SyntaxError/ValueError from deep in a decoder, and
        # exif_transpose re-packs the EXIF block: a value of the wrong type for its tag is a struct.error there.
        raise ImageError(f"{name} is corrupt or truncated ({e})") from e
    except MemoryError as e:
        # PIL allocates what a chunk header declares before reading it (a 2 GB IDAT in a 140-byte PNG); under a
        # memory limit that fails here, and the file, not the machine, is at fault.
        raise ImageError(f"{name} declares more data than there is memory to read it") from e
    if image.width < 1 or image.height < 1:
        raise ImageError(f"{name} is empty ({image.width}x{image.height})")
    return image


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit and float greyscale (depth maps, scans) -> "L", scaled by the stored range, not clipped at 255."""
    if image.mode not in ("I", "I;16", "I;16B", "I;16L", "F"):
        return image
    arr = np.asarray(image, dtype=np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    scaled = (arr - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(arr)
    return Image.fromarray(scaled.round().astype(np.uint8), mode="L")


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any mode -> RGB. Transparency is composited over ``background`` (white, as A1111 flattens img2img
    inputs), rather than dropped, which would show whatever colour the transparent pixels happen to hold."""
    image = _to_8bit(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def to_mask(image: Image.Image) -> Image.Image:
    """A mask in any mode -> "L" (white = repaint). Transparent pixels count as black: keep."""
    return to_rgb(image, background=(0, 0, 0)).convert("L") if image.mode != "L" else image


def resized(image: Image.Image, width: int, height: int) -> Image.Image:
    """``image`` at (width, height), Lanczos-filtered as diffusers resizes pipeline inputs."""
    if image.size == (width, height):
        return image
    return image.resize((width, height), resample=Image.Resampling.LANCZOS)


def mask_tensor(mask: Image.Image) -> Tensor:
    """An "L" mask -> (1, 1, H, W) float32 of 0 and 1, binarised at half as diffusers' mask processor does."""
    arr = np.asarray(mask, dtype=np.float32) / 255.0
    return torch.from_numpy((arr >= 0.5).astype(np.float32))[None, None]


def to_pil(pixels: Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> B RGB images."""
    x = (pixels.float() / 2 + 0.5).clamp(0, 1)
    arr = x.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in arr]


def from_pil(image: Image.Image) -> Tensor:
    """An image -> (1, 3, H, W) float32 in [-1, 1]."""
    arr = np.asarray(to_rgb(image), dtype=np.float32) / 255.0  # (H, W, 3)
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
    """Write ``image`` with a ``parameters`` tEXt chunk. Written to a temporary file first, then renamed, so an
    interrupted run never leaves a truncated PNG under the requested name.

    The temporary file is created exclusively under a random name (``mkstemp``): a link planted beside the output
    is never followed, and the file is removed again if writing or renaming fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    with replacing_file(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return path


def read_parameters(path: str | Path) -> str | None:
    with Image.open(path) as im:
        text = im.info.get("parameters")
    return text if isinstance(text, str) else None
