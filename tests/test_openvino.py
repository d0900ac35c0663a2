"""The OpenVINO engine: the same images as the torch engine, a cache that is used only when it checks out.

Each tiny family is converted once per session (seconds); the cache tests copy that cache and damage the copy.
The engine's package is a test requirement (the [test] extra installs it): a missing one fails here, never skips.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stablekit.engines import EngineUnavailable
from stablekit.engines.openvino import OpenVINOEngine, cpu_supports
from stablekit.models.ldm import LatentDiffusion
from stablekit.pipelines import Generated, GenerationParams, Pipeline, Progress, img2img, txt2img, upscale
from stablekit.weights import save_model
from tests.tiny import TINY_SD1, TINY_SD2_V, TINY_X4


def _model_file(folder: Path, config, seed: int) -> Path:  # type: ignore[no-untyped-def]
    torch.manual_seed(seed)
    path = folder / f"{config.name}.safetensors"
    save_model(LatentDiffusion(config), config, path)
    return path


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ov-models")
    return {cfg.name: _model_file(folder, cfg, i) for i, cfg in enumerate((TINY_SD1, TINY_SD2_V, TINY_X4))}


@pytest.fixture(scope="session")
def warm_cache(tmp_path_factory, models):
    """A cache holding the tiny SD1 model, converted once for the session."""
    cache = tmp_path_factory.mktemp("ov-cache")
    Pipeline.from_file(models["tiny-sd1"], engine="openvino", cache_dir=cache)
    return cache


def _run(pipe: Pipeline, events) -> tuple[list[torch.Tensor], list[np.ndarray]]:  # type: ignore[no-untyped-def]
    latents, images = [], []
    for ev in events:
        if isinstance(ev, Progress) and ev.step == ev.total:
            latents.append(ev.latents.clone())
        elif isinstance(ev, Generated):
            images += [np.asarray(im, dtype=np.int16) for im in ev.images]
    return latents, images


def _same_image(torch_pipe: Pipeline, ov_pipe: Pipeline, task) -> None:  # type: ignore[no-untyped-def]
    """The issue's bar at f32: latents within 1e-4, images within 2/255."""
    lat_t, img_t = _run(torch_pipe, task(torch_pipe))
    lat_o, img_o = _run(ov_pipe, task(ov_pipe))
    assert len(img_t) == len(img_o) > 0
    for a, b in zip(lat_t, lat_o, strict=True):
        assert (a - b).abs().max().item() <= 1e-4
    for a, b in zip(img_t, img_o, strict=True):
        assert np.abs(a - b).max() <= 2


def test_txt2img_and_img2img_match_torch_at_any_size(models, warm_cache, one_thread):
    path = models["tiny-sd1"]
    ours, ov = Pipeline.from_file(path), Pipeline.from_file(path, engine="openvino", cache_dir=warm_cache)
    assert isinstance(ov.engine, OpenVINOEngine) and ov.engine.info.converted == ()
    # one converted model serves every batch size and latent shape
    for w, h, b in ((64, 64, 1), (48, 80, 3)):
        params = GenerationParams("a red circle", width=w, height=h, steps=4, guidance_scale=5.0, seed=3, batch_size=b)
        _same_image(ours, ov, lambda p, params=params: txt2img(p, params))
    start = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    params = GenerationParams("a blue square", steps=6, guidance_scale=4.0, seed=5, sampler="euler_a")
    _same_image(ours, ov, lambda p: img2img(p, params, start, strength=0.6))


def test_v_prediction_family_with_clip_skip(models, tmp_path, one_thread):
    path = models["tiny-sd2-v"]
    ours = Pipeline.from_file(path, clip_skip=2)
    ov = Pipeline.from_file(path, engine="openvino", cache_dir=tmp_path, clip_skip=2)
    params = GenerationParams("a green star", width=64, height=64, steps=3, guidance_scale=6.0, seed=7)
    _same_image(ours, ov, lambda p: txt2img(p, params))
    # another clip skip needs only its own text part
    again = Pipeline.from_file(path, engine="openvino", cache_dir=tmp_path, clip_skip=1)
    assert isinstance(again.engine, OpenVINOEngine) and again.engine.info.converted == ("text_skip0",)


def test_upscaler_class_labels_and_extra_channels(models, tmp_path, one_thread):
    path = models["tiny-x4"]
    ours, ov = Pipeline.from_file(path), Pipeline.from_file(path, engine="openvino", cache_dir=tmp_path)
    low = Image.fromarray(np.random.default_rng(1).integers(0, 255, (16, 24, 3), dtype=np.uint8))
    params = GenerationParams("", steps=3, guidance_scale=1.0, seed=2)
    _same_image(ours, ov, lambda p: upscale(p, params, low, noise_level=30))


