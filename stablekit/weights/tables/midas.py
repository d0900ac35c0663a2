"""MiDaS DPT-Hybrid: released MiDaS keys <-> transformers ``DPTForDepthEstimation`` (``is_hybrid=True``) keys.

The released layout is :mod:`stablekit.models.midas`'s (timm's ``vit_base_resnet50_384`` under
``pretrained.model.``, the DPT neck and head under ``scratch.``). transformers renames it as its own conversion
script (``convert_dpt_hybrid_to_pytorch.py``) does: the BiT ResNet under ``dpt.embeddings.backbone.bit``, the
ViT blocks as ``dpt.encoder.layer.N`` with separate query/key/value projections, the reassembly under
``neck.reassemble_stage``, ``refinenetK`` as ``neck.fusion_stage.layers.(4 - K)``, the head as ``head.head``.
transformers drops timm's unused ImageNet classifier, so a config read here has ``num_classes=0``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from stablekit.models.midas import DepthConfig, make_div

_BOTTLENECK = ("conv1", "norm1", "conv2", "norm2", "conv3", "norm3")
_VIT_BLOCK = {
    "norm1": "layernorm_before",
    "attn.proj": "attention.output.dense",
    "norm2": "layernorm_after",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}
_QKV = ("query", "key", "value")
_FUSION = {
    "out_conv": "projection",
    "resConfUnit1.conv1": "residual_layer1.convolution1",
    "resConfUnit1.conv2": "residual_layer1.convolution2",
    "resConfUnit2.conv1": "residual_layer2.convolution1",
    "resConfUnit2.conv2": "residual_layer2.convolution2",
}


def depth_table(cfg: DepthConfig) -> dict[str, str]:
    """Every released leaf-module path -> its ``DPTForDepthEstimation`` module path."""
    ours_bb, theirs_bb = "pretrained.model.patch_embed.backbone", "dpt.embeddings.backbone.bit"
    table = {
        f"{ours_bb}.stem.conv": f"{theirs_bb}.embedder.convolution",
        f"{ours_bb}.stem.norm": f"{theirs_bb}.embedder.norm",
        "pretrained.model.patch_embed.proj": "dpt.embeddings.projection",
        "pretrained.model.norm": "dpt.layernorm",
    }
    for s, depth in enumerate(cfg.backbone_depths):
        for b in range(depth):
            ours, theirs = f"{ours_bb}.stages.{s}.blocks.{b}", f"{theirs_bb}.encoder.stages.{s}.layers.{b}"
            leaves = [*_BOTTLENECK, "downsample.conv", "downsample.norm"] if b == 0 else list(_BOTTLENECK)
            table |= {f"{ours}.{leaf}": f"{theirs}.{leaf}" for leaf in leaves}
    for i in range(cfg.num_layers):
        table |= {f"pretrained.model.blocks.{i}.{a}": f"dpt.encoder.layer.{i}.{b}" for a, b in _VIT_BLOCK.items()}
    # MiDaS's feature maps 3 and 4 are transformers' reassemble stages 2 and 3 (0 and 1 are the ResNet's).
    for k, stage in ((3, 2), (4, 3)):
        table[f"pretrained.act_postprocess{k}.0.project.0"] = f"neck.reassemble_stage.readout_projects.{stage}.0"
        table[f"pretrained.act_postprocess{k}.3"] = f"neck.reassemble_stage.layers.{stage}.projection"
    table["pretrained.act_postprocess4.4"] = "neck.reassemble_stage.layers.3.resize"
    for k in range(1, 5):
        table[f"scratch.layer{k}_rn"] = f"neck.convs.{k - 1}"
        # transformers fuses from the coarsest map: its layer 0 is refinenet4.
        table |= {f"scratch.refinenet{k}.{a}": f"neck.fusion_stage.layers.{4 - k}.{b}" for a, b in _FUSION.items()}
    for j in (0, 2, 4):
        table[f"scratch.output_conv.{j}"] = f"head.head.{j}"
    return table


def depth_splits(cfg: DepthConfig) -> dict[str, list[str]]:
    """Released tensor key -> the transformers tensor keys stacked (dim 0) to form it."""
    # Bare parameters of ``pretrained.model``, not a module's ``weight``: a one-part split is a plain rename.
    splits = {
        "pretrained.model.cls_token": ["dpt.embeddings.cls_token"],
        "pretrained.model.pos_embed": ["dpt.embeddings.position_embeddings"],
    }
    for i in range(cfg.num_layers):
        attn = f"dpt.encoder.layer.{i}.attention.attention"
        for param in ("weight", "bias"):
            splits[f"pretrained.model.blocks.{i}.attn.qkv.{param}"] = [f"{attn}.{p}.{param}" for p in _QKV]
    return splits


# DPTConfig / BitConfig defaults (transformers 5), used for keys a config.json leaves out.
_DPT_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-12,
    "image_size": 384,
    "patch_size": 16,
    "num_channels": 3,
    "backbone_out_indices": [2, 5, 8, 11],
    "neck_hidden_sizes": [96, 192, 384, 768],
    "fusion_hidden_size": 256,
    "backbone_featmap_shape": [1, 1024, 24, 24],
}
# DPTConfig fills a hybrid's missing backbone_config with these, over BitConfig's own defaults.
_BIT_DEFAULTS: dict[str, Any] = {
    "layer_type": "bottleneck",
    "global_padding": "same",
    "depths": [3, 4, 9],
    "out_features": ["stage1", "stage2", "stage3"],
    "embedding_dynamic_padding": True,
    "embedding_size": 64,
    "hidden_sizes": [256, 512, 1024, 2048],
    "num_groups": 32,
    "hidden_act": "relu",
    "width_factor": 1,
    "output_stride": 32,
}
# Settings whose other values select layers MiDaS's DPT-Hybrid does not have: field -> the values we accept.
_FIXED: dict[str, tuple[Any, ...]] = {
    "readout_type": ("project",),
    "hidden_act": ("gelu",),
    "qkv_bias": (True,),
    "add_projection": (False,),
    "use_batch_norm_in_fusion_residual": (False,),
    "use_bias_in_fusion_residual": (None, True),
    "head_in_index": (-1,),
    "neck_ignore_stages": ([0, 1],),
    "backbone": (None,),
    "use_timm_backbone": (False,),
}
_BIT_FIXED: dict[str, tuple[Any, ...]] = {
    "model_type": ("bit",),
    "layer_type": ("bottleneck",),
    "global_padding": ("same", "SAME"),
    "embedding_dynamic_padding": (True,),
    "hidden_act": ("relu",),
}


def _square(value: Any, name: str) -> int:
    if isinstance(value, list | tuple):
        if len(value) != 2 or value[0] != value[1]:
            raise ValueError(f"{name} {value!r}: only square sizes are supported")
        value = value[0]
    return int(value)


def depth_config_from_transformers(d: Mapping[str, Any]) -> DepthConfig:
    """The :class:`DepthConfig` of a transformers ``DPTForDepthEstimation`` ``config.json``.

    Only the hybrid (ViT + BiT ResNet) layout is representable; anything else raises ``ValueError`` naming the
    field. Missing keys take transformers' defaults.
    """
    if d.get("model_type", "dpt") != "dpt":
        raise ValueError(f"model_type {d.get('model_type')!r} is not a DPT model")
    archs = d.get("architectures") or ["DPTForDepthEstimation"]
    if "DPTForDepthEstimation" not in archs:
        raise ValueError(f"architectures {archs!r}: only DPTForDepthEstimation is a depth model")
    if d.get("is_hybrid") is not True:
        raise ValueError(
            "is_hybrid is not true: only DPT-Hybrid (ViT-B + BiT ResNet, MiDaS dpt_hybrid) is supported, "
            "not plain-ViT DPT (dpt-large) or other backbones"
        )
    for key, allowed in _FIXED.items():
        if key in d and d[key] not in allowed:
            raise ValueError(f"{key} {d[key]!r} is not supported (MiDaS DPT-Hybrid uses {allowed[0]!r})")
    factors = list(d.get("reassemble_factors", [4, 2, 1, 0.5]))
    if len(factors) != 4 or factors[2:] != [1, 0.5]:
        raise ValueError(f"reassemble_factors {factors!r}: DPT-Hybrid needs [..., ..., 1, 0.5]")

    v = {**_DPT_DEFAULTS, **{k: d[k] for k in _DPT_DEFAULTS if d.get(k) is not None}}
    bit = {**_BIT_DEFAULTS, **(d.get("backbone_config") or {})}
    for key, allowed in _BIT_FIXED.items():
        if key in bit and bit[key] not in allowed:
            raise ValueError(f"backbone_config.{key} {bit[key]!r} is not supported (BiT uses {allowed[0]!r})")
    depths = tuple(int(n) for n in bit["depths"])
    if len(depths) != 3:
        raise ValueError(f"backbone_config.depths {list(depths)}: the hybrid backbone has 3 stages")
    if int(bit["output_stride"]) < 16:
        raise ValueError(f"backbone_config.output_stride {bit['output_stride']}: dilated backbones are not supported")
    stages = ["stage1", "stage2", "stage3"]
    features = bit.get("out_features") or bit.get("_out_features")
    indices = bit.get("out_indices") or bit.get("_out_indices")
    if list(features or []) != stages and list(indices or []) != [1, 2, 3]:
        raise ValueError(f"backbone_config.out_features {features!r}: DPT-Hybrid reads {stages}")
    widths = tuple(make_div(int(h) * int(bit["width_factor"])) for h in bit["hidden_sizes"][:3])
    featmap = list(v["backbone_featmap_shape"])
    if len(featmap) != 4 or int(featmap[1]) != widths[-1]:
        raise ValueError(f"backbone_featmap_shape {featmap!r}: channel 1 must be the last stage width {widths[-1]}")
    out_indices = [int(i) for i in v["backbone_out_indices"]]
    if len(out_indices) != 4:
        raise ValueError(f"backbone_out_indices {out_indices!r} must have 4 entries")
    neck = tuple(int(n) for n in v["neck_hidden_sizes"])
    if len(neck) != 4:
        raise ValueError(f"neck_hidden_sizes {list(neck)!r} must have 4 entries")
    return DepthConfig(
        image_size=_square(v["image_size"], "image_size"),
        patch_size=_square(v["patch_size"], "patch_size"),
        in_channels=int(v["num_channels"]),
        hidden_size=int(v["hidden_size"]),
        num_layers=int(v["num_hidden_layers"]),
        num_heads=int(v["num_attention_heads"]),
        mlp_size=int(v["intermediate_size"]),
        layer_norm_eps=float(v["layer_norm_eps"]),
        vit_hooks=(out_indices[2], out_indices[3]),
        stem_width=int(bit["embedding_size"]),
        backbone_depths=(depths[0], depths[1], depths[2]),
        backbone_widths=(widths[0], widths[1], widths[2]),
        norm_groups=int(bit["num_groups"]),
        neck_sizes=(neck[0], neck[1], neck[2], neck[3]),
        fusion_size=int(v["fusion_hidden_size"]),
        head_size=32,  # transformers hard-codes the head's middle width
        num_classes=0,
    )
