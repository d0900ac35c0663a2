"""The server's state: one pipeline, its worker, and the settings every route reads; and the way a route runs a
job: check it, queue it (429 with ``Retry-After`` when full), wait, and cancel it if the client goes away."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from fastapi import Request

from stablekit.pipelines import GenerationParams, Pipeline
from stablekit.serve.jobs import Job, Runner
from stablekit.serve.wire import ApiError
from stablekit.serve.worker import QueueFull, Worker, WorkerSettings


@dataclass(frozen=True)
class ServeSettings:
    api_key: str | None = None
    max_body_bytes: int = 32 * 2**20  # a few base64 images at the pixel limit
    cors_origins: tuple[str, ...] = ()  # none: browsers on other origins cannot call the API
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    disconnect_poll_seconds: float = 0.25


class Service:
    def __init__(self, pipe: Pipeline, settings: ServeSettings | None = None) -> None:
        self.pipe = pipe
        self.settings = settings or ServeSettings()
        self.worker = Worker(pipe, self.settings.worker)

    @property
    def model_name(self) -> str:
        return self.pipe.name

    def check(self, params: GenerationParams, size: tuple[int, int] | None = None) -> GenerationParams:
        """400 naming the field for anything the model or the limits refuse; the seed comes back resolved."""
        try:
            return self.worker.check(params, size)
        except ValueError as e:
            raise ApiError(400, str(e)) from e

    def submit(
        self, task: str, params: GenerationParams, run: Runner, *, batchable: bool = False, preview_every: int = 0
    ) -> Job:
        job = Job(task, params, run, batchable=batchable, preview_every=preview_every)
        try:
            self.worker.submit(job)
        except QueueFull as e:
            raise ApiError(429, str(e), {"Retry-After": str(e.retry_after)}) from e
        return job

    async def finish(self, request: Request, job: Job) -> Job:
        """Wait for ``job``; cancel it (freeing its slot) if the client disconnects first. A failed job raises
        :class:`ApiError` with the job's status."""
        waiter = asyncio.ensure_future(job.wait())
        try:
            while not waiter.done():
                done, _ = await asyncio.wait({waiter}, timeout=self.settings.disconnect_poll_seconds)
                if not done and await request.is_disconnected():
                    self.worker.cancel(job.id)
                    raise ApiError(499, "the client disconnected; the job was cancelled")
        finally:
            if not waiter.done():
                waiter.cancel()
        if job.error is not None:
            raise ApiError(job.error.status, job.error.message)
        if job.state == "cancelled":
            raise ApiError(409, "the job was cancelled before it finished")
        return job

    async def run(
        self, request: Request, task: str, params: GenerationParams, run: Runner, *, batchable: bool = False
    ) -> Job:
        return await self.finish(request, self.submit(task, params, run, batchable=batchable))
