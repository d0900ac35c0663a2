"""Loading the safety checker from the layouts it ships in.

:func:`load_safety_checker` accepts
- a ``safety_checker/`` folder (``config.json``, a transformers ``CLIPConfig``, and ``model.safetensors`` or
  ``pytorch_model.bin``, read by the safe unpickler), or a diffusers pipeline folder holding one; the
  preprocessing comes from the pipeline's ``feature_extractor/preprocessor_config.json`` or a
  ``preprocessor_config.json`` beside the weights, else CLIP's standard values (:class:`ClipPreprocess`);
- a single ``.safetensors`` (or pickled) file with the same keys. Its config is inferred from tensor shapes,
  except what shapes cannot say: the head count (assumed ``hidden_size // 64``, as in every released CLIP ViT,
  unless ``num_heads`` is given), ``layer_norm_eps`` 1e-5 and ``hidden_act`` ``quick_gelu`` (the release's).

The released keys are the module's names; files saved under transformers 5 lack one ``vision_model.`` and are
renamed by :mod:`stablekit.weights.tables.safety`. Every failure is a :class:`CheckpointError`
(the file) or :class:`WeightsError` (the tensors), naming the path.
"""

from __future__ import annotations

import os
import re

import torch
from torch import Tensor

from stablekit.models.safety import SafetyConfig, StableDiffusionSafetyChecker
from stablekit.safety import SAFETY_ACTIONS, ClipPreprocess, SafetyAction, SafetyChecker
from stablekit.weights.components import read_json_object, read_transformers_folder
from stablekit.weights.convert import WeightsError, fit_state_dict
from stablekit.weights.load import CheckpointError, read_checkpoint
from stablekit.weights.tables.safety import PREFIXES

__all__ = ["CheckpointError", "WeightsError", "load_safety_checker", "safety_config_from_shapes", "to_released"]

_VM = "vision_model.vision_model."
# transformers < 4.31 saved the position ids as a buffer; they are arange(N+1), so they are dropped.
_DROPPED = (_VM + "embeddings.position_ids",)
_LAYER = re.compile(re.escape(_VM) + r"encoder\.layers\.(\d+)\.")


def safety_config_from_transformers(d: dict[str, object]) -> SafetyConfig:
    """A transformers ``CLIPConfig`` dict -> :class:`SafetyConfig` (``projection_dim`` is the top level's)."""
    v = d.get("vision_config")
    if not isinstance(v, dict):
        raise ValueError("no vision_config (not a CLIPConfig)")
    defaults = SafetyConfig()

    def num(src: dict[str, object], key: str, default: float) -> float:
        value = src.get(key)
        return default if value is None else _number(value, key)

    act = v.get("hidden_act", defaults.hidden_act)
    if not isinstance(act, str):
        raise ValueError(f"hidden_act is {act!r}, not a name")
    # Missing values take transformers' CLIPVisionConfig / CLIPConfig defaults, as its loader would.
    return SafetyConfig(
        hidden_size=int(num(v, "hidden_size", 768)),
        intermediate_size=int(num(v, "intermediate_size", 3072)),
        num_heads=int(num(v, "num_attention_heads", 12)),
        num_layers=int(num(v, "num_hidden_layers", 12)),
        patch_size=int(num(v, "patch_size", 32)),
        image_size=int(num(v, "image_size", 224)),
        projection_dim=int(num(d, "projection_dim", 512)),
        layer_norm_eps=num(v, "layer_norm_eps", defaults.layer_norm_eps),
        hidden_act=act,
    )


def safety_config_from_shapes(shapes: dict[str, tuple[int, ...]], *, num_heads: int | None = None) -> SafetyConfig:
    """The config of a bare weights file; the head count is assumed ``hidden_size // 64`` unless given."""
    try:
        hidden = shapes[_VM + "embeddings.class_embedding"][0]
        patch = shapes[_VM + "embeddings.patch_embedding.weight"][-1]
        tokens = shapes[_VM + "embeddings.position_embedding.weight"][0]
        projection = shapes["visual_projection.weight"][0]
        intermediate = shapes[_VM + "encoder.layers.0.mlp.fc1.weight"][0]
        concepts = shapes["concept_embeds"][0]
        special = shapes["special_care_embeds"][0]
    except (KeyError, IndexError) as e:
        raise WeightsError(f"not a safety checker: no {e}") from e
    side = round((tokens - 1) ** 0.5)
    if side * side != tokens - 1:
        raise WeightsError(f"{tokens} position embeddings are not a square grid plus a class token")
    layers = 1 + max(int(m.group(1)) for k in shapes if (m := _LAYER.match(k)))
    return SafetyConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_heads=num_heads if num_heads is not None else max(1, hidden // 64),
        num_layers=layers,
        patch_size=patch,
        image_size=side * patch,
        projection_dim=projection,
        num_concepts=concepts,
        num_special=special,
    )


def _number(value: object, what: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"{what} is {value!r}, not a number")
    return value


