"""``stablekit inpaint``: repaint the white part of a mask under a prompt, keep the rest."""

from __future__ import annotations

import argparse

from stablekit.cli.options import (
    add_model_options,
    add_sampling_options,
    load_pipeline,
    open_image,
    output_paths,
    params_from,
    write_images,
)
from stablekit.demo import model_path
from stablekit.pipelines import inpaint


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
    params = params_from(args, args.prompt)
    paths = output_paths(args.output, params.batch_size * params.batch_count)
    image = open_image(args.image, "image")
    mask = open_image(args.mask, "mask")
    pipe = load_pipeline(args, model_path, "model (coloured shapes only)")
    return write_images(inpaint(pipe, params, image, mask, args.strength), paths, params.batch_count)
