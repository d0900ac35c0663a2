"""The EMA copy of the UNet in an original training checkpoint: original key <-> ``model_ema.`` key.

CompVis/Stability training files (``sd-v1-4-full-ema.ckpt``, ``v1-5-pruned.ckpt``) carry ``LitEma``
(``ldm/modules/ema.py``) of ``LatentDiffusion.model``: one buffer per trainable parameter, named by the
parameter's path under ``model`` with its dots removed (``model.diffusion_model.input_blocks.0.0.weight`` ->
``model_ema.diffusion_modelinput_blocks00weight``; diffusers' ``convert_ldm_unet_checkpoint(extract_ema=True)``
reads the same names), plus two bookkeeping buffers.
"""

from __future__ import annotations

from collections.abc import Iterable

PREFIX = "model_ema."
# LitEma's own buffers: the decay and the update count, not weights.
BOOKKEEPING = ("model_ema.decay", "model_ema.num_updates")


def ema_table(names: Iterable[str]) -> dict[str, str]:
    """Original key -> EMA key, for parameter ``names`` relative to ``model.`` (``diffusion_model.…``).

    Removing dots is not one-to-one in general; LitEma itself could not have registered two parameters under
    one name, so a collision means these are not the names it saw, and is a ``ValueError``.
    """
    table: dict[str, str] = {}
    owner: dict[str, str] = {}
    for name in names:
        ema = PREFIX + name.replace(".", "")
        if ema in owner:
            raise ValueError(f"parameters {owner[ema]} and {name} share the EMA name {ema}")
        owner[ema] = name
        table[f"model.{name}"] = ema
    return table
