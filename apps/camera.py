"""The camera loop: frames of one or several sources (cameras, video files, RTSP streams,
GStreamer pipelines) in, one model call per round on the frames of all sources, each source's
results and annotated video out.

    paligemma-edge camera BUNDLE --source 0 --task caption --fps 1 --out captions.jsonl
    paligemma-edge camera BUNDLE --source clip.mp4 --task detect --objects "person ; car" \\
        --every 5 --out boxes.jsonl --annotate boxes.mp4
    paligemma-edge camera BUNDLE --source front.mp4 --source rtsp://10.0.0.5/s1 --task caption \\
        --fps 2 --out "r-{name}.jsonl" --annotate "a-{index}.mp4"

What a source is, how its frames are read (newest frame from a grabber thread for live sources,
the file's own timeline for files) and which frames are due (``every`` / ``fps``, one
:class:`~.video_sources.Pacer` per source) is :mod:`.video_sources`; what each source writes (the
JSON lines, the annotated video, the ``{index}`` / ``{name}`` path templates) is
:mod:`.camera_outputs`; what a run reports is :mod:`.camera_summary`. This module is the loop.

What is decided here:
- Each round takes the due frame of every source that has one: a live source's newest frame if
  it is new and due (none yet: it sits the round out), a file's next due frame on its timeline.
  Those frames run as one batch, ``model.generate_batch(pictures, [prompt] * n)``, in chunks of
  at most ``max_batch`` frames (the smaller of the option and the backend's ``max_batch``, which
  TensorRT engines have). With one prompt for all, rows have the same length: no padding, and
  greedy decoding gives each frame the tokens it gets alone. When no source has a frame, the
  loop sleeps until a live source's grabber has one.
- A source drops out when it ends (end of file, a live source that stopped or failed: its
  error is its ``stopped``) or when it has processed ``max_frames`` frames (counted per
  source); the run ends when every source has. Each source's files are closed when it drops out.
- Ctrl-C stops all sources at once: the loop closes every file (the videos stay playable) and
  returns the summaries with ``interrupted=True``. A frame's JSON line and video frame are
  written with Ctrl-C held, so they are written together or not at all.
- With one source the outputs are exactly what they were before batching: the same JSON lines,
  summary and messages.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Callable, Iterator, Sequence

from PIL import Image

from ..runtime.errors import InputError
from ..runtime.generation.sampling import GenerationOptions
from .camera_outputs import (
    AnnotatedVideo, annotate_picture, annotation_rate, check_output_paths, frame_caption, open_results, output_path,
    result_line,
)
from .camera_summary import CameraRun, CameraSummary
from .video_sources import Frame, Pacer, VideoSource, frame_to_picture, open_reader, open_sources

if TYPE_CHECKING:
    from ..runtime.model import PaliGemma, TaskResult

PROGRESS_EVERY = 50  # processed frames of a source between its progress lines
_IDLE_WAIT_S = 0.5  # longest sleep of a round without frames: keeps Ctrl-C responsive


@dataclass(frozen=True)
class CameraOptions:
    """What ``camera`` runs. Values and output paths are checked here, before any model or source work.

    ``out`` and ``annotate`` are path templates (see :mod:`.camera_outputs`); :meth:`out_path` and
    :meth:`annotate_path` give a source's file. ``max_batch`` caps the frames in one model call
    (None: all due frames, up to the backend's own limit)."""

    sources: tuple[str, ...]
    prompt: str
    every: int | None = None
    fps: float | None = None
    out: str | None = None
    annotate: str | None = None
    max_frames: int | None = None  # per source
    max_batch: int | None = None
    generation: GenerationOptions = field(default_factory=GenerationOptions)

    def __post_init__(self) -> None:
        if isinstance(self.sources, str) or not isinstance(self.sources, (tuple, list)):
            raise InputError(f"sources must be a tuple of --source strings, got {self.sources!r}")
        object.__setattr__(self, "sources", tuple(self.sources))
        if not self.sources or any(not isinstance(s, str) or not s.strip() for s in self.sources):
            raise InputError("give a --source: a camera index, /dev/videoN, a video file, a URL or a GStreamer pipeline")
        if self.every is not None and (not isinstance(self.every, int) or self.every < 1):
            raise InputError(f"--every must be at least 1, got {self.every}")
        if self.fps is not None and not (isinstance(self.fps, (int, float)) and math.isfinite(self.fps) and self.fps > 0):
            raise InputError(f"--fps must be a positive number, got {self.fps}")
        if self.every is not None and self.fps is not None:
            raise InputError("give --every or --fps, not both")
        if self.max_frames is not None and (not isinstance(self.max_frames, int) or self.max_frames < 1):
            raise InputError(f"--max-frames must be at least 1, got {self.max_frames}")
        if self.max_batch is not None and (not isinstance(self.max_batch, int) or self.max_batch < 1):
            raise InputError(f"--max-batch must be at least 1, got {self.max_batch}")
        check_output_paths(self.sources, self.out, self.annotate)

    def out_path(self, index: int) -> str | None:
        """Where source ``index`` writes its JSON lines (None: nowhere)."""
        return output_path(self.out, index, self.sources[index])

    def annotate_path(self, index: int) -> str | None:
        """Where source ``index`` writes its annotated video (None: nowhere)."""
        return output_path(self.annotate, index, self.sources[index])


@contextmanager
def _interrupts_held() -> Iterator[None]:
    """Hold Ctrl-C until the block ends, so a frame's JSON line and video frame are written together."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, _frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught and callable(previous):
            previous(signal.SIGINT, None)
        elif caught and previous == signal.SIG_DFL:
            raise KeyboardInterrupt


# -- the loop ---------------------------------------------------------------------------------


def run_camera(model: PaliGemma, options: CameraOptions, progress: Callable[[str], None] | None = None) -> CameraRun:
    """Open every source of ``options`` and run ``options.prompt`` on their frames with a loaded model."""
    model.check_can_parse([options.prompt])  # segment without a mask decoder fails before any frame
    return run_on_sources(model, open_sources(options.sources), options, progress)


def batch_limit(model: PaliGemma, options: CameraOptions) -> int | None:
    """Most frames in one model call: the option's and the backend's (TensorRT engines') limits."""
    limits = [n for n in (options.max_batch, model.backend.max_batch) if n]
    return min(limits) if limits else None


def run_on_sources(model: PaliGemma, sources: Sequence[VideoSource], options: CameraOptions,
                   progress: Callable[[str], None] | None = None) -> CameraRun:
    """The loop over opened sources, one per ``options.sources`` (all released at the end): take
    the due frames, generate them as a batch, write, summarize."""
    if len(sources) != len(options.sources):
        raise ValueError(f"got {len(sources)} opened sources for {len(options.sources)} in the options")
    say = progress or (lambda _message: None)
    wake = threading.Event()
    lanes: list[_Lane] = []
    started = time.monotonic()
    batches, interrupted = 0, False
    try:
        model.check_can_parse([options.prompt])
        limit = batch_limit(model, options)
        for index, source in enumerate(sources):
            lanes.append(_Lane(index, source, options, wake, say, started))
        for lane in lanes:
            say(lane.heading())
        active = list(lanes)
        while active:
            wake.clear()  # before polling: a frame arriving after the poll still wakes the wait below
            due = [(lane, frame) for lane in active if (frame := lane.due_frame()) is not None]
            with_frames = {id(lane) for lane, _ in due}
            for lane in active:
                if lane.reader.ended and id(lane) not in with_frames:  # its last frame, if any, runs first
                    lane.finish(f"the source failed: {lane.reader.error}" if lane.reader.error else "end of source")
            active = [lane for lane in active if lane.running]
            if not due:
                if active:
                    wake.wait(_IDLE_WAIT_S)
                continue
            for start in range(0, len(due), limit or len(due)):
                _run_batch(model, due[start:start + (limit or len(due))], options)
                batches += 1
            active = [lane for lane in active if lane.running]
    except KeyboardInterrupt:
        interrupted = True
    finally:
        with _interrupts_held():  # a second Ctrl-C waits until the videos are playable
            for lane in lanes:
                lane.close(interrupted)
            for source in sources[len(lanes):]:  # never reached the loop (an output failed to open)
                source.capture.release()
    return CameraRun(tuple(lane.summary() for lane in lanes), batches, time.monotonic() - started)


def _run_batch(model: PaliGemma, due: list[tuple[_Lane, Frame]], options: CameraOptions) -> None:
    """One model call on the due frames of several sources; each source writes its own result."""
    pictures = [frame_to_picture(frame.image) for _, frame in due]
    generations = model.generate_batch(pictures, [options.prompt] * len(due), options.generation)
    for (lane, frame), picture, generation in zip(due, pictures, generations):
        lane.record(frame, picture, model.structure(generation, *picture.size))


class _Lane:
    """One source in the loop: its reader, pacer, output files, counts and why it stopped."""

    def __init__(self, index: int, source: VideoSource, options: CameraOptions, wake: threading.Event,
                 say: Callable[[str], None], started: float):
        self.source, self.options, self._say, self._started = source, options, say, started
        self._prefix = f"{source.name}: " if len(options.sources) > 1 else ""
        self.pacer = Pacer(options.every, options.fps)
        self.out, self._annotate = options.out_path(index), options.annotate_path(index)
        self.latencies: list[float] = []
        self.skipped = 0
        self.stopped: str | None = None
        self.interrupted = False
        self.seconds = 0.0
        self._closed = False
        self.results: IO[str] | None = open_results(self.out) if self.out else None
        self.video = AnnotatedVideo(self._annotate) if self._annotate else None  # opens at its first frame
        self.reader = open_reader(source, wake)  # last: a live source's grabber thread starts here

    @property
    def running(self) -> bool:
        return self.stopped is None

    def heading(self) -> str:
        return f"camera: {self.source.description}, prompt '{self.options.prompt}'"

    def due_frame(self) -> Frame | None:
        """The next frame to run: a file reads on until one is due; a live source skips the newest if not due."""
        while (frame := self.reader.next()) is not None:
            if self.pacer.due(frame.index, frame.timestamp):
                return frame
            self.skipped += 1
        return None

    def record(self, frame: Frame, picture: Image.Image, result: TaskResult) -> None:
        latency_ms = (time.monotonic() - frame.read_at) * 1000
        line = result_line(frame, latency_ms, result)
        video = self.video
        annotated = (annotate_picture(picture, getattr(result, "objects", ()), frame_caption(frame, result, latency_ms))
                     if video else None)
        with _interrupts_held():  # a frame's JSON line and video frame are written together
            if video is not None and annotated is not None:
                video.write(annotated, annotation_rate(self.source, self.options.fps, self.options.every,
                                                       latency_ms / 1000))
            if self.results:
                self.results.write(line + "\n")
                self.results.flush()
            self.latencies.append(latency_ms)
        processed = len(self.latencies)
        if processed % PROGRESS_EVERY == 0:
            elapsed = time.monotonic() - self._started
            self._say(f"{self._prefix}processed {processed} frames ({self.reader.frames_read} read), "
                      f"{processed / elapsed:.2f}/s, last {latency_ms:.0f} ms")
        if self.options.max_frames and processed >= self.options.max_frames:
            self.finish("max frames")

    def finish(self, stopped: str) -> None:
        """The source is done: release it and close its files now (the others go on)."""
        self.stopped = stopped
        with _interrupts_held():
            self.close(False)

    def close(self, interrupted: bool) -> None:
        if self._closed:
            return
        self._closed = True
        if self.stopped is None:
            self.stopped = "interrupted" if interrupted else "end of source"
            self.interrupted = interrupted
        self.seconds = time.monotonic() - self._started
        self.reader.close()
        if self.video:
            self.video.close()
        if self.results:
            self.results.close()

    def summary(self) -> CameraSummary:
        frames_read, processed = self.reader.frames_read, len(self.latencies)
        return CameraSummary(
            source=self.source.name, live=self.source.live, frames_read=frames_read, processed=processed,
            skipped=self.skipped, dropped=frames_read - processed - self.skipped, latencies_ms=tuple(self.latencies),
            seconds=self.seconds, out=self.out, annotate=self._annotate if self.video and self.video.frames else None,
            stopped=self.stopped or "end of source", interrupted=self.interrupted,
        )
