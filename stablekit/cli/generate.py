"""``stablekit generate``: text to image."""

from __future__ import annotations

import argparse

from stablekit.cli.options import DEMO_MODEL, add_model_options, add_sampling_options, run_task
from stablekit.demo import model_path
from stablekit.pipelines import txt2img


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate images from a text prompt", description=__doc__)
    p.add_argument("prompt")
    add_model_options(
        p, default_help='default: the built-in demo model, which draws prompts like "a red circle on a blue background"'
    )
    add_sampling_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    return run_task(args, args.prompt, txt2img, model_path, DEMO_MODEL)
