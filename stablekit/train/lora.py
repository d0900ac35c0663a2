"""LoRA training (Hu et al. 2021, arXiv:2106.09685): teach a model a subject or a style through low-rank updates
``W + (alpha / r) · up @ down`` of its attention projections, the base weights frozen.

The targets are the UNet's attention projections (``to_q``, ``to_k``, ``to_v``, ``to_out.0`` of ``attn1`` and
``attn2``) and, with ``train_text_encoder``, the text encoder's (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``;
OpenCLIP's fused ``in_proj_weight`` takes q, k and v as row blocks). ``down`` starts as torch's ``nn.Linear`` init
(kaiming-uniform, a = √5), ``up`` at zero, as kohya and PEFT start them: the first step sees the base model.

The update is a :mod:`torch.nn.utils.parametrize` parametrization the stage puts on the model's weights (the
models know nothing of LoRA), summed in float32 the way :class:`stablekit.prompts.lora.LoraMerge` merges, so the
exported file merged at weight 1 gives the trained forward. The objective and the data are DreamBooth's (instance
and class images with the prior-preservation loss) or a captioned data set's (the plain latent-diffusion MSE).
The export is ``lora.safetensors`` in kohya/A1111 keys (``lora_unet_<module>.lora_down.weight``,
``.lora_up.weight``, ``.alpha``; ``lora_te_`` for the text encoder), what ``stablekit generate --lora``, A1111
and diffusers' ``load_lora_weights`` read.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from stablekit.config import ModelConfig
from stablekit.models.ldm import LatentDiffusion
from stablekit.train.data import collate, open_dataset
from stablekit.train.dreambooth import DREAMBOOTH_TRAIN, DreamBooth, DreamBoothStage, collate_pairs, paired_data
from stablekit.train.filters import Filters
from stablekit.train.footprint import FootprintSettings
from stablekit.train.stages import Batch
from stablekit.train.trainer import Summary, TrainConfig, Trainer
from stablekit.weights import load_model
from stablekit.weights.load import write_safetensors
from stablekit.weights.lora import Target, kohya_names, lora_targets

# kohya's and diffusers' LoRA scripts' rate (1e-4); the rest as DreamBooth (no EMA, 400 steps).
LORA_TRAIN = replace(DREAMBOOTH_TRAIN, lr=1e-4)
FILE = "lora.safetensors"

_UNET = re.compile(r"unet\..*\.attn[12]\.(to_q|to_k|to_v|to_out\.0)")
_TEXT = re.compile(r"text_encoder\.text_model\..*\.self_attn\.(q_proj|k_proj|v_proj|out_proj)")


class LoraOptionError(ValueError):
    """LoRA options that cannot train."""


def attention_targets(config: ModelConfig, *, text_encoder: bool = False) -> dict[str, Target]:
    """kohya name -> parameter of every attention projection LoRA trains, the UNet's (and the text encoder's)."""
    chosen = {
        name: t
        for name, t in lora_targets(config).items()
        if _UNET.fullmatch(name) or (text_encoder and _TEXT.fullmatch(name))
    }
    named = kohya_names(chosen)
    if any(t is None for t in named.values()):
        raise LoraOptionError(f"{config.name}: two attention modules share one kohya name")
    return {name: t for name, t in named.items() if t is not None}


class Factors(nn.Module):
    """One module's trained factors: ``down`` (r, in), ``up`` (out, r); the update is ``scale · up @ down``."""

    def __init__(self, out_features: int, in_features: int, rank: int, scale: float, gen: torch.Generator) -> None:
        super().__init__()
        bound = 1 / math.sqrt(in_features)  # kaiming_uniform_(a=√5), nn.Linear's and kohya's init of down
        self.down = nn.Parameter((torch.rand(rank, in_features, generator=gen) * 2 - 1) * bound)
        self.up = nn.Parameter(torch.zeros(out_features, rank))
        self.scale = scale

    def delta(self) -> Tensor:
        # As LoraLayer.delta merges: (up @ down) in float32, times the scale.
        return (self.up.float() @ self.down.float()) * self.scale  # (out, in)


