"""Family and size detection from tensor shapes, on full-size models built on the meta device."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from stablekit.config import PRESETS, SD1, SD2_BASE, SD2_V, X4_UPSCALER, ModelConfig, UNetConfig
from stablekit.models.ldm import SCHEDULE_BUFFERS, LatentDiffusion, split_extras
from stablekit.weights import WeightsError, build_model, load_model, probe
from stablekit.weights.detect import config_from_json, config_to_json, detect
from stablekit.weights.load import write_safetensors
from tests.tiny import TINY


def _shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = LatentDiffusion(cfg)
    return {k: tuple(t.shape) for k, t in model.state_dict().items()}


@pytest.fixture(scope="module")
def full_shapes() -> dict[str, dict[str, tuple[int, ...]]]:
    return {name: _shapes(cfg) for name, cfg in PRESETS.items()}


# The demo models are known by the config in their metadata; their shapes are SD1's and x4's layouts at other
# widths.
@pytest.mark.parametrize("name", [n for n in PRESETS if n not in ("sd2-base", "sd2-v", "demo", "demo-x4")])
def test_every_family_from_shapes(full_shapes: dict[str, dict[str, tuple[int, ...]]], name: str) -> None:
    det = detect(full_shapes[name])
    assert det.family == name and det.standard
    assert det.config == PRESETS[name]
    # Text heads and LayerNorm eps are in no tensor: the released tower's, said in the one note.
    tower = "CLIP ViT-L/14" if name.startswith("sd1") else "OpenCLIP ViT-H/14"
    text = PRESETS[name].text
    assert det.notes == [
        f"text encoder: {text.heads} heads and LayerNorm eps 1e-05 are {tower}'s (the weights do not record them; "
        "every shape is that released tower's)"
    ]


def test_sd2_prediction_rules(full_shapes: dict[str, dict[str, tuple[int, ...]]]) -> None:
    shapes = full_shapes["sd2-v"]
    assert shapes == full_shapes["sd2-base"]  # the reason a rule is needed at all
    base = detect(shapes, global_step=875000)
    assert base.config == SD2_BASE and "875000" in base.prediction_source
    v = detect(shapes, global_step=110000)
    assert v.config == SD2_V and v.config.unet.upcast_attention
    assert detect(shapes, name_hint="/m/v2-1_768-ema-pruned.safetensors").config == SD2_V
    assert detect(shapes, name_hint="/m/v2-1_512-ema-pruned.safetensors").config == SD2_BASE
    assumed = detect(shapes, name_hint="/m/model.safetensors")
    assert assumed.config == SD2_V and assumed.prediction_source.startswith("assumed")
    assert any("--prediction eps" in n for n in assumed.notes)
    forced = detect(shapes, global_step=110000, prediction="eps")
    assert forced.config == SD2_BASE and forced.prediction_source == "given by the caller"


def test_non_sd2_families_ignore_sd2_rules(full_shapes: dict[str, dict[str, tuple[int, ...]]]) -> None:
    assert detect(full_shapes["sd1"], global_step=110000, name_hint="768.ckpt").config == SD1
    assert detect(full_shapes["x4-upscaler"], global_step=875000).config == X4_UPSCALER


@pytest.mark.parametrize("name", list(TINY))
def test_tiny_sizes_without_metadata(name: str) -> None:
    cfg = TINY[name]
    det = detect(_shapes(cfg), prediction=cfg.schedule.prediction)
    assert not det.standard and det.config.name.endswith("-custom")
    got, want = det.config, cfg

    # Heads and attention upcasting are not in the weights; everything else is (an OpenAI tower stores no
    # projection width either).
    def unstored(u: UNetConfig) -> UNetConfig:
        return replace(u, num_heads=None, head_dim=1, upcast_attention=False)

    assert unstored(got.unet) == unstored(want.unet)
    assert got.vae == want.vae
    embed = 1 if cfg.text.kind == "openai" else want.text.embed_dim
    assert replace(got.text, heads=1, embed_dim=embed) == replace(want.text, heads=1, embed_dim=embed)
    assert any("heads" in n for n in det.notes)


@pytest.mark.parametrize("name", list(TINY))
def test_metadata_config_wins(name: str) -> None:
    cfg = TINY[name]
    det = detect(_shapes(cfg), metadata={"stablekit.config": config_to_json(cfg)})
    assert det.config == cfg and det.prediction_source == "the file's stablekit config"


@pytest.mark.parametrize("cfg", [*PRESETS.values(), *TINY.values()], ids=lambda c: c.name)
def test_config_json_round_trip(cfg: ModelConfig) -> None:
    assert config_from_json(config_to_json(cfg)) == cfg


def test_bad_metadata_falls_back_to_shapes(full_shapes: dict[str, dict[str, tuple[int, ...]]]) -> None:
    det = detect(full_shapes["sd1"], metadata={"stablekit.config": '{"name": "x", "bogus": 1}'})
    assert det.config == SD1 and any("ignored the file's stablekit config" in n for n in det.notes)


def test_not_a_whole_model(full_shapes: dict[str, dict[str, tuple[int, ...]]]) -> None:
    vae_only = {k: s for k, s in full_shapes["sd1"].items() if k.startswith("first_stage_model.")}
    with pytest.raises(WeightsError, match=r"model\.diffusion_model\.\*"):
        detect(vae_only)
    broken = dict(full_shapes["sd1"])
    del broken["model.diffusion_model.out.2.weight"]
    with pytest.raises(WeightsError, match=r"out\.2\.weight is missing"):
        detect(broken)


def test_extra_keys_are_split_off() -> None:
    shapes = {
        "model.diffusion_model.out.2.weight": (4,),
        **{k: (1000,) for k in SCHEDULE_BUFFERS},
        "model_ema.decay": (),
        "model_ema.diffusion_modelinput_blocks00weight": (320, 4, 3, 3),
        "depth_model.model.pretrained.x": (3,),
        "low_scale_model.betas": (1000,),
    }
    weights, dropped = split_extras(shapes)
    assert list(weights) == ["model.diffusion_model.out.2.weight"]
    assert sum(len(v) for v in dropped.values()) == len(shapes) - 1
    assert any("EMA" in why for why in dropped)


def test_build_model_names_the_bad_key() -> None:
    cfg = TINY["tiny-sd1"]
    state = LatentDiffusion(cfg).state_dict()
    bad = dict(state)
    bad["model.diffusion_model.out.2.bias"] = torch.zeros(5)
    with pytest.raises(WeightsError, match=r"out\.2\.bias: file has \(5,\)"):
        build_model(cfg, bad)
    missing = {k: v for k, v in state.items() if k != "first_stage_model.quant_conv.weight"}
    with pytest.raises(WeightsError, match=r"missing 1: first_stage_model\.quant_conv\.weight"):
        build_model(cfg, missing)
    extra = {**state, "cond_stage_model.surprise": torch.zeros(1)}
    with pytest.raises(WeightsError, match=r"unexpected 1: cond_stage_model\.surprise"):
        build_model(cfg, extra)


def test_probe_reports_dropped_keys_and_betas(tmp_path: Path) -> None:
    cfg = TINY["tiny-sd1"]
    state = dict(LatentDiffusion(cfg).state_dict())
    state["betas"] = torch.linspace(0.0001, 0.02, 1000)  # not SD's schedule: worth a note
    state["model_ema.decay"] = torch.tensor(0.9999)
    path = tmp_path / "m.safetensors"
    write_safetensors(path, state)
    found = probe(path)
    assert found.family == "sd1" and found.format == "safetensors"
    assert found.dtypes == {"float32": len(state) - 3, "int64": 1}
    assert sorted(k for keys in found.dropped.values() for k in keys) == ["betas", "model_ema.decay"]
    assert found.parameter_counts()["unet"] == sum(
        p.numel() for p in LatentDiffusion(cfg).model.diffusion_model.parameters()
    )
    loaded = load_model(path, prediction="eps")
    assert any("betas run 0.0001..0.02" in n for n in loaded.notes)


def test_openclip_tower_converted_from_diffusers(full_shapes: dict[str, dict[str, tuple[int, ...]]]) -> None:
    # diffusers folders keep the 23 blocks that run and no contrastive head; converters write that back out.
    shapes = {
        k: s
        for k, s in full_shapes["sd2-v"].items()
        if ".resblocks.23." not in k and not k.endswith(("text_projection", "logit_scale"))
    }
    det = detect(shapes, global_step=110000)
    assert det.config == SD2_V and det.standard