def _copy(cache: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "cache"
    shutil.copytree(cache, dest)
    (dest / "digests.json").unlink(missing_ok=True)  # the copies are new files: nothing remembered about them
    return dest


def _load(path: Path, cache: Path) -> OpenVINOEngine:
    engine = Pipeline.from_file(path, engine="openvino", cache_dir=cache).engine
    assert isinstance(engine, OpenVINOEngine)
    return engine


def test_a_damaged_part_is_rebuilt_never_used(models, warm_cache, tmp_path):
    cache = _copy(warm_cache, tmp_path)
    path = models["tiny-sd1"]
    assert _load(path, cache).info.converted == ()
    entry = next((cache / "openvino").iterdir())
    weights = entry / "unet" / "model.bin"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    weights.write_bytes(bytes(data))
    (entry / "vae_decoder" / "manifest.json").unlink()
    (entry / "text_skip0" / "model.xml").write_text("<net")  # truncated
    messages: list[str] = []
    engine = Pipeline.from_file(path, engine="openvino", cache_dir=cache, report=messages.append).engine
    assert isinstance(engine, OpenVINOEngine)
    assert set(engine.info.converted) == {"unet", "vae_decoder", "text_skip0"}
    assert any("unet (model.bin does not match its recorded digest)" in m for m in messages)
    # rebuilt, the parts are whole again: the next process converts nothing and draws the same image
    again = Pipeline.from_file(path, engine="openvino", cache_dir=cache)
    params = GenerationParams("a red circle", width=64, height=64, steps=2, guidance_scale=3.0, seed=1)
    _same_image(Pipeline.from_file(path), again, lambda p: txt2img(p, params))
    assert isinstance(again.engine, OpenVINOEngine) and again.engine.info.converted == ()


def test_a_damaged_compiled_blob_is_removed_before_import(models, warm_cache, tmp_path):
    cache = _copy(warm_cache, tmp_path)
    path = models["tiny-sd1"]
    _load(path, cache)
    blobs = [p for p in (cache / "openvino").rglob("*.blob")]
    assert blobs
    victim = blobs[0]
    victim.chmod(0o644)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    engine = _load(path, cache)  # importing the half blob could crash the process
    assert engine.info.converted == ()
    folder = victim.parent
    recorded = json.loads((folder / "blobs.json").read_text())
    from stablekit.engines.digest import sha256_file

    assert {p.name: sha256_file(p) for p in folder.glob("*.blob")} == recorded  # recompiled and recorded afresh


def test_other_weights_get_their_own_entry(models, warm_cache, tmp_path):
    cache = _copy(warm_cache, tmp_path)
    other = _model_file(tmp_path, TINY_SD1, seed=99)  # same shapes, other weights
    assert set(_load(other, cache).info.converted) == {"unet", "vae_decoder", "vae_encoder", "text_skip0"}
    assert len(list((cache / "openvino").iterdir())) == 2


def test_the_torch_weights_are_gone_once_the_engine_holds_the_networks(tmp_path):
    # A model file of its own: nothing else in the session maps it. Its mapping is how the torch weights hold
    # memory (an f32 file is used in place), so it must be gone when from_file returns, without our collecting.
    path = _model_file(tmp_path, TINY_SD1, seed=5)
    pipe = Pipeline.from_file(path, engine="openvino", cache_dir=tmp_path / "cache")
    assert not [line for line in Path("/proc/self/maps").read_text().splitlines() if str(path) in line]
    with pytest.raises(RuntimeError, match="openvino engine, which holds no torch modules"):
        pipe.model  # noqa: B018


def test_precision_is_explicit_and_bf16_needs_the_cpu(models, warm_cache, tmp_path, monkeypatch):
    import openvino

    class NoBF16:
        def get_property(self, device: str, name: str) -> list[str]:
            return ["FP32", "INT8"]

    monkeypatch.setattr(openvino, "Core", NoBF16)
    assert "no bf16 support" in (cpu_supports("bf16") or "")
    assert cpu_supports("f32") is None
    monkeypatch.undo()
    with pytest.raises(ValueError, match="--precision is a setting of --engine openvino"):
        Pipeline.from_file(models["tiny-sd1"], precision="bf16")
    with pytest.raises(ValueError, match="runs on the CPU in fp32"):
        Pipeline.from_file(models["tiny-sd1"], engine="openvino", dtype=torch.float16, cache_dir=warm_cache)


def test_bf16_and_f32_blobs_live_apart(models, warm_cache, tmp_path):
    if cpu_supports("bf16"):
        pytest.skip(f"bf16: {cpu_supports('bf16')}")
    cache = _copy(warm_cache, tmp_path)
    path = models["tiny-sd1"]
    f32 = Pipeline.from_file(path, engine="openvino", cache_dir=cache)
    bf16 = Pipeline.from_file(path, engine="openvino", cache_dir=cache, precision="bf16")
    flavours = sorted(p.name.split("-")[0] for p in next((cache / "openvino").iterdir()).joinpath("compiled").iterdir())
    assert flavours == ["bf16", "f32"]
    params = GenerationParams("a red circle", width=64, height=64, steps=2, guidance_scale=3.0, seed=1)
    a, b = (np.asarray(txt2img_one(p, params), dtype=np.int16) for p in (f32, bf16))
    assert np.abs(a - b).max() < 64  # bf16 moves pixels, not the picture


def txt2img_one(pipe: Pipeline, params: GenerationParams) -> Image.Image:
    return next(im for ev in txt2img(pipe, params) if isinstance(ev, Generated) for im in ev.images)


def test_missing_package_says_how_to_install(models, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises ImportError
    with pytest.raises(EngineUnavailable, match=r"pip install 'stablekit\[openvino\]'"):
        Pipeline.from_file(models["tiny-sd1"], engine="openvino")


def _cli(*args: str, env_cache: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "import sys; from stablekit.cli import main; sys.exit(main())", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "STABLEKIT_CACHE_DIR": str(env_cache)},
    )


def test_cli_compile_then_generate(models, tmp_path, one_thread):
    path, cache = models["tiny-sd1"], tmp_path / "cache"
    first = _cli("compile", str(path), env_cache=cache)
    assert first.returncode == 0, first.stderr
    assert "converted unet, vae_decoder, vae_encoder, text_skip0" in first.stdout and "MiB" in first.stdout
    second = _cli("compile", str(path), env_cache=cache)
    assert "converted nothing (all parts were cached)" in second.stdout
    common = ["a red circle", "-m", str(path), "-W", "64", "-H", "64", "--steps", "3", "--seed", "4"]
    ov = _cli("generate", *common, "--engine", "openvino", "-o", str(tmp_path / "ov.png"), env_cache=cache)
    eager = _cli("generate", *common, "-o", str(tmp_path / "torch.png"), env_cache=cache)
    assert ov.returncode == 0 and eager.returncode == 0, ov.stderr + eager.stderr
    assert "converting" not in ov.stderr
    a, b = (np.asarray(Image.open(tmp_path / f), dtype=np.int16) for f in ("ov.png", "torch.png"))
    assert np.abs(a - b).max() <= 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--engine", "openvino", "--dtype", "fp16"], "runs on the CPU in fp32"),
        (["--engine", "openvino", "--device", "cuda"], "no CUDA device"),
        (["--precision", "bf16"], "--precision is a setting of --engine openvino"),
        (["--engine", "tensorrt"], "invalid choice: 'tensorrt'"),
    ],
)
def test_cli_refuses_engine_settings_that_do_not_fit(models, tmp_path, args, message):
    out = _cli("generate", "x", "-m", str(models["tiny-sd1"]), "-o", str(tmp_path / "a.png"), *args, env_cache=tmp_path)
    assert out.returncode != 0
    assert message in out.stderr and "Traceback" not in out.stderr


