"""The Azure ML online-endpoint schema for text-to-image, as the Stable Diffusion model cards on Azure document it.

Request::

    {"input_data": {"columns": ["prompt"], "data": ["a photograph of an astronaut riding a horse"], "index": [0],
                    "parameters": {"num_inference_steps": 50, "guidance_scale": 7.5}}}

``data`` holds one entry per image: a string (the prompt), an object (``{"prompt": ..., "negative_prompt": ...}``)
or a list in the order of ``columns``. ``parameters`` are the cards' two plus ours (``seed``, ``width``,
``height``, ``sampler``, ``negative_prompt``). Row ``i`` uses ``seed + i``, so one row with a seed is the image
``stablekit generate --seed`` gives. The answer is one object per row, in order::

    [{"prompt": "...", "generated_image": "<base64 PNG>", "nsfw_content_detected": null}]

``nsfw_content_detected`` is the safety checker's verdict (``--safety-checker``; a flagged image is black unless
``--safety-action flag``), and ``null`` while none is loaded, as Azure's own deployment answers then.
Parsing is shared by the HTTP route and the Azure ML entry script (:mod:`stablekit.serve.azureml_score`).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr

from stablekit.pipelines import GenerationParams
from stablekit.serve.wire import ApiError, validate

COLUMNS = ("prompt", "negative_prompt")


class AzureParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_inference_steps: StrictInt | None = None
    guidance_scale: StrictFloat | StrictInt | None = None
    negative_prompt: StrictStr | None = None  # for every row that gives none
    seed: StrictInt | None = None
    width: StrictInt | None = None
    height: StrictInt | None = None
    sampler: StrictStr | None = None


class AzureInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    columns: list[StrictStr] = Field(default_factory=lambda: ["prompt"])
    data: list[StrictStr | dict[str, Any] | list[Any]] = Field(min_length=1)
    index: list[Any] | None = None
    parameters: AzureParameters = Field(default_factory=AzureParameters)


class AzureRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_data: AzureInput


def _row(entry: str | dict[str, Any] | list[Any], columns: list[str], where: str) -> tuple[str, str | None]:
    """(prompt, negative prompt or None) of one ``data`` entry."""
    if isinstance(entry, str):
        if columns[:1] != ["prompt"]:
            raise ApiError(400, f"{where}: a bare string is a prompt, but columns[0] is {columns[0]!r}")
        return entry, None
    if isinstance(entry, list):
        if len(entry) != len(columns):
            raise ApiError(400, f"{where}: {len(entry)} values for {len(columns)} columns {columns}")
        entry = dict(zip(columns, entry, strict=True))
    unknown = sorted(set(entry) - set(COLUMNS))
    if unknown:
        raise ApiError(400, f"{where}: unknown column(s) {unknown}; known: {list(COLUMNS)}")
    prompt, negative = entry.get("prompt"), entry.get("negative_prompt")
    if not isinstance(prompt, str):
        raise ApiError(400, f"{where}.prompt: expected a string")
    if negative is not None and not isinstance(negative, str):
        raise ApiError(400, f"{where}.negative_prompt: expected a string")
    return prompt, negative


def parse(body: Any) -> tuple[GenerationParams, list[str]]:
    """The request as generation parameters (one image per row), and the prompts to echo back."""
    req = validate(AzureRequest, body).input_data
    unknown = sorted(set(req.columns) - set(COLUMNS))
    if unknown or not req.columns:
        raise ApiError(400, f"input_data.columns: unknown column(s) {unknown}; known: {list(COLUMNS)}")
    if req.index is not None and len(req.index) != len(req.data):
        raise ApiError(400, f"input_data.index: {len(req.index)} entries for {len(req.data)} rows of data")
    rows = [_row(e, req.columns, f"input_data.data.{i}") for i, e in enumerate(req.data)]
    p = req.parameters
    default_negative = p.negative_prompt or ""
    params = GenerationParams(
        prompt=[q for q, _ in rows],
        negative_prompt=[n if n is not None else default_negative for _, n in rows],
        width=p.width,
        height=p.height,
        steps=p.num_inference_steps,
        guidance_scale=p.guidance_scale,
        seed=p.seed,
        sampler=p.sampler,
    )
    return params, [q for q, _ in rows]


def answer(prompts: list[str], images_b64: list[str], nsfw: list[bool | None]) -> list[dict[str, Any]]:
    return [
        {"prompt": q, "generated_image": img, "nsfw_content_detected": flag}
        for q, img, flag in zip(prompts, images_b64, nsfw, strict=True)
    ]
