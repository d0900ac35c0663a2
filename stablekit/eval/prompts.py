"""The prompts of an evaluation: a text file (one per line), COCO's captions JSON, or the demo's caption space.

The model cards sample their prompts at random from COCO 2017's validation captions; a sweep here does the same
with a seeded ``random.Random``, so the same ``--n`` and ``--seed`` always give the same prompts in the same order.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from stablekit.train.demo_data import HELD_OUT_SEED, held_out_prompts

DEMO = "demo"
MAX_PROMPT_FILE = 256 * 2**20  # COCO 2017's training captions are 90 MB; a file far above that is a mistake


class PromptsError(ValueError):
    """The prompts file cannot be used; the message names the file and the reason."""


def read_prompts(source: str | Path, n: int, seed: int) -> list[str]:
    """``n`` prompts from ``source`` (every one when it holds ``n`` or fewer), a seeded random sample otherwise."""
    if n < 1:
        raise PromptsError(f"--n must be at least 1, got {n}")
    if str(source) == DEMO:
        # The demo caption space is unbounded: a held-out stream no training run draws from (seed 0 is the
        # stream the adherence benchmark uses).
        return [caption for caption, _ in held_out_prompts(n, seed=HELD_OUT_SEED + seed)]
    captions = _read_captions(Path(source))
    if len(captions) <= n:
        return captions
    return random.Random(seed).sample(captions, n)


def _read_captions(path: Path) -> list[str]:
    if not path.exists():
        raise PromptsError(f"prompts file {path} does not exist")
    if not path.is_file():
        raise PromptsError(f"prompts file {path} is not a regular file")
    size = path.stat().st_size
    if size > MAX_PROMPT_FILE:
        raise PromptsError(f"prompts file {path} is {size / 2**20:.0f} MiB; the limit is {MAX_PROMPT_FILE >> 20} MiB")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PromptsError(f"prompts file {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise PromptsError(f"cannot read prompts file {path}: {e.strerror or e}") from None
    captions = _coco_captions(path, text) if path.suffix.lower() == ".json" else _lines(text)
    if not captions:
        raise PromptsError(f"prompts file {path} holds no prompts")
    return captions


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def _coco_captions(path: Path, text: str) -> list[str]:
    """The ``captions`` of a ``captions_val2017.json``-form file, in its order (annotation id order)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise PromptsError(f"prompts file {path} is not valid JSON: {e.msg} (line {e.lineno})") from None
    annotations = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(annotations, list):
        raise PromptsError(f"prompts file {path} is not a COCO captions file: no 'annotations' list")
    captions = []
    for i, item in enumerate(annotations):
        caption = item.get("caption") if isinstance(item, dict) else None
        if not isinstance(caption, str):
            raise PromptsError(f"prompts file {path}: annotation {i} has no 'caption' text")
        # COCO's captions carry stray newlines and trailing spaces.
        if caption.strip():
            captions.append(" ".join(caption.split()))
    return captions
