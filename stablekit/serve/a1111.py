"""The AUTOMATIC1111 API (``/sdapi/v1/...``): enough of it that A1111's client libraries (``webuiapi`` among them)
work unchanged. Request fields are read as :mod:`stablekit.serve.a1111_requests` describes: honoured, neutral, or
a 400 naming the field.

- ``POST txt2img`` and ``img2img`` answer ``{images, parameters, info}``: base64 PNGs carrying their
  ``parameters`` text, the request echoed, and ``info`` as a JSON string (seeds, prompts, infotexts, ...).
  A batch never gets A1111's grid image in front (``return_grid`` is false here).
- ``GET progress`` and ``POST interrupt`` see the jobs queued through this API. An interrupted job stops at its
  next step and its request answers 200 with the images finished before (A1111 also decodes the half-done
  image; the denoising here ends without one), which is what A1111's clients expect of an interrupt.
- ``GET samplers``, ``schedulers``, ``sd-models``, ``scripts`` (none), ``options``; ``POST options`` accepts a
  setting at its current value or one that changes nothing here, else a 400 naming it.
- ``POST png-info`` reads a PNG's ``parameters`` text (decoded as every image field is: never fetched).

Errors keep this server's ``{"error", "status"}``; A1111's clients read only the status code.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from stablekit.diffusion import SAMPLERS
from stablekit.pipelines import GenerationParams
from stablekit.serve.a1111_requests import (
    Plan,
    check_setting,
    current_options,
    plan_img2img,
    plan_txt2img,
    resolved_subseed,
)
from stablekit.serve.a1111_samplers import sampler_list, schedule_list
from stablekit.serve.a1111_schema import Img2ImgRequest, PngInfoRequest, Processing, Txt2ImgRequest
from stablekit.serve.http import read_json
from stablekit.serve.jobs import Job
from stablekit.serve.service import Service
from stablekit.serve.wire import ApiError, image_field, png_base64, validate

# The pipeline's messages start with the value's own name; A1111's clients know the field by another.
_FIELDS = (
    ("guidance scale", "cfg_scale"),
    ("batch count", "n_iter"),
    ("batch size", "batch_size"),
    ("images in the run", "n_iter"),
    ("pixels per batch", "batch_size"),
    ("the image's pixels", "width"),
    ("a prompt's length", "prompt"),
    ("steps", "steps"),
    ("seed", "seed"),
    ("width", "width"),
    ("height", "height"),
    ("LoRA", "prompt"),
    ("extra network", "prompt"),
)
_PARAM = re.compile(r'\s*(\w[\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")


@dataclass
class _Tracked:
    job: Job
    label: str  # what A1111's progress calls the job
    n_iter: int
    timestamp: str


def parse_infotext(text: str) -> dict[str, Any]:
    """A ``parameters`` text as A1111 splits it: ``Prompt``, ``Negative prompt`` and the last line's
    ``Key: value`` entries as strings (a size ``WxH`` as ``Key-1``/``Key-2``)."""
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:  # not a settings line: part of the prompt
        lines, last = [*lines, last], ""
    prompt: list[str] = []
    negative: list[str] = []
    for raw in lines:
        line = raw.strip()
        if line.startswith("Negative prompt:"):
            negative.append(line[len("Negative prompt:") :].strip())
        elif negative:
            negative.append(line)
        else:
            prompt.append(line)
    out: dict[str, Any] = {}
    for key, value in _PARAM.findall(last):
        if len(value) >= 2 and value[0] == value[-1] == '"':
            try:
                value = json.loads(value)
            except ValueError:
                pass
        size = _SIZE.match(value)
        if size:
            out[f"{key}-1"], out[f"{key}-2"] = size.groups()
        else:
            out[key] = value
    return {**out, "Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}


def _with_schedule(text: str, sampler: str) -> str:
    """Our infotext names the sampler only; Euler and Heun on Karras σ need A1111's ``Schedule type`` too."""
    head, sep, last = text.rpartition("\n")
    entry = re.escape(f"Sampler: {sampler}")
    return head + sep + re.sub(rf"(^|, )({entry})(?=,|$)", r"\1\2, Schedule type: Karras", last, count=1)


def _idle() -> dict[str, Any]:
    state: dict[str, Any] = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": ""}
    state |= {"job_count": 0, "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
    return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None}


