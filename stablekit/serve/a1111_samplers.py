"""A1111's sampler and schedule-type names -> this package's samplers, with the settings A1111 hands each sampler
(``eta``, ``s_churn``, ``s_noise``), so that a request either runs what A1111 would run or is refused naming the field.

A1111 1.9 and later name a sampler and a schedule type apart ("DPM++ 2M" + "Karras") and still split the joined
names ("DPM++ 2M Karras"), the suffix winning over the ``scheduler`` field. "Automatic" is the sampler's own
default: Karras for DPM++ 2M, DPM++ SDE, DPM++ 2S a, DPM2 and DPM2 a, exponential for DPM++ 2M SDE, the model's
uniform σ schedule for the others. DPM2 and DPM2 a plan one step more and drop the smallest σ > 0, as A1111's do
(its ``discard_next_to_last_sigma``). DDIM,
PLMS and UniPC step through the model's timesteps and ignore the schedule type, as A1111's do; UniPC is this
package's (diffusers' defaults), which A1111's ``uni_pc_*`` settings do not reach.

``eta``: A1111 gives it to the samplers whose function takes one. DDIM honours it (0 when not sent, A1111's
``eta_ddim``). Euler a, DPM2 a, DPM++ 2S a, DPM++ SDE and DPM++ 2M SDE take it in A1111 but run here with eta 1
only (A1111's ``eta_ancestral`` default), so another value is refused. The rest never see it in A1111 either,
and it is ignored.
``s_churn`` reaches Euler, Heun and DPM2 only, and must be 0 (``s_tmin``, ``s_tmax`` and ``s_noise`` change
nothing without churn); ``s_noise`` must be 1 for DPM++ 2M SDE, DPM++ SDE, DPM++ 2S a, DPM2 a and Euler a (A1111
1.10 passes it to the k-diffusion functions of the first four, its derivatives to Euler a too), and is ignored for
the rest. DPM++ SDE needs the ``[sde]`` extra (torchsde); without it, sampling with it fails naming the extra.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from stablekit.diffusion import SAMPLERS
from stablekit.serve.wire import ApiError

Eta = Literal["ddim", "one", "ignored"]


@dataclass(frozen=True)
class A1111Sampler:
    name: str  # A1111's label
    aliases: tuple[str, ...]  # A1111's aliases
    ours: str  # our sampler on the uniform schedule
    automatic: str  # the schedule "Automatic" means: "uniform", "karras", "exponential"; "" ignores schedules
    eta: Eta
    churn: bool = False  # A1111 passes s_churn, s_tmin, s_tmax, s_noise
    noise: bool = False  # A1111 passes s_noise

    @property
    def timesteps(self) -> bool:
        return self.automatic == ""


# In A1111's order, those this package has.
_TABLE = (
    A1111Sampler("DPM++ 2M", ("k_dpmpp_2m",), "dpmpp_2m", "karras", "ignored"),
    A1111Sampler("DPM++ SDE", ("k_dpmpp_sde",), "dpmpp_sde", "karras", "one", noise=True),
    A1111Sampler("DPM++ 2M SDE", ("k_dpmpp_2m_sde",), "dpmpp_2m_sde", "exponential", "one", noise=True),
    A1111Sampler("DPM++ 2S a", ("k_dpmpp_2s_a",), "dpmpp_2s_a", "karras", "one", noise=True),
    A1111Sampler("Euler a", ("k_euler_a", "k_euler_ancestral"), "euler_a", "uniform", "one", noise=True),
    A1111Sampler("Euler", ("k_euler",), "euler", "uniform", "ignored", churn=True),
    A1111Sampler("LMS", ("k_lms",), "lms", "uniform", "ignored"),
    A1111Sampler("Heun", ("k_heun",), "heun", "uniform", "ignored", churn=True),
    A1111Sampler("DPM2", ("k_dpm_2",), "dpm_2", "karras", "ignored", churn=True),
    A1111Sampler("DPM2 a", ("k_dpm_2_a",), "dpm_2_a", "karras", "one", noise=True),
    A1111Sampler("DDIM", ("ddim",), "ddim", "", "ddim"),
    A1111Sampler("PLMS", ("plms",), "pndm", "", "ignored"),
    A1111Sampler("UniPC", ("unipc",), "unipc", "", "ignored"),
)
A1111_SAMPLERS = tuple(s for s in _TABLE if s.ours in SAMPLERS)

# A1111's schedule types (name -> label); only the first three run here.
SCHEDULES = {
    "automatic": "Automatic",
    "uniform": "Uniform",
    "karras": "Karras",
    "exponential": "Exponential",
    "polyexponential": "Polyexponential",
    "sgm_uniform": "SGM Uniform",
    "kl_optimal": "KL Optimal",
    "align_your_steps": "Align Your Steps",
    "simple": "Simple",
    "normal": "Normal",
    "ddim": "DDIM",
    "beta": "Beta",
}
SUPPORTED_SCHEDULES = ("automatic", "uniform", "karras")
_SCHEDULE_KEYS = {k.lower(): name for name, label in SCHEDULES.items() for k in (name, label)} | {
    "sgmuniform": "sgm_uniform"
}
_BY_NAME = {k.lower(): s for s in A1111_SAMPLERS for k in (s.name, *s.aliases)}


@dataclass(frozen=True)
class Choice:
    """What a request's sampler fields resolve to."""

    sampler: A1111Sampler
    schedule: str  # the schedule that ran: "uniform" or "karras"; "" for the timestep samplers
    ours: str
    options: dict[str, Any]


