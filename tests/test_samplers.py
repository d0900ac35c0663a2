"""Sampler parity with diffusers' schedulers, driven by hand on a closed-form model.

The "model" is a fixed smooth nonlinear function of x and t, read as ε or as v. diffusers' loop is run as its
pipelines run it (``set_timesteps``, ``init_noise_sigma``, ``scale_model_input``, ``step``; img2img through
``get_timesteps`` + ``add_noise``; legacy inpainting by re-noising the init latents after every step), from the
released SD scheduler config plus the option under test and the same noise. Both sides must feed the model the
same timesteps and end within 1e-5 (measured: bit-identical for all but LMS, ~3e-6, whose diffusers weights are
integrated by scipy over float32 arithmetic).
"""

from __future__ import annotations

import contextlib
import io
from typing import Any

import diffusers
import pytest
import torch
from torch import Tensor

from stablekit.cli import main as cli_main
from stablekit.config import ScheduleConfig
from stablekit.diffusion import SAMPLERS, resolve_sampler, sample
from tests.oracles import require

SD_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
    "skip_prk_steps": True,
}
SHAPE = (2, 4, 8, 8)
TOL = 1e-5
PRED = {"eps": "epsilon", "v": "v_prediction"}


class Model:
    """Roughly the size of a real ε (or v) at each t, so samples stay O(1) and 1e-5 is a meaningful bound.
    Records the timesteps it is called with."""

    def __init__(self) -> None:
        self.timesteps: list[float] = []

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        assert t.shape == (x.shape[0],)
        self.timesteps.append(float(t[0]))
        tt = t.float().reshape(-1, 1, 1, 1)
        return 0.95 * (tt / 1000).sqrt() * x + 0.1 * torch.sin(3 * x) * torch.cos(tt / 300)


def diffusers_run(
    model: Model,
    cls: str,
    steps: int,
    noise: Tensor,
    *,
    config: dict[str, Any],
    init: Tensor | None = None,
    strength: float = 1.0,
    mask: Tensor | None = None,
    generator: Any = None,
    **step_kwargs: Any,
) -> Tensor:
    sched = getattr(diffusers, cls).from_config({**SD_CONFIG, **config})
    sched.set_timesteps(steps)
    timesteps = sched.timesteps
    if init is not None:
        kept = min(int(steps * strength), steps)
        begin = (steps - kept) * sched.order
        timesteps = timesteps[begin:]
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(begin)
    if init is None or (mask is not None and strength == 1.0):  # inpainting at strength 1: pure noise
        x = noise * sched.init_noise_sigma
    else:
        x = sched.add_noise(init, noise, timesteps[:1].repeat(noise.shape[0]))
    if generator is not None:
        step_kwargs["generator"] = generator
    for i, t in enumerate(timesteps):
        out = model(sched.scale_model_input(x, t), t.float().reshape(1).expand(x.shape[0]))
        x = sched.step(out, t, x, **step_kwargs).prev_sample
        if mask is not None:  # StableDiffusionInpaintPipeline with a 4-channel UNet
            proper = init
            if i < len(timesteps) - 1:
                proper = sched.add_noise(init, noise, timesteps[i + 1 : i + 2])
            x = (1 - mask) * proper + mask * x
    return x


def ours(model: Model, name: str, steps: int, noise: Tensor, prediction: str, **kw: Any) -> Tensor:
    calls_before = len(model.timesteps)
    x, count = None, 0
    for step in sample(model, noise, sampler=name, steps=steps, schedule=ScheduleConfig(prediction=prediction), **kw):
        assert step.index == count and torch.isfinite(step.x).all() and torch.isfinite(step.denoised).all()
        count += 1
        x = step.x
    assert x is not None and count == step.total == len(model.timesteps) - calls_before
    return x


