"""LoRA files -> low-rank updates of our parameters.

Both key formats people ship name modules of the *diffusers* layout:

- kohya-ss / A1111: ``lora_unet_<module, dots written as _>.lora_down.weight``, ``.lora_up.weight``, ``.alpha``;
  ``lora_te_<module>`` for the text encoder, SD2's included (kohya trains the ``CLIPTextModel`` diffusers converts
  OpenCLIP to). An underscore name is looked up among the underscore spellings of the real module names in our
  tables, never split by guessing where the dots went. 4-D factors are kohya's "LoCon" on convolutions (1x1 or
  3x3 ``lora_down``, 1x1 ``lora_up``).
- diffusers / PEFT: ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` and ``text_encoder.<module>...``; older
  diffusers files say ``lora.down``/``lora.up``, ``lora_linear_layer.down``/``up``, or name attention processors
  (``attn1.processor.to_q_lora.down.weight``), the first of them without a ``unet.`` prefix.

The scale is alpha / rank: alpha from a ``.alpha`` key, else from the ``lora_adapter_metadata`` diffusers writes
(the ``LoraConfig`` of each component: ``lora_alpha``, ``alpha_pattern``, ``use_rslora``), else alpha = rank (scale
1), as diffusers and A1111 read them. Module names map to ours through :func:`unet_table` and :func:`text_table`; a
LoRA on q, k or v of OpenCLIP's fused ``in_proj_weight`` updates that row block, in :func:`text_splits`' order.

A key we cannot place is an error that names it, as diffusers refuses keys its conversion leaves over: a LoRA for
another family applied in part would be silently wrong. Kinds we do not apply (DoRA, LyCORIS LoHa/LoKr, Tucker
LoCon, SDXL) are named as such.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from stablekit.config import ModelConfig
from stablekit.models.ldm import LatentDiffusion
from stablekit.weights.load import read_checkpoint
from stablekit.weights.tables.text import text_splits, text_table
from stablekit.weights.tables.unet import unet_table

# The JSON string in a safetensors header that diffusers' ``save_lora_weights`` writes (diffusers' name).
METADATA_KEY = "lora_adapter_metadata"

# Key suffix -> which factor it holds; the module name is what comes before it.
_PARTS = (
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    (".alpha", "alpha"),
)
_PROCESSOR = re.compile(r"(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight")

# A marker in a key -> the kind of file it comes from, which we do not apply.
_UNSUPPORTED = (
    ("dora_scale", "DoRA (its magnitude vectors are not applied here)"),
    ("lora_magnitude_vector", "DoRA (its magnitude vectors are not applied here)"),
    ("hada_", "LyCORIS LoHa"),
    ("lokr_", "LyCORIS LoKr"),
    (".lora_mid.", "LoCon with a CP-decomposed (Tucker) middle factor"),
    ("lora_te1_", "SDXL (two text encoders)"),
    ("lora_te2_", "SDXL (two text encoders)"),
    ("text_encoder_2.", "SDXL (two text encoders)"),
    (".bias", "LoRA with bias terms"),
)


class LoraError(ValueError):
    """A LoRA file that does not fit the model; the message names the keys."""


@dataclass(frozen=True)
class Target:
    """The parameter a LoRA module updates: a :class:`LatentDiffusion` state-dict key, and the row block of a fused
    q/k/v weight (``[start, stop)``) or None for the whole tensor."""

    key: str
    rows: tuple[int, int] | None = None


@dataclass(frozen=True, eq=False)  # compared by identity: tensors have no single truth value
class LoraLayer:
    """One low-rank update: ``scale · up @ down`` added to ``target`` (times the weight it is merged with)."""

    target: Target
    down: Tensor  # (r, in) or (r, in, kh, kw)
    up: Tensor  # (out, r) or (out, r, 1, 1)
    scale: float  # alpha / r (alpha / √r for rsLoRA)
    source: str  # the module's name in the file, for messages

    def fits(self, param_shape: torch.Size | tuple[int, ...]) -> bool:
        """Whether the update fits a parameter of this shape (its row block, for a fused q/k/v weight)."""
        rows = self.target.rows
        want = tuple(param_shape) if rows is None else (rows[1] - rows[0], *param_shape[1:])
        return (rows is None or rows[1] <= param_shape[0]) and _fits(self.shape, want)

    @property
    def shape(self) -> tuple[int, ...]:
        """(out, in) or (out, in, kh, kw) of the update."""
        return (self.up.shape[0], self.down.shape[1], *self.down.shape[2:])

    def delta(self, shape: torch.Size | tuple[int, ...]) -> Tensor:
        """``scale · up @ down`` in float32, shaped like the (block of the) parameter: (out, in) or (out, in, kh, kw).
        A conv's factors flatten to matrices: a 1x1 ``up`` after a k x k ``down`` is one k x k conv."""
        d = self.up.float().flatten(1) @ self.down.float().flatten(1)  # (out, in·kh·kw)
        return (d * self.scale).reshape(shape)


