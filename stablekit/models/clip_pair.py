"""A whole CLIP (text and image towers with their projections) in transformers' layout, to score image-text
agreement: OpenAI CLIP ViT-L/14 and the other checkpoints of transformers' ``CLIPModel``.

Both towers are ones stablekit already has: the text tower is SD1's
:class:`~stablekit.models.clip.FrozenCLIPEmbedder` (so ``text.transformer.text_model.*``, as in
:mod:`stablekit.models.clip_image`), the image tower the safety checker's
:class:`~stablekit.models.safety.CLIPVisionModel` (``vision_model.vision_model.*``, its released keys), each
projected by a bias-free linear layer. transformers' own keys are one prefix away from these;
:mod:`stablekit.weights.tables.clip_score` maps them.

A caption is pooled at its end-of-text token after the final LayerNorm (transformers takes ``argmax(ids)``, the
same position for the OpenAI vocabulary, whose end token has the largest id), an image at its class token after
``post_layernorm``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from stablekit.config import TextConfig
from stablekit.models.clip import FrozenCLIPEmbedder
from stablekit.models.safety import CLIPVisionModel, SafetyConfig


@dataclass(frozen=True)
class CLIPPairConfig:
    """``vision`` is the safety checker's ViT config; its concept counts are unused here."""

    text: TextConfig
    vision: SafetyConfig
    projection_dim: int
    eos_token: int = 49407  # where a caption is pooled

    def __post_init__(self) -> None:
        if self.text.kind != "openai":
            raise ValueError("a transformers CLIPModel's text tower is OpenAI's layout (TextConfig kind 'openai')")


class CLIPPair(nn.Module):
    def __init__(self, cfg: CLIPPairConfig) -> None:
        super().__init__()
        self.config = cfg
        self.text = FrozenCLIPEmbedder(cfg.text)
        self.text_projection = nn.Linear(cfg.text.width, cfg.projection_dim, bias=False)
        self.vision_model = CLIPVisionModel(cfg.vision)
        self.visual_projection = nn.Linear(cfg.vision.hidden_size, cfg.projection_dim, bias=False)
        # Stored by every CLIP checkpoint; a score is a cosine, so it is not used.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_text(self, ids: Tensor) -> Tensor:  # (B, T) int64 -> (B, P)
        x = self.text(ids)  # (B, T, C), after final_layer_norm
        eot = (ids == self.config.eos_token).int().argmax(dim=-1)  # the first end token
        return self.text_projection(x[torch.arange(ids.shape[0], device=ids.device), eot])

    def encode_image(self, pixels: Tensor) -> Tensor:  # (B, 3, S, S) normalised -> (B, P)
        return self.visual_projection(self.vision_model(pixels))
