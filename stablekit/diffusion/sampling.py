"""The sampler registry and :func:`sample`, the one loop every pipeline drives.

A sampler is two pure functions: ``plan(schedule, steps, **options) -> Plan`` (which timesteps, which noise
levels) and a generator ``run(denoiser, x, plan, start, **options)`` that yields the state after each model
evaluation. :func:`sample` resolves names, applies per-call overrides to the model's own schedule settings (as
``XScheduler.from_config(pipe.scheduler.config)`` keeps them), sets up txt2img or img2img starts exactly as
diffusers does, and applies the inpainting mask callback between steps.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, NamedTuple

from torch import Tensor

from stablekit.config import ScheduleConfig
from stablekit.diffusion import ddim, dpmsolver, karras, kdpm
from stablekit.diffusion.denoiser import Denoiser, ModelFn
from stablekit.diffusion.noise import Generator as RandomGenerator
from stablekit.diffusion.schedules import Plan, Steps

Spacing = Literal["leading", "trailing", "linspace"]


class SampleStep(NamedTuple):
    """The state after one model evaluation: x in the diffusers latent scale (the last one is the final latent)
    and the x̂₀ estimate for previews. ``total`` counts model evaluations (N+1 for PLMS, 2N-1 for Heun)."""

    index: int  # type: ignore[assignment]  # the field shadows tuple.index, by the pipeline contract
    total: int
    x: Tensor
    denoised: Tensor


MaskCallback = Callable[[Tensor, Callable[[Tensor], Tensor]], Tensor]
"""``(x, renoise) -> x``, called after every model evaluation. ``renoise(clean)`` noises clean latents (with the
same noise the run started from) to the level x is at, and is the identity after the last step. An inpainting
pipeline returns ``mask * x + (1 - mask) * renoise(init_latents)``, as diffusers' legacy inpainting does."""


@dataclass(frozen=True)
class SamplerInfo:
    name: str
    description: str
    aliases: tuple[str, ...]
    plan: Callable[..., Plan]
    run: Callable[..., Steps]
    plan_options: Mapping[str, Any] = field(default_factory=dict)
    run_options: Mapping[str, Any] = field(default_factory=dict)
    # The values an option may take, where not every value of its type is valid.
    choices: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    # Draws fresh noise each step, so it takes the generator.
    stochastic: bool = False
    # The diffusers class default, used when the schedule leaves timestep_spacing unset.
    default_spacing: Spacing = "linspace"

    @property
    def display_name(self) -> str:
        """A1111's spelling (listed first among the aliases): what PNG metadata readers expect."""
        return self.aliases[0] if self.aliases else self.name


# diffusers' DPMSolverMultistepScheduler settings: solver_order and solver_type.
_DPMPP_OPTIONS = {"order": 2, "solver_type": "midpoint"}
_DPMPP_CHOICES = {"order": (1, 2), "solver_type": ("midpoint", "heun")}


def _uniform_and_karras(
    name: str,
    description: str,
    aliases: tuple[str, ...],
    plan: Callable[..., Plan],
    run: Callable[..., Steps],
    *,
    stochastic: bool = False,
    discard_penultimate: bool | None = None,
) -> tuple[SamplerInfo, SamplerInfo]:
    """A k-diffusion sampler as A1111 lists it: on the model's own σ, and on Karras σ as "<name> Karras".

    ``discard_penultimate`` (DPM2's): plan one step more and drop the smallest σ > 0, as A1111 does by default;
    diffusers' KDPM2 schedulers keep it (the option a diffusers folder loads with)."""
    options = {} if discard_penultimate is None else {"discard_penultimate": discard_penultimate}
    return (
        SamplerInfo(
            name, description, aliases, plan, run, plan_options={"karras": False, **options}, stochastic=stochastic
        ),
        SamplerInfo(
            f"{name}_karras",
            f"{aliases[0]} on the Karras et al. 2022 σ schedule",
            (f"{aliases[0]} Karras",),
            plan,
            run,
            plan_options={"karras": True, **options},
            stochastic=stochastic,
        ),
    )


