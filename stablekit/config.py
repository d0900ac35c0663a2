"""Typed presets for every Stable Diffusion family.

Values come from the released CompVis/Stability inference YAMLs, summarised with sources in
``shared/reference/sd-architectures.md``. Names say what they mean: ``num_heads`` is a count of heads,
``head_dim`` a width per head; exactly one of them is set per UNet.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

Prediction = Literal["eps", "v"]
Conditioning = Literal["txt2img", "inpaint", "depth", "upscale"]
TextKind = Literal["openai", "openclip"]


@dataclass(frozen=True)
class UNetConfig:
    """``ldm.modules.diffusionmodules.openaimodel.UNetModel``."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    # Levels (0 = full latent resolution) whose blocks carry a SpatialTransformer. The YAMLs express this
    # as downsample factors (attention_resolutions 4,2,1 -> levels 0,1,2).
    attention_levels: tuple[int, ...] = (0, 1, 2)
    num_heads: int | None = 8
    head_dim: int | None = None
    transformer_depth: int = 1
    context_dim: int = 768
    use_linear_proj: bool = False
    # x4 upscaler: noise_level label embedding, and per-level "attn1 attends to the context".
    num_classes: int | None = None
    disable_self_attn: tuple[bool, ...] | None = None
    norm_groups: int = 32
    # SD 2.1-v was trained with attention scores upcast to fp32; we always compute softmax in fp32.
    upcast_attention: bool = False

    def __post_init__(self) -> None:
        if (self.num_heads is None) == (self.head_dim is None):
            raise ValueError("UNetConfig: set exactly one of num_heads and head_dim")

    def heads_at(self, channels: int) -> tuple[int, int]:
        """(num_heads, head_dim) of a transformer with ``channels`` channels."""
        if self.head_dim is not None:
            return channels // self.head_dim, self.head_dim
        assert self.num_heads is not None
        return self.num_heads, channels // self.num_heads


@dataclass(frozen=True)
class VAEConfig:
    """``ldm.models.autoencoder.AutoencoderKL`` with its Encoder/Decoder."""

    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    norm_groups: int = 32
    scale_factor: float = 0.18215

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class TextConfig:
    """Frozen CLIP text tower: OpenAI CLIP in the HF layout (SD1) or OpenCLIP (SD2, x4)."""

    kind: TextKind = "openai"
    vocab_size: int = 49408
    context_length: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    # The MLP's hidden width (transformers' ``intermediate_size``): 4 x width in both released towers, anything in
    # diffusers' test fixtures (37 for width 32).
    mlp_width: int = 3072
    activation: Literal["quick_gelu", "gelu"] = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # Transformer layers actually run: all for SD1 ("last"), all but one for SD2 ("penultimate").
    # The final LayerNorm is applied to that output in both cases.
    layers_used: int = 12
    pad_token: int = 49407
    # Width of ``text_projection`` (OpenCLIP only; loaded for strict key parity, unused by SD).
    embed_dim: int = 1024

    def __post_init__(self) -> None:
        if self.heads < 1 or self.width % self.heads:
            raise ValueError(f"TextConfig: width {self.width} does not split into {self.heads} heads")
        if not 1 <= self.layers_used <= self.layers:
            raise ValueError(f"TextConfig: layers_used {self.layers_used} is not in 1..{self.layers}")


@dataclass(frozen=True)
class ScheduleConfig:
    """The training noise schedule and the sampler settings the released scheduler configs ship."""

    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: Literal["scaled_linear", "linear"] = "scaled_linear"
    num_train_timesteps: int = 1000
    prediction: Prediction = "eps"
    # None = the sampler's own default, as in the released scheduler configs, which lack the key: diffusers'
    # ``XScheduler.from_config`` then uses the class default (leading for DDIM/PNDM, linspace for the rest).
    timestep_spacing: Literal["leading", "trailing", "linspace"] | None = None
    steps_offset: int = 1
    set_alpha_to_one: bool = False
    # Lin et al. 2023: shift the betas so the last step is pure noise (for models trained that way).
    rescale_betas_zero_snr: bool = False


@dataclass(frozen=True)
class ModelConfig:
    """A whole family: the three networks, its schedule and how the UNet is conditioned."""

    name: str
    unet: UNetConfig
    vae: VAEConfig
    text: TextConfig
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    conditioning: Conditioning = "txt2img"
    default_size: int = 512
    default_sampler: str = "pndm"
    # The scheduler config's settings for that sampler, as (option, value) pairs (e.g. (("karras", True),) for
    # EulerDiscreteScheduler with use_karras_sigmas): used only when no sampler is named.
    default_sampler_options: tuple[tuple[str, Any], ...] = ()
    default_steps: int = 50
    default_guidance: float = 7.5
    # x4 upscaler: the low-res image is noised with its own schedule before concatenation.
    low_res_schedule: ScheduleConfig | None = None
    max_noise_level: int = 350

    def __post_init__(self) -> None:
        # A config read back from JSON (a file's metadata) has lists for the pairs; keep the field hashable.
        pairs = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in self.default_sampler_options)
        object.__setattr__(self, "default_sampler_options", pairs)

    def with_prediction(self, prediction: Prediction) -> ModelConfig:
        return replace(self, schedule=replace(self.schedule, prediction=prediction))


OPENAI_CLIP_L = TextConfig()
OPENCLIP_H = TextConfig(
    kind="openclip", width=1024, layers=24, heads=16, mlp_width=4096, activation="gelu", layers_used=23, pad_token=0
)
SD_VAE = VAEConfig()

