"""How often the reference scripts' invisible watermark survives: size, JPEG, resizing, cropping.

Marks images with :class:`stablekit.watermark.Watermarker` (the library itself below 256 px, which we refuse),
then decodes with the library's own ``WatermarkDecoder`` as the reference checker does. Three kinds of image,
``--n`` of each: ``textured`` (1/f noise, the spectrum of natural photographs), ``smooth`` (bicubic-upscaled
coarse noise: skies, gradients) and ``flat`` (the demo model's training shapes, upscaled).

Prints, per condition and kind, the share of marks that decode exactly (what ``watermark-check`` reports) and the
mean fraction of bits that decode (0.5 is chance). Unmarked images are decoded too, as the false-positive check.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/watermark_limits.py [--n 12]
"""

from __future__ import annotations

import argparse
import io
import time
from collections.abc import Callable

import numpy as np
from imwatermark import WatermarkDecoder, WatermarkEncoder
from PIL import Image

from stablekit.train.demo_data import make_example
from stablekit.watermark import METHOD, WATERMARKS, Watermarker

Rgb = np.ndarray


def textured(size: tuple[int, int], seed: int) -> Rgb:
    """1/f amplitude noise per channel: natural images' spectrum, mean 128, std 40."""
    h, w = size
    rng = np.random.default_rng(seed)
    f = np.sqrt(np.fft.fftfreq(h)[:, None] ** 2 + np.fft.rfftfreq(w)[None, :] ** 2)
    f[0, 0] = 1.0
    channels = []
    for _ in range(3):
        spectrum = (rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape)) / f
        spectrum[0, 0] = 0
        x = np.fft.irfft2(spectrum, s=(h, w))
        channels.append((x - x.mean()) / x.std())
    return np.clip(np.stack(channels, -1) * 40 + 128, 0, 255).round().astype(np.uint8)


def smooth(size: tuple[int, int], seed: int) -> Rgb:
    h, w = size
    coarse = np.random.default_rng(seed).integers(0, 256, (max(2, h // 32), max(2, w // 32), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC))


def flat(size: tuple[int, int], seed: int) -> Rgb:
    image, _, _ = make_example(seed, 64)
    return np.asarray(image.resize((size[1], size[0]), Image.Resampling.BICUBIC))


KINDS: dict[str, Callable[[tuple[int, int], int], Rgb]] = {"textured": textured, "smooth": smooth, "flat": flat}


def jpeg(quality: int) -> Callable[[Image.Image], Image.Image]:
    def f(image: Image.Image) -> Image.Image:
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=quality)
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")

    return f


def scale(factor: float) -> Callable[[Image.Image], Image.Image]:
    def f(image: Image.Image) -> Image.Image:
        w, h = image.size
        return image.resize((round(w * factor), round(h * factor)), Image.Resampling.LANCZOS)

    return f


def crop(pixels: int) -> Callable[[Image.Image], Image.Image]:
    def f(image: Image.Image) -> Image.Image:
        return image.crop((pixels, pixels, image.width, image.height))

    return f


def same(image: Image.Image) -> Image.Image:
    return image


def mark(rgb: Rgb, name: str) -> Image.Image | None:
    """Our marking; below 256 px the library's own (None where it refuses too)."""
    if min(rgb.shape[:2]) >= 256:
        return Watermarker(name).apply([Image.fromarray(rgb)])[0]
    encoder = WatermarkEncoder()
    encoder.set_watermark("bytes", WATERMARKS[name])
    try:
        bgr = encoder.encode(np.ascontiguousarray(rgb[:, :, ::-1]), METHOD)
    except RuntimeError:  # "image too small, should be larger than 256x256" (pixels, not sides)
        return None
    return Image.fromarray(np.ascontiguousarray(bgr[:, :, ::-1]))


def decode(image: Image.Image, name: str) -> tuple[bool, float] | None:
    """(every byte decodes, fraction of bits that decode) by the library's decoder; None where it refuses."""
    payload = WATERMARKS[name]
    bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
    want = np.unpackbits(np.frombuffer(payload, dtype=np.uint8)).astype(bool)
    try:
        exact = WatermarkDecoder("bytes", len(want)).decode(bgr, METHOD) == payload
        bits = np.asarray(WatermarkDecoder("bits", len(want)).decode(bgr, METHOD), dtype=bool)
    except RuntimeError:
        return None
    return exact, float((bits == want).mean())


def row(label: str, size: tuple[int, int], attack: Callable[[Image.Image], Image.Image], n: int, clean: bool) -> str:
    cells = []
    for make in KINDS.values():
        for name in WATERMARKS:
            results = []
            for seed in range(n):
                rgb = make(size, seed)
                marked = Image.fromarray(rgb) if clean else mark(rgb, name)
                results.append(None if marked is None else decode(attack(marked), name))
            if any(r is None for r in results):
                cells.append("refused")
                continue
            ok = sum(r[0] for r in results if r is not None)
            bits = np.mean([r[1] for r in results if r is not None])
            cells.append(f"{ok:>2}/{n} {bits:.2f}")
    return f"| {label:<22} | " + " | ".join(f"{c:<10}" for c in cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=12, help="images of each kind per condition (12)")
    n = parser.parse_args().n
    start = time.perf_counter()
    heads = [f"{kind} {'V1' if name == 'StableDiffusionV1' else name}" for kind in KINDS for name in WATERMARKS]
    print(f"| {'condition':<22} | " + " | ".join(f"{h:<10}" for h in heads) + " |")
    print("|" + "---|" * (len(heads) + 1))
    for side in (64, 128, 192, 256, 384, 512, 768):
        print(row(f"{side}x{side}, lossless", (side, side), same, n, clean=False))
    print(row("128x512, lossless", (128, 512), same, n, clean=False))
    print(row("320x512, lossless", (320, 512), same, n, clean=False))
    for quality in (95, 90, 75, 50):
        print(row(f"512, JPEG q{quality}", (512, 512), jpeg(quality), n, clean=False))
    print(row("512, resized x0.5", (512, 512), scale(0.5), n, clean=False))
    print(row("512, resized x2", (512, 512), scale(2.0), n, clean=False))
    for pixels in (1, 8, 16):
        print(row(f"512, {pixels} px cropped", (512, 512), crop(pixels), n, clean=False))
    print(row("512, unmarked", (512, 512), same, n, clean=True))
    print(
        f"\n{n} images per cell: exact decodes / images, mean fraction of bits decoded; "
        f"{time.perf_counter() - start:.0f} s"
    )


if __name__ == "__main__":
    main()
