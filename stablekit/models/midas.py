"""MiDaS v3 DPT-Hybrid, the monocular depth estimator that conditions Stable Diffusion 2's depth model.

Ranftl, Bochkovskiy & Koltun, "Vision Transformers for Dense Prediction" (DPT), ICCV 2021. The encoder is
timm's ``vit_base_resnet50_384``: a BiT ResNet-50 (weight-standardised convs, GroupNorm, TF "SAME" padding)
whose first three stages (stride 16) replace the ViT-B/16 patch embedding, then 12 ViT blocks. Four feature
maps are reassembled: ResNet stages 1 and 2 as they are, the token grids after two ViT blocks with the class
token folded in ("project" readout). Four fusion blocks upsample them back to 1/2 resolution and a small
head predicts relative inverse depth (larger = nearer) at the input resolution.

Module names are the keys of the released ``dpt_hybrid-midas-501f0c75.pt`` (isl-org/MiDaS
``DPTDepthModel(backbone="vitb_rn50_384")``), which loads with ``strict=True``. Two of those keys are never
used by depth: timm's ImageNet classifier ``pretrained.model.head`` and the final ``pretrained.model.norm``
(DPT taps the blocks before it). Both are kept so the released file loads as it is.

Half precision: weight standardisation and GroupNorm statistics are computed in fp32, as autocast does for
diffusers' pipeline, and the attention softmax goes through :func:`attention`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stablekit.nn.attention import attention, merge_heads, split_heads
from stablekit.nn.layers import GroupNorm32

# timm's hybrid ViT builds its ResNet with ``partial(StdConv2dSame, eps=1e-8)``, not the class default 1e-6;
# the difference is visible at the first stage.
STD_CONV_EPS = 1e-8
GROUP_NORM_EPS = 1e-5


@dataclass(frozen=True)
class DepthConfig:
    """Sizes of a DPT-Hybrid depth model; the defaults are the released MiDaS ``dpt_hybrid`` (~123M params)."""

    image_size: int = 384  # training resolution: the stored position embedding is (image_size / 16)² + 1 tokens
    patch_size: int = 16  # the ResNet's total stride; each token is one stride-16 feature vector
    in_channels: int = 3
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_size: int = 3072
    layer_norm_eps: float = 1e-6  # timm's ViT; transformers' DPT configs say 1e-12
    # ViT blocks whose outputs become the third and fourth feature maps (MiDaS ``hooks[2:]``).
    vit_hooks: tuple[int, int] = (8, 11)
    stem_width: int = 64
    backbone_depths: tuple[int, int, int] = (3, 4, 9)
    backbone_widths: tuple[int, int, int] = (256, 512, 1024)
    norm_groups: int = 32
    # Channels of the four reassembled maps; the first two are the ResNet stage widths themselves.
    neck_sizes: tuple[int, int, int, int] = (256, 512, 768, 768)
    fusion_size: int = 256
    head_size: int = 32
    # timm's ImageNet classifier, stored in the released file but unused; 0 = absent (transformers files).
    num_classes: int = 1000

    def __post_init__(self) -> None:
        problems = []
        if len(self.backbone_depths) != 3 or len(self.backbone_widths) != 3:
            problems.append("the hybrid backbone has exactly 3 ResNet stages")
        elif tuple(self.neck_sizes[:2]) != tuple(self.backbone_widths[:2]):
            problems.append(
                f"neck_sizes[:2] {self.neck_sizes[:2]} must equal the stage widths {self.backbone_widths[:2]}"
            )
        if self.patch_size != 16:
            problems.append(f"patch_size {self.patch_size}: the 3-stage ResNet has stride 16")
        if self.image_size % self.patch_size:
            problems.append(f"image_size {self.image_size} is not a multiple of {self.patch_size}")
        if self.hidden_size % self.num_heads:
            problems.append(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if not all(0 <= h < self.num_layers for h in self.vit_hooks) or self.vit_hooks[0] >= self.vit_hooks[1]:
            problems.append(f"vit_hooks {self.vit_hooks} must be increasing block indices below {self.num_layers}")
        if problems:
            raise ValueError("DepthConfig: " + "; ".join(problems))

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


DPT_HYBRID = DepthConfig()


def _pad_same(x: Tensor, kernel: int, stride: int, value: float = 0.0) -> Tensor:
    """TF "SAME" padding: output size ceil(n / stride); the odd pixel goes right/bottom."""
    pads = []
    for n in (x.shape[-1], x.shape[-2]):
        total = max((math.ceil(n / stride) - 1) * stride + kernel - n, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value) if any(pads) else x


def make_div(value: float, divisor: int = 8) -> int:
    """BiT's channel rounding: the nearest multiple of ``divisor``, never more than 10% below ``value``."""
    width = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return width + divisor if width < 0.9 * value else width


