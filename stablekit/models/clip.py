"""The frozen CLIP text encoders that condition the UNet.

- :class:`FrozenCLIPEmbedder` (SD1): OpenAI CLIP ViT-L/14's text tower as transformers lays it out,
  quick-GELU, output = ``final_layer_norm`` of the last layer.
- :class:`FrozenOpenCLIPEmbedder` (SD2, x4): OpenCLIP ViT-H/14's text tower, exact GELU, fused q/k/v
  projection, output = ``ln_final`` of the *penultimate* block (the last block is stored but never run).

Both are pre-LayerNorm transformers with a causal mask and no padding mask: pad positions are encoded like
any token and the UNet cross-attends to them. ``forward(ids, skip=n)`` stops ``n`` layers before the family's
own output layer and still applies the final LayerNorm (A1111's and diffusers' "clip skip"). Attribute names
are the checkpoint keys after ``cond_stage_model.``, so a released file loads with ``strict=True``; keys that
some files lack are listed in ``OPTIONAL_KEYS`` for :func:`stablekit.weights.convert.fit_state_dict`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stablekit.config import TextConfig
from stablekit.nn.attention import attention, merge_heads, split_heads


def _quick_gelu(x: Tensor) -> Tensor:
    # OpenAI CLIP's sigmoid approximation of GELU; the ViT-L/14 weights were trained with it.
    return x * torch.sigmoid(1.702 * x)


def _activation(cfg: TextConfig) -> Callable[[Tensor], Tensor]:
    return _quick_gelu if cfg.activation == "quick_gelu" else F.gelu


class _LayerNorm(nn.LayerNorm):
    """LayerNorm with statistics in fp32, cast back to the input dtype (fp16 variance over 1024 channels
    loses precision)."""

    def forward(self, x: Tensor) -> Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class TextEncoder(nn.Module):
    """The interface shared by both encoders: ``config``, ``OPTIONAL_KEYS`` and
    ``forward(ids: (B, T) int64, skip: int = 0) -> (B, T, width)``."""

    # State-dict keys a loader may find absent (the model keeps its own values) or present.
    OPTIONAL_KEYS: tuple[str, ...] = ()

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = config

    def layers_run(self, ids: Tensor, skip: int) -> int:
        """How many layers run for ``skip`` (see :func:`layers_run`)."""
        return layers_run(self.config, ids, skip)


def layers_run(config: TextConfig, ids: Tensor, skip: int) -> int:
    """How many layers of a tower run for ``skip``; raises ValueError for a skip or token id it cannot take (an id
    past the embedding would be a raw IndexError, or a device-side assert that ends a CUDA context). Shared by every
    engine: a converted tower has no Python left to check its input."""
    used = config.layers_used
    if not 0 <= skip < used:
        raise ValueError(f"cannot skip {skip} of the text encoder's {used} layers: at least one must run")
    if ids.numel():
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= config.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"token id {bad} is outside the text encoder's {config.vocab_size}-token vocabulary")
    return used - skip


# --- SD1: transformers' CLIPTextModel layout ----------------------------------------------------------


class _HFSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, C)
        q, k, v = (split_heads(proj(x), self.heads) for proj in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(merge_heads(attention(q, k, v, causal=True)))  # (B, H, T, D) -> (B, T, C)


class _HFMLP(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.act = _activation(cfg)
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_width)
        self.fc2 = nn.Linear(cfg.mlp_width, cfg.width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _HFLayer(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.self_attn = _HFSelfAttention(cfg.width, cfg.heads)
        self.layer_norm1 = _LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = _HFMLP(cfg)
        self.layer_norm2 = _LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class _HFEmbeddings(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.context_length, cfg.width)
        # Stored by many SD1 files, so it is a state-dict key; never read, because some merged files carry
        # it as floats like 76.9999 that would index the wrong positions.
        self.register_buffer("position_ids", torch.arange(cfg.context_length)[None], persistent=True)

    def forward(self, ids: Tensor) -> Tensor:  # (B, T) -> (B, T, C)
        return self.token_embedding(ids) + self.position_embedding.weight[: ids.shape[1]]


class _HFEncoder(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_HFLayer(cfg) for _ in range(cfg.layers))


class _HFTextTransformer(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.embeddings = _HFEmbeddings(cfg)
        self.encoder = _HFEncoder(cfg)
        self.final_layer_norm = _LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, ids: Tensor, layers: int) -> Tensor:
        x = self.embeddings(ids)
        for layer in self.encoder.layers[:layers]:
            x = layer(x)
        return self.final_layer_norm(x)


class _HFTextModel(nn.Module):
    """transformers' ``CLIPTextModel`` wrapper level (``transformer.text_model``)."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.text_model = _HFTextTransformer(cfg)


