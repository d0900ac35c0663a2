"""Merging LoRAs into a model's weights, and taking them out again exactly.

``W ← W + Σ weight · scale · up @ down`` is summed in float32 and cast back to W's dtype once, as A1111 and PEFT's
``fuse_lora`` merge. Subtracting the update again would not give W back in fp16 (nor exactly in fp32), so each
touched tensor is copied before the merge and copied back by :meth:`LoraMerge.unmerge`: bit for bit.

One merge at a time per model: a second merge over the first would make the first's copies stale, so it is refused;
merge several LoRAs by giving them together.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType

import torch
from torch import Tensor

from stablekit.models.ldm import LatentDiffusion
from stablekit.weights.lora import Lora, LoraError

# The merge a model currently holds, kept on the model itself (it is the model's state, not a setting).
_ACTIVE = "_stablekit_lora_merge"


class LoraMerge:
    """``(lora, weight)`` pairs to merge into ``model`` in place; also a context manager that merges on entry and
    unmerges on exit, whatever happens inside.

    >>> with LoraMerge(model, [(read_lora("style.safetensors", model), 0.8)]):
    ...     images = collect(txt2img(pipe, params))
    """

    def __init__(self, model: LatentDiffusion, loras: Sequence[tuple[Lora, float]]) -> None:
        self.model = model
        self.loras = list(loras)
        self._saved: dict[str, Tensor] = {}  # key -> the parameter as it was before the merge

    @property
    def merged(self) -> bool:
        return getattr(self.model, _ACTIVE, None) is self

    def merge(self) -> None:
        """Add every update to the model's weights; raises :class:`LoraError` (changing nothing) if the model holds a
        merge already or an update does not fit."""
        active = getattr(self.model, _ACTIVE, None)
        if active is not None:
            again = "this merge is" if active is self else "another LoRA merge is"
            raise LoraError(f"{again} already applied to the model: unmerge it first")
        params = dict(self.model.named_parameters())
        updates: dict[str, list[tuple[Lora, float, int]]] = {}
        for lora, weight in self.loras:
            for i, layer in enumerate(lora.layers):
                param = params.get(layer.target.key)
                if param is None or not layer.fits(param.shape):  # read for another model than this one
                    have = "which the model lacks" if param is None else f"of shape {tuple(param.shape)}"
                    raise LoraError(
                        f"{lora.name}: {layer.source} makes a {layer.shape} update of {layer.target.key}, {have}"
                    )
                updates.setdefault(layer.target.key, []).append((lora, weight, i))
        with torch.no_grad():
            try:
                for key, items in updates.items():
                    param = params[key]
                    self._saved[key] = param.detach().clone()
                    w = param.detach().to(torch.float32, copy=True)  # (out, in) or (out, in, kh, kw)
                    for lora, weight, i in items:
                        layer = lora.layers[i]
                        block = w if layer.target.rows is None else w[layer.target.rows[0] : layer.target.rows[1]]
                        block += weight * layer.delta(block.shape).to(block.device)
                    param.copy_(w)
            except BaseException:
                self._restore()
                raise
        setattr(self.model, _ACTIVE, self)

    def unmerge(self) -> None:
        """Put back every tensor the merge touched, exactly; nothing to do when not merged."""
        if not self.merged:
            return
        with torch.no_grad():
            self._restore()
        delattr(self.model, _ACTIVE)

    def _restore(self) -> None:
        params = dict(self.model.named_parameters())
        for key, original in self._saved.items():
            params[key].copy_(original)
        self._saved.clear()

    def __enter__(self) -> LoraMerge:
        self.merge()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.unmerge()
