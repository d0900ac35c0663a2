"""diffusers scheduler configs (``scheduler/scheduler_config.json``): the training schedule they describe, and
the stablekit sampler that samples as ``XScheduler.from_config(config)`` does."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from stablekit.config import Prediction, ScheduleConfig
from stablekit.weights.load import CheckpointError

# Written into the configs we produce; the folder layout has been stable since 0.14.
DIFFUSERS_VERSION = "0.30.0"

PREDICTIONS: dict[str, Prediction] = {"epsilon": "eps", "v_prediction": "v"}
# Sampler -> the scheduler class written for it.
SCHEDULER_CLASSES = {"pndm": "PNDMScheduler", "ddim": "DDIMScheduler"}
_SAMPLERS = {cls: name for name, cls in SCHEDULER_CLASSES.items()}


def schedule_from_diffusers(d: Mapping[str, Any], base: ScheduleConfig) -> ScheduleConfig:
    """A ``scheduler_config.json``; betas it lacks keep ``base``'s values, sampler settings the class default."""
    prediction = d.get("prediction_type", "epsilon")
    if prediction not in PREDICTIONS:
        raise CheckpointError(f"scheduler prediction_type {prediction!r} is not supported (epsilon or v_prediction)")
    schedule = d.get("beta_schedule", base.beta_schedule)
    if schedule not in ("scaled_linear", "linear"):
        raise CheckpointError(f"scheduler beta_schedule {schedule!r} is not supported")
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
        # DDIM's and PNDM's class default; SD configs always say false.
        set_alpha_to_one=bool(d.get("set_alpha_to_one", d.get("_class_name") in _SAMPLERS)),
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


def sampler_from_diffusers(sched: Mapping[str, Any], default: str, notes: list[str]) -> str:
    """The sampler for a scheduler config's class (``default`` when we have none of its kind, said in
    ``notes``)."""
    sampler = _SAMPLERS.get(sched.get("_class_name", ""))
    if sched.get("_class_name") == "DDIMScheduler" and sched.get("clip_sample", True):
        # The class default is on; released SD configs all switch it off. Never silently different from diffusers.
        notes.append(
            "scheduler clip_sample is on (x̂₀ clipped to [-1, 1] by diffusers' DDIM); stablekit does not clip, "
            "so DDIM images from this folder differ from diffusers'"
        )
    if sampler is None:
        notes.append(
            f"scheduler class {sched.get('_class_name')!r} has no stablekit sampler of the same kind; "
            f"default sampler {default}"
        )
        return default
    return sampler
