"""UNet parity with diffusers' UNet2DConditionModel on identical random weights, the key table, the config
translation, and the full-size key/shape facts of the released checkpoints (on the meta device)."""

from __future__ import annotations

from functools import cache

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.embeddings import get_timestep_embedding

from stablekit.config import (
    SD1,
    SD1_INPAINT,
    SD2_BASE,
    SD2_DEPTH,
    SD2_INPAINT,
    SD2_V,
    X4_UPSCALER,
    UNetConfig,
)
from stablekit.models.unet import UNetModel
from stablekit.nn.layers import GroupNorm32, timestep_embedding
from stablekit.weights.convert import WeightsError, fit_state_dict, from_original, to_original
from stablekit.weights.tables.unet import diffusers_unet_config, unet_config_from_diffusers, unet_table
from tests.tiny import TINY_SD1, TINY_SD1_INPAINT, TINY_SD2, TINY_SD2_DEPTH, TINY_SD2_INPAINT, TINY_X4

TINY_UNETS = {c.name: c.unet for c in (TINY_SD1, TINY_SD1_INPAINT, TINY_SD2, TINY_SD2_INPAINT, TINY_SD2_DEPTH, TINY_X4)}


@cache
def _pair(name: str) -> tuple[UNet2DConditionModel, UNetModel]:
    """A randomly initialised diffusers UNet and ours loaded from its converted weights."""
    cfg = TINY_UNETS[name]
    gen = torch.Generator().manual_seed(1234)
    ref = UNet2DConditionModel(**diffusers_unet_config(cfg, sample_size=16)).eval()
    with torch.no_grad():
        # Move every tensor off its init value: norms away from 1/0, biases away from 0.
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    ours = UNetModel(cfg).eval()
    ours.load_state_dict(fit_state_dict(ours, to_original(ref.state_dict(), unet_table(cfg))), strict=True)
    return ref, ours


def _inputs(cfg: UNetConfig, h: int, w: int, timesteps: tuple[float, float]) -> dict[str, torch.Tensor | None]:
    return {
        "x": torch.randn(2, cfg.in_channels, h, w),
        "t": torch.tensor(timesteps),
        "ctx": torch.randn(2, 7, cfg.context_dim),
        "y": torch.tensor([20, 349]) if cfg.num_classes else None,
    }


@torch.no_grad()
def _both(name: str, h: int, w: int, timesteps: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    ref, ours = _pair(name)
    i = _inputs(TINY_UNETS[name], h, w, timesteps)
    want = ref(i["x"], i["t"], i["ctx"], class_labels=i["y"]).sample
    got = ours(i["x"], i["t"], i["ctx"], i["y"])
    return want, got


@pytest.mark.parametrize("name", TINY_UNETS)
@pytest.mark.parametrize("timesteps", [(0.0, 999.0), (1.0, 500.0), (261.5, 37.0)])
def test_matches_diffusers(name: str, timesteps: tuple[float, float]) -> None:
    want, got = _both(name, 16, 16, timesteps)
    assert want.abs().max() > 0.5  # a live network, not a pass-through of zeros
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["tiny-sd1", "tiny-sd2", "tiny-x4"])
@pytest.mark.parametrize("size", [(12, 20), (13, 18), (9, 7)])
def test_odd_latent_sizes_match_diffusers(name: str, size: tuple[int, int]) -> None:
    want, got = _both(name, *size, (3.0, 640.0))
    assert got.shape == want.shape == (2, 4, *size)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@torch.no_grad()
def test_integer_and_scalar_timesteps() -> None:
    ref, ours = _pair("tiny-sd2")
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
    t = torch.tensor([17, 17])
    want = ref(x, t, ctx).sample
    torch.testing.assert_close(ours(x, t, ctx), want, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours(x, torch.tensor(17), ctx), want, atol=1e-4, rtol=0)