def _triple(value: object, what: str) -> tuple[float, float, float]:
    if not isinstance(value, list) or len(value) != 3:
        raise ValueError(f"{what} is {value!r}, not 3 numbers")
    r, g, b = (_number(x, what) for x in value)
    return r, g, b


def read_clip_preprocess(path: str) -> ClipPreprocess | None:
    """A transformers ``preprocessor_config.json`` -> :class:`ClipPreprocess`; absent values are CLIP's."""
    if not os.path.isfile(path):
        return None
    d = read_json_object(path)
    std = ClipPreprocess()
    try:
        for flag in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):
            if d.get(flag, True) is not True:
                raise ValueError(f"{flag} false is not supported")
        if d.get("resample", 3) != 3:
            raise ValueError(f"resample {d['resample']!r} is not supported (only 3, bicubic)")
        size = d.get("size", {"shortest_edge": std.shortest_edge})
        crop = d.get("crop_size", {"height": std.crop_height, "width": std.crop_width})
        short = size.get("shortest_edge") if isinstance(size, dict) else size
        ch, cw = (crop.get("height"), crop.get("width")) if isinstance(crop, dict) else (crop, crop)
        return ClipPreprocess(
            shortest_edge=int(_number(short, "size.shortest_edge")),
            crop_height=int(_number(ch, "crop_size.height")),
            crop_width=int(_number(cw, "crop_size.width")),
            mean=_triple(d.get("image_mean", list(std.mean)), "image_mean"),
            std=_triple(d.get("image_std", list(std.std)), "image_std"),
            rescale_factor=_number(d.get("rescale_factor", std.rescale_factor), "rescale_factor"),
        )
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e


def to_released(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Keys of either layout -> the released ones, without the position ids some files carry."""
    for theirs, ours in PREFIXES.values():
        if any(k.startswith(theirs + "embeddings.") for k in tensors):
            renamed = {(ours + k[len(theirs) :] if k.startswith(theirs) else k): t for k, t in tensors.items()}
            return {k: t for k, t in renamed.items() if k not in _DROPPED}
    return dict(tensors)


def _build(cfg: SafetyConfig, tensors: dict[str, Tensor], where: str) -> StableDiffusionSafetyChecker:
    with torch.device("meta"):
        model = StableDiffusionSafetyChecker(cfg)
    state = to_released(tensors)
    try:
        fitted = fit_state_dict(model, state)
    except WeightsError as e:
        raise WeightsError(f"{where}: not a safety checker: {e}") from e
    model.load_state_dict(fitted, strict=True, assign=True)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def load_safety_checker(path: str | os.PathLike[str], *, num_heads: int | None = None) -> SafetyChecker:
    """A folder (``safety_checker/`` or a pipeline holding one) or a single weights file -> :class:`SafetyChecker`.

    ``num_heads`` is only read for a single file, whose head count its shapes do not give.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        ckpt = read_checkpoint(path)
        assert ckpt.tensors is not None
        shapes = {k: tuple(t.shape) for k, t in to_released(ckpt.tensors).items()}
        try:
            cfg = safety_config_from_shapes(shapes, num_heads=num_heads)
        except ValueError as e:  # WeightsError included
            raise WeightsError(f"{path}: {e}") from e
        return SafetyChecker(_build(cfg, ckpt.tensors, path))
    folder, preprocess = path, None
    if os.path.isfile(os.path.join(path, "model_index.json")):
        folder = os.path.join(path, "safety_checker")
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise CheckpointError(f"{path}: a diffusers folder without a safety_checker/")
        preprocess = read_clip_preprocess(os.path.join(path, "feature_extractor", "preprocessor_config.json"))
    preprocess = preprocess or read_clip_preprocess(os.path.join(folder, "preprocessor_config.json"))
    cfg, tensors, file = read_transformers_folder(folder, "a safety checker", safety_config_from_transformers)
    return SafetyChecker(_build(cfg, tensors, file), preprocess)


def safety_from_environment(
    model_dir: str | os.PathLike[str] | None = None,
) -> tuple[SafetyChecker | None, SafetyAction]:
    """``STABLEKIT_SAFETY_CHECKER`` (a path; a relative one is looked up in ``model_dir``, the Azure model
    directory, first) and ``STABLEKIT_SAFETY_ACTION`` (blackout, the default, or flag): the ``--safety-checker``
    and ``--safety-action`` of the entry scripts, which take no flags. (None, action) when no checker is named."""
    named_action = os.environ.get("STABLEKIT_SAFETY_ACTION", "blackout")
    actions = {a: a for a in SAFETY_ACTIONS}
    if named_action not in actions:
        raise ValueError(f"STABLEKIT_SAFETY_ACTION={named_action!r}: expected one of {', '.join(SAFETY_ACTIONS)}")
    action = actions[named_action]
    named = os.environ.get("STABLEKIT_SAFETY_CHECKER")
    if not named:
        return None, action
    path = named
    if model_dir is not None and not os.path.isabs(named) and os.path.exists(os.path.join(model_dir, named)):
        path = os.path.join(model_dir, named)
    return load_safety_checker(path), action
