"""A deterministic prompt-adherence checker for demo-model images (no learned model).

From the pixels alone it estimates the background colour (the dominant named colour of the border), then takes
the largest connected region that differs from the background as drawn: the shape's colour is the named colour
nearest its interior's median (the rim of a generated shape mixes with the background or a dark halo), and its
extent is the part of the region nearer that colour than the background's. From the extent: where its centroid
lies (thirds of the image), its size, and its kind (how much of its bounding box it fills: a square ~1.0, a circle
~0.785, a triangle ~0.5). On 843 of the generator's renders (every shape, size and position without jitter, and
600 with) a triangle filled 0.48-0.60 and a circle 0.69-0.88, but a small square with spurs at its corners
as little as 0.80; after an opening (see ``_open``) squares filled 0.92-1.0 and circles 0.76-0.88. So triangles
are cut at 0.67 on the region, squares at 0.9 on the opened region.
A five-pointed star (a shape the demo never saw, taught to it by DreamBooth: ``benchmarks/dreambooth_star.py``) is
the one concave shape: it fills about half of its convex hull (0.47 drawn exactly), every other shape nearly all of
it, so it is told apart first, by that ratio (``STAR_SOLIDITY``).
The prompt is parsed into the same attributes, with the demo captions' conventions: no size word means medium,
no position word means centred.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw

from stablekit.train.demo_data import COLORS, POSITIONS, SHAPES, SIZES, Attributes, render

if TYPE_CHECKING:
    from stablekit.pipelines import Pipeline

_PALETTE = np.array(list(COLORS.values()), dtype=np.float32)  # (K, 3)
_NAMES = list(COLORS)
# A regular five-pointed star's inner radius over its outer one (a pentagram's: the points' angle is 36 degrees).
STAR_INNER = 0.382
# Half the shape's widest extent over its radius r: a star is 2 r sin 72° wide, and 1.81 r tall.
_EXTENT = {"circle": 1.0, "square": 0.9, "triangle": 3**0.5 / 2, "star": math.sin(2 * math.pi / 5)}
SHAPES_KNOWN = (*SHAPES, "star")  # what the checker tells apart; SHAPES stays what the demo was trained on
# Measured on renders of every size and position (area over the hull of the region the checker extracts): stars
# 0.50-0.57, or 0.57-0.71 at medium and large size with test_adherence's blur and halo (small ones then reach
# 0.83: the blur fills their notches); circles, squares and triangles 0.78 (a small triangle) to 1.0.
STAR_SOLIDITY = 0.74
ATTRIBUTES = ("color", "shape", "background", "position", "size")

_PROMPT = re.compile(
    r"^\s*an?\s+(?:(?P<size>small|medium|large)\s+)?(?P<color>\w+)\s+(?P<shape>\w+)\s+on\s+an?\s+"
    r"(?P<background>\w+)\s+background(?:\s*,\s*(?P<position>[a-z ]+?))?\s*\.?\s*$",
    re.IGNORECASE,
)


def parse_prompt(prompt: str) -> Attributes:
    """``"a small red circle on a blue background, top left"`` -> Attributes; ValueError if it does not read so."""
    m = _PROMPT.match(prompt)
    if m is None:
        raise ValueError(f"not a demo prompt: {prompt!r}")
    g = {k: (v.lower() if v else None) for k, v in m.groupdict().items()}
    for key, allowed in (("color", COLORS), ("background", COLORS), ("shape", SHAPES_KNOWN)):
        if g[key] not in allowed:
            raise ValueError(f"unknown {key} {g[key]!r} in {prompt!r}")
    position = g["position"] or "center"
    if position == "centre":
        position = "center"
    if position not in POSITIONS:
        raise ValueError(f"unknown position {position!r} in {prompt!r}")
    return Attributes(g["shape"], g["color"], g["background"], g["size"] or "medium", position)  # type: ignore[arg-type]


def star_points(cx: float, cy: float, r: float, turn: float = 0.0) -> list[tuple[float, float]]:
    """The ten corners of a five-pointed star of outer radius ``r`` centred at (cx, cy), a point up when
    ``turn`` (radians, clockwise) is 0: outer and inner corners alternate every 36 degrees."""
    return [
        (cx + rad * math.sin(turn + k * math.pi / 5), cy - rad * math.cos(turn + k * math.pi / 5))
        for k, rad in enumerate([r, r * STAR_INNER] * 5)
    ]


def render_shape(
    attrs: Attributes,
    size: int = 64,
    *,
    jitter: tuple[float, float] = (0.0, 0.0),
    turn: float = 0.0,
    radius: float | None = None,
) -> Image.Image:
    """:func:`~stablekit.train.demo_data.render`, and a star for ``shape="star"``, drawn the same way (4x, then
    Lanczos) so that its edges look like the demo's other shapes'; ``radius`` (a fraction of the side) overrides
    the size's. (The demo's f=8 autoencoder keeps a star's points only from a radius of about 0.35: at 0.2, a
    medium star, all 19 of 19 colour pairs came back as blobs; at 0.42 all were still stars.)"""
    if attrs.shape != "star":
        return render(attrs, size, jitter=jitter)
    big = size * 4
    image = Image.new("RGB", (big, big), COLORS[attrs.background])
    cx, cy = POSITIONS[attrs.position]
    r = (radius if radius is not None else SIZES[attrs.size]) * big
    points = star_points((cx + jitter[0]) * big, (cy + jitter[1]) * big, r, turn)
    ImageDraw.Draw(image).polygon(points, fill=COLORS[attrs.color])
    return image.resize((size, size), Image.Resampling.LANCZOS)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected region of a (H, W) boolean mask, so stray specks elsewhere in a generated image
    move neither the centroid nor the bounding box."""
    h, w = mask.shape
    label = np.zeros(mask.shape, dtype=np.int32)
    best, best_size, current = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if label[y0, x0]:
            continue
        current += 1
        label[y0, x0] = current
        stack, size = [(int(y0), int(x0))], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny in (y - 1, y, y + 1):
                for nx in (x - 1, x, x + 1):
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not label[ny, nx]:
                        label[ny, nx] = current
                        stack.append((ny, nx))
        if size > best_size:
            best, best_size = current, size
    return label == best


