"""The KL autoencoder: original (CompVis) module paths <-> diffusers ``AutoencoderKL`` module paths, and the
two config formats.

Sources: diffusers ``convert_ldm_vae_checkpoint`` and ``AutoencoderKL.__init__``; fact sheet §2-§3. The
mid-block attention projections are 1×1 convs ([C, C, 1, 1]) in the original and Linear ([C, C]) in
diffusers; ``fit_state_dict`` reshapes them, so the table only renames.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from stablekit.config import VAEConfig

_RESNET = ("norm1", "conv1", "norm2", "conv2")

_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# Older diffusers files name the projections like this (diffusers renames them on load).
_LEGACY_ATTENTION = {**_ATTENTION, "q": "query", "k": "key", "v": "value", "proj_out": "proj_attn"}

# diffusers' AutoencoderKL defaults, for keys a config.json leaves out.
_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (64,),
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 32,
}
# Keys whose value must be this for the model to be the SD KL autoencoder (a missing key is fine).
_REQUIRED = {
    "act_fn": "silu",
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
}
_SD_SCALE, _X4_SCALE = 0.18215, 0.08333


def _resnet(orig: str, other: str, in_ch: int, out_ch: int) -> dict[str, str]:
    table = {f"{orig}.{n}": f"{other}.{n}" for n in _RESNET}
    if in_ch != out_ch:
        table[f"{orig}.nin_shortcut"] = f"{other}.conv_shortcut"
    return table


def _mid(orig: str, other: str, ch: int, attention: Mapping[str, str]) -> dict[str, str]:
    table = _resnet(f"{orig}.block_1", f"{other}.resnets.0", ch, ch)
    table.update(_resnet(f"{orig}.block_2", f"{other}.resnets.1", ch, ch))
    table.update({f"{orig}.attn_1.{a}": f"{other}.attentions.0.{b}" for a, b in attention.items()})
    return table


def vae_table(cfg: VAEConfig, *, legacy_attention: bool = False) -> dict[str, str]:
    """Original leaf-module path (relative to ``first_stage_model.``) -> diffusers module path.

    ``legacy_attention`` selects the ``query/key/value/proj_attn`` names of old diffusers files
    (see :func:`has_legacy_attention`).
    """
    attention = _LEGACY_ATTENTION if legacy_attention else _ATTENTION
    chs = [cfg.ch * m for m in cfg.ch_mult]
    levels = len(chs)
    table = {
        "quant_conv": "quant_conv",
        "post_quant_conv": "post_quant_conv",
        "encoder.conv_in": "encoder.conv_in",
        "encoder.norm_out": "encoder.conv_norm_out",
        "encoder.conv_out": "encoder.conv_out",
        "decoder.conv_in": "decoder.conv_in",
        "decoder.norm_out": "decoder.conv_norm_out",
        "decoder.conv_out": "decoder.conv_out",
    }
    table.update(_mid("encoder.mid", "encoder.mid_block", chs[-1], attention))
    table.update(_mid("decoder.mid", "decoder.mid_block", chs[-1], attention))
    for i, ch in enumerate(chs):
        in_ch = chs[max(i - 1, 0)]
        for j in range(cfg.num_res_blocks):
            table.update(
                _resnet(
                    f"encoder.down.{i}.block.{j}",
                    f"encoder.down_blocks.{i}.resnets.{j}",
                    in_ch if j == 0 else ch,
                    ch,
                )
            )
        if i != levels - 1:
            table[f"encoder.down.{i}.downsample.conv"] = f"encoder.down_blocks.{i}.downsamplers.0.conv"
    for i, ch in enumerate(chs):
        # The original stores up[0] at full resolution; diffusers lists up_blocks in execution order.
        up = f"decoder.up_blocks.{levels - 1 - i}"
        in_ch = chs[min(i + 1, levels - 1)]
        for j in range(cfg.num_res_blocks + 1):
            block_in = in_ch if j == 0 else ch
            table.update(_resnet(f"decoder.up.{i}.block.{j}", f"{up}.resnets.{j}", block_in, ch))
        if i != 0:
            table[f"decoder.up.{i}.upsample.conv"] = f"{up}.upsamplers.0.conv"
    return table


def has_legacy_attention(keys: Iterable[str]) -> bool:
    """Whether a diffusers VAE state dict uses the pre-0.14 attention names (pick ``legacy_attention``)."""
    return any(k.endswith(".attentions.0.query.weight") for k in keys)


def diffusers_vae_config(cfg: VAEConfig, *, sample_size: int = 512) -> dict[str, Any]:
    """The ``vae/config.json`` fields (without ``_class_name``/``_diffusers_version``) of ``cfg``.

    ``sample_size`` only sets diffusers' own tile size; the SD releases ship their pixel size there.
    """
    if cfg.embed_dim != cfg.z_channels:
        raise ValueError("diffusers' AutoencoderKL has one latent width: embed_dim must equal z_channels")
    levels = len(cfg.ch_mult)
    return {
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [cfg.ch * m for m in cfg.ch_mult],
        "layers_per_block": cfg.num_res_blocks,
        "act_fn": "silu",
        "latent_channels": cfg.z_channels,
        "norm_num_groups": cfg.norm_groups,
        "sample_size": sample_size,
        "scaling_factor": cfg.scale_factor,
    }


def vae_config_from_diffusers(d: Mapping[str, Any]) -> VAEConfig:
    """Read a diffusers ``vae/config.json`` dict. Raises ``ValueError`` for VAEs that are not the SD KL
    autoencoder (other block types, no attention, shift/mean-std latent normalisation).

    The x4 upscaler's VAE is the only three-level one. Its config may lack ``scaling_factor`` or carry the
    0.18215 class default, and diffusers' upscale pipeline then forces 0.08333; we do the same.
    """
    c = {**_DIFFUSERS_DEFAULTS, **d}
    wrong = [f"{k}={c[k]!r}" for k, want in _REQUIRED.items() if k in c and c[k] != want]
    blocks = list(c["block_out_channels"])
    levels = len(blocks)
    for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = list(c.get(key, [kind]))
        if types != [kind] * levels:
            wrong.append(f"{key}={types!r}")
    ch = blocks[0]
    if any(b % ch for b in blocks):
        wrong.append(f"block_out_channels={blocks!r}")
    if wrong:
        raise ValueError(f"not a Stable Diffusion KL autoencoder config: {', '.join(wrong)}")
    scale = float(c.get("scaling_factor", _SD_SCALE))
    if levels == 3 and scale == _SD_SCALE:
        scale = _X4_SCALE
    return VAEConfig(
        in_channels=int(c["in_channels"]),
        out_channels=int(c["out_channels"]),
        ch=ch,
        ch_mult=tuple(b // ch for b in blocks),
        num_res_blocks=int(c["layers_per_block"]),
        z_channels=int(c["latent_channels"]),
        embed_dim=int(c["latent_channels"]),
        norm_groups=int(c["norm_num_groups"]),
        scale_factor=scale,
    )
