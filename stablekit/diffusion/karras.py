"""σ-space samplers (Karras et al. 2022, arXiv:2206.00364, the k-diffusion family): Euler, Euler ancestral,
Heun and LMS. The state is x = x₀ + σ·ε; the UNet sees x/√(σ²+1) at the (fractional) timestep of σ.

Schedules follow diffusers' Euler-family schedulers: σ is interpolated in float64 numpy from the float32 ᾱ at
timesteps spaced as floats (so linspace spacing feeds the UNet fractional timesteps), then stored as float32.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from stablekit.config import ScheduleConfig
from stablekit.diffusion.denoiser import Denoiser
from stablekit.diffusion.noise import Generator as RandomGenerator
from stablekit.diffusion.noise import randn
from stablekit.diffusion.schedules import (
    Plan,
    Steps,
    check_timesteps,
    float_timesteps,
    karras_sigmas,
    sigma_alphas_cumprod,
    sigma_to_t,
    train_sigmas,
)


def sigma_schedule(schedule: ScheduleConfig, steps: int, karras: bool) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, σ) per step, high to low, before the final σ = 0 is appended."""
    ts = float_timesteps(schedule, steps)
    check_timesteps(schedule, steps, ts)
    train = train_sigmas(schedule)
    sig = np.interp(ts, np.arange(len(train)), train)
    if karras:
        # Karras σ span the σ range the spaced schedule covers; each σ gets its fractional timestep.
        sig = karras_sigmas(sig[-1].item(), sig[0].item(), steps)
        ts = sigma_to_t(sig, np.log(train))
    return ts, sig


def sigma_plan(schedule: ScheduleConfig, steps: int, ts: np.ndarray, sig: np.ndarray, order: int = 1) -> Plan:
    """A σ-space plan evaluating the model at timesteps ``ts`` with σ ``sig`` (one longer: the final σ)."""
    sigmas = torch.from_numpy(np.asarray(sig, dtype=np.float32))
    n = sigmas.shape[0] - 1
    top = sigmas.max()
    # diffusers scales the initial noise by σ_max, or by √(σ_max²+1) for "leading" spacing.
    init = top if schedule.timestep_spacing in ("linspace", "trailing") else (top**2 + 1) ** 0.5
    ac = sigma_alphas_cumprod(schedule)
    return Plan(
        timesteps=torch.from_numpy(np.asarray(ts, dtype=np.float32)),
        signal=torch.ones(n),
        noise=sigmas[:n],
        steps=steps,
        alphas_cumprod=ac,
        final_alpha_cumprod=ac[0],
        sigmas=sigmas,
        init_sigma=float(init),
        order=order,
    )


def plan_sigmas(schedule: ScheduleConfig, steps: int, *, karras: bool = False) -> Plan:
    ts, sig = sigma_schedule(schedule, steps, karras)
    return sigma_plan(schedule, steps, ts, np.concatenate([sig, [0.0]]))


def plan_heun(schedule: ScheduleConfig, steps: int, *, karras: bool = False) -> Plan:
    # Every σ but the first and the final 0 appears twice: the Euler predictor lands on it, then the corrector
    # evaluates the model there. 2N-1 evaluations.
    ts, sig = sigma_schedule(schedule, steps, karras)
    sig = np.concatenate([sig, [0.0]]).astype(np.float32)
    sig = np.concatenate([sig[:1], sig[1:-1].repeat(2), sig[-1:]])
    ts = np.concatenate([ts[:1], ts[1:].repeat(2)])
    return sigma_plan(schedule, steps, ts, sig, order=2)


def _sigmas(plan: Plan) -> Tensor:
    assert plan.sigmas is not None, "a σ-space sampler needs a plan with sigmas"
    return plan.sigmas


def sample_euler(den: Denoiser, x: Tensor, plan: Plan, start: int) -> Steps:
    """Euler on the probability-flow ODE dx/dσ = (x - x̂₀)/σ, Karras et al. 2022 Alg. 2 without churn."""
    s = _sigmas(plan)
    for i in range(start, plan.timesteps.shape[0]):
        x0 = den.karras(x, plan.timesteps[i], s[i])
        x = yield x + (x - x0) / s[i] * (s[i + 1] - s[i]), x0


def sample_euler_ancestral(
    den: Denoiser, x: Tensor, plan: Plan, start: int, *, generator: RandomGenerator = None
) -> Steps:
    """Euler ancestral (k-diffusion): an Euler step down to σ_down, then fresh noise of std σ_up, with
    σ_down² + σ_up² = σ_next² (Ho et al. 2020's ancestral step in σ-space)."""
    s = _sigmas(plan)
    for i in range(start, plan.timesteps.shape[0]):
        x0 = den.karras(x, plan.timesteps[i], s[i])
        up = (s[i + 1] ** 2 * (s[i] ** 2 - s[i + 1] ** 2) / s[i] ** 2) ** 0.5
        down = (s[i + 1] ** 2 - up**2) ** 0.5
        x = x + (x - x0) / s[i] * (down - s[i])
        # Drawn at every step, the last included (where σ_up = 0), so the generator advances as diffusers'.
        x = yield x + randn(x.shape, generator, x.device, den.dtype) * up, x0


def sample_heun(den: Denoiser, x: Tensor, plan: Plan, start: int) -> Steps:
    """Heun's 2nd-order method, Karras et al. 2022 Alg. 1; the step to σ = 0 is plain Euler.

    Yields after the predictor too (one yield per evaluation): the corrector's model input is the predicted
    state as sent back, while the update itself starts from the step's origin."""
    s, n = _sigmas(plan), plan.timesteps.shape[0]
    for i in range(start, n, 2):
        x0 = den.karras(x, plan.timesteps[i], s[i])
        d = (x - x0) / s[i]
        dt = s[i + 1] - s[i]
        x_pred = yield x + d * dt, x0
        if i + 1 == n:
            return
        x0 = den.karras(x_pred, plan.timesteps[i + 1], s[i + 1])
        x = yield x + (d + (x_pred - x0) / s[i + 1]) / 2 * dt, x0


def _lms_coefficient(s: np.ndarray, i: int, order: int, j: int) -> float:
    """∫ from σ_i to σ_{i+1} of the Lagrange basis polynomial of node σ_{i-j} over nodes σ_i .. σ_{i-order+1}."""
    basis = np.poly1d([1.0])
    for k in range(order):
        if k != j:
            basis *= np.poly1d([1.0, -s[i - k]]) / (s[i - j] - s[i - k])
    integral = basis.integ()
    return float(integral(s[i + 1]) - integral(s[i]))


def sample_lms(den: Denoiser, x: Tensor, plan: Plan, start: int, *, order: int = 4) -> Steps:
    """Linear multistep (Adams-Bashforth) on dx/dσ with exact Lagrange-polynomial weights (k-diffusion's LMS).

    Like diffusers, the order grows with the position in the full schedule, not with the derivatives in hand:
    an img2img run starting mid-schedule uses the first weights of a higher-order formula at its first steps.
    """
    s = _sigmas(plan)
    s64 = s.double().numpy()
    ds: list[Tensor] = []
    for i in range(start, plan.timesteps.shape[0]):
        x0 = den.karras(x, plan.timesteps[i], s[i])
        ds = [*ds, (x - x0) / s[i]][-order:]
        k = min(i + 1, order)
        coeffs = [_lms_coefficient(s64, i, k, j) for j in range(k)]
        # Fewer derivatives than weights after an img2img start: zip drops the extra weights, as diffusers does.
        x = yield x + sum(c * d for c, d in zip(coeffs, reversed(ds), strict=False)), x0