@torch.no_grad()
def test_class_labels_required_exactly_for_x4() -> None:
    _, x4 = _pair("tiny-x4")
    _, sd1 = _pair("tiny-sd1")
    with pytest.raises(ValueError):
        x4(torch.randn(1, 7, 8, 8), torch.tensor([1.0]), torch.randn(1, 3, 32))
    with pytest.raises(ValueError):
        sd1(torch.randn(1, 4, 8, 8), torch.tensor([1.0]), torch.randn(1, 3, 32), torch.tensor([1]))


@torch.no_grad()
def test_channels_last_gives_same_output() -> None:
    _, ours = _pair("tiny-sd1")
    x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([5.0, 700.0]), torch.randn(2, 7, 32)
    want = ours(x, t, ctx)
    ours_cl = UNetModel(TINY_UNETS["tiny-sd1"]).eval()
    ours_cl.load_state_dict(ours.state_dict())
    ours_cl.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    got = ours_cl(x.to(memory_format=torch.channels_last), t, ctx)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype, atol", [(torch.float16, 2e-2), (torch.bfloat16, 1e-1)])
@pytest.mark.parametrize("name", ["tiny-sd1", "tiny-x4"])
@torch.no_grad()
def test_half_precision_close_to_fp32(name: str, dtype: torch.dtype, atol: float) -> None:
    cfg = TINY_UNETS[name]
    _, ours = _pair(name)
    i = _inputs(cfg, 16, 16, (1.0, 999.0))
    x, t, ctx, y = i["x"], i["t"], i["ctx"], i["y"]
    assert x is not None and t is not None and ctx is not None
    want = ours(x, t, ctx, y)
    half = UNetModel(cfg).eval()
    half.load_state_dict(ours.state_dict())
    half.to(dtype)
    got = half(x.to(dtype), t, ctx.to(dtype), y)
    assert got.dtype == dtype
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), want, atol=atol, rtol=0)


@pytest.mark.parametrize("name", TINY_UNETS)
def test_table_round_trip(name: str) -> None:
    ref, _ = _pair(name)
    table = unet_table(TINY_UNETS[name])
    sd = ref.state_dict()
    back = from_original(to_original(sd, table), table)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    assert len(set(table.values())) == len(table)


@pytest.mark.parametrize("name", TINY_UNETS)
def test_config_round_trip(name: str) -> None:
    ref, _ = _pair(name)
    cfg = TINY_UNETS[name]
    assert unet_config_from_diffusers(diffusers_unet_config(cfg, 16)) == cfg
    # diffusers' own saved config carries every default it fills in.
    assert unet_config_from_diffusers(dict(ref.config)) == cfg


# unet/config.json of the released diffusers repos, from the fact sheet (§3): the head count hides in
# ``attention_head_dim``, an int for SD1/x4 and a per-level list for SD2.
_HUB_SD15 = {
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "norm_num_groups": 32,
    "norm_eps": 1e-05,
    "sample_size": 64,
}
_HUB_SD21 = _HUB_SD15 | {
    "attention_head_dim": [5, 10, 20, 20],
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
    "upcast_attention": True,
    "sample_size": 96,
    "num_attention_heads": None,
}
_HUB_X4 = _HUB_SD15 | {
    "in_channels": 7,
    "block_out_channels": [256, 512, 512, 1024],
    "down_block_types": ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 3,
    "up_block_types": ["CrossAttnUpBlock2D"] * 3 + ["UpBlock2D"],
    "cross_attention_dim": 1024,
    "use_linear_projection": True,
    "num_class_embeds": 1000,
    "only_cross_attention": [True, True, True, False],
    "sample_size": 128,
}


@pytest.mark.parametrize(
    "hub, want",
    [
        (_HUB_SD15, SD1.unet),
        (_HUB_SD15 | {"in_channels": 9}, SD1_INPAINT.unet),
        (_HUB_SD21, SD2_V.unet),
        (_HUB_SD21 | {"upcast_attention": False}, SD2_BASE.unet),
        (_HUB_X4, X4_UPSCALER.unet),
    ],
)
def test_config_from_released_diffusers_configs(hub: dict[str, object], want: UNetConfig) -> None:
    assert unet_config_from_diffusers(hub) == want
    assert unet_config_from_diffusers(diffusers_unet_config(want, 64)) == want


