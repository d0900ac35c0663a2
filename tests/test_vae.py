"""KL autoencoder: parity with diffusers' AutoencoderKL on identical random weights, the key table at full
size, config conversion, and tiling."""

from dataclasses import replace

import pytest
import torch
from diffusers import AutoencoderKL as RefAutoencoderKL

from stablekit.config import SD_VAE, X4_UPSCALER, VAEConfig
from stablekit.models.vae import AutoencoderKL, DiagonalGaussian
from stablekit.nn.tiling import blend_weights, tile_starts, tiled
from stablekit.weights.convert import fit_state_dict, from_original, to_original
from stablekit.weights.tables.vae import (
    diffusers_vae_config,
    has_legacy_attention,
    vae_config_from_diffusers,
    vae_table,
)
from tests.tiny import TINY_VAE

# Three levels (f=4) like the x4 upscaler's VAE.
TINY_X4_VAE = replace(TINY_VAE, ch_mult=(1, 2, 4), scale_factor=0.08333)


def _reference(cfg: VAEConfig) -> RefAutoencoderKL:
    ref = RefAutoencoderKL(**diffusers_vae_config(cfg)).eval()
    # Fresh GroupNorms are the identity affine; perturb them so a swapped norm would show.
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return ref


def _ours_from(ref: RefAutoencoderKL, cfg: VAEConfig) -> AutoencoderKL:
    ours = AutoencoderKL(cfg).eval()
    ours.load_state_dict(fit_state_dict(ours, to_original(ref.state_dict(), vae_table(cfg))), strict=True)
    return ours


def _param_modules(model: torch.nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))}


@pytest.fixture(scope="module", params=[TINY_VAE, TINY_X4_VAE], ids=["tiny", "tiny-x4"])
def pair(request: pytest.FixtureRequest) -> tuple[VAEConfig, AutoencoderKL, RefAutoencoderKL]:
    torch.manual_seed(0)
    cfg = request.param
    ref = _reference(cfg)
    return cfg, _ours_from(ref, cfg), ref


@pytest.mark.parametrize("size", [(32, 24), (27, 21)])  # the second is not a multiple of f
@torch.no_grad()
def test_encode_matches_diffusers(pair, size):
    _, ours, ref = pair
    x = torch.rand(2, 3, *size) * 2 - 1
    got, want = ours.encode(x), ref.encode(x).latent_dist
    assert got.mean.shape == want.mean.shape
    for a, b in ((got.mean, want.mean), (got.logvar, want.logvar), (got.std, want.std)):
        assert (a - b).abs().max() <= 1e-4
    assert torch.equal(got.mode(), got.mean)
    # Same generator state -> the same noise draw, so the samples agree to the mean/std tolerance.
    s_got = got.sample(torch.Generator().manual_seed(7))
    s_want = want.sample(generator=torch.Generator().manual_seed(7))
    assert (s_got - s_want).abs().max() <= 1e-4
    gens = [torch.Generator().manual_seed(i) for i in (3, 4)]
    s_got = got.sample([torch.Generator().manual_seed(i) for i in (3, 4)])
    assert (s_got - want.sample(generator=gens)).abs().max() <= 1e-4


@pytest.mark.parametrize("size", [(16, 12), (13, 9)])
@torch.no_grad()
def test_decode_matches_diffusers(pair, size):
    cfg, ours, ref = pair
    z = torch.randn(2, 4, *size)
    got, want = ours.decode(z), ref.decode(z).sample
    assert got.shape == (2, 3, size[0] * cfg.downsample, size[1] * cfg.downsample) == want.shape
    assert (got - want).abs().max() <= 1e-4


def test_logvar_is_clamped():
    logvar = torch.cat([torch.full((1, 2, 2, 2), -100.0), torch.full((1, 2, 2, 2), 100.0)], 1)
    moments = torch.cat([torch.zeros(1, 4, 2, 2), logvar], 1)
    post = DiagonalGaussian(moments)
    assert post.logvar[:, :2].eq(-30).all() and post.logvar[:, 2:].eq(20).all()
    assert torch.allclose(post.std, torch.exp(0.5 * post.logvar))


@pytest.mark.parametrize("cfg", [SD_VAE, X4_UPSCALER.vae, TINY_VAE, TINY_X4_VAE], ids=["sd", "x4", "tiny", "tiny-x4"])
def test_table_covers_both_layouts(cfg):
    with torch.device("meta"):
        ours, ref = AutoencoderKL(cfg), RefAutoencoderKL(**diffusers_vae_config(cfg))
    table = vae_table(cfg)
    assert set(table) == _param_modules(ours)
    assert set(table.values()) == _param_modules(ref)
    # Shapes agree after renaming, in both directions (the attention projections are reshaped 4-D <-> 2-D).
    to_ref = fit_state_dict(ref, from_original(ours.state_dict(), table))
    assert to_ref["decoder.mid_block.attentions.0.to_q.weight"].dim() == 2
    to_ours = fit_state_dict(ours, to_original(ref.state_dict(), table))
    assert to_ours["decoder.mid.attn_1.q.weight"].dim() == 4


