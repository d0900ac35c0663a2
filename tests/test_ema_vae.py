"""``--ema`` (a training file's EMA UNet weights) and ``--vae`` (a separate autoencoder) against diffusers.

The reference is diffusers' fixture pipeline of ``test_tasks_parity.py`` (its components typed in there), written
with ``save_pretrained``. diffusers' own single-file converters read what we feed our loader:
``convert_ldm_unet_checkpoint(extract_ema=True)`` takes the EMA copy out of our training-style file (LitEma's
``model_ema.<path without dots>`` names), ``convert_ldm_vae_checkpoint`` reads the original-layout autoencoder
files (bare and ``first_stage_model.``-prefixed), and ``AutoencoderKL.from_pretrained`` the autoencoder folder
diffusers wrote. Each reference pipeline is built with ``vae=`` / its UNet's weights set by hand, and compared with
ours image for image (latents to 1e-4, pixels to 2/255).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from stablekit.cli import main
from stablekit.config import VAEConfig
from stablekit.models.vae import AutoencoderKL
from stablekit.pipelines import Pipeline, img2img, txt2img
from stablekit.weights import WeightsError, load_model, probe, read_state_dict
from stablekit.weights.detect import METADATA_KEY, config_to_json
from stablekit.weights.load import write_safetensors
from tests.oracles import hf_clip_tokenizer, require
from tests.test_tasks_parity import (
    IMAGE,
    SEED,
    _assert_same,
    _ours,
    _params,
    _perturb,
    _pixel_diff,
    _text_encoder,
    _theirs,
    _unet,
    _vae,
)

diffusers = require("diffusers")
single_file = require("diffusers.loaders.single_file_utils")

UNET = "model.diffusion_model."
VAE = "first_stage_model."
SIZE = {"height": 32, "width": 32}


def _autoencoder(seed: int, **config: Any) -> Any:
    """diffusers' fixture autoencoder (``block_out_channels=[32, 64]``), typed in, with weights of its own."""
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        **{
            "block_out_channels": [32, 64],
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": ["DownEncoderBlock2D"] * 2,
            "up_block_types": ["UpDecoderBlock2D"] * 2,
            "latent_channels": 4,
            **config,
        }
    )
    _perturb(vae, torch.Generator().manual_seed(seed))
    return vae


def _noisy(state: dict[str, Tensor], seed: int) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: t + 0.05 * torch.randn(t.shape, generator=gen) for k, t in state.items()}