def _refuse(field: str, why: str) -> ApiError:
    return ApiError(400, f"{field}: {why}")


def _listing() -> str:
    names = ", ".join(s.name for s in A1111_SAMPLERS)
    kinds = ", ".join(SCHEDULES[k] for k in SUPPORTED_SCHEDULES)
    return f"samplers here: {names} (schedule types: {kinds})"


def karras_variant(ours: str) -> tuple[str, dict[str, Any]] | None:
    """How ``ours`` runs on Karras σ: a sampler of its own, an option, or not at all."""
    if f"{ours}_karras" in SAMPLERS:
        return f"{ours}_karras", {}
    if "karras" in SAMPLERS[ours].plan_options:
        return ours, {"karras": True}
    return None


def choose(sampler_name: str | None, scheduler: str | None) -> Choice:
    """Resolve A1111's ``sampler_name`` (already ``sampler_name or sampler_index``) and ``scheduler``."""
    name = (sampler_name or "Euler").strip()
    schedule, from_name = "automatic", False
    if scheduler:
        key = _SCHEDULE_KEYS.get(scheduler.strip().lower())
        if key is None:
            raise _refuse("scheduler", f"unknown schedule type {scheduler!r}; {_listing()}")
        schedule = key
    for key, label in SCHEDULES.items():  # "DPM++ 2M Karras" -> "DPM++ 2M" on Karras, as A1111 splits it
        suffix = next((s for s in (label, key) if name.lower().endswith(" " + s.lower())), None)
        if suffix is not None and name[: -len(suffix) - 1].lower() in _BY_NAME:
            name, schedule, from_name = name[: -len(suffix) - 1], key, True
            break
    sampler = _BY_NAME.get(name.lower())
    if sampler is None:
        raise _refuse("sampler_name", f"unknown or unavailable sampler {sampler_name!r}; {_listing()}")
    if sampler.timesteps:  # A1111's timestep samplers never read the schedule type
        return Choice(sampler, "", sampler.ours, {})
    ran = sampler.automatic if schedule == "automatic" else schedule
    if ran == "uniform":
        return Choice(sampler, "uniform", sampler.ours, {})
    variant = karras_variant(sampler.ours) if ran == "karras" else None
    if variant is None:
        how = f"{SCHEDULES[ran]} (what Automatic means for it)" if schedule == "automatic" else SCHEDULES[ran]
        raise _refuse(
            "sampler_name" if from_name else "scheduler",
            f"{sampler.name} on the {how} schedule is not available here; {_listing()}",
        )
    return Choice(sampler, ran, *variant)


def sampler_settings(
    choice: Choice, *, eta: float | None, s_churn: float | None, s_noise: float | None
) -> dict[str, Any]:
    """The sampler options ``eta``/``s_churn``/``s_noise`` add, or a 400 where they would change the image and
    cannot be honoured; values A1111 itself never passes to this sampler are ignored."""
    s = choice.sampler
    options = dict(choice.options)
    if s.eta == "ddim":
        value = 0.0 if eta is None else eta
        if value < 0:
            raise _refuse("eta", f"must be >= 0, got {value}")
        options["eta"] = value
    elif s.eta == "one" and eta is not None and eta != 1:
        raise _refuse("eta", f"{s.name} runs with eta 1 only here (A1111's default), got {eta}")
    if s.churn and s_churn:
        raise _refuse("s_churn", f"{s.name} runs without churn here; send 0, got {s_churn}")
    if s.noise and s_noise is not None and s_noise != 1:
        raise _refuse("s_noise", f"{s.name} runs with s_noise 1 only here (A1111's default), got {s_noise}")
    return options


def sampler_list() -> list[dict[str, Any]]:
    """``GET /sdapi/v1/samplers``: A1111's shape, for the samplers this package has."""
    out = []
    for s in A1111_SAMPLERS:
        options = {} if s.automatic in ("", "uniform") else {"scheduler": s.automatic}
        out.append({"name": s.name, "aliases": list(s.aliases), "options": options})
    return out


def schedule_list() -> list[dict[str, Any]]:
    """``GET /sdapi/v1/schedulers``: A1111's shape, for the schedule types that run here."""
    return [
        {
            "name": key,
            "label": SCHEDULES[key],
            "aliases": None,
            "default_rho": 7.0 if key == "karras" else -1.0,
            "need_inner_model": key == "uniform",
        }
        for key in SUPPORTED_SCHEDULES
    ]
