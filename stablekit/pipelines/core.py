"""What every pipeline shares: a loaded model on a device, prompt encoding, the UNet call, and VAE decoding."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from stablekit import __version__
from stablekit.config import ModelConfig, Prediction
from stablekit.models.ldm import LatentDiffusion
from stablekit.text.tokenizer import tokenize

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class NonFiniteError(RuntimeError):
    """The model produced NaN or infinity; raised instead of writing a black image."""


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    # CPUs here have no native half-precision matmul (bf16 measured ~30x slower than fp32): fp32 is the CPU default.
    return torch.float16 if device.type == "cuda" else torch.float32


class Pipeline:
    """A :class:`LatentDiffusion` model, its family config and the device/dtype it runs in."""

    def __init__(
        self,
        model: LatentDiffusion,
        config: ModelConfig,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        name: str = "model",
        notes: Sequence[str] = (),
    ) -> None:
        self.device = torch.device(device) if device is not None else default_device()
        self.dtype = dtype if dtype is not None else default_dtype(self.device)
        self.model = model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self.config = config
        self.name = name
        self.notes = list(notes)
        self.version = __version__

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        prediction: Prediction | None = None,
    ) -> Pipeline:
        from stablekit.weights import load_model

        dev = torch.device(device) if device is not None else default_device()
        dt = dtype if dtype is not None else default_dtype(dev)
        loaded = load_model(path, prediction=prediction, dtype=dt, device=dev)
        return cls(loaded.model, loaded.config, device=dev, dtype=dt, name=Path(path).stem, notes=loaded.notes)

    def encode_prompt(self, prompts: Sequence[str]) -> tuple[Tensor, str | None]:
        """Prompts -> (B, 77, D) context, and the text the 77-token limit cut off (first one found), if any."""
        text = self.config.text
        tokens = tokenize(prompts, pad_token=text.pad_token, context_length=text.context_length)
        dropped = next((d for d in tokens.dropped if d), None)
        with torch.inference_mode():
            context = self.model.cond_stage_model(tokens.ids.to(self.device))
        return context.to(self.dtype), dropped

    def unet_fn(self, x: Tensor, t: Tensor, context: Tensor) -> Tensor:
        """The raw UNet call the samplers drive: (N, 4, h, w), (N,), (N, 77, D) -> eps or v."""
        return self.model.model.diffusion_model(x, t, context)

    def decode(self, latents: Tensor) -> Tensor:
        """Latents (B, 4, h, w) -> pixels (B, 3, H, W) in [-1, 1].

        In half precision the decoder can overflow on some latents; then it is re-run in fp32 (the VAE is small
        next to the UNet) rather than returning a black image. A NaN in the latents themselves is an error.
        """
        if not torch.isfinite(latents).all():
            raise NonFiniteError(
                f"the sampler produced NaN/inf latents in {self.dtype}; try --dtype fp32 (or bf16 on GPU)"
            )
        vae = self.model.first_stage_model
        z = latents / self.config.vae.scale_factor
        with torch.inference_mode():
            pixels = vae.decode(z.to(self.dtype))
            if not torch.isfinite(pixels).all() and self.dtype != torch.float32:
                vae.float()
                try:
                    pixels = vae.decode(z.float())
                finally:
                    vae.to(self.dtype)
        if not torch.isfinite(pixels).all():
            raise NonFiniteError("the autoencoder produced NaN/inf pixels; the weights may be corrupt")
        return pixels.float()