SD1 = ModelConfig(name="sd1", unet=UNetConfig(), vae=SD_VAE, text=OPENAI_CLIP_L)
SD1_INPAINT = replace(
    SD1, name="sd1-inpaint", unet=UNetConfig(in_channels=9), conditioning="inpaint", default_sampler="ddim"
)

_SD2_UNET = UNetConfig(num_heads=None, head_dim=64, context_dim=1024, use_linear_proj=True)
SD2_BASE = ModelConfig(name="sd2-base", unet=_SD2_UNET, vae=SD_VAE, text=OPENCLIP_H)
SD2_V = replace(
    SD2_BASE,
    name="sd2-v",
    unet=replace(_SD2_UNET, upcast_attention=True),
    schedule=ScheduleConfig(prediction="v"),
    default_size=768,
    default_sampler="ddim",
)
SD2_INPAINT = replace(
    SD2_BASE, name="sd2-inpaint", unet=replace(_SD2_UNET, in_channels=9), conditioning="inpaint", default_sampler="ddim"
)
SD2_DEPTH = replace(
    SD2_BASE, name="sd2-depth", unet=replace(_SD2_UNET, in_channels=5), conditioning="depth", default_sampler="ddim"
)
X4_UPSCALER = ModelConfig(
    name="x4-upscaler",
    unet=UNetConfig(
        in_channels=7,
        model_channels=256,
        channel_mult=(1, 2, 2, 4),
        attention_levels=(1, 2, 3),
        num_heads=8,
        context_dim=1024,
        use_linear_proj=True,
        num_classes=1000,
        disable_self_attn=(True, True, True, False),
    ),
    vae=VAEConfig(ch_mult=(1, 2, 4), scale_factor=0.08333),
    text=OPENCLIP_H,
    schedule=ScheduleConfig(beta_start=0.0001, beta_end=0.02, prediction="v"),
    conditioning="upscale",
    default_size=512,
    default_sampler="ddim",
    default_steps=75,
    default_guidance=9.0,
    # LDM's "linear" is linear in sqrt(beta), i.e. scaled_linear (diffusers' low_res_scheduler agrees).
    low_res_schedule=ScheduleConfig(beta_start=0.0001, beta_end=0.02),
)

# The embedded demo model (trained by ``stablekit train demo`` on generated shapes, 64x64): SD1's code paths
# at small widths, ~9.5M parameters (< 20 MB in fp16), most of them the text tower's 49408-token embedding.
# GroupNorm keeps 4 channels per group at the narrowest level, as SD's 128/32 does: with one channel per group
# every norm would erase a flat colour (a constant channel normalises to zero), and the demo images are flat.
DEMO = ModelConfig(
    name="demo",
    unet=UNetConfig(
        model_channels=64,
        channel_mult=(1, 1, 2),
        num_res_blocks=1,
        attention_levels=(0, 1, 2),
        num_heads=4,
        context_dim=64,
        norm_groups=16,
    ),
    vae=VAEConfig(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=8),
    text=TextConfig(width=64, layers=3, heads=4, mlp_width=256, layers_used=3, embed_dim=64),
    default_size=64,
    default_sampler="dpmpp_2m",
    default_steps=20,
)

PRESETS: dict[str, ModelConfig] = {
    c.name: c for c in (SD1, SD1_INPAINT, SD2_BASE, SD2_V, SD2_INPAINT, SD2_DEPTH, X4_UPSCALER, DEMO)
}

# The embedded demo x4 upscaler (trained by ``stablekit train demo-upscaler``): takes the demo model's 64 px images
# to 256 px. X4_UPSCALER's code paths at small widths: an f=4 autoencoder, the low-res RGB concatenated to the
# latents, the noise level as a class label, and DEMO's text tower (its trained weights, frozen). Attention only
# at the lowest level, attending to the text: self-attention learnt on training crops would see 16x the tokens at
# 256 px. ``num_classes`` covers exactly the noise levels trained, so none of its rows stays untrained.
DEMO_X4 = replace(
    X4_UPSCALER,
    name="demo-x4",
    unet=UNetConfig(
        in_channels=7,
        model_channels=64,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        attention_levels=(2,),
        num_heads=4,
        context_dim=64,
        use_linear_proj=True,
        num_classes=351,
        disable_self_attn=(True, True, True),
        norm_groups=16,
    ),
    vae=VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8),
    text=DEMO.text,
    # Trailing spacing: a few DDIM steps start at t = 999, the pure noise they are given ("leading" starts
    # one stride lower; one leading step would run at t = 1).
    schedule=replace(X4_UPSCALER.schedule, timestep_spacing="trailing"),
    default_size=256,
    # Measured by benchmarks/demo_upscale.py (12 held-out prompts, noise level 0, guidance 1): PSNR 35.2 dB at
    # 1 DDIM step, 34.4 at 2, 33.8 at 5, 33.5 at 10, 33.3 at 20, at the same sharpness (0.78-0.79 of the
    # reference's RMS gradient); guidance 3 cost 0.6 dB at 2 steps. One step is the model's estimate of the
    # mean image given the input, which is what PSNR rewards; more steps commit to edges the small UNet places
    # less exactly.
    default_sampler="ddim",
    default_steps=1,
    default_guidance=1.0,
)
PRESETS[DEMO_X4.name] = DEMO_X4
