"""The k-diffusion samplers A1111 offers (DPM2, DPM2 a, DPM++ 2S a, DPM++ SDE, each also on Karras σ) against
``k_diffusion.sampling`` itself, on test_samplers' closed-form model wrapped by k-diffusion's own
``CompVisDenoiser`` / ``CompVisVDenoiser`` (its σ -> timestep conversion, its c_in and c_out), as A1111 runs them.

The step σ given to k-diffusion come from diffusers' EulerDiscreteScheduler (the schedule our σ-space samplers
share with it), thinned as A1111 thins DPM2's (one step more, the smallest σ > 0 dropped). Ancestral noise is
injected through k-diffusion's ``noise_sampler`` from per-image generators seeded like ours; DPM++ SDE's is
k-diffusion's ``BrownianTreeNoiseSampler`` seeded with the image seeds, as A1111 builds it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
import types
from typing import Any

import pytest
import torch
from torch import Tensor

from stablekit.config import ScheduleConfig
from stablekit.diffusion import SAMPLERS, resolve_sampler, sample
from stablekit.diffusion.schedules import alphas_cumprod
from tests.oracles import bare_package, import_beside, require
from tests.test_samplers import PRED, SD_CONFIG, SHAPE, Model, diffusers_run, ours

# k-diffusion's own Brownian tree is queried an ulp outside its range (exp(-(-log σ)) != σ); torchsde warns.
pytestmark = pytest.mark.filterwarnings("ignore:Should have :UserWarning")
TOL = 1e-5  # relative to max(1, |x|)
SEEDS = (5, 6)
# (our name, k-diffusion function, drops the penultimate σ as A1111 does, draws noise)
KINDS = [
    ("dpm_2", "sample_dpm_2", True, False),
    ("dpm_2_a", "sample_dpm_2_ancestral", True, True),
    ("dpmpp_2s_a", "sample_dpmpp_2s_ancestral", False, True),
    ("dpmpp_sde", "sample_dpmpp_sde", False, True),
]
NAMES = [k[0] for k in KINDS]


def _torchvision_stand_in() -> dict[str, types.ModuleType]:
    """``k_diffusion.utils`` imports torchvision's functional transforms at module level and never uses them in
    what the samplers call; torchvision cannot be imported beside this torch."""
    functional = types.ModuleType("torchvision.transforms.functional")
    transforms = types.ModuleType("torchvision.transforms")
    transforms.functional = functional  # type: ignore[attr-defined]
    root = types.ModuleType("torchvision")
    root.transforms = transforms  # type: ignore[attr-defined]
    return {"torchvision": root, "torchvision.transforms": transforms, "torchvision.transforms.functional": functional}


def kdiffusion(name: str) -> types.ModuleType:
    """``k_diffusion.<name>`` without its package ``__init__`` (which imports models, training code and
    torchvision); the test fails if the wheel or the libraries ``sampling`` imports are absent."""
    require("torchsde")
    require("torchdiffeq")
    hint = "k-diffusion is not installed; run `make install` (it installs k-diffusion==0.1.1.post1 with --no-deps)"
    bare_package("k_diffusion", hint)
    return import_beside(f"k_diffusion.{name}", _torchvision_stand_in())


class _CompVisModel(torch.nn.Module):
    """What k-diffusion's CompVis wrappers expect of an LDM: ``alphas_cumprod`` and ``apply_model``."""

    def __init__(self, model: Model) -> None:
        super().__init__()
        self.model = model
        self.alphas_cumprod = alphas_cumprod(ScheduleConfig())

    def apply_model(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        return self.model(x, t)


def _step_sigmas(steps: int, karras: bool, discard: bool) -> Tensor:
    """The step σ (N+1, the last 0) from diffusers' EulerDiscreteScheduler, thinned as A1111 thins DPM2's."""
    diffusers = require("diffusers")
    sched = diffusers.EulerDiscreteScheduler.from_config({**SD_CONFIG, "use_karras_sigmas": karras})
    sched.set_timesteps(steps + discard)
    sigmas = sched.sigmas.float()
    return torch.cat([sigmas[:-2], sigmas[-1:]]) if discard else sigmas


def _gens() -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in SEEDS]


