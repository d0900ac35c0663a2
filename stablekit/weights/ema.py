"""Sampling with the EMA weights of a training checkpoint (``--ema``): which file key feeds each UNet weight.

The averaged weights are the ones that sample best (LDM's ``use_ema`` default), and pruned releases keep only
them; a non-pruned file keeps both. The swap is checked whole before anything is loaded: every UNet weight
needs its EMA copy, of the same shape, and no EMA key may be left over.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from stablekit.config import UNetConfig
from stablekit.models.ldm import DiffusionWrapper
from stablekit.weights.convert import WeightsError
from stablekit.weights.tables.ema import BOOKKEEPING, PREFIX, ema_table


def ema_count(keys: Mapping[str, object]) -> int:
    """How many EMA weights (``model_ema.*`` less LitEma's bookkeeping) a file holds."""
    return sum(k.startswith(PREFIX) and k not in BOOKKEEPING for k in keys)


def ema_sources(unet: UNetConfig, shapes: Mapping[str, tuple[int, ...]], path: str) -> dict[str, str]:
    """UNet weight key -> the file key of its EMA copy; :class:`WeightsError` unless the copy is whole."""
    found = {k for k in shapes if k.startswith(PREFIX) and k not in BOOKKEEPING}
    if not found:
        raise WeightsError(f"{path}: no EMA weights (model_ema.*) in the file: load it without --ema")
    with torch.device("meta"):  # only the parameter names: LitEma names its copies after them
        names = [n for n, _ in DiffusionWrapper(unet).named_parameters()]
    table = ema_table(names)
    missing = [(k, e) for k, e in table.items() if e not in shapes]
    if missing:
        k, e = missing[0]
        raise WeightsError(
            f"{path}: the EMA copy lacks {len(missing)} of the UNet's {len(table)} weights, e.g. {e} (for {k})"
        )
    extra = sorted(found - set(table.values()))
    if extra:
        raise WeightsError(f"{path}: {len(extra)} EMA key(s) match no UNet weight, e.g. {', '.join(extra[:3])}")
    for key, ema in table.items():
        if key in shapes and shapes[ema] != shapes[key]:
            raise WeightsError(f"{path}: EMA weight {ema} has shape {shapes[ema]}, but {key} has {shapes[key]}")
    return table
