"""A diffusers folder's scheduler class and settings become our sampler and its options, sampling as
``XScheduler.from_config(config)`` does in diffusers.

One tiny StableDiffusionPipeline (diffusers' ``get_dummy_components`` networks, as ``test_tasks_parity`` types
them, perturbed) is saved by diffusers' ``save_pretrained`` with each scheduler class and settings case; OUR
loader reads the folder and generates with no sampler named, and the image must be diffusers' for the same seed.
Settings we cannot follow are loading notes; a class we lack falls back to the family's sampler, said in a note.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from stablekit.config import SD1, ScheduleConfig
from stablekit.pipelines import Generated, GenerationParams, Pipeline, txt2img
from stablekit.weights.load import CheckpointError
from stablekit.weights.schedulers import sampler_from_diffusers, scheduler_to_diffusers
from tests.oracles import hf_clip_tokenizer, require
from tests.test_samplers import PRED, SD_CONFIG, Model, diffusers_run, ours
from tests.test_tasks_parity import _perturb, _text_encoder, _unet, _vae

diffusers = require("diffusers")

PROMPT = "a red circle on a blue background"
NEGATIVE = "blurry, low quality"
SIZE, STEPS, GUIDANCE, SEED = 32, 4, 6.0, 7
# What a released SD 1.x scheduler config says; each case starts from it, as a model card's swap does.
BASE = SD_CONFIG
ZERO_SNR_V = {"timestep_spacing": "trailing", "rescale_betas_zero_snr": True, "prediction_type": "v_prediction"}

# (diffusers class, settings beyond BASE, our sampler, its options as loaded)
CASES: list[tuple[str, dict[str, Any], str, dict[str, Any]]] = [
    ("PNDMScheduler", {}, "pndm", {}),
    ("DDIMScheduler", {}, "ddim", {}),
    ("DDIMScheduler", ZERO_SNR_V, "ddim", {}),
    (
        "DDIMScheduler",
        {"clip_sample": True, "clip_sample_range": 0.5},
        "ddim",
        {"clip_sample": True, "clip_sample_range": 0.5},
    ),
    ("EulerDiscreteScheduler", {"use_karras_sigmas": True}, "euler", {"karras": True}),
    ("EulerDiscreteScheduler", ZERO_SNR_V, "euler", {}),
    ("EulerAncestralDiscreteScheduler", {}, "euler_a", {}),
    ("HeunDiscreteScheduler", {"use_karras_sigmas": True}, "heun", {"karras": True}),
    ("LMSDiscreteScheduler", {}, "lms", {}),
    ("LMSDiscreteScheduler", {"use_karras_sigmas": True}, "lms_karras", {}),
    ("DPMSolverMultistepScheduler", {}, "dpmpp_2m", {}),
    (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
        "dpmpp_2m_sde_karras",
        {},
    ),
    ("DPMSolverMultistepScheduler", {"solver_order": 1, "timestep_spacing": "leading"}, "dpmpp_2m", {"order": 1}),
    ("DPMSolverMultistepScheduler", {"solver_type": "heun"}, "dpmpp_2m", {"solver_type": "heun"}),
    ("UniPCMultistepScheduler", {}, "unipc", {}),
    # diffusers' KDPM2 keeps every σ, where A1111's DPM2 (our default) drops the smallest one
    ("KDPM2DiscreteScheduler", {}, "dpm_2", {"discard_penultimate": False}),
    ("KDPM2AncestralDiscreteScheduler", {}, "dpm_2_a", {"discard_penultimate": False}),
    (
        "UniPCMultistepScheduler",
        {"solver_order": 3, "use_karras_sigmas": True, "disable_corrector": [1]},
        "unipc",
        {"order": 3, "karras": True, "disable_corrector": (1,)},
    ),
]
IDS = ["-".join([c[2], *(f"{k}={v}" for k, v in c[1].items())]) for c in CASES]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """diffusers' StableDiffusionPipeline on the tiny fixture networks (its scheduler is swapped per case)."""
    root = tmp_path_factory.mktemp("scheduler-configs")
    gen = torch.Generator().manual_seed(1234)
    unet, vae, text = _unet(4), _vae([32, 64]), _text_encoder(openclip=False)
    for m in (unet, vae, text):
        _perturb(m, gen)
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=hf_clip_tokenizer(root / "tokenizer"),
        unet=unet,
        scheduler=diffusers.PNDMScheduler.from_config(BASE),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _folder(ref: Any, cls: str, settings: dict[str, Any], root: Path) -> Path:
    ref.scheduler = getattr(diffusers, cls).from_config(BASE, **settings)
    ref.save_pretrained(root)
    return root


