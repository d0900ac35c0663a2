"""diffusers pipeline folders: read them into the original layout, and write them from it.

A folder holds ``model_index.json``, one sub-folder per component with its ``config.json`` and weights, and
``scheduler/scheduler_config.json``. The three networks are renamed to and from the original layout by the
per-component key tables (``stablekit/weights/tables/``); configs go through the tables' config functions.
Weight files are read with the safe reader, whatever their suffix (safetensors, or torch ``.bin``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from torch import Tensor

from stablekit.config import (
    PRESETS,
    ModelConfig,
    TextConfig,
)
from stablekit.text.files import read_tokenizer_folder, same_as_builtin, tokenizer_files, write_tokenizer_files
from stablekit.text.tokenizer import EOT, CLIPTokenizer, default_tokenizer
from stablekit.weights.components import read_weights
from stablekit.weights.convert import WeightsError, from_original, to_original
from stablekit.weights.detect import TEXT, UNET, VAE, check_plausible, family_from
from stablekit.weights.load import CheckpointError, write_safetensors
from stablekit.weights.schedulers import (
    DIFFUSERS_VERSION,
    PREDICTIONS,
    SCHEDULER_CLASSES,
    sampler_from_diffusers,
    schedule_from_diffusers,
    schedule_to_diffusers,
    scheduler_to_diffusers,
)
from stablekit.weights.tables.text import (
    diffusers_text_config,
    text_config_from_diffusers,
    text_ignored_keys,
    text_splits,
    text_table,
)
from stablekit.weights.tables.unet import diffusers_unet_config, unet_config_from_diffusers, unet_table
from stablekit.weights.tables.vae import (
    diffusers_vae_config,
    has_legacy_attention,
    vae_config_from_diffusers,
    vae_table,
)

_WEIGHT_NAMES = {
    "unet": ("diffusion_pytorch_model",),
    "vae": ("diffusion_pytorch_model",),
    "text_encoder": ("model", "pytorch_model"),
}

_PIPELINES = {
    "txt2img": "StableDiffusionPipeline",
    "inpaint": "StableDiffusionInpaintPipeline",
    "depth": "StableDiffusionDepth2ImgPipeline",
    "upscale": "StableDiffusionUpscalePipeline",
}
# Component folder -> original-layout key prefix.
_PREFIXES = {"unet": UNET, "vae": VAE, "text_encoder": TEXT}


@dataclass
class DiffusersFolder:
    """A folder read into the original layout."""

    config: ModelConfig
    tensors: dict[str, Tensor]
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # The folder's own ``tokenizer/``; None when it has none (the built-in CLIP vocabulary is used).
    tokenizer: CLIPTokenizer | None = None


def is_diffusers_folder(path: str | os.PathLike[str]) -> bool:
    return os.path.lexists(os.path.join(path, "model_index.json"))  # not isfile: a FIFO there gets its own error


def _json(path: str) -> dict[str, Any]:
    if os.path.exists(path) and not os.path.isfile(path):  # a named pipe would block the read forever
        raise CheckpointError(f"{path}: not a regular file")
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: missing") from e
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON, bad UTF-8, a 4300-digit integer
        raise CheckpointError(f"{path}: not a readable JSON file: {str(e)[:300]}") from e
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return d


def _to_original(component: str, state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    if component == "unet":
        return to_original(state, unet_table(cfg.unet))
    if component == "vae":
        return to_original(state, vae_table(cfg.vae, legacy_attention=has_legacy_attention(state)))
    if not any(k.startswith("text_model.") for k in state):
        # transformers >= 5 saves CLIPTextModel without its ``text_model.`` level; Hub files have it.
        state = {f"text_model.{k}": t for k, t in state.items()}
    return to_original(state, text_table(cfg.text), text_splits(cfg.text), ignore=text_ignored_keys(cfg.text))


def _config(folder: str, index: Mapping[str, Any], notes: list[str]) -> ModelConfig:
    """The folder's configs as one ModelConfig; anything malformed is a CheckpointError naming the folder (a
    config builds the model before any tensor is read, so its sizes are checked for plausibility too)."""
    try:
        cfg = _read_configs(folder, index, notes)
        check_plausible(cfg)
    except (ValueError, KeyError, TypeError, ArithmeticError, IndexError) as e:
        if isinstance(e, CheckpointError):
            raise
        detail = f"a config lacks the key {e}" if isinstance(e, KeyError) else str(e)
        raise CheckpointError(f"{folder}: {detail[:300]}") from e
    return cfg


def _read_configs(folder: str, index: Mapping[str, Any], notes: list[str]) -> ModelConfig:
    try:
        unet_json = _json(os.path.join(folder, "unet", "config.json"))
        unet = unet_config_from_diffusers(unet_json)
        vae = vae_config_from_diffusers(_json(os.path.join(folder, "vae", "config.json")))
        text = text_config_from_diffusers(_json(os.path.join(folder, "text_encoder", "config.json")))
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{folder}: {e}") from e
    sched = _json(os.path.join(folder, "scheduler", "scheduler_config.json"))
    preset = PRESETS[family_from(unet, text, PREDICTIONS.get(sched.get("prediction_type", "epsilon"), "eps"))]
    sampler, sampler_options = sampler_from_diffusers(sched, preset.default_sampler, notes)
    low_res = preset.low_res_schedule
    if low_res is not None and os.path.isfile(p := os.path.join(folder, "low_res_scheduler", "scheduler_config.json")):
        low_res = schedule_from_diffusers(_json(p), low_res)
    size = preset.default_size
    # The UNet's sample_size is the release's latent size (96 for 2.1-768); x4's is its input, not its output.
    if isinstance(unet_json.get("sample_size"), int) and preset.conditioning != "upscale":
        size = unet_json["sample_size"] * vae.downsample
    return replace(
        preset,
        name=os.path.basename(os.path.normpath(folder)) or preset.name,
        unet=unet,
        vae=vae,
        text=text,
        schedule=schedule_from_diffusers(sched, preset.schedule),
        low_res_schedule=low_res,
        default_size=size,
        default_sampler=sampler,
        default_sampler_options=sampler_options,
        max_noise_level=int(index.get("max_noise_level", preset.max_noise_level)),
    )


def read_folder(path: str | os.PathLike[str], *, variant: str | None = None) -> DiffusersFolder:
    """Read a diffusers Stable Diffusion folder; tensors come back under original-layout keys. ``variant``
    (e.g. ``"fp16"``) picks ``*.fp16.safetensors`` weights, as diffusers' ``variant=`` does."""
    folder = os.fspath(path)
    index = _json(os.path.join(folder, "model_index.json"))
    missing = [c for c in (*_PREFIXES, "scheduler") if c not in index]
    if missing:
        raise CheckpointError(f"{folder}: model_index.json has no {', '.join(missing)}: not a Stable Diffusion folder")
    notes: list[str] = []
    config = _config(folder, index, notes)
    tokenizer, text = _folder_tokenizer(folder, config.text, notes)
    config = replace(config, text=text)
    tensors: dict[str, Tensor] = {}
    files: list[str] = []
    for component, prefix in _PREFIXES.items():
        got = read_weights(os.path.join(folder, component), _WEIGHT_NAMES[component], variant)
        files += got.files
        try:
            renamed = _to_original(component, got.tensors, config)
        except WeightsError as e:
            raise WeightsError(f"{os.path.join(folder, component)}: {e}") from e
        tensors |= {prefix + k: t for k, t in renamed.items()}
        notes += [f"{component}: {n}" for n in got.notes]
    used = {*_PREFIXES, "tokenizer", "scheduler", "low_res_scheduler"}
    extra = sorted(k for k, v in index.items() if k not in used and isinstance(v, list) and v and v[0])
    if extra:
        notes.append(f"components not used by stablekit: {', '.join(extra)}")
    return DiffusersFolder(config, tensors, files, notes, tokenizer)