class _Added(nn.Module):
    """The parametrization ``W ↦ W + Σ update``, each update on the whole tensor or on a row block of it."""

    def __init__(self, parts: list[tuple[tuple[int, int] | None, Factors]]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(f for _, f in parts)  # registered, so .to() and parameters() reach them
        self.updates = parts

    def forward(self, weight: Tensor) -> Tensor:
        w = weight.float()
        for rows, factors in self.updates:
            if rows is None:
                w = w + factors.delta().reshape(w.shape)
            else:
                a, b = rows
                w = torch.cat([w[:a], w[a:b] + factors.delta().reshape(w[a:b].shape), w[b:]])
        return w.to(weight.dtype)


class LoraStage(DreamBoothStage):
    """DreamBooth's objective (the prior term only where the batch holds class rows) on a model whose attention
    projections carry trainable low-rank updates; the trainer's module is the factors alone."""

    name = "lora"
    module: nn.ModuleDict

    def __init__(
        self,
        model: LatentDiffusion,
        config: ModelConfig,
        *,
        rank: int = 4,
        alpha: float | None = None,
        prior_loss_weight: float = 1.0,
        train_text_encoder: bool = False,
        seed: int = 0,
    ) -> None:
        if rank < 1:
            raise LoraOptionError(f"the LoRA rank must be positive, got {rank}")
        if alpha is not None and not (math.isfinite(alpha) and alpha > 0):
            raise LoraOptionError(f"the LoRA alpha must be positive, got {alpha}")
        self.rank, self.alpha, self.seed = rank, float(rank if alpha is None else alpha), seed
        super().__init__(model, config, prior_loss_weight=prior_loss_weight, train_text_encoder=train_text_encoder)

    def trainable(self) -> nn.Module:
        gen = torch.Generator().manual_seed(self.seed)
        params = dict(self.model.named_parameters())
        factors: dict[str, Factors] = {}
        per_param: dict[str, list[tuple[tuple[int, int] | None, Factors]]] = {}
        for name, target in sorted(attention_targets(self.config, text_encoder=self.train_text_encoder).items()):
            shape = params[target.key].shape
            rows = target.rows
            out_features = shape[0] if rows is None else rows[1] - rows[0]
            if len(shape) != 2:
                raise LoraOptionError(f"{target.key} is {tuple(shape)}, not a linear layer's weight")
            factors[name] = Factors(out_features, shape[1], self.rank, self.alpha / self.rank, gen)
            per_param.setdefault(target.key, []).append((rows, factors[name]))
        for key, parts in per_param.items():
            owner, _, attr = key.rpartition(".")
            parametrize.register_parametrization(self.model.get_submodule(owner), attr, _Added(parts))
        return nn.ModuleDict(factors)

    def export(self, weights: dict[str, Tensor], out: Path, data: Iterable[Batch]) -> list[Path]:
        state: dict[str, Tensor] = {}
        for name in self.module:
            state[f"{name}.lora_down.weight"] = weights[f"{name}.down"].float()
            state[f"{name}.lora_up.weight"] = weights[f"{name}.up"].float()
            state[f"{name}.alpha"] = torch.tensor(self.alpha)
        meta = {
            "format": "pt",
            "ss_network_module": "networks.lora",  # kohya's metadata names
            "ss_network_dim": str(self.rank),
            "ss_network_alpha": f"{self.alpha:g}",
        }
        path = out / FILE
        write_safetensors(path, state, meta)
        return [path]


@dataclass(frozen=True)
class LoraSpec:
    """What to train on: DreamBooth's instance (and class) images, or a captioned data set (a folder of images and
    .txt captions, a manifest or shards, as the ``unet`` stage reads it); the rank and alpha of the updates."""

    data: DreamBooth | str | Path
    rank: int = 4
    alpha: float | None = None  # default: the rank (scale 1)
    train_text_encoder: bool = False
    size: int | None = None  # default: the model's (DreamBooth data: its own spec's size, if given)
    filters: Filters | None = None  # for a captioned data set: the LAION-style metadata filters


def train_lora(
    model: str | Path,
    out: str | Path,
    spec: LoraSpec,
    cfg: TrainConfig = LORA_TRAIN,
    *,
    resume: bool = False,
    footprint: FootprintSettings | None = None,
) -> tuple[Summary, dict[str, Any]]:
    """Train a LoRA for ``model`` (a file ``load_model`` reads) as ``spec`` says, into the run folder ``out``
    (``lora.safetensors``). Returns the trainer's summary and what the data held."""
    out = Path(out)
    loaded = load_model(model)
    source = spec.data
    dreambooth = source if isinstance(source, DreamBooth) else None
    size = spec.size or (dreambooth.size if dreambooth else None) or loaded.config.default_size
    stage = LoraStage(
        loaded.model,
        loaded.config,
        rank=spec.rank,
        alpha=spec.alpha,
        prior_loss_weight=dreambooth.prior_loss_weight if dreambooth else 0.0,
        train_text_encoder=spec.train_text_encoder,
        seed=cfg.seed,
    )
    if isinstance(source, DreamBooth):
        data, report = paired_data(model, out, source, cfg.seed, size)
        summary = Trainer(stage, data, cfg, out, collate=collate_pairs, footprint=footprint).fit(resume=resume)
    else:
        dataset = open_dataset(source, size=size, filters=spec.filters)
        report = {"examples": len(dataset), "size": size}
        summary = Trainer(stage, dataset, cfg, out, collate=collate, footprint=footprint).fit(resume=resume)
    return summary, report | {"modules": len(stage.module), "rank": stage.rank, "alpha": stage.alpha}
