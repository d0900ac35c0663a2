"""``stablekit compile``: convert and compile a model for the OpenVINO engine ahead of use.

A deployment runs this once (or its start-up does, e.g. the Azure entry script's ``init()``); every later
``--engine openvino`` process with the same weights, options, precision and CPU loads the result in seconds.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from stablekit.cli.options import add_engine_options, add_weights_options
from stablekit.demo import model_path
from stablekit.engines.cache import ModelCache, default_cache_dir
from stablekit.engines.openvino import OpenVINOEngine
from stablekit.pipelines import Pipeline


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compile", help="build the OpenVINO engine's cache for a model", description=__doc__)
    p.add_argument("model", nargs="?", help="checkpoint file or diffusers folder (default: the built-in demo model)")
    p.add_argument("--prediction", choices=("eps", "v"), help="override the model's prediction type")
    add_weights_options(p)
    add_engine_options(p)
    p.add_argument("--clip-skip", type=int, default=1, metavar="N", help="the clip skip to build the text part for")
    p.add_argument("--clear", action="store_true", help="remove every converted model from the cache folder and exit")
    p.set_defaults(run=run, engine="openvino")


def run(args: argparse.Namespace) -> int:
    if args.engine != "openvino":
        raise ValueError("compile builds the OpenVINO engine's cache; the torch engine needs none")
    root = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    if args.clear:
        cache = ModelCache(root, "openvino")
        size = cache.size()
        shutil.rmtree(cache.engine_root, ignore_errors=True)
        print(f"removed {cache.engine_root} ({size / 2**20:,.1f} MiB)")
        return 0
    model = args.model or model_path()
    start = time.perf_counter()
    pipe = Pipeline.from_file(
        model,
        prediction=args.prediction,
        ema=args.ema,
        vae=args.vae,
        variant=args.variant,
        clip_skip=args.clip_skip,
        engine="openvino",
        precision=args.precision,
        cache_dir=args.cache_dir,
        report=lambda message: print(f"note: {message}", file=sys.stderr),
    )
    engine = pipe.engine
    assert isinstance(engine, OpenVINOEngine)
    info = engine.info
    total = ModelCache(root, "openvino").size()
    built = ", ".join(info.converted) if info.converted else "nothing (all parts were cached)"
    print(f"{model}: {engine.describe()} in {time.perf_counter() - start:.1f} s; converted {built}")
    print(f"entry {info.folder}: {info.cache_bytes / 2**20:,.1f} MiB (all cached models: {total / 2**20:,.1f} MiB)")
    return 0