def _folder_tokenizer(folder: str, text: TextConfig, notes: list[str]) -> tuple[CLIPTokenizer | None, TextConfig]:
    """The folder's ``tokenizer/`` and the text config padding as it does; without one, the built-in vocabulary
    and the family's padding, with a note saying so."""
    sub = os.path.join(folder, "tokenizer")
    if not os.path.lexists(sub):
        pad = "<|endoftext|> (49407), as SD1's" if text.pad_token == EOT else f"id {text.pad_token}, as SD2's"
        notes.append(
            f"no tokenizer/ folder: prompts use the built-in CLIP vocabulary, padded with {pad} tokenizer does "
            f"(assumed from the text encoder's hidden_act {text.activation})"
        )
        return None, text
    try:
        tok = read_tokenizer_folder(sub)
    except (TypeError, OverflowError, IndexError, AttributeError) as e:  # a value of the wrong type in its JSON
        raise CheckpointError(f"{sub}: a tokenizer file holds a value of the wrong type ({str(e)[:200]})") from e
    if tok.pad_id is None:  # CLIPTokenizer pads with <|endoftext|> unless told otherwise; a folder can say nonsense
        raise CheckpointError(f"{sub}: the tokenizer names no usable pad token")
    return tok, replace(text, pad_token=tok.pad_id)