@dataclass(frozen=True, eq=False)  # compared by identity: tensors have no single truth value
class Lora:
    name: str
    layers: tuple[LoraLayer, ...]


def lora_targets(config: ModelConfig) -> dict[str, Target]:
    """Module name in a diffusers-layout LoRA (``unet.<module>``, ``text_encoder.<module>``) -> its parameter."""
    out = {
        f"unet.{theirs}": Target(f"model.diffusion_model.{ours}.weight")
        for ours, theirs in unet_table(config.unet).items()
    }
    out |= {
        f"text_encoder.{theirs}": Target(f"cond_stage_model.{ours}.weight")
        for ours, theirs in text_table(config.text).items()
    }
    width = config.text.width
    for ours, parts in text_splits(config.text).items():
        if not ours.endswith(".in_proj_weight"):  # LoRA updates weights: not the biases or the positional embedding
            continue
        for j, part in enumerate(parts):  # q, k, v: row blocks of in_proj_weight, stacked in this order
            out[f"text_encoder.{part.removesuffix('.weight')}"] = Target(
                f"cond_stage_model.{ours}", (j * width, (j + 1) * width)
            )
    # transformers 5 saves CLIPTextModel without its ``text_model.`` level (and loads either).
    out |= {
        k.replace(".text_model.", ".", 1): t for k, t in list(out.items()) if k.startswith("text_encoder.text_model.")
    }
    return out


def kohya_names(targets: Mapping[str, Target]) -> dict[str, Target | None]:
    """kohya's ``lora_unet_<module>`` / ``lora_te_<module>`` spelling -> parameter (None where two real module names
    would share one spelling: such a key is refused, not guessed)."""
    out: dict[str, Target | None] = {}
    for name, target in targets.items():
        component, _, module = name.partition(".")
        if component == "text_encoder" and not module.startswith("text_model."):
            continue  # the alias above; kohya always writes the full path
        spelled = ("lora_unet_" if component == "unet" else "lora_te_") + module.replace(".", "_")
        out[spelled] = target if out.get(spelled, target) == target else None
    return out


def _split(key: str) -> tuple[str, str] | None:
    """(module, factor) of a LoRA key, or None when it is not one."""
    if m := _PROCESSOR.fullmatch(key):
        module, proj, part = m.groups()
        return f"{module}.{'to_out.0' if proj == 'to_out' else proj}", part
    for suffix, part in _PARTS:
        if key.endswith(suffix):
            return key[: -len(suffix)], part
    return None


