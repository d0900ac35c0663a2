"""Pipelines compose the models, the tokenizer and the samplers; each is a generator of events."""

from stablekit.pipelines.core import DTYPES, NonFiniteError, Pipeline
from stablekit.pipelines.txt2img import Generated, GenerationParams, Notice, Progress, generate, txt2img

__all__ = [
    "DTYPES",
    "Generated",
    "GenerationParams",
    "NonFiniteError",
    "Notice",
    "Pipeline",
    "Progress",
    "generate",
    "txt2img",
]
