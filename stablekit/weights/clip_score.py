"""Loading a whole CLIP (both towers) to score images against captions.

- :func:`load_clip_pair`: a transformers ``CLIPModel`` folder (``config.json`` + ``model.safetensors`` or
  ``pytorch_model.bin``, e.g. ``openai/clip-vit-large-patch14``) -> :class:`~stablekit.models.clip_pair.CLIPPair`,
  the folder's tokenizer when it holds one that :mod:`stablekit.text.files` reads (else the built-in OpenAI
  vocabulary) and its ``preprocessor_config.json`` (else CLIP's standard preprocessing). Keys are renamed by
  :mod:`stablekit.weights.tables.clip_score`.
- :func:`load_demo_clip`: the demo model's CLIP, :class:`~stablekit.models.clip_image.CLIPModel`, from the shipped
  text tower (``cond_stage_model.*`` of ``demo.safetensors``) and the image tower trained against it
  (``clip-image.safetensors``: ``visual.*``, ``text_projection.weight``, ``logit_scale``; made by
  :mod:`stablekit.train.clip_image_tower`).

Every failure is a :class:`CheckpointError` (the file) or :class:`WeightsError` (the tensors), both ValueErrors,
naming the path.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from stablekit.config import TextConfig
from stablekit.demo import MODEL as DEMO_MODEL
from stablekit.models.clip_image import CLIPConfig, CLIPModel, ImageTowerConfig
from stablekit.models.clip_pair import CLIPPair, CLIPPairConfig
from stablekit.safety import ClipPreprocess
from stablekit.text.files import read_tokenizer_folder
from stablekit.text.tokenizer import CLIPTokenizer, TokenizerError
from stablekit.weights.components import read_transformers_folder
from stablekit.weights.convert import WeightsError, fit_state_dict
from stablekit.weights.detect import METADATA_KEY, config_from_json
from stablekit.weights.load import CheckpointError, read_checkpoint
from stablekit.weights.safety import read_clip_preprocess, safety_config_from_transformers
from stablekit.weights.tables.clip_score import DROPPED, PREFIXES
from stablekit.weights.tables.text import text_config_from_diffusers

__all__ = [
    "DEMO_IMAGE_TOWER",
    "IMAGE_TOWER_KEY",
    "image_tower_metadata",
    "load_clip_pair",
    "load_demo_clip",
    "pair_config_from_transformers",
]

DEMO_IMAGE_TOWER = DEMO_MODEL.with_name("clip-image.safetensors")
IMAGE_TOWER_KEY = "stablekit.image_tower"  # metadata: the ImageTowerConfig as JSON (heads are not in the shapes)


def pair_config_from_transformers(d: dict[str, object]) -> CLIPPairConfig:
    """A transformers ``CLIPConfig`` dict -> :class:`CLIPPairConfig`; absent values are transformers' defaults."""
    t = d.get("text_config", {})
    if not isinstance(t, dict):
        raise ValueError("text_config is not an object")
    text = text_config_from_diffusers(t)
    if text.kind != "openai":
        # The text tower of a CLIPModel is transformers' layout whatever its activation (LAION's use exact GELU).
        n = text.layers_used
        text = replace(text, kind="openai", layers=n, layers_used=n, pad_token=49407, embed_dim=TextConfig.embed_dim)
    projection = d.get("projection_dim", 512)
    if not isinstance(projection, int) or isinstance(projection, bool) or projection < 1:
        raise ValueError(f"projection_dim is {projection!r}, not a positive integer")
    return CLIPPairConfig(text=text, vision=safety_config_from_transformers(d), projection_dim=projection)


def _tokenizer(folder: str) -> CLIPTokenizer:
    """The folder's own tokenizer files if it has them, else OpenAI's vocabulary (which every CLIPModel release
    uses); a tokenizer that is present but unreadable is an error, not silently replaced."""
    if not any(os.path.lexists(os.path.join(folder, n)) for n in ("vocab.json", "tokenizer.json")):
        return CLIPTokenizer()
    try:
        return read_tokenizer_folder(folder)
    except TokenizerError as e:
        raise CheckpointError(str(e)) from e


