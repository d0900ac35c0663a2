"""From rows to work: each row's seed, output name and checked settings, and the UNet batches.

Everything here is a pure function of the rows and the options, never of which rows are already done or how
many processes run: a resumed or sharded job forms the very batches an uninterrupted single process forms, so
every image is computed in the same company and comes out bit-identical.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace
from pathlib import PurePath
from typing import Any

from stablekit.batch.rows import Row
from stablekit.pipelines import GenerationParams, Pipeline
from stablekit.pipelines.params import MAX_SEED, resolve


@dataclass(frozen=True)
class Item:
    """One row ready to run (``params`` set) or failed before running (``error`` set)."""

    index: int  # position in the whole job, input order
    row: Row
    image: str  # output file name
    seed: int
    params: GenerationParams | None
    settings: dict[str, Any]  # every resolved setting, as the manifest records it
    error: str | None = None


def row_seed(base: int, row: Row) -> int:
    """A row without a seed gets ``base`` plus a hash of its file name and row number: the same in every run,
    shard and Azure mini-batch, where a running count would depend on how the files were split."""
    return (base + zlib.crc32(f"{row.file}/{row.number}".encode())) % (MAX_SEED + 1)


def image_name(row: Row) -> str:
    return f"{PurePath(row.file).stem}-{row.number}.png"


def prepare(pipe: Pipeline, rows: list[Row], base_seed: int) -> list[Item]:
    """Each row's params checked against the model and its limits now, before any compute."""
    items = []
    for i, row in enumerate(rows):
        seed = row.settings.get("seed", row_seed(base_seed, row))
        name = image_name(row)
        if row.error is not None:
            items.append(Item(i, row, name, seed, None, {}, row.error))
            continue
        s = row.settings
        params = GenerationParams(
            prompt=row.prompt,
            negative_prompt=s.get("negative_prompt", ""),
            width=s.get("width"),
            height=s.get("height"),
            steps=s.get("steps"),
            guidance_scale=s.get("guidance_scale"),
            seed=seed,
            sampler=s.get("sampler"),
        )
        try:
            r = resolve(pipe.config, params, limits=pipe.limits)
        except ValueError as e:
            items.append(Item(i, row, name, seed, None, {}, str(e)))
            continue
        # Resolved sizes, steps and guidance are what the image depends on; the sampler stays as the row gave
        # it, since only an unnamed sampler brings the model's own scheduler options.
        params = replace(params, width=r.width, height=r.height, steps=r.steps, guidance_scale=r.guidance)
        settings = {
            "prompt": row.prompt,
            "negative_prompt": params.negative_prompt,
            "seed": seed,
            "steps": r.steps,
            "guidance_scale": r.guidance,
            "width": r.width,
            "height": r.height,
            "sampler": r.sampler,
        }
        items.append(Item(i, row, name, seed, params, settings))
    return items


def _key(p: GenerationParams) -> tuple[Any, ...]:
    """What rows must agree on to share a UNet batch (as the server's worker merges requests)."""
    return (p.width, p.height, p.steps, p.guidance_scale, p.sampler)


def group(items: list[Item], batch_size: int, pipe: Pipeline) -> list[list[Item]]:
    """Runnable items in UNet batches of up to ``batch_size`` compatible rows, in input order of each batch's
    first row; a batch also keeps within the pipeline's pixel and image limits."""
    open_batches: dict[tuple[Any, ...], list[Item]] = {}
    batches: list[list[Item]] = []
    for item in items:
        if item.params is None:
            continue
        p = item.params
        pixels = (p.width or 1) * (p.height or 1)
        cap = max(1, min(batch_size, pipe.limits.max_images, pipe.limits.max_batch_pixels // pixels))
        key = _key(p)
        batch = open_batches.get(key)
        if batch is None:
            batch = open_batches[key] = []
            batches.append(batch)
        batch.append(item)
        if len(batch) >= cap:
            del open_batches[key]
    return batches


def shard(batches: list[list[Item]], rank: int, world: int) -> list[list[Item]]:
    """This process's share: every ``world``-th batch, a disjoint and deterministic split."""
    return batches[rank::world]


def merged(batch: list[Item]) -> GenerationParams:
    """One GenerationParams for a batch: a prompt per row, each image with its row's seed."""
    first = batch[0].params
    assert first is not None
    prompts = [i.row.prompt for i in batch]
    # A row's negative prompt is one string (prepare builds it so).
    negatives = [str(i.params.negative_prompt) if i.params else "" for i in batch]
    return replace(
        first, prompt=prompts, negative_prompt=negatives, seed=None, seeds=[i.seed for i in batch], batch_size=1
    )