@dataclasses.dataclass
class World:
    root: Path
    folder: Path  # the diffusers pipeline folder
    ref: Any  # diffusers' StableDiffusionImg2ImgPipeline read from it
    live: dict[str, Tensor]  # our training-style file's tensors (original layout, with model_ema.*)
    trained: Path  # that file
    meta: dict[str, str]  # its metadata: the config, since the tiny text tower's heads are not in its shapes
    vae_folder: Path  # a diffusers AutoencoderKL folder, scaling_factor 0.3
    vae_file: Path  # bare original-layout autoencoder, with training extras
    vae_ckpt: Path  # first_stage_model.-prefixed, nested state_dict, torch zip


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("ema-vae")
    unet, vae, text = _unet(4), _vae([32, 64]), _text_encoder(openclip=False)
    gen = torch.Generator().manual_seed(1234)
    for m in (unet, vae, text):
        _perturb(m, gen)
    made = diffusers.StableDiffusionImg2ImgPipeline(
        vae=vae,
        text_encoder=text,
        unet=unet,
        tokenizer=hf_clip_tokenizer(root / "tokenizer"),
        scheduler=diffusers.PNDMScheduler(skip_prk_steps=True),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    folder = root / "pipe"
    made.save_pretrained(folder)
    ref = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(folder, local_files_only=True)
    ref.set_progress_bar_config(disable=True)

    # A training checkpoint: the live weights (read by our folder loader, parity-tested in test_pipeline.py) and
    # an EMA copy of the UNet that differs from them, under LitEma's names.
    loaded = load_model(folder)
    live = {k: t for k, t in loaded.model.state_dict().items() if k not in loaded.absent}
    ema = _noisy({k: t for k, t in live.items() if k.startswith(UNET)}, seed=5)
    live |= {"model_ema." + k.removeprefix("model.").replace(".", ""): t for k, t in ema.items()}
    live |= {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(1000, dtype=torch.int)}
    trained = root / "trained.safetensors"
    meta = {METADATA_KEY: config_to_json(loaded.config)}  # as our writer puts it
    write_safetensors(trained, live, meta)

    vae_folder = root / "vae-folder"
    _autoencoder(99, scaling_factor=0.3).save_pretrained(vae_folder)
    original = _noisy({k.removeprefix(VAE): t for k, t in live.items() if k.startswith(VAE)}, seed=11)
    vae_file = root / "vae-ft-tiny-ema-pruned.safetensors"
    extras = {"loss.logvar": torch.zeros(()), "model_ema.decay": torch.tensor(0.999)}
    write_safetensors(vae_file, original | extras)
    vae_ckpt = root / "vae-prefixed.ckpt"
    prefixed = _noisy({VAE + k: t for k, t in original.items()}, seed=12)
    torch.save({"state_dict": prefixed, "global_step": 840000}, vae_ckpt)
    return World(root, folder, ref, live, trained, meta, vae_folder, vae_file, vae_ckpt)


def _reference(world: World, *, unet: dict[str, Tensor] | None = None, vae: Any = None) -> Any:
    """diffusers' pipeline with the UNet weights ``unet`` set by hand and ``vae=`` in place of its own."""
    ref = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(
        world.folder, local_files_only=True, **({"vae": vae} if vae is not None else {})
    )
    if unet is not None:
        ref.unet.load_state_dict(unet, strict=True)
    ref.set_progress_bar_config(disable=True)
    return ref


def _vae_from_original(world: World, state: dict[str, Tensor]) -> Any:
    """The autoencoder diffusers' single-file converter reads from an original-layout state dict."""
    vae = diffusers.AutoencoderKL.from_config(world.ref.vae.config)
    vae.load_state_dict(single_file.convert_ldm_vae_checkpoint(state, vae.config), strict=True)
    return vae


def _compare(task: str, ours: Pipeline, ref: Any) -> int:
    """Run ``task`` on both, assert they agree, return the pixel difference."""
    if task == "txt2img":
        got = _ours(txt2img(ours, dataclasses.replace(_params("ddim"), **SIZE)))
        want = _theirs(diffusers.StableDiffusionPipeline(**ref.components), "ddim", [SEED, SEED + 1], **SIZE)
    else:
        got = _ours(img2img(ours, _params("ddim"), IMAGE, strength=0.7))
        want = _theirs(ref, "ddim", [SEED, SEED + 1], image=IMAGE, strength=0.7)
    _assert_same(got, want)
    return _pixel_diff(got.images, want.images)


def _load(path: Path, **kw: Any) -> Pipeline:
    return Pipeline.from_file(path, device="cpu", dtype=torch.float32, **kw)


# --- --ema ---------------------------------------------------------------------------------------------------------


def test_ema_matches_diffusers_with_the_ema_weights_loaded_by_hand(world: World) -> None:
    config = world.ref.unet.config
    live_unet = single_file.convert_ldm_unet_checkpoint(world.live, config)
    ema_unet = single_file.convert_ldm_unet_checkpoint(world.live, config, extract_ema=True)
    # diffusers reads our file's live weights as its own UNet, and finds an EMA copy that differs from them.
    assert all(torch.equal(t, world.ref.unet.state_dict()[k]) for k, t in live_unet.items())
    assert any(not torch.equal(t, live_unet[k]) for k, t in ema_unet.items())

    _compare("txt2img", _load(world.trained), world.ref)
    ours = _load(world.trained, ema=True)
    assert any("EMA copy" in n for n in ours.notes)
    _compare("txt2img", ours, _reference(world, unet=ema_unet))
    # The two sets of weights draw visibly different images: the comparison above can tell them apart.
    live_run = _ours(txt2img(_load(world.trained), dataclasses.replace(_params("ddim"), **SIZE)))
    ema_run = _ours(txt2img(ours, dataclasses.replace(_params("ddim"), **SIZE)))
    assert _pixel_diff(live_run.images, ema_run.images) > 10


def test_ema_is_reported_and_refused_where_there_is_none(world: World, tmp_path: Path) -> None:
    n_unet = sum(k.startswith(UNET) for k in world.live)
    found = probe(world.trained)
    assert found.ema == n_unet and not found.ema_loaded
    assert sorted(k for keys in found.dropped.values() for k in keys if k.startswith("model_ema.")) == sorted(
        k for k in world.live if k.startswith("model_ema.")
    )
    with_ema = probe(world.trained, ema=True)
    assert with_ema.ema_loaded
    unused = {k for keys in with_ema.dropped.values() for k in keys}
    assert unused == {"model_ema.decay", "model_ema.num_updates"} | {k for k in world.live if k.startswith(UNET)}

    plain = tmp_path / "pruned.safetensors"
    write_safetensors(plain, {k: t for k, t in world.live.items() if not k.startswith("model_ema.")}, world.meta)
    partial = tmp_path / "partial.safetensors"
    dropped_one = next(k for k in world.live if k.startswith("model_ema.diffusion_model"))
    write_safetensors(partial, {k: t for k, t in world.live.items() if k != dropped_one}, world.meta)
    cases = [
        (plain, "no EMA weights"),
        (world.folder, "diffusers folder holds no EMA copy"),
        (partial, f"lacks 1 of the UNet's {n_unet} weights, e.g. {dropped_one}"),
    ]
    for path, message in cases:
        with pytest.raises(WeightsError, match=message) as e:
            load_model(path, ema=True)
        assert "\n" not in str(e.value)


# --- --vae ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["txt2img", "img2img"])
def test_vae_folder_matches_diffusers_vae_argument(world: World, task: str) -> None:
    ours = _load(world.folder, vae=world.vae_folder)
    assert ours.config.vae.scale_factor == 0.3  # the autoencoder's own config.json, as diffusers uses it
    assert any("0.3" in n and "config" in n for n in ours.notes)
    vae = diffusers.AutoencoderKL.from_pretrained(world.vae_folder, local_files_only=True)
    assert _compare(task, ours, _reference(world, vae=vae)) <= 2
    # The replaced autoencoder changes the image: the comparison can fail.
    params = dataclasses.replace(_params("ddim"), **SIZE)
    own = _ours(txt2img(_load(world.folder), params))
    assert _pixel_diff(_ours(txt2img(ours, params)).images, own.images) > 10


@pytest.mark.parametrize("task", ["txt2img", "img2img"])
@pytest.mark.parametrize("which", ["bare", "prefixed"])
def test_vae_original_file_matches_diffusers_single_file_vae(world: World, which: str, task: str) -> None:
    path = world.vae_file if which == "bare" else world.vae_ckpt
    ours = _load(world.folder, vae=path)
    assert ours.config.vae.scale_factor == world.ref.vae.config.scaling_factor  # no scale in the file: kept
    if which == "bare":
        assert any("loss weights" in n for n in ours.notes) and any("EMA bookkeeping" in n for n in ours.notes)
    vae = _vae_from_original(world, read_state_dict(path))
    assert _compare(task, ours, _reference(world, vae=vae)) <= 2


def test_ema_and_vae_from_the_command_line(world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    out = tmp_path / "out.png"
    argv = ["generate", "a red circle on a blue background", "--model", str(world.trained), "--ema"]
    argv += ["--vae", str(world.vae_file), "--negative", "blurry, low quality", "--sampler", "ddim"]
    argv += ["--steps", "4", "--guidance", "6", "--seed", str(SEED), "-W", "32", "-H", "32", "-o", str(out)]
    assert main([*argv, "--dtype", "fp32", "--device", "cpu"]) == 0
    ref = _reference(
        world,
        unet=single_file.convert_ldm_unet_checkpoint(world.live, world.ref.unet.config, extract_ema=True),
        vae=_vae_from_original(world, read_state_dict(world.vae_file)),
    )
    want = _theirs(diffusers.StableDiffusionPipeline(**ref.components), "ddim", [SEED], **SIZE)
    assert _pixel_diff([Image.open(out).convert("RGB")], want.images) <= 2

    capsys.readouterr()
    assert main(["info", str(world.trained)]) == 0
    report = capsys.readouterr().out
    n_unet = sum(k.startswith(UNET) for k in world.live)
    assert f"{n_unet} EMA UNet weights (model_ema.*), not loaded; --ema" in report
    assert main(["info", str(world.trained), "--ema", "--vae", str(world.vae_folder)]) == 0
    report = capsys.readouterr().out
    assert "loaded in place of the live weights" in report and f"vae file:   {world.vae_folder}" in report
    assert "scale 0.3" in report


# --- what --vae accepts, and what it refuses -------------------------------------------------------------------


def _vae_state(model: Any) -> dict[str, Tensor]:
    return {k: t for k, t in model.model.state_dict().items() if k.startswith(VAE)}


def test_vae_other_sources(world: World) -> None:
    folder = load_model(world.trained, vae=world.vae_folder)
    # The folder's weights file on its own: the same tensors, the model's scale.
    alone = load_model(world.trained, vae=world.vae_folder / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(t, _vae_state(folder)[k]) for k, t in _vae_state(alone).items())
    assert alone.config.vae.scale_factor == 0.18215 and any("without their config.json" in n for n in alone.notes)
    # A whole pipeline folder: its vae/.
    pipeline = load_model(world.trained, vae=world.folder)
    assert any("took the vae/" in n for n in pipeline.notes)
    # A whole checkpoint: its first_stage_model.* part, said in a note.
    whole = load_model(world.folder, vae=world.trained)
    assert any("of a whole checkpoint" in n for n in whole.notes)
    assert all(torch.equal(t, world.live[k]) for k, t in _vae_state(whole).items())


def test_vae_refusals_are_one_line(world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    wrong_folder = tmp_path / "wide-vae"
    _autoencoder(3, block_out_channels=[64, 64]).save_pretrained(wrong_folder)
    wrong_file = tmp_path / "wide.safetensors"
    write_safetensors(wrong_file, AutoencoderKL(VAEConfig(ch=64, ch_mult=(1, 2), num_res_blocks=1)).state_dict())
    unet_file = tmp_path / "unet.safetensors"
    write_safetensors(unet_file, {k: t for k, t in world.live.items() if k.startswith(UNET)}, world.meta)
    norm_folder = tmp_path / "groups-vae"
    _autoencoder(3, norm_num_groups=16).save_pretrained(norm_folder)
    cases = [
        (tmp_path / "missing.safetensors", "cannot open"),
        (wrong_folder, r"not this model's autoencoder: ch 64 \(the model's: 32\)"),
        (norm_folder, r"norm_groups 16 \(the model's: 32\)"),
        (wrong_file, r"encoder\.conv_in\.weight: file has \(64, 3, 3, 3\), model wants \(32, 3, 3, 3\)"),
        (unet_file, "not an autoencoder.*it holds UNet weights"),
        (world.folder / "unet", "describes a 'UNet2DConditionModel', not an AutoencoderKL"),
        (tmp_path, "folder without config.json"),
    ]
    for path, message in cases:
        with pytest.raises(ValueError, match=message) as e:
            probe(world.trained, vae=path)  # refused before any tensor is read in full
        assert "\n" not in str(e.value)
        with pytest.raises(ValueError, match=message):
            load_model(world.trained, vae=path)
    out = tmp_path / "never.png"
    argv = ["generate", "x", "--model", str(world.trained), "--vae", str(unet_file), "-o", str(out), "--steps", "1"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("stablekit generate: error:") and "UNet weights" in err and "\n" not in err
    assert not out.exists()
