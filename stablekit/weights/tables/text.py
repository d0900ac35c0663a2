"""Text encoder: original keys (after ``cond_stage_model.``) <-> transformers ``CLIPTextModel`` keys (inside a
diffusers folder's ``text_encoder/``).

SD1's original layout already is transformers' (prefix ``transformer.``). SD2/x4's OpenCLIP tower is stored
by diffusers as a ``CLIPTextModel`` with only the ``layers_used`` blocks that run, exact GELU and the q/k/v
projections split out of ``in_proj_weight``/``in_proj_bias``; the unused last block, ``text_projection`` and
``logit_scale`` are dropped. Those original-only keys are the model's ``OPTIONAL_KEYS``, so converting
towards diffusers passes ``ignore=model.OPTIONAL_KEYS`` and converting back passes
``ignore=text_ignored_keys(cfg)``.
"""

from __future__ import annotations

from typing import Any

from stablekit.config import TextConfig

_HF_LAYER = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
    "layer_norm1",
    "layer_norm2",
    "mlp.fc1",
    "mlp.fc2",
)
# OpenCLIP block leaf -> CLIPEncoderLayer leaf (the fused in_proj is a split, not a rename).
_OPENCLIP_LAYER = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}


def text_table(cfg: TextConfig) -> dict[str, str]:
    """Original leaf-module path -> ``CLIPTextModel`` module path."""
    if cfg.kind == "openai":
        leaves = ["embeddings.token_embedding", "embeddings.position_embedding", "final_layer_norm"]
        leaves += [f"encoder.layers.{i}.{leaf}" for i in range(cfg.layers) for leaf in _HF_LAYER]
        return {f"transformer.text_model.{leaf}": f"text_model.{leaf}" for leaf in leaves}
    table = {
        "model.token_embedding": "text_model.embeddings.token_embedding",
        "model.ln_final": "text_model.final_layer_norm",
    }
    for i in range(cfg.layers_used):
        for ours, theirs in _OPENCLIP_LAYER.items():
            table[f"model.transformer.resblocks.{i}.{ours}"] = f"text_model.encoder.layers.{i}.{theirs}"
    return table


def text_splits(cfg: TextConfig) -> dict[str, list[str]]:
    """Original tensor key -> the ``CLIPTextModel`` tensor keys stacked (dim 0) to form it."""
    if cfg.kind == "openai":
        return {}
    # A bare parameter of ``model``, not a module's ``weight``: a one-part split is a plain rename.
    splits = {"model.positional_embedding": ["text_model.embeddings.position_embedding.weight"]}
    for i in range(cfg.layers_used):
        attn = f"text_model.encoder.layers.{i}.self_attn"
        for param in ("weight", "bias"):
            splits[f"model.transformer.resblocks.{i}.attn.in_proj_{param}"] = [
                f"{attn}.{p}_proj.{param}" for p in "qkv"
            ]
    return splits


def text_ignored_keys(cfg: TextConfig) -> tuple[str, ...]:
    """``CLIPTextModel`` keys with no original counterpart: the ``position_ids`` buffer that transformers
    before 4.31 saved (our encoders keep their own copy)."""
    return ("text_model.embeddings.position_ids",)


def diffusers_text_config(cfg: TextConfig) -> dict[str, Any]:
    """``text_encoder/config.json`` of a diffusers folder for ``cfg``."""
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.context_length,
        "hidden_size": cfg.width,
        "intermediate_size": cfg.mlp_width,
        "num_attention_heads": cfg.heads,
        # diffusers stores only the OpenCLIP blocks that run; an OpenAI tower keeps all its layers.
        "num_hidden_layers": cfg.layers_used if cfg.kind == "openclip" else cfg.layers,
        "hidden_act": cfg.activation,
        "layer_norm_eps": cfg.layer_norm_eps,
        "projection_dim": cfg.embed_dim,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": cfg.pad_token,
        "torch_dtype": "float32",
    }


def text_config_from_diffusers(d: dict[str, Any]) -> TextConfig:
    """The :class:`TextConfig` of a ``CLIPTextModel`` config; a key it lacks takes ``CLIPTextConfig``'s default,
    as transformers reads the file.

    The activation tells the towers apart: OpenAI CLIP (SD1) uses quick-GELU, OpenCLIP (SD2/x4) exact
    GELU. An OpenCLIP folder holds the ``layers_used`` blocks that run, so the original tower had one more.
    The pad id set here is the family's; a folder's own tokenizer replaces it.
    """
    width, n = int(d.get("hidden_size", 512)), int(d.get("num_hidden_layers", 12))
    act = d.get("hidden_act", "quick_gelu")
    heads = int(d.get("num_attention_heads", 8))
    if heads < 1 or width % heads:
        raise ValueError(f"text encoder hidden_size {width} does not split into num_attention_heads {heads}")
    common: dict[str, Any] = {
        "vocab_size": int(d.get("vocab_size", 49408)),
        "context_length": int(d.get("max_position_embeddings", 77)),
        "width": width,
        "heads": heads,
        "mlp_width": int(d.get("intermediate_size", 2048)),
        "layer_norm_eps": float(d.get("layer_norm_eps", 1e-5)),
    }
    if act == "quick_gelu":
        return TextConfig(kind="openai", layers=n, layers_used=n, activation="quick_gelu", pad_token=49407, **common)
    if act == "gelu":
        # projection_dim of SD2's shipped config (512) is not ViT-H's (1024 = width); the head is not
        # stored in diffusers folders anyway.
        return TextConfig(
            kind="openclip",
            layers=n + 1,
            layers_used=n,
            activation="gelu",
            pad_token=0,
            embed_dim=width,
            **common,
        )
    raise ValueError(f"unknown text encoder activation {act!r}: expected quick_gelu (SD1) or gelu (SD2)")


def with_text_model_prefix(state: dict[str, Any]) -> dict[str, Any]:
    """``text_encoder/`` keys as :func:`text_table` names them. Released folders use ``text_model.…``;
    transformers 5 saves ``CLIPTextModel`` without that prefix (and accepts both when loading)."""
    if any(k.startswith("text_model.") for k in state):
        return dict(state)
    return {f"text_model.{k}": v for k, v in state.items()}
