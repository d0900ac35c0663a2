"""A separate autoencoder (``--vae``) in place of a checkpoint's own.

What is accepted, as diffusers' single-file loader and the A1111 UI accept it:

- an original-layout file (``vae-ft-mse-840000-ema-pruned.safetensors``/``.ckpt``): bare keys
  (``encoder.conv_in.weight``...) or keys under ``first_stage_model.`` or ``vae.``; a whole SD checkpoint
  gives its ``first_stage_model.*`` part, said in a note;
- a diffusers ``AutoencoderKL`` folder (``config.json`` + ``diffusion_pytorch_model.*``), or a pipeline folder
  (its ``vae/``), renamed through the VAE key table; its ``scaling_factor`` is the latent scale to use, as a
  diffusers pipeline built with that autoencoder would use it;
- a diffusers-layout weights file on its own (no config: the model's latent scale stays).

The weights must fit the model's autoencoder exactly; they are checked on the meta device before anything
is loaded, and a misfit is one error naming the file and the tensor.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

from stablekit.config import VAEConfig
from stablekit.models.vae import AutoencoderKL
from stablekit.weights.convert import WeightsError, fit_state_dict, to_original
from stablekit.weights.detect import TEXT, UNET, VAE
from stablekit.weights.diffusers import is_diffusers_folder
from stablekit.weights.load import Checkpoint, CheckpointError, read_checkpoint
from stablekit.weights.tables.vae import has_legacy_attention, vae_config_from_diffusers, vae_table

# Prefixes an original-layout autoencoder may sit under (diffusers' LDM_VAE_KEYS); otherwise its keys are bare.
PREFIXES = (VAE, "vae.")
# What a VAE training file carries besides the network: key prefix -> why it is not loaded.
EXTRAS = {
    "loss.": "training loss weights (LPIPS, discriminator)",
    "model_ema.": "EMA bookkeeping of the autoencoder's training (an -ema- file already holds the averages)",
}
_WEIGHTS = tuple(f"diffusion_pytorch_model{s}" for s in (".safetensors", ".fp16.safetensors", ".bin", ".fp16.bin"))
# Module names only the diffusers layout has (the original's are down.N / up.N / mid.).
_DIFFUSERS_NAMES = (".down_blocks.", ".up_blocks.", ".mid_block.")


@dataclass
class VAEWeights:
    """An autoencoder read for a model: tensors under ``first_stage_model.`` (meta tensors, of the file's
    dtypes, when only shapes were read), and the latent scale its files give, if any."""

    path: str
    tensors: dict[str, Tensor]
    scale_factor: float | None = None
    notes: list[str] = field(default_factory=list)


def read_vae(path: str | os.PathLike[str], target: VAEConfig, *, shapes_only: bool = False) -> VAEWeights:
    """Read ``path`` as an autoencoder for a model whose VAE is ``target``; :class:`CheckpointError` for what is
    not an autoencoder, :class:`WeightsError` for one that does not fit."""
    path = os.fspath(path)
    got = _read_folder(path, target, shapes_only) if os.path.isdir(path) else _read_file(path, target, shapes_only)
    with torch.device("meta"):
        vae = AutoencoderKL(target)
    try:
        fit_state_dict(vae, {k.removeprefix(VAE): t for k, t in got.tensors.items()})
    except WeightsError as e:
        why = str(e).removeprefix("weights do not fit the model; ")
        raise WeightsError(f"{path}: not this model's autoencoder: {why}") from e
    return got


def _tensors(ckpt: Checkpoint) -> dict[str, Tensor]:
    if ckpt.tensors is not None:
        return ckpt.tensors
    # Shapes only: meta tensors carry shape and dtype through the same renaming and checks as real ones.
    return {k: torch.empty(s, dtype=ckpt.dtypes[k], device="meta") for k, s in ckpt.shapes.items()}


def _rename_diffusers(where: str, state: Mapping[str, Tensor], target: VAEConfig) -> dict[str, Tensor]:
    try:
        return to_original(state, vae_table(target, legacy_attention=has_legacy_attention(state)))
    except WeightsError as e:
        raise WeightsError(f"{where}: not this model's autoencoder: {e}") from e


def _what(keys: list[str]) -> str:
    """What a file without autoencoder weights seems to hold, for the error."""
    if any(k.startswith((UNET, "input_blocks.", "down_blocks.", "time_embed")) for k in keys):
        return "it holds UNet weights"
    if any(k.startswith((TEXT, "text_model.", "transformer.")) for k in keys):
        return "it holds text-encoder weights"
    return f"its first key is {keys[0][:80]!r}" if keys else "it holds no tensors"


def _read_file(path: str, target: VAEConfig, shapes_only: bool) -> VAEWeights:
    ckpt = read_checkpoint(path, shapes_only=shapes_only)
    state, notes = _tensors(ckpt), list(ckpt.notes)
    prefix = next((p for p in PREFIXES if any(k.startswith(p) for k in state)), None)
    if prefix is not None:
        part = {k[len(prefix) :]: t for k, t in state.items() if k.startswith(prefix)}
        if len(part) < len(state):
            whole = "a whole checkpoint" if any(k.startswith(UNET) for k in state) else "the file"
            unused = len(state) - len(part)
            notes.append(f"took the autoencoder ({prefix}*) of {whole}; {unused} other tensor(s) unused")
        state = part
    kept: dict[str, Tensor] = {}
    extras: Counter[str] = Counter()
    for key, t in state.items():
        why = next((w for p, w in EXTRAS.items() if key.startswith(p)), None)
        if why is None:
            kept[key] = t
        else:
            extras[why] += 1
    notes += [f"{n} key(s) not loaded: {why}" for why, n in extras.items()]
    if not any(k.startswith(("encoder.", "decoder.")) for k in kept):
        raise CheckpointError(
            f"{path}: not an autoencoder: no encoder.*/decoder.* weights, bare or under "
            f"{' or '.join(PREFIXES)} ({_what(list(kept))})"
        )
    if any(n in k for k in kept for n in _DIFFUSERS_NAMES):
        kept = _rename_diffusers(path, kept, target)
        notes.append("diffusers-layout autoencoder weights without their config.json: the model's latent scale kept")
    return VAEWeights(path, {VAE + k: t for k, t in kept.items()}, None, notes)


def _config(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):  # also refuses a named pipe, whose read would block
        raise CheckpointError(f"{path}: missing or not a regular file")
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: not a readable JSON file: {e}") from e
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return d


def _read_folder(path: str, target: VAEConfig, shapes_only: bool) -> VAEWeights:
    folder, notes = path, []
    if is_diffusers_folder(path):
        folder = os.path.join(path, "vae")
        notes.append(f"took the vae/ of the diffusers pipeline {path}")
    elif not os.path.lexists(os.path.join(path, "config.json")):
        raise CheckpointError(
            f"{path}: a folder without config.json (AutoencoderKL) or model_index.json (pipeline) is not a "
            "diffusers autoencoder"
        )
    d = _config(os.path.join(folder, "config.json"))
    kind = d.get("_class_name", "AutoencoderKL")
    if kind != "AutoencoderKL":
        raise CheckpointError(f"{folder}: config.json describes a {str(kind)[:80]!r}, not an AutoencoderKL")
    try:
        cfg = vae_config_from_diffusers(d)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{folder}: {e}") from e
    # Shapes cannot show the group-norm size; the config can.
    wrong = [
        f"{f.name} {getattr(cfg, f.name)} (the model's: {getattr(target, f.name)})"
        for f in fields(VAEConfig)
        if f.name != "scale_factor" and getattr(cfg, f.name) != getattr(target, f.name)
    ]
    if wrong:
        raise WeightsError(f"{folder}: not this model's autoencoder: {', '.join(wrong)}")
    file = next((p for n in _WEIGHTS if os.path.isfile(p := os.path.join(folder, n))), None)
    if file is None:
        raise CheckpointError(f"{folder}: no weights file ({', '.join(_WEIGHTS)})")
    ckpt = read_checkpoint(file, shapes_only=shapes_only)
    tensors = _rename_diffusers(file, _tensors(ckpt), target)
    notes += ckpt.notes
    # A config without scaling_factor leaves the model's scale (diffusers would take its class default, 0.18215).
    scale = cfg.scale_factor if "scaling_factor" in d else None
    return VAEWeights(path, {VAE + k: t for k, t in tensors.items()}, scale, notes)
