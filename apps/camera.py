"""Run one task on frames from one or several sources (cameras, video files, RTSP streams,
GStreamer pipelines), the frames of all sources batched into one model call.

    paligemma-edge camera BUNDLE --source 0 --task caption --fps 1 --out captions.jsonl
    paligemma-edge camera BUNDLE --source clip.mp4 --task detect --objects "person ; car" \\
        --every 5 --out boxes.jsonl --annotate boxes.mp4
    paligemma-edge camera BUNDLE --source front.mp4 --source rtsp://10.0.0.5/s1 --task caption \\
        --fps 2 --out "r-{name}.jsonl" --annotate "a-{index}.mp4"

What a source is, how its frames are read (newest frame from a grabber thread for live sources,
the file's own timeline for files) and which frames are due (``every`` / ``fps``, one
:class:`~.video_sources.Pacer` per source) is :mod:`.video_sources`; this module is the loop.

The loop (decided here)
- Each round takes the due frame of every source that has one: a live source's newest frame if
  it is new and due (none yet: it sits the round out), a file's next due frame on its timeline.
  Those frames run as one batch, ``model.generate_batch(pictures, [prompt] * n)``, in chunks of
  at most ``max_batch`` frames (the smaller of the option and the backend's ``max_batch``, which
  TensorRT engines have). With one prompt for all, rows have the same length: no padding, and
  greedy decoding gives each frame the tokens it gets alone. When no source has a frame, the
  loop sleeps until a live source's grabber has one.
- A source drops out when it ends (end of file, a live source that stopped or failed: its
  error is its ``stopped``) or when it has processed ``max_frames`` frames (counted per
  source); the run ends when every source has. Ctrl-C stops all sources at once.
- With one source the outputs are exactly what they were before batching: the same JSON lines,
  summary and messages.

Outputs: ``out`` gets one JSON line per processed frame, flushed as written (a killed run leaves
valid lines): ``frame`` (index in the source; for live sources, frames read so far), ``timestamp``
(seconds on the source's timeline; live: since the first frame), ``wall_time`` (Unix seconds when
the result was ready), ``latency_ms`` (frame read -> result, so for live sources it includes the
frame's wait for the model, and in a batch the wait for the batch) and ``result`` (what
``run --json`` prints; its ``timings`` are the batch's). Lines name no source: each source has
its own file, and a line reads the same whether its source ran alone or with others.
``annotate`` gets a video of the processed frames with the answer, boxes and masks drawn (mp4v
for .mp4/.m4v/.mov/.mkv, MJPG for .avi), at ``fps``, else the file's rate / ``every``, else (live)
the first frame's processing rate. Ctrl-C stops the loop, closes every file (the videos stay
playable) and returns the summaries with ``interrupted=True``.

Output paths with several sources: ``out`` and ``annotate`` must each hold ``{index}`` (the
source's position among the ``--source`` options, from 0) or ``{name}`` (a file-name-safe word
for it: a file's stem, ``video0``, a URL's host and path, ``pipeline``; see
:func:`~.video_sources.short_name`), replaced per source; a path without either, or two sources
or outputs landing on one file, is refused in one line before any source opens or model loads.
With one source the placeholders are replaced too (index 0), and a path without them is used as
given. Only these two words are replaced; other braces stay as written.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..runtime.drawing import draw_results
from ..runtime.errors import InputError
from ..runtime.generation.sampling import GenerationOptions
from .video_sources import (  # noqa: F401  (frame_to_picture, FrameGrabber, ... are this app's API too)
    Capture, Frame, FrameGrabber, Pacer, VideoSource, file_timestamp, frame_to_picture, masked, open_reader,
    open_source, open_sources, opencv, short_name, source_kind,
)

VIDEO_CODECS = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".mkv": "mp4v", ".avi": "MJPG"}
PROGRESS_EVERY = 50  # processed frames of a source between its progress lines
PLACEHOLDERS = ("{index}", "{name}")
_IDLE_WAIT_S = 0.5  # longest sleep of a round without frames: keeps Ctrl-C responsive


@dataclass(frozen=True)
class CameraOptions:
    """What ``camera`` runs. Values and output paths are checked here, before any model or source work.

    ``out`` and ``annotate`` are path templates (see the module docstring); :meth:`out_path` and
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

    def __post_init__(self):
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
        self._check_outputs()

    def out_path(self, index: int) -> str | None:
        """Where source ``index`` writes its JSON lines (None: nowhere)."""
        return _expand(self.out, index, self.sources[index])

    def annotate_path(self, index: int) -> str | None:
        """Where source ``index`` writes its annotated video (None: nowhere)."""
        return _expand(self.annotate, index, self.sources[index])

    def _check_outputs(self) -> None:
        several = len(self.sources) > 1
        for flag, template in (("--out", self.out), ("--annotate", self.annotate)):
            if template and several and not any(p in template for p in PLACEHOLDERS):
                raise InputError(f"{flag} {template}: with {len(self.sources)} sources it needs {{index}} or {{name}} "
                                 "in the path, for one file per source (e.g. r-{name}.jsonl)")
        owners: dict[Path, tuple[str, int]] = {}
        for index in range(len(self.sources)):
            out, annotate = self.out_path(index), self.annotate_path(index)
            if out:
                _check_writable(out, "the results")
            if annotate:
                _check_writable(annotate, "the annotated video")
                suffix = Path(annotate).suffix.lower()
                if suffix not in VIDEO_CODECS:
                    raise InputError(f"{annotate}: cannot write the annotated video (unknown video extension "
                                     f"'{suffix}'; use one of {', '.join(sorted(VIDEO_CODECS))})")
            for flag, path in (("--out", out), ("--annotate", annotate)):
                if not path:
                    continue
                key = Path(path).resolve()
                if key in owners:
                    other_flag, other = owners[key]
                    if not several:
                        raise InputError("--out and --annotate name the same file")
                    raise InputError(f"{path}: {other_flag} of source {other} and {flag} of source {index} name "
                                     "the same file (use {index} in the path)")
                owners[key] = (flag, index)


