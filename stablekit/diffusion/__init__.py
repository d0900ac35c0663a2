"""Noise schedules, the ε/v denoiser, classifier-free guidance and the sampler family."""

from stablekit.diffusion.denoiser import Denoiser, ModelFn, training_target
from stablekit.diffusion.guidance import guided
from stablekit.diffusion.sampling import SAMPLERS, MaskCallback, SamplerInfo, SampleStep, resolve_sampler, sample
from stablekit.diffusion.schedules import add_noise, alphas_cumprod, make_betas

__all__ = [
    "SAMPLERS",
    "Denoiser",
    "MaskCallback",
    "ModelFn",
    "SampleStep",
    "SamplerInfo",
    "add_noise",
    "alphas_cumprod",
    "guided",
    "make_betas",
    "resolve_sampler",
    "sample",
    "training_target",
]
