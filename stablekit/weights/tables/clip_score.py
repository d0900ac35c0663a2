"""A transformers ``CLIPModel`` (``openai/clip-vit-large-patch14`` and its kin) <-> :class:`CLIPPair`'s keys.

transformers keeps each tower's transformer at the top level (``text_model.``, ``vision_model.``); ours wraps them
as SD1's text encoder and the safety checker's ``CLIPVisionModel`` do. The projections and ``logit_scale`` keep
their names. Files written before transformers 4.31 also hold each tower's ``position_ids`` buffer (an arange),
which is dropped.
"""

from __future__ import annotations

# transformers prefix -> ours; every key of a CLIPModel file starts with one of them.
PREFIXES: dict[str, str] = {
    "text_model.": "text.transformer.text_model.",
    "vision_model.": "vision_model.vision_model.",
    "text_projection.": "text_projection.",
    "visual_projection.": "visual_projection.",
    "logit_scale": "logit_scale",
}
DROPPED: tuple[str, ...] = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")