def _nearest(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) -> (...) index of the nearest palette colour."""
    d = ((rgb[..., None, :].astype(np.float32) - _PALETTE) ** 2).sum(-1)
    return d.argmin(-1)


@dataclass(frozen=True)
class Estimate:
    color: str | None
    shape: str | None
    background: str
    position: str | None
    size: str | None


def _core(mask: np.ndarray, keep: float = 0.25) -> np.ndarray:
    """``mask`` eroded (4-neighbour) until at most ``keep`` of it is left, never to nothing: the shape's interior,
    away from the edges where a generated shape blends into, or rings, the background."""
    core, area = mask, mask.sum()
    while core.sum() > keep * area:
        inner = core.copy()
        inner[1:] &= core[:-1]
        inner[:-1] &= core[1:]
        inner[:, 1:] &= core[:, :-1]
        inner[:, :-1] &= core[:, 1:]
        if not inner.any():
            break
        core = inner
    return core


def _open(mask: np.ndarray) -> np.ndarray:
    """``mask`` eroded then dilated once (3x3): pixels that poke out of the region alone are dropped.
    On an edge that falls mid-pixel the edge pixels are half covered, and the resampling filter's ringing tips a
    few near a corner into the shape; those spurs grew a small square's bounding box by a row and a column,
    and its fill from ~1 to 0.8 (a circle's)."""

    def shifted(m: np.ndarray, combine: np.ufunc) -> np.ndarray:
        rows = m.copy()
        combine(rows[1:], m[:-1], out=rows[1:])
        combine(rows[:-1], m[1:], out=rows[:-1])
        out = rows.copy()
        combine(out[:, 1:], rows[:, :-1], out=out[:, 1:])
        combine(out[:, :-1], rows[:, 1:], out=out[:, :-1])
        return out

    return shifted(shifted(mask, np.logical_and), np.logical_or)


def _hull_area(points: list[tuple[int, int]]) -> float:
    """Area of the convex hull of ``points`` (Andrew's monotone chain, then the shoelace formula)."""

    def cross(o: tuple[int, int], a: tuple[int, int], b: tuple[int, int]) -> int:
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    def chain(pts: list[tuple[int, int]]) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for p in pts:
            while len(out) >= 2 and cross(out[-2], out[-1], p) <= 0:
                out.pop()
            out.append(p)
        return out[:-1]

    pts = sorted(set(points))
    hull = chain(pts) + chain(pts[::-1])
    return 0.5 * abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(hull, hull[1:] + hull[:1], strict=True)))


def _solidity(mask: np.ndarray) -> float:
    """The region's area over its convex hull's, in pixels: the hull of the pixels' corners, so a convex region
    scores just under 1 and a star about half. Each row's outermost corners are all the hull needs."""
    ys = np.nonzero(mask.any(1))[0]
    rows = mask[ys]
    left, right = rows.argmax(1), mask.shape[1] - rows[:, ::-1].argmax(1)  # first pixel, last pixel + 1
    corners = [
        (int(x), int(y) + dy) for y, lo, hi in zip(ys, left, right, strict=True) for x in (lo, hi) for dy in (0, 1)
    ]
    area = _hull_area(corners)
    return float(mask.sum() / area) if area > 0 else 1.0


