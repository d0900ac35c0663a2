"""Loading and saving whole models: the public API.

:func:`load_model` takes an original single file (``.safetensors``, ``.ckpt``; the format is read from the
bytes) or a diffusers folder, works out what it is (:mod:`stablekit.weights.detect`), and returns the
:class:`~stablekit.models.ldm.LatentDiffusion` with everything it decided, as notes. :func:`probe` does the
same without building the model (for ``stablekit info``). :func:`save_model` writes either layout.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field, replace
from itertools import chain
from math import prod
from typing import Literal

import torch
from torch import Tensor

from stablekit.atomic import replacing_folder
from stablekit.config import ModelConfig, Prediction
from stablekit.models.ldm import LatentDiffusion, split_extras
from stablekit.weights.convert import WeightsError, fit_state_dict
from stablekit.weights.detect import METADATA_KEY, Detection, config_to_json, detect, family_from, is_standard
from stablekit.weights.diffusers import is_diffusers_folder, read_folder, write_folder
from stablekit.weights.load import (
    Checkpoint,
    CheckpointError,
    read_checkpoint,
    read_shapes,
    read_state_dict,
    write_safetensors,
)

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "Detection",
    "Loaded",
    "Probe",
    "WeightsError",
    "build_model",
    "detect",
    "load_model",
    "probe",
    "read_checkpoint",
    "read_shapes",
    "read_state_dict",
    "save_model",
]

Layout = Literal["original", "diffusers"]


@dataclass
class Probe:
    """What a checkpoint is, as decided from the file, without building the model."""

    path: str
    format: str  # safetensors | torch-zip | torch-legacy | diffusers
    config: ModelConfig
    family: str
    # Every size equals the family preset's.
    standard: bool
    prediction_source: str
    schedule_source: str
    # Network weights by original key (the keys the model loads).
    shapes: dict[str, tuple[int, ...]]
    dtypes: Counter[str]
    # Why -> keys the file holds that are not network weights (EMA, schedule buffers...).
    dropped: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def parameter_counts(self) -> dict[str, int]:
        prefixes = {
            "unet": "model.diffusion_model.",
            "vae": "first_stage_model.",
            "text": "cond_stage_model.",
        }
        return {name: sum(prod(s) for k, s in self.shapes.items() if k.startswith(p)) for name, p in prefixes.items()}


@dataclass(kw_only=True)
class Loaded(Probe):
    model: LatentDiffusion
    # Optional keys the file lacks (the text tower's unused parts): zero-filled, never written back.
    absent: list[str] = field(default_factory=list)


def _betas_note(tensors: dict[str, Tensor], cfg: ModelConfig) -> list[str]:
    betas = tensors.get("betas")
    if betas is None or betas.dim() != 1 or betas.numel() < 2:
        return []
    first, last = float(betas[0]), float(betas[-1])
    s = cfg.schedule
    if abs(first - s.beta_start) > 1e-6 * s.beta_start + 1e-9 or abs(last - s.beta_end) > 1e-6 * s.beta_end:
        return [
            f"the file's betas run {first:.6g}..{last:.6g} but the schedule used is "
            f"{s.beta_start:.6g}..{s.beta_end:.6g}"
        ]
    return []


def _open(
    path: str | os.PathLike[str], prediction: Prediction | None, shapes_only: bool
) -> tuple[Probe, dict[str, Tensor] | None]:
    path = os.fspath(path)
    if os.path.isdir(path):
        if not is_diffusers_folder(path):
            raise CheckpointError(f"{path}: a folder without model_index.json is not a diffusers pipeline")
        folder = read_folder(path)
        cfg, source = folder.config, "scheduler/scheduler_config.json prediction_type"
        if prediction is not None and prediction != cfg.schedule.prediction:
            cfg, source = cfg.with_prediction(prediction), "given by the caller"
        family = family_from(cfg.unet, cfg.text, cfg.schedule.prediction)
        found = Probe(
            path=path,
            format="diffusers",
            config=cfg,
            family=family,
            standard=is_standard(cfg, family),
            prediction_source=source,
            schedule_source="scheduler/scheduler_config.json",
            shapes={k: tuple(t.shape) for k, t in folder.tensors.items()},
            dtypes=Counter(str(t.dtype).removeprefix("torch.") for t in folder.tensors.values()),
            notes=folder.notes,
        )
        return found, folder.tensors

    ckpt = read_checkpoint(path, shapes_only=shapes_only)
    weights, dropped = split_extras(ckpt.shapes)
    det = detect(weights, metadata=ckpt.metadata, global_step=ckpt.global_step, name_hint=path, prediction=prediction)
    cfg, notes = det.config, [*ckpt.notes, *det.notes]
    tensors = ckpt.tensors
    if tensors is not None:
        notes += _betas_note(tensors, cfg)
        if "scale_factor" in tensors and det.schedule_source != "the file's stablekit config":
            cfg = replace(cfg, vae=replace(cfg.vae, scale_factor=float(tensors["scale_factor"])))
            notes.append(f"VAE latent scale {cfg.vae.scale_factor:.6g} read from the file's scale_factor")
        tensors = {k: tensors[k] for k in weights}
    found = Probe(
        path=path,
        format=ckpt.format,
        config=cfg,
        family=det.family,
        standard=det.standard,
        prediction_source=det.prediction_source,
        schedule_source=det.schedule_source,
        shapes={k: ckpt.shapes[k] for k in weights},
        dtypes=Counter(str(ckpt.dtypes[k]).removeprefix("torch.") for k in weights),
        dropped=dropped,
        notes=notes,
    )
    return found, tensors


def probe(path: str | os.PathLike[str], *, prediction: Prediction | None = None) -> Probe:
    """Identify a checkpoint file or diffusers folder; reads only a safetensors header where it can. Raises
    :class:`WeightsError`, as loading would, when the tensors do not fit the model the file describes."""
    found = _open(path, prediction, shapes_only=True)[0]
    with torch.device("meta"):  # shapes only: no memory, a fraction of a second even at full size
        model = LatentDiffusion(found.config)
        fit_state_dict(model, {k: torch.empty(s) for k, s in found.shapes.items()}, optional=model.optional_keys())
    return found


def build_model(
    config: ModelConfig,
    state: dict[str, Tensor],
    *,
    dtype: torch.dtype | None = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[LatentDiffusion, list[str]]:
    """The model holding ``state`` (original keys), and the optional keys ``state`` lacked. ``dtype`` casts
    floating-point tensors; None keeps the file's.

    The model is built on the meta device and the file's tensors are assigned into it, so a full-size model
    never exists twice in memory. A missing, unexpected or mis-shaped tensor raises :class:`WeightsError`.
    """
    with torch.device("meta"):
        model = LatentDiffusion(config)
    optional = model.optional_keys()
    fitted = fit_state_dict(model, state, optional=optional)
    absent = [k for k in optional if k not in state]
    fill = dtype or next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    ready: dict[str, Tensor] = {}
    for key, t in fitted.items():
        if key in absent:
            t = torch.zeros(t.shape, dtype=fill if t.is_floating_point() else t.dtype)  # never read by SD
        if t.is_floating_point():
            if key not in absent and not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise WeightsError(f"{key} holds {bad} NaN or infinite value(s) of {t.numel()}: the file is damaged")
            ready[key] = t.to(device=device, dtype=dtype or t.dtype)
        else:
            # Integer buffers are tiny: copy them, so they do not keep a memory-mapped source file alive.
            ready[key] = t.to(device=device, copy=True)
    model.load_state_dict(ready, strict=True, assign=True)
    unset = [n for n, t in chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if unset:
        raise WeightsError(f"model tensors not in its state dict stay uninitialised: {', '.join(unset[:5])}")
    return model.eval().requires_grad_(False), absent


def load_model(
    path: str | os.PathLike[str],
    *,
    prediction: Prediction | None = None,
    dtype: torch.dtype | None = torch.float32,
    device: str | torch.device = "cpu",
) -> Loaded:
    """Load a single-file checkpoint or a diffusers folder. ``prediction`` overrides the file's (or the
    assumed) prediction type; the notes say what was decided and why. ``dtype=None`` keeps the file's."""
    found, tensors = _open(path, prediction, shapes_only=False)
    assert tensors is not None
    model, absent = build_model(found.config, tensors, dtype=dtype, device=device)
    del tensors
    loaded = Loaded(**vars(found), model=model, absent=absent)
    if absent:
        loaded.notes.append(f"{len(absent)} unused text-encoder tensor(s) absent from the file, zero-filled")
    return loaded


