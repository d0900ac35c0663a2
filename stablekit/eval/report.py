"""A sweep's results as the model cards give them: a table per guidance scale and FID plotted against CLIP score."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

from stablekit.atomic import replacing_file
from stablekit.eval.score import ScaleResult

COLUMNS = ("guidance", "fid", "clip_score", "clip_score_std", "images")


class PlotUnavailable(ValueError):
    """matplotlib, which draws the plot, is not installed."""


def require_plotting() -> None:
    """Fail before any compute, not after an hour of sampling, when the plot cannot be drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotUnavailable(
            "the FID-vs-CLIP plot needs matplotlib: pip install 'stablekit[eval]' (or pass --no-plot)"
        ) from None


def write_tables(out: Path, results: Sequence[ScaleResult], about: Mapping[str, object]) -> list[Path]:
    """``results.csv`` (a row per scale) and ``results.json`` (the rows and what they were made with)."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in results:
        writer.writerow({k: _fmt(v) for k, v in asdict(r).items()})
    written = []
    for name, body in (
        ("results.csv", text.getvalue()),
        ("results.json", json.dumps({**about, "results": [asdict(r) for r in results]}, indent=2) + "\n"),
    ):
        with replacing_file(out / name) as tmp:
            tmp.write_text(body, encoding="utf-8")
        written.append(out / name)
    return written


def _fmt(value: object) -> object:
    return f"{value:.4f}" if isinstance(value, float) else value


def plot(path: Path, results: Sequence[ScaleResult], title: str) -> Path:
    """FID (down is better) against CLIP score (right is better), each point labelled with its guidance scale:
    the form of the SD model cards' evaluation plots."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    try:
        xs, ys = [r.clip_score for r in results], [r.fid for r in results]
        ax.plot(xs, ys, marker="o", linewidth=1.5)
        for r in results:
            ax.annotate(f"{r.guidance:g}", (r.clip_score, r.fid), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("CLIP score")
        ax.set_ylabel("FID")
        ax.set_title(title, fontsize=10)
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        with replacing_file(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return path