SAMPLERS: dict[str, SamplerInfo] = {
    s.name: s
    for s in (
        SamplerInfo(
            "ddim",
            "DDIM (Song et al. 2021); eta > 0 adds fresh noise each step (eta=1 is DDPM-like)",
            ("DDIM", "DDIMScheduler"),
            ddim.plan_ddim,
            ddim.sample_ddim,
            run_options={"eta": 0.0, "clip_sample": False, "clip_sample_range": 1.0},
            stochastic=True,
            default_spacing="leading",
        ),
        SamplerInfo(
            "pndm",
            "PLMS / PNDM (Liu et al. 2022), 4th-order linear multistep; the SD 1.x and 2.x-base default",
            ("PLMS", "PNDM", "PNDMScheduler"),
            ddim.plan_plms,
            ddim.sample_plms,
            default_spacing="leading",
        ),
        SamplerInfo(
            "euler",
            "Euler on the probability-flow ODE (Karras et al. 2022)",
            ("Euler", "EulerDiscreteScheduler", "k_euler"),
            karras.plan_sigmas,
            karras.sample_euler,
            plan_options={"karras": False},
        ),
        SamplerInfo(
            "euler_a",
            "Euler ancestral: Euler plus fresh noise each step (k-diffusion)",
            ("Euler a", "Euler ancestral", "EulerAncestralDiscreteScheduler", "k_euler_a"),
            karras.plan_sigmas,
            karras.sample_euler_ancestral,
            stochastic=True,
        ),
        SamplerInfo(
            "heun",
            "Heun's 2nd-order method (Karras et al. 2022), two model evaluations per step",
            ("Heun", "HeunDiscreteScheduler", "k_heun"),
            karras.plan_heun,
            karras.sample_heun,
            plan_options={"karras": False},
        ),
        SamplerInfo(
            "lms",
            "4th-order linear multistep in σ (k-diffusion LMS)",
            ("LMS", "LMSDiscreteScheduler", "k_lms"),
            karras.plan_sigmas,
            karras.sample_lms,
            plan_options={"karras": False},
            run_options={"order": 4},
        ),
        SamplerInfo(
            "lms_karras",
            "LMS on the Karras et al. 2022 σ schedule",
            ("LMS Karras",),
            karras.plan_sigmas,
            karras.sample_lms,
            plan_options={"karras": True},
            run_options={"order": 4},
        ),
        SamplerInfo(
            "dpmpp_2m",
            "DPM-Solver++(2M) (Lu et al. 2022), 2nd-order multistep",
            ("DPM++ 2M", "DPMSolverMultistepScheduler", "dpmsolver++"),
            dpmsolver.plan_multistep,
            dpmsolver.sample_dpmpp_2m,
            plan_options={"karras": False},
            run_options=_DPMPP_OPTIONS,
            choices=_DPMPP_CHOICES,
        ),
        SamplerInfo(
            "dpmpp_2m_karras",
            "DPM-Solver++(2M) on the Karras et al. 2022 σ schedule",
            ("DPM++ 2M Karras",),
            dpmsolver.plan_multistep,
            dpmsolver.sample_dpmpp_2m,
            plan_options={"karras": True},
            run_options=_DPMPP_OPTIONS,
            choices=_DPMPP_CHOICES,
        ),
        SamplerInfo(
            "dpmpp_2m_sde",
            "SDE-DPM-Solver++(2M) (Lu et al. 2022): DPM++ 2M with fresh noise each step",
            ("DPM++ 2M SDE", "sde-dpmsolver++"),
            dpmsolver.plan_multistep,
            partial(dpmsolver.sample_dpmpp_2m, sde=True),
            plan_options={"karras": False},
            run_options=_DPMPP_OPTIONS,
            choices=_DPMPP_CHOICES,
            stochastic=True,
        ),
        SamplerInfo(
            "dpmpp_2m_sde_karras",
            "SDE-DPM-Solver++(2M) on the Karras et al. 2022 σ schedule",
            ("DPM++ 2M SDE Karras",),
            dpmsolver.plan_multistep,
            partial(dpmsolver.sample_dpmpp_2m, sde=True),
            plan_options={"karras": True},
            run_options=_DPMPP_OPTIONS,
            choices=_DPMPP_CHOICES,
            stochastic=True,
        ),
        SamplerInfo(
            "unipc",
            "UniPC (Zhao et al. 2023), predictor-corrector multistep, good at 5-10 steps",
            ("UniPC", "UniPCMultistepScheduler"),
            dpmsolver.plan_multistep,
            dpmsolver.sample_unipc,
            plan_options={"karras": False},
            run_options={"order": 2, "disable_corrector": ()},
            choices={"order": (1, 2, 3)},
        ),
        *_uniform_and_karras(
            "dpm_2",
            "DPM2 (k-diffusion): Karras et al. 2022 Alg. 2 with DPM-Solver-2 midpoint steps, two evaluations per step",
            ("DPM2", "KDPM2DiscreteScheduler", "k_dpm_2"),
            kdpm.plan_dpm_2,
            kdpm.sample_dpm_2,
            discard_penultimate=True,
        ),
        *_uniform_and_karras(
            "dpm_2_a",
            "DPM2 ancestral (k-diffusion): DPM2 steps plus fresh noise each step",
            ("DPM2 a", "KDPM2AncestralDiscreteScheduler", "k_dpm_2_a"),
            kdpm.plan_dpm_2_ancestral,
            kdpm.sample_dpm_2_ancestral,
            discard_penultimate=True,
            stochastic=True,
        ),
        *_uniform_and_karras(
            "dpmpp_2s_a",
            "DPM-Solver++(2S) ancestral (Lu et al. 2022, k-diffusion), two evaluations per step",
            ("DPM++ 2S a", "k_dpmpp_2s_a"),
            kdpm.plan_dpmpp_2s_ancestral,
            kdpm.sample_dpmpp_2s_ancestral,
            stochastic=True,
        ),
        *_uniform_and_karras(
            "dpmpp_sde",
            "DPM-Solver++ SDE (k-diffusion), Brownian-tree noise per image seed; needs the [sde] extra (torchsde)",
            ("DPM++ SDE", "DPMSolverSDEScheduler", "k_dpmpp_sde"),
            kdpm.plan_dpmpp_sde,
            kdpm.sample_dpmpp_sde,
            stochastic=True,
        ),
    )
}