class StdConv2d(nn.Conv2d):
    """Conv with weight standardisation (each filter to zero mean, unit variance) and SAME padding, no bias."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1) -> None:
        super().__init__(in_ch, out_ch, kernel, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.float()
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        w = ((w - mean) * torch.rsqrt(var + STD_CONV_EPS)).to(x.dtype)
        return F.conv2d(_pad_same(x, self.kernel_size[0], self.stride[0]), w, None, self.stride)


class _GroupNormAct(GroupNorm32):
    """timm's ``GroupNormAct``: GroupNorm, then ReLU unless it feeds a residual sum."""

    def __init__(self, groups: int, channels: int, *, act: bool = True) -> None:
        super().__init__(groups, channels, eps=GROUP_NORM_EPS)
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        x = super().forward(x)
        return F.relu(x) if self.act else x


class Stem(nn.Module):
    """7×7/2 conv, GroupNorm + ReLU, 3×3/2 max pool: (B, 3, H, W) -> (B, C, H/4, W/4)."""

    def __init__(self, in_ch: int, width: int, groups: int) -> None:
        super().__init__()
        self.conv = StdConv2d(in_ch, width, 7, stride=2)
        self.norm = _GroupNormAct(groups, width)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(self.conv(x))
        # timm pads the pool with -inf; after the ReLU, transformers' 0 gives the same maxima.
        return F.max_pool2d(_pad_same(x, 3, 2, value=float("-inf")), 3, 2)


class Downsample(nn.Module):
    """The projection shortcut of a stage's first block: 1×1 conv (strided) + GroupNorm, no activation."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, groups: int) -> None:
        super().__init__()
        self.conv = StdConv2d(in_ch, out_ch, 1, stride=stride)
        self.norm = _GroupNormAct(groups, out_ch, act=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(x))


class Bottleneck(nn.Module):
    """Post-activation ResNet bottleneck (timm ``resnetv2.Bottleneck``); the stride sits on the 3×3 conv."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, groups: int, first: bool) -> None:
        super().__init__()
        mid = make_div(out_ch / 4)  # the bottleneck is a quarter of the width
        self.downsample = Downsample(in_ch, out_ch, stride, groups) if first else None
        self.conv1 = StdConv2d(in_ch, mid, 1)
        self.norm1 = _GroupNormAct(groups, mid)
        self.conv2 = StdConv2d(mid, mid, 3, stride=stride)
        self.norm2 = _GroupNormAct(groups, mid)
        self.conv3 = StdConv2d(mid, out_ch, 1)
        self.norm3 = _GroupNormAct(groups, out_ch, act=False)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        h = self.norm1(self.conv1(x))
        h = self.norm2(self.conv2(h))
        h = self.norm3(self.conv3(h))
        return F.relu(h + shortcut)


class Stage(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, depth: int, stride: int, groups: int) -> None:
        super().__init__()
        # Only the first block changes width or resolution, so only it has a projection shortcut.
        blocks = [Bottleneck(in_ch, out_ch, stride, groups, first=True)]
        blocks += [Bottleneck(out_ch, out_ch, 1, groups, first=False) for _ in range(depth - 1)]
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(x)


class ResNetBackbone(nn.Module):
    """BiT ResNet-50 without pre-activation, cut after three stages (strides 4, 8, 16)."""

    def __init__(self, cfg: DepthConfig) -> None:
        super().__init__()
        self.stem = Stem(cfg.in_channels, cfg.stem_width, cfg.norm_groups)
        chans = (cfg.stem_width, *cfg.backbone_widths)
        self.stages = nn.Sequential(
            *(
                Stage(chans[i], chans[i + 1], depth, 1 if i == 0 else 2, cfg.norm_groups)
                for i, depth in enumerate(cfg.backbone_depths)
            )
        )

    def forward(self, x: Tensor) -> list[Tensor]:
        """(B, 3, H, W) -> each stage's output: (B, C1, H/4, W/4), (B, C2, H/8, W/8), (B, C3, H/16, W/16)."""
        x = self.stem(x)
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs


