"""Text encoders against transformers' CLIPTextModel and open_clip's TextTransformer on identical random
weights, through the key table; full-size key names and shapes on the meta device."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from stablekit.config import OPENAI_CLIP_L, OPENCLIP_H, TextConfig
from stablekit.models.clip import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder, TextEncoder, text_encoder
from stablekit.text.tokenizer import tokenize
from stablekit.weights.convert import fit_state_dict, from_original, to_original
from stablekit.weights.tables.text import (
    diffusers_text_config,
    text_config_from_diffusers,
    text_ignored_keys,
    text_splits,
    text_table,
    with_text_model_prefix,
)
from tests.oracles import open_clip_module, require
from tests.tiny import TINY_TEXT_SD1, TINY_TEXT_SD2

transformers = require("transformers")

TOL = 1e-4


def _scramble(model: nn.Module) -> None:
    """Random weights large enough that attention is far from uniform (the reference inits are tiny)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            # 1-D weights are LayerNorm gains: keep them around 1.
            p.copy_(1 + 0.1 * noise if p.dim() == 1 and name.endswith("weight") else 0.3 * noise)


def _ids(cfg: TextConfig) -> Tensor:
    """Two real prompts (one padded, one truncated) and one batch row of random ids."""
    real = tokenize(["a red cube on a blue sphere", "many words " * 60], pad_token=cfg.pad_token).ids
    gen = torch.Generator().manual_seed(2)
    rand = torch.randint(0, cfg.vocab_size, (1, cfg.context_length), generator=gen)
    return torch.cat([real, rand])


def _hf_model(cfg: TextConfig) -> nn.Module:
    hf_cfg = transformers.CLIPTextConfig(**diffusers_text_config(cfg))
    hf_cfg._attn_implementation = "eager"
    model = transformers.CLIPTextModel(hf_cfg).eval()
    _scramble(model)
    return model


def _load_from_hf(cfg: TextConfig, hf: nn.Module) -> TextEncoder:
    ours = text_encoder(cfg).eval()
    hf_state = with_text_model_prefix(hf.state_dict())
    state = to_original(hf_state, text_table(cfg), text_splits(cfg), ignore=text_ignored_keys(cfg))
    ours.load_state_dict(fit_state_dict(ours, state, optional=ours.OPTIONAL_KEYS), strict=True)
    return ours


# diffusers' fixtures' odd MLP width, and an eps far from the default so that reading it matters.
ODD_SD1 = replace(TINY_TEXT_SD1, mlp_width=37, layer_norm_eps=1e-2)
ODD_SD2 = replace(TINY_TEXT_SD2, mlp_width=37, layer_norm_eps=1e-2)


@pytest.mark.parametrize(
    "cfg",
    [TINY_TEXT_SD1, TINY_TEXT_SD2, ODD_SD1, ODD_SD2],
    ids=["sd1-quick-gelu", "sd2-penultimate", "sd1-mlp37-eps", "sd2-mlp37-eps"],
)
def test_matches_transformers_clip_text_model(cfg: TextConfig) -> None:
    hf = _hf_model(cfg)
    ours = _load_from_hf(cfg, hf)
    ids = _ids(cfg)
    with torch.no_grad():
        want = hf(input_ids=ids).last_hidden_state
        got = ours(ids)
    assert got.shape == (3, 77, cfg.width)
    diff = (got - want).abs().max().item()
    print(f"{cfg.kind} vs CLIPTextModel: max abs diff {diff:.2e}")
    assert diff <= TOL
    # The comparison can fail: the pad id and the causal mask both change the output.
    with torch.no_grad():
        other_pad = ours(torch.where(ids == cfg.pad_token, 1, ids))
    assert (other_pad[:2] - want[:2]).abs().max() > 1e-2


@pytest.mark.parametrize("cfg", [TINY_TEXT_SD1, TINY_TEXT_SD2], ids=["sd1", "sd2"])
def test_exports_a_folder_transformers_loads(cfg: TextConfig, tmp_path: Path) -> None:
    ours = text_encoder(cfg).eval()
    _scramble(ours)
    state = from_original(ours.state_dict(), text_table(cfg), text_splits(cfg), ignore=ours.OPTIONAL_KEYS)
    assert all(k.startswith("text_model.") for k in state)  # the layout of released diffusers folders
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(diffusers_text_config(cfg)))
    hf, info = transformers.CLIPTextModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = _ids(cfg)
    with torch.no_grad():
        assert (ours(ids) - hf.eval()(input_ids=ids).last_hidden_state).abs().max() <= TOL


