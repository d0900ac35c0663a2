"""The KL autoencoder (``ldm.models.autoencoder.AutoencoderKL``) that maps images to SD latents and back.

Module names are the original keys below ``first_stage_model.``, so a released checkpoint loads with
``strict=True``. The latent scale factor (0.18215, or 0.08333 for the x4 upscaler) lives in the config and
is applied by the pipeline, not here.

Half precision: GroupNorm statistics are taken in fp32 (:class:`GroupNorm32`; the original uses a plain
GroupNorm, identical in fp32) and the mid-block softmax goes through :func:`attention`, which accumulates
in fp32. That keeps fp16 decodes of the SD1/SD2 VAE free of NaN/black images. The activations themselves
are left in fp16: for the x4 upscaler's VAE at large sizes they can exceed the fp16 range (diffusers
decodes that one in fp32, ``force_upcast``), so run it in fp32 or bf16 there.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stablekit.config import VAEConfig
from stablekit.nn.attention import attention
from stablekit.nn.layers import GroupNorm32
from stablekit.nn.tiling import tiled

Generators = torch.Generator | Sequence[torch.Generator] | None


def _norm(channels: int, groups: int) -> GroupNorm32:
    return GroupNorm32(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """GN→SiLU→conv3, GN→SiLU→conv3, plus a 1×1 ``nin_shortcut`` when the width changes (no time input)."""

    def __init__(self, in_ch: int, out_ch: int, groups: int) -> None:
        super().__init__()
        self.norm1 = _norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _norm(out_ch, groups)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut: nn.Module = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H·W positions, with 1×1-conv projections (scale C^-1/2)."""

    def __init__(self, ch: int, groups: int) -> None:
        super().__init__()
        self.norm = _norm(ch, groups)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        # One head of width C: (B, C, H, W) -> (B, 1, HW, C)
        q, k, v = (m(y).flatten(2).transpose(1, 2)[:, None] for m in (self.q, self.k, self.v))
        y = attention(q, k, v)[:, 0].transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(y)


class Downsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        # Asymmetric padding (right/bottom only) is what the released weights were trained with; for odd
        # sizes it gives floor(H/2), as in the original and diffusers.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Mid(nn.Module):
    def __init__(self, ch: int, groups: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(ch, ch, groups)
        self.attn_1 = AttnBlock(ch, groups)
        self.block_2 = ResnetBlock(ch, ch, groups)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


def _blocks(in_ch: int, out_ch: int, n: int, groups: int) -> nn.ModuleList:
    return nn.ModuleList(ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups) for i in range(n))


class DownLevel(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, n_blocks: int, groups: int, downsample: bool) -> None:
        super().__init__()
        self.block = _blocks(in_ch, out_ch, n_blocks, groups)
        self.downsample = Downsample(out_ch) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class UpLevel(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, n_blocks: int, groups: int, upsample: bool) -> None:
        super().__init__()
        self.block = _blocks(in_ch, out_ch, n_blocks, groups)
        self.upsample = Upsample(out_ch) if upsample else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        return x if self.upsample is None else self.upsample(x)


