"""LAION-style metadata filters, as the model cards describe the training subsets.

Each filter reads one metadata column (under any of the spellings LAION's parquet files and img2dataset use)
and drops the rows that fail it. A row lacking a column that an active filter needs is dropped too, and
counted separately, because silently keeping unscored images would undo the filter.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

COLUMNS: dict[str, tuple[str, ...]] = {
    "width": ("width", "WIDTH", "original_width"),
    "height": ("height", "HEIGHT", "original_height"),
    "aesthetic": ("aesthetic", "AESTHETIC_SCORE", "aesthetic_score"),
    "punsafe": ("punsafe", "PUNSAFE"),
    "watermark": ("pwatermark", "PWATERMARK", "watermark"),
}


def column(meta: Mapping[str, Any], name: str) -> float | None:
    for key in COLUMNS[name]:
        value = meta.get(key)
        if value is not None:
            try:
                return float(value)
            except (TypeError, ValueError):
                return None
    return None


@dataclass(frozen=True)
class Filters:
    min_size: int | None = None  # shorter side in pixels
    min_aesthetic: float | None = None  # e.g. 5.0 for the v1 "aesthetics" subsets
    max_punsafe: float | None = None  # e.g. 0.1 for SD 2's training data
    max_watermark: float | None = None  # e.g. 0.5

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.min_size, self.min_aesthetic, self.max_punsafe, self.max_watermark))

    def reason(self, meta: Mapping[str, Any]) -> str | None:
        """Why this row is dropped, or None to keep it."""
        if self.min_size is not None:
            w, h = column(meta, "width"), column(meta, "height")
            if w is None or h is None:
                return "missing width/height"
            if min(w, h) < self.min_size:
                return "min_size"
        for name, limit, keep in (
            ("aesthetic", self.min_aesthetic, lambda v, lim: v >= lim),
            ("punsafe", self.max_punsafe, lambda v, lim: v <= lim),
            ("watermark", self.max_watermark, lambda v, lim: v <= lim),
        ):
            if limit is None:
                continue
            value = column(meta, name)
            if value is None:
                return f"missing {name}"
            if not keep(value, limit):
                return {"aesthetic": "min_aesthetic", "punsafe": "max_punsafe", "watermark": "max_watermark"}[name]
        return None

    def apply(self, rows: Iterable[Mapping[str, Any]]) -> tuple[list[Mapping[str, Any]], Counter[str]]:
        """(kept rows, dropped count per reason)."""
        kept: list[Mapping[str, Any]] = []
        dropped: Counter[str] = Counter()
        for row in rows:
            why = self.reason(row)
            if why is None:
                kept.append(row)
            else:
                dropped[why] += 1
        return kept, dropped
