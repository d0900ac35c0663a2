"""FID and CLIP score of a sweep's images, each scale's figures kept beside its images.

Real images are centre-cropped to a square before the FID resize: a sweep's images are square, and cropping
compares like with like where squashing a 640x480 COCO photo would not. Feature statistics are cached under
keys that name what they were computed from (files, sizes, times, weights), so a changed input is rescored.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from stablekit.atomic import replacing_file
from stablekit.eval.clip_score import ClipScorer
from stablekit.eval.fid import FeatureAccumulator, FeatureStats, frechet_distance, inception_features
from stablekit.eval.sweep import image_path, scale_folder
from stablekit.images import load_image, to_rgb
from stablekit.models.inception import InceptionV3

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class ScoreError(ValueError):
    """Images cannot be scored; the message names the folder or file."""


@dataclass(frozen=True)
class ScaleResult:
    guidance: float
    fid: float
    clip_score: float  # mean over the images of 100 * max(cos, 0)
    clip_score_std: float
    images: int


@dataclass(frozen=True)
class Scorers:
    inception: InceptionV3
    clip: ClipScorer
    identity: str  # names both models' weights, part of every cache key
    batch_size: int = 16


def real_images(folder: Path) -> list[Path]:
    """Every image file under ``folder``, in path order."""
    if not folder.is_dir():
        raise ScoreError(f"--real {folder}: not a folder of images")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if len(files) < 2:
        raise ScoreError(f"--real {folder} holds {len(files)} image(s); FID needs at least 2")
    return files


def real_stats(files: Sequence[Path], scorers: Scorers, cache: Path, advance: Callable[[int], None]) -> FeatureStats:
    """The real set's feature statistics, from ``cache`` when the files and weights are those it was made from."""
    key = _digest([scorers.identity] + [f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files])
    stats = _cached_stats(cache, key)
    if stats is not None:
        return stats
    acc = FeatureAccumulator()
    for batch in _batches_by_size((_square(p) for p in files), scorers.batch_size):
        with torch.inference_mode():
            acc.add(inception_features(scorers.inception, batch))
        advance(batch.shape[0])
    stats = acc.stats()
    _store_stats(cache, key, stats)
    return stats


def scale_result(
    out: Path,
    guidance: float,
    prompts: Sequence[str],
    real: FeatureStats,
    scorers: Scorers,
    advance: Callable[[int], None],
) -> ScaleResult:
    """FID against ``real`` and mean CLIP score of one scale's images; cached beside them."""
    folder = scale_folder(out, guidance)
    paths = [image_path(out, guidance, i) for i in range(len(prompts))]
    key = _digest([scorers.identity] + [f"{p.name}:{p.stat().st_mtime_ns}" for p in paths] + list(prompts))
    stats = _cached_stats(folder / "features", key)
    scores_file = folder / "clip-scores.json"
    scores = _cached_scores(scores_file, key)
    if stats is None or scores is None:
        acc, collected = FeatureAccumulator(), []
        for start in range(0, len(paths), scorers.batch_size):
            chunk = range(start, min(start + scorers.batch_size, len(paths)))
            images = torch.cat([_pixels(paths[i]) for i in chunk])  # (B, 3, H, W) uint8
            with torch.inference_mode():
                acc.add(inception_features(scorers.inception, images))
                collected.append(scorers.clip.score(images, [prompts[i] for i in chunk]))
            advance(len(chunk))
        stats, scores = acc.stats(), torch.cat(collected).double().numpy()
        _store_stats(folder / "features", key, stats)
        with replacing_file(scores_file) as tmp:
            tmp.write_text(json.dumps({"key": key, "scores": scores.tolist()}) + "\n", encoding="utf-8")
    return ScaleResult(
        guidance=guidance,
        fid=frechet_distance(stats, real),
        clip_score=float(scores.mean()),
        clip_score_std=float(scores.std()),
        images=len(paths),
    )


def _pixels(path: Path) -> Tensor:
    """An image file -> (1, 3, H, W) uint8."""
    arr = np.asarray(to_rgb(load_image(path, what="image")), dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)[None]


def _square(path: Path) -> Tensor:
    x = _pixels(path)
    h, w = x.shape[-2:]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return x[..., top : top + s, left : left + s]


def _batches_by_size(images: Iterator[Tensor], size: int) -> Iterator[Tensor]:
    """Consecutive images of one size stacked, at most ``size`` at a time (real sets mix sizes)."""
    pending: list[Tensor] = []
    for x in images:
        if pending and (x.shape != pending[0].shape or len(pending) == size):
            yield torch.cat(pending)
            pending = []
        pending.append(x)
    if pending:
        yield torch.cat(pending)


def _digest(parts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()


def _cached_stats(stem: Path, key: str) -> FeatureStats | None:
    npz, meta = stem.with_suffix(".npz"), stem.with_suffix(".json")
    try:
        if json.loads(meta.read_text(encoding="utf-8")).get("key") != key:
            return None
        return FeatureStats.load(npz)
    except (OSError, ValueError, KeyError):
        return None  # absent or unreadable: computed again, never trusted


def _store_stats(stem: Path, key: str, stats: FeatureStats) -> None:
    stats.save(stem.with_suffix(".npz"))
    with replacing_file(stem.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps({"key": key, "count": stats.count}) + "\n", encoding="utf-8")


def _cached_scores(path: Path, key: str) -> np.ndarray | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return np.asarray(data["scores"], dtype=np.float64) if data.get("key") == key else None
    except (OSError, ValueError, KeyError, TypeError):
        return None
