"""Engines: what runs the four networks a pipeline calls.

A :class:`~stablekit.pipelines.Pipeline` composes tokenizer, samplers, guidance, seeds and tiling itself and hands
an engine only the network calls: the text encoder, the UNet, the autoencoder's encoder (its posterior moments)
and decoder. So an image made with another engine is the same image up to that engine's arithmetic:

- ``torch``: our own modules, eager (:class:`TorchEngine`);
- ``openvino``: the same modules converted by OpenVINO, run by its CPU plugin at an explicit precision, the
  conversion cached on disk (:mod:`stablekit.engines.openvino`, the ``[openvino]`` extra).
"""

from __future__ import annotations

import os
from typing import Literal, Protocol, TypedDict

from torch import Tensor

EngineName = Literal["torch", "openvino"]
ENGINES: tuple[EngineName, ...] = ("torch", "openvino")
Precision = Literal["f32", "bf16"]
PRECISIONS: tuple[Precision, ...] = ("f32", "bf16")


class EngineUnavailable(RuntimeError):
    """The engine asked for cannot run here (its package is not installed); the message says how to fix it."""


class Engine(Protocol):
    """The network calls a pipeline makes. Inputs and outputs are tensors on the pipeline's device."""

    name: EngineName

    def text(self, ids: Tensor, skip: int) -> Tensor:
        """Token ids (B, T) int64 -> context (B, T, D), ``skip`` layers before the family's text output."""
        ...

    def unet(self, x: Tensor, t: Tensor, context: Tensor, y: Tensor | None) -> Tensor:
        """(N, C_in, h, w), (N,) timesteps, (N, T, D), class labels (N,) or None -> ε or v (N, C, h, w)."""
        ...

    def moments(self, pixels: Tensor) -> Tensor:
        """Pixels (B, 3, H, W) in [-1, 1] -> the posterior's stacked mean and log-variance (B, 2C, H/f, W/f)."""
        ...

    def decode(self, z: Tensor) -> Tensor:
        """Unscaled latents (B, C, h, w) -> pixels (B, 3, f·h, f·w)."""
        ...

    def decode_fp32(self, z: Tensor) -> Tensor:
        """:meth:`decode` in float32 arithmetic: the fallback when a half-precision decode overflows."""
        ...

    def describe(self) -> str:
        """One line for logs and ``info``: the engine, its version and settings."""
        ...


class EngineSettings(TypedDict):
    engine: EngineName
    precision: Precision


def settings_from_environment() -> EngineSettings:
    """``STABLEKIT_ENGINE`` and ``STABLEKIT_PRECISION``, for entry scripts that take no flags (the Azure ML ones);
    the cache folder comes from ``STABLEKIT_CACHE_DIR`` the same way. An unknown value is an error naming it."""
    engine = os.environ.get("STABLEKIT_ENGINE", "torch")
    precision = os.environ.get("STABLEKIT_PRECISION", "f32")
    if engine not in ENGINES:
        raise ValueError(f"STABLEKIT_ENGINE={engine!r}: choose one of {', '.join(ENGINES)}")
    if precision not in PRECISIONS:
        raise ValueError(f"STABLEKIT_PRECISION={precision!r}: choose one of {', '.join(PRECISIONS)}")
    return {"engine": engine, "precision": precision}  # type: ignore[typeddict-item]
