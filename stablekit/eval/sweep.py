"""The model cards' guidance sweep: one image per prompt at each guidance scale, kept on disk so that an
interrupted sweep resumes where it stopped and a finished one is re-scored without sampling again.

Layout of the output folder::

    sweep.json                    what the images were made with; a resumed sweep must agree with it
    prompts.txt                   the prompts, one per line, image i is prompt i
    images/guidance-3/000042.png  prompt 42 at guidance 3, seed = --seed + 42, its settings in the PNG

Image i gets seed ``seed + i`` at every scale, as the cards compare scales on the same noise. Prompts are
sampled in fixed batches (``batch_size`` consecutive prompts of one scale), and a batch missing any image is
sampled again whole: a batch's float sums depend on its members, so this is what keeps every image of a
resumed sweep the one an uninterrupted sweep makes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from stablekit.atomic import replacing_file
from stablekit.images import save_png
from stablekit.pipelines import Pipeline
from stablekit.pipelines.events import Generated, Progress
from stablekit.pipelines.params import GenerationParams, resolve
from stablekit.pipelines.txt2img import txt2img


class SweepError(ValueError):
    """A sweep cannot start or resume as asked; the message says why and what to do."""


@dataclass(frozen=True)
class SweepSettings:
    """What decides the images, apart from the guidance scale: a resumed sweep must match it exactly."""

    model: str
    steps: int
    sampler: str
    size: int
    seed: int
    negative: str
    batch_size: int


def scale_folder(out: Path, guidance: float) -> Path:
    return out / "images" / f"guidance-{guidance:g}"


def image_path(out: Path, guidance: float, index: int) -> Path:
    return scale_folder(out, guidance) / f"{index:06d}.png"


def prepare(out: Path, settings: SweepSettings, prompts: Sequence[str]) -> None:
    """Start a sweep in ``out``, or check that the one already there was made with the same settings and prompts.

    Images from other settings never mix into a result: a mismatch is an error naming what differs."""
    manifest, prompt_file = out / "sweep.json", out / "prompts.txt"
    if manifest.exists():
        try:
            before = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise SweepError(f"{manifest} cannot be read ({e}); give a new --out") from None
        differ = [k for k, v in asdict(settings).items() if before.get(k) != v]
        if differ:
            raise SweepError(
                f"{out} holds a sweep made with other settings ({', '.join(differ)}); "
                "give a new --out or the same settings"
            )
        written = prompt_file.read_text(encoding="utf-8").splitlines() if prompt_file.is_file() else []
        if written != list(prompts):
            raise SweepError(f"{out} holds a sweep of other prompts; give a new --out or the same --prompts/--n/--seed")
        return
    for prompt in prompts:
        if "\n" in prompt or "\r" in prompt:
            raise SweepError(f"a prompt spans several lines: {prompt[:60]!r}")
    out.mkdir(parents=True, exist_ok=True)
    with replacing_file(prompt_file) as tmp:
        tmp.write_text("".join(p + "\n" for p in prompts), encoding="utf-8")
    with replacing_file(manifest) as tmp:
        tmp.write_text(json.dumps(asdict(settings), indent=2) + "\n", encoding="utf-8")


@dataclass(frozen=True)
class Batch:
    guidance: float
    indices: range  # the prompts sampled together
    write: tuple[int, ...]  # those not on disk yet

    @property
    def images(self) -> int:
        return len(self.write)


def missing(out: Path, settings: SweepSettings, guidance: Sequence[float], count: int) -> list[Batch]:
    """The batches with an image not on disk yet. Images are written whole or not at all (``save_png``)."""
    todo = []
    for g in guidance:
        for start in range(0, count, settings.batch_size):
            indices = range(start, min(start + settings.batch_size, count))
            write = tuple(i for i in indices if not image_path(out, g, i).is_file())
            if write:
                todo.append(Batch(g, indices, write))
    return todo


def batch_params(settings: SweepSettings, prompts: Sequence[str], guidance: float, indices: range) -> GenerationParams:
    """What one UNet batch of the sweep asks the pipeline for."""
    return GenerationParams(
        prompt=[prompts[i] for i in indices],
        negative_prompt=settings.negative,
        width=settings.size,
        height=settings.size,
        steps=settings.steps,
        guidance_scale=guidance,
        sampler=settings.sampler,
        seeds=[settings.seed + i for i in indices],
    )


def check(pipe: Pipeline, settings: SweepSettings, prompts: Sequence[str], guidance: Sequence[float]) -> None:
    """Every refusal the pipeline would make (sampler, size, steps, limits) before a sweep folder is started:
    a folder made with settings that cannot run would then refuse the corrected ones."""
    first = range(min(settings.batch_size, len(prompts)))
    for g in guidance:
        resolve(pipe.config, batch_params(settings, prompts, g, first), limits=pipe.limits)


def generate_missing(
    pipe: Pipeline,
    out: Path,
    settings: SweepSettings,
    prompts: Sequence[str],
    todo: Sequence[Batch],
    *,
    advance: Callable[[float], None] = lambda images: None,
) -> None:
    """Sample every batch of ``todo`` and write its missing images.

    ``advance`` receives progress in images written (fractions of a batch per sampling step), for a progress bar."""
    for batch in todo:
        for event in txt2img(pipe, batch_params(settings, prompts, batch.guidance, batch.indices)):
            if isinstance(event, Progress):
                advance(batch.images / event.total)
            elif isinstance(event, Generated):
                for i, image, text in zip(batch.indices, event.images, event.parameters, strict=True):
                    if i in batch.write:
                        save_png(image, image_path(out, batch.guidance, i), text)
