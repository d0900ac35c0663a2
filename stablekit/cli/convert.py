"""``stablekit convert``: rewrite a checkpoint in the other layout (original single file <-> diffusers folder).

The original layout is written as ``.safetensors`` with the model's config in its metadata, so the result
loads back exactly; EMA copies, schedule buffers and other non-weights are not carried over (``info`` lists
them). ``--dtype`` casts the floating-point weights; without it they keep the source's dtype.

A model with a tokenizer of its own (a diffusers folder whose ``tokenizer/`` is not CLIP's vocabulary, as in
diffusers' tiny test pipelines) keeps it: in the single file's metadata, or as the written folder's ``tokenizer/``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from stablekit.atomic import check_writable
from stablekit.cli import UserError
from stablekit.weights import load_model, save_model

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert", help="convert between original single files and diffusers folders", description=__doc__
    )
    p.add_argument("src", help="checkpoint file (.safetensors/.ckpt/.bin) or diffusers folder")
    p.add_argument("dst", help="a .safetensors file (--to original) or a folder (--to diffusers)")
    p.add_argument(
        "--to",
        choices=("original", "diffusers"),
        help="layout to write (default: original when DST ends in .safetensors)",
    )
    p.add_argument("--dtype", choices=tuple(DTYPES), help="cast floating-point weights (default: keep)")
    p.add_argument("--prediction", choices=("eps", "v"), help="record this prediction type in the output")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    layout = args.to
    if layout is None:
        if not args.dst.endswith(".safetensors"):
            raise UserError("say --to original or --to diffusers (DST does not end in .safetensors)")
        layout = "original"
    if layout == "original" and not args.dst.endswith(".safetensors"):
        raise UserError(f"the original layout is written as safetensors: DST must end in .safetensors, got {args.dst}")
    if layout == "diffusers" and os.path.isfile(args.dst):
        raise UserError(f"{args.dst} is a file; a diffusers layout is a folder")
    if os.path.exists(args.dst) and not args.overwrite:
        raise UserError(f"{args.dst} exists (pass --overwrite to replace it)")
    if os.path.abspath(args.dst) == os.path.abspath(args.src):
        raise UserError("SRC and DST are the same path")

    check_writable(args.dst)  # before the model loads: an unwritable DST fails in a second, not after minutes

    dtype = DTYPES[args.dtype] if args.dtype else None
    loaded = load_model(args.src, prediction=args.prediction, dtype=dtype)
    save_model(loaded, None, args.dst, layout=layout)
    for why, keys in loaded.dropped.items():
        print(f"note: not written: {len(keys)} key(s): {why}", file=sys.stderr)
    for note in loaded.notes:
        print(f"note: {note}", file=sys.stderr)
    kinds = ", ".join(sorted({str(p.dtype).removeprefix("torch.") for p in loaded.model.parameters()}))
    print(f"{args.dst}: {layout} layout, {loaded.family}, prediction {loaded.config.schedule.prediction}, {kinds}")
    return 0
