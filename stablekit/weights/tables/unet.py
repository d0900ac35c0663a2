"""UNet: original ``openaimodel`` layout <-> diffusers ``UNet2DConditionModel``.

Paths are relative to ``model.diffusion_model.`` (original) and ``unet/`` (diffusers). The numbering rules
follow diffusers' ``convert_ldm_unet_checkpoint``: each level holds ``num_res_blocks`` input blocks plus
one downsampler, and ``num_res_blocks + 1`` output blocks whose last one carries the upsampler.
"""

from __future__ import annotations

from typing import Any

from stablekit.config import UNetConfig

_RES = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
}
_ATTN = ("to_q", "to_k", "to_v", "to_out.0")


def _res(orig: str, other: str, has_skip: bool) -> dict[str, str]:
    table = {f"{orig}.{a}": f"{other}.{b}" for a, b in _RES.items()}
    if has_skip:
        table[f"{orig}.skip_connection"] = f"{other}.conv_shortcut"
    return table


def _transformer(orig: str, other: str, depth: int) -> dict[str, str]:
    leaves = ["norm", "proj_in", "proj_out"]
    for d in range(depth):
        block = f"transformer_blocks.{d}"
        leaves += [f"{block}.{n}" for n in ("norm1", "norm2", "norm3", "ff.net.0.proj", "ff.net.2")]
        leaves += [f"{block}.{a}.{p}" for a in ("attn1", "attn2") for p in _ATTN]
    return {f"{orig}.{leaf}": f"{other}.{leaf}" for leaf in leaves}


def unet_table(cfg: UNetConfig) -> dict[str, str]:
    """Every original leaf-module path -> its diffusers module path."""
    c0, n = cfg.model_channels, cfg.num_res_blocks
    depth = cfg.transformer_depth
    table = {
        "time_embed.0": "time_embedding.linear_1",
        "time_embed.2": "time_embedding.linear_2",
        "input_blocks.0.0": "conv_in",
        "out.0": "conv_norm_out",
        "out.2": "conv_out",
    }
    if cfg.num_classes is not None:
        table["label_emb"] = "class_embedding"

    ch = c0
    skip_channels = [c0]
    k = 1
    last = len(cfg.channel_mult) - 1
    for level, mult in enumerate(cfg.channel_mult):
        for j in range(n):
            table |= _res(f"input_blocks.{k}.0", f"down_blocks.{level}.resnets.{j}", ch != mult * c0)
            ch = mult * c0
            if level in cfg.attention_levels:
                table |= _transformer(f"input_blocks.{k}.1", f"down_blocks.{level}.attentions.{j}", depth)
            skip_channels.append(ch)
            k += 1
        if level != last:
            table[f"input_blocks.{k}.0.op"] = f"down_blocks.{level}.downsamplers.0.conv"
            skip_channels.append(ch)
            k += 1

    table |= _res("middle_block.0", "mid_block.resnets.0", False)
    table |= _transformer("middle_block.1", "mid_block.attentions.0", depth)
    table |= _res("middle_block.2", "mid_block.resnets.1", False)

    k = 0
    for b, (level, mult) in enumerate(reversed(list(enumerate(cfg.channel_mult)))):
        for j in range(n + 1):
            c_in = ch + skip_channels.pop()
            ch = mult * c0
            table |= _res(f"output_blocks.{k}.0", f"up_blocks.{b}.resnets.{j}", c_in != ch)
            slot = 1
            if level in cfg.attention_levels:
                table |= _transformer(f"output_blocks.{k}.1", f"up_blocks.{b}.attentions.{j}", depth)
                slot = 2
            if level and j == n:
                table[f"output_blocks.{k}.{slot}.conv"] = f"up_blocks.{b}.upsamplers.0.conv"
            k += 1
    return table


def _heads(cfg: UNetConfig) -> int | list[int]:
    # diffusers' ``attention_head_dim`` is, despite its name, the number of heads per level.
    if cfg.num_heads is not None:
        return cfg.num_heads
    return [cfg.heads_at(cfg.model_channels * m)[0] for m in cfg.channel_mult]


