"""diffusers scheduler configs (``scheduler/scheduler_config.json``): the training schedule they describe, and
the stablekit sampler, with its options, that samples as ``XScheduler.from_config(config)`` does.

A class reads its own settings, taking its class default where the config lacks the key, and ignores the keys of
other classes (diffusers keeps those for a later ``from_config`` of another class). Every setting we sample as
diffusers does becomes a sampler option; any other value is a loading note, never dropped silently.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch

from stablekit.config import ModelConfig, Prediction, ScheduleConfig
from stablekit.diffusion import resolve_sampler
from stablekit.diffusion.schedules import sigma_alphas_cumprod
from stablekit.weights.load import CheckpointError

# Written into the configs we produce; the folder layout has been stable since 0.14.
DIFFUSERS_VERSION = "0.30.0"

PREDICTIONS: dict[str, Prediction] = {"epsilon": "eps", "v_prediction": "v"}
# Sampler -> the scheduler class written for it.
SCHEDULER_CLASSES = {
    "pndm": "PNDMScheduler",
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "lms": "LMSDiscreteScheduler",
    "lms_karras": "LMSDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "dpmpp_2m_karras": "DPMSolverMultistepScheduler",
    "dpmpp_2m_sde": "DPMSolverMultistepScheduler",
    "dpmpp_2m_sde_karras": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    # Only with discard_penultimate=False, what these classes do (see scheduler_to_diffusers).
    "dpm_2": "KDPM2DiscreteScheduler",
    "dpm_2_karras": "KDPM2DiscreteScheduler",
    "dpm_2_a": "KDPM2AncestralDiscreteScheduler",
    "dpm_2_a_karras": "KDPM2AncestralDiscreteScheduler",
    # Its noise is drawn per image here, one tree for the batch there: read back with a note.
    "dpmpp_sde": "DPMSolverSDEScheduler",
    "dpmpp_sde_karras": "DPMSolverSDEScheduler",
}

_SIGMA_KINDS = {"use_exponential_sigmas": False, "use_beta_sigmas": False}
# The settings each class reads beyond the training schedule, with its class defaults (diffusers 0.42). Settings
# that only qualify another one left out (sample_max_value without thresholding, ...), as are DPM-Solver's
# lower_order_final and euler_at_final: with the last σ at 0 and order <= 2 they change nothing.
_SETTINGS: dict[str, dict[str, Any]] = {
    "DDIMScheduler": {"clip_sample": True, "clip_sample_range": 1.0, "thresholding": False},
    "PNDMScheduler": {"skip_prk_steps": False},
    "EulerDiscreteScheduler": {
        "use_karras_sigmas": False,
        **_SIGMA_KINDS,
        "interpolation_type": "linear",
        "timestep_type": "discrete",
        "final_sigmas_type": "zero",
    },
    "EulerAncestralDiscreteScheduler": {},
    "HeunDiscreteScheduler": {"use_karras_sigmas": False, **_SIGMA_KINDS, "clip_sample": False},
    "LMSDiscreteScheduler": {"use_karras_sigmas": False, **_SIGMA_KINDS},
    "DPMSolverMultistepScheduler": {
        "algorithm_type": "dpmsolver++",
        "solver_order": 2,
        "solver_type": "midpoint",
        "use_karras_sigmas": False,
        **_SIGMA_KINDS,
        "use_lu_lambdas": False,
        "use_flow_sigmas": False,
        "final_sigmas_type": "zero",
        "lambda_min_clipped": -math.inf,
        "variance_type": None,
        "thresholding": False,
        "use_dynamic_shifting": False,
    },
    "KDPM2DiscreteScheduler": {"use_karras_sigmas": False, **_SIGMA_KINDS},
    "KDPM2AncestralDiscreteScheduler": {"use_karras_sigmas": False, **_SIGMA_KINDS},
    "DPMSolverSDEScheduler": {"use_karras_sigmas": False, **_SIGMA_KINDS, "noise_sampler_seed": None},
    "UniPCMultistepScheduler": {
        "solver_order": 2,
        "solver_type": "bh2",
        "use_karras_sigmas": False,
        "disable_corrector": [],
        "lower_order_final": True,
        "predict_x0": True,
        "solver_p": None,
        **_SIGMA_KINDS,
        "use_flow_sigmas": False,
        "final_sigmas_type": "zero",
        "thresholding": False,
        "use_dynamic_shifting": False,
        "shift_terminal": None,
    },
}
# Classes without rescale_betas_zero_snr: diffusers keeps the key for other classes and samples without it.
_NO_ZERO_SNR = (
    "PNDMScheduler",
    "HeunDiscreteScheduler",
    "LMSDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "DPMSolverSDEScheduler",
)
# The one value of a setting we sample as diffusers does, where it is not the class default.
_SUPPORTED = {"skip_prk_steps": True}
# diffusers' own fall-backs: solver types of the other multistep classes are read as the class default.
_SOLVER_TYPES = {
    "DPMSolverMultistepScheduler": {
        "midpoint": "midpoint",
        "heun": "heun",
        **dict.fromkeys(("logrho", "bh1", "bh2"), "midpoint"),
    },
    # bh1 is not among ours: with the last σ at 0 diffusers' own bh1 ends in NaN (0 x -inf in the final update).
    "UniPCMultistepScheduler": {"bh2": "bh2", **dict.fromkeys(("midpoint", "heun", "logrho"), "bh2")},
}


def schedule_from_diffusers(d: Mapping[str, Any], base: ScheduleConfig) -> ScheduleConfig:
    """A ``scheduler_config.json``; betas it lacks keep ``base``'s values, sampler settings the class default."""
    prediction = d.get("prediction_type", "epsilon")
    if prediction not in PREDICTIONS:
        raise CheckpointError(f"scheduler prediction_type {prediction!r} is not supported (epsilon or v_prediction)")
    schedule = d.get("beta_schedule", base.beta_schedule)
    if schedule not in ("scaled_linear", "linear"):
        raise CheckpointError(f"scheduler beta_schedule {schedule!r} is not supported")
    if d.get("trained_betas") is not None:
        raise CheckpointError("scheduler trained_betas (an explicit beta list) is not supported")
    spacing = d.get("timestep_spacing")
    if spacing not in (None, "leading", "trailing", "linspace"):
        raise CheckpointError(f"scheduler timestep_spacing {spacing!r} is not supported")
    return replace(
        base,
        beta_start=float(d.get("beta_start", base.beta_start)),
        beta_end=float(d.get("beta_end", base.beta_end)),
        beta_schedule=schedule,
        num_train_timesteps=int(d.get("num_train_timesteps", base.num_train_timesteps)),
        prediction=PREDICTIONS[prediction],
        timestep_spacing=spacing,
        steps_offset=int(d.get("steps_offset", 0)),
        # DDIM's class default (PNDM's is false); SD configs always say false.
        set_alpha_to_one=bool(d.get("set_alpha_to_one", d.get("_class_name") == "DDIMScheduler")),
        rescale_betas_zero_snr=bool(d.get("rescale_betas_zero_snr", False)),
    )


