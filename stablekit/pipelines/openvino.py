"""Loading a model onto the OpenVINO engine: identify it from its headers, key the cache by its content, and read
the torch weights only when a part has to be converted."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from stablekit.config import Prediction
from stablekit.engines import Precision
from stablekit.engines.cache import default_cache_dir
from stablekit.engines.openvino import OpenVINOEngine, build_engine, require_openvino
from stablekit.models.ldm import LatentDiffusion
from stablekit.weights import Probe, load_model, probe
from stablekit.weights.detect import config_to_json


def load_openvino(
    path: str | os.PathLike[str],
    prediction: Prediction | None,
    ema: bool,
    vae: str | os.PathLike[str] | None,
    variant: str | None,
    clip_skip: int,
    precision: Precision,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    report: Callable[[str], None] | None = None,
) -> tuple[Probe, OpenVINOEngine]:
    """(what the file is, its compiled engine). With every part in the cache, no tensor of the file is loaded."""
    require_openvino()  # before anything slow: a missing extra is the first thing to hear about
    found = probe(path, prediction=prediction, ema=ema, vae=vae, variant=variant)
    if not 1 <= clip_skip <= found.config.text.layers_used:
        raise ValueError(f"clip skip must be an integer in 1..{found.config.text.layers_used} for this model")

    def load() -> LatentDiffusion:
        loaded = load_model(path, prediction=prediction, dtype=torch.float32, ema=ema, vae=vae, variant=variant)
        return loaded.model

    sources = [Path(path)] + ([Path(vae)] if vae is not None else [])
    facts = {"config": config_to_json(found.config), "ema": ema, "variant": variant, "vae": vae is not None}
    engine = build_engine(
        found.config,
        sources,
        facts,
        load,
        skip=clip_skip - 1,
        precision=precision,
        cache_dir=Path(cache_dir) if cache_dir is not None else default_cache_dir(),
        report=report,
    )
    return found, engine
