"""Requests' task names -> the pipeline call the worker makes, with the request's images bound in."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from PIL import Image

from stablekit.pipelines import (
    Event,
    GenerationParams,
    Pipeline,
    depth2img,
    img2img,
    inpaint,
    txt2img,
    upscale,
)
from stablekit.pipelines.inputs import default_size
from stablekit.serve.jobs import Runner
from stablekit.serve.wire import ApiError

TASKS = ("txt2img", "img2img", "inpaint", "depth2img", "upscale")


@dataclass(frozen=True)
class Inputs:
    image: Image.Image | None = None
    mask: Image.Image | None = None
    depth_map: Image.Image | None = None
    strength: float | None = None
    noise_level: int | None = None


def _need(value: Image.Image | None, task: str, field: str) -> Image.Image:
    if value is None:
        raise ApiError(400, f"{field}: required for {task}")
    return value


def runner(task: str, inputs: Inputs) -> Runner:
    """The worker's call for ``task``; a 400 naming the field when an input it needs is missing."""
    if task == "txt2img":
        return txt2img
    image = _need(inputs.image, task, "image")
    if task == "img2img":
        strength = 0.75 if inputs.strength is None else inputs.strength

        def run_img2img(pipe: Pipeline, p: GenerationParams) -> Iterator[Event]:
            return img2img(pipe, p, image, strength=strength)

        return run_img2img
    if task == "inpaint":
        mask = _need(inputs.mask, task, "mask")
        strength = 1.0 if inputs.strength is None else inputs.strength

        def run_inpaint(pipe: Pipeline, p: GenerationParams) -> Iterator[Event]:
            return inpaint(pipe, p, image, mask, strength=strength)

        return run_inpaint
    if task == "depth2img":
        strength = 0.8 if inputs.strength is None else inputs.strength
        depth = inputs.depth_map

        def run_depth(pipe: Pipeline, p: GenerationParams) -> Iterator[Event]:
            return depth2img(pipe, p, image, strength=strength, depth_map=depth)

        return run_depth
    if task == "upscale":
        level = inputs.noise_level

        def run_upscale(pipe: Pipeline, p: GenerationParams) -> Iterator[Event]:
            return upscale(pipe, p, image) if level is None else upscale(pipe, p, image, noise_level=level)

        return run_upscale
    raise ApiError(400, f"task: unknown task {task!r}; one of {', '.join(TASKS)}")


def input_size(pipe: Pipeline, task: str, inputs: Inputs) -> tuple[int, int] | None:
    """The size an image task's output will have (its input's, rounded to the model's factor; four times that for
    the upscaler), for the up-front check."""
    if task == "txt2img" or inputs.image is None:
        return None
    f = pipe.config.vae.downsample
    try:
        w, h = default_size(inputs.image, f)
    except ValueError as e:
        raise ApiError(400, str(e)) from e
    return (w * f, h * f) if task == "upscale" else (w, h)
