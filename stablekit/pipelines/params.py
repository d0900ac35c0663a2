"""What a caller asks for (:class:`GenerationParams`) and its checked, defaulted form (:class:`Resolved`).

Every task resolves its parameters here, before any model runs, so a bad value is one clear error whatever the
task and nothing has been computed yet.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from stablekit.config import ModelConfig
from stablekit.diffusion import resolve_sampler

MAX_SEED = 2**32 - 1
# Far above any useful scale (A1111's interface stops at 30): larger ones only overflow to NaN after sampling.
MAX_GUIDANCE = 100.0


@dataclass(frozen=True)
class Limits:
    """What one call may ask for, checked before any compute so that a typo (``--width 100000``) is an error
    naming the limit rather than a machine out of memory. A pipeline holds its limits; the command line's
    ``--max-*`` flags raise them. The defaults fit a 24 GiB machine: 4.2 MP per image (2048x2048, the x4
    upscaler's output from 512x512) and as many pixels in one UNet batch (16 images at 512x512, 1024 at 64x64):
    what a batch costs grows with its pixels, not its count."""

    max_pixels: int = 2048 * 2048  # width x height of each output image
    max_batch_pixels: int = 2048 * 2048  # pixels sampled together: prompts x batch_size x width x height
    max_images: int = 1000  # images in one call: the batch times batch_count
    max_steps: int = 1000
    max_prompt_chars: int = 20_000  # longer text is only cut to 77 tokens, after tokenizing all of it


@dataclass(frozen=True)
class GenerationParams:
    # One prompt, or several: each then gets batch_size images (prompt-major, as diffusers orders them).
    prompt: str | Sequence[str]
    negative_prompt: str | Sequence[str] = ""  # one for all prompts, or one per prompt
    width: int | None = None  # None: the family's default size (image tasks: the input image's size)
    height: int | None = None
    steps: int | None = None  # None: the family's default
    guidance_scale: float | None = None  # guidance is on when > 1
    seed: int | None = None  # None: a random seed, reported back
    batch_size: int = 1
    batch_count: int = 1
    sampler: str | None = None  # None: the family's default (from the released scheduler configs)
    sampler_options: dict[str, Any] = field(default_factory=dict)
    # One seed per image of a single batch, in place of ``seed``: how a server runs several requests as one UNet
    # batch while each image keeps the seed (and so the image) its own request would have had.
    seeds: Sequence[int] | None = None


@dataclass(frozen=True)
class Resolved:
    width: int
    height: int
    steps: int
    guidance: float
    seed: int
    sampler: str
    prompts: list[str]  # one per image of a batch
    negatives: list[str]
    batch_count: int
    sampler_options: dict[str, Any]
    explicit_seeds: tuple[int, ...] | None = None  # GenerationParams.seeds

    @property
    def per_batch(self) -> int:
        return len(self.prompts)

    def seeds(self, batch: int) -> list[int]:
        """Image i of batch b uses seed + b·per_batch + i, so an image's seed names it in any batch layout."""
        if self.explicit_seeds is not None:
            return list(self.explicit_seeds)
        return [self.seed + batch * self.per_batch + i for i in range(self.per_batch)]


def _prompt_list(value: str | Sequence[str], what: str) -> list[str]:
    items = [value] if isinstance(value, str) else list(value)
    if not all(isinstance(p, str) for p in items):
        raise ValueError(f"{what} must be a string or a list of strings")
    for text in items:
        # Both would fail only at the end, writing the PNG's text chunk, or pass through C code as a cut string.
        if "\x00" in text:
            raise ValueError(f"{what} contains a NUL character at position {text.index(chr(0))}")
        bad = next((i for i, c in enumerate(text) if "\ud800" <= c <= "\udfff"), None)
        if bad is not None:
            raise ValueError(f"{what} contains an unpaired surrogate (not valid Unicode text) at position {bad}")
    return items


def _integer(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return value


def _limit(what: str, value: int, limit: int, flag: str) -> None:
    if value > limit:
        raise ValueError(f"{what} ({value:,}) is over the limit of {limit:,}; raise it with {flag}")


def resolve(
    cfg: ModelConfig,
    p: GenerationParams,
    *,
    size: tuple[int, int] | None = None,
    multiple: int = 8,
    limits: Limits = Limits(),
) -> Resolved:
    """Defaults filled in and every value checked against ``limits``. ``size`` (width, height) replaces the
    family's default size (an image task's input size); sizes must be positive multiples of ``multiple``."""
    default_w, default_h = size if size is not None else (cfg.default_size, cfg.default_size)
    width = _integer("width", p.width if p.width is not None else default_w)
    height = _integer("height", p.height if p.height is not None else default_h)
    for name, v in (("width", width), ("height", height)):
        if v <= 0 or v % multiple:
            raise ValueError(f"{name} must be a positive multiple of {multiple}, got {v}")
    _limit(f"the image's pixels, {width}x{height}", width * height, limits.max_pixels, "--max-pixels")
    steps = _integer("steps", p.steps if p.steps is not None else cfg.default_steps)
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    _limit("steps", steps, limits.max_steps, "--max-steps")
    guidance = float(p.guidance_scale if p.guidance_scale is not None else cfg.default_guidance)
    if not math.isfinite(guidance) or not 0 <= guidance <= MAX_GUIDANCE:
        raise ValueError(f"guidance scale must be a number in [0, {MAX_GUIDANCE:g}], got {guidance}")
    batch_size, batch_count = _integer("batch size", p.batch_size), _integer("batch count", p.batch_count)
    if batch_size < 1 or batch_count < 1:
        raise ValueError(f"batch size and count must be >= 1, got {batch_size} and {batch_count}")
    seed = _integer("seed", p.seed) if p.seed is not None else random.randint(0, MAX_SEED)
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be in [0, {MAX_SEED}], got {seed}")
    sampler = resolve_sampler(p.sampler if p.sampler is not None else cfg.default_sampler)
    # The model's own scheduler settings (a folder's use_karras_sigmas, solver_order, ...) come with its default
    # sampler only when no sampler is named. A named sampler, the model's own included, starts from its own
    # defaults, so a name means the same sampler on every model (and the command line, which cannot switch a
    # folder's setting off, can still ask for the plain one); the model's training schedule (spacing, offset,
    # zero SNR) applies either way. The caller's options win over the model's.
    options = dict(p.sampler_options)
    if p.sampler is None:
        options = {**dict(cfg.default_sampler_options), **options}
    prompts = _prompt_list(p.prompt, "prompt")
    if not prompts:
        raise ValueError("no prompt given (an empty list)")
    negatives = _prompt_list(p.negative_prompt, "negative prompt")
    for text in (*prompts, *negatives):
        _limit("a prompt's length in characters", len(text), limits.max_prompt_chars, "--max-prompt-chars")
    per_batch = len(prompts) * batch_size
    pixels = per_batch * width * height
    where = f"{per_batch} images of {width}x{height}"
    _limit(f"pixels per batch, {where}", pixels, limits.max_batch_pixels, "--max-batch-pixels")
    _limit("images in the run (per batch x batch count)", per_batch * batch_count, limits.max_images, "--max-images")
    if len(negatives) == 1:
        negatives *= len(prompts)
    elif len(negatives) != len(prompts):
        raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts: give one, or one per prompt")
    per_image = [(q, n) for q, n in zip(prompts, negatives, strict=True) for _ in range(batch_size)]
    explicit = None
    if p.seeds is not None:
        explicit = tuple(_integer("seed", s) for s in p.seeds)
        if batch_count != 1 or len(explicit) != per_batch:
            raise ValueError(f"{len(explicit)} seeds for {per_batch} images in {batch_count} batch(es): one per image")
        if not all(0 <= s <= MAX_SEED for s in explicit):
            raise ValueError(f"seeds must be in [0, {MAX_SEED}]")
        seed = explicit[0]
    return Resolved(
        width,
        height,
        steps,
        guidance,
        seed,
        sampler,
        [q for q, _ in per_image],
        [n for _, n in per_image],
        batch_count,
        options,
        explicit,
    )
