"""``POST /score``: the Azure ML online-endpoint schema (see :mod:`stablekit.serve.azure`) over HTTP."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from stablekit.pipelines import txt2img
from stablekit.serve import azure
from stablekit.serve.http import read_json
from stablekit.serve.service import Service
from stablekit.serve.wire import png_base64


def router(service: Service) -> APIRouter:
    api = APIRouter()

    @api.post("/score")
    async def score(request: Request) -> list[dict[str, Any]]:
        params, prompts = azure.parse(await read_json(request, service.settings.max_body_bytes))
        job = await service.run(request, "txt2img", service.check(params), txt2img, batchable=True)
        images = [png_base64(o.image, o.parameters) for o in job.outputs]
        return azure.answer(prompts, images, [o.nsfw for o in job.outputs])

    return api
