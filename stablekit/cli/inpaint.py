"""``stablekit inpaint``: repaint the white part of a mask under a prompt, keep the rest."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

from stablekit.cli.options import DEMO_MODEL, add_model_options, add_sampling_options, open_image, run_task
from stablekit.demo import model_path
from stablekit.pipelines import Event, GenerationParams, Pipeline, inpaint


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inpaint", help="repaint a masked region of an image", description=__doc__)
    p.add_argument("prompt")
    p.add_argument("--image", "-i", required=True, help="input image")
    p.add_argument("--mask", required=True, help="mask image of the same size: white = repaint, black = keep")
    p.add_argument("--strength", type=float, default=1.0, help="0..1: how much to change the masked region")
    add_model_options(p, default_help="an inpainting model, or any other; default: the built-in demo model")
    add_sampling_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    image = open_image(args.image, "image")
    mask = open_image(args.mask, "mask")

    def task(pipe: Pipeline, params: GenerationParams) -> Iterator[Event]:
        return inpaint(pipe, params, image, mask, args.strength)

    return run_task(args, args.prompt, task, model_path, DEMO_MODEL)
