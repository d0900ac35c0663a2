"""Generic, table-driven conversion between the original (CompVis/Stability) layout and other layouts.

A component's table (``stablekit/weights/tables/``) is data: a dict from *original* leaf-module path to the
*other* layout's module path, generated from the component's config. Parameter names (``weight``, ``bias``)
carry over unchanged. Two kinds of tensor change are handled here, once, for every table:

- ``splits``: one original tensor stored as several in the other layout, concatenated on dim 0
  (OpenCLIP's fused ``in_proj_weight`` vs. separate q/k/v projections);
- 1×1 conv <-> linear weights ([C_out, C_in, 1, 1] vs. [C_out, C_in]), reshaped to the target model's
  shape by :func:`fit_state_dict`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn


class WeightsError(ValueError):
    """A state dict does not fit a model: names the offending keys."""


def _split_key(key: str) -> tuple[str, str]:
    module, _, param = key.rpartition(".")
    return module, param


def to_original(
    state: Mapping[str, Tensor],
    table: Mapping[str, str],
    splits: Mapping[str, Sequence[str]] | None = None,
    *,
    ignore: Iterable[str] = (),
) -> dict[str, Tensor]:
    """Rename a state dict from the other layout (e.g. diffusers) to the original layout.

    ``table`` maps original module paths to other-layout module paths; ``splits`` maps an original tensor
    key to the other-layout tensor keys concatenated (dim 0) to form it. Keys in ``ignore`` are dropped.
    An unknown key raises :class:`WeightsError` naming it.
    """
    inverse = {other: orig for orig, other in table.items()}
    joined = {part: orig for orig, parts in (splits or {}).items() for part in parts}
    skip = set(ignore)
    out: dict[str, Tensor] = {}
    pending: dict[str, dict[str, Tensor]] = {}
    unknown: list[str] = []
    for key, tensor in state.items():
        if key in skip:
            continue
        if key in joined:
            pending.setdefault(joined[key], {})[key] = tensor
            continue
        module, param = _split_key(key)
        if module not in inverse:
            unknown.append(key)
            continue
        out[f"{inverse[module]}.{param}"] = tensor
    if unknown:
        raise WeightsError(f"{len(unknown)} unexpected tensor(s), e.g. {', '.join(sorted(unknown)[:5])}")
    for orig, parts in (splits or {}).items():
        got = pending.get(orig, {})
        if not got:
            continue
        missing = [p for p in parts if p not in got]
        if missing:
            raise WeightsError(f"cannot build {orig}: missing {', '.join(missing)}")
        out[orig] = torch.cat([got[p] for p in parts], dim=0)
    return out


def from_original(
    state: Mapping[str, Tensor],
    table: Mapping[str, str],
    splits: Mapping[str, Sequence[str]] | None = None,
    *,
    ignore: Iterable[str] = (),
) -> dict[str, Tensor]:
    """Rename an original-layout state dict to the other layout (the inverse of :func:`to_original`)."""
    splits = splits or {}
    skip = set(ignore)
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, tensor in state.items():
        if key in skip:
            continue
        if key in splits:
            for part, chunk in zip(splits[key], tensor.chunk(len(splits[key]), dim=0), strict=True):
                out[part] = chunk.clone()
            continue
        module, param = _split_key(key)
        if module not in table:
            unknown.append(key)
            continue
        out[f"{table[module]}.{param}"] = tensor
    if unknown:
        raise WeightsError(
            f"{len(unknown)} tensor(s) have no entry in the key table, e.g. {', '.join(sorted(unknown)[:5])}"
        )
    return out


def _linear_and_1x1_conv(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """(O, I) against (O, I, 1, 1), either way round: SD2's ``proj_in``/``proj_out`` are linear layers in some
    files and 1x1 convolutions in others. Equal sizes alone are not enough: a (7, 1) kernel is not a (1, 7) one."""
    short, long = sorted((a, b), key=len)
    return len(short) == 2 and len(long) == 4 and long[:2] == short and long[2:] == (1, 1)


def fit_state_dict(model: nn.Module, state: Mapping[str, Tensor], *, optional: Iterable[str] = ()) -> dict[str, Tensor]:
    """Check ``state`` against ``model`` key by key and shape by shape, and return it ready for
    ``load_state_dict(strict=True)``.

    Keys in ``optional`` may be absent from ``state`` (the model's own initial values stay) or present.
    A 1×1 conv weight is reshaped to a linear weight and back when the model wants the other form.
    Anything else that is missing, unexpected or mis-shaped raises :class:`WeightsError` naming the keys.
    """
    expected = model.state_dict()
    opt = set(optional)
    missing = [k for k in expected if k not in state and k not in opt]
    unexpected = [k for k in state if k not in expected]
    problems: list[str] = []
    if missing:
        problems.append(f"missing {len(missing)}: {', '.join(missing[:8])}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {', '.join(unexpected[:8])}")
    out: dict[str, Tensor] = {}
    for key, want in expected.items():
        if key not in state:
            out[key] = want
            continue
        got = state[key]
        if got.shape != want.shape:
            if _linear_and_1x1_conv(tuple(got.shape), tuple(want.shape)):
                got = got.reshape(want.shape)
            else:
                problems.append(f"{key}: file has {tuple(got.shape)}, model wants {tuple(want.shape)}")
                continue
        out[key] = got
    if problems:
        raise WeightsError("weights do not fit the model; " + "; ".join(problems))
    return out