def test_config_rejects_other_unets() -> None:
    with pytest.raises(ValueError):
        unet_config_from_diffusers(_HUB_SD15 | {"class_embed_type": "timestep"})
    with pytest.raises(ValueError):
        unet_config_from_diffusers(_HUB_SD15 | {"down_block_types": ["SimpleCrossAttnDownBlock2D"] * 4})


def _meta_shapes(cfg: UNetConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = UNetModel(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# Fact sheet, "Identifying tensors" (None = absent).
_IDENTIFYING = {
    "input_blocks.0.0.weight": {
        "sd1": (320, 4, 3, 3),
        "sd1-inpaint": (320, 9, 3, 3),
        "sd2-base": (320, 4, 3, 3),
        "sd2-inpaint": (320, 9, 3, 3),
        "sd2-depth": (320, 5, 3, 3),
        "x4-upscaler": (256, 7, 3, 3),
    },
    "input_blocks.1.1.proj_in.weight": {
        "sd1": (320, 320, 1, 1),
        "sd1-inpaint": (320, 320, 1, 1),
        "sd2-base": (320, 320),
        "sd2-inpaint": (320, 320),
        "sd2-depth": (320, 320),
        "x4-upscaler": None,
    },
    "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": {
        "sd1": (320, 768),
        "sd1-inpaint": (320, 768),
        "sd2-base": (320, 1024),
        "sd2-inpaint": (320, 1024),
        "sd2-depth": (320, 1024),
        "x4-upscaler": None,
    },
    "input_blocks.10.0.skip_connection.weight": {
        "sd1": None,
        "sd1-inpaint": None,
        "sd2-base": None,
        "sd2-inpaint": None,
        "sd2-depth": None,
        "x4-upscaler": (1024, 512, 1, 1),
    },
    "time_embed.0.weight": {
        "sd1": (1280, 320),
        "sd1-inpaint": (1280, 320),
        "sd2-base": (1280, 320),
        "sd2-inpaint": (1280, 320),
        "sd2-depth": (1280, 320),
        "x4-upscaler": (1024, 256),
    },
    "label_emb.weight": {
        "sd1": None,
        "sd1-inpaint": None,
        "sd2-base": None,
        "sd2-inpaint": None,
        "sd2-depth": None,
        "x4-upscaler": (1000, 1024),
    },
}
_FULL = {c.name: c.unet for c in (SD1, SD1_INPAINT, SD2_BASE, SD2_INPAINT, SD2_DEPTH, X4_UPSCALER)}


@pytest.mark.parametrize("family", _FULL)
def test_full_size_identifying_keys(family: str) -> None:
    shapes = _meta_shapes(_FULL[family])
    for key, per_family in _IDENTIFYING.items():
        assert shapes.get(key) == per_family[family], key


@pytest.mark.parametrize(
    "family, res_in, upsamplers",
    [
        (
            "sd1",
            [2560, 2560, 2560, 2560, 2560, 1920, 1920, 1280, 960, 960, 640, 640],
            ("output_blocks.2.1.conv", "output_blocks.5.2.conv", "output_blocks.8.2.conv"),
        ),
        (
            "sd2-base",
            [2560, 2560, 2560, 2560, 2560, 1920, 1920, 1280, 960, 960, 640, 640],
            ("output_blocks.2.1.conv", "output_blocks.5.2.conv", "output_blocks.8.2.conv"),
        ),
        (
            "x4-upscaler",
            [2048, 2048, 1536, 1536, 1024, 1024, 1024, 1024, 768, 768, 512, 512],
            ("output_blocks.2.2.conv", "output_blocks.5.2.conv", "output_blocks.8.2.conv"),
        ),
    ],
)
def test_full_size_output_blocks(family: str, res_in: list[int], upsamplers: tuple[str, ...]) -> None:
    shapes = _meta_shapes(_FULL[family])
    assert [shapes[f"output_blocks.{k}.0.in_layers.2.weight"][1] for k in range(12)] == res_in
    assert all(f"output_blocks.{k}.0.skip_connection.weight" in shapes for k in range(12))
    for key in upsamplers:
        assert f"{key}.weight" in shapes
    assert sum(1 for k in shapes if k.startswith("output_blocks.") and k.endswith(".conv.weight")) == 3


def test_full_size_x4_self_attention_switch() -> None:
    shapes = _meta_shapes(X4_UPSCALER.unet)
    # Levels 1-2 attend to the 1024-wide text context in attn1; level 3 and the middle keep self-attention.
    assert shapes["input_blocks.4.1.transformer_blocks.0.attn1.to_k.weight"] == (512, 1024)
    assert shapes["output_blocks.8.1.transformer_blocks.0.attn1.to_k.weight"] == (512, 1024)
    assert shapes["input_blocks.10.1.transformer_blocks.0.attn1.to_k.weight"] == (1024, 1024)
    level0_transformers = ("input_blocks.1.1.", "input_blocks.2.1.", "output_blocks.11.1.")
    assert not any(k.startswith(level0_transformers) for k in shapes)


@pytest.mark.parametrize("family", ["sd1", "sd2-base", "x4-upscaler"])
def test_full_size_table_fits_diffusers(family: str) -> None:
    cfg = _FULL[family]
    with torch.device("meta"):
        ref = UNet2DConditionModel(**diffusers_unet_config(cfg, 64))
        ours = UNetModel(cfg)
    fitted = fit_state_dict(ours, to_original(ref.state_dict(), unet_table(cfg)))
    assert fitted.keys() == ours.state_dict().keys()
    assert sum(v.numel() for v in fitted.values()) == sum(p.numel() for p in ref.parameters())


def test_fit_state_dict_reshapes_only_between_linear_and_1x1_conv() -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1), torch.nn.Conv2d(2, 3, (1, 7)))
    state = dict(model.state_dict())
    state["0.weight"] = state["0.weight"].reshape(3, 2)  # the same layer saved as a linear one
    assert fit_state_dict(model, state)["0.weight"].shape == (3, 2, 1, 1)
    state["1.weight"] = torch.zeros(3, 2, 7, 1)  # as many numbers, but a (7, 1) kernel is not a (1, 7) one
    with pytest.raises(WeightsError, match=r"1\.weight: file has \(3, 2, 7, 1\)"):
        fit_state_dict(model, state)


def test_timestep_embedding_is_cos_first_sinusoid() -> None:
    t = torch.tensor([0.0, 1.0, 999.0])
    emb = timestep_embedding(t, 320)
    assert emb.dtype == torch.float32 and emb.shape == (3, 320)
    torch.testing.assert_close(emb[0], torch.cat([torch.ones(160), torch.zeros(160)]))
    # Lowest frequency is exp(0) = 1: column 0 is cos(t), column 160 is sin(t).
    torch.testing.assert_close(emb[:, 0], torch.cos(t))
    torch.testing.assert_close(emb[:, 160], torch.sin(t))
    want = get_timestep_embedding(t, 320, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(emb, want, atol=1e-6, rtol=0)


def test_group_norm_32_normalises_in_fp32() -> None:
    norm = GroupNorm32(4, 16).to(torch.float16)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = (torch.randn(2, 16, 8, 8) * 50 + 300).to(torch.float16)  # fp16 variance of this would lose bits
    got = norm(x)
    want = torch.nn.functional.group_norm(x.float(), 4, norm.weight.float(), norm.bias.float(), 1e-5)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got, want.to(torch.float16), atol=0, rtol=0)
