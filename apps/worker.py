"""One thread owns the model: requests queue to it, so no two generations ever share KV state.

Dynamic batching: when the thread frees up it takes the requests waiting (at most ``max_batch``,
waiting up to ``batch_wait_ms`` for more to arrive) and runs them as one left-padded batch, each
request with its own picture and its own decoding options (per-row sampling streams, so a request's
answer is the one it gets alone: token-identical when greedy, and with the same seed when
sampled). Requests join a batch in arrival order; one whose answer could be cut short by the
batch's longer prompts (the bundle's max sequence) waits for the next batch instead.

Between tokens the worker checks every row's deadline and cancellation: a client that goes away
or runs out of time ends its own row only, and the rest of the batch keeps generating. Rows that
are done leave the backend's cache where the backend can drop rows (ONNX Runtime), so they stop
costing decode work; on TensorRT they ride along as padding until the batch ends.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

from PIL import Image

from ..runtime.model import PaliGemma
from ..runtime.generation.results import Generation, TokenChunk
from ..runtime.generation.sampling import GenerationOptions

log = logging.getLogger("paligemma_edge.serve")


class QueueFull(Exception):
    """More requests are waiting than the server accepts."""


class DeadlineExceeded(Exception):
    """The request's time ran out: ``started`` says whether it had reached the model."""

    def __init__(self, started: bool):
        super().__init__("request timed out " + ("while generating" if started else "waiting for the model"))
        self.started = started


class Cancelled(Exception):
    """The client went away."""


class WorkerClosed(Exception):
    """The server is shutting down."""


@dataclass
class Job:
    image: Image.Image  # RGB
    prompt: str  # checked by the caller: fits the bundle, and parseable (model.check_can_parse)
    options: GenerationOptions
    deadline: float  # time.monotonic() value
    on_token: Callable[[TokenChunk], object] | None = None  # what it returns is not used
    cancelled: threading.Event = field(default_factory=threading.Event)
    future: Future = field(default_factory=Future)
    prompt_len: int = 0  # prompt positions, image tokens included (set on submit)

    def failure(self, started: bool) -> Exception | None:
        if self.cancelled.is_set():
            return Cancelled()
        if time.monotonic() > self.deadline:
            return DeadlineExceeded(started)
        return None


@dataclass(frozen=True)
class BatchStats:
    """What the worker has run: batches and the requests in them."""

    batches: int = 0
    requests: int = 0
    largest: int = 0


class ModelWorker:
    def __init__(self, model: PaliGemma, max_queue: int = 32, max_batch: int = 1, batch_wait_ms: float = 0.0):
        engine_limit = model.backend.max_batch  # TensorRT engines are built for a max batch
        self.model = model
        self.max_queue = max_queue
        self.max_batch = max(1, min(max_batch, engine_limit or max_batch))
        self.batch_wait_s = max(0.0, batch_wait_ms) / 1000
        self.stats = BatchStats()
        self._waiting: deque[Job] = deque()
        self._in_flight = 0  # submitted and not finished
        self._lock = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="paligemma-model", daemon=True)
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        return self._in_flight

    def submit(self, job: Job) -> Future:
        """Queue a job; its future gives ``(result, generation)`` or raises the job's error."""
        job.prompt_len = len(self.model.tokenizer.encode(job.prompt))
        with self._lock:
            if self._closed:
                raise WorkerClosed("the server is shutting down")
            if self._in_flight >= self.max_queue:
                raise QueueFull(f"{self._in_flight} requests are already waiting")
            self._in_flight += 1
            self._waiting.append(job)
            self._lock.notify()
        return job.future

    def close(self) -> None:
        """Fail what waits, let the running batch finish, stop the thread."""
        with self._lock:
            self._closed = True
            waiting, self._waiting = list(self._waiting), deque()
            self._lock.notify()
        for job in waiting:
            self._settle(job, error=WorkerClosed("the server is shutting down"))
        self._thread.join()

    # -- the model thread ---------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if batch:
                try:
                    self._run(batch)
                except Exception:  # a bug here must not stop the thread that serves every request
                    log.exception("the model worker failed a batch")

    def _next_batch(self) -> list[Job] | None:
        """The next jobs to run together; None once closed. Expired or cancelled jobs fail here."""
        with self._lock:
            while not self._waiting and not self._closed:
                self._lock.wait()
            if self._closed:
                return None
            until = time.monotonic() + self.batch_wait_s
            while len(self._waiting) < self.max_batch and not self._closed:
                left = until - time.monotonic()
                if left <= 0:
                    break
                self._lock.wait(left)
            batch = self._take()
        ready = []
        for job in batch:
            if not job.future.set_running_or_notify_cancel():  # the caller gave up on it (asyncio cancelled it)
                job.cancelled.set()
                self._settle(job)
                continue
            error = job.failure(started=False)
            if error is None:
                ready.append(job)
            else:
                self._settle(job, error=error)
        return ready

    def _take(self) -> list[Job]:
        """Waiting jobs in arrival order, up to max_batch; a job the batch's width would cut short waits."""
        taken: list[Job] = []
        deferred: list[Job] = []
        max_seq = self.model.manifest.decoder.max_seq_len
        while self._waiting and len(taken) < self.max_batch:
            job = self._waiting.popleft()
            width = max([job.prompt_len] + [other.prompt_len for other in taken])
            fits = all(_room(other, width, max_seq) for other in (*taken, job))
            (taken if fits else deferred).append(job)
        self._waiting.extendleft(reversed(deferred))
        return taken

    def _run(self, jobs: list[Job]) -> None:
        self.stats = BatchStats(self.stats.batches + 1, self.stats.requests + len(jobs),
                                max(self.stats.largest, len(jobs)))
        failed: dict[int, Exception] = {}
        answered: set[int] = set()

        def stop() -> list[int]:
            for row, job in enumerate(jobs):
                if row not in failed and row not in answered:  # an answered client may go away: its row is done
                    error = job.failure(started=True)
                    if error is not None:
                        failed[row] = error
                        self._settle(job, error=error)
            return list(failed)

        try:
            stream = self.model.stream_batch([job.image for job in jobs], [job.prompt for job in jobs],
                                             [job.options for job in jobs], stop=stop)
            for row, item in stream:
                if row in failed:
                    continue
                job = jobs[row]
                if isinstance(item, Generation):  # this row is done: answer it now, the batch goes on
                    answered.add(row)
                    self._answer(job, item)
                elif job.on_token is not None:
                    try:
                        job.on_token(item)
                    except Exception as exc:  # the caller's callback broke: that row ends, not the batch
                        failed[row] = exc
                        self._settle(job, error=exc)
        except Exception as exc:  # the whole batch failed (a backend error): every request left says so
            for row, job in enumerate(jobs):
                if row not in failed and row not in answered:
                    self._settle(job, error=exc)

    def _answer(self, job: Job, generation: Generation) -> None:
        try:
            result = self.model.structure(generation, *job.image.size)
        except Exception as exc:
            self._settle(job, error=exc)
        else:
            self._settle(job, value=(result, generation))

    def _settle(self, job: Job, value=None, error: Exception | None = None) -> None:
        """Count the job done and give its future the answer (a cancelled future takes none)."""
        with self._lock:
            self._in_flight -= 1
        if job.future.cancelled():
            return
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(value)


def _room(job: Job, width: int, max_seq: int) -> bool:
    """Whether a batch padded to ``width`` leaves the job the tokens it would get alone."""
    alone = min(job.options.max_new_tokens, max_seq - job.prompt_len)
    return alone <= max_seq - width