def _images(events: Iterator[Any]) -> np.ndarray:
    return np.stack([np.asarray(im) for e in events if isinstance(e, Generated) for im in e.images]).astype(int)


def _theirs(ref: Any, seeds: list[int]) -> np.ndarray:
    out = ref(
        [PROMPT] * len(seeds),
        negative_prompt=[NEGATIVE] * len(seeds),
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
        output_type="pil",
    ).images
    return np.stack([np.asarray(im) for im in out]).astype(int)


def _params(**kw: Any) -> GenerationParams:
    args: dict[str, Any] = dict(width=SIZE, height=SIZE, steps=STEPS, guidance_scale=GUIDANCE, seed=SEED)
    return GenerationParams(PROMPT, NEGATIVE, **{**args, **kw})


@pytest.mark.parametrize(("cls", "settings", "sampler", "options"), CASES, ids=IDS)
def test_folder_samples_as_its_scheduler(
    reference: Any, tmp_path: Path, cls: str, settings: dict[str, Any], sampler: str, options: dict[str, Any]
) -> None:
    folder = _folder(reference, cls, settings, tmp_path)
    pipe = Pipeline.from_file(folder, device="cpu", dtype=torch.float32)
    assert not any("scheduler" in n for n in pipe.notes), pipe.notes
    cfg = pipe.config
    assert (cfg.default_sampler, dict(cfg.default_sampler_options)) == (sampler, options)
    batch = 2 if sampler in ("euler_a", "dpmpp_2m_sde_karras", "dpm_2_a") else 1  # per-image generators, per-step noise
    got = _images(txt2img(pipe, _params(batch_size=batch)))
    want = _theirs(reference, [SEED + i for i in range(batch)])
    diff = int(np.abs(got - want).max())
    assert diff <= 2, diff


def test_a_class_we_lack_falls_back_with_a_note_naming_it(reference: Any, tmp_path: Path) -> None:
    folder = _folder(reference, "LCMScheduler", {}, tmp_path)
    pipe = Pipeline.from_file(folder, device="cpu", dtype=torch.float32)
    assert pipe.config.default_sampler == "pndm" and pipe.config.default_sampler_options == ()  # SD1's
    assert any("'LCMScheduler'" in n and "pndm" in n for n in pipe.notes), pipe.notes


