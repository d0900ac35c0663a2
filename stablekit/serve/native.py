"""stablekit's own API: jobs that can be watched and cancelled.

- ``POST /v1/jobs`` queues a job and answers 202 with its id at once;
- ``GET /v1/jobs/{id}`` is its state (and its images once done);
- ``GET /v1/jobs/{id}/events`` streams its progress as Server-Sent Events (``progress``, ``notice``, ``image``,
  then ``done``), for as long as the client listens;
- ``DELETE /v1/jobs/{id}`` cancels it: at its next step if running, at once if queued;
- ``POST /v1/generate`` queues and streams in one request, and the job is cancelled if that client disconnects.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, StrictFloat, StrictInt, StrictStr

from stablekit.pipelines import GenerationParams
from stablekit.serve.http import read_json
from stablekit.serve.jobs import Job
from stablekit.serve.service import Service
from stablekit.serve.tasks import Inputs, input_size, runner
from stablekit.serve.wire import ApiError, image_field, png_base64, validate


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: Literal["txt2img", "img2img", "inpaint", "depth2img", "upscale"] = "txt2img"
    prompt: StrictStr | list[StrictStr]
    negative_prompt: StrictStr | list[StrictStr] = ""
    width: StrictInt | None = None
    height: StrictInt | None = None
    steps: StrictInt | None = None
    guidance_scale: StrictFloat | StrictInt | None = None
    seed: StrictInt | None = None
    batch_size: StrictInt = 1
    batch_count: StrictInt = 1
    sampler: StrictStr | None = None
    image: StrictStr | None = None  # base64
    mask: StrictStr | None = None
    depth_map: StrictStr | None = None
    strength: StrictFloat | StrictInt | None = None
    noise_level: StrictInt | None = None
    preview_every: StrictInt = 0  # a "preview" event with the decoded x0 estimate every N steps (0: none)


def _job_json(job: Job, *, images: bool) -> dict[str, Any]:
    out = job.status()
    out.pop("event")
    out["notices"] = job.notices
    out["seeds"] = [o.seed for o in job.outputs]
    if images:
        out["images"] = [png_base64(o.image, o.parameters) for o in job.outputs]
    return out


def _sse(event: dict[str, Any]) -> bytes:
    return f"event: {event['event']}\ndata: {json.dumps(event)}\n\n".encode()


def router(service: Service) -> APIRouter:
    api = APIRouter()
    limit = service.pipe.limits.max_pixels

    async def queue(request: Request) -> Job:
        req = validate(JobRequest, await read_json(request, service.settings.max_body_bytes))
        inputs = Inputs(
            image=image_field(req.image, "image", limit) if req.image is not None else None,
            mask=image_field(req.mask, "mask", limit) if req.mask is not None else None,
            depth_map=image_field(req.depth_map, "depth_map", limit) if req.depth_map is not None else None,
            strength=req.strength,
            noise_level=req.noise_level,
        )
        params = GenerationParams(
            prompt=req.prompt,
            negative_prompt=req.negative_prompt,
            width=req.width,
            height=req.height,
            steps=req.steps,
            guidance_scale=req.guidance_scale,
            seed=req.seed,
            batch_size=req.batch_size,
            batch_count=req.batch_count,
            sampler=req.sampler,
        )
        run = runner(req.task, inputs)
        params = service.check(params, input_size(service.pipe, req.task, inputs))
        if not 0 <= req.preview_every <= 1000:
            raise ApiError(
                400, f"preview_every: must be in [0, 1000] (steps between previews), got {req.preview_every}"
            )
        return service.submit(req.task, params, run, batchable=req.task == "txt2img", preview_every=req.preview_every)

    def find(job_id: str) -> Job:
        job = service.worker.jobs.get(job_id)
        if job is None:
            raise ApiError(404, f"no job {job_id!r} (finished jobs are kept for 10 minutes)")
        return job

    async def stream(request: Request, job: Job, *, cancel_on_disconnect: bool) -> AsyncIterator[bytes]:
        events = job.listen()
        yield _sse(job.status() if not job.done else {**job.status(), "event": job.state})
        while True:
            try:
                event = await asyncio.wait_for(events.get(), timeout=service.settings.disconnect_poll_seconds * 4)
            except TimeoutError:
                if await request.is_disconnected():
                    if cancel_on_disconnect:
                        service.worker.cancel(job.id)
                    return
                yield b": keep-alive\n\n"
                continue
            if event["event"] == "image":  # the worker says which; the bytes are encoded here, off its thread
                out = job.outputs[event["index"]]
                event = {**event, "image": png_base64(out.image, out.parameters)}
            elif event["event"] == "preview":
                event = {**event, "images": [png_base64(im) for im in job.previews]}
            yield _sse(event)
            if event["event"] == "done":
                return

    @api.post("/v1/jobs", status_code=202)
    async def create(request: Request) -> JSONResponse:
        job = await queue(request)
        return JSONResponse({"id": job.id, "queued": service.worker.queued()}, status_code=202)

    @api.get("/v1/jobs/{job_id}")
    async def status(job_id: str) -> JSONResponse:
        job = find(job_id)
        return JSONResponse(_job_json(job, images=job.state == "done"))

    @api.get("/v1/jobs/{job_id}/events")
    async def events(job_id: str, request: Request) -> StreamingResponse:
        job = find(job_id)
        return StreamingResponse(stream(request, job, cancel_on_disconnect=False), media_type="text/event-stream")

    @api.delete("/v1/jobs/{job_id}")
    async def cancel(job_id: str) -> JSONResponse:
        job = find(job_id)
        service.worker.cancel(job_id)
        return JSONResponse({"id": job.id, "state": job.state, "cancel_requested": True})

    @api.post("/v1/generate")
    async def generate(request: Request) -> StreamingResponse:
        job = await queue(request)
        return StreamingResponse(stream(request, job, cancel_on_disconnect=True), media_type="text/event-stream")

    return api