def _per_image_randn(gens: list[torch.Generator], shape: torch.Size) -> Tensor:
    """diffusers' ``randn_tensor`` with a generator list: each image its own (1, C, h, w) draw."""
    return torch.cat([torch.randn((1, *shape[1:]), generator=g) for g in gens])


def kdiffusion_run(
    model: Model, kind: tuple[str, str, bool, bool], steps: int, noise: Tensor, prediction: str, karras: bool, **kw: Any
) -> Tensor:
    name, func, discard, stochastic = kind
    sampling, external = kdiffusion("sampling"), kdiffusion("external")
    wrap = external.CompVisVDenoiser if prediction == "v" else external.CompVisDenoiser
    den = wrap(_CompVisModel(model), quantize=False)
    sigmas = _step_sigmas(steps, karras, discard)
    init, strength = kw.get("init"), kw.get("strength", 1.0)
    begin = steps - min(int(steps * strength), steps)  # diffusers' img2img start, as ours
    x = noise * sigmas[0] if init is None else init + noise * sigmas[begin]
    extra: dict[str, Any] = {}
    if name == "dpmpp_sde":
        # A1111's create_noise_sampler: over the whole schedule's σ, even for img2img; one tree per image seed.
        positive = sigmas[sigmas > 0]
        extra["noise_sampler"] = sampling.BrownianTreeNoiseSampler(x, positive.min(), sigmas.max(), seed=list(SEEDS))
    elif stochastic:
        gens = _gens()
        extra["noise_sampler"] = lambda sigma, sigma_next: _per_image_randn(gens, x.shape)
    fn = getattr(sampling, func)
    return fn(den, x, sigmas[begin:], extra_args={"cond": None}, disable=True, **extra)


def _ours(model: Model, name: str, steps: int, noise: Tensor, prediction: str, **kw: Any) -> Tensor:
    stochastic = SAMPLERS[resolve_sampler(name)].stochastic
    return ours(model, name, steps, noise, prediction, **({"generator": _gens()} if stochastic else {}), **kw)


def _check(kind: tuple[str, str, bool, bool], karras: bool, prediction: str, steps: int, **kw: Any) -> None:
    name = kind[0] + "_karras" * karras
    ref_model, our_model = Model(), Model()
    g = torch.Generator().manual_seed(steps)
    noise = torch.randn(SHAPE, generator=g)
    if "strength" in kw:
        kw["init"] = torch.randn(SHAPE, generator=g)
    with torch.no_grad():
        ref = kdiffusion_run(ref_model, kind, steps, noise, prediction, karras, **kw)
    got = _ours(our_model, name, steps, noise, prediction, **kw)
    # k-diffusion finds each timestep from σ in float32, we in float64: equal to ~1e-4 of a timestep.
    assert our_model.timesteps == pytest.approx(ref_model.timesteps, abs=2e-3)
    # float32 rounding grows with |x|: k-diffusion scales the model input by c_in = 1/√(σ²+1), we divide by
    # √(σ²+1), and x̂₀ = x - σ·ε̂ carries that ulp times σ ≈ 15. A 2-step ancestral run ends near |x| ≈ 9.
    assert (got - ref).abs().max().item() < TOL * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("kind", KINDS, ids=NAMES)
@pytest.mark.parametrize("karras", [False, True], ids=["uniform", "karras"])
@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("steps", [1, 2, 10, 30])
def test_txt2img_matches_kdiffusion(
    kind: tuple[str, str, bool, bool], karras: bool, prediction: str, steps: int
) -> None:
    _check(kind, karras, prediction, steps)


