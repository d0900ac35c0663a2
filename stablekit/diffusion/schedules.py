"""The training noise schedule (betas, ᾱ) and the ways a sampler picks its timesteps from it.

Everything is built in float32 from the same expressions diffusers uses, because a sampler that matches its
diffusers counterpart to 1e-5 must start from bit-identical ᾱ: the scaled-linear betas of SD are
``linspace(√β₀, √β₁, T)²`` in float32 (LDM builds them in float64; the two differ by ~1e-7).
Where diffusers takes a float64 numpy detour (the Euler family's σ interpolation, Karras σ), we do the same.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from stablekit.config import ScheduleConfig


def make_betas(schedule: ScheduleConfig) -> Tensor:
    """β_t for t = 0..T-1, float32, optionally rescaled to zero terminal SNR."""
    s, n = schedule, schedule.num_train_timesteps
    if s.beta_schedule == "scaled_linear":
        betas = torch.linspace(s.beta_start**0.5, s.beta_end**0.5, n, dtype=torch.float32) ** 2
    elif s.beta_schedule == "linear":
        betas = torch.linspace(s.beta_start, s.beta_end, n, dtype=torch.float32)
    else:
        raise ValueError(f"unknown beta_schedule {s.beta_schedule!r}; expected 'scaled_linear' or 'linear'")
    return rescale_zero_terminal_snr(betas) if s.rescale_betas_zero_snr else betas


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Shift and scale √ᾱ so that √ᾱ_T = 0 while √ᾱ_0 is kept (Lin et al. 2023, arXiv:2305.08891, Alg. 1)."""
    sqrt_ac = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ac[0].clone(), sqrt_ac[-1].clone()
    sqrt_ac = (sqrt_ac - last) * (first / (first - last))
    ac = sqrt_ac**2
    alphas = torch.cat([ac[:1], ac[1:] / ac[:-1]])
    return 1.0 - alphas


def alphas_cumprod(schedule: ScheduleConfig) -> Tensor:
    """ᾱ_t = ∏(1 - β), float32, shape (T,)."""
    return torch.cumprod(1.0 - make_betas(schedule), dim=0)


def sigma_alphas_cumprod(schedule: ScheduleConfig) -> Tensor:
    """ᾱ as the σ-parameterised schedulers (Euler family, DPM-Solver, UniPC) hold it: with zero terminal SNR,
    ᾱ_T is clamped to 2⁻²⁴ so that σ_T = √((1-ᾱ_T)/ᾱ_T) stays finite (≈ 4096)."""
    ac = alphas_cumprod(schedule)
    if schedule.rescale_betas_zero_snr:
        ac[-1] = 2**-24
    return ac


def train_sigmas(schedule: ScheduleConfig) -> np.ndarray:
    """σ_t = √((1-ᾱ_t)/ᾱ_t) for every training timestep, float32, ascending in t."""
    ac = sigma_alphas_cumprod(schedule)
    return (((1 - ac) / ac) ** 0.5).numpy()


def add_noise(x0: Tensor, noise: Tensor, t: Tensor | int, schedule: ScheduleConfig) -> Tensor:
    """q(x_t | x_0) = √ᾱ_t x_0 + √(1-ᾱ_t) ε (DDPM eq. 4), with t an integer timestep per sample or shared.

    The x4 upscaler noises its low-res image this way with its own schedule (``ModelConfig.low_res_schedule``).
    """
    ac = alphas_cumprod(schedule).to(device=x0.device, dtype=x0.dtype)
    idx = torch.as_tensor(t, device=x0.device, dtype=torch.long).reshape(-1)
    shape = (-1,) + (1,) * (x0.ndim - 1)
    return ac[idx].sqrt().reshape(shape) * x0 + (1 - ac[idx]).sqrt().reshape(shape) * noise


# --- timestep spacing -------------------------------------------------------------------------------------------
# "Common Diffusion Noise Schedules and Sample Steps are Flawed", Table 2. Each diffusers scheduler spells the
# three spacings slightly differently (rounding, float vs int, N vs N+1 points); the variants below are the ones
# their samplers need, and are named after what they reproduce.