def _adapter_configs(metadata: Mapping[str, str], name: str) -> dict[str, dict[str, Any]]:
    """Component ("unet", "text_encoder") -> its ``LoraConfig`` fields, from diffusers' metadata JSON."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as e:
        raise LoraError(f"{name}: {METADATA_KEY} in the header is not valid JSON") from e
    if not isinstance(flat, dict):
        raise LoraError(f"{name}: {METADATA_KEY} in the header is not a JSON object")
    out: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        component, _, field = str(key).partition(".")
        out.setdefault(component, {})[field] = value
    return out


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise LoraError(f"{what} is {value!r:.60}, not a number")
    return float(value)


def _peft_scale(config: Mapping[str, Any], module: str, rank: int, what: str) -> float:
    """PEFT's scaling of ``module`` (path inside its component): ``alpha_pattern`` entry, else ``lora_alpha`` (8 when
    absent, ``LoraConfig``'s default), over the rank or its square root (rsLoRA).

    PEFT matches pattern keys as regular expressions ending the module path; diffusers writes plain module paths,
    so we match them literally (a regex from a file could take exponential time)."""
    alpha: Any = config.get("lora_alpha", 8)
    patterns = config.get("alpha_pattern") or {}
    if not isinstance(patterns, dict):
        raise LoraError(f"{what}: alpha_pattern in {METADATA_KEY} is not an object")
    for pattern, value in patterns.items():
        if module == pattern or module.endswith(f".{pattern}"):
            alpha = value
            break
    a = _number(alpha, f"{what}: lora_alpha")
    return a / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _unsupported(keys: list[str]) -> str:
    kinds = sorted({kind for key in keys for marker, kind in _UNSUPPORTED if marker in key})
    return f" (this looks like {' and '.join(kinds)}, which is not supported)" if kinds else ""


def _fits(got: tuple[int, ...], want: tuple[int, ...]) -> bool:
    # A 1x1 conv and a linear layer hold the same matrix (SD1's proj_in is a conv, SD2's a linear layer).
    return want in (got, (*got, 1, 1)) or got == (*want, 1, 1)


def _scale(factors: Mapping[str, Tensor], rank: int, peft: Mapping[str, Any] | None, module: str, what: str) -> float:
    alpha = factors.get("alpha")
    if alpha is not None:
        if alpha.numel() != 1:
            raise LoraError(f"{what}.alpha has {alpha.numel()} values, not one")
        return _number(alpha.item(), f"{what}.alpha") / rank
    return 1.0 if peft is None else _peft_scale(peft, module, rank, what)


def _factors(
    target: Target, factors: Mapping[str, Tensor], params: Mapping[str, Tensor], what: str
) -> tuple[Tensor, Tensor]:
    """The (down, up) factors of one module, checked against the parameter they update."""
    down, up = factors.get("down"), factors.get("up")
    if down is None or up is None:
        lacks = " and ".join(part for part, t in (("down", down), ("up", up)) if t is None)
        raise LoraError(f"{what} has no {lacks} factor")
    if (
        down.dim() not in (2, 4)
        or up.dim() != down.dim()
        or up.shape[1] != down.shape[0]
        or tuple(up.shape[2:]) not in ((), (1, 1))
    ):
        raise LoraError(
            f"{what}: factors of shapes {tuple(down.shape)} (down) and {tuple(up.shape)} (up) do not make a "
            "low-rank update"
        )
    if not (down.is_floating_point() and up.is_floating_point()):
        raise LoraError(f"{what}: factors are {down.dtype} and {up.dtype}, not floating point")
    param = params.get(target.key)
    if param is None:
        raise LoraError(f"{what} maps to {target.key}, which this model does not have")
    want = tuple(param.shape) if target.rows is None else (target.rows[1] - target.rows[0], *param.shape[1:])
    got = (up.shape[0], down.shape[1], *down.shape[2:])  # (out, in) or (out, in, kh, kw)
    if not _fits(got, want):
        raise LoraError(
            f"{what} makes a {got} update but {target.key} is {want}: is this LoRA for another model family?"
        )
    return down, up


def lora_from_state_dict(
    state: Mapping[str, Tensor],
    model: LatentDiffusion,
    *,
    metadata: Mapping[str, str] | None = None,
    name: str = "LoRA",
) -> Lora:
    """The layers of a LoRA state dict (either format) for ``model``, checked against its parameters' shapes."""
    targets = lora_targets(model.config)
    kohya = kohya_names(targets)
    peft = _adapter_configs(metadata or {}, name)
    groups: dict[str, dict[str, Tensor]] = {}
    keys: dict[str, list[str]] = {}
    unknown: list[str] = []
    for key, tensor in state.items():
        split = _split(key)
        if split is None or any(marker in key for marker, _ in _UNSUPPORTED):
            unknown.append(key)
            continue
        groups.setdefault(split[0], {})[split[1]] = tensor
        keys.setdefault(split[0], []).append(key)

    params = dict(model.named_parameters())
    layers: list[LoraLayer] = []
    for module, factors in groups.items():
        if module.startswith(("lora_unet_", "lora_te_")):
            target, component, inner = kohya.get(module), "", module
        else:
            # The first diffusers LoRAs saved the UNet's attention processors without a component prefix.
            full = module if module.partition(".")[0] in ("unet", "text_encoder") else f"unet.{module}"
            target = targets.get(full)
            component, _, inner = full.partition(".")
        if target is None:
            unknown += keys[module]
            continue
        what = f"{name}: {module}"
        down, up = _factors(target, factors, params, what)
        scale = _scale(factors, down.shape[0], peft.get(component), inner, what)
        layers.append(LoraLayer(target, down, up, scale, module))
    if unknown:
        unknown.sort()
        raise LoraError(
            f"{name}: {len(unknown)} key(s) are not LoRA weights of this model ({model.config.name}), e.g. "
            f"{', '.join(unknown[:5])}{_unsupported(unknown)}"
        )
    if not layers:
        raise LoraError(f"{name}: no LoRA weights in the file")
    return Lora(name, tuple(layers))


def read_lora(path: str | os.PathLike[str], model: LatentDiffusion) -> Lora:
    """A LoRA file (``.safetensors``; ``.pt``/``.ckpt``/``.bin`` through the safe unpickler) for ``model``."""
    ckpt = read_checkpoint(path)
    assert ckpt.tensors is not None
    return lora_from_state_dict(ckpt.tensors, model, metadata=ckpt.metadata, name=Path(path).name)