def test_full_size_keys_match_the_fact_sheet():
    with torch.device("meta"):
        sd = AutoencoderKL(SD_VAE).state_dict()
        x4 = AutoencoderKL(X4_UPSCALER.vae).state_dict()
    assert sd["encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert sd["decoder.up.0.block.0.nin_shortcut.weight"].shape == (128, 256, 1, 1)
    assert sd["decoder.up.3.upsample.conv.weight"].shape == (512, 512, 3, 3)
    assert "decoder.up.0.upsample.conv.weight" not in sd
    assert sd["quant_conv.weight"].shape == (8, 8, 1, 1)
    assert sd["post_quant_conv.weight"].shape == (4, 4, 1, 1)
    assert any(k.startswith("encoder.down.3.") for k in sd)
    assert not any(k.startswith("encoder.down.3.") for k in x4)


@torch.no_grad()
def test_round_trip_and_legacy_names(pair):
    cfg, ours, ref = pair
    table = vae_table(cfg)
    theirs = from_original(ours.state_dict(), table)
    ref2 = RefAutoencoderKL(**diffusers_vae_config(cfg))
    ref2.load_state_dict(fit_state_dict(ref2, theirs), strict=True)
    back = fit_state_dict(ours, to_original(ref2.state_dict(), table))
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())

    legacy_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for key, tensor in ref.state_dict().items():
        for new, old in legacy_names.items():
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        legacy[key] = tensor
    assert has_legacy_attention(legacy) and not has_legacy_attention(ref.state_dict())
    from_legacy = to_original(legacy, vae_table(cfg, legacy_attention=True))
    modern = to_original(ref.state_dict(), table)
    assert from_legacy.keys() == modern.keys()
    assert all(torch.equal(from_legacy[k], modern[k]) for k in modern)


def test_config_conversion():
    for cfg in (SD_VAE, X4_UPSCALER.vae, TINY_VAE, TINY_X4_VAE):
        assert vae_config_from_diffusers(diffusers_vae_config(cfg)) == cfg
    d = diffusers_vae_config(SD_VAE)
    assert d["block_out_channels"] == [128, 256, 512, 512] and d["layers_per_block"] == 2
    assert d["latent_channels"] == 4 and d["norm_num_groups"] == 32 and d["scaling_factor"] == 0.18215
    x4 = diffusers_vae_config(X4_UPSCALER.vae)
    assert x4["block_out_channels"] == [128, 256, 512] and x4["scaling_factor"] == 0.08333
    # A config without scaling_factor means the class default, except for the three-level x4 VAE, which
    # diffusers' upscale pipeline forces to 0.08333.
    sd_missing = {k: v for k, v in d.items() if k != "scaling_factor"}
    assert vae_config_from_diffusers(sd_missing).scale_factor == 0.18215
    x4_missing = {k: v for k, v in x4.items() if k != "scaling_factor"}
    assert vae_config_from_diffusers(x4_missing).scale_factor == 0.08333
    assert vae_config_from_diffusers({**x4, "scaling_factor": 0.18215}).scale_factor == 0.08333
    for bad in (
        {"use_quant_conv": False},
        {"mid_block_add_attention": False},
        {"shift_factor": 0.1159},
        {"down_block_types": ["DownEncoderBlock2D"]},
    ):
        with pytest.raises(ValueError):
            vae_config_from_diffusers({**d, **bad})
    with pytest.raises(ValueError):
        diffusers_vae_config(replace(SD_VAE, embed_dim=8))


