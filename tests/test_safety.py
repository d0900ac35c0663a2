"""The safety checker against diffusers' ``StableDiffusionSafetyChecker`` and transformers' CLIP preprocessing.

The reference is built from a tiny ``CLIPConfig`` typed in here, given random weights, and its concept
embeddings and thresholds are set from its own image embeddings so that the verdicts are known by
construction: image 0 is flagged by a concept, image 1 by nothing, image 2 only because a special-care concept
fired (its concept score is -0.005 before the 0.01 adjustment), and image 3 sits at the same -0.005 margin
without special care and stays unflagged.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion import safety_checker as safety_checker_module
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker as RefChecker
from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPImageProcessorPil

from stablekit.pipelines import Generated, GenerationParams, Pipeline, txt2img
from stablekit.safety import ClipPreprocess, SafetyChecker, black
from stablekit.weights.safety import CheckpointError, WeightsError, load_safety_checker

EXPECTED = [True, False, True, False]
SIZE = 32


def _tiny_config() -> CLIPConfig:
    return CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 2},
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "patch_size": 4,
            "image_size": SIZE,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
        },
        projection_dim=16,
    )


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(SIZE, SIZE), (45, 37), (37, 61), (50, 50)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def _unit_dual(embeds: torch.Tensor, i: int) -> torch.Tensor:
    """A direction orthogonal to every image embedding but the i-th: cosine 0 with the others."""
    target = torch.zeros(embeds.shape[0], dtype=torch.float64)
    target[i] = 1.0
    return (torch.linalg.pinv(embeds.double()) @ target).float()  # (P,)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[RefChecker, torch.Tensor, Path]:
    torch.manual_seed(0)
    ref = RefChecker(_tiny_config()).eval()
    for p in ref.parameters():
        p.data.normal_(0, 0.3)
    pixels = ClipPreprocess(shortest_edge=SIZE, crop_height=SIZE, crop_width=SIZE)(_images())
    with torch.no_grad():
        embeds = ref.visual_projection(ref.vision_model(pixels)[1])  # (4, 16)
        # A random tiny tower maps all images close to one direction; shrinking that direction 20-fold in
        # visual_projection spreads the embeddings, so cosine margins are wide enough to place thresholds in.
        m = torch.nn.functional.normalize(embeds.mean(dim=0), dim=0)
        shrink = torch.eye(16) - 0.95 * torch.outer(m, m)
        ref.visual_projection.weight.copy_(shrink @ ref.visual_projection.weight)
        embeds = ref.visual_projection(ref.vision_model(pixels)[1])
        concepts = torch.randn(17, 16)
        concept_t = torch.full((17,), 1.5)  # above any cosine: these concepts never fire
        special = torch.randn(3, 16)
        special_t = torch.full((3,), 1.5)
        u0, u2, u3 = _unit_dual(embeds, 0), _unit_dual(embeds, 2), _unit_dual(embeds, 3)

        def cos(i: int, u: torch.Tensor) -> float:
            return float(cosine_distance(embeds[i : i + 1], u[None])[0, 0])

        concepts[0], concept_t[0] = u0, cos(0, u0) - 0.05  # flags image 0 by 0.05
        special[1], special_t[1] = u2, cos(2, u2) - 0.05  # special care fires for image 2
        concepts[5], concept_t[5] = u2, cos(2, u2) + 0.005  # -0.005, +0.005 with the special-care adjustment
        concepts[9], concept_t[9] = u3, cos(3, u3) + 0.005  # -0.005 and no special care: not flagged
        ref.concept_embeds.copy_(concepts)
        ref.concept_embeds_weights.copy_(concept_t)
        ref.special_care_embeds.copy_(special)
        ref.special_care_embeds_weights.copy_(special_t)
    folder = tmp_path_factory.mktemp("safety") / "safety_checker"
    ref.save_pretrained(folder)
    return ref, pixels, folder


def test_verdicts_and_scores_match_diffusers(
    reference: tuple[RefChecker, torch.Tensor, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    ref, pixels, folder = reference
    # diffusers' forward keeps its per-concept scores to itself; a module-level ``round`` that records what it
    # returns captures them: per image, 3 special-care scores then 17 concept scores.
    recorded: list[float] = []

    def recording_round(x: float, ndigits: int) -> float:
        r = round(x, ndigits)
        recorded.append(float(r))
        return r

    monkeypatch.setattr(safety_checker_module, "round", recording_round, raising=False)
    with torch.no_grad():
        _, ref_flags = ref(pixels, np.zeros((4, 8, 8, 3)))
        _, onnx_flags = ref.forward_onnx(pixels, torch.zeros(4, 3, 8, 8))
        ref_embeds = ref.visual_projection(ref.vision_model(pixels)[1])
        ref_special = cosine_distance(ref_embeds, ref.special_care_embeds)
        ref_concept = cosine_distance(ref_embeds, ref.concept_embeds)
    assert ref_flags == EXPECTED  # the construction did what it says
    assert onnx_flags.tolist() == EXPECTED
    ref_scores = torch.tensor(recorded).view(4, 20)

    checker = load_safety_checker(folder)
    scores = checker.model.score(pixels)
    torch.testing.assert_close(scores.special_cos, ref_special, atol=1e-5, rtol=0)
    torch.testing.assert_close(scores.concept_cos, ref_concept, atol=1e-5, rtol=0)
    torch.testing.assert_close(scores.special_scores, ref_scores[:, :3], atol=1e-5, rtol=0)
    torch.testing.assert_close(scores.concept_scores, ref_scores[:, 3:], atol=1e-5, rtol=0)
    assert scores.has_nsfw_concept.tolist() == EXPECTED
    assert scores.special_care.tolist() == [False, False, True, False]
    # The special-care branch changed image 2's verdict: its concept 5 is only over the line by the adjustment.
    raw = ref_concept - ref.concept_embeds_weights
    assert float(raw[2, 5]) < 0 < float(scores.concept_scores[2, 5])
    assert float(scores.concept_scores[3, 9]) < 0
    # ... and, as in diffusers, it also reached the special-care concept after the one that fired.
    assert float(scores.special_scores[2, 2]) == pytest.approx(float(ref_special[2, 2] - 1.5 + 0.01), abs=1e-3)


def test_check_on_pil_images(reference: tuple[RefChecker, torch.Tensor, Path]) -> None:
    ref, _, folder = reference
    checker = load_safety_checker(folder)
    checker.preprocess = ClipPreprocess(shortest_edge=SIZE, crop_height=SIZE, crop_width=SIZE)
    images = _images()
    assert checker.check(images) == EXPECTED
    assert checker.check([]) == []
    out, flags = checker.filter(images)
    assert flags == EXPECTED
    for im, o, f in zip(images, out, flags, strict=True):
        assert o.size == im.size
        assert (np.asarray(o) == 0).all() if f else o is im


def test_single_safetensors_file(reference: tuple[RefChecker, torch.Tensor, Path], tmp_path: Path) -> None:
    ref, pixels, _ = reference
    file = tmp_path / "safety.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(file))
    checker = load_safety_checker(file, num_heads=4)
    cfg = checker.model.config
    assert (cfg.hidden_size, cfg.num_layers, cfg.patch_size, cfg.image_size, cfg.projection_dim) == (32, 2, 4, 32, 16)
    assert checker.model.score(pixels).has_nsfw_concept.tolist() == EXPECTED


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_released_layout_folder(reference: tuple[RefChecker, torch.Tensor, Path], tmp_path: Path, weights: str) -> None:
    """The released folder nests the ViT one ``vision_model.`` deeper and, from old transformers, keeps the
    position ids; the pickle goes through the safe reader."""
    ref, pixels, folder = reference
    state = {
        ("vision_model." + k if k.startswith("vision_model.") else k): v.contiguous()
        for k, v in ref.state_dict().items()
    }
    state["vision_model.vision_model.embeddings.position_ids"] = torch.arange(65)[None]
    assert "vision_model.vision_model.embeddings.class_embedding" in state
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    if weights.endswith(".safetensors"):
        save_file(state, str(tmp_path / weights))
    else:
        torch.save(state, tmp_path / weights)
    assert load_safety_checker(tmp_path).model.score(pixels).has_nsfw_concept.tolist() == EXPECTED


def test_pipeline_folder_reads_feature_extractor(
    reference: tuple[RefChecker, torch.Tensor, Path], tmp_path: Path
) -> None:
    ref, _, _ = reference
    ref.save_pretrained(tmp_path / "safety_checker")
    (tmp_path / "model_index.json").write_text("{}")
    CLIPImageProcessorPil(size={"shortest_edge": 40}, crop_size={"height": 36, "width": 32}).save_pretrained(
        tmp_path / "feature_extractor"
    )
    pre = load_safety_checker(tmp_path).preprocess
    assert (pre.shortest_edge, pre.crop_height, pre.crop_width) == (40, 36, 32)


def test_bad_inputs(tmp_path: Path, reference: tuple[RefChecker, torch.Tensor, Path]) -> None:
    with pytest.raises(CheckpointError):
        load_safety_checker(tmp_path)
    ref, _, _ = reference
    file = tmp_path / "other.safetensors"
    save_file({"visual_projection.weight": torch.zeros(16, 32)}, str(file))
    with pytest.raises(WeightsError):
        load_safety_checker(file)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(file))
    with pytest.raises(WeightsError, match="heads"):
        load_safety_checker(file, num_heads=5)  # 32 wide: 5 heads do not divide it


def test_bad_folder_configs(reference: tuple[RefChecker, torch.Tensor, Path], tmp_path: Path) -> None:
    _, _, folder = reference
    shutil.copy(folder / "model.safetensors", tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text('{"projection_dim": 16}')
    with pytest.raises(CheckpointError, match="vision_config"):
        load_safety_checker(tmp_path)
    (tmp_path / "config.json").write_text('{"vision_config": {"hidden_size": "big"}}')
    with pytest.raises(CheckpointError, match="hidden_size"):
        load_safety_checker(tmp_path)
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    (tmp_path / "preprocessor_config.json").write_text('{"resample": 2}')
    with pytest.raises(CheckpointError, match="resample"):
        load_safety_checker(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text('{"image_mean": [0.5, 0.5]}')
    with pytest.raises(CheckpointError, match="image_mean"):
        load_safety_checker(tmp_path)


@pytest.mark.parametrize("size", [(224, 224), (512, 512), (300, 201), (97, 333), (640, 480), (225, 1000)])
def test_preprocessing_matches_clip_image_processor(size: tuple[int, int]) -> None:
    rng = np.random.default_rng(size[0] * 7 + size[1])
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    ref = CLIPImageProcessorPil()(images=[image], return_tensors="pt")["pixel_values"]
    ours = ClipPreprocess()([image])
    assert ours.shape == ref.shape == (1, 3, 224, 224)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_preprocessing_converts_modes() -> None:
    rgba = Image.new("RGBA", (300, 250), (10, 200, 30, 128))
    ref = CLIPImageProcessorPil()(images=[rgba], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ClipPreprocess()([rgba]), ref, atol=1e-5, rtol=0)


def test_blackout_keeps_size_and_mode() -> None:
    im = black(Image.new("RGB", (13, 7), (255, 255, 255)))
    assert im.size == (13, 7) and im.mode == "RGB" and not np.asarray(im).any()


# --- on a pipeline, the server's Azure answer and the CLI -------------------------------------------------


def _all_or_none(reference: tuple[RefChecker, torch.Tensor, Path], flag_all: bool) -> SafetyChecker:
    """The reference checker with every threshold moved past any cosine: it flags every image, or none."""
    model = load_safety_checker(reference[2]).model
    with torch.no_grad():
        model.concept_embeds_weights.fill_(-2.0 if flag_all else 2.0)
        model.special_care_embeds_weights.fill_(2.0)
    return SafetyChecker(model, ClipPreprocess(shortest_edge=SIZE, crop_height=SIZE, crop_width=SIZE))


def _run(pipe: Pipeline) -> Generated:
    params = GenerationParams("a red circle", width=64, height=64, steps=2, seed=4, batch_size=2)
    return next(ev for ev in txt2img(pipe, params) if isinstance(ev, Generated))


def test_a_pipeline_blacks_out_or_flags_what_its_checker_flags(reference, tiny_model_file) -> None:  # type: ignore[no-untyped-def]
    pipe = Pipeline.from_file(tiny_model_file)
    plain = _run(pipe)
    assert plain.nsfw is None
    pipe.safety_checker = _all_or_none(reference, flag_all=True)
    flagged = _run(pipe)
    assert flagged.nsfw == [True, True]
    assert all(not np.asarray(im).any() for im in flagged.images)  # black, as diffusers returns them
    pipe.safety_action = "flag"
    kept = _run(pipe)
    assert kept.nsfw == [True, True]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(kept.images, plain.images, strict=True))
    pipe.safety_checker = _all_or_none(reference, flag_all=False)
    assert _run(pipe).nsfw == [False, False]


def test_the_azure_answer_carries_the_verdict(reference, tiny_model_file) -> None:  # type: ignore[no-untyped-def]
    import httpx

    from stablekit.serve import ServeSettings, Service, create_app
    from tests.serving import running

    pipe = Pipeline.from_file(tiny_model_file)
    body = {"input_data": {"data": ["a red circle"], "parameters": {"num_inference_steps": 2, "width": 64}}}
    for checker, want in ((None, None), (_all_or_none(reference, flag_all=True), True)):
        pipe.safety_checker = checker
        with running(create_app(Service(pipe, ServeSettings()))) as url:
            answer = httpx.post(f"{url}/score", json=body, timeout=60).json()
        assert answer[0]["nsfw_content_detected"] is want


def test_batch_predictions_carry_the_verdict_and_resume(reference, tiny_model_file, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import csv

    from stablekit.batch import JobOptions, prepare_output, read_rows, run_job

    source = tmp_path / "rows.csv"
    source.write_text("prompt,width,height,steps\na red circle,64,64,2\na blue square,64,64,2\n", encoding="utf-8")
    rows = read_rows(source, max_rows=10)
    pipe = Pipeline.from_file(tiny_model_file)

    def column(out: Path) -> list[str]:
        with open(out / "predictions.csv", newline="", encoding="utf-8") as f:
            return [r["nsfw_content_detected"] for r in csv.DictReader(f)]

    plain = tmp_path / "plain"
    prepare_output(plain)
    run_job(pipe, rows, plain, JobOptions(batch_size=2, progress=False))
    assert column(plain) == ["", ""]  # no checker: null, as Azure's deployment leaves it
    pipe.safety_checker, pipe.safety_action = _all_or_none(reference, flag_all=True), "flag"
    flagged = tmp_path / "flagged"
    prepare_output(flagged)
    run_job(pipe, rows, flagged, JobOptions(batch_size=2, progress=False))
    assert column(flagged) == ["True", "True"]
    # A finished row is done whatever the checker said of it: running again computes nothing.
    summary = run_job(pipe, rows, flagged, JobOptions(batch_size=2, progress=False))
    assert summary.skipped == 2 and summary.generated == 0
    assert column(flagged) == ["True", "True"]


def test_azure_scripts_take_the_checker_from_the_environment(
    reference, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    from stablekit.weights.safety import safety_from_environment

    monkeypatch.delenv("STABLEKIT_SAFETY_CHECKER", raising=False)
    monkeypatch.delenv("STABLEKIT_SAFETY_ACTION", raising=False)
    assert safety_from_environment(tmp_path) == (None, "blackout")
    shutil.copytree(reference[2], tmp_path / "safety_checker")
    monkeypatch.setenv("STABLEKIT_SAFETY_CHECKER", "safety_checker")  # relative to the model directory
    monkeypatch.setenv("STABLEKIT_SAFETY_ACTION", "flag")
    checker, action = safety_from_environment(tmp_path)
    assert checker is not None and action == "flag"
    monkeypatch.setenv("STABLEKIT_SAFETY_ACTION", "hide")
    with pytest.raises(ValueError, match="STABLEKIT_SAFETY_ACTION"):
        safety_from_environment(tmp_path)


def test_cli_safety_checker(reference, tiny_model_file, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from transformers import CLIPImageProcessor

    ref = reference[0]
    with torch.no_grad():
        saved = {k: v.clone() for k, v in ref.state_dict().items()}
        ref.concept_embeds_weights.fill_(-2.0)  # flags everything
        folder = tmp_path / "safety_checker"
        ref.save_pretrained(folder)
        ref.load_state_dict(saved)
    size = {"shortest_edge": SIZE}
    CLIPImageProcessor(size=size, crop_size={"height": SIZE, "width": SIZE}).save_pretrained(folder)
    run = [sys.executable, "-c", "import sys; from stablekit.cli import main; sys.exit(main())", "generate"]
    common = ["a red circle", "-m", str(tiny_model_file), "-W", "64", "-H", "64", "--steps", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for action, black_image in (("blackout", True), ("flag", False)):
        out = tmp_path / f"{action}.png"
        argv = [*run, *common, "--safety-checker", str(folder), "--safety-action", action, "-o", str(out)]
        done = subprocess.run(argv, capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr
        assert f"the safety checker flagged {out}" in done.stderr
        assert (not np.asarray(Image.open(out)).any()) is black_image
