"""Classifier-free guidance: batching as diffusers batches it, and guidance-rescale against diffusers'
``rescale_noise_cfg``."""

from __future__ import annotations

import pytest
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from torch import Tensor

from stablekit.diffusion import guided

B, D = 2, 8


class Recorder:
    """A context-dependent closed-form model that remembers each call's batch."""

    def __init__(self) -> None:
        self.calls: list[tuple[Tensor, Tensor, Tensor]] = []

    def __call__(self, x: Tensor, t: Tensor, context: Tensor) -> Tensor:
        self.calls.append((x, t, context))
        return torch.sin(x) * context.mean(dim=(1, 2)).reshape(-1, 1, 1, 1) + 0.01 * t.reshape(-1, 1, 1, 1)


def _inputs() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 4, 8, 8, generator=g)
    t = torch.tensor([500.0, 500.0])
    return x, t, torch.randn(B, 77, D, generator=g), torch.randn(B, 77, D, generator=g)


def test_guidance_runs_one_batch_uncond_first() -> None:
    x, t, cond, uncond = _inputs()
    rec = Recorder()
    out = guided(rec, cond, uncond, 7.5)(x, t)
    assert len(rec.calls) == 1
    xs, ts, ctx = rec.calls[0]
    assert xs.shape[0] == 2 * B and torch.equal(ctx[:B], uncond) and torch.equal(ctx[B:], cond)
    assert torch.equal(ts, torch.cat([t, t]))
    ref = Recorder()
    u, c = ref(x, t, uncond), ref(x, t, cond)
    torch.testing.assert_close(out, u + 7.5 * (c - u), rtol=0, atol=1e-6)


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_no_guidance_runs_cond_only(scale: float) -> None:
    x, t, cond, _ = _inputs()
    rec = Recorder()
    out = guided(rec, cond, None, scale)(x, t)
    assert len(rec.calls) == 1 and rec.calls[0][0].shape[0] == B
    assert torch.equal(out, Recorder()(x, t, cond))


@pytest.mark.parametrize("rescale", [0.0, 0.3, 0.7, 1.0])
def test_guidance_rescale_matches_diffusers(rescale: float) -> None:
    x, t, cond, uncond = _inputs()
    ref = Recorder()
    u, c = ref(x, t, uncond), ref(x, t, cond)
    expected = u + 9.0 * (c - u)
    if rescale > 0:  # as the SD pipeline: rescale only when asked
        expected = rescale_noise_cfg(expected, c, guidance_rescale=rescale)
    got = guided(Recorder(), cond, uncond, 9.0, rescale=rescale)(x, t)
    assert (got - expected).abs().max().item() < 1e-6
    if rescale == 1.0:  # fully rescaled: per-sample std equals the conditional one
        torch.testing.assert_close(got.std(dim=(1, 2, 3)), c.std(dim=(1, 2, 3)))


def test_guidance_needs_uncond() -> None:
    _, _, cond, _ = _inputs()
    with pytest.raises(ValueError, match="unconditional"):
        guided(Recorder(), cond, None, 7.5)
