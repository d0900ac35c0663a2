"""Batch generation: one image per row of a CSV, JSONL or parquet file (or a folder of CSV files), resumable,
sharded over ``torchrun`` processes, with Azure ML batch-endpoint outputs (``predictions.csv``)."""

from stablekit.batch.job import JobOptions, Summary, TooManyFailures, init_distributed, prepare_output, run_job
from stablekit.batch.rows import InputError, Row, read_rows

__all__ = [
    "InputError",
    "JobOptions",
    "Row",
    "Summary",
    "TooManyFailures",
    "init_distributed",
    "prepare_output",
    "read_rows",
    "run_job",
]