class HybridEmbed(nn.Module):
    """The ResNet features as tokens: a 1×1 conv from the last stage's width to the ViT width."""

    def __init__(self, cfg: DepthConfig) -> None:
        super().__init__()
        self.backbone = ResNetBackbone(cfg)
        self.proj = nn.Conv2d(cfg.backbone_widths[-1], cfg.hidden_size, 1)


class Attention(nn.Module):
    """timm ViT self-attention: one fused ``qkv`` Linear (rows q; k; v, heads contiguous), then ``proj``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, C)
        q, k, v = (split_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))  # (B, H, T, C/H)
        return self.proj(merge_heads(attention(q, k, v)))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as timm's nn.GELU


class Block(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, cfg: DepthConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg.hidden_size, cfg.num_heads)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(cfg.hidden_size, cfg.mlp_size)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """timm's ``VisionTransformer`` with a hybrid patch embedding; ``forward`` returns the tapped features."""

    def __init__(self, cfg: DepthConfig) -> None:
        super().__init__()
        self.hooks = cfg.vit_hooks
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid**2 + 1, cfg.hidden_size))
        self.patch_embed = HybridEmbed(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # unused by DPT, kept for the keys
        self.head = nn.Linear(cfg.hidden_size, cfg.num_classes) if cfg.num_classes else None  # likewise

    def _pos_embed(self, gh: int, gw: int) -> Tensor:
        """(1, 1 + gh·gw, D): the stored grid, bilinearly resized when the input is not the training size."""
        pos = self.pos_embed
        g = math.isqrt(pos.shape[1] - 1)
        if (gh, gw) == (g, g):
            return pos
        grid = pos[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)  # (1, D, g, g)
        grid = F.interpolate(grid, size=(gh, gw), mode="bilinear", align_corners=False)
        return torch.cat([pos[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)

    def forward(self, x: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """(B, 3, H, W) -> the ResNet stage outputs and the token sequences (B, 1 + H/16·W/16, D) after the
        hooked blocks."""
        b, _, h, w = x.shape
        stages = self.patch_embed.backbone(x)
        tokens = self.patch_embed.proj(stages[-1]).flatten(2).transpose(1, 2)  # (B, T, D)
        # Under autocast (as diffusers runs MiDaS) the conv output is half while the parameters stay fp32.
        tokens = torch.cat([self.cls_token.expand(b, -1, -1).to(tokens.dtype), tokens], dim=1)
        tokens = tokens + self._pos_embed(h // 16, w // 16).to(tokens.dtype)
        taps = []
        for i, block in enumerate(self.blocks):
            tokens = block(tokens)
            if i in self.hooks:
                taps.append(tokens)
            if i == self.hooks[-1]:
                break  # later blocks and the final norm never reach the depth map
        return stages, taps


class ProjectReadout(nn.Module):
    """DPT's "project" readout: each patch token is concatenated with the class token and projected back."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.project = nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU())

    def forward(self, tokens: Tensor) -> Tensor:  # (B, 1 + T, D) -> (B, T, D)
        patches = tokens[:, 1:]
        return self.project(torch.cat([patches, tokens[:, :1].expand_as(patches)], dim=-1))


def _postprocess(dim: int, out_ch: int, downsample: bool) -> nn.Sequential:
    # Indices 1 and 2 held MiDaS's Transpose and Unflatten, which have no weights; they are kept as Identity
    # so the convs stay at the released indices 3 (1×1 projection) and 4 (3×3 stride-2 resize).
    layers: list[nn.Module] = [ProjectReadout(dim), nn.Identity(), nn.Identity(), nn.Conv2d(dim, out_ch, 1)]
    if downsample:
        layers.append(nn.Conv2d(out_ch, out_ch, 3, stride=2, padding=1))
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """MiDaS's ``pretrained``: the hybrid ViT plus the reassembly of its two hooked token grids."""

    def __init__(self, cfg: DepthConfig) -> None:
        super().__init__()
        self.model = VisionTransformer(cfg)
        # MiDaS's act_postprocess1/2 are empty for the hybrid: the ResNet stages are already feature maps.
        self.act_postprocess3 = _postprocess(cfg.hidden_size, cfg.neck_sizes[2], downsample=False)
        self.act_postprocess4 = _postprocess(cfg.hidden_size, cfg.neck_sizes[3], downsample=True)

    def forward(self, x: Tensor) -> list[Tensor]:
        """(B, 3, H, W) -> four maps at strides 4, 8, 16 and 32 with ``neck_sizes`` channels."""
        gh, gw = x.shape[-2] // 16, x.shape[-1] // 16
        stages, taps = self.model(x)
        maps = stages[:2]
        for post, tokens in zip((self.act_postprocess3, self.act_postprocess4), taps, strict=True):
            h = post[0](tokens).transpose(1, 2).unflatten(2, (gh, gw))  # (B, D, H/16, W/16)
            for layer in list(post)[3:]:  # the 1×1 projection, then the stride-2 resize of map 4
                h = layer(h)
            maps.append(h)
        return maps


class ResidualConvUnit(nn.Module):
    """Pre-activation residual unit: x + conv(relu(conv(relu(x))))."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FusionBlock(nn.Module):
    """Adds the refined skip map to the coarser path, refines, upsamples (bilinear, corners aligned), 1×1 conv."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.out_conv = nn.Conv2d(ch, ch, 1)
        self.resConfUnit1 = ResidualConvUnit(ch)  # unused in refinenet4, which has no skip input
        self.resConfUnit2 = ResidualConvUnit(ch)

    def forward(self, x: Tensor, skip: Tensor | None = None, size: tuple[int, int] | None = None) -> Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        # To the next finer map's size (MiDaS v3.1); the same as ×2 whenever the input is a multiple of 32.
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=True)
        else:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class Scratch(nn.Module):
    """MiDaS's ``scratch``: 3×3 convs to the fusion width, four fusion blocks and the depth head."""

    def __init__(self, cfg: DepthConfig) -> None:
        super().__init__()
        f = cfg.fusion_size
        self.layer1_rn = nn.Conv2d(cfg.neck_sizes[0], f, 3, padding=1, bias=False)
        self.layer2_rn = nn.Conv2d(cfg.neck_sizes[1], f, 3, padding=1, bias=False)
        self.layer3_rn = nn.Conv2d(cfg.neck_sizes[2], f, 3, padding=1, bias=False)
        self.layer4_rn = nn.Conv2d(cfg.neck_sizes[3], f, 3, padding=1, bias=False)
        self.refinenet1 = FusionBlock(f)
        self.refinenet2 = FusionBlock(f)
        self.refinenet3 = FusionBlock(f)
        self.refinenet4 = FusionBlock(f)
        self.output_conv = nn.Sequential(
            nn.Conv2d(f, f // 2, 3, padding=1),
            nn.Upsample(scale_factor=2.0, mode="bilinear", align_corners=True),
            nn.Conv2d(f // 2, cfg.head_size, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(cfg.head_size, 1, 1),
            nn.ReLU(),  # MiDaS's non_negative=True: inverse depth is never negative
            nn.Identity(),
        )


class DPTDepthModel(nn.Module):
    """MiDaS ``DPTDepthModel``: (B, 3, H, W) in [-1, 1] -> (B, H, W) relative inverse depth.

    H and W should be multiples of 32; the released model was trained at 384×384.
    """

    def __init__(self, cfg: DepthConfig = DPT_HYBRID) -> None:
        super().__init__()
        self.config = cfg
        self.pretrained = Encoder(cfg)
        self.scratch = Scratch(cfg)

    def forward(self, x: Tensor) -> Tensor:
        s = self.scratch
        l1, l2, l3, l4 = self.pretrained(x)
        r1, r2, r3, r4 = s.layer1_rn(l1), s.layer2_rn(l2), s.layer3_rn(l3), s.layer4_rn(l4)  # (B, F, ·, ·)
        path = s.refinenet4(r4, size=r3.shape[-2:])
        path = s.refinenet3(path, r3, size=r2.shape[-2:])
        path = s.refinenet2(path, r2, size=r1.shape[-2:])
        path = s.refinenet1(path, r1)  # (B, F, H/2, W/2)
        return s.output_conv(path).squeeze(1)  # (B, H, W)
