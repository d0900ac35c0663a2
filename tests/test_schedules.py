"""Noise schedules against diffusers' schedulers and the LDM closed form."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr as diffusers_rescale

from stablekit.config import SD1, X4_UPSCALER, ScheduleConfig
from stablekit.diffusion import add_noise, alphas_cumprod, make_betas
from stablekit.diffusion.dpmsolver import plan_multistep
from stablekit.diffusion.karras import plan_heun, plan_sigmas
from stablekit.diffusion.schedules import karras_sigmas, sigma_to_t, spaced_timesteps, train_sigmas

BASE = {
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
    "skip_prk_steps": True,
}


def _diffusers_config(s: ScheduleConfig) -> dict[str, object]:
    return {
        **BASE,
        "beta_start": s.beta_start,
        "beta_end": s.beta_end,
        "beta_schedule": s.beta_schedule,
        "timestep_spacing": s.timestep_spacing,
        "rescale_betas_zero_snr": s.rescale_betas_zero_snr,
    }


SCHEDULES = [
    ScheduleConfig(),
    ScheduleConfig(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    X4_UPSCALER.schedule,
    ScheduleConfig(rescale_betas_zero_snr=True),
]


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_betas_and_alphas_cumprod_match_diffusers(schedule: ScheduleConfig) -> None:
    ref = diffusers.DDIMScheduler.from_config(_diffusers_config(schedule))
    assert torch.equal(make_betas(schedule), ref.betas)
    assert torch.equal(alphas_cumprod(schedule), ref.alphas_cumprod)


def test_scaled_linear_is_ldm_linear_within_float32() -> None:
    # LDM's make_beta_schedule("linear"): linspace(√β₀, √β₁, T) squared, in float64.
    ldm = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    ldm_ac = np.cumprod(1 - ldm)
    assert np.allclose(make_betas(SD1.schedule).double().numpy(), ldm, rtol=3e-7, atol=0)
    assert np.allclose(alphas_cumprod(SD1.schedule).double().numpy(), ldm_ac, rtol=3e-6, atol=0)


def test_zero_terminal_snr() -> None:
    plain = make_betas(ScheduleConfig())
    rescaled = make_betas(ScheduleConfig(rescale_betas_zero_snr=True))
    assert torch.equal(rescaled, diffusers_rescale(plain.clone()))
    ac = alphas_cumprod(ScheduleConfig(rescale_betas_zero_snr=True))
    assert ac[-1].item() == 0.0
    assert ac[0].item() == pytest.approx(alphas_cumprod(ScheduleConfig())[0].item(), rel=1e-6)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 2, 7, 10, 50, 333, 999])
def test_timesteps_match_diffusers(spacing: str, steps: int) -> None:
    s = ScheduleConfig(timestep_spacing=spacing)  # type: ignore[arg-type]
    ddim = diffusers.DDIMScheduler.from_config(_diffusers_config(s))
    ddim.set_timesteps(steps)
    if spacing != "leading" or steps < 999:  # leading + offset 1 would index t = 1000 (our error, their crash)
        assert np.array_equal(spaced_timesteps(s, steps), ddim.timesteps.numpy())
    euler = diffusers.EulerDiscreteScheduler.from_config(_diffusers_config(s))
    euler.set_timesteps(steps)
    if spacing != "leading" or steps < 999:
        ours = plan_sigmas(s, steps)
        assert torch.equal(ours.timesteps, euler.timesteps) and torch.equal(ours.sigmas, euler.sigmas)
        assert ours.init_sigma == float(euler.init_noise_sigma)
        heun = diffusers.HeunDiscreteScheduler.from_config(_diffusers_config(s))
        heun.set_timesteps(steps)
        assert torch.equal(plan_heun(s, steps).sigmas, heun.sigmas)
    dpm = diffusers.DPMSolverMultistepScheduler.from_config(_diffusers_config(s))
    dpm.set_timesteps(steps)
    if spacing != "leading" or steps < 499:  # leading: T // (N+1) repeats or overshoots timesteps beyond this
        plan = plan_multistep(s, steps)
        assert torch.equal(plan.timesteps, dpm.timesteps.float()) and torch.equal(plan.sigmas, dpm.sigmas)


@pytest.mark.parametrize("steps", [1, 2, 10, 50])
def test_karras_sigmas(steps: int) -> None:
    train = train_sigmas(ScheduleConfig())
    sig = karras_sigmas(float(train[0]), float(train[-1]), steps)
    assert sig[0] == pytest.approx(train[-1], rel=1e-12)
    if steps > 1:
        assert sig[-1] == pytest.approx(train[0], rel=1e-12)
        assert np.all(np.diff(sig) < 0)
    # ρ = 7: σ^{1/7} is linear in the step index.
    assert np.allclose(np.diff(sig ** (1 / 7), 2), 0, atol=1e-12)
    ref = diffusers.DPMSolverMultistepScheduler.from_config(
        {**BASE, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "use_karras_sigmas": True}
    )
    ref.set_timesteps(steps)
    plan = plan_multistep(ScheduleConfig(timestep_spacing="linspace"), steps, karras=True)
    assert torch.equal(plan.sigmas, ref.sigmas) and torch.equal(plan.timesteps, ref.timesteps.float())


def test_sigma_to_t_inverts_the_training_sigmas() -> None:
    train = train_sigmas(ScheduleConfig())
    idx = np.array([0, 1, 10, 500, 998, 999])
    assert np.allclose(sigma_to_t(train[idx].astype(np.float64), np.log(train)), idx, atol=1e-3)
    mid = np.sqrt(train[10].astype(np.float64) * train[11])  # geometric midpoint = halfway in log σ
    assert sigma_to_t(np.array([mid]), np.log(train))[0] == pytest.approx(10.5, abs=1e-3)


def test_add_noise_matches_ddpm_scheduler_for_the_x4_low_res_image() -> None:
    low = X4_UPSCALER.low_res_schedule
    assert low is not None
    ref = diffusers.DDPMScheduler(
        num_train_timesteps=1000, beta_start=low.beta_start, beta_end=low.beta_end, beta_schedule=low.beta_schedule
    )
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 3, 16, 16, generator=g)
    for t in (torch.tensor([20, 20]), torch.tensor([0, 349])):
        assert torch.equal(add_noise(x0, noise, t, low), ref.add_noise(x0, noise, t))
    assert torch.equal(add_noise(x0, noise, 20, low), ref.add_noise(x0, noise, torch.tensor([20, 20])))