def router(service: Service) -> APIRouter:
    api = APIRouter(prefix="/sdapi/v1")
    pipe = service.pipe
    body_limit = service.settings.max_body_bytes
    tracked: dict[str, _Tracked] = {}
    interrupted: set[str] = set()

    def checked(params: GenerationParams) -> GenerationParams:
        try:
            return service.check(params)
        except ApiError as e:
            field = next((f for prefix, f in _FIELDS if e.message.startswith(prefix)), None)
            if field is None:
                raise
            raise ApiError(400, f"{field}: {e.message}") from e

    def info(req: Processing, plan: Plan, params: GenerationParams, stopped: bool, texts: list[str], ts: str) -> str:
        assert params.seed is not None, "the check resolves the seed"
        n = params.batch_size * params.batch_count
        subseed = resolved_subseed(req.subseed)
        return json.dumps(
            {
                "prompt": req.prompt or "",
                "all_prompts": [req.prompt or ""] * n,
                "negative_prompt": req.negative_prompt or "",
                "all_negative_prompts": [req.negative_prompt or ""] * n,
                "seed": params.seed,
                "all_seeds": [params.seed + i for i in range(n)],
                "subseed": subseed,
                "all_subseeds": [subseed + i for i in range(n)],
                "subseed_strength": req.subseed_strength or 0,
                "width": params.width,
                "height": params.height,
                "sampler_name": plan.choice.sampler.name,
                "cfg_scale": params.guidance_scale,
                "steps": params.steps,
                "batch_size": params.batch_size,
                "restore_faces": False,
                "face_restoration_model": None,
                "sd_model_name": pipe.name,
                "sd_model_hash": None,
                "sd_vae_name": None,
                "sd_vae_hash": None,
                "seed_resize_from_w": req.seed_resize_from_w,
                "seed_resize_from_h": req.seed_resize_from_h,
                "denoising_strength": req.denoising_strength,
                "extra_generation_params": plan.extra,
                "index_of_first_image": 0,
                "infotexts": texts,
                "styles": [],
                "job_timestamp": ts,
                "clip_skip": pipe.clip_skip,
                "is_using_inpainting_conditioning": pipe.config.conditioning == "inpaint",
                "version": f"stablekit {pipe.version}",
                "interrupted": stopped,  # not A1111's: whether /interrupt cut this job short
            }
        )

    async def generate(request: Request, req: Processing, plan: Plan, echo: dict[str, Any]) -> JSONResponse:
        params = checked(plan.params)
        ts = datetime.now().strftime("%Y%m%d%H%M%S")
        label = "scripts_txt2img" if plan.task == "txt2img" else "scripts_img2img"
        job = service.submit(plan.task, params, plan.run, batchable=plan.task == "txt2img")
        tracked[job.id] = _Tracked(job, label, params.batch_count, ts)
        stopped = False
        try:
            await service.finish(request, job)
        except ApiError as e:
            if not (e.status == 409 and job.id in interrupted):  # an interrupt answers with what is done
                raise
        finally:
            tracked.pop(job.id, None)
            stopped = job.id in interrupted
            interrupted.discard(job.id)
        karras = bool(plan.choice.options.get("karras"))
        name = SAMPLERS[plan.choice.ours].display_name
        texts = [_with_schedule(o.parameters, name) if karras else o.parameters for o in job.outputs]
        images = [png_base64(o.image, t) for o, t in zip(job.outputs, texts, strict=True)] if req.send_images else []
        return JSONResponse({"images": images, "parameters": echo, "info": info(req, plan, params, stopped, texts, ts)})

    @api.post("/txt2img")
    async def txt2img(request: Request) -> JSONResponse:
        req = validate(Txt2ImgRequest, await read_json(request, body_limit))
        return await generate(request, req, plan_txt2img(pipe, req), req.model_dump())

    @api.post("/img2img")
    async def img2img(request: Request) -> JSONResponse:
        req = validate(Img2ImgRequest, await read_json(request, body_limit))
        echo = req.model_dump()
        if not req.include_init_images:  # as A1111: the images are not sent back unless asked for
            echo["init_images"], echo["mask"] = None, None
        return await generate(request, req, plan_img2img(pipe, req), echo)

    @api.get("/progress")
    async def progress(skip_current_image: bool = False) -> dict[str, Any]:
        running = next((t for t in tracked.values() if t.job.state == "running"), None)
        if running is None:
            return _idle()
        job, count = running.job, max(1, running.n_iter)
        done = 0.01 + job.batch / count + (job.step / job.total / count if job.total else 0.0)
        elapsed = time.monotonic() - (job.started or time.monotonic())
        name = running.label if count == 1 else f"Batch {job.batch + 1} out of {count}"
        state: dict[str, Any] = {
            "skipped": False,
            "interrupted": job.id in interrupted,
            "stopping_generation": False,
            "job": name,
            "job_count": count,
            "job_timestamp": running.timestamp,
            "job_no": job.batch,
            "sampling_step": job.step,
            "sampling_steps": job.total,
        }
        return {
            "progress": min(done, 1.0),
            "eta_relative": elapsed / done - elapsed,
            "state": state,
            "current_image": None,  # no live previews here
            "textinfo": None,
        }

    @api.post("/interrupt")
    async def interrupt() -> dict[str, Any]:
        for t in list(tracked.values()):
            if t.job.state == "running":
                interrupted.add(t.job.id)
                service.worker.cancel(t.job.id)
        return {}

    @api.get("/samplers")
    async def samplers() -> list[dict[str, Any]]:
        return sampler_list()

    @api.get("/schedulers")
    async def schedulers() -> list[dict[str, Any]]:
        return schedule_list()

    @api.get("/sd-models")
    async def sd_models() -> list[dict[str, Any]]:
        name = pipe.name  # the server knows its model by name; its path and hash are not exposed
        return [{"title": name, "model_name": name, "hash": None, "sha256": None, "filename": name, "config": None}]

    @api.get("/scripts")
    async def scripts() -> dict[str, list[str]]:
        return {"txt2img": [], "img2img": []}

    @api.get("/options")
    async def get_options() -> dict[str, Any]:
        return current_options(pipe)

    @api.post("/options")
    async def set_options(request: Request) -> JSONResponse:
        body = await read_json(request, body_limit)
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object of settings")
        for key, value in body.items():
            check_setting(pipe, key, value, key)
        return JSONResponse(None)  # A1111 answers null

    @api.post("/png-info")
    async def png_info(request: Request) -> dict[str, Any]:
        req = validate(PngInfoRequest, await read_json(request, body_limit))
        image = image_field(req.image, "image", pipe.limits.max_pixels)
        text = image.info.get("parameters")
        geninfo = text if isinstance(text, str) else ""
        others = {k: v for k, v in image.info.items() if isinstance(k, str) and isinstance(v, str)}
        return {"info": geninfo, "items": {**others, "parameters": geninfo}, "parameters": parse_infotext(geninfo)}

    return api
