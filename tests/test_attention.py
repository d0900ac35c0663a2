"""Every attention backend against the fp32 ``math`` reference, and against a softmax written out here."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import stablekit.nn.attention as attn_module
from stablekit.config import UNetConfig
from stablekit.models.unet import UNetModel
from stablekit.nn.attention import (
    BACKENDS,
    attention,
    attention_backend,
    get_backend,
    merge_heads,
    split_heads,
)
from tests.tiny import TINY_SD2, TINY_X4


@pytest.fixture(autouse=True)
def _keep_backend() -> Iterator[None]:
    # A failing test must not leave another backend switched on for the rest of the suite.
    with attention_backend(get_backend()):
        yield


# (backend, slice_size): slice sizes below, equal to, not dividing and above the query length 37.
CASES = [("sdpa", None), ("math", None), ("sliced", 1), ("sliced", 7), ("sliced", 37), ("sliced", 64)]


def _qkv(tq: int, tk: int, d: int = 16, scale: float = 1.0) -> tuple[torch.Tensor, ...]:
    return (torch.randn(2, 3, tq, d) * scale, torch.randn(2, 3, tk, d) * scale, torch.randn(2, 3, tk, d))


def _explicit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """softmax(q kᵀ / √d) v in float64, the causal mask as the text encoders need it (Tq == Tk)."""
    q, k, v = q.double(), k.double(), v.double()
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if causal:
        t = scores.shape[-1]
        scores = scores + torch.full((t, t), float("-inf"), dtype=scores.dtype).triu(1)
    return scores.softmax(-1) @ v


def _run(
    backend: str, slice_size: int | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False
) -> torch.Tensor:
    with attention_backend(backend, slice_size=slice_size):  # type: ignore[arg-type]
        return attention(q, k, v, causal=causal)


@pytest.mark.parametrize("backend, slice_size", CASES)
@pytest.mark.parametrize("tq, tk, causal", [(37, 37, False), (37, 23, False), (5, 80, False), (37, 37, True)])
def test_fp32_matches_reference(backend: str, slice_size: int | None, tq: int, tk: int, causal: bool) -> None:
    q, k, v = _qkv(tq, tk)
    got = _run(backend, slice_size, q, k, v, causal)
    assert got.shape == (2, 3, tq, 16) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _explicit(q, k, v, causal), atol=1e-5, rtol=0)


def test_causal_mask_blocks_the_future() -> None:
    q, k, v = _qkv(9, 9)
    for backend, slice_size in CASES:
        base = _run(backend, slice_size, q, k, v, causal=True)
        v2 = v.clone()
        v2[..., 4:, :] += 100.0  # only positions >= 4 see keys 4..8
        changed = _run(backend, slice_size, q, k, v2, causal=True)
        torch.testing.assert_close(changed[..., :4, :], base[..., :4, :], atol=0, rtol=0)
        assert (changed[..., 4:, :] - base[..., 4:, :]).abs().min() > 1e-3


@pytest.mark.parametrize("backend, slice_size", CASES)
@pytest.mark.parametrize("dtype, atol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_half_precision_close_to_fp32_math(
    backend: str, slice_size: int | None, dtype: torch.dtype, atol: float
) -> None:
    q, k, v = (t.to(dtype) for t in _qkv(37, 23))
    got = _run(backend, slice_size, q, k, v)
    assert got.dtype == dtype and torch.isfinite(got).all()
    want = _run("math", None, q.float(), k.float(), v.float())
    torch.testing.assert_close(got.float(), want, atol=atol, rtol=0)


@pytest.mark.parametrize("backend, slice_size", CASES)
def test_fp16_large_scores_do_not_overflow(backend: str, slice_size: int | None) -> None:
    q, k, v = (t.half() for t in _qkv(37, 23, d=64, scale=150.0))
    # q·kᵀ reaches ~1e6, far beyond fp16's 65504: scores or a softmax kept in fp16 would be inf/NaN.
    assert torch.isinf(q @ k.transpose(-1, -2)).any()
    got = _run(backend, slice_size, q, k, v)
    assert torch.isfinite(got).all()
    want = _run("math", None, q.float(), k.float(), v.float())
    # Near one-hot rows copy v entries of a few units, where one fp16 ulp is ~2e-3: rtol covers that.
    torch.testing.assert_close(got.float(), want, atol=1e-3, rtol=2e-3)


def test_backend_context_restores_state() -> None:
    assert get_backend() == "sdpa"
    with attention_backend("sliced", slice_size=3):
        assert get_backend() == "sliced"
        with attention_backend("math"):
            assert get_backend() == "math"
        assert get_backend() == "sliced"
    assert get_backend() == "sdpa"
    with pytest.raises(RuntimeError), attention_backend("math"):
        raise RuntimeError("inside")
    assert get_backend() == "sdpa"


def test_sliced_uses_the_slice_size_in_force(monkeypatch: pytest.MonkeyPatch) -> None:
    q, k, v = _qkv(37, 23)
    rows: list[int] = []
    kernel = attn_module._math

    def recording(q: torch.Tensor, *args: Any) -> torch.Tensor:
        rows.append(q.shape[-2])
        return kernel(q, *args)

    monkeypatch.setattr(attn_module, "_math", recording)
    with attention_backend("sliced", slice_size=10):
        with attention_backend("sliced", slice_size=4):
            attention(q, k, v)
        assert rows == [4] * 9 + [1]
        rows.clear()
        attention(q, k, v)  # the outer slice size is back
        assert rows == [10, 10, 10, 7]


def test_unknown_backend_and_bad_slice_raise() -> None:
    with pytest.raises(ValueError), attention_backend("xformers-please"):  # type: ignore[arg-type]
        pass
    with pytest.raises(ValueError), attention_backend("sliced", slice_size=0):
        pass
    assert get_backend() == "sdpa"


def test_backend_is_per_thread() -> None:
    # A server runs pipelines with different settings in worker threads: one thread's setting stays its own.
    seen: list[str] = []
    entered, release = threading.Event(), threading.Event()

    def other() -> None:
        with attention_backend("math"):
            entered.set()
            release.wait(5)
            seen.append(get_backend())

    worker = threading.Thread(target=other)
    worker.start()
    entered.wait(5)
    seen.append(get_backend())  # while the other thread holds "math"
    release.set()
    worker.join()
    assert seen == ["sdpa", "math"]


def test_split_and_merge_heads_are_inverse() -> None:
    x = torch.randn(2, 11, 24)
    h = split_heads(x, 3)
    assert h.shape == (2, 3, 11, 8)
    torch.testing.assert_close(h[:, 1], x[..., 8:16], atol=0, rtol=0)
    torch.testing.assert_close(merge_heads(h), x, atol=0, rtol=0)


@pytest.mark.parametrize("cfg", [TINY_SD2.unet, TINY_X4.unet], ids=["sd2", "x4"])
@torch.no_grad()
def test_unet_same_output_under_every_backend(cfg: UNetConfig) -> None:
    model = UNetModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # proj_out etc. must not be silent
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, model.cfg.in_channels, 16, 12)
    t, ctx = torch.tensor([3.0, 800.0]), torch.randn(2, 7, model.cfg.context_dim)
    y = torch.tensor([20, 100]) if model.cfg.num_classes else None
    with attention_backend("math"):
        want = model(x, t, ctx, y)
    assert set(BACKENDS) == {"sdpa", "math", "sliced"}
    # 16×12 latents give 192 tokens at level 0: slices of 50 leave a remainder, 256 covers all at once.
    for backend, slice_size in [("sdpa", None), ("sliced", 50), ("sliced", 256)]:
        with attention_backend(backend, slice_size=slice_size):  # type: ignore[arg-type]
            torch.testing.assert_close(model(x, t, ctx, y), want, atol=1e-5, rtol=0)
