"""The one attention call site, with a small backend switch.

Every model (UNet transformers, the VAE mid-block, the text encoders) calls :func:`attention`. Backends:

- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (fused kernels where the device has them).
  In half precision on CPU it is run in fp32, because CPU SDPA kernels accumulate the softmax in the input
  dtype and fp16 scores overflow (the black-image failure).
- ``math``: the reference, q·kᵀ and softmax always in fp32, then cast back.
- ``sliced``: the math kernel over chunks of queries, so peak memory is ``slice_size × T_k`` scores per
  head instead of ``T_q × T_k``.

Backends are tested against ``math`` in ``tests/test_attention.py``.

The backend is a setting of whoever runs the model (a :class:`~stablekit.pipelines.Pipeline` holds one), put in
force for a call with :func:`attention_backend`. It lives in a context variable, not a module global, so two
pipelines with different settings can run in two threads (a server's workers) without seeing each other's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Backend = Literal["sdpa", "math", "sliced"]
BACKENDS: tuple[Backend, ...] = ("sdpa", "math", "sliced")


@dataclass(frozen=True)
class _Settings:
    backend: Backend = "sdpa"
    slice_size: int = 1024


_settings: ContextVar[_Settings] = ContextVar("stablekit_attention", default=_Settings())  # noqa: B039 (frozen)


def _checked(backend: Backend, slice_size: int | None) -> _Settings:
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if slice_size is not None and slice_size < 1:
        raise ValueError(f"attention slice_size must be >= 1, got {slice_size}")
    return _Settings(backend, slice_size if slice_size is not None else _settings.get().slice_size)


def get_backend() -> Backend:
    return _settings.get().backend


@contextlib.contextmanager
def attention_backend(backend: Backend, *, slice_size: int | None = None) -> Iterator[None]:
    """Run the enclosed model calls with ``backend`` (in this thread or task only)."""
    token = _settings.set(_checked(backend, slice_size))
    try:
        yield
    finally:
        _settings.reset(token)


def _math(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Tensor:
    scale = q.shape[-1] ** -0.5
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (B, H, Tq, Tk)
    if causal:
        tq, tk = scores.shape[-2:]
        future = torch.ones(tq, tk, dtype=torch.bool, device=q.device).triu(tk - tq + 1)
        scores = scores.masked_fill(future, float("-inf"))
    return torch.matmul(scores.softmax(dim=-1), v.float()).to(q.dtype)


def _sliced(q: Tensor, k: Tensor, v: Tensor, causal: bool, slice_size: int) -> Tensor:
    if causal:
        # Causal attention only appears in the 77-token text encoders, far below any slice size.
        return _math(q, k, v, causal)
    out = torch.empty_like(q)
    for start in range(0, q.shape[-2], slice_size):
        out[..., start : start + slice_size, :] = _math(q[..., start : start + slice_size, :], k, v, False)
    return out


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False) -> Tensor:
    """Scaled dot-product attention with scale ``head_dim ** -0.5``.

    q: (B, H, T_q, D); k, v: (B, H, T_k, D) -> (B, H, T_q, D).
    """
    if causal and q.shape[-2] != k.shape[-2]:
        # SDPA aligns a rectangular causal mask to the first key, the math kernel to the last: refuse
        # rather than let the backends disagree (SD only needs square causal masks, in the text encoders).
        raise ValueError(f"causal attention needs T_q == T_k, got {q.shape[-2]} and {k.shape[-2]}")
    settings = _settings.get()
    if settings.backend == "math":
        return _math(q, k, v, causal)
    if settings.backend == "sliced":
        return _sliced(q, k, v, causal, settings.slice_size)
    if q.device.type == "cpu" and q.dtype in (torch.float16, torch.bfloat16):
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def split_heads(x: Tensor, heads: int) -> Tensor:
    """(B, T, H·D) -> (B, H, T, D)"""
    b, t, _ = x.shape
    return x.view(b, t, heads, -1).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """(B, H, T, D) -> (B, T, H·D)"""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)
