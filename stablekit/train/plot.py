"""The loss curve as a PNG, drawn with PIL (no plotting library): raw losses in grey, a running mean in blue."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from stablekit.atomic import replacing_file

_W, _H, _PAD = 640, 360, 48


def _smooth(values: Sequence[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_loss(steps: Sequence[int], losses: Sequence[float], path: str | Path, *, title: str = "loss") -> None:
    """Write the curve to ``path``. The y axis is logarithmic when the losses span more than a decade."""
    img = Image.new("RGB", (_W, _H), "white")
    draw = ImageDraw.Draw(img)
    pts = [(s, v) for s, v in zip(steps, losses, strict=True) if math.isfinite(v)]
    draw.text((_PAD, 12), f"{title}  ({len(pts)} points)", fill="black")
    if len(pts) >= 2:
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        log = min(ys) > 0 and max(ys) / min(ys) > 10
        f = math.log10 if log else float
        lo, hi = f(min(ys)), f(max(ys))
        hi = hi if hi > lo else lo + 1.0
        x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1

        def at(x: float, y: float) -> tuple[float, float]:
            px = _PAD + (x - x0) / (x1 - x0) * (_W - 2 * _PAD)
            return px, _H - _PAD - (f(y) - lo) / (hi - lo) * (_H - 2 * _PAD)

        draw.rectangle([_PAD, _PAD, _W - _PAD, _H - _PAD], outline="black")
        draw.line([at(x, y) for x, y in pts], fill=(190, 190, 190))
        smooth = _smooth(ys, max(1, len(ys) // 50))
        draw.line([at(x, y) for x, y in zip(xs, smooth, strict=True)], fill=(30, 80, 200), width=2)
        for label, y in ((f"{max(ys):.4g}", _PAD), (f"{min(ys):.4g}", _H - _PAD)):
            draw.text((4, y - 6), label, fill="black")
        draw.text((_PAD, _H - _PAD + 8), f"step {x0}", fill="black")
        draw.text((_W - _PAD - 60, _H - _PAD + 8), f"step {x1}", fill="black")
        if log:
            draw.text((_W - _PAD - 60, 12), "log scale", fill="black")
    # Under a temporary name: a run killed mid-save must not leave half a PNG (a run resumed at its end draws none).
    with replacing_file(path) as tmp:
        img.save(tmp, format="PNG")