def test_openclip_matches_open_clip_text_transformer() -> None:
    cfg = TINY_TEXT_SD2
    oc = (
        open_clip_module("transformer")
        .TextTransformer(
            context_length=cfg.context_length,
            vocab_size=cfg.vocab_size,
            width=cfg.width,
            heads=cfg.heads,
            layers=cfg.layers,
            mlp_ratio=cfg.mlp_width / cfg.width,
            output_dim=cfg.embed_dim,
        )
        .eval()
    )
    _scramble(oc)
    ours = FrozenOpenCLIPEmbedder(cfg).eval()
    # Same layout, no table: open_clip's key names are ours after "model.".
    state = {f"model.{k}": v for k, v in oc.state_dict().items()}
    ours.load_state_dict(fit_state_dict(ours, state, optional=["model.logit_scale"]), strict=True)
    ids = _ids(cfg)
    with torch.no_grad():
        # Stability's FrozenOpenCLIPEmbedder.encode_with_transformer, layer="penultimate".
        x = oc.token_embedding(ids) + oc.positional_embedding
        for block in oc.transformer.resblocks[: cfg.layers_used]:
            x = block(x, attn_mask=oc.attn_mask)
        want = oc.ln_final(x)
        got = ours(ids)
    diff = (got - want).abs().max().item()
    print(f"openclip vs open_clip TextTransformer: max abs diff {diff:.2e}")
    assert diff <= TOL


def _key_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_full_size_sd1_keys_are_the_original_ones() -> None:
    with torch.device("meta"):
        model = FrozenCLIPEmbedder(OPENAI_CLIP_L)
    got = _key_shapes(model)
    p = "transformer.text_model."
    want = {
        p + "embeddings.token_embedding.weight": (49408, 768),
        p + "embeddings.position_embedding.weight": (77, 768),
        p + "embeddings.position_ids": (1, 77),
        p + "final_layer_norm.weight": (768,),
        p + "final_layer_norm.bias": (768,),
    }
    for i in range(12):
        layer = f"{p}encoder.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            want[f"{layer}self_attn.{name}.weight"] = (768, 768)
            want[f"{layer}self_attn.{name}.bias"] = (768,)
        for name in ("layer_norm1", "layer_norm2"):
            want[f"{layer}{name}.weight"] = want[f"{layer}{name}.bias"] = (768,)
        want[f"{layer}mlp.fc1.weight"], want[f"{layer}mlp.fc1.bias"] = (3072, 768), (3072,)
        want[f"{layer}mlp.fc2.weight"], want[f"{layer}mlp.fc2.bias"] = (768, 3072), (768,)
    assert got == want
    assert model.state_dict()[p + "embeddings.position_ids"].dtype == torch.long


def test_full_size_sd2_keys_are_the_original_ones() -> None:
    with torch.device("meta"):
        model = FrozenOpenCLIPEmbedder(OPENCLIP_H)
    got = _key_shapes(model)
    want = {
        "model.token_embedding.weight": (49408, 1024),
        "model.positional_embedding": (77, 1024),
        "model.ln_final.weight": (1024,),
        "model.ln_final.bias": (1024,),
        "model.text_projection": (1024, 1024),
        "model.logit_scale": (),
    }
    for i in range(24):
        block = f"model.transformer.resblocks.{i}."
        want[block + "attn.in_proj_weight"], want[block + "attn.in_proj_bias"] = (3072, 1024), (3072,)
        want[block + "attn.out_proj.weight"], want[block + "attn.out_proj.bias"] = (1024, 1024), (1024,)
        for name in ("ln_1", "ln_2"):
            want[f"{block}{name}.weight"] = want[f"{block}{name}.bias"] = (1024,)
        want[block + "mlp.c_fc.weight"], want[block + "mlp.c_fc.bias"] = (4096, 1024), (4096,)
        want[block + "mlp.c_proj.weight"], want[block + "mlp.c_proj.bias"] = (1024, 4096), (1024,)
    assert got == want
    optional = set(model.OPTIONAL_KEYS)
    assert optional == {k for k in want if k.startswith("model.transformer.resblocks.23.")} | {
        "model.text_projection",
        "model.logit_scale",
    }