def test_azure_entry_script_takes_the_engine_from_the_environment(models, warm_cache, monkeypatch):
    from stablekit.serve import azureml_score as entry

    monkeypatch.setattr(entry, "_pipe", None)
    monkeypatch.setenv("AZUREML_MODEL_DIR", str(models["tiny-sd1"]))
    monkeypatch.setenv("STABLEKIT_ENGINE", "openvino")
    monkeypatch.setenv("STABLEKIT_CACHE_DIR", str(warm_cache))
    entry.init()
    assert entry._pipe is not None and isinstance(entry._pipe.engine, OpenVINOEngine)
    assert entry._pipe.engine.info.converted == ()  # built ahead, as `stablekit compile` would
    body = {"input_data": {"columns": ["prompt"], "data": ["a red circle"], "parameters": {"num_inference_steps": 2}}}
    answer = entry.score(json.dumps(body))
    assert len(answer) == 1 and answer[0]["generated_image"]
    monkeypatch.setenv("STABLEKIT_ENGINE", "tensorrt")
    with pytest.raises(ValueError, match="STABLEKIT_ENGINE='tensorrt': choose one of torch, openvino"):
        entry.init()


def test_cli_compile_clear(models, tmp_path):
    cache = tmp_path / "cache"
    assert _cli("compile", str(models["tiny-sd1"]), env_cache=cache).returncode == 0
    out = _cli("compile", "--clear", env_cache=cache)
    assert out.returncode == 0 and "removed" in out.stdout
    assert not (cache / "openvino").exists()


def test_cli_compile_refuses_plainly(tmp_path):
    missing = _cli("compile", str(tmp_path / "nope.safetensors"), env_cache=tmp_path)
    assert missing.returncode == 1 and "nope.safetensors" in missing.stderr and "Traceback" not in missing.stderr
    (tmp_path / "afile").write_text("x")
    blocked = _cli("compile", "--cache-dir", str(tmp_path / "afile" / "cache"), env_cache=tmp_path)
    assert blocked.returncode == 1 and "Traceback" not in blocked.stderr, blocked.stderr
    assert len(blocked.stderr.strip().splitlines()) <= 2  # the one-line error (and the demo-model note)