class Encoder(nn.Module):
    """(B, 3, H, W) -> (B, 2·z_channels, H/f, W/f): mean and log-variance stacked on channels."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        chs = [cfg.ch * m for m in cfg.ch_mult]
        last = len(chs) - 1
        self.conv_in = nn.Conv2d(cfg.in_channels, chs[0], 3, padding=1)
        self.down = nn.ModuleList(
            DownLevel(chs[max(i - 1, 0)], c, cfg.num_res_blocks, cfg.norm_groups, downsample=i != last)
            for i, c in enumerate(chs)
        )
        self.mid = Mid(chs[-1], cfg.norm_groups)
        self.norm_out = _norm(chs[-1], cfg.norm_groups)
        self.conv_out = nn.Conv2d(chs[-1], 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> (B, 3, f·h, f·w). ``up[0]`` is the full-resolution level; it runs last."""

    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        chs = [cfg.ch * m for m in cfg.ch_mult]
        top = len(chs) - 1
        self.conv_in = nn.Conv2d(cfg.z_channels, chs[-1], 3, padding=1)
        self.mid = Mid(chs[-1], cfg.norm_groups)
        # Each level takes the width of the level below it (the mid width for the lowest).
        self.up = nn.ModuleList(
            UpLevel(chs[min(i + 1, top)], c, cfg.num_res_blocks + 1, cfg.norm_groups, upsample=i != 0)
            for i, c in enumerate(chs)
        )
        self.norm_out = _norm(chs[0], cfg.norm_groups)
        self.conv_out = nn.Conv2d(chs[0], cfg.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def _randn(like: Tensor, generator: Generators) -> Tensor:
    """Normal noise shaped like ``like``, drawn the way diffusers' ``randn_tensor`` draws it: on the
    generator's device, in ``like``'s dtype, one sample per generator when given a list."""
    if isinstance(generator, Sequence):
        if len(generator) == 1:
            return _randn(like, generator[0])
        if len(generator) != like.shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {like.shape[0]}")
        return torch.cat([_randn(like[i : i + 1], g) for i, g in enumerate(generator)])
    device = like.device if generator is None else generator.device
    return torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


class DiagonalGaussian:
    """The posterior q(z|x) = N(mean, exp(logvar)), from the encoder's stacked moments (B, 2C, h, w)."""

    def __init__(self, moments: Tensor) -> None:
        self.mean, logvar = moments.chunk(2, dim=1)  # (B, C, h, w) each
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: Generators = None) -> Tensor:
        return self.mean + self.std * _randn(self.mean, generator)

    def mode(self) -> Tensor:
        return self.mean


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    @property
    def scale_factor(self) -> float:
        """Multiply a posterior sample by this before diffusion; divide by it before :meth:`decode`."""
        return self.config.scale_factor

    def moments(self, x: Tensor) -> Tensor:
        """x: (B, 3, H, W) in [-1, 1] -> the posterior's mean and log-variance stacked (B, 2·embed_dim, h, w)."""
        return self.quant_conv(self.encoder(x))

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """x: (B, 3, H, W) in [-1, 1] -> posterior over (B, embed_dim, H//f, W//f) (floor for odd sizes)."""
        return DiagonalGaussian(self.moments(x))

    def decode(self, z: Tensor) -> Tensor:
        """z: unscaled latents (B, embed_dim, h, w) -> (B, 3, f·h, f·w), roughly in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))

    # Tiling. Each tile is decoded with only its own context: GroupNorm statistics, mid-block attention and
    # the zero padding at its borders all differ from a whole-image pass, so neighbouring tiles disagree a
    # little (mostly a colour/contrast shift from the per-tile GroupNorm statistics). Overlapping tiles are
    # cross-faded with linear ramps, which hides the seams but does not reproduce the untiled result; a wider
    # overlap gives smoother transitions at a compute cost of about (tile / (tile - overlap))² tile passes.
    # Memory is bounded by one tile's activations plus the fp32 output canvas.

    def decode_tiled(self, z: Tensor, tile: int = 64, overlap: int = 16) -> Tensor:
        """:meth:`decode` in ``tile``×``tile`` latent tiles overlapping by ``overlap`` latent pixels."""
        f = self.config.downsample
        return tiled(self.decode, z, z.shape[-2:], tile, overlap, in_scale=1, out_scale=f)

    def encode_tiled(self, x: Tensor, tile: int = 512, overlap: int = 128) -> DiagonalGaussian:
        """:meth:`encode` in ``tile``×``tile`` pixel tiles overlapping by ``overlap`` pixels (both multiples
        of the downsampling factor f). The moments are blended before the posterior is formed."""
        f = self.config.downsample
        if tile % f or overlap % f:
            raise ValueError(f"encode_tiled: tile ({tile}) and overlap ({overlap}) must be multiples of {f}")
        grid = (x.shape[-2] // f, x.shape[-1] // f)
        moments = tiled(self.moments, x, grid, tile // f, overlap // f, in_scale=f, out_scale=1)
        return DiagonalGaussian(moments)