def _saved(cls: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The scheduler_config.json diffusers writes for ``cls`` with ``settings``."""
    # Settings in the config, not as keyword arguments: a key the class lacks is then kept, as in a swap.
    config: dict[str, Any] = json.loads(getattr(diffusers, cls).from_config({**BASE, **settings}).to_json_string())
    return config


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"solver_order": 3}, "solver_order=3"),
        ({"use_lu_lambdas": True}, "use_lu_lambdas=True"),
        ({"final_sigmas_type": "sigma_min", "algorithm_type": "dpmsolver"}, "final_sigmas_type='sigma_min'"),
        ({"algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min"}, "algorithm_type='sde-dpmsolver'"),
        ({"thresholding": True}, "thresholding=True"),
        ({"lambda_min_clipped": -2.0}, "lambda_min_clipped=-2.0"),
    ],
)
def test_settings_we_cannot_follow_are_notes(settings: dict[str, Any], named: str) -> None:
    notes: list[str] = []
    sampler, _ = sampler_from_diffusers(_saved("DPMSolverMultistepScheduler", settings), "pndm", notes)
    assert sampler.startswith("dpmpp_2m")
    assert len(notes) == 1 and named in notes[0] and "DPMSolverMultistepScheduler" in notes[0], notes


@pytest.mark.parametrize(
    ("cls", "settings", "named"),
    [
        ("PNDMScheduler", {"skip_prk_steps": False}, "skip_prk_steps=False"),
        ("EulerDiscreteScheduler", {"use_exponential_sigmas": True}, "use_exponential_sigmas=True"),
        ("EulerDiscreteScheduler", {"use_karras_sigmas": True, "sigma_max": 10.0}, "sigma_max=10.0"),
        ("HeunDiscreteScheduler", {"clip_sample": True}, "clip_sample=True"),
        ("UniPCMultistepScheduler", {"lower_order_final": False}, "lower_order_final=False"),
        ("UniPCMultistepScheduler", {"predict_x0": False}, "predict_x0=False"),
        ("UniPCMultistepScheduler", {"solver_type": "bh1"}, "solver_type='bh1'"),
        ("DDIMScheduler", {"thresholding": True}, "thresholding=True"),
        ("KDPM2DiscreteScheduler", {"use_karras_sigmas": True}, "use_karras_sigmas=True"),  # rounded timesteps
        ("DPMSolverSDEScheduler", {"noise_sampler_seed": 3}, "noise_sampler_seed=3"),  # one tree for the batch
    ],
)
def test_other_classes_note_what_they_cannot_follow(cls: str, settings: dict[str, Any], named: str) -> None:
    notes: list[str] = []
    sampler_from_diffusers(_saved(cls, settings), "ddim", notes)
    assert len(notes) == 1 and named in notes[0] and cls in notes[0], notes


def test_harmless_values_make_no_note() -> None:
    # lambda_min_clipped below SD's smallest log-SNR clips nothing; DPM-Solver reads other classes' solver types
    # as its own default; a class without zero-SNR ignores the key, as diffusers does.
    for cls, settings in [
        ("DPMSolverMultistepScheduler", {"lambda_min_clipped": -5.1, "solver_type": "bh2"}),
        ("HeunDiscreteScheduler", {"rescale_betas_zero_snr": True}),
    ]:
        notes: list[str] = []
        _, options = sampler_from_diffusers(_saved(cls, settings), "ddim", notes)
        assert notes == []
    assert options == (("rescale_betas_zero_snr", False),)


def test_a_named_sampler_wins_and_takes_none_of_the_folders_settings(reference: Any, tmp_path: Path) -> None:
    """A named sampler, the folder's own included, starts from its own defaults (karras here is the folder's
    setting, not the sampler's); the caller's options still apply, and the command line's --sampler is the same."""
    from PIL import Image

    from stablekit.cli import main

    folder = _folder(reference, "EulerDiscreteScheduler", {"use_karras_sigmas": True}, tmp_path / "folder")
    pipe = Pipeline.from_file(folder, device="cpu", dtype=torch.float32)
    default = _images(txt2img(pipe, _params()))
    for name, options, cls in [
        ("dpmpp_2m", {}, "DPMSolverMultistepScheduler"),
        ("euler", {}, "EulerDiscreteScheduler"),
    ]:
        got = _images(txt2img(pipe, _params(sampler=name, sampler_options=options)))
        reference.scheduler = getattr(diffusers, cls).from_config(BASE)
        assert int(np.abs(got - _theirs(reference, [SEED])).max()) <= 2, name
        assert not np.array_equal(got, default)
    assert np.array_equal(_images(txt2img(pipe, _params(sampler="euler", sampler_options={"karras": True}))), default)
    out = tmp_path / "cli.png"
    args = ["generate", PROMPT, "-n", NEGATIVE, "--model", str(folder), "-W", str(SIZE), "-H", str(SIZE)]
    args += ["--steps", str(STEPS), "--guidance", str(GUIDANCE), "--seed", str(SEED), "--sampler", "dpmpp_2m"]
    assert main([*args, "-o", str(out)]) == 0
    named = _images(txt2img(pipe, _params(sampler="dpmpp_2m")))
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")).astype(int), named[0])


def test_info_shows_the_sampler_and_its_options(reference: Any, tmp_path: Path, capsys: Any) -> None:
    from stablekit.cli import main

    folder = _folder(reference, "UniPCMultistepScheduler", {"solver_order": 3, "use_karras_sigmas": True}, tmp_path)
    assert main(["info", str(folder)]) == 0
    assert "unipc order=3 karras=True" in capsys.readouterr().out


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_our_writer_round_trips_the_sampler_and_options(case: tuple[Any, ...]) -> None:
    cls, _, sampler, options = case
    opts = tuple(options.items())
    cfg = replace(SD1, default_sampler=sampler, default_sampler_options=opts)
    written = json.loads(json.dumps(scheduler_to_diffusers(cfg)))
    assert written["_class_name"] == cls
    notes: list[str] = []
    assert sampler_from_diffusers(written, "ddim", notes) == (sampler, opts) and notes == []
    # and diffusers reads it as the class with those settings
    getattr(diffusers, cls).from_config(written)


@pytest.mark.parametrize(
    ("name", "cls", "config", "options"),
    [
        (
            "ddim",
            "DDIMScheduler",
            {"clip_sample": True, "clip_sample_range": 0.5},
            {"clip_sample": True, "clip_sample_range": 0.5},
        ),
        ("dpmpp_2m", "DPMSolverMultistepScheduler", {"solver_order": 1}, {"order": 1}),
        ("dpmpp_2m", "DPMSolverMultistepScheduler", {"solver_type": "heun"}, {"solver_type": "heun"}),
        (
            "dpmpp_2m_sde",
            "DPMSolverMultistepScheduler",
            {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun"},
            {"solver_type": "heun"},
        ),
        ("unipc", "UniPCMultistepScheduler", {"solver_order": 1}, {"order": 1}),
        ("unipc", "UniPCMultistepScheduler", {"solver_order": 3}, {"order": 3}),
        (
            "unipc",
            "UniPCMultistepScheduler",
            {"solver_order": 3, "disable_corrector": [0, 2]},
            {"order": 3, "disable_corrector": (0, 2)},
        ),
    ],
)
@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("steps", [1, 3, 10])
def test_sampler_options_match_the_scheduler_settings(
    name: str, cls: str, config: dict[str, Any], options: dict[str, Any], prediction: str, steps: int
) -> None:
    """The options the mapping relies on, on test_samplers' closed-form model, to float32 rounding."""
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(steps))
    gen = (lambda: {"generator": torch.Generator().manual_seed(3)}) if "sde" in name else (lambda: {})
    a, b = Model(), Model()
    want = diffusers_run(a, cls, steps, noise, config={**config, "prediction_type": PRED[prediction]}, **gen())
    got = ours(b, name, steps, noise, prediction, **options, **gen())
    assert a.timesteps == b.timesteps
    assert (got - want).abs().max().item() < 1e-5


def test_bad_option_values_fail_before_sampling() -> None:
    from stablekit.diffusion import sample

    for name, options in [("dpmpp_2m", {"order": 3}), ("dpmpp_2m", {"solver_type": "bh1"}), ("unipc", {"order": 4})]:
        m = Model()
        with pytest.raises(ValueError, match="must be one of"):
            sample(m, torch.randn(1, 4, 8, 8), sampler=name, steps=4, schedule=ScheduleConfig(), **options)
        assert m.timesteps == []


def test_a1111_dpm2_is_not_written_as_diffusers_kdpm2() -> None:
    # diffusers' KDPM2 cannot drop the penultimate σ; only the diffusers-read variant is written as that class.
    with pytest.raises(CheckpointError, match="discard_penultimate=False"):
        scheduler_to_diffusers(replace(SD1, default_sampler="dpm_2"))