def diffusers_unet_config(cfg: UNetConfig, sample_size: int) -> dict[str, Any]:
    """The ``unet/config.json`` content (without ``_class_name``) for a UNet of this config."""
    levels = range(len(cfg.channel_mult))
    attn = [lvl in cfg.attention_levels for lvl in levels]
    return {
        "sample_size": sample_size,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "block_out_channels": [cfg.model_channels * m for m in cfg.channel_mult],
        "layers_per_block": cfg.num_res_blocks,
        "transformer_layers_per_block": cfg.transformer_depth,
        "attention_head_dim": _heads(cfg),
        "cross_attention_dim": cfg.context_dim,
        "use_linear_projection": cfg.use_linear_proj,
        "only_cross_attention": list(cfg.disable_self_attn) if cfg.disable_self_attn else False,
        "num_class_embeds": cfg.num_classes,
        "upcast_attention": cfg.upcast_attention,
        "norm_num_groups": cfg.norm_groups,
        "norm_eps": 1e-5,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "act_fn": "silu",
        "downsample_padding": 1,
        "center_input_sample": False,
    }


def _per_level(value: Any, levels: int, name: str) -> list[Any]:
    if isinstance(value, (list, tuple)):
        if len(value) != levels:
            raise ValueError(f"diffusers UNet config: {name} has {len(value)} entries for {levels} levels")
        return list(value)
    return [value] * levels


def unet_config_from_diffusers(d: dict[str, Any]) -> UNetConfig:
    """Inverse of :func:`diffusers_unet_config`; missing keys take diffusers' defaults."""
    widths = list(d.get("block_out_channels", (320, 640, 1280, 1280)))
    c0, levels = widths[0], len(widths)
    down = list(d.get("down_block_types", ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]))
    # Keys whose non-default values select features the openaimodel UNet does not have.
    fixed = {
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "class_embed_type": None,
        "addition_embed_type": None,
        "encoder_hid_dim": None,
        "time_cond_proj_dim": None,
        "time_embedding_type": "positional",
        "resnet_time_scale_shift": "default",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "norm_eps": 1e-5,
        "conv_in_kernel": 3,
        "conv_out_kernel": 3,
        "dual_cross_attention": False,
    }
    bad = [k for k, v in fixed.items() if d.get(k, v) != v]
    if any(t not in ("CrossAttnDownBlock2D", "DownBlock2D") for t in down) or len(down) != levels:
        bad.append("down_block_types")
    if any(w % c0 for w in widths):
        bad.append("block_out_channels")
    if bad:
        raise ValueError(f"diffusers UNet config is not a Stable Diffusion UNet: {', '.join(bad)}")

    # Newer configs may name the count properly; older ones only have the misnamed key.
    heads_value = d.get("num_attention_heads") or d.get("attention_head_dim", 8)
    heads = _per_level(heads_value, levels, "attention_head_dim")
    head_dims = {w // h for w, h in zip(widths, heads, strict=True)}
    if len(set(heads)) == 1:
        num_heads, head_dim = heads[0], None
    elif len(head_dims) == 1:
        num_heads, head_dim = None, head_dims.pop()
    else:
        raise ValueError(f"diffusers UNet config: heads {heads} are neither constant nor of constant width")

    depth = set(_per_level(d.get("transformer_layers_per_block", 1), levels, "transformer_layers_per_block"))
    if len(depth) != 1:
        raise ValueError("diffusers UNet config: a transformer depth that varies by level is not supported")
    only_cross_value = d.get("only_cross_attention", False)
    only_cross = [bool(v) for v in _per_level(only_cross_value, levels, "only_cross_attention")]

    return UNetConfig(
        in_channels=d.get("in_channels", 4),
        out_channels=d.get("out_channels", 4),
        model_channels=c0,
        channel_mult=tuple(w // c0 for w in widths),
        num_res_blocks=d.get("layers_per_block", 2),
        attention_levels=tuple(i for i, t in enumerate(down) if t == "CrossAttnDownBlock2D"),
        num_heads=num_heads,
        head_dim=head_dim,
        transformer_depth=depth.pop(),
        context_dim=d.get("cross_attention_dim", 1280),
        use_linear_proj=d.get("use_linear_projection", False),
        num_classes=d.get("num_class_embeds"),
        disable_self_attn=tuple(only_cross) if any(only_cross) else None,
        norm_groups=d.get("norm_num_groups", 32),
        upcast_attention=d.get("upcast_attention", False),
    )
