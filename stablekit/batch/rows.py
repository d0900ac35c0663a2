"""Reading a batch job's input: a CSV, JSONL or parquet file, or a folder of CSV files, into typed rows.

Nothing here trusts a file: only regular files are opened (a named pipe or device in the folder is an error
naming it, never a hang), text must be UTF-8, and a value that does not parse fails its own row, not the job.
A problem with a whole file (no ``prompt`` column, a broken CSV) is a one-line :class:`InputError`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

COLUMNS = ("prompt", "negative_prompt", "seed", "steps", "guidance_scale", "width", "height", "sampler")
_INTS = ("seed", "steps", "width", "height")
SUFFIXES = (".csv", ".jsonl", ".parquet")
MAX_FILE_BYTES = 1 << 30  # an input file is read whole; a bigger one is surely a mistake


class InputError(ValueError):
    """An input file that cannot be read as a batch: one line naming the file."""


@dataclass(frozen=True)
class Row:
    """One input row: where it came from and its settings, or why they are unusable (``error``)."""

    file: str  # the input file's name (Azure's input_csv_name)
    number: int  # 0-based row number within its file (Azure's row_number_per_file)
    prompt: str
    settings: dict[str, Any]  # the optional columns present in the row, parsed
    error: str | None = None


def _read_regular(path: Path) -> bytes:
    """The bytes of ``path`` if it is a regular file: the type is checked on the descriptor, which is opened
    non-blocking, so a FIFO swapped in cannot block."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except ValueError as e:  # a NUL byte in the path
        raise InputError(f"{path}: invalid path ({e})") from e
    except OSError as e:
        raise InputError(f"{path}: {e.strerror or e}") from e
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"{path}: not a regular file")
        if st.st_size > MAX_FILE_BYTES:
            raise InputError(f"{path}: {st.st_size:,} bytes is over the limit of {MAX_FILE_BYTES:,} for one input")
        return f.read()


def _text(data: bytes, path: Path) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte {e.start})") from e


def _int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if isinstance(value, float) and value.is_integer():
        return int(value)  # parquet and pandas store integer columns with gaps as floats
    if isinstance(value, str):
        text = value.strip()
        # int() of thousands of digits is slow and then refused by Python anyway; no setting needs them.
        if len(text) > 20 or not text.lstrip("+-").isdigit():
            raise ValueError(f"{name} must be an integer, got {value[:40]!r}")
        return int(text)
    if isinstance(value, int):
        return value
    raise ValueError(f"{name} must be an integer, got {value!r}")


def _float(name: str, value: Any) -> float:
    try:
        number = float(value.strip()[:40]) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {str(value)[:40]!r}") from None
    if isinstance(value, bool) or not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {str(value)[:40]!r}")
    return number


def _missing(value: Any) -> bool:
    # An empty CSV cell, a JSON null and a parquet null all mean "the default".
    return value is None or (isinstance(value, str) and not value.strip())


def parse_row(file: str, number: int, raw: dict[str, Any]) -> Row:
    """A row's settings parsed; a bad value becomes the row's ``error``."""
    value = raw.get("prompt")
    prompt = "" if value is None else value if isinstance(value, str) else str(value)[:200]
    settings: dict[str, Any] = {}
    try:
        if not isinstance(value, str | None):
            raise ValueError(f"prompt must be text, got {type(value).__name__}")
        if not prompt.strip():
            raise ValueError("empty prompt")
        for name in COLUMNS[1:]:
            value = raw.get(name)
            if _missing(value):
                continue
            if name in _INTS:
                settings[name] = _int(name, value)
            elif name == "guidance_scale":
                settings[name] = _float(name, value)
            elif isinstance(value, str):
                settings[name] = value.strip() if name == "sampler" else value
            else:
                raise ValueError(f"{name} must be text, got {value!r}")
    except ValueError as e:
        return Row(file, number, prompt, {}, str(e))
    return Row(file, number, prompt, settings)


def _require_prompt(columns: list[str], path: Path) -> None:
    if "prompt" not in columns:
        shown = ", ".join(repr(c) for c in columns[:8]) or "none"
        raise InputError(f"{path}: no 'prompt' column (columns: {shown})")


def _csv_rows(path: Path) -> list[dict[str, Any]]:
    try:
        reader = csv.DictReader(io.StringIO(_text(_read_regular(path), path), newline=""))
        _require_prompt(list(reader.fieldnames or []), path)
        return [dict(r) for r in reader]
    except csv.Error as e:
        raise InputError(f"{path}: not a readable CSV file ({e})") from e


def _jsonl_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    for i, line in enumerate(_text(_read_regular(path), path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as e:  # ValueError: a number of thousands of digits, too
            raise InputError(f"{path}: line {i} is not JSON ({e})") from e
        if not isinstance(row, dict):
            raise InputError(f"{path}: line {i} is not a JSON object")
        rows.append(row)
    if not rows:
        raise InputError(f"{path}: no rows")
    _require_prompt(list({k for r in rows for k in r}), path)
    return rows


def _parquet_rows(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise InputError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from e

    try:
        table = pq.read_table(pa.BufferReader(_read_regular(path)))
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{path}: not a readable parquet file ({str(e).splitlines()[0]})") from e
    _require_prompt(table.column_names, path)
    keep = [c for c in table.column_names if c in COLUMNS]
    return list(table.select(keep).to_pylist())


def input_files(source: Path) -> list[Path]:
    """The files a job reads: ``source`` itself, or the CSV files of a folder in name order. Any other entry of
    the folder is an error naming it: a job that silently skipped files would look complete."""
    if source.is_dir():
        files = []
        for entry in sorted(source.iterdir()):
            if entry.name.startswith("."):
                continue
            if entry.suffix.lower() != ".csv":
                raise InputError(f"{entry}: a folder input holds only .csv files")
            files.append(entry)
        if not files:
            raise InputError(f"{source}: no .csv files in the folder")
        stems = [f.stem for f in files]
        if len(set(stems)) != len(stems):
            raise InputError(f"{source}: two files share a name apart from the suffix's case")
        return files
    if not source.exists():
        raise InputError(f"{source}: no such file or folder")
    if source.suffix.lower() not in SUFFIXES:
        raise InputError(f"{source}: give a .csv, .jsonl or .parquet file, or a folder of .csv files")
    return [source]


def read_file(path: Path) -> list[Row]:
    """Every row of one input file, in order."""
    suffix = path.suffix.lower()
    raw = _csv_rows(path) if suffix == ".csv" else _jsonl_rows(path) if suffix == ".jsonl" else _parquet_rows(path)
    return [parse_row(path.name, i, r) for i, r in enumerate(raw)]


def read_rows(source: Path, *, max_rows: int) -> list[Row]:
    """Every row of the job, files in name order; more than ``max_rows`` is an error before any work."""
    rows: list[Row] = []
    for path in input_files(source):
        rows.extend(read_file(path))
        if len(rows) > max_rows:
            raise InputError(f"{source}: more than {max_rows:,} rows; raise the limit with --max-rows")
    return rows
