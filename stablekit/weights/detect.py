"""What a checkpoint is, from its tensor shapes (and the little else a file carries).

Shapes give the family and every size: UNet width, levels, blocks, attention levels, projection kind,
context width, text tower, VAE; non-standard sizes (tiny test models, the demo model) load as well as the
releases. Three things are not in the shapes and are decided by rule, with a note saying so:

- attention heads: SD1 and x4 use 8 heads, SD2 64-wide heads (the released YAMLs); the text tower's heads and
  LayerNorm eps are the released tower's (CLIP ViT-L/14, OpenCLIP ViT-H/14) when its shapes are that tower's,
  else 64-wide heads and eps 1e-5, with a note either way;
- prediction type: SD2 512-base (eps) and 768-v (v) have identical shapes; ``global_step`` 875000 is
  2.0-base and 110000 is 2.1-v (diffusers' legacy rule), then the file name (``768`` vs ``512``/``base``),
  then diffusers' default for v2, v;
- the VAE latent scale: 0.18215, or 0.08333 for x4.

A file we wrote carries its full :class:`~stablekit.config.ModelConfig` as JSON under ``stablekit.config``
in its safetensors metadata, and that wins over all of the above.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from stablekit.config import (
    PRESETS,
    ModelConfig,
    Prediction,
    ScheduleConfig,
    TextConfig,
    UNetConfig,
    VAEConfig,
)
from stablekit.weights.convert import WeightsError

UNET = "model.diffusion_model."
VAE = "first_stage_model."
TEXT = "cond_stage_model."
METADATA_KEY = "stablekit.config"
# A model's own tokenizer (see stablekit.text.files), stored only when it is not the built-in CLIP one.
TOKENIZER_KEY = "stablekit.tokenizer"

Shapes = Mapping[str, tuple[int, ...]]


@dataclass
class Detection:
    config: ModelConfig
    family: str
    # Every size equals the family preset's (a released model rather than a custom one).
    standard: bool
    prediction_source: str
    # Where the noise schedule and sampler defaults come from (a single file without our metadata has none).
    schedule_source: str
    notes: list[str] = field(default_factory=list)


# --- the config as JSON (safetensors metadata) -------------------------------------------------------------

_NESTED: dict[str, type] = {
    "unet": UNetConfig,
    "vae": VAEConfig,
    "text": TextConfig,
    "schedule": ScheduleConfig,
    "low_res_schedule": ScheduleConfig,
}


def config_to_json(cfg: ModelConfig) -> str:
    return json.dumps(dataclasses.asdict(cfg), sort_keys=True)


def _build(cls: type, d: Mapping[str, Any]) -> Any:
    if cls is TextConfig and "mlp_ratio" in d:
        # Written before TextConfig held the MLP width: the MLP was width x mlp_ratio wide then.
        width = int(d.get("width", TextConfig.width))
        d = {"mlp_width": width * int(d["mlp_ratio"])} | {k: v for k, v in d.items() if k != "mlp_ratio"}
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {', '.join(sorted(unknown))}")
    # JSON has no tuples; every sequence field of the configs is a tuple.
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def config_from_json(text: str) -> ModelConfig:
    d = json.loads(text)
    if not isinstance(d, dict):
        raise ValueError("not a JSON object")
    parts = {k: _build(c, d[k]) if isinstance(d.get(k), dict) else d.get(k) for k, c in _NESTED.items() if k in d}
    cfg: ModelConfig = _build(ModelConfig, {**d, **parts})
    check_plausible(cfg)
    return cfg


def check_plausible(cfg: ModelConfig) -> None:
    """A stored config builds the model before any tensor is read, so its sizes are checked first: GroupNorm
    needs channels divisible by the group count, and a 1.5 kB file saying ``num_res_blocks: 100000`` would keep
    ``probe`` building modules for minutes. The bounds are far above any Stable Diffusion."""
    u, v = cfg.unet, cfg.vae
    ints = {
        "unet.model_channels": (u.model_channels, 4096),
        "unet.num_res_blocks": (u.num_res_blocks, 16),
        "unet.transformer_depth": (u.transformer_depth, 64),
        "unet.context_dim": (u.context_dim, 16384),
        "unet.in_channels": (u.in_channels, 64),
        "unet.out_channels": (u.out_channels, 64),
        "vae.in_channels": (v.in_channels, 64),
        "vae.out_channels": (v.out_channels, 64),
        "vae.embed_dim": (v.embed_dim, 64),
        "vae.ch": (v.ch, 4096),
        "vae.num_res_blocks": (v.num_res_blocks, 16),
        "vae.z_channels": (v.z_channels, 64),
        "text.layers": (cfg.text.layers, 128),
        "text.width": (cfg.text.width, 16384),
    }
    t = cfg.text
    ints |= {
        "text.vocab_size": (t.vocab_size, 1_000_000),
        "text.context_length": (t.context_length, 4096),
        "text.heads": (t.heads, 1024),
        "text.mlp_width": (t.mlp_width, 65536),
        "text.layers_used": (t.layers_used, 128),
    }
    for name, value in (
        ("unet.num_classes", u.num_classes),
        ("unet.num_heads", u.num_heads),
        ("unet.head_dim", u.head_dim),
    ):
        if value is not None:
            ints[name] = (value, 100_000)
    sched = cfg.schedule
    ints["schedule.num_train_timesteps"] = (sched.num_train_timesteps, 100_000)
    for name, beta in (("beta_start", sched.beta_start), ("beta_end", sched.beta_end)):
        if not isinstance(beta, float | int) or not 0 < beta < 1:
            raise ValueError(f"schedule.{name} is {beta!r}, not a number in (0, 1)")
    for name, (value, most) in ints.items():
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= most:
            raise ValueError(f"{name} is {value!r}, outside 1..{most}")
    for name, mults in (("unet.channel_mult", u.channel_mult), ("vae.ch_mult", v.ch_mult)):
        if not 1 <= len(mults) <= 8 or not all(isinstance(m, int) and 1 <= m <= 16 for m in mults):
            raise ValueError(f"{name} {mults!r} is not 1-8 levels of multipliers in 1..16")
    for name, base, mults, groups in (
        ("unet", u.model_channels, u.channel_mult, u.norm_groups),
        ("vae", v.ch, v.ch_mult, v.norm_groups),
    ):
        if not isinstance(groups, int) or groups < 1 or any((base * m) % groups for m in mults):
            raise ValueError(f"{name}.norm_groups {groups!r} does not divide its channel counts")


# --- sizes from shapes -----------------------------------------------------------------------------------


def _get(shapes: Shapes, key: str) -> tuple[int, ...]:
    if key not in shapes:
        raise WeightsError(f"cannot identify the model: tensor {key} is missing")
    return shapes[key]


def _indices(shapes: Shapes, prefix: str) -> list[int]:
    """The integers ``N`` of keys ``prefix + "N." + ...``, sorted."""
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in shapes if (m := pat.match(k))})


def _unet_sizes(s: Shapes) -> UNetConfig:
    """Every structural UNet size (heads are set by the caller)."""
    c0, in_ch = _get(s, UNET + "input_blocks.0.0.weight")[:2]
    blocks = _indices(s, UNET + "input_blocks.")
    downs = [k for k in blocks if UNET + f"input_blocks.{k}.0.op.weight" in s]
    n = downs[0] - 1 if downs else len(blocks) - 1
    mult, attention, self_attn = [], [], {}
    for level in range(len(downs) + 1):
        first = 1 + level * (n + 1)
        ch = _get(s, UNET + f"input_blocks.{first}.0.out_layers.3.weight")[0]
        if ch % c0:
            raise WeightsError(f"UNet level {level} has {ch} channels, not a multiple of {c0}")
        mult.append(ch // c0)
        st = UNET + f"input_blocks.{first}.1."
        if st + "norm.weight" in s:
            attention.append(level)
            # attn1 reads the context instead of x where self-attention is disabled (x4 upscaler). Only
            # visible when the context width differs from the level's width, as in every released file.
            self_attn[level] = _get(s, st + "transformer_blocks.0.attn1.to_k.weight")[1] == ch
    mid = UNET + "middle_block.1."
    disabled = None
    if not all(self_attn.values()):
        # A level without attention takes the flag of the next level that has it (the x4 YAML's [T, T, T, F]).
        nearest = [next((a for a in attention if a >= lvl), None) for lvl in range(len(mult))]
        disabled = tuple(a is not None and not self_attn[a] for a in nearest)
    label = s.get(UNET + "label_emb.weight")
    return UNetConfig(
        in_channels=in_ch,
        out_channels=_get(s, UNET + "out.2.weight")[0],
        model_channels=c0,
        channel_mult=tuple(mult),
        num_res_blocks=n,
        attention_levels=tuple(attention),
        transformer_depth=len(_indices(s, mid + "transformer_blocks.")),
        context_dim=_get(s, mid + "transformer_blocks.0.attn2.to_k.weight")[1],
        use_linear_proj=len(_get(s, mid + "proj_in.weight")) == 2,
        num_classes=label[0] if label else None,
        disable_self_attn=disabled,
    )


def _vae_sizes(s: Shapes) -> VAEConfig:
    ch, in_ch = _get(s, VAE + "encoder.conv_in.weight")[:2]
    levels = _indices(s, VAE + "encoder.down.")
    return VAEConfig(
        in_channels=in_ch,
        out_channels=_get(s, VAE + "decoder.conv_out.weight")[0],
        ch=ch,
        ch_mult=tuple(_get(s, VAE + f"encoder.down.{i}.block.0.conv2.weight")[0] // ch for i in levels),
        num_res_blocks=len(_indices(s, VAE + "encoder.down.0.block.")),
        z_channels=_get(s, VAE + "decoder.conv_in.weight")[1],
        embed_dim=_get(s, VAE + "post_quant_conv.weight")[0],
    )


def _text_sizes(s: Shapes, notes: list[str]) -> TextConfig:
    hf = TEXT + "transformer.text_model."
    oc = TEXT + "model."
    if hf + "embeddings.token_embedding.weight" in s:
        vocab, width = _get(s, hf + "embeddings.token_embedding.weight")
        layers = len(_indices(s, hf + "encoder.layers."))
        sizes = replace(
            PRESETS["sd1"].text,
            vocab_size=vocab,
            width=width,
            context_length=_get(s, hf + "embeddings.position_embedding.weight")[0],
            layers=layers,
            layers_used=layers,
            heads=1,
            mlp_width=_get(s, hf + "encoder.layers.0.mlp.fc1.weight")[0],
        )
        return _text_unstored(sizes, PRESETS["sd1"].text, "CLIP ViT-L/14", notes)
    if oc + "token_embedding.weight" in s:
        vocab, width = _get(s, oc + "token_embedding.weight")
        stored = len(_indices(s, oc + "transformer.resblocks."))
        proj = s.get(oc + "text_projection")
        if proj is None:
            # Converted from a diffusers folder, which keeps only the blocks that run (not the last one) and
            # no contrastive head.
            notes.append(f"OpenCLIP tower without text_projection: all {stored} stored blocks are run")
        sizes = replace(
            PRESETS["sd2-base"].text,
            vocab_size=vocab,
            width=width,
            context_length=_get(s, oc + "positional_embedding")[0],
            layers=stored if proj else stored + 1,
            layers_used=stored - 1 if proj else stored,  # SD2 reads the penultimate layer
            heads=1,
            mlp_width=_get(s, oc + "transformer.resblocks.0.mlp.c_fc.weight")[0],
            embed_dim=proj[1] if proj else width,
        )
        return _text_unstored(sizes, PRESETS["sd2-base"].text, "OpenCLIP ViT-H/14", notes)
    raise WeightsError(
        f"cannot identify the text encoder: neither {hf}embeddings.token_embedding.weight (CLIP) nor "
        f"{oc}token_embedding.weight (OpenCLIP) is present"
    )


def _text_unstored(sizes: TextConfig, released: TextConfig, name: str, notes: list[str]) -> TextConfig:
    """``sizes`` with the values no tensor records (heads, LayerNorm eps), each stated in a note: the released
    tower's when every shape is that tower's, else 64-wide heads (both released towers' head width) and eps 1e-5."""
    unstored = ("heads", "layer_norm_eps")
    stored = {k: v for k, v in dataclasses.asdict(sizes).items() if k not in unstored}
    if stored == {k: v for k, v in dataclasses.asdict(released).items() if k not in unstored}:
        notes.append(
            f"text encoder: {released.heads} heads and LayerNorm eps {released.layer_norm_eps:g} are {name}'s "
            "(the weights do not record them; every shape is that released tower's)"
        )
        return released
    heads = sizes.width // 64 if sizes.width % 64 == 0 else 1
    notes.append(
        f"text encoder: heads and LayerNorm eps are not recorded in the weights and the shapes are not {name}'s: "
        f"assumed {heads} head(s) of width {sizes.width // heads} and eps 1e-05"
    )
    return replace(sizes, heads=heads, layer_norm_eps=1e-5)


def _unet_heads(unet: UNetConfig, sd2: bool, notes: list[str]) -> UNetConfig:
    widths = [unet.model_channels * unet.channel_mult[lvl] for lvl in (*unet.attention_levels, -1)]
    if sd2 and all(w % 64 == 0 for w in widths):
        return replace(unet, num_heads=None, head_dim=64)
    if all(w % 8 == 0 for w in widths):
        if sd2:
            notes.append(f"UNet widths {widths} are not multiples of 64: assumed 8 heads, not 64-wide heads")
        return replace(unet, num_heads=8, head_dim=None)
    raise WeightsError(
        f"UNet attention widths {widths} fit neither 64-wide heads nor 8 heads; "
        "heads are not in the weights, so this file needs a stablekit config"
    )


# --- prediction type ---------------------------------------------------------------------------------------


def _sd2_prediction(global_step: int | None, name_hint: str | None) -> tuple[Prediction, str]:
    if global_step == 875000:
        return "eps", "global_step 875000 is SD 2.0-base, an eps model"
    if global_step == 110000:
        return "v", "global_step 110000 is SD 2.1-768, a v model"
    name = os.path.basename(name_hint or "").lower()
    if "768" in name:
        return "v", f"file name {name!r} says 768, the v-prediction release"
    if "512" in name or "base" in name:
        return "eps", f"file name {name!r} says 512/base, the eps release"
    return "v", (
        "assumed: SD2 512-base (eps) and 768-v (v) have identical weights and the file does not "
        "say which it is; v is diffusers' default for v2. Pass --prediction eps for a base model"
    )


def family_from(unet: UNetConfig, text: TextConfig, prediction: str) -> str:
    """The released family a model belongs to, whatever its sizes."""
    sd2 = text.kind == "openclip"
    if unet.num_classes is not None:
        return "x4-upscaler"
    if unet.in_channels == 9:
        return "sd2-inpaint" if sd2 else "sd1-inpaint"
    if unet.in_channels == 5:  # the depth channel says it whatever the text tower (diffusers' test fixture: SD1's)
        return "sd2-depth"
    if sd2:
        return "sd2-v" if prediction == "v" else "sd2-base"
    return "sd1"


def is_standard(cfg: ModelConfig, family: str) -> bool:
    """Whether the three networks have exactly the released sizes of ``family``."""
    preset = PRESETS[family]
    unet = replace(cfg.unet, upcast_attention=preset.unet.upcast_attention)
    return (unet, cfg.vae, cfg.text) == (preset.unet, preset.vae, preset.text)


def detect(
    shapes: Shapes,
    *,
    metadata: Mapping[str, str] | None = None,
    global_step: int | None = None,
    name_hint: str | None = None,
    prediction: Prediction | None = None,
) -> Detection:
    """Identify an original-layout checkpoint from its tensor shapes. ``prediction`` overrides what the
    file says or what would be assumed."""
    notes: list[str] = []
    stored = (metadata or {}).get(METADATA_KEY)
    if stored is not None:
        try:
            cfg = config_from_json(stored)
        except (ValueError, TypeError, RecursionError) as e:
            notes.append(f"ignored the file's stablekit config ({e}); detecting from shapes")
        else:
            source = "the file's stablekit config"
            if prediction is not None and prediction != cfg.schedule.prediction:
                cfg, source = cfg.with_prediction(prediction), "given by the caller"
            family = family_from(cfg.unet, cfg.text, cfg.schedule.prediction)
            return Detection(cfg, family, is_standard(cfg, family), source, "the file's stablekit config", notes)

    absent = [p for p in (UNET, VAE, TEXT) if not any(k.startswith(p) for k in shapes)]
    if absent:
        raise WeightsError(
            f"no {', '.join(p + '*' for p in absent)} tensors: not a whole Stable Diffusion checkpoint "
            "(a VAE, LoRA, embedding or UNet-only file?)"
        )
    unet = _unet_sizes(shapes)
    text = _text_sizes(shapes, notes)
    vae = _vae_sizes(shapes)
    family = family_from(unet, text, "eps")
    unet = _unet_heads(unet, text.kind == "openclip" and family != "x4-upscaler", notes)
    if prediction is not None:
        source = "given by the caller"
    elif family == "sd2-base":
        prediction, source = _sd2_prediction(global_step, name_hint)
        notes.append(f"prediction type {prediction}: {source}")
    else:
        prediction = PRESETS[family].schedule.prediction
        source = f"the {family} family default"
    family = family_from(unet, text, prediction)
    preset = PRESETS[family]
    cfg = replace(
        preset,
        unet=replace(unet, upcast_attention=preset.unet.upcast_attention),
        vae=replace(vae, scale_factor=preset.vae.scale_factor),
        text=text,
    ).with_prediction(prediction)
    standard = is_standard(cfg, family)
    if not standard:
        cfg = replace(cfg, name=f"{family}-custom")
    return Detection(cfg, family, standard, source, f"the {family} preset", notes)
