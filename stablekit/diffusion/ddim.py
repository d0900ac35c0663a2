"""Discrete-time variance-preserving samplers on integer timesteps: DDIM and PLMS (PNDM without the
Runge-Kutta warm-up, as every released SD scheduler config sets ``skip_prk_steps``).

Both step from timestep t to t - T//N whatever the spacing, as diffusers does: with "trailing" or "linspace"
spacing that is not always the next timestep in the list, and reproducing it keeps seeds interchangeable.
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

from stablekit.config import ScheduleConfig
from stablekit.diffusion.denoiser import Denoiser
from stablekit.diffusion.noise import Generator as RandomGenerator
from stablekit.diffusion.noise import randn
from stablekit.diffusion.schedules import Plan, Steps, spaced_timesteps, vp_plan


def _alpha_prev(plan: Plan, t: int) -> Tensor:
    return plan.alphas_cumprod[t] if t >= 0 else plan.final_alpha_cumprod


def plan_ddim(schedule: ScheduleConfig, steps: int) -> Plan:
    return vp_plan(schedule, steps, spaced_timesteps(schedule, steps))


def sample_ddim(
    den: Denoiser,
    x: Tensor,
    plan: Plan,
    start: int,
    *,
    eta: float = 0.0,
    clip_sample: bool = False,
    clip_sample_range: float = 1.0,
    generator: RandomGenerator = None,
) -> Steps:
    """DDIM, Song et al. 2021 (arXiv:2010.02502) eq. 12; eta=1 is DDPM-like ancestral sampling.

    ``clip_sample`` clamps x̂₀ to ±``clip_sample_range`` and keeps ε̂ as predicted, as diffusers' DDIMScheduler
    does (its class default, off in every released SD config)."""
    jump = plan.alphas_cumprod.shape[0] // plan.steps
    for i in range(start, plan.timesteps.shape[0]):
        t = int(plan.timesteps[i])
        a_t, a_prev = plan.alphas_cumprod[t], _alpha_prev(plan, t - jump)
        x0, eps = den.vp(x, plan.timesteps[i], a_t**0.5, (1 - a_t) ** 0.5)
        if clip_sample:
            x0 = x0.clamp(-clip_sample_range, clip_sample_range)
        # σ_t(η) of eq. 16
        std = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
        x = a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * eps
        if eta > 0:
            x = x + std * randn(x.shape, generator, x.device, den.dtype)
        x = yield x, x0


def plan_plms(schedule: ScheduleConfig, steps: int) -> Plan:
    # Ascending spaced timesteps, with the second-highest repeated: the first PLMS step is redone as a
    # second-order (Heun-like) step from the same start, so the UNet runs N+1 times.
    up = spaced_timesteps(schedule, steps)[::-1]
    return vp_plan(schedule, steps, np.concatenate([up[:-1], up[-2:-1], up[-1:]])[::-1].copy())


def _pndm_transfer(x: Tensor, eps: Tensor, a_t: Tensor, a_prev: Tensor) -> Tensor:
    """x_{t-δ} from x_t and ε̂, the transfer φ of Liu et al. 2022 (arXiv:2202.09778) eq. 9."""
    denom = a_t * (1 - a_prev) ** 0.5 + (a_t * (1 - a_t) * a_prev) ** 0.5
    return (a_prev / a_t) ** 0.5 * x - (a_prev - a_t) * eps / denom


def sample_plms(den: Denoiser, x: Tensor, plan: Plan, start: int) -> Steps:
    """PLMS, Liu et al. 2022 (arXiv:2202.09778) eq. 12: Adams-Bashforth on ε̂ with a 2nd-order first step.

    The multistep combination is taken over raw model outputs and converted to ε̂ only at the step being
    taken, as diffusers' PNDMScheduler does (for v-models this differs from combining per-step ε̂ estimates).
    """
    jump = plan.alphas_cumprod.shape[0] // plan.steps
    outs: list[Tensor] = []  # raw outputs used by the multistep formula (the redo's output is not kept)
    x_first = x
    for k, i in enumerate(range(start, plan.timesteps.shape[0])):
        t = int(plan.timesteps[i])
        out = den.raw(x, plan.timesteps[i])
        if k == 1:
            # Redo the first step from its start with the average of the two slopes.
            t, t_prev, x = t + jump, t, x_first
            combined = (out + outs[-1]) / 2
        else:
            t_prev = t - jump
            outs = [*outs[-3:], out]
            if len(outs) == 1:
                combined, x_first = out, x
            elif len(outs) == 2:
                combined = (3 * outs[-1] - outs[-2]) / 2
            elif len(outs) == 3:
                combined = (23 * outs[-1] - 16 * outs[-2] + 5 * outs[-3]) / 12
            else:
                combined = (1 / 24) * (55 * outs[-1] - 59 * outs[-2] + 37 * outs[-3] - 9 * outs[-4])
        a_t, a_prev = plan.alphas_cumprod[t], _alpha_prev(plan, t_prev)
        x0, eps = den.split(combined, x, a_t**0.5, (1 - a_t) ** 0.5)
        x = yield _pndm_transfer(x, eps, a_t, a_prev), x0
