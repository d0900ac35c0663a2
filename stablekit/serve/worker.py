"""One worker thread owns the model; requests wait in a bounded queue and compatible ones share a UNet batch.

A request that finds the queue full is refused at once (the handler answers 429 with ``Retry-After``), so the
server never holds more work than it can finish. Text-to-image jobs that agree on everything the UNet batch
shares (size, steps, sampler and its options, guidance) are merged: their prompts become one batch and
``GenerationParams.seeds`` gives every image the seed its own request asked for. Batching changes the throughput,
not what is drawn, though on a CPU a batched image can differ from the same request run alone in a few pixels
(batched matrix products round differently; one level at most in the tests and the load test). A failure (NaN,
out of memory, a model error) fails the jobs of that batch; the thread goes on with the next.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch

from stablekit.config import ModelConfig
from stablekit.images import to_pil
from stablekit.pipelines import Generated, GenerationParams, NonFiniteError, Notice, Pipeline, Progress
from stablekit.pipelines.events import Event
from stablekit.pipelines.networks import prompt_loras
from stablekit.pipelines.params import Limits, resolve
from stablekit.prompts.extra_networks import split_lora_tags
from stablekit.serve.jobs import Job, JobError, Output


class QueueFull(Exception):
    """The queue holds ``capacity`` jobs already; ``retry_after`` is a guess in seconds."""

    def __init__(self, capacity: int, retry_after: int) -> None:
        super().__init__(f"the queue is full ({capacity} requests waiting); retry in about {retry_after} s")
        self.retry_after = retry_after


@dataclass(frozen=True)
class WorkerSettings:
    max_queue: int = 16  # jobs waiting, not counting those running
    batching: bool = True
    max_batch_images: int = 8  # images in one merged UNet batch (the pipeline's pixel limit applies too)


def _prompts(p: GenerationParams) -> list[str]:
    return [p.prompt] if isinstance(p.prompt, str) else list(p.prompt)


def _key(p: GenerationParams) -> tuple[Any, ...]:
    """What jobs must agree on to share a UNet batch."""
    options = tuple(sorted((k, repr(v)) for k, v in p.sampler_options.items()))
    return (p.width, p.height, p.steps, p.guidance_scale, p.sampler, options, p.batch_count)


def _images(p: GenerationParams) -> int:
    return len(_prompts(p)) * p.batch_size * p.batch_count


def merge(jobs: list[Job], config: ModelConfig, limits: Limits) -> GenerationParams:
    """One batch for several compatible text-to-image jobs: each job's images as ``resolve`` lays them out
    (prompt-major, negatives broadcast, seed + i), one after the other, each image with its own seed."""
    prompts, negatives, seeds = [], [], []
    for job in jobs:
        r = resolve(config, job.params, limits=limits)  # batchable jobs have one batch, and their seed resolved
        prompts += r.prompts
        negatives += r.negatives
        seeds += r.seeds(0)
    return replace(jobs[0].params, prompt=prompts, negative_prompt=negatives, batch_size=1, seed=None, seeds=seeds)


class Worker:
    """The thread that runs jobs one batch at a time. ``submit`` from any thread; ``start``/``stop`` once."""

    def __init__(self, pipe: Pipeline, settings: WorkerSettings | None = None) -> None:
        self.pipe = pipe
        self.settings = settings or WorkerSettings()
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self.running: list[Job] = []
        self.jobs: dict[str, Job] = {}  # recent jobs by id, for status and cancel
        self._seconds_per_job = 10.0  # running estimate for Retry-After
        self._thread = threading.Thread(target=self._loop, name="stablekit-worker", daemon=True)

    # --- any thread ----------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            for job in self._queue:
                job.cancel()
            for job in self.running:
                job.cancel()
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def check(self, params: GenerationParams, size: tuple[int, int] | None = None) -> GenerationParams:
        """Validate ``params`` against the model and limits before anything is queued (a ValueError names the
        field); the returned params carry the resolved seed."""
        r = resolve(self.pipe.config, params, size=size, limits=self.pipe.limits)
        prompt_loras(self.pipe, r.prompts)  # <lora:NAME> tags name files that exist, on an engine that takes them
        if self.pipe.watermark is not None:
            self.pipe.watermark.require_size(r.width, r.height)
        return params if params.seeds is not None else replace(params, seed=r.seed)

    def submit(self, job: Job) -> int:
        """Queue ``job``; its position (0 = next). Raises :class:`QueueFull` when the queue is at capacity."""
        with self._cond:
            if self._stopping:
                raise QueueFull(0, 5)
            self._forget_old()
            waiting = sum(1 for j in self._queue if not j.cancelled)
            if waiting >= self.settings.max_queue:
                retry = max(1, round(self._seconds_per_job * (waiting + 1) / max(1, self.settings.max_batch_images)))
                raise QueueFull(self.settings.max_queue, retry)
            self._queue.append(job)
            self.jobs[job.id] = job
            self._cond.notify()
            return waiting

    def cancel(self, job_id: str) -> Job | None:
        job = self.jobs.get(job_id)
        if job is not None:
            job.cancel()
            with self._cond:
                if job in self._queue:  # never started: its slot is free at once
                    self._queue.remove(job)
                    job.finish("cancelled")
        return job

    def queued(self) -> int:
        with self._cond:
            return sum(1 for j in self._queue if not j.cancelled)

    def _forget_old(self, keep_seconds: float = 600.0) -> None:
        now = time.monotonic()
        for job_id in [i for i, j in self.jobs.items() if j.done and now - (j.finished or now) > keep_seconds]:
            del self.jobs[job_id]

    # --- the worker thread ---------------------------------------------------------------------------------------

    def _take(self) -> list[Job]:
        """The next batch: the oldest live job and, when batching, the compatible jobs queued behind it."""
        with self._cond:
            while True:
                while self._queue and self._queue[0].cancelled:
                    self._queue.popleft().finish("cancelled")
                if self._queue or self._stopping:
                    break
                self._cond.wait()
            if self._stopping:
                return []
            first = self._queue.popleft()
            batch = [first]
            if self.settings.batching and first.batchable and first.params.batch_count == 1:
                key, images = self._key(first.params), _images(first.params)
                pixels = (first.params.width or 0) * (first.params.height or 0)
                limit = min(self.settings.max_batch_images, self.pipe.limits.max_batch_pixels // max(1, pixels))
                for job in list(self._queue):
                    n = _images(job.params)
                    if job.batchable and not job.cancelled and self._key(job.params) == key and images + n <= limit:
                        self._queue.remove(job)
                        batch.append(job)
                        images += n
            self.running = batch
            return batch

    def _key(self, p: GenerationParams) -> tuple[Any, ...]:
        # A merged batch pads every prompt to its longest one's chunk count, and padding changes the context:
        # only jobs whose prompts take the same number of chunks share a batch, so each gets its own image.
        # And a batch runs with one set of LoRAs merged: only jobs whose prompts name the same ones share it.
        negatives = [p.negative_prompt] if isinstance(p.negative_prompt, str) else list(p.negative_prompt)
        loras = {split_lora_tags(q)[1] for q in _prompts(p)}
        return (*_key(p), self.pipe.prompt_chunks([*_prompts(p), *negatives]), tuple(sorted(loras)))

    def _loop(self) -> None:
        while True:
            jobs = self._take()
            if not jobs:
                return
            started = time.monotonic()
            try:
                self._execute(jobs)
            finally:
                with self._cond:
                    self.running = []
            self._seconds_per_job = 0.8 * self._seconds_per_job + 0.2 * (time.monotonic() - started)

    def _execute(self, jobs: list[Job]) -> None:
        params = merge(jobs, self.pipe.config, self.pipe.limits) if len(jobs) > 1 else jobs[0].params
        now = time.monotonic()  # one start time for the whole batch: it is how a batch can be recognised
        for job in jobs:
            job.state, job.started = "running", now
            job.publish(job.status())
        # Image i of the merged batch belongs to owners[i].
        owners = [job for job in jobs for _ in range(_images(job.params) // max(1, job.params.batch_count))]
        events: Iterator[Event] = jobs[0].run(self.pipe, params)
        try:
            for ev in events:
                live = [j for j in jobs if not j.cancelled]
                if not live:
                    break  # every owner is gone: stop at this step and free the worker
                self._dispatch(ev, jobs, owners)
        except JobError as e:
            self._fail(jobs, e)
            return
        except NonFiniteError as e:
            self._fail(jobs, JobError(500, str(e)))
            return
        except ValueError as e:  # what the up-front check could not see (an image task's input, say)
            self._fail(jobs, JobError(400, str(e)))
            return
        except torch.OutOfMemoryError as e:
            self._fail(jobs, JobError(507, f"out of memory at this size: {str(e).splitlines()[0]}"))
            return
        except MemoryError:
            self._fail(jobs, JobError(507, "out of memory at this size"))
            return
        except Exception as e:  # a model error fails its requests, never the server
            self._fail(jobs, JobError(500, f"generation failed: {type(e).__name__}: {e}"))
            return
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                close()
        for job in jobs:
            job.finish("cancelled" if job.cancelled else "done")

    def _dispatch(self, ev: Event, jobs: list[Job], owners: list[Job]) -> None:
        if isinstance(ev, Notice):
            for job in jobs:
                job.notices.append(ev.message)
                job.publish({"event": "notice", "id": job.id, "message": ev.message})
        elif isinstance(ev, Progress):
            for job in jobs:
                job.step, job.total, job.batch = ev.step, ev.total, ev.batch
                job.publish({"event": "progress", "id": job.id, "step": ev.step, "total": ev.total, "batch": ev.batch})
                if job.preview_every and (ev.step % job.preview_every == 0 or ev.step == ev.total):
                    self._preview(job, ev, owners)
        elif isinstance(ev, Generated):
            for i, (image, seed, text) in enumerate(zip(ev.images, ev.seeds, ev.parameters, strict=True)):
                owner = owners[i] if len(owners) == len(ev.images) else jobs[0]
                owner.outputs.append(Output(image, seed, text, None if ev.nsfw is None else ev.nsfw[i]))
                owner.publish({"event": "image", "id": owner.id, "index": len(owner.outputs) - 1, "seed": seed})

    def _preview(self, job: Job, ev: Progress, owners: list[Job]) -> None:
        """Decode this job's images of the x0 estimate: what the image will look like, at a decode's cost."""
        rows = [i for i, owner in enumerate(owners) if owner is job] if len(owners) == len(ev.denoised) else []
        if not rows:
            rows = list(range(len(ev.denoised)))
        with torch.inference_mode():
            job.previews = to_pil(self.pipe.decode(ev.denoised[rows]))
        job.publish({"event": "preview", "id": job.id, "step": ev.step, "count": len(job.previews)})

    def _fail(self, jobs: list[Job], error: JobError) -> None:
        for job in jobs:
            job.finish("cancelled" if job.cancelled else "failed", error)