def spaced_timesteps(schedule: ScheduleConfig, steps: int) -> np.ndarray:
    """Integer timesteps, high to low, as DDIMScheduler/PNDMScheduler space them (int64, shape (steps,))."""
    n, spacing = schedule.num_train_timesteps, schedule.timestep_spacing
    if spacing == "linspace":
        return np.linspace(0, n - 1, steps).round()[::-1].astype(np.int64)
    if spacing == "leading":
        return (np.arange(steps) * (n // steps)).round()[::-1].astype(np.int64) + schedule.steps_offset
    if spacing == "trailing":
        return np.round(np.arange(n, 0, -n / steps)).astype(np.int64) - 1
    raise ValueError(f"unknown timestep_spacing {spacing!r}; expected 'leading', 'trailing' or 'linspace'")


def float_timesteps(schedule: ScheduleConfig, steps: int) -> np.ndarray:
    """Timesteps as the Euler-family schedulers space them: float32, and unrounded for linspace."""
    n, spacing = schedule.num_train_timesteps, schedule.timestep_spacing
    if spacing == "linspace":
        return np.linspace(0, n - 1, steps, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        return (np.arange(steps) * (n // steps)).round()[::-1].astype(np.float32) + schedule.steps_offset
    if spacing == "trailing":
        return np.arange(n, 0, -n / steps).round().astype(np.float32) - 1
    raise ValueError(f"unknown timestep_spacing {spacing!r}; expected 'leading', 'trailing' or 'linspace'")


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> np.ndarray:
    """σ_i = (σ_max^{1/ρ} + i/(n-1) (σ_min^{1/ρ} - σ_max^{1/ρ}))^ρ (Karras et al. 2022, eq. 5), float64."""
    ramp = np.linspace(0, 1, steps)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each σ, by linear interpolation in log σ between neighbouring steps."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    lo, hi = log_sigmas[low], log_sigmas[low + 1]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(sigmas.shape)


Steps = Generator[tuple[Tensor, Tensor], Tensor, None]
"""What a sampler's run function returns: it yields (x after a model evaluation, x̂₀) and is sent back the x to
continue from (the caller may have blended an inpainting mask into it)."""


@dataclass(frozen=True)
class Plan:
    """Everything a sampler needs about its schedule, built once before the loop.

    ``timesteps`` are what the UNet sees at each model evaluation (integers for DDIM/PNDM, interpolated floats
    for the Euler family's linspace spacing). ``signal``/``noise`` give the level of the sampler's state x at the
    start of each evaluation, x = signal·x₀ + noise·ε (√ᾱ and √(1-ᾱ) for variance-preserving samplers, 1 and σ for
    the σ-parameterised Euler family); img2img starts and inpainting re-noising use them.
    """

    timesteps: Tensor  # (n,) float32
    signal: Tensor  # (n,) float32
    noise: Tensor  # (n,) float32
    steps: int  # the requested number of inference steps N (n can differ: PNDM n = N+1, Heun n = 2N-1)
    alphas_cumprod: Tensor  # (T,) float32
    # ᾱ that DDIM/PNDM step to after timestep 0: ᾱ_0, or 1 with set_alpha_to_one.
    final_alpha_cumprod: Tensor
    sigmas: Tensor | None = None  # (n+1,) float32, σ per evaluation then the final σ, for σ-space samplers
    init_sigma: float = 1.0  # the txt2img noise multiplier (diffusers' init_noise_sigma)
    order: int = 1  # model evaluations per step, to cut the schedule at an img2img start as diffusers does


def check_timesteps(schedule: ScheduleConfig, steps: int, timesteps: np.ndarray, *, distinct: bool = False) -> None:
    """Refuse schedules that leave the trained range, or (``distinct``) repeat a timestep, which multistep
    solvers divide by the gap of; diffusers would index out of range or return NaN."""
    n = schedule.num_train_timesteps
    where = (
        f"{steps} steps with timestep_spacing={schedule.timestep_spacing!r} and steps_offset={schedule.steps_offset}"
    )
    if timesteps.max() > n - 1 or timesteps.min() < 0:
        raise ValueError(f"{where} give timesteps outside [0, {n - 1}]; use fewer steps or another spacing")
    if distinct and len(np.unique(timesteps)) < len(timesteps):
        raise ValueError(f"{where} repeat a timestep; use fewer steps or another spacing")


def vp_plan(schedule: ScheduleConfig, steps: int, timesteps: np.ndarray, *, order: int = 1) -> Plan:
    """A plan for a variance-preserving sampler that feeds the UNet these integer timesteps."""
    check_timesteps(schedule, steps, timesteps)
    ac = alphas_cumprod(schedule)
    idx = torch.from_numpy(timesteps.astype(np.int64))
    return Plan(
        timesteps=idx.float(),
        signal=ac[idx] ** 0.5,
        noise=(1 - ac[idx]) ** 0.5,
        steps=steps,
        alphas_cumprod=ac,
        final_alpha_cumprod=torch.tensor(1.0) if schedule.set_alpha_to_one else ac[0],
        order=order,
    )
