"""The invisible watermark of the reference scripts, opt-in, through the ``invisible-watermark`` package.

CompVis' and Stability-AI's ``scripts/txt2img.py`` (and their img2img, inpainting, depth2img and upscaling
demos) mark every saved image with ``WatermarkEncoder().set_watermark('bytes', WM)`` and
``encode(bgr, 'dwtDct')``, where ``WM`` is ``b"StableDiffusionV1"`` (v1) or ``b"SDV2"`` (v2), on the 8-bit image
after the safety check, converted RGB -> BGR with cv2. Their checker (``scripts/tests/test_watermark.py``) reads the
file with ``cv2.imread`` and decodes ``WatermarkDecoder('bytes', 136)``: 17 bytes, the v1 mark.

We do the same on the pipeline's 8-bit PIL images (``to_pil`` has already rounded them as our PNG writer keeps
them), so the PNG holds exactly the bytes the encoder returned. dwtDct hides each bit in the largest AC
coefficient of 4x4 DCT blocks of the Haar-DWT approximation of the U channel, every block voting for one bit in
turn, so it needs texture and room: images under ``MIN_SIDE`` px on a side are refused (the library itself
refuses under 256x256 *pixels*, and at 128x512, which it takes, the v1 mark never decoded in our measurements).
Even above that the 136-bit v1 mark needs about 512 px, and flat images, JPEG recompression, resizing and
cropping lose either mark (``benchmarks/watermark_limits.py`` measures how often): a run reports every image
whose mark does not decode (:meth:`Watermarker.unreadable`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
from PIL import Image

from stablekit.config import ModelConfig
from stablekit.images import to_rgb

WATERMARKS: dict[str, bytes] = {"StableDiffusionV1": b"StableDiffusionV1", "SDV2": b"SDV2"}
MIN_SIDE = 256
METHOD = "dwtDct"
# --no-deps: invisible-watermark 0.2.0 declares opencv-python (the GUI build, which pulls in X11/Qt libraries and
# clashes with any headless OpenCV already present) and onnx/onnxruntime (its rivaGan method only); dwtDct needs
# only cv2 and pywt, which the headless wheel and PyWavelets provide.
INSTALL = "pip install --no-deps invisible-watermark==0.2.0 opencv-python-headless PyWavelets"


class WatermarkError(ValueError):
    """The watermark cannot be applied or read here; the message says why and what to do."""


class WatermarkSizeError(WatermarkError):
    """An image too small to carry the watermark."""


def _imwatermark() -> ModuleType:
    # Imported only when a watermark is asked for: the package (and OpenCV) is an optional extra.
    try:
        import imwatermark
    except ImportError as e:
        raise WatermarkError(f"the invisible watermark needs the invisible-watermark package: {INSTALL} ({e})") from e
    return imwatermark


def default_watermark(config: ModelConfig) -> str:
    """The mark the family's reference scripts write: ``SDV2`` for the OpenCLIP-H families (SD2 base, v,
    inpainting, depth, x4 upscaler), ``StableDiffusionV1`` for the OpenAI CLIP ones (SD1 and our demo models)."""
    return "SDV2" if config.text.kind == "openclip" else "StableDiffusionV1"


def require_size(width: int, height: int, what: str = "image") -> None:
    if width < MIN_SIDE or height < MIN_SIDE:
        raise WatermarkSizeError(
            f"{what} is {width}x{height}, too small for the invisible watermark: it needs at least "
            f"{MIN_SIDE} px on each side"
        )


def _bgr(image: Image.Image) -> np.ndarray[Any, np.dtype[np.uint8]]:
    import cv2

    return np.asarray(cv2.cvtColor(np.asarray(to_rgb(image)), cv2.COLOR_RGB2BGR), dtype=np.uint8)


class Watermarker:
    """Marks images with one of :data:`WATERMARKS`, as the reference scripts' ``put_watermark`` does."""

    def __init__(self, name: str = "StableDiffusionV1") -> None:
        if name not in WATERMARKS:
            raise WatermarkError(f"unknown watermark {name!r}; choose one of {', '.join(WATERMARKS)}")
        self.name = name
        # Made once here, so a missing package is an error when the pipeline is set up, not after sampling.
        self._encoder = _imwatermark().WatermarkEncoder()
        self._encoder.set_watermark("bytes", WATERMARKS[name])

    def require_size(self, width: int, height: int) -> None:
        """Refuse, before any compute, an output size that cannot carry the mark."""
        require_size(width, height, "the output")

    def apply(self, images: Sequence[Image.Image]) -> list[Image.Image]:
        """8-bit RGB images -> the same images marked (RGB, same size)."""
        out = []
        for image in images:
            require_size(*image.size)
            bgr = self._encoder.encode(_bgr(image), METHOD)  # (H, W, 3) uint8
            out.append(Image.fromarray(np.ascontiguousarray(bgr[:, :, ::-1])))
        return out

    def unreadable(self, images: Sequence[Image.Image]) -> list[int]:
        """Indices of marked images whose mark does not decode: dwtDct loses bits on flat images and, for the
        136-bit v1 mark, below about 512 px (benchmarks/watermark_limits.py), so a run says which ones."""
        return [i for i, image in enumerate(images) if check(image).found != self.name]


@dataclass(frozen=True)
class Detection:
    found: str | None  # the known watermark whose every bit decodes, as the reference's checker requires
    agreement: dict[str, float]  # per known watermark, the fraction of its bits that decode (about 0.5 by chance)


def check(image: Image.Image, what: str = "image") -> Detection:
    """Decode each known watermark from ``image``; the first that decodes exactly is ``found``."""
    require_size(*image.size, what)
    decoder_class = _imwatermark().WatermarkDecoder
    bgr = _bgr(image)
    agreement = {}
    for name, payload in WATERMARKS.items():
        want = np.unpackbits(np.frombuffer(payload, dtype=np.uint8)).astype(bool)
        got = np.asarray(decoder_class("bits", len(want)).decode(bgr, METHOD), dtype=bool)
        agreement[name] = float((got == want).mean())
    found = next((name for name, a in agreement.items() if a == 1.0), None)
    return Detection(found, agreement)