def _key(name: str) -> str:
    return re.sub(r"[\s_\-]", "", name.lower())


_BY_KEY = {_key(alias): info.name for info in SAMPLERS.values() for alias in (info.name, *info.aliases)}


def resolve_sampler(name: str) -> str:
    """The canonical name for a canonical, A1111 ("Euler a", "DPM++ 2M Karras") or diffusers class name."""
    found = _BY_KEY.get(_key(name))
    if found is None:
        listing = ", ".join(f"{n} ({', '.join(i.aliases)})" for n, i in SAMPLERS.items())
        raise ValueError(f"unknown sampler {name!r}; valid names: {listing}")
    return found


_SCHEDULE_FIELDS = {f.name for f in dataclasses.fields(ScheduleConfig)}
# diffusers' scheduler-config spellings, accepted so a scheduler_config.json can be passed through.
_RENAMED = {"prediction_type": "prediction", "use_karras_sigmas": "karras"}
_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "eps": "eps", "v": "v"}


def _split_overrides(
    info: SamplerInfo, schedule: ScheduleConfig, overrides: Mapping[str, Any]
) -> tuple[ScheduleConfig, dict[str, Any], dict[str, Any]]:
    sched: dict[str, Any] = {}
    plan_opts, run_opts = dict(info.plan_options), dict(info.run_options)
    for raw_key, value in overrides.items():
        if value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"sampler option {raw_key!r} must be a finite number, got {value}")
        if raw_key == "eta" and value < 0:
            raise ValueError(f"eta must be >= 0 (0 = deterministic DDIM, 1 = DDPM-like), got {value}")
        allowed = info.choices.get(raw_key)
        if allowed is not None and (isinstance(value, bool) or value not in allowed):
            raise ValueError(f"sampler {info.name!r} option {raw_key} must be one of {list(allowed)}, got {value!r}")
        key = _RENAMED.get(raw_key, raw_key)
        if key == "prediction":
            if value not in _PREDICTIONS:
                raise ValueError(f"unknown prediction type {value!r}; expected one of {sorted(_PREDICTIONS)}")
            value = _PREDICTIONS[value]
        if key in _SCHEDULE_FIELDS:
            sched[key] = value
        elif key in plan_opts:
            plan_opts[key] = value
        elif key in run_opts:
            run_opts[key] = value
        else:
            valid = sorted(_SCHEDULE_FIELDS | set(plan_opts) | set(run_opts))
            raise ValueError(f"sampler {info.name!r} has no option {raw_key!r}; valid options: {valid}")
    if schedule.timestep_spacing is None and "timestep_spacing" not in sched:
        sched["timestep_spacing"] = info.default_spacing
    return dataclasses.replace(schedule, **sched), plan_opts, run_opts