def analyze(image: Image.Image) -> Estimate:
    arr = np.asarray(image.convert("RGB")).astype(np.float32)  # (H, W, 3)
    h, w, _ = arr.shape
    ring = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])  # (4S, 3)
    border = _nearest(ring)
    bg = int(np.bincount(border, minlength=len(_NAMES)).argmax())
    # Distances from the background as drawn (the median of its border pixels), not from its palette entry: a
    # generated background lies between palette colours often enough, and would otherwise all count as shape.
    bg_rgb = np.median(ring[border == bg], axis=0)
    mask = np.sqrt(((arr - bg_rgb) ** 2).sum(-1)) > 60
    if mask.sum() >= 4:
        mask = _largest_component(mask)
    if mask.sum() < 4:
        return Estimate(None, None, _NAMES[bg], None, None)
    # The shape's colour is its interior's: on a generated image the rim mixes with the background or a dark halo,
    # and on a small shape the rim outnumbers the inside.
    fg_rgb = np.median(arr[_core(mask)], axis=0)
    color = _NAMES[int(_nearest(fg_rgb))]
    # The shape's extent: pixels of the region nearer its colour than the background's (drops halos and blur).
    nearer = ((arr - fg_rgb) ** 2).sum(-1) < ((arr - bg_rgb) ** 2).sum(-1)
    if (mask & nearer).sum() >= 4:
        mask = _largest_component(mask & nearer)
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean() / h, xs.mean() / w
    row = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else ""
    col = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else ""
    position = f"{row} {col}".strip() or "center"
    bh, bw = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    fill = mask.sum() / (bh * bw)
    # Squares from circles by the opened region's fill (see _open); a triangle's sharp apex would not survive the
    # opening, so triangles are told by the region's own fill.
    opened = _open(mask)
    oys, oxs = np.nonzero(opened)
    opened_fill = opened.sum() / ((np.ptp(oys) + 1) * (np.ptp(oxs) + 1)) if opened.any() else fill
    if _solidity(mask) < STAR_SOLIDITY:
        shape = "star"
    else:
        shape = "triangle" if fill <= 0.67 else "square" if opened_fill > 0.9 else "circle"
    # Size from the half-extent over the shape's extent factor (the renderer's square is 0.9 r, a triangle
    # sqrt(3)/2 r wide), compared with geometric midpoints between the generator's three radii.
    radius = max(bh / h, bw / w) / 2 / _EXTENT[shape]
    small, medium, large = SIZES["small"], SIZES["medium"], SIZES["large"]
    size = "small" if radius < (small * medium) ** 0.5 else "large" if radius > (medium * large) ** 0.5 else "medium"
    return Estimate(color, shape, _NAMES[bg], position, size)


def score(image: Image.Image, prompt: str | Attributes) -> dict[str, bool]:
    """Per attribute, whether the image shows what the prompt asks."""
    want = parse_prompt(prompt) if isinstance(prompt, str) else prompt
    got = analyze(image)
    return {
        "color": got.color == want.color,
        "shape": got.shape == want.shape,
        "background": got.background == want.background,
        "position": got.position == want.position,
        "size": got.size == want.size,
    }


def evaluate(images: Sequence[Image.Image], prompts: Sequence[str | Attributes]) -> dict[str, float]:
    """Accuracy per attribute over a prompt set, plus ``all`` (every attribute right)."""
    if len(images) != len(prompts) or not images:
        raise ValueError(f"need as many images as prompts (got {len(images)} and {len(prompts)})")
    scores = [score(im, p) for im, p in zip(images, prompts, strict=True)]
    table = {a: sum(s[a] for s in scores) / len(scores) for a in ATTRIBUTES}
    table["all"] = sum(all(s.values()) for s in scores) / len(scores)
    return table


def generate_images(
    pipe: Pipeline,
    prompts: Sequence[str],
    guidance: float,
    *,
    seed: int = 0,
    batch: int = 50,
    steps: int | None = None,
    sampler: str | None = None,
) -> list[Image.Image]:
    """One image per prompt, prompt ``i`` with seed ``seed + i`` whatever the batching, so a table is reproducible
    and two guidance scales see the same starting noise."""
    from stablekit.pipelines import GenerationParams, generate

    images: list[Image.Image] = []
    for start in range(0, len(prompts), batch):
        chunk = list(prompts[start : start + batch])
        params = GenerationParams(chunk, guidance_scale=guidance, seed=seed + start, steps=steps, sampler=sampler)
        images += generate(pipe, params)
    return images


def autoencoder_images(pipe: Pipeline, attributes: Sequence[Attributes], *, batch: int = 50) -> list[Image.Image]:
    """Each prompt's clean render, encoded and decoded by ``pipe``'s autoencoder: the most adherence any UNet can
    reach through that autoencoder, so a low row here puts the blame on it rather than on the UNet."""
    import torch

    from stablekit.images import from_pil, to_pil

    vae, size = pipe.model.first_stage_model, pipe.config.default_size
    images: list[Image.Image] = []
    for start in range(0, len(attributes), batch):
        pixels = torch.cat([from_pil(render_shape(a, size)) for a in attributes[start : start + batch]])  # (B, 3, S, S)
        with torch.inference_mode():
            z = vae.encode(pixels.to(pipe.device, pipe.dtype)).mean * pipe.config.vae.scale_factor
        images += to_pil(pipe.decode(z))
    return images


def adherence_table(
    pipe: Pipeline, prompts: Sequence[str], guidances: Sequence[float], **kwargs: Any
) -> dict[float, dict[str, float]]:
    """Guidance scale -> accuracy per attribute (see :func:`evaluate`); ``kwargs`` go to :func:`generate_images`."""
    return {g: evaluate(generate_images(pipe, prompts, g, **kwargs), prompts) for g in guidances}
