"""The whole model as an original single-file checkpoint lays it out.

``LatentDiffusion`` only holds the three networks under their checkpoint prefixes, so a released file's
state dict loads with ``strict=True``: ``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE),
``cond_stage_model.*`` (text encoder). Everything else a released file may carry is listed in
:data:`EXTRA_KEYS` with the reason it is not loaded; the training class's noise schedule is rebuilt from the
config instead of read from its buffers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

from torch import nn

from stablekit.config import ModelConfig, UNetConfig
from stablekit.models.clip import TextEncoder, text_encoder
from stablekit.models.unet import UNetModel
from stablekit.models.vae import AutoencoderKL

# ``ldm.models.diffusion.ddpm.DDPM.register_schedule``: twelve [1000] buffers derived from the betas.
SCHEDULE_BUFFERS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)

# Key (exact, or a prefix ending in ".") -> why it is not a weight of the three networks.
EXTRA_KEYS: dict[str, str] = {
    **{k: "noise-schedule buffers (rebuilt from the config)" for k in SCHEDULE_BUFFERS},
    "logvar": "training-only loss weights",
    "lvlb_weights": "training-only loss weights",
    # LitEma's bookkeeping, never weights; the copies themselves load in place of the UNet's with --ema.
    "model_ema.decay": "EMA decay and update count (training bookkeeping)",
    "model_ema.num_updates": "EMA decay and update count (training bookkeeping)",
    "model_ema.": "EMA shadow copy of the UNet in a non-pruned training file (the live weights are loaded; --ema "
    "loads these instead)",
    "low_scale_model.": "x4 noise-augmentation schedule buffers (rebuilt from the config)",
    "depth_model.": "MiDaS depth estimator weights (the depth map is supplied separately)",
    "scale_factor": "latent scale buffer (scale_by_std training); read into the VAE config",
}


T = TypeVar("T")


# The three networks' key prefixes. A key under none of them, and not a known extra, was left by the tool that
# made the file (community merges carry embedding managers, LoRA leftovers, merge recipes): set aside and reported,
# never loaded. A key under a network prefix that does not fit is an error at load, never skipped.
NETWORK_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")
FOREIGN = "not part of a Stable Diffusion network (left by the tool that made the file); ignored"


def split_extras(state: Mapping[str, T]) -> tuple[dict[str, T], dict[str, list[str]]]:
    """(network weights, {reason: keys}) of an original-layout state dict (of tensors, or of shapes)."""
    weights: dict[str, T] = {}
    extras: dict[str, list[str]] = {}
    for key, tensor in state.items():
        reason = EXTRA_KEYS.get(key) or next(
            (why for p, why in EXTRA_KEYS.items() if p.endswith(".") and key.startswith(p)), None
        )
        if reason is None and not key.startswith(NETWORK_PREFIXES):
            reason = FOREIGN
        if reason is None:
            weights[key] = tensor
        else:
            extras.setdefault(reason, []).append(key)
    return weights, extras


class DiffusionWrapper(nn.Module):
    """The ``model`` level of the original class; the UNet sits under it as ``diffusion_model``."""

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.diffusion_model = UNetModel(cfg)


class LatentDiffusion(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DiffusionWrapper(config.unet)
        self.first_stage_model = AutoencoderKL(config.vae)
        self.cond_stage_model = text_encoder(config.text)

    @property
    def unet(self) -> UNetModel:
        return self.model.diffusion_model

    @property
    def vae(self) -> AutoencoderKL:
        return self.first_stage_model

    @property
    def text_encoder(self) -> TextEncoder:
        return self.cond_stage_model

    def optional_keys(self) -> tuple[str, ...]:
        """State-dict keys a file may lack: the text tower's unused parts."""
        return tuple(f"cond_stage_model.{k}" for k in self.cond_stage_model.OPTIONAL_KEYS)
