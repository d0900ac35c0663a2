"""Exponential-integrator multistep samplers in log-SNR time: DPM-Solver++(2M), its SDE variant, and UniPC.

The state is variance preserving, x = α·x₀ + σ_t·ε with α = 1/√(σ²+1) and σ_t = σ·α for the σ of the plan,
and λ = log(α/σ_t). Schedules and update expressions follow diffusers' DPMSolverMultistepScheduler and
UniPCMultistepScheduler term for term (each coefficient computed from the step's own 0-d float32 σ, in the
same order of operations), which is what keeps them within float32 rounding of it.
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
    karras_sigmas,
    sigma_alphas_cumprod,
    sigma_to_t,
    train_sigmas,
)


def _multistep_timesteps(schedule: ScheduleConfig, steps: int) -> np.ndarray:
    """Integer timesteps as the multistep schedulers space them: N+1 points with the lowest dropped."""
    n, spacing = schedule.num_train_timesteps, schedule.timestep_spacing
    if spacing == "linspace":
        return np.linspace(0, n - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
    if spacing == "leading":
        ratio = n // (steps + 1)
        return (np.arange(steps + 1) * ratio).round()[::-1][:-1].astype(np.int64) + schedule.steps_offset
    if spacing == "trailing":
        return np.arange(n, 0, -n / steps).round().astype(np.int64) - 1
    raise ValueError(f"unknown timestep_spacing {spacing!r}; expected 'leading', 'trailing' or 'linspace'")


def _alpha_sigma(sigma: Tensor) -> tuple[Tensor, Tensor]:
    alpha = 1 / (sigma**2 + 1) ** 0.5
    return alpha, sigma * alpha


def _lambda(sigma: Tensor) -> Tensor:
    alpha, sigma_t = _alpha_sigma(sigma)
    return torch.log(alpha) - torch.log(sigma_t)


def plan_multistep(schedule: ScheduleConfig, steps: int, *, karras: bool = False) -> Plan:
    train = train_sigmas(schedule)
    ts = _multistep_timesteps(schedule, steps)
    if karras:
        sig = karras_sigmas(train[0].item(), train[-1].item(), steps)
        # The UNet gets each Karras σ's timestep rounded to an integer; the σ itself is kept exact.
        ts = sigma_to_t(sig, np.log(train)).round()
    else:
        sig = np.interp(ts, np.arange(len(train)), train)
    check_timesteps(schedule, steps, ts, distinct=not karras)
    sigmas = torch.from_numpy(np.concatenate([sig, [0.0]]).astype(np.float32))
    alpha, sigma_t = _alpha_sigma(sigmas[:-1])
    ac = sigma_alphas_cumprod(schedule)
    return Plan(
        timesteps=torch.from_numpy(ts.astype(np.int64)).float(),
        signal=alpha,
        noise=sigma_t,
        steps=steps,
        alphas_cumprod=ac,
        final_alpha_cumprod=ac[0],
        sigmas=sigmas,
    )


def _sigmas(plan: Plan) -> Tensor:
    assert plan.sigmas is not None, "a multistep sampler needs a plan with sigmas"
    return plan.sigmas


def sample_dpmpp_2m(
    den: Denoiser,
    x: Tensor,
    plan: Plan,
    start: int,
    *,
    sde: bool = False,
    order: int = 2,
    solver_type: str = "midpoint",
    generator: RandomGenerator = None,
) -> Steps:
    """DPM-Solver++(2M), Lu et al. 2022 (arXiv:2211.01095) Alg. 2; with ``sde`` the SDE-DPM-Solver++(2M) of the
    same paper, which injects fresh noise each step.

    First order at the first step (no history yet), at the last (the step to σ = 0) and throughout with
    ``order=1`` (DPM-Solver++1, i.e. DDIM in log-SNR time). ``solver_type`` is the second-order correction's
    form: "midpoint" (the paper's Alg. 2) or "heun", diffusers' two choices."""
    s, n = _sigmas(plan), plan.timesteps.shape[0]
    prev: Tensor | None = None
    for i in range(start, n):
        alpha_s, sigma_s = _alpha_sigma(s[i])
        x0, _ = den.vp(x, plan.timesteps[i], alpha_s, sigma_s)
        alpha_t, sigma_t = _alpha_sigma(s[i + 1])
        h = _lambda(s[i + 1]) - _lambda(s[i])
        noise = randn(x.shape, generator, x.device, torch.float32) if sde else None
        if prev is None or i == n - 1 or order == 1:
            d0, d1 = x0, None
        else:
            r0 = (_lambda(s[i]) - _lambda(s[i - 1])) / h
            d0, d1 = x0, 1.0 / r0 * (x0 - prev)
        if noise is None:
            out = sigma_t / sigma_s * x - alpha_t * (torch.exp(-h) - 1.0) * d0
            if d1 is not None and solver_type == "midpoint":
                out = out - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * d1
            elif d1 is not None:
                out = out + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * d1
        else:
            out = sigma_t / sigma_s * torch.exp(-h) * x + alpha_t * (1 - torch.exp(-2.0 * h)) * d0
            if d1 is not None and solver_type == "midpoint":
                out = out + 0.5 * (alpha_t * (1 - torch.exp(-2.0 * h))) * d1
            elif d1 is not None:
                out = out + (alpha_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0)) * d1
            out = out + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise
        prev = x0
        x = yield out, x0


def _unipc_terms(h: Tensor, rks: Tensor, order: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(h·φ₁, B(h), R, b) of UniPC's linear system for the x₀-prediction form with B(h) = e^{h}-1 ("bh2")."""
    hh = -h
    h_phi_1 = torch.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = torch.expm1(hh)
    rows, rhs = [], []
    factorial = 1
    for i in range(1, order + 1):
        rows.append(torch.pow(rks, i - 1))
        rhs.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return h_phi_1, b_h, torch.stack(rows), torch.stack(rhs)


def _differences(x0s: list[Tensor], s: Tensor, at: list[int], lam0: Tensor, h: Tensor) -> tuple[Tensor, list]:
    """Ratios r_k = (λ_k - λ₀)/h and divided differences (m_k - m₀)/r_k against the newest x̂₀ in ``x0s``."""
    rks, d1s = [], []
    for k, idx in enumerate(at, start=1):
        rk = (_lambda(s[idx]) - lam0) / h
        rks.append(rk)
        d1s.append((x0s[-(k + 1)] - x0s[-1]) / rk)
    rks.append(torch.ones(()))
    return torch.stack(rks), d1s


def _unipc_predict(x0s: list[Tensor], s: Tensor, j: int, x: Tensor, order: int) -> Tensor:
    """UniP-p: from x at σ_j to σ_{j+1} using the last ``order`` x̂₀ (Zhao et al. 2023, Alg. 2)."""
    alpha_t, sigma_t = _alpha_sigma(s[j + 1])
    _, sigma_s0 = _alpha_sigma(s[j])
    lam0 = _lambda(s[j])
    h = _lambda(s[j + 1]) - lam0
    rks, d1s = _differences(x0s, s, [j - i for i in range(1, order)], lam0, h)
    h_phi_1, b_h, rows, rhs = _unipc_terms(h, rks, order)
    out = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * x0s[-1]
    if not d1s:
        return out
    rhos = torch.ones(1) * 0.5 if order == 2 else torch.linalg.solve(rows[:-1, :-1], rhs[:-1])
    return out - alpha_t * b_h * torch.einsum("k,bk...->b...", rhos.to(x.device), torch.stack(d1s, dim=1))


def _unipc_correct(x0s: list[Tensor], s: Tensor, j: int, x_prev: Tensor, x0_new: Tensor, order: int) -> Tensor:
    """UniC: redo the step σ_{j-1} -> σ_j with the model's x̂₀ at σ_j included (Zhao et al. 2023, Alg. 1)."""
    alpha_t, sigma_t = _alpha_sigma(s[j])
    _, sigma_s0 = _alpha_sigma(s[j - 1])
    lam0 = _lambda(s[j - 1])
    h = _lambda(s[j]) - lam0
    rks, d1s = _differences(x0s, s, [j - i - 1 for i in range(1, order)], lam0, h)
    h_phi_1, b_h, rows, rhs = _unipc_terms(h, rks, order)
    rhos = (torch.ones(1) * 0.5 if order == 1 else torch.linalg.solve(rows, rhs)).to(x_prev.device)
    out = sigma_t / sigma_s0 * x_prev - alpha_t * h_phi_1 * x0s[-1]
    corr = torch.einsum("k,bk...->b...", rhos[:-1], torch.stack(d1s, dim=1)) if d1s else 0
    return out - alpha_t * b_h * (corr + rhos[-1] * (x0_new - x0s[-1]))


def sample_unipc(
    den: Denoiser,
    x: Tensor,
    plan: Plan,
    start: int,
    *,
    order: int = 2,
    disable_corrector: tuple[int, ...] = (),
) -> Steps:
    """UniPC with B(h) = e^h - 1, Zhao et al. 2023 (arXiv:2302.04867): each model evaluation first corrects
    the state it was made at (UniC, no extra evaluation), then predicts the next one (UniP). The corrector is
    skipped after the steps listed in ``disable_corrector`` (diffusers' setting of that name)."""
    s, n = _sigmas(plan), plan.timesteps.shape[0]
    x0s: list[Tensor] = []
    x_prev: Tensor | None = None
    last_order = 0
    for j in range(start, n):
        alpha, sigma = _alpha_sigma(s[j])
        x0, _ = den.vp(x, plan.timesteps[j], alpha, sigma)
        if x_prev is not None and j - 1 not in disable_corrector:
            x = _unipc_correct(x0s, s, j, x_prev, x0, last_order)
        x0s = [*x0s, x0][-order:]
        # Lower order while history builds up and towards the end (diffusers' lower_order_final).
        last_order = min(order, n - j, len(x0s))
        x_prev = x
        x = yield _unipc_predict(x0s, s, j, x, last_order), x0
