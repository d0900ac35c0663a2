"""Running a batch job: this process's share of the batches, skipping what an earlier run finished, then (on
rank 0, after every process is done) the merged manifest and ``predictions.csv``.

Under ``torchrun`` each process takes every WORLD_SIZE-th batch of the same plan; the processes share nothing
but the output folder (one manifest each) and a barrier, so the result is the single-process result.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from stablekit.atomic import WriteError, check_writable
from stablekit.batch.outputs import PREDICTIONS, Appender, finish, is_done, load_records, rank_manifest, record
from stablekit.batch.plan import Item, group, merged, prepare, shard
from stablekit.batch.rows import Row
from stablekit.images import save_png
from stablekit.pipelines import Generated, Pipeline, txt2img


class TooManyFailures(ValueError):
    """More rows failed than ``error_threshold`` allows."""


@dataclass(frozen=True)
class JobOptions:
    batch_size: int = 1  # rows per UNet batch, at most
    seed: int = 0  # base of the seeds of rows without one
    error_threshold: int = -1  # failed rows tolerated; -1: any number (Azure's meaning)
    progress: bool = True  # a bar with ETA on stderr (rank 0 only)


@dataclass(frozen=True)
class Summary:
    rows: int
    done: int  # rows with an image, this run's and earlier runs'
    failed: int
    generated: int  # images computed by this process in this run
    skipped: int  # rows of this process's share an earlier run had finished


def prepare_output(out: Path) -> None:
    """Make the output folder and prove it writable: before the model loads, not after minutes of it."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(f"cannot make the output folder {out}: {e.strerror or e}") from e
    check_writable(out / PREDICTIONS)


def _check(failed: int, threshold: int) -> None:
    if threshold >= 0 and failed > threshold:
        raise TooManyFailures(f"{failed} rows failed, more than --error-threshold {threshold} allows")


def _generate(pipe: Pipeline, batch: list[Item]) -> list[tuple[Image.Image, str, bool | None]]:
    """(image, parameters, the safety checker's verdict or None without one) per row of ``batch``."""
    out: list[tuple[Image.Image, str, bool | None]] = []
    for ev in txt2img(pipe, merged(batch)):
        if isinstance(ev, Generated):
            nsfw = ev.nsfw if ev.nsfw is not None else [None] * len(ev.images)
            out.extend(zip(ev.images, ev.parameters, nsfw, strict=True))
    if len(out) != len(batch):
        raise RuntimeError(f"{len(out)} images for {len(batch)} rows")
    return out


def run_job(
    pipe: Pipeline,
    rows: list[Row],
    out: Path,
    options: JobOptions,
    *,
    rank: int = 0,
    world: int = 1,
    barrier: Callable[[], None] = lambda: None,
) -> Summary:
    """Generate this process's share of ``rows`` into ``out``; rank 0 then merges every process's records."""
    items = prepare(pipe, rows, options.seed)
    refused = sum(1 for i in items if i.error is not None)
    _check(refused, options.error_threshold)  # bad rows are known before any compute
    mine = shard(group(items, options.batch_size, pipe), rank, world)
    records, _ = load_records(out)
    todo = [b for b in mine if not all(is_done(i, records, out) for i in b)]
    skipped = sum(len(b) for b in mine) - sum(len(b) for b in todo)
    bar = tqdm(
        total=sum(len(b) for b in todo), unit="image", file=sys.stderr, disable=rank != 0 or not options.progress
    )
    generated, failed = 0, 0
    appender = Appender(rank_manifest(out, rank))
    try:
        for batch in todo:
            try:
                images = _generate(pipe, batch)
            except (ValueError, RuntimeError, MemoryError) as e:
                # NaNs, out of memory, a model error: the batch's rows fail and the job goes on.
                message = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                for item in batch:
                    appender.append(record(item, message))
                failed += len(batch)
                _check(refused + failed, options.error_threshold)
            else:
                # The whole batch was recomputed, in its original company; only its missing rows are written.
                for item, (image, text, nsfw) in zip(batch, images, strict=True):
                    if not is_done(item, records, out):
                        save_png(image, out / item.image, text)
                        appender.append(record(item, nsfw=nsfw))
                        generated += 1
            bar.update(len(batch))
    finally:
        appender.close()
        bar.close()
    barrier()
    if rank != 0:
        return Summary(len(items), 0, 0, generated, skipped)
    done, total_failed = finish(out, items)
    _check(total_failed, options.error_threshold)
    return Summary(len(items), done, total_failed, generated, skipped)


def init_distributed() -> tuple[int, int, Callable[[], None]]:
    """(rank, world size, barrier) from torchrun's environment; one process without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, lambda: None
    import torch.distributed as dist

    if not dist.is_initialized():
        # gloo runs everywhere; the processes exchange nothing but the barrier, so NCCL would gain nothing.
        dist.init_process_group("gloo", init_method="env://")
    return dist.get_rank(), dist.get_world_size(), dist.barrier
