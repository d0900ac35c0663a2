"""The safety checker of the Stable Diffusion releases: a CLIP ViT image tower and 20 concept embeddings.

Attribute names are the keys of the released ``safety_checker/`` weights (diffusers'
``StableDiffusionSafetyChecker``): ``vision_model.vision_model.*`` (a transformers ``CLIPVisionModel`` inside),
``visual_projection.weight``, ``concept_embeds`` (17, P), ``special_care_embeds`` (3, P) and their thresholds
``concept_embeds_weights`` (17,) and ``special_care_embeds_weights`` (3,).

An image is flagged when the cosine similarity of its projected embedding to any concept exceeds that
concept's threshold. Firing a "special care" concept adds 0.01 to every concept's score, so the filter grows
stricter for that image. :meth:`StableDiffusionSafetyChecker.score` follows diffusers' ``forward`` (the one
its pipelines call) to the letter, including the rounding of every score to 3 decimals and the adjustment
that also reaches the special-care concepts after the first one that fires.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stablekit.nn.attention import attention, merge_heads, split_heads

SPECIAL_CARE_ADJUSTMENT = 0.01


@dataclass(frozen=True)
class SafetyConfig:
    """The released checker is CLIP ViT-L/14 at 224 px, projected to 768 (these defaults)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_heads: int = 16
    num_layers: int = 24
    patch_size: int = 14
    image_size: int = 224
    projection_dim: int = 768
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    num_concepts: int = 17
    num_special: int = 3

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden size {self.hidden_size} is not a multiple of {self.num_heads} heads")
        if self.image_size % self.patch_size:
            raise ValueError(f"image size {self.image_size} is not a multiple of the patch size {self.patch_size}")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not one of {sorted(_ACTIVATIONS)}")


def _quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)  # OpenAI CLIP's sigmoid approximation of GELU


_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"quick_gelu": _quick_gelu, "gelu": F.gelu}


class _Embeddings(nn.Module):
    def __init__(self, cfg: SafetyConfig) -> None:
        super().__init__()
        d, tokens = cfg.hidden_size, (cfg.image_size // cfg.patch_size) ** 2 + 1
        self.class_embedding = nn.Parameter(torch.randn(d) * d**-0.5)
        self.patch_embedding = nn.Conv2d(3, d, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.position_embedding = nn.Embedding(tokens, d)

    def forward(self, pixels: Tensor) -> Tensor:  # (B, 3, S, S) -> (B, N+1, D)
        x = self.patch_embedding(pixels).flatten(2).transpose(1, 2)  # (B, N, D), patches in raster order
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight


class _Attention(nn.Module):
    def __init__(self, cfg: SafetyConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.heads = cfg.num_heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, D)
        q, k, v = (split_heads(p(x), self.heads) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(merge_heads(attention(q, k, v, causal=False)))


class _MLP(nn.Module):
    def __init__(self, cfg: SafetyConfig) -> None:
        super().__init__()
        self.act = _ACTIVATIONS[cfg.hidden_act]
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _Layer(nn.Module):
    """Pre-LayerNorm transformer block (transformers' ``CLIPEncoderLayer``)."""

    def __init__(self, cfg: SafetyConfig) -> None:
        super().__init__()
        self.self_attn = _Attention(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = _MLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class _Encoder(nn.Module):
    def __init__(self, cfg: SafetyConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Layer(cfg) for _ in range(cfg.num_layers))


class CLIPVisionTransformer(nn.Module):
    """(B, 3, S, S) normalised pixels -> (B, D): the class token after ``post_layernorm`` (the pooled output)."""

    def __init__(self, cfg: SafetyConfig) -> None:
        super().__init__()
        self.embeddings = _Embeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic, the released key
        self.encoder = _Encoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixels: Tensor) -> Tensor:
        x = self.pre_layrnorm(self.embeddings(pixels))  # (B, N+1, D)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x[:, 0])


class CLIPVisionModel(nn.Module):
    """transformers' wrapper, kept for its ``vision_model.`` key prefix."""

    def __init__(self, cfg: SafetyConfig) -> None:
        super().__init__()
        self.vision_model = CLIPVisionTransformer(cfg)

    def forward(self, pixels: Tensor) -> Tensor:
        return self.vision_model(pixels)


@dataclass(frozen=True)
class SafetyScores:
    """Per image: cosine similarities, the rounded scores (> 0 fires) and the verdict."""

    special_cos: Tensor  # (B, 3)
    concept_cos: Tensor  # (B, 17)
    special_scores: Tensor  # (B, 3), rounded to 3 decimals
    concept_scores: Tensor  # (B, 17), rounded to 3 decimals, special-care adjustment included
    special_care: Tensor  # (B,) bool, some special-care concept fired
    has_nsfw_concept: Tensor  # (B,) bool


def cosine_similarity(a: Tensor, b: Tensor) -> Tensor:
    """(B, P), (K, P) -> (B, K); diffusers calls it ``cosine_distance``."""
    return F.normalize(a) @ F.normalize(b).T


class StableDiffusionSafetyChecker(nn.Module):
    def __init__(self, cfg: SafetyConfig) -> None:
        super().__init__()
        self.config = cfg
        p = cfg.projection_dim
        self.vision_model = CLIPVisionModel(cfg)
        self.visual_projection = nn.Linear(cfg.hidden_size, p, bias=False)
        self.concept_embeds = nn.Parameter(torch.ones(cfg.num_concepts, p), requires_grad=False)
        self.special_care_embeds = nn.Parameter(torch.ones(cfg.num_special, p), requires_grad=False)
        self.concept_embeds_weights = nn.Parameter(torch.ones(cfg.num_concepts), requires_grad=False)
        self.special_care_embeds_weights = nn.Parameter(torch.ones(cfg.num_special), requires_grad=False)

    def image_embeds(self, pixels: Tensor) -> Tensor:  # (B, 3, S, S) -> (B, P)
        return self.visual_projection(self.vision_model(pixels))

    @torch.no_grad()
    def score(self, pixels: Tensor) -> SafetyScores:
        embeds = self.image_embeds(pixels)
        # Scored in float32 whatever the model's dtype, as diffusers does.
        special_cos = cosine_similarity(embeds, self.special_care_embeds).float()  # (B, 3)
        concept_cos = cosine_similarity(embeds, self.concept_embeds).float()  # (B, 17)
        special_thresholds = self.special_care_embeds_weights.float()
        adjustment = torch.zeros(embeds.shape[0], device=embeds.device)  # (B,)
        special_scores = torch.empty_like(special_cos)
        # Sequential on purpose: in diffusers the adjustment set by one special concept already counts for
        # the special concepts after it.
        for j in range(special_cos.shape[1]):
            special_scores[:, j] = torch.round(special_cos[:, j] - special_thresholds[j] + adjustment, decimals=3)
            adjustment = torch.where(special_scores[:, j] > 0, SPECIAL_CARE_ADJUSTMENT, adjustment)
        concept_scores = torch.round(
            concept_cos - self.concept_embeds_weights.float() + adjustment[:, None], decimals=3
        )  # (B, 17)
        return SafetyScores(
            special_cos=special_cos,
            concept_cos=concept_cos,
            special_scores=special_scores,
            concept_scores=concept_scores,
            special_care=(special_scores > 0).any(dim=1),
            has_nsfw_concept=(concept_scores > 0).any(dim=1),
        )
