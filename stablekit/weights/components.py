"""A diffusers or transformers component folder's weights: one file, a variant (``.fp16``), or the shards an
index lists, found the way ``from_pretrained`` looks for them.

Names, for a stem such as ``diffusion_pytorch_model`` (diffusers) or ``model`` (transformers):

- ``STEM.safetensors`` / ``STEM.bin``, and with a variant ``STEM.fp16.safetensors``;
- sharded: ``STEM.safetensors.index.json`` (variant: ``STEM.safetensors.index.fp16.json``) whose ``weight_map``
  names the shard of each tensor (``STEM-00001-of-00003.safetensors``, ``STEM.fp16-00001-of-00003.safetensors``).

safetensors is preferred over ``.bin`` (read through the safe unpickler, which never runs pickle code). A folder
holding only one variant loads it without ``variant`` being asked for, and a note says so.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from torch import Tensor

from stablekit.weights.load import CheckpointError, read_checkpoint

_TRANSFORMERS_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
C = TypeVar("C")

_FORMATS = (".safetensors", ".bin")
_SHARD_NAME = re.compile(r"[^/\\]+")  # a bare file name: the index must not reach outside the folder


@dataclass
class ComponentWeights:
    files: list[str]
    tensors: dict[str, Tensor]
    notes: list[str] = field(default_factory=list)


def _names(stem: str, ext: str, variant: str | None) -> tuple[str, str]:
    if variant:
        return f"{stem}.{variant}{ext}", f"{stem}{ext}.index.{variant}.json"
    return f"{stem}{ext}", f"{stem}{ext}.index.json"


def _variants(folder: str, stems: Sequence[str]) -> list[str]:
    """The variant names present for these stems (``fp16`` of ``model.fp16.safetensors``)."""
    found = set()
    for name in os.listdir(folder):
        for stem in stems:
            for ext in _FORMATS:
                single = re.fullmatch(rf"{re.escape(stem)}\.(\w+)(?:-\d+-of-\d+)?{re.escape(ext)}", name)
                index = re.fullmatch(rf"{re.escape(stem)}{re.escape(ext)}\.index\.(\w+)\.json", name)
                if single or index:
                    found.add((single or index).group(1))  # type: ignore[union-attr]
    return sorted(found)


def _shard_map(index_path: str) -> dict[str, str]:
    """The index's tensor -> shard file map, checked: shards are bare names of regular files beside it."""
    folder = os.path.dirname(index_path)
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{index_path}: not a readable JSON file: {e}") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: no weight_map")
    for key, shard in weight_map.items():
        if not isinstance(shard, str) or not _SHARD_NAME.fullmatch(shard) or shard in (".", ".."):
            raise CheckpointError(f"{index_path}: tensor {key!r} names shard {shard!r}, not a file in this folder")
        if not os.path.isfile(os.path.join(folder, shard)):
            raise CheckpointError(f"{index_path}: shard {shard} of tensor {key!r} is missing")
    return weight_map


def find_weights(folder: str, stems: Sequence[str], variant: str | None = None) -> tuple[list[str], list[str]]:
    """The files holding a component's weights (one, or the index then its shards), and notes about the choice."""
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: missing (a component folder)")
    for ext in _FORMATS:
        for stem in stems:
            single, index = (os.path.join(folder, n) for n in _names(stem, ext, variant))
            if os.path.isfile(single):
                return [single], []
            if os.path.isfile(index):
                shards = list(dict.fromkeys(_shard_map(index).values()))
                return [index, *(os.path.join(folder, s) for s in shards)], []
    present = _variants(folder, stems)
    if variant is None and len(present) == 1:
        files, _ = find_weights(folder, stems, present[0])
        return files, [f"only the {present[0]} variant is present, so it was loaded"]
    wanted = f"weights of the {variant} variant" if variant else "weights file"
    tried = ", ".join(n for stem in stems for ext in _FORMATS for n in _names(stem, ext, variant))
    others = f"; variants present: {', '.join(present)} (choose one with --variant)" if present else ""
    raise CheckpointError(f"{folder}: no {wanted} (looked for {tried}){others}")


def read_weights(folder: str, stems: Sequence[str], variant: str | None = None) -> ComponentWeights:
    """Every tensor of a component, from one file or its shards; an index that disagrees with its shards (a
    tensor missing from the shard it names, one tensor in two shards) is an error naming the tensor."""
    files, notes = find_weights(folder, stems, variant)
    if len(files) == 1:
        ckpt = read_checkpoint(files[0])
        assert ckpt.tensors is not None
        return ComponentWeights(files, ckpt.tensors, notes + [f"{os.path.basename(files[0])}: {n}" for n in ckpt.notes])
    index, shards = files[0], files[1:]
    weight_map = _shard_map(index)
    tensors: dict[str, Tensor] = {}
    for path in shards:
        ckpt = read_checkpoint(path)
        assert ckpt.tensors is not None
        name = os.path.basename(path)
        for key, t in ckpt.tensors.items():
            if key in tensors:
                raise CheckpointError(f"{path}: tensor {key!r} is also in another shard")
            if weight_map.get(key) != name:
                raise CheckpointError(f"{path}: tensor {key!r} is not listed for this shard in {index}")
            tensors[key] = t
        notes += [f"{name}: {n}" for n in ckpt.notes]
    missing = [k for k in weight_map if k not in tensors]
    if missing:
        raise CheckpointError(f"{index}: {len(missing)} listed tensor(s) are in no shard, e.g. {missing[0]!r}")
    return ComponentWeights(files, tensors, notes)


def read_json_object(path: str) -> dict[str, object]:
    """A JSON file that must hold an object, or a :class:`CheckpointError` naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable JSON file: {e}") from e
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return d


def read_transformers_folder(
    folder: str, what: str, parse: Callable[[dict[str, object]], C]
) -> tuple[C, dict[str, Tensor], str]:
    """(config, tensors, weights file) of a transformers model folder (``config.json`` + ``model.safetensors`` or
    ``pytorch_model.bin``, read safely). ``what`` names the model in errors ("a transformers depth model");
    ``parse`` turns the config into ours, its ValueError/KeyError/TypeError becoming a CheckpointError."""
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{folder}: a folder without config.json is not {what}")
    try:
        cfg = parse(read_json_object(config_path))
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{config_path}: {e}") from e
    file = next((p for n in _TRANSFORMERS_WEIGHTS if os.path.isfile(p := os.path.join(folder, n))), None)
    if file is None:
        if any(n.endswith(".index.json") for n in os.listdir(folder)):
            raise CheckpointError(f"{folder}: sharded weights are not supported")
        raise CheckpointError(f"{folder}: no weights file ({' or '.join(_TRANSFORMERS_WEIGHTS)})")
    tensors = read_checkpoint(file).tensors
    assert tensors is not None
    return cfg, tensors, file
