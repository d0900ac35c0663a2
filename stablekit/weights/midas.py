"""Loading the MiDaS depth estimator of SD 2 depth-to-image, from any of the layouts it ships in.

:func:`load_depth_model` accepts
- the released ``dpt_hybrid-midas-501f0c75.pt`` (read by the safe unpickler, never ``torch.load``) or a
  ``.safetensors`` with the same keys;
- a state dict holding MiDaS under ``depth_model.model.`` or ``depth_model.`` (an SD 2 depth checkpoint),
  from which only those keys are taken;
- a transformers ``DPTForDepthEstimation`` folder (``config.json`` + ``model.safetensors`` or
  ``pytorch_model.bin``), renamed through :mod:`stablekit.weights.tables.midas`; a diffusers pipeline folder
  is read from its ``depth_estimator/``.

Every failure is a :class:`CheckpointError` (the file) or :class:`WeightsError` (the tensors), naming the path.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import replace
from itertools import chain

import torch
from safetensors import safe_open
from torch import Tensor

from stablekit.depth import DepthEstimator
from stablekit.models.midas import DPT_HYBRID, DepthConfig, DPTDepthModel
from stablekit.weights.components import read_json_object, read_transformers_folder
from stablekit.weights.convert import WeightsError, fit_state_dict, to_original
from stablekit.weights.load import CheckpointError, read_checkpoint, read_shapes, sniff
from stablekit.weights.tables.midas import depth_config_from_transformers, depth_splits, depth_table

__all__ = ["CheckpointError", "DepthEstimator", "WeightsError", "load_depth_model", "read_depth_weights"]

# Where an SD 2 depth checkpoint keeps MiDaS (``LatentDepth2ImageDiffusion.depth_model`` is a ``MiDaSInference``
# whose ``model`` is the ``DPTDepthModel``); the longest prefix is tried first.
PREFIXES = ("depth_model.model.", "depth_model.")
_MARKER = "pretrained.model.pos_embed"
_HEAD = "pretrained.model.head.weight"


def _transformers_folder(folder: str) -> tuple[DepthConfig, dict[str, Tensor]]:
    if os.path.isfile(os.path.join(folder, "model_index.json")):
        sub = os.path.join(folder, "depth_estimator")
        if not os.path.isfile(os.path.join(sub, "config.json")):
            raise CheckpointError(f"{folder}: a diffusers folder without a depth_estimator/ (not a depth pipeline)")
        folder = sub
    cfg, tensors, file = read_transformers_folder(folder, "a transformers depth model", depth_config_from_transformers)
    try:
        return cfg, to_original(tensors, depth_table(cfg), depth_splits(cfg))
    except WeightsError as e:
        raise WeightsError(f"{file}: not a DPT-Hybrid DPTForDepthEstimation: {e}") from e


def _processor_size(path: str) -> tuple[int, int] | None:
    """The (height, width) a folder's image processor resizes to: ``feature_extractor/`` of a diffusers depth
    pipeline, or a transformers folder's own ``preprocessor_config.json``. None where there is none."""
    found = [os.path.join(path, "feature_extractor", "preprocessor_config.json")]
    found.append(os.path.join(path, "preprocessor_config.json"))
    file = next((f for f in found if os.path.isfile(f)), None)
    if file is None:
        return None
    d = read_json_object(file)
    if d.get("keep_aspect_ratio"):
        raise CheckpointError(f"{file}: keep_aspect_ratio resizing is not supported (SD's depth models use false)")
    size = d.get("size")
    if isinstance(size, int):
        return size, size
    if isinstance(size, dict) and isinstance(size.get("height"), int) and isinstance(size.get("width"), int):
        return size["height"], size["width"]
    raise CheckpointError(f"{file}: unreadable size {size!r}")


def _midas_prefix(keys: Collection[str], path: str) -> str:
    """The prefix under which a file holds MiDaS's released keys ("" for a MiDaS file itself)."""
    for prefix in (*PREFIXES, ""):
        if prefix + _MARKER in keys:
            return prefix
    if "dpt.embeddings.position_embeddings" in keys:
        raise CheckpointError(
            f"{path}: transformers DPT weights without their config; pass the folder that holds config.json"
        )
    sample = ", ".join(sorted(keys)[:3]) or "no tensors"
    raise CheckpointError(f"{path}: not a MiDaS depth model (no {_MARKER}; it holds {sample}, ...)")


def _read_file(path: str) -> dict[str, Tensor]:
    """The MiDaS tensors of a single file under released keys, with an SD checkpoint's prefix removed."""
    if sniff(path) != "safetensors":
        # Torch pickles are memory-mapped: tensors that are not taken are never read from disk.
        tensors = read_checkpoint(path).tensors
        assert tensors is not None
        prefix = _midas_prefix(tensors.keys(), path)
        return {k[len(prefix) :]: t for k, t in tensors.items() if k.startswith(prefix)}
    # An SD 2 depth safetensors is ~5 GB of which MiDaS is 0.5: validate the header, read only MiDaS.
    shapes = read_shapes(path)
    prefix = _midas_prefix(shapes.keys(), path)
    try:
        with safe_open(path, framework="pt") as f:
            return {k[len(prefix) :]: f.get_tensor(k) for k in shapes if k.startswith(prefix)}
    except Exception as e:  # the library's own checks (overlapping offsets...) after ours
        raise CheckpointError(f"{path}: safetensors data cannot be read: {e}") from e


def read_depth_weights(
    path: str | os.PathLike[str], *, config: DepthConfig | None = None
) -> tuple[DepthConfig, dict[str, Tensor]]:
    """The config and released-layout tensors of any accepted file or folder (see the module docstring).

    ``config`` describes a single file's architecture (default :data:`DPT_HYBRID`); a folder brings its own.
    A file without timm's unused ImageNet head is read as ``num_classes=0``.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return _transformers_folder(path)
    state = _read_file(path)
    cfg = config or DPT_HYBRID
    num_classes = state[_HEAD].shape[0] if _HEAD in state else 0
    if num_classes != cfg.num_classes:
        cfg = replace(cfg, num_classes=num_classes)
    return cfg, state


def load_depth_model(
    path: str | os.PathLike[str],
    *,
    config: DepthConfig | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> DepthEstimator:
    """The depth estimator held by ``path``, in eval mode without gradients.

    ``dtype`` casts floating-point tensors (None: float32, in which MiDaS was trained and diffusers runs it
    on the CPU); ``device`` defaults to the CPU. ``config`` is only needed for a non-standard single file.
    """
    path = os.fspath(path)
    cfg, state = read_depth_weights(path, config=config)
    with torch.device("meta"):
        model = DPTDepthModel(cfg)
    try:
        fitted = fit_state_dict(model, state)
    except WeightsError as e:
        raise WeightsError(f"{path}: {e}") from e
    dtype, device = dtype or torch.float32, device or "cpu"
    ready = {k: t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype) for k, t in fitted.items()}
    model.load_state_dict(ready, strict=True, assign=True)
    unset = [n for n, t in chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if unset:
        raise WeightsError(f"{path}: model tensors left uninitialised: {', '.join(unset[:5])}")
    return DepthEstimator(model, _processor_size(path) if os.path.isdir(path) else None)
