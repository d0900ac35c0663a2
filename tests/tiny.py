"""Tiny configs of every family, shared by the whole suite (random weights, seconds on a CPU).

They keep every structural feature of their full-size family (level layout, attention switch, projection
kind, head rule, extra input channels, label embedding) at widths of 32-64.
"""

from dataclasses import replace

from stablekit.config import (
    SD1,
    SD1_INPAINT,
    SD2_BASE,
    SD2_DEPTH,
    SD2_INPAINT,
    SD2_V,
    X4_UPSCALER,
    ModelConfig,
    TextConfig,
    UNetConfig,
    VAEConfig,
)

TINY_TEXT_SD1 = TextConfig(width=32, layers=2, heads=4, mlp_width=128, layers_used=2, embed_dim=32)
TINY_TEXT_SD2 = TextConfig(
    kind="openclip",
    width=32,
    layers=3,
    heads=4,
    mlp_width=128,
    activation="gelu",
    layers_used=2,
    pad_token=0,
    embed_dim=32,
)
TINY_VAE = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)
TINY_UNET_SD1 = UNetConfig(
    model_channels=32, channel_mult=(1, 2, 2), attention_levels=(0, 1), num_heads=2, context_dim=32
)
TINY_UNET_SD2 = UNetConfig(
    model_channels=32,
    channel_mult=(1, 2, 2),
    attention_levels=(0, 1),
    num_heads=None,
    head_dim=16,
    context_dim=32,
    use_linear_proj=True,
)
TINY_UNET_X4 = UNetConfig(
    in_channels=7,
    model_channels=32,
    channel_mult=(1, 2, 2),
    attention_levels=(1, 2),
    num_heads=2,
    context_dim=32,
    use_linear_proj=True,
    num_classes=1000,
    disable_self_attn=(True, True, False),
)

TINY_SD1 = replace(SD1, name="tiny-sd1", unet=TINY_UNET_SD1, vae=TINY_VAE, text=TINY_TEXT_SD1)
TINY_SD1_INPAINT = replace(
    SD1_INPAINT,
    name="tiny-sd1-inpaint",
    unet=replace(TINY_UNET_SD1, in_channels=9),
    vae=TINY_VAE,
    text=TINY_TEXT_SD1,
)
TINY_SD2 = replace(SD2_BASE, name="tiny-sd2", unet=TINY_UNET_SD2, vae=TINY_VAE, text=TINY_TEXT_SD2)
TINY_SD2_V = replace(SD2_V, name="tiny-sd2-v", unet=TINY_UNET_SD2, vae=TINY_VAE, text=TINY_TEXT_SD2)
TINY_SD2_INPAINT = replace(
    SD2_INPAINT,
    name="tiny-sd2-inpaint",
    unet=replace(TINY_UNET_SD2, in_channels=9),
    vae=TINY_VAE,
    text=TINY_TEXT_SD2,
)
TINY_SD2_DEPTH = replace(
    SD2_DEPTH,
    name="tiny-sd2-depth",
    unet=replace(TINY_UNET_SD2, in_channels=5),
    vae=TINY_VAE,
    text=TINY_TEXT_SD2,
)
TINY_X4 = replace(
    X4_UPSCALER,
    name="tiny-x4",
    unet=TINY_UNET_X4,
    vae=replace(TINY_VAE, scale_factor=0.08333),
    text=TINY_TEXT_SD2,
)

TINY: dict[str, ModelConfig] = {
    c.name: c for c in (TINY_SD1, TINY_SD1_INPAINT, TINY_SD2, TINY_SD2_V, TINY_SD2_INPAINT, TINY_SD2_DEPTH, TINY_X4)
}