@pytest.mark.parametrize("scale", [1, 4])
@pytest.mark.parametrize("size,tile,overlap", [(40, 16, 4), (37, 16, 6), (20, 12, 8), (9, 4, 0)])
def test_tile_weights_partition_unity_and_blend_a_local_op_exactly(scale, size, tile, overlap):
    starts = tile_starts(size, tile, overlap)
    assert starts[0] == 0 and starts[-1] + min(size, tile) == size
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:], strict=False))
    total = torch.zeros(size * scale)
    for s, w in zip(starts, blend_weights(size, tile, starts, scale), strict=True):
        assert (w > 0).all()
        total[s * scale : s * scale + w.numel()] += w
    assert torch.allclose(total, torch.ones_like(total), atol=1e-6)

    # A position-wise op gives the same value from every tile, so blending must reproduce it.
    x = torch.randn(2, 3, size, size + 3)
    up = lambda t: t.repeat_interleave(scale, -1).repeat_interleave(scale, -2) ** 2  # noqa: E731
    got = tiled(up, x, x.shape[-2:], tile, overlap, in_scale=1, out_scale=scale)
    assert torch.allclose(got, up(x), atol=1e-5)
    pool = lambda t: torch.nn.functional.avg_pool2d(t, scale)  # noqa: E731
    grid = (size // scale, (size + 3) // scale)
    got = tiled(pool, x, grid, tile, overlap, in_scale=scale, out_scale=1)
    assert torch.allclose(got, pool(x), atol=1e-5)


@torch.no_grad()
def test_one_tile_equals_plain(pair):
    cfg, ours, _ = pair
    f = cfg.downsample
    z = torch.randn(1, 4, 13, 10)
    assert torch.equal(ours.decode_tiled(z, tile=16, overlap=4), ours.decode(z))
    x = torch.rand(1, 3, 27, 21) * 2 - 1
    assert torch.equal(ours.encode_tiled(x, tile=16 * f, overlap=4 * f).mean, ours.encode(x).mean)
    assert torch.equal(ours.encode_tiled(x, tile=16 * f, overlap=4 * f).logvar, ours.encode(x).logvar)


@torch.no_grad()
def test_several_tiles(pair):
    cfg, ours, _ = pair
    f = cfg.downsample
    z = torch.randn(1, 4, 20, 28)
    tile, overlap = 12, 4
    got = ours.decode_tiled(z, tile=tile, overlap=overlap)
    plain = ours.decode(z)
    assert got.shape == plain.shape and torch.isfinite(got).all()
    # Columns: tiles at 0, 8, 16 (28 = 16 + 12). Away from the seams each output pixel is exactly that
    # tile's own decode; inside an overlap it is a convex mix of the two tiles' decodes.
    assert tile_starts(28, tile, overlap) == [0, 8, 16] and tile_starts(20, tile, overlap) == [0, 8]
    rows = slice(0, 8 * f)  # covered by the first row of tiles only
    t0 = ours.decode(z[..., 0:12, 0:12])
    t1 = ours.decode(z[..., 0:12, 8:20])
    assert torch.equal(got[..., rows, : 8 * f], t0[..., rows, : 8 * f])
    assert torch.equal(got[..., rows, 12 * f : 16 * f], t1[..., rows, 4 * f : 8 * f])
    a, b = t0[..., rows, 8 * f : 12 * f], t1[..., rows, : 4 * f]
    seam = got[..., rows, 8 * f : 12 * f]
    assert (seam >= torch.minimum(a, b) - 1e-6).all() and (seam <= torch.maximum(a, b) + 1e-6).all()
    # The whole result stays nearer the untiled decode than an unrelated image is. Not close: each tile
    # has its own GroupNorm statistics and attention context, which random weights exaggerate.
    unrelated = ours.decode(torch.randn_like(z))
    assert (got - plain).abs().mean() < 0.5 * (unrelated - plain).abs().mean()

    x = torch.rand(1, 3, 20 * f + 3, 28 * f + 1) * 2 - 1  # not a multiple of f: the last tiles take the rest
    enc = ours.encode_tiled(x, tile=tile * f, overlap=overlap * f)
    assert enc.mean.shape == ours.encode(x).mean.shape and torch.isfinite(enc.mean).all()
    first = ours.encode(x[..., : 12 * f, : 12 * f])
    assert torch.equal(enc.mean[..., :8, :8], first.mean[..., :8, :8])
    with pytest.raises(ValueError):
        ours.encode_tiled(x, tile=tile * f + 1, overlap=overlap * f)
    with pytest.raises(ValueError):
        ours.decode_tiled(z, tile=8, overlap=8)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 0.02), (torch.bfloat16, 0.1)])
@torch.no_grad()
def test_half_precision_decode(dtype, tol):
    torch.manual_seed(0)
    ours = AutoencoderKL(TINY_VAE).eval()
    z = torch.randn(1, 4, 12, 12)
    want = ours.decode(z)
    half = AutoencoderKL(TINY_VAE).eval()
    half.load_state_dict(ours.state_dict())
    half.to(dtype)
    for got in (half.decode(z.to(dtype)), half.decode_tiled(z.to(dtype), tile=8, overlap=2)):
        assert got.dtype == dtype and torch.isfinite(got).all()
    assert (half.decode(z.to(dtype)).float() - want).abs().max() < tol
    post = half.encode(torch.rand(1, 3, 16, 16, dtype=dtype) * 2 - 1)
    assert torch.isfinite(post.sample(torch.Generator().manual_seed(0))).all()
