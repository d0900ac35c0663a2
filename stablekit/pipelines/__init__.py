"""Pipelines compose the models, the tokenizer and the samplers; each task is a generator of events.

Every task is a thin layer over one denoising generator (:mod:`stablekit.pipelines.denoise`): it resolves its
parameters, prepares its images and conditioning, and hands over.
"""

from stablekit.pipelines.conditioning import Conditioning
from stablekit.pipelines.core import DTYPES, NonFiniteError, Pipeline
from stablekit.pipelines.depth2img import depth2img
from stablekit.pipelines.events import Event, Generated, Notice, Progress
from stablekit.pipelines.img2img import img2img
from stablekit.pipelines.inpaint import inpaint
from stablekit.pipelines.params import GenerationParams
from stablekit.pipelines.txt2img import collect, generate, txt2img
from stablekit.pipelines.upscale import upscale

__all__ = [
    "DTYPES",
    "Conditioning",
    "Event",
    "Generated",
    "GenerationParams",
    "NonFiniteError",
    "Notice",
    "Pipeline",
    "Progress",
    "collect",
    "depth2img",
    "generate",
    "img2img",
    "inpaint",
    "txt2img",
    "upscale",
]
