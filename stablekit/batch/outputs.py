"""A job's records: per-process manifests appended as images land, and the merged manifest and
``predictions.csv`` rebuilt from them, atomically, in input order.

A row is done when its PNG exists and a manifest line records it with the settings it has now. The PNG is
written (atomically) before its line, so a crash between the two only costs that row a rerun. A line cut by a
crash fails to parse and is ignored; the next append starts on a fresh line.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import IO, Any

from stablekit.atomic import replacing_file
from stablekit.batch.plan import Item

MANIFEST = "manifest.jsonl"
PREDICTIONS = "predictions.csv"
PREDICTION_COLUMNS = ("row_number_per_file", "prompt", "generated_image", "nsfw_content_detected", "input_csv_name")


def rank_manifest(out: Path, rank: int) -> Path:
    return out / f"manifest-rank{rank}.jsonl"


def record(item: Item, error: str | None = None, *, nsfw: bool | None = None) -> dict[str, Any]:
    """The manifest line of one row: where it came from, every setting and the seed, its image or its error,
    and the safety checker's verdict (None when no checker ran)."""
    error = error if error is not None else item.error
    return {
        "row": item.index,
        "input_csv_name": item.row.file,
        "row_number_per_file": item.row.number,
        "prompt": item.row.prompt,
        "seed": item.seed,
        **item.settings,
        "generated_image": None if error is not None else item.image,
        "nsfw_content_detected": nsfw,
        "error": error,
    }


def load_records(out: Path) -> tuple[dict[int, dict[str, Any]], dict[int, str]]:
    """The last successful line per row over every process's manifest (a resumed job may run on another number
    of processes than the job it resumes), and the last error of each row that has one."""
    found: dict[int, dict[str, Any]] = {}
    errors: dict[int, str] = {}
    for path in sorted(out.glob("manifest-rank*.jsonl")):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # the line a crash cut short
            if not isinstance(rec, dict) or not isinstance(rec.get("row"), int):
                continue
            if rec.get("error") is None:
                found[rec["row"]] = rec
            else:
                errors[rec["row"]] = str(rec["error"])
    return found, errors


def is_done(item: Item, records: dict[int, dict[str, Any]], out: Path) -> bool:
    rec = records.get(item.index)
    if rec is None or not (out / item.image).is_file():
        return False
    # The verdict is an output, not a setting: a row is done whatever the checker said of it.
    return {**rec, "nsfw_content_detected": None} == record(item)


class Appender:
    """Appends lines to one process's manifest, each flushed to disk before the next image is computed."""

    def __init__(self, path: Path) -> None:
        self._f: IO[str] = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - closed by close()
        self._f.seek(0, os.SEEK_END)
        if self._f.tell() > 0:
            self._f.seek(self._f.tell() - 1)
            if self._f.read(1) != "\n":
                self._f.write("\n")  # end the line a crash cut short

    def append(self, rec: dict[str, Any]) -> None:
        self._f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


def finish(out: Path, items: list[Item]) -> tuple[int, int]:
    """Write ``manifest.jsonl`` (every row) and ``predictions.csv`` (every generated row), in input order, from
    the per-process manifests. Returns the counts of rows done and failed."""
    records, errors = load_records(out)
    lines, predictions = [], []
    for item in items:
        if is_done(item, records, out):
            rec = records[item.index]
            # Without a safety checker nsfw_content_detected is left empty (null), as Azure's deployment leaves it.
            nsfw = rec.get("nsfw_content_detected")
            flag = "" if nsfw is None else str(bool(nsfw))
            predictions.append((item.row.number, item.row.prompt, item.image, flag, item.row.file))
        else:
            rec = record(item, item.error or errors.get(item.index) or "not generated")
        lines.append(json.dumps(rec, ensure_ascii=False))
    with replacing_file(out / MANIFEST) as tmp:
        tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    with replacing_file(out / PREDICTIONS) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(PREDICTION_COLUMNS)
        writer.writerows(predictions)
    return len(predictions), len(items) - len(predictions)