def _renamed(tensors: dict[str, Tensor], where: str) -> dict[str, Tensor]:
    out = {}
    for key, t in tensors.items():
        if key in DROPPED:
            continue
        theirs = next((p for p in PREFIXES if key.startswith(p)), None)
        if theirs is None:
            raise WeightsError(f"{where}: not a transformers CLIPModel: unexpected key {key!r}")
        out[PREFIXES[theirs] + key[len(theirs) :]] = t
    return out


def _fit(model: nn.Module, state: dict[str, Tensor], where: str, what: str, optional: tuple[str, ...] = ()) -> None:
    try:
        fitted = fit_state_dict(model, state, optional=optional)
    except WeightsError as e:
        raise WeightsError(f"{where}: not {what}: {e}") from e
    model.load_state_dict({k: v.float() for k, v in fitted.items()}, strict=True, assign=True)
    model.requires_grad_(False)
    model.eval()


def load_clip_pair(path: str | os.PathLike[str]) -> tuple[CLIPPair, CLIPTokenizer, ClipPreprocess]:
    """A transformers ``CLIPModel`` folder -> (model in float32, tokenizer, image preprocessing)."""
    folder = os.fspath(path)
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: not a folder (a transformers CLIPModel folder: config.json + weights)")
    cfg, tensors, file = read_transformers_folder(folder, "a transformers CLIPModel", pair_config_from_transformers)
    tokenizer = _tokenizer(folder)
    if why := tokenizer.mismatch(vocab_size=cfg.text.vocab_size, context_length=cfg.text.context_length, pad_token=0):
        raise CheckpointError(f"{folder}: {why}")
    cfg = replace(cfg, eos_token=tokenizer.eos_id)
    with torch.device("meta"):
        model = CLIPPair(cfg)
    optional = tuple(f"text.{k}" for k in model.text.OPTIONAL_KEYS)
    _fit(model, _renamed(tensors, file), file, "a transformers CLIPModel", optional)
    return model, tokenizer, read_clip_preprocess(os.path.join(folder, "preprocessor_config.json")) or ClipPreprocess()


def load_demo_clip(text_from: str | Path = DEMO_MODEL, image_from: str | Path = DEMO_IMAGE_TOWER) -> CLIPModel:
    """The demo CLIP in float32: ``text_from``'s text tower with ``image_from``'s image tower and projections."""
    if not Path(image_from).is_file():
        raise CheckpointError(
            f"{image_from}: missing (the demo CLIP's image tower; make it with "
            "`python -m stablekit.train.clip_image_tower --out DIR`)"
        )
    text_ckpt, image_ckpt = read_checkpoint(text_from), read_checkpoint(image_from)
    assert text_ckpt.tensors is not None and image_ckpt.tensors is not None
    try:
        text_cfg = config_from_json(text_ckpt.metadata[METADATA_KEY]).text
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{text_from}: no stablekit config in the metadata ({e})") from e
    try:
        tower = ImageTowerConfig(**json.loads(image_ckpt.metadata[IMAGE_TOWER_KEY]))
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{image_from}: no image tower config in the metadata ({e})") from e
    projection = image_ckpt.tensors.get("text_projection.weight")
    if projection is None or projection.dim() != 2:
        raise WeightsError(f"{image_from}: not a demo CLIP image tower: no text_projection.weight matrix")
    with torch.device("meta"):
        model = CLIPModel(CLIPConfig(text_cfg, tower, projection.shape[0]))
    prefix = "cond_stage_model."
    text = {f"text.{k.removeprefix(prefix)}": v for k, v in text_ckpt.tensors.items() if k.startswith(prefix)}
    image = {k: v for k, v in image_ckpt.tensors.items() if not k.startswith("text.")}
    optional = tuple(f"text.{k}" for k in model.text.OPTIONAL_KEYS)
    _fit(model, {**text, **image}, f"{text_from} + {image_from}", "the demo CLIP", optional)
    return model


def image_tower_metadata(tower: ImageTowerConfig) -> dict[str, str]:
    """The metadata :func:`load_demo_clip` reads from an image tower file."""
    return {IMAGE_TOWER_KEY: json.dumps(asdict(tower)), "format": "pt"}
