"""``stablekit depth2img``: redraw an image under a prompt, keeping its depth layout (SD 2 depth models)."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

from stablekit.cli import UserError
from stablekit.cli.options import add_model_options, add_sampling_options, open_image, run_task
from stablekit.pipelines import Event, GenerationParams, Pipeline, depth2img
from stablekit.pipelines.depth2img import NEEDS_DEPTH


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("depth2img", help="redraw an image keeping its depth (depth models)", description=__doc__)
    p.add_argument("prompt")
    p.add_argument("--image", "-i", required=True, help="input image")
    depth = p.add_mutually_exclusive_group()
    depth.add_argument("--depth-map", help="depth image (white = near), e.g. a 16-bit PNG")
    depth.add_argument(
        "--depth-model",
        help="MiDaS DPT-Hybrid weights (dpt_hybrid-midas-501f0c75.pt) or a transformers DPT folder; "
        "default: the model folder's own depth_estimator/, if it has one",
    )
    p.add_argument("--strength", type=float, default=0.8, help="0..1: how much to change (default 0.8)")
    add_model_options(p, default_help="a depth model (512-depth)")
    add_sampling_options(p)
    p.set_defaults(run=run)


def _folder_estimator(model: str | None) -> Path | None:
    """A diffusers depth folder carries its MiDaS as ``depth_estimator/`` (and its input size in
    ``feature_extractor/``): the folder itself is then the depth model to load."""
    if model is None:
        return None
    return Path(model) if (Path(model) / "depth_estimator" / "config.json").is_file() else None


def run(args: argparse.Namespace) -> int:
    image = open_image(args.image, "image")
    depth_map = open_image(args.depth_map, "depth map") if args.depth_map else None
    estimator_path = args.depth_model or (None if depth_map is not None else _folder_estimator(args.model))
    if depth_map is None and estimator_path is None:
        raise UserError(NEEDS_DEPTH)
    if args.model is None:
        raise UserError("depth2img needs a depth model (--model PATH to an SD 2 512-depth checkpoint)")

    def task(pipe: Pipeline, params: GenerationParams) -> Iterator[Event]:
        estimator = None
        if estimator_path is not None:
            from stablekit.weights.midas import load_depth_model

            estimator = load_depth_model(estimator_path, device=pipe.device)
        return depth2img(pipe, params, image, depth_map=depth_map, depth_model=estimator, strength=args.strength)

    return run_task(args, args.prompt, task, lambda: Path(args.model), "model")
