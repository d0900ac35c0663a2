"""MiDaS DPT-Hybrid: parity with transformers' ``DPTForDepthEstimation``, the released key layout, loading errors.

The transformers model is the depth estimator of diffusers' own depth-to-image fixture
(``tests/pipelines/stable_diffusion_2/test_stable_diffusion_depth.py``, ``get_dummy_components``), typed in
here, with random weights perturbed so that no norm is an identity and most of the depth map is positive.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessorPil

from stablekit.models.midas import DPT_HYBRID, DepthConfig, DPTDepthModel
from stablekit.weights.load import write_safetensors
from stablekit.weights.midas import CheckpointError, WeightsError, load_depth_model
from stablekit.weights.tables.midas import depth_config_from_transformers


def _diffusers_fixture_config() -> DPTConfig:
    backbone_config = {
        "global_padding": "same",
        "layer_type": "bottleneck",
        "depths": [3, 4, 9],
        "out_features": ["stage1", "stage2", "stage3"],
        "embedding_dynamic_padding": True,
        "hidden_sizes": [96, 192, 384, 768],
        "num_groups": 2,
    }
    return DPTConfig(
        image_size=32,
        patch_size=16,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=4,
        backbone_out_indices=(0, 1, 2, 3),
        num_attention_heads=4,
        intermediate_size=37,
        hidden_act="gelu",
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        is_decoder=False,
        initializer_range=0.02,
        is_hybrid=True,
        backbone_config=backbone_config,
        backbone_featmap_shape=[1, 384, 24, 24],
    )


def _perturb(model: torch.nn.Module, *, out_bias: str) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:  # GroupNorm / LayerNorm affine
                p.copy_(1 + 0.3 * torch.randn_like(p) if name.endswith("weight") else 0.3 * torch.randn_like(p))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn_like(p))
            elif p.dim() == 3:  # class token, position embedding
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * p[0].numel() ** -0.5)
        # The head ends in a ReLU: shift it so most of the map is positive and every pixel is compared.
        model.get_parameter(out_bias).fill_(3.0)


@pytest.fixture(scope="module")
def hf_model() -> DPTForDepthEstimation:
    torch.manual_seed(0)
    model = DPTForDepthEstimation(_diffusers_fixture_config()).eval()
    _perturb(model, out_bias="head.head.4.bias")
    return model


@pytest.fixture(scope="module")
def hf_folder(hf_model: DPTForDepthEstimation, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("dpt_hybrid")
    hf_model.save_pretrained(folder)
    return folder


def test_config_from_transformers_folder(hf_folder: Path) -> None:
    cfg = depth_config_from_transformers(json.loads((hf_folder / "config.json").read_text()))
    assert cfg == DepthConfig(
        image_size=32,
        patch_size=16,
        hidden_size=32,
        num_layers=4,
        num_heads=4,
        mlp_size=37,
        layer_norm_eps=1e-12,  # DPTConfig's default
        vit_hooks=(2, 3),  # backbone_out_indices[2:]
        stem_width=64,  # BitConfig's embedding_size default
        backbone_depths=(3, 4, 9),
        backbone_widths=(96, 192, 384),  # three stages use the first three hidden_sizes
        norm_groups=2,
        neck_sizes=(96, 192, 384, 768),
        fusion_size=256,
        head_size=32,
        num_classes=0,
    )


def test_parity_with_transformers(hf_model: DPTForDepthEstimation, hf_folder: Path) -> None:
    estimator = load_depth_model(hf_folder)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = hf_model(x).predicted_depth  # (B, H, W)
    ours = estimator.model(x)
    assert ours.shape == ref.shape == (2, 32, 32)
    assert (ref > 0).float().mean() > 0.5 and ref.std() > 0.1
    assert (ours - ref).abs().max() < 1e-4


def test_diffusers_folder_reads_its_depth_estimator(
    hf_model: DPTForDepthEstimation, hf_folder: Path, tmp_path: Path
) -> None:
    (tmp_path / "model_index.json").write_text(
        json.dumps({"depth_estimator": ["transformers", "DPTForDepthEstimation"]})
    )
    (tmp_path / "depth_estimator").symlink_to(hf_folder, target_is_directory=True)
    loaded = load_depth_model(tmp_path).model.state_dict()
    assert torch.equal(
        loaded["pretrained.model.pos_embed"], hf_model.state_dict()["dpt.embeddings.position_embeddings"]
    )
    query = hf_model.state_dict()["dpt.encoder.layer.3.attention.attention.query.weight"]
    assert torch.equal(loaded["pretrained.model.blocks.3.attn.qkv.weight"][:32], query)


def _photo(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, width)[None, :, None] * np.linspace(0.2, 1, height)[:, None, None]
    noise = rng.integers(0, 64, (height, width, 3))
    return Image.fromarray(np.clip(ramp * [1, 0.6, 0.3] + noise, 0, 255).astype(np.uint8), "RGB")


def test_estimate_matches_image_processor_and_model(hf_model: DPTForDepthEstimation, hf_folder: Path) -> None:
    # SD2-depth's feature_extractor settings, at the tiny model's input size. transformers 5 uses this PIL
    # backend for DPTImageProcessor when torchvision is absent; before v5 it was the only one.
    processor = DPTImageProcessorPil(
        do_resize=True,
        size={"height": 32, "width": 32},
        keep_aspect_ratio=False,
        resample=Image.Resampling.BICUBIC,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    images = [_photo(45, 29, 0), _photo(64, 64, 1)]
    pixels = processor(images=images, return_tensors="pt").pixel_values
    with torch.no_grad():
        ref = hf_model(pixels).predicted_depth

    estimator = load_depth_model(hf_folder)
    assert torch.equal(estimator.preprocess(images), pixels)
    depth = estimator.estimate(images)
    assert depth.dtype == torch.float32 and depth.shape == (2, 32, 32)
    assert (depth - ref).abs().max() < 1e-4


TINY = DepthConfig(
    image_size=32,
    hidden_size=32,
    num_layers=2,
    num_heads=2,
    mlp_size=48,
    vit_hooks=(0, 1),
    stem_width=8,
    backbone_depths=(1, 2, 1),
    backbone_widths=(16, 32, 64),
    norm_groups=2,
    neck_sizes=(16, 32, 24, 40),
    fusion_size=16,
    head_size=8,
    num_classes=10,
)


@pytest.fixture
def tiny_model() -> DPTDepthModel:
    model = DPTDepthModel(TINY).eval()
    _perturb(model, out_bias="scratch.output_conv.4.bias")
    return model


@pytest.mark.parametrize(
    ("fmt", "prefix"),
    [
        ("safetensors", ""),
        ("torch-zip", ""),
        ("torch-legacy", ""),
        ("safetensors", "depth_model.model."),
        ("torch-zip", "depth_model."),
    ],
)
def test_released_layout_round_trip(tiny_model: DPTDepthModel, tmp_path: Path, fmt: str, prefix: str) -> None:
    state = {prefix + k: t for k, t in tiny_model.state_dict().items()}
    if prefix:  # an SD 2 depth checkpoint holds the rest of the model beside MiDaS
        state["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(4, 5, 3, 3)
    path = tmp_path / ("depth.safetensors" if fmt == "safetensors" else "depth.pt")
    if fmt == "safetensors":
        write_safetensors(path, state)
    else:
        torch.save(state, path, _use_new_zipfile_serialization=fmt == "torch-zip")

    estimator = load_depth_model(path, config=TINY)
    assert estimator.config == TINY
    loaded = estimator.model.state_dict()
    assert loaded.keys() == tiny_model.state_dict().keys()
    assert all(torch.equal(loaded[k], t) for k, t in tiny_model.state_dict().items())
    x = torch.randn(1, 3, 64, 32)
    with torch.no_grad():
        assert torch.equal(estimator.model(x), tiny_model(x))


def test_head_less_file_and_bfloat16(tiny_model: DPTDepthModel, tmp_path: Path) -> None:
    state = {k: t for k, t in tiny_model.state_dict().items() if not k.startswith("pretrained.model.head.")}
    write_safetensors(tmp_path / "d.safetensors", state)
    estimator = load_depth_model(tmp_path / "d.safetensors", config=TINY, dtype=torch.bfloat16)
    assert estimator.config.num_classes == 0 and estimator.dtype == torch.bfloat16
    image = [_photo(40, 30, 2)]
    half = estimator.estimate(image)
    full = estimator.to(dtype=torch.float32).estimate(image)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    assert (half - full).abs().max() < 0.05 * full.abs().max()


# Keys and shapes of the released dpt_hybrid-midas-501f0c75.pt, from isl-org/MiDaS (dpt_depth.py, blocks.py,
# backbones/vit.py ``_make_vit_b_rn50_backbone``) and timm's ``vit_base_resnet50_384``.
RELEASED = {
    "pretrained.model.cls_token": (1, 1, 768),
    "pretrained.model.pos_embed": (1, 577, 768),  # 24·24 patches + class token
    "pretrained.model.patch_embed.backbone.stem.conv.weight": (64, 3, 7, 7),
    "pretrained.model.patch_embed.backbone.stem.norm.weight": (64,),
    "pretrained.model.patch_embed.backbone.stages.0.blocks.0.downsample.conv.weight": (256, 64, 1, 1),
    "pretrained.model.patch_embed.backbone.stages.0.blocks.0.conv2.weight": (64, 64, 3, 3),
    "pretrained.model.patch_embed.backbone.stages.1.blocks.0.downsample.norm.bias": (512,),
    "pretrained.model.patch_embed.backbone.stages.1.blocks.3.conv1.weight": (128, 512, 1, 1),
    "pretrained.model.patch_embed.backbone.stages.2.blocks.8.conv3.weight": (1024, 256, 1, 1),
    "pretrained.model.patch_embed.backbone.stages.2.blocks.8.norm3.weight": (1024,),
    "pretrained.model.patch_embed.proj.weight": (768, 1024, 1, 1),
    "pretrained.model.blocks.0.norm1.weight": (768,),
    "pretrained.model.blocks.0.attn.qkv.weight": (2304, 768),
    "pretrained.model.blocks.11.attn.proj.weight": (768, 768),
    "pretrained.model.blocks.11.mlp.fc1.weight": (3072, 768),
    "pretrained.model.blocks.11.mlp.fc2.bias": (768,),
    "pretrained.model.norm.weight": (768,),
    "pretrained.model.head.weight": (1000, 768),
    "pretrained.act_postprocess3.0.project.0.weight": (768, 1536),
    "pretrained.act_postprocess3.3.weight": (768, 768, 1, 1),
    "pretrained.act_postprocess4.0.project.0.bias": (768,),
    "pretrained.act_postprocess4.3.weight": (768, 768, 1, 1),
    "pretrained.act_postprocess4.4.weight": (768, 768, 3, 3),
    "scratch.layer1_rn.weight": (256, 256, 3, 3),
    "scratch.layer2_rn.weight": (256, 512, 3, 3),
    "scratch.layer3_rn.weight": (256, 768, 3, 3),
    "scratch.layer4_rn.weight": (256, 768, 3, 3),
    "scratch.refinenet1.out_conv.weight": (256, 256, 1, 1),
    "scratch.refinenet4.resConfUnit1.conv1.weight": (256, 256, 3, 3),
    "scratch.refinenet2.resConfUnit2.conv2.bias": (256,),
    "scratch.output_conv.0.weight": (128, 256, 3, 3),
    "scratch.output_conv.2.weight": (32, 128, 3, 3),
    "scratch.output_conv.4.weight": (1, 32, 1, 1),
    "scratch.output_conv.4.bias": (1,),
}
# Not in the hybrid file: its first two maps come straight from the ResNet (act_postprocess1/2 are empty),
# the backbone is post-activation (no final norm), and nothing has a bias before a GroupNorm.
NOT_RELEASED = (
    "pretrained.act_postprocess1.0.project.0.weight",
    "pretrained.act_postprocess2.3.weight",
    "pretrained.model.patch_embed.backbone.norm.weight",
    "pretrained.model.patch_embed.backbone.stem.conv.bias",
    "scratch.layer1_rn.bias",
    "scratch.output_conv.6.weight",
)


def test_released_preset_layout() -> None:
    with torch.device("meta"):
        model = DPTDepthModel(DPT_HYBRID)
    shapes = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    assert {k: shapes.get(k) for k in RELEASED} == RELEASED
    assert not set(NOT_RELEASED) & shapes.keys()
    # stem 3 + ResNet (3+4+9)·9 + 3·3 downsample + proj 2 + cls/pos 2 + ViT 12·12 + norm 2 + head 2
    # + readouts 4 + 6 + layer_rn 4 + refinenets 4·10 + output_conv 6
    assert len(shapes) == 3 + 144 + 9 + 2 + 2 + 144 + 2 + 2 + 4 + 6 + 4 + 40 + 6
    # DPT paper / MiDaS: ViT-Hybrid has 123M parameters (the .pt is 470 MiB of fp32).
    assert 122e6 < sum(p.numel() for p in model.parameters()) < 124e6


def test_not_a_depth_model(tmp_path: Path) -> None:
    path = tmp_path / "unet.safetensors"
    write_safetensors(path, {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 5, 3, 3)})
    with pytest.raises(ValueError, match=r"unet\.safetensors: not a MiDaS depth model"):
        load_depth_model(path)


def test_truncated_file(tiny_model: DPTDepthModel, tmp_path: Path) -> None:
    path = tmp_path / "cut.safetensors"
    write_safetensors(path, tiny_model.state_dict())
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors: .*truncated"):
        load_depth_model(path, config=TINY)


def test_wrong_architecture(tiny_model: DPTDepthModel, tmp_path: Path) -> None:
    path = tmp_path / "tiny.safetensors"
    write_safetensors(path, tiny_model.state_dict())
    with pytest.raises(WeightsError, match=r"tiny\.safetensors: .*file has \(1, 5, 32\), model wants \(1, 577, 768\)"):
        load_depth_model(path)  # the released preset's shapes


def test_transformers_weights_without_config(hf_folder: Path) -> None:
    with pytest.raises(CheckpointError, match="config.json"):
        load_depth_model(hf_folder / "model.safetensors")


def test_non_hybrid_folder(tmp_path: Path) -> None:
    DPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37).to_json_file(
        tmp_path / "config.json"
    )
    with pytest.raises(ValueError, match=r"config\.json: is_hybrid is not true"):
        load_depth_model(tmp_path)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"hidden_act": "relu"}, "hidden_act"),
        ({"reassemble_factors": [4, 2, 2, 0.5]}, "reassemble_factors"),
        ({"use_batch_norm_in_fusion_residual": True}, "use_batch_norm_in_fusion_residual"),
        ({"backbone_config": {"layer_type": "preactivation"}}, "backbone_config.layer_type"),
        ({"backbone_config": {"depths": [3, 4, 6, 3]}}, "backbone_config.depths"),
        ({"architectures": ["DPTForSemanticSegmentation"]}, "architectures"),
    ],
)
def test_unrepresentable_configs_name_the_field(hf_folder: Path, change: dict[str, object], field: str) -> None:
    d = json.loads((hf_folder / "config.json").read_text())
    for key, value in change.items():
        d[key] = {**d[key], **value} if isinstance(value, dict) else value
    with pytest.raises(ValueError, match=field):
        depth_config_from_transformers(d)


def test_config_rejects_impossible_sizes() -> None:
    with pytest.raises(ValueError, match="neck_sizes"):
        replace(DPT_HYBRID, neck_sizes=(128, 512, 768, 768))
