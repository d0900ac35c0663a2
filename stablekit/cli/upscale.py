"""``stablekit upscale``: four times the resolution with the x4 upscaler, guided by an optional prompt."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from stablekit.cli.options import add_model_options, add_sampling_options, open_image, run_task
from stablekit.pipelines import Event, GenerationParams, Pipeline, upscale
from stablekit.pipelines.upscale import DEFAULT_NOISE_LEVEL


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("upscale", help="upscale an image 4x with the x4 upscaler", description=__doc__)
    p.add_argument("image", help="input image")
    p.add_argument("--prompt", "-p", default="", help="what the image shows (guides the added detail)")
    p.add_argument(
        "--noise-level",
        type=int,
        default=DEFAULT_NOISE_LEVEL,
        help=f"0..350: noise added to the input; more lets the model invent more (default {DEFAULT_NOISE_LEVEL})",
    )
    add_model_options(p, default_help="an x4 upscaler; default: the built-in demo upscaler")
    add_sampling_options(p, size=False)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from stablekit.demo import upscaler_path

    image = open_image(args.image, "image")

    def task(pipe: Pipeline, params: GenerationParams) -> Iterator[Event]:
        return upscale(pipe, params, image, noise_level=args.noise_level)

    return run_task(args, args.prompt, task, upscaler_path, "upscaler (coloured shapes only)")
