"""The Stable Diffusion UNet in the original ``openaimodel.UNetModel`` layout.

Attribute names are the checkpoint keys below ``model.diffusion_model.``, so a released state dict loads
with ``strict=True``. Numbered slots that hold no parameters (SiLU, dropout) are kept so that the
following layer sits at its checkpoint index (``in_layers.2``, ``out_layers.3``, ``ff.net.2``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from stablekit.config import UNetConfig
from stablekit.nn.attention import attention, merge_heads, split_heads
from stablekit.nn.layers import GroupNorm32, timestep_embedding


def _memory_format(x: Tensor) -> torch.memory_format:
    if x.is_contiguous():
        return torch.contiguous_format
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format


def _conv3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1)


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(groups, channels), nn.SiLU(), _conv3(channels, out_channels))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        # Index 2 is the dropout slot (p=0 in every released config).
        self.out_layers = nn.Sequential(
            GroupNorm32(groups, out_channels), nn.SiLU(), nn.Identity(), _conv3(out_channels, out_channels)
        )
        self.skip_connection: nn.Module = (
            nn.Identity() if channels == out_channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)  # (B, C_out, H, W)
        h = h + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    def __init__(self, dim: int, kv_dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads = heads
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(kv_dim, inner, bias=False)
        self.to_v = nn.Linear(kv_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim))

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        q = split_heads(self.to_q(x), self.heads)  # (B, H, T, D)
        k = split_heads(self.to_k(context), self.heads)  # (B, H, S, D)
        v = split_heads(self.to_v(context), self.heads)
        return self.to_out(merge_heads(attention(q, k, v)))  # (B, T, C)


class GEGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, hidden * 2)

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * nn.functional.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        # Index 1 is the dropout slot.
        self.net = nn.Sequential(GEGLU(dim, dim * 4), nn.Identity(), nn.Linear(dim * 4, dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int, self_attn: bool) -> None:
        super().__init__()
        # Without self-attention (x4 upscaler), attn1 attends to the context as attn2 does.
        self.self_attn = self_attn
        self.attn1 = CrossAttention(dim, dim if self_attn else context_dim, heads, head_dim)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, head_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        h = self.norm1(x)
        x = x + self.attn1(h, h if self.self_attn else context)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    def __init__(self, channels: int, cfg: UNetConfig, self_attn: bool) -> None:
        super().__init__()
        heads, head_dim = cfg.heads_at(channels)
        self.use_linear = cfg.use_linear_proj
        self.norm = GroupNorm32(cfg.norm_groups, channels, eps=1e-6)
        self.proj_in: nn.Module = nn.Linear(channels, channels) if self.use_linear else nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, heads, head_dim, cfg.context_dim, self_attn)
            for _ in range(cfg.transformer_depth)
        )
        self.proj_out: nn.Module = (
            nn.Linear(channels, channels) if self.use_linear else nn.Conv2d(channels, channels, 1)
        )

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        b, c, hgt, wid = x.shape
        h = self.norm(x)
        if not self.use_linear:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(b, hgt * wid, c)  # (B, HW, C)
        if self.use_linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.use_linear:
            h = self.proj_out(h)
        h = h.reshape(b, hgt, wid, c).permute(0, 3, 1, 2)  # (B, C, H, W), channels_last strides
        # Hand the next conv the layout the block received: a channels_last-strided tensor in an NCHW network
        # makes every following convolution convert layouts (measured: +25% per UNet step on CPU).
        h = h.contiguous(memory_format=_memory_format(x))
        if not self.use_linear:
            h = self.proj_out(h)
        return h + x


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = _conv3(channels, channels, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = _conv3(channels, channels)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        # Nearest to the skip's size, not a blind ×2: an odd latent (13 -> 7 on the way down) comes back
        # to 13, as diffusers does. For even sizes this equals scale_factor=2.
        return self.conv(nn.functional.interpolate(x, size=size, mode="nearest"))


class TimestepEmbedSequential(nn.ModuleList):
    """One numbered UNet block: hands each layer the inputs it takes."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                assert size is not None, "an upsampling block needs the size of the next skip"
                x = layer(x, size)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c0, groups = cfg.model_channels, cfg.norm_groups
        emb_dim = 4 * c0
        levels = len(cfg.channel_mult)
        self_attn = [not d for d in (cfg.disable_self_attn or (False,) * levels)]

        self.time_embed = nn.Sequential(nn.Linear(c0, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if cfg.num_classes is not None:
            self.label_emb = nn.Embedding(cfg.num_classes, emb_dim)

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential([_conv3(cfg.in_channels, c0)])])
        skip_channels = [c0]
        ch = c0
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, mult * c0, groups)]
                ch = mult * c0
                if level in cfg.attention_levels:
                    layers.append(SpatialTransformer(ch, cfg, self_attn[level]))
                self.input_blocks.append(TimestepEmbedSequential(layers))
                skip_channels.append(ch)
            if level != levels - 1:
                self.input_blocks.append(TimestepEmbedSequential([Downsample(ch)]))
                skip_channels.append(ch)

        self.middle_block = TimestepEmbedSequential(
            [
                ResBlock(ch, emb_dim, ch, groups),
                SpatialTransformer(ch, cfg, True),
                ResBlock(ch, emb_dim, ch, groups),
            ]
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, mult * c0, groups)]
                ch = mult * c0
                if level in cfg.attention_levels:
                    layers.append(SpatialTransformer(ch, cfg, self_attn[level]))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(layers))

        self.out = nn.Sequential(GroupNorm32(groups, ch), nn.SiLU(), _conv3(ch, cfg.out_channels))

    def forward(self, x: Tensor, timesteps: Tensor, context: Tensor, y: Tensor | None = None) -> Tensor:
        """x: (B, C_in, H, W); timesteps: (B,), (1,) or (); context: (B, T, context_dim); y: (B,) class labels
        (the x4 noise level) -> (B, C_out, H, W)."""
        if (y is None) != (self.cfg.num_classes is None):
            raise ValueError("class labels y must be given exactly when the UNet has num_classes")
        # The sinusoid is computed in fp32: fp16 cannot represent t·freq for t near 1000.
        t = timesteps.reshape(-1).expand(x.shape[0])  # a scalar or (1,) serves the whole batch
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels).to(x.dtype))
        if y is not None:
            emb = emb + self.label_emb(y)  # (B, 4·C0)
        context = context.to(x.dtype)

        skips: list[Tensor] = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            size = (skips[-1].shape[-2], skips[-1].shape[-1]) if skips else None
            h = block(h, emb, context, size)
        return self.out(h)
