"""Running a function over overlapping tiles of a large input and cross-fading the results.

Used for the autoencoder at sizes whose activations do not fit (tiled encode and decode) and for the x4
upscaler's UNet over large images. Each tile sees only its own context, so tiles disagree a little where they
overlap; linear ramps across each overlap hide the seams. Memory is bounded by one tile's activations plus the
fp32 output canvas.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Tile offsets covering [0, size) with stride tile - overlap; the last tile ends flush with ``size``
    rather than being cut short, which would leave it less context than the others."""
    if size <= tile:
        return [0]
    return [*range(0, size - tile, tile - overlap), size - tile]


def blend_weights(size: int, tile: int, starts: list[int], scale: int) -> list[Tensor]:
    """Per-tile 1-D blend weights in output pixels: linear ramps across each overlap, normalised so the
    tiles covering any position sum to 1 (a single tile gets exactly 1 everywhere)."""
    n = min(size, tile) * scale
    pos = torch.arange(n, dtype=torch.float32) + 0.5
    ramps = []
    for i, s in enumerate(starts):
        left = (starts[i - 1] + tile - s) * scale if i > 0 else 0
        right = (s + tile - starts[i + 1]) * scale if i + 1 < len(starts) else 0
        w = torch.ones(n)
        if left:
            w = torch.minimum(w, pos / left)
        if right:
            w = torch.minimum(w, pos.flip(0) / right)
        ramps.append(w)
    total = torch.zeros(size * scale)
    for s, w in zip(starts, ramps, strict=True):
        total[s * scale : s * scale + n] += w
    return [w / total[s * scale : s * scale + n] for s, w in zip(starts, ramps, strict=True)]


def tiled(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    grid: Sequence[int],
    tile: int,
    overlap: int,
    *,
    in_scale: int,
    out_scale: int,
) -> Tensor:
    """Run ``fn`` over overlapping tiles of ``x`` and cross-fade the results.

    Tiles are laid out on a latent-resolution ``grid`` (h, w); tile (s, s+tile) reads input pixels
    [s·in_scale, (s+tile)·in_scale) and writes output pixels [s·out_scale, (s+tile)·out_scale). The last
    tile of each axis also reads the input's remainder (encoding an image whose side is not a multiple of
    f), so that ``fn`` still returns exactly ``tile`` latent rows there.
    """
    if not 0 <= overlap < tile:
        raise ValueError(f"tiling needs 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
    gh, gw = grid
    ys, xs = tile_starts(gh, tile, overlap), tile_starts(gw, tile, overlap)
    wys = [w.to(x.device) for w in blend_weights(gh, tile, ys, out_scale)]
    wxs = [w.to(x.device) for w in blend_weights(gw, tile, xs, out_scale)]
    out: Tensor | None = None
    for y, wy in zip(ys, wys, strict=True):
        y_end = x.shape[-2] if y == ys[-1] else (y + tile) * in_scale
        for x0, wx in zip(xs, wxs, strict=True):
            x_end = x.shape[-1] if x0 == xs[-1] else (x0 + tile) * in_scale
            part = fn(x[..., y * in_scale : y_end, x0 * in_scale : x_end]).float()  # (B, C, th, tw)
            if out is None:
                out = part.new_zeros(*part.shape[:2], gh * out_scale, gw * out_scale)
            th, tw = part.shape[-2:]
            out[..., y * out_scale : y * out_scale + th, x0 * out_scale : x0 * out_scale + tw] += (
                part * wy[:, None] * wx[None, :]
            )
    assert out is not None
    return out.to(x.dtype)
