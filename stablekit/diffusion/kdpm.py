"""k-diffusion's two-evaluation σ-space samplers, as A1111 offers them: DPM2, DPM2 ancestral, DPM++ 2S ancestral
and DPM++ SDE. Each step evaluates the model at σ_i and at one intermediate σ between σ_i and σ_{i+1} (the step to
σ = 0 is a single Euler evaluation), so N steps make 2N-1 model evaluations, as Heun's.

The step σ and timesteps are the Euler family's (:mod:`stablekit.diffusion.karras`); every intermediate σ is fixed
by the step σ alone, so the plan lists it with its fractional timestep (k-diffusion's log-σ interpolation), and
the samplers redo k-diffusion's arithmetic term for term in float32 on 0-d σ, which keeps them within float32
rounding of ``k_diffusion.sampling``. Ancestral steps use η = 1 and s_noise = 1, A1111's defaults.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from stablekit.config import ScheduleConfig
from stablekit.diffusion.denoiser import Denoiser
from stablekit.diffusion.karras import sigma_plan, sigma_schedule
from stablekit.diffusion.noise import BrownianNoise, randn, require_torchsde
from stablekit.diffusion.noise import Generator as RandomGenerator
from stablekit.diffusion.schedules import Plan, Steps, sigma_to_t, train_sigmas

_R = 0.5  # DPM++ SDE's intermediate point, as a fraction of the log-σ step (k-diffusion's r)


def _t(sigma: Tensor) -> Tensor:
    """k-diffusion's time of the DPM-Solver++ samplers, t = -log σ."""
    return sigma.log().neg()


def _sigma(t: Tensor) -> Tensor:
    return t.neg().exp()


