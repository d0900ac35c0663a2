"""A1111's extra-network tags in a prompt: ``<lora:name:weight>`` turns a LoRA on for the images of that prompt.

The tag is taken out of the text the text encoder sees (the PNG ``parameters`` keep the prompt as written);
``weight`` defaults to 1. Only ``lora`` tags are read (A1111's ``lyco``/``hypernet`` are other networks): any other
tag is an error naming it, rather than text the model would draw.
"""

from __future__ import annotations

import math
import re

_TAG = re.compile(r"<(\w+):([^<>]*)>")

LoraTag = tuple[str, float]  # (name, weight)


def split_lora_tags(prompt: str) -> tuple[str, tuple[LoraTag, ...]]:
    """(the prompt without its tags, the LoRA tags in order of appearance)."""
    tags: list[LoraTag] = []

    def take(m: re.Match[str]) -> str:
        kind, body = m.group(1), m.group(2)
        if kind != "lora":
            raise ValueError(f"extra network {m.group()!r}: only <lora:NAME> and <lora:NAME:WEIGHT> are supported")
        name, _, weight = body.partition(":")
        name = name.strip()
        if not name or "/" in name or "\\" in name or name in (".", ".."):
            raise ValueError(f"LoRA tag {m.group()!r}: a LoRA is named by its file name, without folders")
        try:
            value = float(weight) if weight.strip() else 1.0
        except ValueError:
            raise ValueError(f"LoRA tag {m.group()!r}: the weight must be a number") from None
        if not math.isfinite(value):
            raise ValueError(f"LoRA tag {m.group()!r}: the weight must be finite")
        tags.append((name, value))
        return ""

    text = _TAG.sub(take, prompt)
    return text, tuple(tags)
