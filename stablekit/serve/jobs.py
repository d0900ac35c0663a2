"""A request as the worker sees it: what to run, how far it got, what came out, and how to cancel it.

The worker thread writes a job's state; request handlers on the event loop read it and wait on it. Waiting and
listening go through ``loop.call_soon_threadsafe``, so no handler ever blocks a thread while its job runs.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from PIL import Image

from stablekit.pipelines import Event, GenerationParams, Pipeline

State = Literal["queued", "running", "done", "failed", "cancelled"]
# A task as the worker runs it: the pipeline, the (possibly merged) params -> the pipeline's event stream.
Runner = Callable[[Pipeline, GenerationParams], Iterator[Event]]


class JobError(Exception):
    """A job that failed: the HTTP status to answer with and a message naming the problem."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Output:
    image: Image.Image
    seed: int
    parameters: str  # the PNG's A1111-style "parameters" text
    nsfw: bool | None = None  # the safety checker's verdict; None when none is loaded


@dataclass
class Job:
    """One request. ``batchable`` jobs (text-to-image) may share a UNet batch with compatible ones."""

    task: str
    params: GenerationParams  # resolved seed filled in at submission, so a merged batch keeps it
    run: Runner
    batchable: bool = False
    preview_every: int = 0  # decode the x0 estimate every N steps for the event stream (0: never)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    state: State = "queued"
    step: int = 0
    total: int = 0
    batch: int = 0
    outputs: list[Output] = field(default_factory=list)
    previews: list[Image.Image] = field(default_factory=list)  # the latest preview per image of the batch
    notices: list[str] = field(default_factory=list)
    error: JobError | None = None
    created: float = field(default_factory=time.monotonic)
    started: float | None = None
    finished: float | None = None
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)
    _done: threading.Event = field(default_factory=threading.Event, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = field(default_factory=list, repr=False)
    _listeners: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue[dict[str, Any]]]] = field(
        default_factory=list, repr=False
    )

    # --- from handlers -------------------------------------------------------------------------------------------

    def cancel(self) -> None:
        """Ask the worker to stop this job at its next step (or never to start it)."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    async def wait(self) -> None:
        """Until the job is done, failed or cancelled."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if self._done.is_set():
                return
            self._waiters.append((loop, fut))
        await fut

    def listen(self) -> asyncio.Queue[dict[str, Any]]:
        """A queue of this job's events from now on (``{"event": ..., ...}``); the last is "done"."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        with self._lock:
            if self._done.is_set():
                queue.put_nowait(self.status())
            else:
                self._listeners.append((loop, queue))
        return queue

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"event": "done" if self._done.is_set() else self.state, "id": self.id}
        out |= {"state": self.state, "step": self.step, "total": self.total, "batch": self.batch}
        if self.error is not None:
            out["error"] = self.error.message
        return out

    # --- from the worker thread ----------------------------------------------------------------------------------

    def publish(self, event: dict[str, Any]) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for loop, queue in listeners:
            loop.call_soon_threadsafe(queue.put_nowait, event)

    def finish(self, state: State, error: JobError | None = None) -> None:
        self.state, self.error, self.finished = state, error, time.monotonic()
        with self._lock:
            self._done.set()
            waiters, self._waiters = self._waiters, []
            listeners, self._listeners = self._listeners, []
        final = self.status()
        for loop, queue in listeners:
            loop.call_soon_threadsafe(queue.put_nowait, final)
        for loop, fut in waiters:
            loop.call_soon_threadsafe(_resolve, fut)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
