"""CLIP score: how well each image matches its caption, as torchmetrics' ``CLIPScore`` defines it (Hessel et al.
2021, without their 2.5 weight): ``100 * max(cos(image_embed, text_embed), 0)`` per image.

:func:`load_clip_scorer` takes a transformers ``CLIPModel`` folder (``openai/clip-vit-large-patch14`` is the
usual one, as in torchmetrics) or ``None`` for the demo CLIP, whose text tower is the shipped demo model's.

A caption longer than the model's 77 positions is cut to its first 75 tokens and still ends in the end-of-text
token it is pooled at; :meth:`ClipScorer.truncated` says which were cut. torchmetrics cuts the padded ids
themselves (and warns), which drops that end token, so its score of a cut caption pools at whichever kept token
has the largest id; the two agree on every caption that fits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from stablekit.text.tokenizer import CONTEXT_LENGTH, CLIPTokenizer
from stablekit.weights.clip_score import load_clip_pair, load_demo_clip

Preprocess = Callable[[Sequence[Image.Image]], Tensor]  # PIL images -> (B, 3, S, S) float32, the model's input


class ContrastiveModel(Protocol):
    def encode_text(self, ids: Tensor) -> Tensor: ...  # (B, T) int64 -> (B, E)

    def encode_image(self, pixels: Tensor) -> Tensor: ...  # (B, 3, S, S) -> (B, E)

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...


@dataclass(frozen=True)
class SquarePreprocess:
    """The demo CLIP's input, as its training data was made (:func:`stablekit.train.data.resize_crop`): the
    shorter side to ``size`` (bicubic), the centred square, scaled to [-1, 1]."""

    size: int

    def __call__(self, images: Sequence[Image.Image]) -> Tensor:
        return torch.stack([self._one(im) for im in images])

    def _one(self, image: Image.Image) -> Tensor:
        w, h = image.size
        scale = self.size / min(w, h)
        nw, nh = max(self.size, round(w * scale)), max(self.size, round(h * scale))
        image = image.convert("RGB").resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - self.size) // 2, (nh - self.size) // 2
        x = np.asarray(image.crop((left, top, left + self.size, top + self.size)), dtype=np.float32) / 255.0
        return torch.from_numpy(x).permute(2, 0, 1) * 2 - 1  # (3, S, S)


class ClipScorer:
    """A CLIP model with its tokenizer and image preprocessing; it runs in the model's device and dtype."""

    def __init__(
        self,
        model: ContrastiveModel,
        tokenizer: CLIPTokenizer,
        preprocess: Preprocess,
        *,
        pad_token: int,
        context_length: int = CONTEXT_LENGTH,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.pad_token = pad_token
        self.context_length = context_length

    def _param(self) -> Tensor:
        return next(self.model.parameters())

    def _ids(self, prompts: Sequence[str]) -> Tensor:
        return self.tokenizer.tokenize(prompts, pad_token=self.pad_token, context_length=self.context_length).ids

    def truncated(self, prompts: Sequence[str]) -> list[str | None]:
        """Per prompt, the end that did not fit the text tower (None when it all fits)."""
        return self.tokenizer.tokenize(prompts, pad_token=self.pad_token, context_length=self.context_length).dropped

    @torch.no_grad()
    def text_embeds(self, prompts: Sequence[str]) -> Tensor:
        """Captions -> (B, E) float32 projected text embeddings (not normalised)."""
        if isinstance(prompts, str) or not prompts:
            raise ValueError("no prompts to embed (give a list of strings)")
        return self.model.encode_text(self._ids(prompts).to(self._param().device)).float()

    @torch.no_grad()
    def image_embeds(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) uint8 -> (B, E) float32 projected image embeddings (not normalised)."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3 or not images.shape[0]:
            raise ValueError(
                f"images must be a non-empty (B, 3, H, W) uint8 tensor, not {images.dtype} {tuple(images.shape)}"
            )
        pil = [Image.fromarray(im.permute(1, 2, 0).cpu().numpy()) for im in images]  # (H, W, 3) each
        p = self._param()
        return self.model.encode_image(self.preprocess(pil).to(p.device, p.dtype)).float()

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """(B, 3, H, W) uint8 images and B captions -> (B,) float32 CLIP scores in [0, 100]."""
        if isinstance(prompts, str):
            raise ValueError("prompts must be a list of strings, one per image")
        if not prompts:
            raise ValueError("no prompts to score: give one prompt per image")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts: give one prompt per image")
        cos = F.cosine_similarity(self.image_embeds(images), self.text_embeds(prompts), dim=-1)  # (B,)
        return 100 * cos.clamp(min=0)


def load_clip_scorer(path: str | Path | None) -> ClipScorer:
    """A transformers ``CLIPModel`` folder, or None for the demo CLIP (the shipped demo model's text tower and
    the image tower trained against it), ready to score on the CPU in float32."""
    if path is None:
        demo = load_demo_clip()
        text = demo.config.text
        return ClipScorer(
            demo,
            CLIPTokenizer(),
            SquarePreprocess(demo.config.image.image_size),
            pad_token=text.pad_token,
            context_length=text.context_length,
        )
    model, tokenizer, preprocess = load_clip_pair(path)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    return ClipScorer(model, tokenizer, preprocess, pad_token=pad, context_length=model.config.text.context_length)