class FrozenCLIPEmbedder(TextEncoder):
    """SD1's text encoder: ``cond_stage_model.transformer.text_model.*``."""

    OPTIONAL_KEYS = ("transformer.text_model.embeddings.position_ids",)

    def __init__(self, config: TextConfig) -> None:
        super().__init__(config)
        self.transformer = _HFTextModel(config)

    def forward(self, ids: Tensor, skip: int = 0) -> Tensor:  # (B, T) int64 -> (B, T, C)
        return self.transformer.text_model(ids, self.layers_run(ids, skip))


# --- SD2 / x4: OpenCLIP layout -------------------------------------------------------------------------


class _FusedSelfAttention(nn.Module):
    """Parameter names of ``nn.MultiheadAttention``: q, k, v stacked in ``in_proj_weight`` rows."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.normal_(self.in_proj_weight, std=width**-0.5)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, C)
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, T, 3C), rows q;k;v
        q, k, v = (split_heads(t, self.heads) for t in qkv.chunk(3, dim=-1))
        return self.out_proj(merge_heads(attention(q, k, v, causal=True)))


class _OpenCLIPMLP(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.act = _activation(cfg)
        self.c_fc = nn.Linear(cfg.width, cfg.mlp_width)
        self.c_proj = nn.Linear(cfg.mlp_width, cfg.width)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class _ResBlock(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.ln_1 = _LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = _FusedSelfAttention(cfg.width, cfg.heads)
        self.ln_2 = _LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = _OpenCLIPMLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class _ResBlocks(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(_ResBlock(cfg) for _ in range(cfg.layers))


class _OpenCLIPText(nn.Module):
    """The text half of ``open_clip.CLIP`` (``cond_stage_model.model``)."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.transformer = _ResBlocks(cfg)
        self.ln_final = _LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        # CLIP's contrastive head: kept so original files load strictly, unused by Stable Diffusion.
        self.text_projection = nn.Parameter(torch.empty(cfg.width, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=cfg.width**-0.5)

    def forward(self, ids: Tensor, layers: int) -> Tensor:  # (B, T) -> (B, T, C)
        x = self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]
        for block in self.transformer.resblocks[:layers]:
            x = block(x)
        return self.ln_final(x)


class FrozenOpenCLIPEmbedder(TextEncoder):
    """SD2/x4's text encoder: ``cond_stage_model.model.*``, run for ``layers_used`` blocks ("penultimate")."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__(config)
        self.model = _OpenCLIPText(config)
        # The blocks never run and the contrastive head: diffusers folders do not store them.
        unused = [
            f"model.transformer.resblocks.{i}.{key}"
            for i in range(config.layers_used, config.layers)
            for key in self.model.transformer.resblocks[i].state_dict()
        ]
        self.OPTIONAL_KEYS = (*unused, "model.text_projection", "model.logit_scale")

    def forward(self, ids: Tensor, skip: int = 0) -> Tensor:  # (B, T) int64 -> (B, T, C)
        return self.model(ids, self.layers_run(ids, skip))


def text_encoder(cfg: TextConfig) -> TextEncoder:
    """The encoder of a family's text config."""
    if cfg.kind == "openai":
        return FrozenCLIPEmbedder(cfg)
    return FrozenOpenCLIPEmbedder(cfg)