def schedule_to_diffusers(s: ScheduleConfig, class_name: str) -> dict[str, Any]:
    d: dict[str, Any] = {
        "_class_name": class_name,
        "_diffusers_version": DIFFUSERS_VERSION,
        "beta_start": s.beta_start,
        "beta_end": s.beta_end,
        "beta_schedule": s.beta_schedule,
        "num_train_timesteps": s.num_train_timesteps,
        "prediction_type": "v_prediction" if s.prediction == "v" else "epsilon",
        "steps_offset": s.steps_offset,
        "set_alpha_to_one": s.set_alpha_to_one,
        "clip_sample": False,
        "skip_prk_steps": True,
        "rescale_betas_zero_snr": s.rescale_betas_zero_snr,
    }
    if s.timestep_spacing is not None:
        d["timestep_spacing"] = s.timestep_spacing
    return d


Options = tuple[tuple[str, Any], ...]


def sampler_from_diffusers(sched: Mapping[str, Any], default: str, notes: list[str]) -> tuple[str, Options]:
    """The sampler and its options for a scheduler config's class and settings. A class we have no sampler of
    its kind for gives ``default`` (no options); that, and every setting we cannot follow, is said in ``notes``."""
    cls = str(sched.get("_class_name", ""))
    defaults = _SETTINGS.get(cls)
    if defaults is None:
        notes.append(
            f"scheduler class {cls!r} has no stablekit sampler of the same kind; sampling with the family default "
            f"{default} instead, so images differ from diffusers'"
        )
        return default, ()
    s = {k: sched.get(k, v) for k, v in defaults.items()}
    missed: list[str] = []
    sampler, options, used = _translate(cls, s, missed)
    missed += [f"{k}={s[k]!r}" for k, v in defaults.items() if k not in used and s[k] != _SUPPORTED.get(k, v)]
    if s.get("use_karras_sigmas"):
        # Karras σ bounds, read from the config by any class that has the key (diffusers' hasattr).
        missed += [f"{k}={sched[k]!r}" for k in ("sigma_min", "sigma_max") if sched.get(k) is not None]
    if _clips_lambda(cls, sched):
        missed.append(f"lambda_min_clipped={sched['lambda_min_clipped']!r}")
    if cls in _NO_ZERO_SNR and sched.get("rescale_betas_zero_snr"):
        options["rescale_betas_zero_snr"] = False
    if missed:
        notes.append(
            f"scheduler {cls} setting(s) {', '.join(missed)} not supported by stablekit's {sampler} sampler, "
            "so images from this folder differ from diffusers'"
        )
    return sampler, tuple(options.items())