@pytest.mark.parametrize("cfg", [OPENAI_CLIP_L, OPENCLIP_H], ids=["sd1", "sd2"])
def test_full_size_table_maps_onto_clip_text_model(cfg: TextConfig) -> None:
    with torch.device("meta"):
        ours = text_encoder(cfg)
        hf = transformers.CLIPTextModel(transformers.CLIPTextConfig(**diffusers_text_config(cfg)))
    exported = from_original(ours.state_dict(), text_table(cfg), text_splits(cfg), ignore=ours.OPTIONAL_KEYS)
    hf_state = with_text_model_prefix(hf.state_dict())
    assert _key_shapes_of(exported) == _key_shapes_of(hf_state)
    back = to_original(hf_state, text_table(cfg), text_splits(cfg), ignore=text_ignored_keys(cfg))
    assert set(back) == set(ours.state_dict()) - set(ours.OPTIONAL_KEYS)


def _key_shapes_of(state: dict[str, Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def test_diffusers_config_round_trip() -> None:
    for cfg in (OPENAI_CLIP_L, OPENCLIP_H, TINY_TEXT_SD2, replace(TINY_TEXT_SD1, embed_dim=1024), ODD_SD2):
        assert text_config_from_diffusers(diffusers_text_config(cfg)) == cfg
    sd2 = diffusers_text_config(OPENCLIP_H)
    assert (sd2["num_hidden_layers"], sd2["hidden_act"], sd2["intermediate_size"]) == (23, "gelu", 4096)
    # The shipped SD2 config says projection_dim 512, which does not describe ViT-H; it is ignored.
    assert text_config_from_diffusers({**sd2, "projection_dim": 512}) == OPENCLIP_H
    with pytest.raises(ValueError, match="activation"):
        text_config_from_diffusers({**sd2, "hidden_act": "relu"})


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cfg", [TINY_TEXT_SD1, TINY_TEXT_SD2], ids=["sd1", "sd2"])
def test_half_precision_forward_is_finite(cfg: TextConfig, dtype: torch.dtype) -> None:
    model = text_encoder(cfg).eval()
    ids = _ids(cfg)
    with torch.no_grad():
        ref = model(ids)
        out = model.to(dtype)(ids)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.1


@pytest.mark.parametrize("cfg", [TINY_TEXT_SD1, ODD_SD2], ids=["sd1", "sd2"])
def test_skip_is_an_earlier_hidden_state_through_the_final_norm(cfg: TextConfig) -> None:
    """``skip=k`` is diffusers' ``clip_skip=k``: ``hidden_states[-(k + 1)]`` through ``final_layer_norm``."""
    hf = _hf_model(cfg)
    ours = _load_from_hf(cfg, hf)
    ids = _ids(cfg)
    norm = getattr(hf, "text_model", hf).final_layer_norm  # transformers 5 dropped the text_model level
    with torch.no_grad():
        hidden = hf(input_ids=ids, output_hidden_states=True).hidden_states
        for k in range(cfg.layers_used):
            assert (ours(ids, skip=k) - norm(hidden[-(k + 1)])).abs().max() <= TOL, k
        with pytest.raises(ValueError, match=f"cannot skip {cfg.layers_used} of"):
            ours(ids, skip=cfg.layers_used)


@pytest.mark.parametrize("bad", [49408, -1])
def test_an_id_outside_the_vocabulary_is_a_value_error(bad: int) -> None:
    for cfg in (TINY_TEXT_SD1, TINY_TEXT_SD2):
        ids = torch.zeros(1, 77, dtype=torch.long)
        ids[0, 3] = bad
        with pytest.raises(ValueError, match=f"token id {bad} is outside the text encoder's 49408-token vocabulary"):
            text_encoder(cfg)(ids)


def test_configs_written_with_an_mlp_ratio_still_load() -> None:
    """Our files written before TextConfig held the MLP width (the shipped demo models among them) say
    ``mlp_ratio``; their eps was always 1e-5."""
    from stablekit.config import DEMO
    from stablekit.demo import model_path
    from stablekit.weights import probe
    from stablekit.weights.detect import config_from_json, config_to_json

    d = json.loads(config_to_json(DEMO))
    del d["text"]["mlp_width"], d["text"]["layer_norm_eps"]
    d["text"]["mlp_ratio"] = 4
    assert config_from_json(json.dumps(d)) == DEMO
    assert probe(model_path()).config.text == DEMO.text
