"""The LAION-style data filters of the Stable Diffusion model cards, read from metadata columns.

The cards train on subsets chosen by original resolution (">= 512x512"), LAION's aesthetic predictor
("aesthetics score > 5.0", ">= 4.5"), its NSFW detector ("punsafe=0.1") and its watermark detector
("estimated watermark probability < 0.5"). So a minimum keeps values at or above it, and a maximum on a
probability keeps values strictly below it: ``max_watermark=0.5`` is the card's "< 0.5".

Column names are the ones LAION's parquet files and img2dataset's per-sample JSON ship; the first present wins.
A row without a column an active filter needs is dropped and counted under ``"<filter>_missing"``, because
keeping it would let unscored images through the filter meant to screen them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any, TypeVar

# img2dataset stores the resized size as width/height and the source's as original_*: the cards filter on the latter.
WIDTH_COLUMNS = ("original_width", "WIDTH", "width")
HEIGHT_COLUMNS = ("original_height", "HEIGHT", "height")
AESTHETIC_COLUMNS = ("aesthetic", "AESTHETIC_SCORE", "aesthetic_score")
PUNSAFE_COLUMNS = ("punsafe",)
WATERMARK_COLUMNS = ("pwatermark",)

Row = TypeVar("Row", bound=Mapping[str, Any])


def _number(row: Mapping[str, Any], names: tuple[str, ...]) -> float | None:
    """The first of ``names`` present with a finite numeric value, else None (absent, null, NaN or not a number)."""
    for name in names:
        value = row.get(name)
        if value is None or isinstance(value, bool):
            continue
        try:
            x = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(x):
            return x
    return None


@dataclass(frozen=True)
class Filters:
    """Which rows to keep; a ``None`` field is a filter that is off."""

    min_size: int | None = None  # both original sides at least this many pixels
    min_aesthetic: float | None = None
    max_punsafe: float | None = None
    max_watermark: float | None = None

    def active(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def reject(self, row: Mapping[str, Any]) -> str | None:
        """Why ``row`` is dropped (a key of the counts), or None to keep it. Filters are tried in field order,
        so a row failing several is counted once, under the first."""
        if self.min_size is not None:
            w, h = _number(row, WIDTH_COLUMNS), _number(row, HEIGHT_COLUMNS)
            if w is None or h is None:
                return "min_size_missing"
            if min(w, h) < self.min_size:
                return "min_size"
        if self.min_aesthetic is not None:
            a = _number(row, AESTHETIC_COLUMNS)
            if a is None:
                return "min_aesthetic_missing"
            if a < self.min_aesthetic:
                return "min_aesthetic"
        for name, limit, columns in (
            ("max_punsafe", self.max_punsafe, PUNSAFE_COLUMNS),
            ("max_watermark", self.max_watermark, WATERMARK_COLUMNS),
        ):
            if limit is None:
                continue
            p = _number(row, columns)
            if p is None:
                return f"{name}_missing"
            if p >= limit:
                return name
        return None

    def empty_counts(self) -> dict[str, int]:
        """Every count ``reject`` can produce, at zero, so a report lists the filters that dropped nothing."""
        return {key: 0 for name in self.active() for key in (name, f"{name}_missing")}

    def apply(self, rows: Iterable[Row]) -> tuple[list[Row], dict[str, int]]:
        """The rows kept, in order, and how many each filter dropped."""
        kept: list[Row] = []
        counts = self.empty_counts()
        for row in rows:
            reason = self.reject(row)
            if reason is None:
                kept.append(row)
            else:
                counts[reason] += 1
        return kept, counts