def _translate(cls: str, s: dict[str, Any], missed: list[str]) -> tuple[str, dict[str, Any], set[str]]:
    """(sampler, options, the settings they account for) of a class's settings ``s``; what they cannot follow
    goes to ``missed``."""
    karras = bool(s.get("use_karras_sigmas"))
    if cls == "DDIMScheduler":
        clip = {"clip_sample": True, "clip_sample_range": float(s["clip_sample_range"])} if s["clip_sample"] else {}
        return "ddim", clip, {"clip_sample", "clip_sample_range"}
    if cls in ("EulerDiscreteScheduler", "HeunDiscreteScheduler"):
        name = "euler" if cls == "EulerDiscreteScheduler" else "heun"
        return name, {"karras": True} if karras else {}, {"use_karras_sigmas"}
    if cls == "LMSDiscreteScheduler":
        return "lms_karras" if karras else "lms", {}, {"use_karras_sigmas"}
    if cls == "DPMSolverMultistepScheduler":
        algorithm = str(s["algorithm_type"])
        sde = algorithm.startswith("sde-")
        if algorithm not in ("dpmsolver++", "sde-dpmsolver++"):
            missed.append(f"algorithm_type={algorithm!r} (sampled as {'sde-' if sde else ''}dpmsolver++)")
        options = _multistep_options(cls, s, (1, 2), missed)
        # lambda_min_clipped: see _clips_lambda
        used = {"algorithm_type", "use_karras_sigmas", "solver_order", "solver_type", "lambda_min_clipped"}
        return "dpmpp_2m" + "_sde" * sde + "_karras" * karras, options, used
    if cls == "UniPCMultistepScheduler":
        options = _multistep_options(cls, s, (1, 2, 3), missed)
        if karras:
            options["karras"] = True
        if s["disable_corrector"]:
            options["disable_corrector"] = tuple(int(i) for i in s["disable_corrector"])
        return "unipc", options, {"use_karras_sigmas", "disable_corrector", "solver_order", "solver_type"}
    if cls == "EulerAncestralDiscreteScheduler":
        return "euler_a", {}, set()
    if cls in ("KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler"):
        if karras:
            missed.append("use_karras_sigmas=True (diffusers rounds KDPM2's Karras timesteps; k-diffusion does not)")
        name = "dpm_2" if cls == "KDPM2DiscreteScheduler" else "dpm_2_a"
        # diffusers keeps every σ of the schedule, where A1111's DPM2 (our default) drops the smallest.
        return name + "_karras" * karras, {"discard_penultimate": False}, {"use_karras_sigmas"}
    if cls == "DPMSolverSDEScheduler":
        # diffusers draws one Brownian tree for the batch, seeded by this setting or at random; A1111 and we draw
        # one per image, seeded by the image's seed.
        missed.append(f"noise_sampler_seed={s['noise_sampler_seed']!r} (noise comes from per-image seeds here)")
        return "dpmpp_sde" + "_karras" * karras, {}, {"use_karras_sigmas", "noise_sampler_seed"}
    return "pndm", {}, set()  # PNDMScheduler: skip_prk_steps is checked with the settings left over


