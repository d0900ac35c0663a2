"""``stablekit img2img``: an image and a prompt to a new image (``--strength`` 0 keeps the input, 1 redraws)."""

from __future__ import annotations

import argparse

from stablekit.cli.options import DEMO_MODEL, add_model_options, add_sampling_options, open_image, run_task
from stablekit.demo import model_path
from stablekit.pipelines import img2img


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("img2img", help="redraw an image under a prompt", description=__doc__)
    p.add_argument("prompt")
    p.add_argument("--image", "-i", required=True, help="input image (PNG, JPEG, WebP, ...)")
    p.add_argument("--strength", type=float, default=0.75, help="0..1: how much to change (default 0.75)")
    add_model_options(p, default_help="default: the built-in demo model")
    add_sampling_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    image = open_image(args.image, "image")
    return run_task(
        args, args.prompt, lambda pipe, params: img2img(pipe, params, image, args.strength), model_path, DEMO_MODEL
    )
