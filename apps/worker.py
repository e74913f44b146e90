"""One thread owns the model: requests queue to it, so no two generations ever share KV state.

A job is a streamed generation. The worker checks the job's deadline and cancellation between
tokens, so a slow request or a client that went away frees the model after at most one step.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from ..runtime.model import PaliGemma
from ..runtime.results import Generation, TokenChunk
from ..runtime.sampling import GenerationOptions


class QueueFull(Exception):
    """More requests are waiting than the server accepts."""


class DeadlineExceeded(Exception):
    """The request's time ran out: ``started`` says whether it had reached the model."""

    def __init__(self, started: bool):
        super().__init__("request timed out " + ("while generating" if started else "waiting for the model"))
        self.started = started


class Cancelled(Exception):
    """The client went away."""


@dataclass
class Job:
    image: object  # an RGB PIL image
    prompt: str  # checked by the caller: fits the bundle, and parseable (model.check_can_parse)
    options: GenerationOptions
    deadline: float  # time.monotonic() value
    on_token: Callable[[TokenChunk], None] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)


class ModelWorker:
    def __init__(self, model: PaliGemma, max_queue: int = 32):
        self.model = model
        self.max_queue = max_queue
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="paligemma-model")
        self._lock = threading.Lock()
        self._waiting = 0

    @property
    def queue_depth(self) -> int:
        return self._waiting

    def submit(self, job: Job) -> Future:
        """Queue a job; its future gives ``(result, generation)`` or raises the job's error."""
        with self._lock:
            if self._waiting >= self.max_queue:
                raise QueueFull(f"{self._waiting} requests are already waiting")
            self._waiting += 1
        try:
            return self._executor.submit(self._run, job)
        except BaseException:
            with self._lock:
                self._waiting -= 1
            raise

    def _run(self, job: Job):
        try:
            if time.monotonic() > job.deadline:
                raise DeadlineExceeded(started=False)
            if job.cancelled.is_set():
                raise Cancelled()
            stream = self.model.stream_generation(job.image, job.prompt, job.options)
            try:
                while True:
                    chunk = next(stream)
                    if job.cancelled.is_set():
                        raise Cancelled()
                    if time.monotonic() > job.deadline:
                        raise DeadlineExceeded(started=True)
                    if job.on_token is not None:
                        job.on_token(chunk)
            except StopIteration as done:
                generation: Generation = done.value
            finally:
                stream.close()
            return self.model.structure(generation, *job.image.size), generation
        finally:
            with self._lock:
                self._waiting -= 1

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