def _multistep_options(cls: str, s: dict[str, Any], orders: tuple[int, ...], missed: list[str]) -> dict[str, Any]:
    """solver_order and solver_type of DPM-Solver and UniPC as our options (defaults left out)."""
    options: dict[str, Any] = {}
    order = s["solver_order"]
    if order not in orders:
        missed.append(f"solver_order={order!r} (sampled at order 2)")
    elif order != 2:
        options["order"] = order
    written = s["solver_type"]
    solver = _SOLVER_TYPES[cls].get(written)
    if solver is None:
        missed.append(f"solver_type={written!r}")
    elif solver != _SETTINGS[cls]["solver_type"]:
        options["solver_type"] = solver
    return options


def _clips_lambda(cls: str, sched: Mapping[str, Any]) -> bool:
    """Whether DPM-Solver's lambda_min_clipped cuts timesteps off this schedule (it only does above min λ)."""
    clip = sched.get("lambda_min_clipped")
    if cls != "DPMSolverMultistepScheduler" or clip is None or not math.isfinite(clip):
        return False
    ac = sigma_alphas_cumprod(schedule_from_diffusers(sched, ScheduleConfig()))
    return bool(clip > (0.5 * torch.log(ac) - 0.5 * torch.log(1 - ac)).min().item())


# Our option -> the diffusers setting written for it.
_WRITTEN = {
    "karras": "use_karras_sigmas",
    "order": "solver_order",
    "solver_type": "solver_type",
    "disable_corrector": "disable_corrector",
    "clip_sample": "clip_sample",
    "clip_sample_range": "clip_sample_range",
}


def scheduler_to_diffusers(config: ModelConfig) -> dict[str, Any]:
    """The ``scheduler_config.json`` of a model: its schedule under the class of its default sampler, with that
    sampler's options as the class's settings, which :func:`sampler_from_diffusers` reads back."""
    cls = SCHEDULER_CLASSES.get(config.default_sampler, "DDIMScheduler")
    d = schedule_to_diffusers(config.schedule, cls)
    if config.default_sampler not in SCHEDULER_CLASSES:
        return d  # not a canonical name: written as DDIM, as ``write_folder``'s model_index.json says
    sampler = resolve_sampler(config.default_sampler)
    if sampler.startswith("dpm_2") and ("discard_penultimate", False) not in config.default_sampler_options:
        raise CheckpointError(
            f"sampler {sampler} drops the penultimate σ as A1111 does, which diffusers' {cls} cannot; "
            "set its option discard_penultimate=False to write it"
        )
    if sampler.startswith("dpmpp_2m"):
        d["algorithm_type"] = "sde-dpmsolver++" if "_sde" in sampler else "dpmsolver++"
    if sampler.endswith("_karras"):
        d["use_karras_sigmas"] = True
    d |= _written(config.default_sampler_options)
    return d


def _written(options: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in options:
        if key == "rescale_betas_zero_snr" or (key == "discard_penultimate" and value is False):
            continue  # only ever False, for classes that ignore the schedule's value / keep every σ anyway
        if key not in _WRITTEN:
            raise CheckpointError(f"sampler option {key!r} has no diffusers scheduler setting to be written as")
        out[_WRITTEN[key]] = list(value) if isinstance(value, tuple) else value
    return out
