"""Full-size SD1.5 and SD2.1 configs on random weights against diffusers/transformers (marked slow).

Run on demand: ``make slow`` (about 10 GB of RAM and a few minutes on 2 cores). The reference model is built with
its own random initialisation, perturbed, converted into ours through the key tables and loaded strictly.
"""

from __future__ import annotations

import pytest
import torch

from stablekit.config import SD1, SD2_V, ModelConfig
from stablekit.models.clip import text_encoder
from stablekit.models.unet import UNetModel
from stablekit.models.vae import AutoencoderKL
from stablekit.weights.convert import fit_state_dict, to_original
from stablekit.weights.tables.text import (
    diffusers_text_config,
    text_ignored_keys,
    text_splits,
    text_table,
    with_text_model_prefix,
)
from stablekit.weights.tables.unet import diffusers_unet_config, unet_table
from stablekit.weights.tables.vae import diffusers_vae_config, vae_table
from tests.oracles import require

pytestmark = pytest.mark.slow
diffusers = require("diffusers")
transformers = require("transformers")

FAMILIES = [SD1, SD2_V]


def _perturb(module: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)


def _report(name: str, diff: float) -> None:
    print(f"\n{name}: max abs diff {diff:.3e}")


@pytest.mark.parametrize("cfg", FAMILIES, ids=lambda c: c.name)
def test_unet_full_size(cfg: ModelConfig) -> None:
    ref = diffusers.UNet2DConditionModel(**diffusers_unet_config(cfg.unet, 64)).eval()
    _perturb(ref)
    ours = UNetModel(cfg.unet).eval()
    ours.load_state_dict(fit_state_dict(ours, to_original(ref.state_dict(), unet_table(cfg.unet))), strict=True)
    x = torch.randn(2, 4, 64, 64)
    t = torch.tensor([999, 301])
    ctx = torch.randn(2, 77, cfg.unet.context_dim)
    with torch.inference_mode():
        want = ref(x, t, encoder_hidden_states=ctx).sample
        del ref
        got = ours(x, t, ctx)
    diff = (got - want).abs().max().item()
    _report(f"{cfg.name} UNet 64x64 latents", diff)
    assert diff <= 1e-4


@pytest.mark.parametrize("cfg", FAMILIES[:1], ids=lambda c: c.name)
def test_vae_full_size(cfg: ModelConfig) -> None:
    ref = diffusers.AutoencoderKL(**diffusers_vae_config(cfg.vae)).eval()
    _perturb(ref)
    ours = AutoencoderKL(cfg.vae).eval()
    ours.load_state_dict(fit_state_dict(ours, to_original(ref.state_dict(), vae_table(cfg.vae))), strict=True)
    z = torch.randn(1, 4, 32, 32)
    img = torch.rand(1, 3, 256, 256) * 2 - 1
    with torch.inference_mode():
        d = (ours.decode(z) - ref.decode(z).sample).abs().max().item()
        e = (ours.encode(img).mean - ref.encode(img).latent_dist.mean).abs().max().item()
    _report("VAE decode 256px", d)
    _report("VAE encode mean 256px", e)
    assert d <= 1e-4 and e <= 1e-4


@pytest.mark.parametrize("cfg", FAMILIES, ids=lambda c: c.name)
def test_text_encoder_full_size(cfg: ModelConfig) -> None:
    ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(**diffusers_text_config(cfg.text))).eval()
    _perturb(ref)
    ours = text_encoder(cfg.text).eval()
    state = to_original(
        with_text_model_prefix(ref.state_dict()),
        text_table(cfg.text),
        text_splits(cfg.text),
        ignore=text_ignored_keys(cfg.text),
    )
    ours.load_state_dict(fit_state_dict(ours, state, optional=ours.OPTIONAL_KEYS), strict=True)
    ids = torch.randint(0, 49406, (2, 77))
    with torch.inference_mode():
        diff = (ours(ids) - ref(ids).last_hidden_state).abs().max().item()
    _report(f"{cfg.name} text encoder", diff)
    assert diff <= 1e-4
