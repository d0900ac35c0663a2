"""Conversion against diffusers' own loaders: a random tiny diffusers pipeline -> our folder reader -> our
original-layout writer -> diffusers' single-file loader must give back the same networks (this checks our
key tables against theirs), and our diffusers writer must load in diffusers' ``from_pretrained``. Also a
lightning-style ``.ckpt`` round trip and the ``info``/``convert`` commands."""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch

from stablekit.cli import UserError
from stablekit.cli import convert as convert_cmd
from stablekit.cli import info as info_cmd
from stablekit.config import ModelConfig
from stablekit.models.ldm import LatentDiffusion
from stablekit.weights import CheckpointError, load_model, read_state_dict, save_model
from stablekit.weights.diffusers import write_tokenizer
from stablekit.weights.load import write_safetensors
from stablekit.weights.schedulers import schedule_to_diffusers
from stablekit.weights.tables.text import diffusers_text_config
from stablekit.weights.tables.unet import diffusers_unet_config
from stablekit.weights.tables.vae import diffusers_vae_config
from tests.oracles import require
from tests.tiny import TINY

diffusers = require("diffusers")
transformers = require("transformers")

# OpenAI CLIP + conv projections; OpenCLIP + linear projections + v; label embedding, cross-attention-only
# levels and a three-level VAE.
FAMILIES = ["tiny-sd1", "tiny-sd2-v", "tiny-x4"]
COMPONENTS = ("unet", "vae", "text_encoder")


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


M = TypeVar("M", bound=torch.nn.Module)


def _perturb(module: M) -> M:
    # Break the init's symmetries (zero biases, unit norms) so a swapped key changes the output.
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return module.eval()


