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
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from stablekit.atomic import replacing_folder
from stablekit.config import ModelConfig, Prediction
from stablekit.models.ldm import LatentDiffusion, split_extras
from stablekit.text.files import same_as_builtin, tokenizer_from_json, tokenizer_to_json
from stablekit.text.tokenizer import CLIPTokenizer, default_tokenizer
from stablekit.weights.convert import WeightsError, fit_state_dict
from stablekit.weights.detect import (
    METADATA_KEY,
    TOKENIZER_KEY,
    VAE,
    Detection,
    config_to_json,
    detect,
    family_from,
    is_standard,
)
from stablekit.weights.diffusers import is_diffusers_folder, read_folder, write_folder
from stablekit.weights.ema import ema_count, ema_sources
from stablekit.weights.load import (
    Checkpoint,
    CheckpointError,
    read_checkpoint,
    read_shapes,
    read_state_dict,
    write_safetensors,
)
from stablekit.weights.vae_file import read_vae

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
    # EMA copies of UNet weights the file holds (``model_ema.*``), and whether they are the ones loaded.
    ema: int = 0
    ema_loaded: bool = False
    # The separate autoencoder loaded in place of the file's own, if one was given.
    vae: str | None = None
    # The model's own tokenizer (a folder's tokenizer/, or our file's metadata); None: the built-in CLIP one.
    tokenizer: CLIPTokenizer | None = None

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


LIVE_UNET = "live UNet weights (the EMA copy is loaded in their place)"


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
    path: str | os.PathLike[str],
    prediction: Prediction | None,
    shapes_only: bool,
    *,
    ema: bool = False,
    vae: str | os.PathLike[str] | None = None,
    variant: str | None = None,
) -> tuple[Probe, dict[str, Tensor] | None]:
    path = os.fspath(path)
    tensors: dict[str, Tensor] | None
    if os.path.isdir(path):
        if not is_diffusers_folder(path):
            raise CheckpointError(f"{path}: a folder without model_index.json is not a diffusers pipeline")
        if ema:
            raise WeightsError(f"{path}: a diffusers folder holds no EMA copy of the UNet: load it without --ema")
        found, tensors, dtypes = _open_folder(path, prediction, variant)
    elif variant is not None:
        raise WeightsError(f"{path}: variant {variant!r} names files in a diffusers folder; this is a single file")
    else:
        found, tensors, dtypes = _open_file(path, prediction, shapes_only, ema)
    if vae is not None:
        tensors = _use_vae(found, tensors, dtypes, os.fspath(vae), shapes_only)
    found.dtypes = Counter(str(dtypes[k]).removeprefix("torch.") for k in found.shapes)
    text = found.config.text
    problem = (found.tokenizer or default_tokenizer()).mismatch(
        vocab_size=text.vocab_size, context_length=text.context_length, pad_token=text.pad_token
    )
    if problem:
        found.notes.append(f"{problem}: prompts cannot be encoded (the model loads, and converts)")
    return found, tensors


def _open_folder(
    path: str, prediction: Prediction | None, variant: str | None
) -> tuple[Probe, dict[str, Tensor], dict[str, torch.dtype]]:
    folder = read_folder(path, variant=variant)
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
        dtypes=Counter(),
        notes=folder.notes,
        tokenizer=folder.tokenizer,
    )
    return found, folder.tensors, {k: t.dtype for k, t in folder.tensors.items()}


def _open_file(
    path: str, prediction: Prediction | None, shapes_only: bool, ema: bool
) -> tuple[Probe, dict[str, Tensor] | None, dict[str, torch.dtype]]:
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
    # Model key -> the file key it is loaded from: itself, or its EMA copy.
    source = {k: k for k in weights}
    if ema:
        swap = ema_sources(cfg.unet, ckpt.shapes, path)
        used = set(swap.values())
        dropped = {why: kept for why, keys in dropped.items() if (kept := [k for k in keys if k not in used])}
        dropped[LIVE_UNET] = [k for k in swap if k in weights]
        source |= swap
        notes.append(f"UNet weights from the file's EMA copy ({len(swap)} model_ema.* tensors)")
    if tensors is not None:
        tensors = {k: tensors[s] for k, s in source.items()}
    found = Probe(
        path=path,
        format=ckpt.format,
        config=cfg,
        family=det.family,
        standard=det.standard,
        prediction_source=det.prediction_source,
        schedule_source=det.schedule_source,
        shapes={k: ckpt.shapes[s] for k, s in source.items()},
        dtypes=Counter(),
        dropped=dropped,
        notes=notes,
        tokenizer=_stored_tokenizer(path, ckpt.metadata),
        ema=ema_count(ckpt.shapes),
        ema_loaded=ema,
    )
    return found, tensors, {k: ckpt.dtypes[s] for k, s in source.items()}


