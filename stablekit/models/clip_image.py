"""A CLIP model to pre-train a text encoder contrastively: SD1's text tower plus a small ViT image tower.

The text tower is :class:`~stablekit.models.clip.FrozenCLIPEmbedder` itself, so its trained weights load into
a Stable Diffusion model's ``cond_stage_model`` with the same keys. As in OpenAI CLIP, a caption is pooled at
its end-of-text token after the final LayerNorm and projected; the image at its class token after ``ln_post``.
The image tower keeps OpenAI CLIP's ``visual.*`` names (``conv1``, ``class_embedding``, ``transformer.resblocks``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stablekit.config import TextConfig
from stablekit.models.clip import FrozenCLIPEmbedder
from stablekit.nn.attention import attention, merge_heads, split_heads

EOT = 49407  # <|endoftext|>, where a caption is pooled


@dataclass(frozen=True)
class ImageTowerConfig:
    image_size: int = 64
    patch_size: int = 8
    width: int = 64
    layers: int = 2
    heads: int = 4
    mlp_ratio: int = 4


@dataclass(frozen=True)
class CLIPConfig:
    text: TextConfig
    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    embed_dim: int = 64


class _Attention(nn.Module):
    """Bidirectional self-attention with ``nn.MultiheadAttention``'s parameter names (q, k, v stacked)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.randn(3 * width, width) * width**-0.5)
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, C)
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, T, 3C), rows q;k;v
        q, k, v = (split_heads(t, self.heads) for t in qkv.chunk(3, dim=-1))
        return self.out_proj(merge_heads(attention(q, k, v, causal=False)))


class _Block(nn.Module):
    """Pre-LayerNorm transformer block (OpenCLIP's ``ResidualAttentionBlock``)."""

    def __init__(self, width: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = _Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, width * mlp_ratio))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(width * mlp_ratio, width))

    def forward(self, x: Tensor) -> Tensor:  # (B, T, C)
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class _Transformer(nn.Module):
    def __init__(self, cfg: ImageTowerConfig) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(_Block(cfg.width, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.layers))


class VisionTransformer(nn.Module):
    """(B, 3, S, S) in [-1, 1] -> (B, embed_dim), the class token after ``ln_post``, projected."""

    def __init__(self, cfg: ImageTowerConfig, embed_dim: int) -> None:
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image size {cfg.image_size} is not a multiple of the patch size {cfg.patch_size}")
        w, tokens = cfg.width, (cfg.image_size // cfg.patch_size) ** 2 + 1
        self.conv1 = nn.Conv2d(3, w, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(w) * w**-0.5)
        self.positional_embedding = nn.Parameter(torch.randn(tokens, w) * w**-0.5)
        self.ln_pre = nn.LayerNorm(w)
        self.transformer = _Transformer(cfg)
        self.ln_post = nn.LayerNorm(w)
        self.proj = nn.Parameter(torch.randn(w, embed_dim) * w**-0.5)

    def forward(self, images: Tensor) -> Tensor:
        x = self.conv1(images).flatten(2).transpose(1, 2)  # (B, N, C) patches in raster order
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding)  # (B, N+1, C)
        for block in self.transformer.resblocks:
            x = block(x)
        return self.ln_post(x[:, 0]) @ self.proj


class CLIPModel(nn.Module):
    def __init__(self, cfg: CLIPConfig) -> None:
        super().__init__()
        if cfg.text.kind != "openai":
            raise ValueError("the CLIP stage trains SD1's text tower (TextConfig kind 'openai')")
        self.config = cfg
        self.text = FrozenCLIPEmbedder(cfg.text)
        self.text_projection = nn.Linear(cfg.text.width, cfg.embed_dim, bias=False)
        self.visual = VisionTransformer(cfg.image, cfg.embed_dim)
        # Temperature τ as log(1/τ), initialised at τ = 0.07 as in CLIP.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_text(self, ids: Tensor) -> Tensor:  # (B, T) int64 -> (B, E)
        x = self.text(ids)  # (B, T, C), after final_layer_norm
        eot = (ids == EOT).int().argmax(dim=-1)  # the first EOT; SD1 also pads with it
        return self.text_projection(x[torch.arange(ids.shape[0], device=ids.device), eot])

    def encode_image(self, images: Tensor) -> Tensor:  # (B, 3, S, S) -> (B, E)
        return self.visual(images)


def contrastive_loss(image: Tensor, text: Tensor, logit_scale: Tensor) -> Tensor:
    """Symmetric InfoNCE over a batch of matching (image, text) pairs, (B, E) each (Radford et al. 2021)."""
    image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    # CLIP clips the learned scale at 100 so the softmax cannot become arbitrarily sharp.
    logits = logit_scale.clamp(max=math.log(100)).exp() * image @ text.T  # (B, B)
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
