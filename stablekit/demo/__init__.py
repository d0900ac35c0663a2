"""The demo model shipped inside the package, so ``stablekit generate`` makes an image on a machine that has no
checkpoint and cannot download one; and its x4 upscaler, so ``stablekit upscale`` does too.

It is a tiny CLIP text tower, autoencoder and UNet (the ``DEMO`` preset, the same code as the released families)
trained by ``stablekit train demo`` on generated captioned shapes: "a red circle on a blue background",
optionally with a size ("small", "large") and a position ("top left", "bottom", ...). It knows nothing else.

The upscaler (the ``DEMO_X4`` preset, trained by ``stablekit train demo-upscaler``) takes its 64 px images to
256 px; it reuses the demo model's text tower.
"""

from __future__ import annotations

from pathlib import Path

MODEL = Path(__file__).resolve().parent / "demo.safetensors"
UPSCALER = MODEL.with_name("upscaler.safetensors")


def model_path() -> Path:
    """The shipped demo model's file; FileNotFoundError, saying how to make it, if this install lacks it."""
    if not MODEL.is_file():
        raise FileNotFoundError(
            f"the demo model is not installed ({MODEL} is missing): pass --model PATH, "
            "or reproduce it with `stablekit train demo --out runs/demo`"
        )
    return MODEL


def upscaler_path() -> Path:
    """The shipped demo x4 upscaler's file; FileNotFoundError, saying how to make it, if this install lacks it."""
    if not UPSCALER.is_file():
        raise FileNotFoundError(
            f"the demo upscaler is not installed ({UPSCALER} is missing): pass --model PATH, "
            "or reproduce it with `stablekit train demo-upscaler --out runs/x4`"
        )
    return UPSCALER