@pytest.mark.parametrize("kind", KINDS, ids=NAMES)
@pytest.mark.parametrize("karras", [False, True], ids=["uniform", "karras"])
@pytest.mark.parametrize("steps", [4, 25])
def test_img2img_matches_kdiffusion(kind: tuple[str, str, bool, bool], karras: bool, steps: int) -> None:
    _check(kind, karras, "eps", steps, strength=0.6)


@pytest.mark.parametrize(
    ("name", "cls"), [("dpm_2", "KDPM2DiscreteScheduler"), ("dpm_2_a", "KDPM2AncestralDiscreteScheduler")]
)
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize(
    ("steps", "strength"), [(1, 1.0), (2, 1.0), (10, 1.0), (50, 1.0), (2, 0.6), (10, 0.6), (50, 0.6)]
)
def test_keeping_every_sigma_matches_diffusers_kdpm2(
    name: str, cls: str, spacing: str, prediction: str, steps: int, strength: float
) -> None:
    """What a diffusers folder with a KDPM2 scheduler loads as (sampler_from_diffusers), driven as diffusers'
    pipelines drive the class; its uniform σ only (its Karras timesteps are rounded, a loading note)."""
    g = torch.Generator().manual_seed(steps)
    noise, init = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    kw: dict[str, Any] = {"init": init, "strength": strength} if strength < 1 else {}
    gen = (lambda: {"generator": torch.Generator().manual_seed(1234)}) if name == "dpm_2_a" else (lambda: {})
    a, b = Model(), Model()
    config = {"timestep_spacing": spacing, "prediction_type": PRED[prediction]}
    want = diffusers_run(a, cls, steps, noise, config=config, **kw, **gen())
    got = ours(b, name, steps, noise, prediction, timestep_spacing=spacing, discard_penultimate=False, **kw, **gen())
    # diffusers takes the log-σ midpoint as lerp(log σ_next, log σ) and we as k-diffusion does: an ulp apart.
    assert b.timesteps == pytest.approx(a.timesteps, abs=1e-4)
    assert (got - want).abs().max().item() < TOL


@pytest.mark.parametrize("name", [n for n in NAMES if SAMPLERS[n].stochastic])
def test_an_image_does_not_depend_on_its_batch_position(name: str) -> None:
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    both = ours(Model(), name, 8, noise, "eps", generator=_gens())
    alone = ours(Model(), name, 8, noise[1:], "eps", generator=[torch.Generator().manual_seed(SEEDS[1])])
    assert (both[1:] - alone).abs().max().item() < 1e-6
    again = ours(Model(), name, 8, noise, "eps", generator=_gens())
    assert torch.equal(both, again)
    other = ours(Model(), name, 8, noise, "eps", generator=[torch.Generator().manual_seed(s) for s in (7, 8)])
    assert (other - both).abs().max().item() > 1e-3  # the seeds do reach the noise


@pytest.mark.parametrize("name", NAMES)
def test_names_and_karras_twins(name: str) -> None:
    info, twin = SAMPLERS[name], SAMPLERS[f"{name}_karras"]
    assert resolve_sampler(info.display_name) == name
    assert resolve_sampler(f"{info.display_name} Karras") == f"{name}_karras" == twin.name
    assert twin.display_name == f"{info.display_name} Karras"
    assert info.plan_options["karras"] is False and twin.plan_options["karras"] is True
    assert info.stochastic == twin.stochastic and info.run is twin.run


def test_a1111_and_diffusers_names_resolve() -> None:
    for alias, name in [
        ("DPM2", "dpm_2"),
        ("DPM2 a Karras", "dpm_2_a_karras"),
        ("DPM++ 2S a", "dpmpp_2s_a"),
        ("DPM++ SDE Karras", "dpmpp_sde_karras"),
        ("k_dpm_2_a", "dpm_2_a"),
        ("KDPM2DiscreteScheduler", "dpm_2"),
        ("KDPM2AncestralDiscreteScheduler", "dpm_2_a"),
        ("DPMSolverSDEScheduler", "dpmpp_sde"),
    ]:
        assert resolve_sampler(alias) == name


