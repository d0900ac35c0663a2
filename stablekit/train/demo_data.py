"""Deterministic captioned shapes: the demo model's training data and its evaluation prompts.

Every example is one shape on a plain background. Captions read as a user writes them:
``"a red circle on a blue background"``, ``"a small yellow triangle on a black background, top left"``.
Size and position words are optional, and their absence means something definite: no size word is a
medium shape, no position word a centred one. So a prompt without those words is still fully specified,
and the adherence checker can score every attribute of every prompt.

Shapes are drawn at 4x and downsampled with a Lanczos filter, so edges are antialiased as in photographs
rather than aliased as in raw rasterisation.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 165, 60),
    "blue": (35, 70, 215),
    "yellow": (240, 215, 45),
    "orange": (245, 135, 25),
    "purple": (135, 50, 175),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
# Half the shape's extent as a fraction of the image side; "medium" is what an unqualified caption means.
SIZES: dict[str, float] = {"small": 0.13, "medium": 0.2, "large": 0.29}
# Centre of the shape as a fraction of the image side, per position phrase; "center" is the unqualified one.
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.25, 0.25),
    "top": (0.5, 0.25),
    "top right": (0.75, 0.25),
    "left": (0.25, 0.5),
    "center": (0.5, 0.5),
    "right": (0.75, 0.5),
    "bottom left": (0.25, 0.75),
    "bottom": (0.5, 0.75),
    "bottom right": (0.75, 0.75),
}
TRAIN_SEED = 0
HELD_OUT_SEED = 1_000_003  # a different stream from any training seed below it
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class Attributes:
    shape: str
    color: str
    background: str
    size: str = "medium"
    position: str = "center"

    def caption(self, *, say_size: bool, say_position: bool) -> str:
        size = f"{self.size} " if say_size and self.size != "medium" else ""
        where = f", {self.position}" if say_position and self.position != "center" else ""
        return (
            f"{_article(size or self.color)} {size}{self.color} {self.shape} on {_article(self.background)} "
            f"{self.background} background{where}"
        )


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def random_attributes(rng: random.Random) -> tuple[Attributes, str]:
    """Draw attributes and the caption that describes them.

    Half of the captions name no position (the shape is then centred) and half name no size (medium), so
    short prompts are as well represented as long ones.
    """
    color, background = rng.sample(sorted(COLORS), 2)
    shape = rng.choice(SHAPES)
    say_size = rng.random() < 0.5
    say_position = rng.random() < 0.5
    size = rng.choice(sorted(SIZES)) if say_size else "medium"
    position = rng.choice(sorted(POSITIONS)) if say_position else "center"
    attrs = Attributes(shape, color, background, size, position)
    return attrs, attrs.caption(say_size=True, say_position=True)


def render(attrs: Attributes, size: int = 64, *, jitter: tuple[float, float] = (0.0, 0.0)) -> Image.Image:
    """Draw ``attrs`` on a ``size``-pixel square. ``jitter`` shifts the centre (fraction of the side)."""
    big = size * _SUPERSAMPLE
    image = Image.new("RGB", (big, big), COLORS[attrs.background])
    draw = ImageDraw.Draw(image)
    cx, cy = POSITIONS[attrs.position]
    cx, cy = (cx + jitter[0]) * big, (cy + jitter[1]) * big
    r = SIZES[attrs.size] * big
    fill = COLORS[attrs.color]
    if attrs.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif attrs.shape == "square":
        # Same area as the circle's bounding box would dwarf it; r * 0.9 keeps the three shapes comparable.
        s = r * 0.9
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    else:
        # Equilateral, pointing up, centred on its centroid.
        pts = [(cx + r * math.sin(a), cy - r * math.cos(a)) for a in (0.0, 2 * math.pi / 3, 4 * math.pi / 3)]
        draw.polygon(pts, fill=fill)
    return image.resize((size, size), Image.Resampling.LANCZOS)


def make_example(rng: random.Random | int, size: int = 64) -> tuple[Image.Image, str, Attributes]:
    """One (image, caption, attributes); an int seeds a fresh generator, so ``make_example(7)`` is reproducible."""
    if isinstance(rng, int):
        rng = random.Random(rng)
    attrs, caption = random_attributes(rng)
    # A little positional jitter so the model learns regions, not nine exact pixels.
    jitter = (rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04))
    return render(attrs, size, jitter=jitter), caption, attrs


def write_demo_dataset(folder: str | Path, n: int, *, size: int = 64, seed: int = TRAIN_SEED) -> Path:
    """``n`` examples as ``000000.png`` + ``000000.txt`` pairs and a ``metadata.jsonl`` of attributes.
    The same ``seed`` gives byte-identical files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    with open(folder / "metadata.jsonl", "w", encoding="utf-8") as meta:
        for i in range(n):
            image, caption, attrs = make_example(rng, size)
            stem = f"{i:06d}"
            image.save(folder / f"{stem}.png", optimize=False)
            (folder / f"{stem}.txt").write_text(caption + "\n", encoding="utf-8")
            meta.write(json.dumps({"file": f"{stem}.png", "caption": caption, **asdict(attrs)}) + "\n")
    return folder


def held_out_prompts(n: int, seed: int = HELD_OUT_SEED) -> list[tuple[str, Attributes]]:
    """Evaluation prompts drawn from a stream no training run uses."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        attrs, caption = random_attributes(rng)
        prompts.append((caption, attrs))
    return prompts
