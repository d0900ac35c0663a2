"""The safety checker: released keys <-> what transformers 5 writes.

The released ``safety_checker/`` files (and diffusers' class under transformers 4) nest a ``CLIPVisionModel``
whose own ``vision_model`` is the ViT, so the tower's keys start ``vision_model.vision_model.``; that is
:mod:`stablekit.models.safety`'s layout. transformers 5 flattened ``CLIPVisionModel``, so diffusers'
``save_pretrained`` there writes the same tensors one ``vision_model.`` shorter. Only the prefix differs.
"""

from __future__ import annotations

# layout name -> (that layout's prefix, ours); the first prefix that matches is taken.
PREFIXES: dict[str, tuple[str, str]] = {
    "released": ("vision_model.vision_model.", "vision_model.vision_model."),
    "transformers5": ("vision_model.", "vision_model.vision_model."),
}