def save_model(
    model: Loaded | LatentDiffusion,
    config: ModelConfig | None,
    path: str | os.PathLike[str],
    *,
    layout: Layout = "original",
    dtype: torch.dtype | None = None,
) -> None:
    """Write ``model`` as an original single ``.safetensors`` file (with its config in the metadata, so it
    loads back exactly) or as a diffusers folder. ``config`` defaults to the model's own; ``dtype`` casts
    floating-point tensors (e.g. ``torch.float16``). Either way the output appears whole or not at all; an
    existing file or folder at ``path`` is replaced."""
    absent: set[str] = set()
    if isinstance(model, Loaded):
        absent, net = set(model.absent), model.model
    else:
        net = model
    config = config or net.config
    state = {
        k: t.to(dtype) if dtype is not None and t.is_floating_point() else t
        for k, t in net.state_dict().items()
        if k not in absent
    }
    if layout == "original":
        write_safetensors(path, state, {METADATA_KEY: config_to_json(config), "format": "pt"})
    elif layout == "diffusers":
        # Filled under a temporary name and renamed: an interrupted write never leaves a folder that loads.
        with replacing_folder(path, overwrite=True) as tmp:
            write_folder(tmp, config, state, optional=net.optional_keys())
    else:
        raise ValueError(f"unknown layout {layout!r}: original or diffusers")