def write_tokenizer(folder: str | os.PathLike[str], text: TextConfig, tokenizer: CLIPTokenizer | None = None) -> None:
    """A transformers ``CLIPTokenizer`` folder for ``tokenizer`` (default: the built-in vocabulary), padding as
    ``text`` says."""
    tok = tokenizer or default_tokenizer()
    if same_as_builtin(tok, text.context_length) and text.kind == "openai" and text.pad_token != EOT:
        raise WeightsError("an OpenAI-CLIP tokenizer folder can only pad with <|endoftext|>")
    write_tokenizer_files(
        folder, tokenizer_files(tok, pad=text.pad_token, max_length=tok.max_length or text.context_length)
    )


def _write_json(path: str, d: Mapping[str, Any]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(d, f, indent=2, sort_keys=True)


def _from_original(
    component: str, state: dict[str, Tensor], cfg: ModelConfig, optional: tuple[str, ...]
) -> dict[str, Tensor]:
    if component == "unet":
        return from_original(state, unet_table(cfg.unet))
    if component == "vae":
        out = from_original(state, vae_table(cfg.vae))
        # diffusers' VAE attention projections are Linear: [C, C, 1, 1] -> [C, C].
        return {k: t.flatten(1) if ".attentions." in k and t.dim() == 4 else t for k, t in out.items()}
    return from_original(state, text_table(cfg.text), text_splits(cfg.text), ignore=optional)


def _component_config(component: str, cfg: ModelConfig) -> dict[str, Any]:
    if component == "unet":
        latent = cfg.default_size // cfg.vae.downsample
        return {"_class_name": "UNet2DConditionModel", **diffusers_unet_config(cfg.unet, latent)}
    if component == "vae":
        return {"_class_name": "AutoencoderKL", **diffusers_vae_config(cfg.vae, sample_size=cfg.default_size)}
    return diffusers_text_config(cfg.text)


def write_folder(
    path: str | os.PathLike[str],
    config: ModelConfig,
    state: Mapping[str, Tensor],
    *,
    optional: tuple[str, ...] = (),
    tokenizer: CLIPTokenizer | None = None,
    weights: bool = True,
) -> None:
    """Write a diffusers folder from an original-layout state dict. ``optional`` are original keys diffusers
    does not store (the text tower's unused parts); ``tokenizer`` is the model's own (default: the built-in
    vocabulary). ``weights=False`` writes the configs and the tokenizer only (``state`` is then unused): what
    diffusers' ``from_single_file(file, config=folder)`` reads beside a single file, without a second copy."""
    folder = os.fspath(path)
    own = tokenizer is not None and not same_as_builtin(tokenizer, config.text.context_length)
    if not own and config.text.kind == "openai" and config.text.pad_token != EOT:
        raise WeightsError("an OpenAI-CLIP tokenizer folder can only pad with <|endoftext|>")
    sampler = SCHEDULER_CLASSES.get(config.default_sampler, "DDIMScheduler")
    index: dict[str, Any] = {
        "_class_name": _PIPELINES[config.conditioning],
        "_diffusers_version": DIFFUSERS_VERSION,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", sampler],
    }
    if config.conditioning == "upscale":
        index |= {"low_res_scheduler": ["diffusers", "DDPMScheduler"], "max_noise_level": config.max_noise_level}
    else:
        index |= {"safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}
    if config.conditioning == "depth":
        index["depth_estimator"] = [None, None]  # MiDaS is not part of a Stable Diffusion checkpoint
    _write_json(os.path.join(folder, "model_index.json"), index)

    for component, prefix in _PREFIXES.items():
        sub = os.path.join(folder, component)
        _write_json(
            os.path.join(sub, "config.json"),
            {"_diffusers_version": DIFFUSERS_VERSION, **_component_config(component, config)},
        )
        if not weights:
            continue
        mine = {k[len(prefix) :]: t for k, t in state.items() if k.startswith(prefix)}
        skip = tuple(k[len(prefix) :] for k in optional if k.startswith(prefix))
        tensors = _from_original(component, mine, config, skip)
        write_safetensors(os.path.join(sub, _WEIGHT_NAMES[component][0] + ".safetensors"), tensors, {"format": "pt"})

    _write_json(os.path.join(folder, "scheduler", "scheduler_config.json"), scheduler_to_diffusers(config))
    if config.low_res_schedule is not None:
        low = schedule_to_diffusers(config.low_res_schedule, "DDPMScheduler")
        low |= {"clip_sample": True, "variance_type": "fixed_small"}
        _write_json(os.path.join(folder, "low_res_scheduler", "scheduler_config.json"), low)
    if own:
        write_tokenizer(os.path.join(folder, "tokenizer"), config.text, tokenizer)
    else:
        write_tokenizer(os.path.join(folder, "tokenizer"), config.text)