@pytest.mark.parametrize("name", NAMES)
def test_evaluations_and_img2img_start(name: str) -> None:
    # 2N-1 model evaluations; an img2img run at strength 0.5 of 10 steps runs the last 5 steps (2·5-1).
    m = Model()
    assert len(ours(m, name, 10, torch.randn(SHAPE), "eps", **_gen(name))) == SHAPE[0]
    assert len(m.timesteps) == 19
    m = Model()
    ours(m, name, 10, torch.randn(SHAPE), "eps", init=torch.randn(SHAPE), strength=0.5, **_gen(name))
    assert len(m.timesteps) == 9


def _gen(name: str) -> dict[str, Any]:
    return {"generator": _gens()} if SAMPLERS[name].stochastic else {}


@pytest.mark.parametrize("name", ["dpm_2", "dpm_2_a"])
def test_discard_penultimate_is_an_option(name: str) -> None:
    # Without it DPM2 steps through diffusers' KDPM2 σ: a different schedule, the same number of evaluations.
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    a, b = Model(), Model()
    kept = ours(a, name, 6, noise, "eps", discard_penultimate=False, **_gen(name))
    dropped = ours(b, name, 6, noise, "eps", **_gen(name))
    assert len(a.timesteps) == len(b.timesteps) == 11 and a.timesteps != b.timesteps
    assert not torch.allclose(kept, dropped)


def test_missing_torchsde_is_a_one_line_error_naming_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchsde", None)  # `import torchsde` now raises ImportError
    m = Model()
    with pytest.raises(ValueError, match=r"stablekit\[sde\]"):
        sample(m, torch.randn(SHAPE), sampler="DPM++ SDE", steps=4, schedule=ScheduleConfig())
    assert m.timesteps == []


def test_kdiffusion_oracle_is_the_pinned_release() -> None:
    # Fails, never skips, without the oracle; and guards against a silently different k-diffusion.
    kdiffusion("sampling")
    assert importlib.metadata.version("k-diffusion") == "0.1.1.post1"


@pytest.mark.parametrize(
    ("sampler_name", "scheduler", "ran"),
    [
        ("DPM2", None, "dpm_2_karras"),  # A1111 1.9's Automatic is Karras for all four
        ("DPM2 a", "automatic", "dpm_2_a_karras"),
        ("DPM++ 2S a", None, "dpmpp_2s_a_karras"),
        ("DPM++ SDE", None, "dpmpp_sde_karras"),
        ("DPM++ SDE", "Uniform", "dpmpp_sde"),
        ("DPM2 a Karras", "Uniform", "dpm_2_a_karras"),  # the joined name wins, as A1111 splits it
        ("k_dpmpp_2s_a", "uniform", "dpmpp_2s_a"),
    ],
)
def test_a1111_names_run_what_a1111_means(sampler_name: str, scheduler: str | None, ran: str) -> None:
    from stablekit.serve.a1111_samplers import choose, sampler_list

    assert choose(sampler_name, scheduler).ours == ran
    listed = {s["name"]: s for s in sampler_list()}
    assert {"DPM2", "DPM2 a", "DPM++ 2S a", "DPM++ SDE"} <= set(listed)
    assert listed["DPM++ SDE"]["options"] == {"scheduler": "karras"}


@pytest.mark.parametrize(
    ("sampler_name", "field", "value"),
    [("DPM2 a", "eta", 0.5), ("DPM++ SDE", "s_noise", 0.9), ("DPM++ 2S a", "eta", 0.0), ("DPM2", "s_churn", 1.0)],
)
def test_a1111_settings_that_cannot_be_honoured_are_refused(sampler_name: str, field: str, value: float) -> None:
    from stablekit.serve.a1111_samplers import choose, sampler_settings
    from stablekit.serve.wire import ApiError

    settings: dict[str, Any] = {"eta": None, "s_churn": None, "s_noise": None, field: value}
    with pytest.raises(ApiError, match=field):
        sampler_settings(choose(sampler_name, None), **settings)