def _reference(cfg: ModelConfig, folder: Path) -> Any:
    """A random diffusers pipeline of ``cfg``'s sizes, saved with ``save_pretrained``."""
    unet = _perturb(diffusers.UNet2DConditionModel(**diffusers_unet_config(cfg.unet, 8)))
    vae = _perturb(diffusers.AutoencoderKL(**diffusers_vae_config(cfg.vae, sample_size=32)))
    text = _perturb(transformers.CLIPTextModel(transformers.CLIPTextConfig(**diffusers_text_config(cfg.text))))
    write_tokenizer(folder / "tokenizer-src", cfg.text)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer-src")
    scheduler = diffusers.DDIMScheduler.from_config(schedule_to_diffusers(cfg.schedule, "DDIMScheduler"))
    parts = {"unet": unet, "vae": vae, "text_encoder": text, "tokenizer": tokenizer, "scheduler": scheduler}
    if cfg.conditioning == "upscale":
        assert cfg.low_res_schedule is not None
        low = diffusers.DDPMScheduler.from_config(schedule_to_diffusers(cfg.low_res_schedule, "DDPMScheduler"))
        pipe = diffusers.StableDiffusionUpscalePipeline(**parts, low_res_scheduler=low)
    else:
        pipe = diffusers.StableDiffusionPipeline(
            **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    pipe.save_pretrained(folder / "ref")
    return pipe


def _inputs(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "x": torch.randn(2, cfg.unet.in_channels, 8, 8, generator=g),
        "t": torch.tensor([10, 900]),
        "context": torch.randn(2, 7, cfg.unet.context_dim, generator=g),
        "y": torch.tensor([20, 300]),
        "z": torch.randn(2, cfg.vae.embed_dim, 4, 4, generator=g),
        "ids": torch.randint(0, cfg.text.vocab_size, (2, cfg.text.context_length), generator=g),
    }


@torch.no_grad()
def _diffusers_outputs(pipe: Any, cfg: ModelConfig, i: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    labels = {"class_labels": i["y"]} if cfg.unet.num_classes is not None else {}
    return {
        "unet": pipe.unet(i["x"], i["t"], encoder_hidden_states=i["context"], **labels).sample,
        "vae": pipe.vae.decode(i["z"]).sample,
        "text_encoder": pipe.text_encoder(i["ids"]).last_hidden_state,
    }


@torch.no_grad()
def _our_outputs(model: LatentDiffusion, cfg: ModelConfig, i: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    y = i["y"] if cfg.unet.num_classes is not None else None
    return {
        "unet": model.unet(i["x"], i["t"], i["context"], y),
        "vae": model.vae.decode(i["z"]),
        "text_encoder": model.text_encoder(i["ids"]),
    }


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: (a[k] - b[k]).abs().max().item() for k in a}


@pytest.mark.parametrize("name", FAMILIES)
def test_diffusers_folder_to_original_loads_in_diffusers(tmp_path: Path, name: str) -> None:
    cfg = TINY[name]
    pipe = _reference(cfg, tmp_path)
    loaded = load_model(tmp_path / "ref")
    assert loaded.format == "diffusers" and loaded.config.schedule.prediction == cfg.schedule.prediction
    assert (loaded.config.unet, loaded.config.vae) == (cfg.unet, cfg.vae)

    inputs = _inputs(cfg)
    want = _diffusers_outputs(pipe, cfg, inputs)
    ours = _max_diff(_our_outputs(loaded.model, cfg, inputs), want)
    assert all(d < 1e-4 for d in ours.values()), ours

    single = tmp_path / "model.safetensors"
    save_model(loaded, None, single)
    again = type(pipe).from_single_file(str(single), config=str(tmp_path / "ref"), local_files_only=True)
    for comp in COMPONENTS:
        a, b = getattr(pipe, comp).state_dict(), getattr(again, comp).state_dict()
        assert set(a) == set(b), comp
        assert all(torch.equal(a[k], b[k]) for k in a), comp
    assert _max_diff(_diffusers_outputs(again, cfg, inputs), want) == dict.fromkeys(COMPONENTS, 0.0)


@pytest.mark.parametrize("name", FAMILIES)
def test_our_diffusers_folder_loads_in_diffusers(tmp_path: Path, name: str) -> None:
    cfg = TINY[name]
    model = _perturb(LatentDiffusion(cfg))
    save_model(model, cfg, tmp_path / "out", layout="diffusers", dtype=torch.float16)
    cls = diffusers.StableDiffusionUpscalePipeline if cfg.conditioning == "upscale" else diffusers.DiffusionPipeline
    pipe = cls.from_pretrained(tmp_path / "out", local_files_only=True, dtype=torch.float32)
    assert pipe.scheduler.config.prediction_type == ("v_prediction" if cfg.schedule.prediction == "v" else "epsilon")
    assert pipe.tokenizer.pad_token_id == cfg.text.pad_token
    inputs = _inputs(cfg)
    theirs = _diffusers_outputs(pipe, cfg, inputs)
    ours = _our_outputs(model.half().float(), cfg, inputs)  # the same fp16-rounded weights
    diff = _max_diff(ours, theirs)
    assert all(d < 1e-4 for d in diff.values()), diff
    back = load_model(tmp_path / "out")
    assert back.config.unet == cfg.unet and back.config.vae == cfg.vae
    state = model.state_dict()
    assert all(torch.equal(t, state[k]) for k, t in back.model.state_dict().items() if k not in back.absent)


class ModelCheckpoint:
    """Stands for the pytorch_lightning callback pickled into sd-v1-4.ckpt."""


def _lightning_ckpt(path: Path, state: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch) -> None:
    dotted = "pytorch_lightning.callbacks.model_checkpoint"
    parts = dotted.split(".")
    for n in range(1, len(parts) + 1):
        monkeypatch.setitem(sys.modules, ".".join(parts[:n]), types.ModuleType(".".join(parts[:n])))
    monkeypatch.setattr(ModelCheckpoint, "__module__", dotted)
    sys.modules[dotted].ModelCheckpoint = ModelCheckpoint  # type: ignore[attr-defined]
    torch.save({"state_dict": state, "global_step": 875000, "callbacks": {"ckpt": ModelCheckpoint()}}, path)
    monkeypatch.undo()


def _cli(module: Any, argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    module.add_parser(parser.add_subparsers())
    args = parser.parse_args(argv)
    return int(args.run(args))


def test_ckpt_round_trip_and_commands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = TINY["tiny-sd2"]
    model = _perturb(LatentDiffusion(cfg))
    weights = model.state_dict()
    state = dict(weights)
    state["alphas_cumprod"] = torch.ones(1000)
    state["model_ema.decay"] = torch.tensor(0.9999)
    state["model_ema.diffusion_modelout2bias"] = torch.zeros(4)
    ckpt = tmp_path / "512-base-ema.ckpt"
    _lightning_ckpt(ckpt, state, monkeypatch)

    assert _cli(info_cmd, ["info", str(ckpt)]) == 0
    out = capsys.readouterr().out
    assert "sd2-base (non-standard sizes)" in out and "global_step 875000" in out
    assert "EMA shadow copy" in out and "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint" in out

    loaded = load_model(ckpt)
    assert loaded.config.schedule.prediction == "eps"
    assert all(torch.equal(t, weights[k]) for k, t in loaded.model.state_dict().items())

    dst = tmp_path / "out.safetensors"
    assert _cli(convert_cmd, ["convert", str(ckpt), str(dst), "--dtype", "fp16"]) == 0
    back = load_model(dst, dtype=None)
    assert back.config == loaded.config and back.prediction_source == "the file's stablekit config"
    assert all(torch.equal(t, weights[k].half()) for k, t in back.model.state_dict().items())
    with pytest.raises(UserError, match="exists"):
        _cli(convert_cmd, ["convert", str(ckpt), str(dst)])
    with pytest.raises(UserError, match="--to"):
        _cli(convert_cmd, ["convert", str(ckpt), str(tmp_path / "folder")])


def test_diffusers_folder_file_variants(tmp_path: Path) -> None:
    cfg = TINY["tiny-sd1"]
    model = _perturb(LatentDiffusion(cfg))
    folder = tmp_path / "pipe"
    save_model(model, cfg, folder, layout="diffusers")
    # A pickled .bin UNet and an fp16 variant text encoder, as older and variant repos ship them.
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(dict(read_state_dict(unet)), unet.with_suffix(".bin"))
    unet.unlink()
    text = folder / "text_encoder" / "model.safetensors"
    write_safetensors(text.with_suffix(".fp16.safetensors"), {k: t.half() for k, t in read_state_dict(text).items()})
    text.unlink()
    loaded = load_model(folder, dtype=None)
    state = model.state_dict()
    for key, t in loaded.model.state_dict().items():
        if key not in loaded.absent:
            want = state[key].half() if key.startswith("cond_stage_model.") else state[key]
            assert torch.equal(t, want), key
    (folder / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights file"):
        load_model(folder)