# (our name, diffusers class, diffusers config beyond SD's, our overrides)
CASES: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = [
    ("ddim", "DDIMScheduler", {}, {}),
    ("ddim", "DDIMScheduler", {"timestep_spacing": "trailing"}, {"timestep_spacing": "trailing"}),
    ("ddim", "DDIMScheduler", {"timestep_spacing": "linspace"}, {"timestep_spacing": "linspace"}),
    (
        "ddim",
        "DDIMScheduler",
        {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"},
        {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"},
    ),
    ("ddim", "DDIMScheduler", {"set_alpha_to_one": True}, {"set_alpha_to_one": True}),
    ("pndm", "PNDMScheduler", {}, {}),
    ("pndm", "PNDMScheduler", {"timestep_spacing": "trailing"}, {"timestep_spacing": "trailing"}),
    ("euler", "EulerDiscreteScheduler", {}, {}),
    ("euler", "EulerDiscreteScheduler", {"timestep_spacing": "leading"}, {"timestep_spacing": "leading"}),
    ("euler", "EulerDiscreteScheduler", {"use_karras_sigmas": True}, {"karras": True}),
    (
        "euler",
        "EulerDiscreteScheduler",
        {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"},
        {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"},
    ),
    ("euler_a", "EulerAncestralDiscreteScheduler", {}, {}),
    ("euler_a", "EulerAncestralDiscreteScheduler", {"timestep_spacing": "leading"}, {"timestep_spacing": "leading"}),
    ("heun", "HeunDiscreteScheduler", {}, {}),
    ("heun", "HeunDiscreteScheduler", {"use_karras_sigmas": True}, {"karras": True}),
    ("lms", "LMSDiscreteScheduler", {}, {}),
    ("lms_karras", "LMSDiscreteScheduler", {"use_karras_sigmas": True}, {}),
    ("dpmpp_2m", "DPMSolverMultistepScheduler", {}, {}),
    ("dpmpp_2m", "DPMSolverMultistepScheduler", {"timestep_spacing": "leading"}, {"timestep_spacing": "leading"}),
    (
        "dpmpp_2m",
        "DPMSolverMultistepScheduler",
        {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"},
        {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"},
    ),
    ("dpmpp_2m_karras", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, {}),
    ("dpmpp_2m_sde", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, {}),
    (
        "dpmpp_2m_sde_karras",
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
        {},
    ),
    ("unipc", "UniPCMultistepScheduler", {}, {}),
    ("unipc", "UniPCMultistepScheduler", {"timestep_spacing": "trailing"}, {"timestep_spacing": "trailing"}),
    ("unipc", "UniPCMultistepScheduler", {"use_karras_sigmas": True}, {"karras": True}),
]
IDS = ["-".join([c[0], *(f"{k}={v}" for k, v in c[3].items())]) for c in CASES]


def _gen(name: str) -> dict[str, Any]:
    """A fresh seeded generator for a sampler that draws noise per step (one per side, same seed)."""
    if not SAMPLERS[resolve_sampler(name)].stochastic:
        return {}
    return {"generator": torch.Generator().manual_seed(1234)}


def _refused(name: str, prediction: str, config: dict[str, Any]) -> bool:
    # DDIM/PNDM keep ᾱ_T = 0 exactly under zero terminal SNR, where ε-prediction cannot denoise; the σ-space
    # and DPM-Solver schedules clamp ᾱ_T to 2⁻²⁴ and run.
    return prediction == "eps" and bool(config.get("rescale_betas_zero_snr")) and name in ("ddim", "pndm")


def _compare(
    name: str,
    cls: str,
    config: dict[str, Any],
    overrides: dict[str, Any],
    prediction: str,
    steps: int,
    noise: Tensor,
    **kw: Any,
) -> None:
    if name.startswith("lms"):
        require("scipy")  # diffusers' LMS integrates its weights with scipy
    ref_model, our_model = Model(), Model()
    ref = diffusers_run(
        ref_model, cls, steps, noise, config={**config, "prediction_type": PRED[prediction]}, **kw, **_gen(name)
    )
    got = ours(our_model, name, steps, noise, prediction, **overrides, **kw, **_gen(name))
    assert our_model.timesteps == ref_model.timesteps
    assert (got - ref).abs().max().item() < TOL


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("steps", [1, 2, 10, 50])
def test_txt2img_parity(case: tuple[Any, ...], prediction: str, steps: int) -> None:
    name, cls, config, overrides = case
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(steps))
    if _refused(name, prediction, config):
        with pytest.raises(ValueError, match="zero SNR"):
            ours(Model(), name, steps, noise, prediction, **overrides)
        return
    _compare(name, cls, config, overrides, prediction, steps, noise)


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("steps", [2, 10, 50])
def test_img2img_parity(case: tuple[Any, ...], prediction: str, steps: int) -> None:
    name, cls, config, overrides = case
    g = torch.Generator().manual_seed(steps)
    noise, init = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    # No refusal here: at strength 0.6 sampling starts below t = T, where ᾱ > 0 even under zero terminal SNR.
    _compare(name, cls, config, overrides, prediction, steps, noise, init=init, strength=0.6)


INPAINT = [
    "DDIMScheduler",
    "PNDMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "UniPCMultistepScheduler",
]


@pytest.mark.parametrize("cls", INPAINT)
@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_inpaint_mask_callback_parity(cls: str, strength: float) -> None:
    g = torch.Generator().manual_seed(3)
    noise, init = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    mask = (torch.rand(SHAPE[0], 1, *SHAPE[2:], generator=g) > 0.5).float()
    ref = diffusers_run(Model(), cls, 10, noise, config={}, init=init, strength=strength, mask=mask, **_gen(cls))

    def blend(x: Tensor, renoise: Any) -> Tensor:
        return (1 - mask) * renoise(init) + mask * x

    # diffusers' inpainting starts from pure noise at strength 1 and from noised init latents below it.
    start = {"init": init, "strength": strength} if strength < 1 else {}
    got = ours(Model(), cls, 10, noise, "eps", mask_callback=blend, **start, **_gen(cls))
    assert (got - ref).abs().max().item() < TOL


def test_ddim_eta_draws_noise_as_diffusers() -> None:
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    ref = diffusers_run(
        Model(), "DDIMScheduler", 10, noise, config={}, generator=torch.Generator().manual_seed(7), eta=0.7
    )
    got = ours(Model(), "DDIM", 10, noise, "eps", eta=0.7, generator=torch.Generator().manual_seed(7))
    assert (got - ref).abs().max().item() < TOL


def test_generator_list_draws_per_sample_as_diffusers() -> None:
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    gens = lambda: [torch.Generator().manual_seed(s) for s in (5, 6)]  # noqa: E731
    ref = diffusers_run(Model(), "EulerAncestralDiscreteScheduler", 10, noise, config={}, generator=gens())
    got = ours(Model(), "Euler a", 10, noise, "eps", generator=gens())
    assert (got - ref).abs().max().item() < TOL


def test_model_default_spacing_follows_the_sampler() -> None:
    # Released scheduler configs carry no timestep_spacing, so each diffusers class uses its own default:
    # leading for DDIM, linspace for Euler (t = 999 first), as `EulerDiscreteScheduler.from_config` gives.
    for name, first in (("ddim", 901.0), ("euler", 999.0)):
        m = Model()
        list(sample(m, torch.randn(SHAPE), sampler=name, steps=10, schedule=ScheduleConfig()))
        assert m.timesteps[0] == first


def test_names_resolve() -> None:
    assert resolve_sampler("DDIM") == "ddim"
    assert resolve_sampler("PLMS") == "pndm"
    assert resolve_sampler("Euler a") == "euler_a"
    assert resolve_sampler("DPM++ 2M Karras") == "dpmpp_2m_karras"
    assert resolve_sampler("dpmsolvermultistepscheduler") == "dpmpp_2m"
    for name, info in SAMPLERS.items():
        assert resolve_sampler(name) == name
        for alias in info.aliases:
            assert resolve_sampler(alias.upper()) == name
    with pytest.raises(ValueError, match="valid names"):
        resolve_sampler("no such sampler")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": 0}, "positive integer"),
        ({"steps": 1001}, "cannot exceed"),
        ({"steps": 1000, "sampler": "ddim"}, "outside"),  # leading + offset 1 would reach t = 1000
        ({"steps": 1000, "sampler": "dpmpp_2m", "timestep_spacing": "leading"}, "repeat a timestep"),
        ({"steps": 999, "sampler": "dpmpp_2m", "timestep_spacing": "leading"}, "outside"),
        ({"steps": 1000, "sampler": "euler", "timestep_spacing": "leading"}, "outside"),
        ({"strength": 1.5, "init": torch.zeros(SHAPE)}, r"\[0, 1\]"),
        ({"strength": -0.1, "init": torch.zeros(SHAPE)}, r"\[0, 1\]"),
        ({"strength": 0.05, "init": torch.zeros(SHAPE)}, "no step"),
        ({"strength": 0.5}, "needs init"),
        ({"init": torch.zeros(1, 4, 8, 8), "strength": 0.5}, "shape"),
        ({"sampler": "nope"}, "valid names"),
        ({"wiggle": 3}, "no option 'wiggle'"),
        ({"prediction": "x0"}, "prediction type"),
    ],
)
def test_bad_arguments_fail_before_sampling(kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"sampler": "euler", "steps": 10, "schedule": ScheduleConfig(), **kwargs}
    m = Model()
    with pytest.raises(ValueError, match=message):
        sample(m, torch.randn(SHAPE), **args)
    assert m.timesteps == []


def test_diffusers_option_spellings() -> None:
    noise = torch.randn(SHAPE)
    a = ours(Model(), "euler", 5, noise, "eps", prediction_type="v_prediction", use_karras_sigmas=True)
    b = ours(Model(), "euler", 5, noise, "v", karras=True)
    assert torch.equal(a, b)


def test_cli_lists_every_sampler_on_one_line() -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli_main(["samplers"]) == 0
    lines = out.getvalue().splitlines()
    assert len(lines) == len(SAMPLERS)
    for line, (name, info) in zip(lines, SAMPLERS.items(), strict=True):
        assert line.startswith(name) and info.description in line
