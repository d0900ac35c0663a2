"""``stablekit batch``: one image per row of a CSV, JSONL or parquet file, or a folder of CSV files.

Resumable (run the same command again after a crash: finished rows are skipped and every image is the one an
uninterrupted run makes) and sharded under ``torchrun --nproc_per_node N -m stablekit batch ...``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from stablekit.batch import JobOptions, init_distributed, prepare_output, read_rows, run_job
from stablekit.cli.options import DEMO_MODEL, add_model_options, load_pipeline
from stablekit.demo import model_path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("batch", help="generate one image per row of a CSV/JSONL/parquet file", description=__doc__)
    p.add_argument(
        "input",
        metavar="INPUT",
        help="a .csv, .jsonl or .parquet file, or a folder of .csv files; columns: prompt (required), "
        "negative_prompt, seed, steps, guidance_scale, width, height, sampler",
    )
    p.add_argument("--out", "-O", required=True, help="output folder: PNGs, predictions.csv, manifest.jsonl")
    p.add_argument("--batch-size", type=int, default=4, help="rows with the same settings per UNet batch (4)")
    p.add_argument("--seed", type=int, default=0, help="base of the seeds of rows without a seed column value (0)")
    p.add_argument(
        "--error-threshold",
        type=int,
        default=-1,
        help="stop when more rows than this fail; -1 (default) tolerates any number, as Azure's batch jobs do",
    )
    p.add_argument("--max-rows", type=int, default=100_000, help="most rows in one job (100,000)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    add_model_options(p, default_help="default: the built-in demo model")
    p.set_defaults(run=run)


def _default_device(args: argparse.Namespace) -> None:
    # One GPU per process under torchrun, as its LOCAL_RANK says.
    if args.device is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch

        if torch.cuda.is_available():
            args.device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.error_threshold < -1:
        raise ValueError(f"--error-threshold must be -1 or more, got {args.error_threshold}")
    rows = read_rows(Path(args.input), max_rows=args.max_rows)
    out = Path(args.out)
    prepare_output(out)
    rank, world, barrier = init_distributed()
    _default_device(args)
    pipe = load_pipeline(args, model_path, DEMO_MODEL)
    options = JobOptions(args.batch_size, args.seed, args.error_threshold, progress=not args.quiet)
    summary = run_job(pipe, rows, out, options, rank=rank, world=world, barrier=barrier)
    if rank == 0:
        print(
            f"{summary.done} of {summary.rows} rows done ({summary.skipped} from an earlier run), "
            f"{summary.failed} failed: {out / 'predictions.csv'}",
            file=sys.stderr,
        )
    return 0