def _use_vae(
    found: Probe,
    tensors: dict[str, Tensor] | None,
    dtypes: dict[str, torch.dtype],
    vae: str,
    shapes_only: bool,
) -> dict[str, Tensor] | None:
    """Put the autoencoder read from ``vae`` in place of the checkpoint's own (``found`` and ``dtypes`` are
    updated in place); its latent scale, if its config gives one, wins, with a note when it differs."""
    got = read_vae(vae, found.config.vae, shapes_only=shapes_only)
    own = [k for k in found.shapes if k.startswith(VAE)]
    for key in own:
        del found.shapes[key], dtypes[key]
    found.shapes |= {k: tuple(t.shape) for k, t in got.tensors.items()}
    dtypes |= {k: t.dtype for k, t in got.tensors.items()}
    found.dropped[f"the file's own autoencoder (replaced by {vae})"] = own
    found.notes += [f"{vae}: {n}" for n in got.notes]
    found.vae = vae
    old = found.config.vae.scale_factor
    if got.scale_factor is not None and got.scale_factor != old:
        found.config = replace(found.config, vae=replace(found.config.vae, scale_factor=got.scale_factor))
        found.notes.append(f"VAE latent scale {got.scale_factor:.6g} from {vae}'s config (the checkpoint's: {old:.6g})")
    if tensors is None:
        return None
    return {k: t for k, t in tensors.items() if not k.startswith(VAE)} | got.tensors


def _stored_tokenizer(path: str, metadata: dict[str, str]) -> CLIPTokenizer | None:
    """The tokenizer a file we wrote carries in its metadata (a model whose vocabulary is not CLIP's)."""
    stored = metadata.get(TOKENIZER_KEY)
    return None if stored is None else tokenizer_from_json(stored, f"{path}: metadata {TOKENIZER_KEY}")


def probe(
    path: str | os.PathLike[str],
    *,
    prediction: Prediction | None = None,
    ema: bool = False,
    vae: str | os.PathLike[str] | None = None,
    variant: str | None = None,
) -> Probe:
    """Identify a checkpoint file or diffusers folder; reads only a safetensors header where it can. Raises
    :class:`WeightsError`, as loading would, when the tensors do not fit the model the file describes (with
    ``ema`` and ``vae`` as :func:`load_model` takes them)."""
    found = _open(path, prediction, shapes_only=True, ema=ema, vae=vae, variant=variant)[0]
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
    ema: bool = False,
    vae: str | os.PathLike[str] | None = None,
    variant: str | None = None,
) -> Loaded:
    """Load a single-file checkpoint or a diffusers folder. ``prediction`` overrides the file's (or the
    assumed) prediction type; the notes say what was decided and why. ``dtype=None`` keeps the file's.

    ``ema`` loads the UNet from the file's EMA copy (``model_ema.*`` of a training checkpoint) instead of its
    live weights; a file without one is an error. ``vae`` is a separate autoencoder (an original-layout file,
    bare or prefixed, or a diffusers ``AutoencoderKL`` folder, see :mod:`stablekit.weights.vae_file`) loaded in
    place of the file's own; it must fit the model's autoencoder. ``variant`` picks a diffusers folder's
    ``*.VARIANT.safetensors`` weights (``"fp16"``), as diffusers' ``variant=`` does; without it the plain files
    are read, or the only variant there is (with a note)."""
    found, tensors = _open(path, prediction, shapes_only=False, ema=ema, vae=vae, variant=variant)
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
    tokenizer: CLIPTokenizer | None = None,
) -> None:
    """Write ``model`` as an original single ``.safetensors`` file (with its config in the metadata, so it
    loads back exactly) or as a diffusers folder. ``config`` defaults to the model's own; ``dtype`` casts
    floating-point tensors (e.g. ``torch.float16``). Either way the output appears whole or not at all; an
    existing file or folder at ``path`` is replaced.

    ``tokenizer`` (default: a :class:`Loaded` model's own, else the built-in one) goes with the weights: into the
    folder's ``tokenizer/``, or, when it is not the built-in CLIP tokenizer, into the single file's metadata."""
    absent: set[str] = set()
    if isinstance(model, Loaded):
        absent, net = set(model.absent), model.model
        tokenizer = tokenizer or model.tokenizer
    else:
        net = model
    config = config or net.config
    state = {
        k: t.to(dtype) if dtype is not None and t.is_floating_point() else t
        for k, t in net.state_dict().items()
        if k not in absent
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)  # as torch.save and save_pretrained users expect
    if layout == "original":
        metadata = {METADATA_KEY: config_to_json(config), "format": "pt"}
        if tokenizer is not None and not same_as_builtin(tokenizer, config.text.context_length):
            metadata[TOKENIZER_KEY] = tokenizer_to_json(tokenizer)
        write_safetensors(path, state, metadata)
    elif layout == "diffusers":
        # Filled under a temporary name and renamed: an interrupted write never leaves a folder that loads.
        with replacing_folder(path, overwrite=True) as tmp:
            write_folder(tmp, config, state, optional=net.optional_keys(), tokenizer=tokenizer)
    else:
        raise ValueError(f"unknown layout {layout!r}: original or diffusers")