def _expand(template: str | None, index: int, source: str) -> str | None:
    if not template:
        return None
    return template.replace("{index}", str(index)).replace("{name}", short_name(source))


def _check_writable(path: str, what: str) -> None:
    target = Path(path)
    if target.is_dir():
        raise InputError(f"{path}: cannot write {what} (it is a directory)")
    if not target.parent.is_dir():
        raise InputError(f"{path}: cannot write {what} (no such directory {target.parent})")
    if not os.access(target.parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise InputError(f"{path}: cannot write {what} (permission denied)")


@dataclass(frozen=True)
class CameraSummary:
    """What one source did in a camera run. ``dropped`` = read - processed - skipped: frames
    replaced by a newer one while the model was busy (live sources), or in flight when the run stopped."""

    source: str
    live: bool
    frames_read: int
    processed: int
    skipped: int
    dropped: int
    latencies_ms: tuple[float, ...]
    seconds: float  # from the start of the run to this source's end
    out: str | None
    annotate: str | None  # None when no annotated video was written (not asked, or no frame processed)
    stopped: str  # why the source ended: "end of source", "max frames", "interrupted", or the source's error
    interrupted: bool = False

    def latency_ms(self, percentile: float) -> float:
        return float(np.percentile(self.latencies_ms, percentile)) if self.latencies_ms else math.nan

    @property
    def mean_latency_ms(self) -> float:
        return float(np.mean(self.latencies_ms)) if self.latencies_ms else math.nan

    @property
    def rate(self) -> float:
        """Processed frames per second of the run."""
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    def text(self) -> str:
        kind = "live" if self.live else "file"
        lines = [f"{self.source} ({kind}): {self.frames_read} frames read, {self.processed} processed, "
                 f"{self.skipped} skipped by pacing, {self.dropped} dropped"]
        if self.latencies_ms:
            lines.append(f"latency: mean {self.mean_latency_ms:.1f} ms, p50 {self.latency_ms(50):.1f} ms, "
                         f"p95 {self.latency_ms(95):.1f} ms; {self.rate:.2f} frames/s processed over {self.seconds:.1f} s")
        outputs = [f"results {self.out}"] if self.out else []
        outputs += [f"annotated video {self.annotate}"] if self.annotate else []
        if outputs:
            lines.append("wrote " + ", ".join(outputs))
        lines.append("stopped: interrupted (Ctrl-C)" if self.interrupted else f"stopped: {self.stopped}")
        return "\n".join(lines)


@dataclass(frozen=True)
class CameraRun:
    """A camera run: one summary per source, in ``--source`` order, and the batches it ran."""

    summaries: tuple[CameraSummary, ...]
    batches: int  # model calls (generate_batch)
    seconds: float

    @property
    def interrupted(self) -> bool:
        return any(s.interrupted for s in self.summaries)

    @property
    def processed(self) -> int:
        return sum(s.processed for s in self.summaries)

    def text(self) -> str:
        """Each source's summary; with several, a last line on the batches."""
        if len(self.summaries) == 1:
            return self.summaries[0].text()
        mean = self.processed / self.batches if self.batches else 0.0
        return "\n\n".join(s.text() for s in self.summaries) + (
            f"\n\n{len(self.summaries)} sources: {self.processed} frames in {self.batches} batches "
            f"({mean:.2f} frames per batch), {self.processed / self.seconds if self.seconds > 0 else 0.0:.2f} "
            f"frames/s over {self.seconds:.1f} s")


# -- drawing and writing ----------------------------------------------------------------------


def annotate_picture(picture: Image.Image, objects: Sequence, caption: str) -> Image.Image:
    """The frame with masks, boxes and labels drawn, and the caption on a dark band at the top."""
    canvas = draw_results(picture, objects)
    draw = ImageDraw.Draw(canvas)
    font = _font(max(10, canvas.height // 30))
    lines = _wrap(caption, draw, font, canvas.width - 6)[: max(1, canvas.height // (3 * _line_height(font)))]
    if lines:
        height = len(lines) * _line_height(font) + 4
        band = Image.new("RGB", (canvas.width, height), (0, 0, 0))
        canvas.paste(Image.blend(canvas.crop((0, 0, canvas.width, height)), band, 0.6), (0, 0))
        for row, line in enumerate(lines):
            draw.text((3, 2 + row * _line_height(font)), line, fill=(255, 255, 255), font=font)
    return canvas


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # pillow < 10.1: one fixed-size bitmap font
        return ImageFont.load_default()


def _line_height(font) -> int:
    left, top, right, bottom = font.getbbox("Ag")
    return bottom - top + 2


def _wrap(text: str, draw: ImageDraw.ImageDraw, font, width: int) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def _caption(frame: Frame, result, latency_ms: float) -> str:
    objects = getattr(result, "objects", None)
    if objects is None:
        answer = result.text
    else:
        answer = f"{len(objects)} object(s)" + (": " + ", ".join(o.label or "?" for o in objects) if objects else "")
    return f"#{frame.index} {latency_ms:.0f} ms: {answer}"


class _AnnotatedVideo:
    """A VideoWriter opened at the first frame (its size is the frames')."""

    def __init__(self, path: str):
        self.path = path
        self.frames = 0
        self._writer = None
        self._size: tuple[int, int] | None = None

    def write(self, picture: Image.Image, rate: float) -> None:
        cv2 = opencv()
        if self._writer is None:
            fourcc = VIDEO_CODECS[Path(self.path).suffix.lower()]
            self._size = picture.size
            self._writer = cv2.VideoWriter(self.path, cv2.VideoWriter_fourcc(*fourcc), rate, self._size)
            if not self._writer.isOpened():
                self._writer = None
                raise InputError(f"{self.path}: cannot write the annotated video (OpenCV has no '{fourcc}' writer here)")
        if picture.size != self._size:  # a live source that changed resolution
            picture = picture.resize(self._size)
        self._writer.write(np.ascontiguousarray(np.asarray(picture)[:, :, ::-1]))
        self.frames += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()


def _annotation_rate(options: CameraOptions, source: VideoSource, first_latency_s: float) -> float:
    if options.fps:
        return float(options.fps)
    if source.fps and (options.every or not source.live):
        return source.fps / (options.every or 1)
    if source.live:  # as fast as the model goes: its first frame is the best guess before the run
        return min(source.fps or 30.0, max(1.0, 1.0 / max(first_latency_s, 1e-3)))
    return 10.0


@contextmanager
def _interrupts_held():
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


def run_camera(model, options: CameraOptions, progress: Callable[[str], None] | None = None) -> CameraRun:
    """Open every source of ``options`` and run ``options.prompt`` on their frames with a loaded model."""
    model.check_can_parse([options.prompt])  # segment without a mask decoder fails before any frame
    return run_on_sources(model, open_sources(options.sources), options, progress)


def batch_limit(model, options: CameraOptions) -> int | None:
    """Most frames in one model call: the option's and the backend's (TensorRT engines') limits."""
    limits = [n for n in (options.max_batch, getattr(model.backend, "max_batch", None)) if n]
    return min(limits) if limits else None


def run_on_sources(model, sources: Sequence[VideoSource], options: CameraOptions,
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


def _run_batch(model, due: list[tuple["_Lane", Frame]], options: CameraOptions) -> None:
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
        self.results = _open_results(self.out) if self.out else None
        self.video = _AnnotatedVideo(self._annotate) if self._annotate else None  # opens at its first frame
        self.reader = open_reader(source, wake)  # last: a live source's grabber thread starts here

    @property
    def running(self) -> bool:
        return self.stopped is None

    def heading(self) -> str:
        size = f", {self.source.size[0]}x{self.source.size[1]}" if self.source.size else ""
        rate = f", {self.source.fps:g} fps" if self.source.fps else ""
        return (f"camera: {self.source.name} ({'live' if self.source.live else 'file'}{size}{rate}), "
                f"prompt '{self.options.prompt}'")

    def due_frame(self) -> Frame | None:
        """The next frame to run: a file reads on until one is due; a live source skips the newest if not due."""
        while (frame := self.reader.next()) is not None:
            if self.pacer.due(frame.index, frame.timestamp):
                return frame
            self.skipped += 1
        return None

    def record(self, frame: Frame, picture: Image.Image, result) -> None:
        latency_ms = (time.monotonic() - frame.read_at) * 1000
        line = json.dumps({"frame": frame.index, "timestamp": frame.timestamp, "wall_time": round(time.time(), 6),
                           "latency_ms": round(latency_ms, 3), "result": result.to_dict()})
        video = self.video
        annotated = (annotate_picture(picture, getattr(result, "objects", ()), _caption(frame, result, latency_ms))
                     if video else None)
        with _interrupts_held():  # a frame's JSON line and video frame are written together
            if video:
                video.write(annotated, _annotation_rate(self.options, self.source, latency_ms / 1000))
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


def _open_results(path: str):
    try:
        return open(path, "w", encoding="utf-8")
    except OSError as exc:
        raise InputError(f"{path}: cannot write the results ({exc.strerror or exc})") from None
