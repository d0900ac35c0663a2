"""``stablekit info``: what a checkpoint file or diffusers folder is, and what loading it would decide."""

from __future__ import annotations

import argparse

from stablekit.cli.options import add_weights_options
from stablekit.config import ModelConfig
from stablekit.weights import Probe, probe


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="identify a checkpoint: family, sizes, prediction type", description=__doc__)
    p.add_argument("path", help="checkpoint file (.safetensors/.ckpt/.bin) or diffusers folder")
    p.add_argument("--prediction", choices=("eps", "v"), help="override the prediction type, as generate would")
    add_weights_options(p)  # checked as generate would load them
    p.set_defaults(run=run)


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f}M"


def _sizes(cfg: ModelConfig) -> list[tuple[str, str]]:
    u, v, t = cfg.unet, cfg.vae, cfg.text
    heads = f"{u.head_dim}-wide heads" if u.head_dim is not None else f"{u.num_heads} heads"
    unet = (
        f"in {u.in_channels}, out {u.out_channels}, {u.model_channels} x {u.channel_mult}, "
        f"{u.num_res_blocks} res blocks/level, attention at levels {u.attention_levels}, {heads}, "
        f"context {u.context_dim}, {'linear' if u.use_linear_proj else 'conv'} projections"
    )
    if u.num_classes is not None:
        unet += f", {u.num_classes} noise-level classes"
    if u.disable_self_attn is not None:
        unet += f", cross-attention only at levels {[i for i, d in enumerate(u.disable_self_attn) if d]}"
    vae = f"{v.ch} x {v.ch_mult}, {v.num_res_blocks} res blocks/level, z {v.z_channels}, scale {v.scale_factor:g}"
    kind = "OpenAI CLIP" if t.kind == "openai" else "OpenCLIP"
    text = (
        f"{kind}, width {t.width}, MLP {t.mlp_width}, {t.layers} layers ({t.layers_used} used), {t.heads} heads, "
        f"{t.activation}, LayerNorm eps {t.layer_norm_eps:g}, vocabulary {t.vocab_size}, {t.context_length} "
        f"positions, pad id {t.pad_token}"
    )
    return [("unet", unet), ("vae", vae), ("text", text)]


def _tokenizer(found: Probe) -> str:
    tok = found.tokenizer
    if tok is None:
        return f"the built-in CLIP vocabulary (49408 tokens), padding with id {found.config.text.pad_token}"
    pad = f"pad {tok.pad_token!r} = {tok.pad_id}" if tok.pad_token is not None else "pad as the config says"
    length = f", {tok.max_length} tokens a prompt" if tok.max_length is not None else ""
    return f"the model's own, {tok.source} ({len(tok.vocab)} tokens, {pad}{length})"


def describe(found: Probe) -> list[str]:
    """The report's lines."""
    cfg, s = found.config, found.config.schedule
    counts = found.parameter_counts()
    dtypes = ", ".join(f"{name} x {n}" for name, n in found.dtypes.most_common())
    rows = [
        ("path", found.path),
        ("format", found.format),
        ("family", f"{found.family} ({'standard' if found.standard else 'non-standard'} sizes)"),
        ("config", cfg.name),
        ("prediction", f"{s.prediction} ({found.prediction_source})"),
        (
            "schedule",
            f"{s.beta_schedule} {s.beta_start:g}..{s.beta_end:g}, {s.num_train_timesteps} steps "
            f"({found.schedule_source})",
        ),
        (
            "defaults",
            f"{cfg.default_size} px, {cfg.default_sampler}"
            + "".join(f" {k}={v}" for k, v in cfg.default_sampler_options)
            + f", {cfg.default_steps} steps, "
            f"guidance {cfg.default_guidance:g}",
        ),
        ("dtypes", dtypes),
        (
            "parameters",
            ", ".join(f"{k} {_millions(n)}" for k, n in counts.items()) + f", total {_millions(sum(counts.values()))}",
        ),
        *_sizes(cfg),
        ("tokenizer", _tokenizer(found)),
    ]
    if found.ema:
        used = "loaded in place of the live weights" if found.ema_loaded else "not loaded; --ema samples with them"
        rows.append(("ema", f"{found.ema} EMA UNet weights (model_ema.*), {used}"))
    if found.vae is not None:
        rows.append(("vae file", f"{found.vae} (in place of the checkpoint's autoencoder)"))
    width = max(len(k) for k, _ in rows) + 2
    lines = [f"{k + ':':<{width}}{v}" for k, v in rows]
    if found.dropped:
        lines.append("not loaded:")
        lines += [f"  {len(keys)} key(s): {why} (e.g. {keys[0]})" for why, keys in found.dropped.items()]
    if found.notes:
        lines.append("notes:")
        lines += [f"  - {n}" for n in found.notes]
    return lines


def run(args: argparse.Namespace) -> int:
    found = probe(args.path, prediction=args.prediction, ema=args.ema, vae=args.vae, variant=args.variant)
    for line in describe(found):
        print(line)
    return 0