def _ancestral(sigma: Tensor, sigma_next: Tensor) -> tuple[Tensor, Tensor]:
    """(σ_down, σ_up) with σ_down² + σ_up² = σ_next² (k-diffusion's ``get_ancestral_step``, η = 1)."""
    up = min(sigma_next, (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    return (sigma_next**2 - up**2) ** 0.5, up


def _mid_dpm_2(sigma: Tensor, sigma_next: Tensor) -> Tensor:
    return sigma.log().lerp(sigma_next.log(), 0.5).exp()


def _mid_dpm_2_ancestral(sigma: Tensor, sigma_next: Tensor) -> Tensor:
    return _mid_dpm_2(sigma, _ancestral(sigma, sigma_next)[0])


def _mid_dpmpp_2s_ancestral(sigma: Tensor, sigma_next: Tensor) -> Tensor:
    t, t_next = _t(sigma), _t(_ancestral(sigma, sigma_next)[0])
    return _sigma(t + 0.5 * (t_next - t))


def _mid_dpmpp_sde(sigma: Tensor, sigma_next: Tensor) -> Tensor:
    t, t_next = _t(sigma), _t(sigma_next)
    return _sigma(t + (t_next - t) * _R)


def _two_stage_plan(
    schedule: ScheduleConfig,
    steps: int,
    karras: bool,
    mid: Callable[[Tensor, Tensor], Tensor],
    discard_penultimate: bool = False,
) -> Plan:
    # σ per evaluation: σ_0, mid_0, σ_1, mid_1, ..., σ_{N-1}, then the final 0 (2N entries, 2N-1 evaluations).
    ts, sig = sigma_schedule(schedule, steps + int(discard_penultimate), karras)
    if discard_penultimate:
        # A1111's discard_next_to_last_sigma: plan N+1 steps and drop the smallest σ > 0, so that the last
        # second-order step lands nearer 0 instead of spending an evaluation at σ_min.
        ts, sig = ts[:-1], sig[:-1]
    main = torch.from_numpy(np.concatenate([sig, [0.0]]).astype(np.float32))  # (N+1,)
    mids = torch.stack([mid(main[i], main[i + 1]) for i in range(steps - 1)]) if steps > 1 else torch.zeros(0)
    mid_ts = sigma_to_t(mids.double().numpy(), np.log(train_sigmas(schedule)))
    all_sig = torch.stack([main[:-1], torch.cat([mids, main[-1:]])], dim=1).flatten()
    all_ts = np.stack([ts, np.concatenate([mid_ts, [0.0]])], axis=1).flatten()[:-1]
    return sigma_plan(schedule, steps, all_ts, all_sig.numpy(), order=2)


def plan_dpm_2(schedule: ScheduleConfig, steps: int, *, karras: bool = False, discard_penultimate: bool = True) -> Plan:
    return _two_stage_plan(schedule, steps, karras, _mid_dpm_2, discard_penultimate)


def plan_dpm_2_ancestral(
    schedule: ScheduleConfig, steps: int, *, karras: bool = False, discard_penultimate: bool = True
) -> Plan:
    return _two_stage_plan(schedule, steps, karras, _mid_dpm_2_ancestral, discard_penultimate)


def plan_dpmpp_2s_ancestral(schedule: ScheduleConfig, steps: int, *, karras: bool = False) -> Plan:
    return _two_stage_plan(schedule, steps, karras, _mid_dpmpp_2s_ancestral)


def plan_dpmpp_sde(schedule: ScheduleConfig, steps: int, *, karras: bool = False) -> Plan:
    require_torchsde()  # here, so that a missing extra fails before the first model evaluation
    return _two_stage_plan(schedule, steps, karras, _mid_dpmpp_sde)


def _sigmas(plan: Plan) -> Tensor:
    assert plan.sigmas is not None and plan.order == 2, "a two-stage sampler needs its own plan"
    return plan.sigmas


def _next(s: Tensor, i: int) -> Tensor:
    """σ_{k+1} for the step starting at evaluation i (even): two entries on, or the final 0."""
    return s[i + 2] if i + 2 < s.shape[0] else s[i + 1]


def sample_dpm_2(den: Denoiser, x: Tensor, plan: Plan, start: int) -> Steps:
    """DPM2 (k-diffusion's ``sample_dpm_2`` without churn): Karras et al. 2022 Alg. 2 with the DPM-Solver-2 step
    (Lu et al. 2022, arXiv:2206.00927), i.e. the derivative taken at the log-σ midpoint.

    Yields after the first evaluation too: the second one runs on the midpoint state as sent back, while the
    step itself starts from the step's origin (as Heun's corrector)."""
    s, ts, n = _sigmas(plan), plan.timesteps, plan.timesteps.shape[0]
    for i in range(start, n, 2):
        x0 = den.karras(x, ts[i], s[i])
        d = (x - x0) / s[i]
        x_mid = yield x + d * (s[i + 1] - s[i]), x0  # Euler to σ_mid, or to 0 at the last step
        if i + 1 == n:
            return
        x0 = den.karras(x_mid, ts[i + 1], s[i + 1])
        x = yield x + (x_mid - x0) / s[i + 1] * (s[i + 2] - s[i]), x0


def sample_dpm_2_ancestral(
    den: Denoiser, x: Tensor, plan: Plan, start: int, *, generator: RandomGenerator = None
) -> Steps:
    """DPM2 ancestral (k-diffusion's ``sample_dpm_2_ancestral``): a DPM2 step down to σ_down, then fresh noise of
    std σ_up; no noise after the last step (the Euler step to 0), so the generator advances as k-diffusion's."""
    s, ts, n = _sigmas(plan), plan.timesteps, plan.timesteps.shape[0]
    for i in range(start, n, 2):
        x0 = den.karras(x, ts[i], s[i])
        down, up = _ancestral(s[i], _next(s, i))
        d = (x - x0) / s[i]
        if i + 1 == n:
            yield x + d * (down - s[i]), x0
            return
        x_mid = yield x + d * (s[i + 1] - s[i]), x0
        x0 = den.karras(x_mid, ts[i + 1], s[i + 1])
        x = x + (x_mid - x0) / s[i + 1] * (down - s[i])
        x = yield x + randn(x.shape, generator, x.device, den.dtype) * up, x0


def sample_dpmpp_2s_ancestral(
    den: Denoiser, x: Tensor, plan: Plan, start: int, *, generator: RandomGenerator = None
) -> Steps:
    """DPM-Solver++(2S) (Lu et al. 2022, arXiv:2211.01095, Alg. 1 with r = 1/2) down to σ_down, then fresh noise
    of std σ_up (k-diffusion's ``sample_dpmpp_2s_ancestral``); the step to 0 is Euler, with no noise."""
    s, ts, n = _sigmas(plan), plan.timesteps, plan.timesteps.shape[0]
    for i in range(start, n, 2):
        x0 = den.karras(x, ts[i], s[i])
        down, up = _ancestral(s[i], _next(s, i))
        if i + 1 == n:
            yield x + (x - x0) / s[i] * (down - s[i]), x0
            return
        t, t_next = _t(s[i]), _t(down)
        h = t_next - t
        x_mid = yield (s[i + 1] / _sigma(t)) * x - (-h * 0.5).expm1() * x0, x0  # s[i+1] = σ(t + h/2)
        x0 = den.karras(x_mid, ts[i + 1], s[i + 1])
        x = (_sigma(t_next) / _sigma(t)) * x - (-h).expm1() * x0
        x = yield x + randn(x.shape, generator, x.device, den.dtype) * up, x0


def sample_dpmpp_sde(den: Denoiser, x: Tensor, plan: Plan, start: int, *, generator: RandomGenerator = None) -> Steps:
    """DPM-Solver++ (stochastic), k-diffusion's ``sample_dpmpp_sde`` with r = 1/2 and η = 1: two ancestral
    DPM-Solver++ sub-steps per step, the second from the step's origin with the two x̂₀ mixed; the step to 0 is
    Euler. Its noise is Brownian (:class:`~stablekit.diffusion.noise.BrownianNoise`, one tree per image over the
    whole schedule, as A1111 builds it even for img2img), so the two sub-steps' noises are consistent."""
    s, ts, n = _sigmas(plan), plan.timesteps, plan.timesteps.shape[0]
    positive = s[s > 0]
    noise = BrownianNoise(x.shape, positive.min(), s.max(), generator)
    fac = 1 / (2 * _R)
    for i in range(start, n, 2):
        x0 = den.karras(x, ts[i], s[i])
        if i + 1 == n:
            yield x + (x - x0) / s[i] * (s[i + 1] - s[i]), x0
            return
        t, t_next = _t(s[i]), _t(s[i + 2])
        t_mid = t + (t_next - t) * _R
        down, up = _ancestral(_sigma(t), _sigma(t_mid))
        t_down = _t(down)
        x_mid = (_sigma(t_down) / _sigma(t)) * x - (t - t_down).expm1() * x0
        x_mid = yield x_mid + noise(_sigma(t), _sigma(t_mid), x.device) * up, x0
        x0_mid = den.karras(x_mid, ts[i + 1], s[i + 1])
        down, up = _ancestral(_sigma(t), _sigma(t_next))
        t_down = _t(down)
        mixed = (1 - fac) * x0 + fac * x0_mid
        x = (_sigma(t_down) / _sigma(t)) * x - (t - t_down).expm1() * mixed
        x = yield x + noise(_sigma(t), _sigma(t_next), x.device) * up, x0_mid