def _start(steps: int, strength: float) -> int:
    """First step of an img2img run, as diffusers' ``get_timesteps``: skip the first N - int(N·strength)."""
    kept = min(int(steps * strength), steps)
    if kept < 1:
        raise ValueError(f"strength {strength} with {steps} steps leaves no step to run; raise either")
    return steps - kept


def sample(
    model: ModelFn,
    noise: Tensor,
    *,
    sampler: str,
    steps: int,
    schedule: ScheduleConfig,
    strength: float = 1.0,
    init: Tensor | None = None,
    generator: RandomGenerator = None,
    mask_callback: MaskCallback | None = None,
    **overrides: Any,
) -> Iterator[SampleStep]:
    """Run a sampler from standard-normal ``noise`` (B, C, h, w), yielding a :class:`SampleStep` per evaluation.

    ``init`` (clean latents, already scaled by the VAE factor) with ``strength`` starts part-way as diffusers'
    img2img does; ``generator`` feeds samplers that draw noise per step. ``overrides`` replace a field of
    ``schedule`` (timestep_spacing, steps_offset, prediction, rescale_betas_zero_snr, ...) or set a sampler
    option (eta, karras, ...). Arguments are checked here, before the first step runs.
    """
    info = SAMPLERS[resolve_sampler(sampler)]
    schedule, plan_opts, run_opts = _split_overrides(info, schedule, overrides)
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if steps > schedule.num_train_timesteps:
        raise ValueError(f"steps ({steps}) cannot exceed the {schedule.num_train_timesteps} training timesteps")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    if init is None and strength != 1.0:
        raise ValueError("strength below 1 needs init latents to start from")
    if init is not None and init.shape != noise.shape:
        raise ValueError(f"init latents {tuple(init.shape)} and noise {tuple(noise.shape)} differ in shape")
    plan = info.plan(schedule, steps, **plan_opts)
    if info.stochastic:
        run_opts["generator"] = generator
    den = Denoiser(model, schedule.prediction, noise.dtype)
    noise = noise.float()
    if init is None:
        start, x = 0, noise * plan.init_sigma
    else:
        start = _start(steps, strength) * plan.order
        x = plan.signal[start] * init.float() + plan.noise[start] * noise
    if schedule.prediction == "eps" and bool((plan.signal[start:] == 0).any()):
        raise ValueError(
            "an ε-prediction model cannot denoise at zero SNR (ᾱ_t = 0): rescale_betas_zero_snr needs a "
            "v-prediction model, or a spacing that skips the last timestep ('leading')"
        )
    return _loop(info.run(den, x, plan, start, **run_opts), plan, start, noise, mask_callback)


def _loop(
    run: Steps,
    plan: Plan,
    start: int,
    noise: Tensor,
    mask_callback: MaskCallback | None,
) -> Iterator[SampleStep]:
    n = plan.timesteps.shape[0]
    x, x0 = next(run)
    for i in range(start, n):
        if mask_callback is not None:
            x = mask_callback(x, _renoiser(plan, i + 1, noise))
        yield SampleStep(i - start, n - start, x, x0)
        if i + 1 < n:
            x, x0 = run.send(x)


def _renoiser(plan: Plan, i: int, noise: Tensor) -> Callable[[Tensor], Tensor]:
    if i >= plan.timesteps.shape[0]:
        return lambda clean: clean
    a, s = plan.signal[i], plan.noise[i]
    return lambda clean: a * clean.float() + s * noise
