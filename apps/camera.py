"""Run one task on frames from a camera, a video file, an RTSP stream or a GStreamer pipeline.

    paligemma-edge camera BUNDLE --source 0 --task caption --fps 1 --out captions.jsonl
    paligemma-edge camera BUNDLE --source clip.mp4 --task detect --objects "person ; car" \\
        --every 5 --out boxes.jsonl --annotate boxes.mp4

Sources (``--source``), opened with OpenCV (the ``apps`` extra: opencv-python-headless)
- ``0``, ``/dev/video0``: a USB (UVC) camera through V4L2.
- ``rtsp://user:pass@192.168.1.20:554/stream1`` (any ``scheme://`` URL): a network stream
  through OpenCV's FFmpeg. Passwords are masked in messages.
- A string containing ``!``: a GStreamer pipeline ending in ``appsink``, opened with
  ``cv2.CAP_GSTREAMER``. That needs an OpenCV built with GStreamer: the PyPI wheels are not,
  JetPack's ``python3-opencv`` is (use it in a venv made with ``--system-site-packages``).
  Jetson CSI camera (Argus, ISP debayering, nvvidconv out of NVMM memory)::

    nvarguscamerasrc sensor-id=0 ! video/x-raw(memory:NVMM),width=1280,height=720,framerate=30/1 !
    nvvidconv ! video/x-raw,format=BGRx ! videoconvert ! video/x-raw,format=BGR ! appsink drop=1 max-buffers=1

  USB camera: ``v4l2src device=/dev/video0 ! video/x-raw,width=640,height=480 ! videoconvert !
  video/x-raw,format=BGR ! appsink drop=1 max-buffers=1``. RTSP with the Jetson's hardware
  decoder: ``rtspsrc location=rtsp://... latency=200 ! rtph264depay ! h264parse ! nvv4l2decoder !
  nvvidconv ! video/x-raw,format=BGRx ! videoconvert ! video/x-raw,format=BGR ! appsink drop=1
  max-buffers=1``. (appsink's ``drop`` only acts once ``max-buffers`` is reached; its default,
  0, is unlimited.)
- Anything else: a video file.

Pacing (decided here)
- Live sources (cameras, URLs, pipelines) are read on a grabber thread that keeps only the
  newest frame (:class:`FrameGrabber`): the driver's and the network's buffers are drained as
  fast as frames come, the model always gets the most recent frame, and frames that arrive while
  it is busy are replaced and counted as dropped. Without ``every``/``fps`` the loop runs as fast
  as the model allows and never falls behind. ``every N`` runs on a frame at least N frames after
  the last one run; ``fps F`` on the first frame at or after each 1/F-second tick of the wall
  clock (seconds since the first frame). Frames the loop sees but that are not due are skipped.
- Video files are not real time: they are read frame by frame on the file's own timeline, so a
  run gives the same frames every time. Without pacing every frame is run; ``every N`` runs frames
  0, N, 2N...; ``fps F`` runs the first frame whose timestamp (``CAP_PROP_POS_MSEC``, or index /
  the file's fps) is at or after each 1/F-second tick since the first frame; the others are
  skipped. Use ``fps`` to sample a file the way a camera would be sampled.

Outputs: ``out`` gets one JSON line per processed frame, flushed as written (a killed run leaves
valid lines): ``frame`` (index in the source; for live sources, frames read so far), ``timestamp``
(seconds on the source's timeline; live: since the first frame), ``wall_time`` (Unix seconds when
the result was ready), ``latency_ms`` (frame read -> result, so for live sources it includes the
frame's wait for the model) and ``result`` (what ``run --json`` prints). ``annotate`` gets a video
of the processed frames with the answer, boxes and masks drawn (mp4v for .mp4/.m4v/.mov/.mkv,
MJPG for .avi), at ``fps``, else the file's rate / ``every``, else (live) the first frame's
processing rate. Ctrl-C stops the loop, closes both files (the video stays playable) and returns
the summary with ``interrupted=True``.

FFmpeg's own log lines are silenced (``OPENCV_FFMPEG_LOGLEVEL=-8`` unless already set) so a bad
source gives one clear error; set ``OPENCV_FFMPEG_LOGLEVEL=16`` to see FFmpeg's errors.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..runtime.drawing import draw_results
from ..runtime.errors import InputError, first_line
from ..runtime.images import load_image
from ..runtime.sampling import GenerationOptions

VIDEO_CODECS = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".mkv": "mp4v", ".avi": "MJPG"}
PROGRESS_EVERY = 50  # processed frames between progress lines
_EPS = 1e-6  # seconds: container timestamps are not exact multiples (0.30000000000000004)
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_CAMERA_INDEX = re.compile(r"^(?:/dev/video)?(\d+)$")


@dataclass(frozen=True)
class CameraOptions:
    """What ``camera`` runs. Values and output paths are checked here, before any model or source work."""

    source: str
    prompt: str
    every: int | None = None
    fps: float | None = None
    out: str | None = None
    annotate: str | None = None
    max_frames: int | None = None
    generation: GenerationOptions = field(default_factory=GenerationOptions)

    def __post_init__(self):
        if not isinstance(self.source, str) or not self.source.strip():
            raise InputError("give a --source: a camera index, /dev/videoN, a video file, a URL or a GStreamer pipeline")
        if self.every is not None and (not isinstance(self.every, int) or self.every < 1):
            raise InputError(f"--every must be at least 1, got {self.every}")
        if self.fps is not None and not (isinstance(self.fps, (int, float)) and math.isfinite(self.fps) and self.fps > 0):
            raise InputError(f"--fps must be a positive number, got {self.fps}")
        if self.every is not None and self.fps is not None:
            raise InputError("give --every or --fps, not both")
        if self.max_frames is not None and (not isinstance(self.max_frames, int) or self.max_frames < 1):
            raise InputError(f"--max-frames must be at least 1, got {self.max_frames}")
        if self.out:
            _check_writable(self.out, "the results")
        if self.annotate:
            _check_writable(self.annotate, "the annotated video")
            suffix = Path(self.annotate).suffix.lower()
            if suffix not in VIDEO_CODECS:
                raise InputError(f"{self.annotate}: cannot write the annotated video (unknown video extension "
                                 f"'{suffix}'; use one of {', '.join(sorted(VIDEO_CODECS))})")
        if self.out and self.annotate and Path(self.out).resolve() == Path(self.annotate).resolve():
            raise InputError("--out and --annotate name the same file")


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
    """What a camera run did. ``dropped`` = read - processed - skipped: frames replaced by a newer one
    while the model was busy (live sources), or in flight when the run stopped."""

    source: str
    live: bool
    frames_read: int
    processed: int
    skipped: int
    dropped: int
    latencies_ms: tuple[float, ...]
    seconds: float
    out: str | None
    annotate: str | None  # None when no annotated video was written (not asked, or no frame processed)
    stopped: str  # why the loop ended: "end of source", "max frames", "interrupted", or the source's error
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


# -- sources ----------------------------------------------------------------------------------


class Capture(Protocol):
    """What the loop needs of a source: cv2.VideoCapture, or anything that reads frames like it."""

    def read(self) -> tuple[bool, np.ndarray | None]: ...

    def release(self) -> None: ...


@dataclass(frozen=True)
class VideoSource:
    capture: Capture
    name: str  # for messages (URL passwords masked)
    live: bool
    fps: float | None  # the rate the source reports, if any
    size: tuple[int, int] | None = None  # width, height, if reported


@dataclass(frozen=True)
class Frame:
    index: int
    timestamp: float  # seconds: the file's timeline, or since a live source's first frame
    image: np.ndarray  # as OpenCV gives it: BGR (or gray, or BGRA)
    read_at: float  # time.monotonic() when it was read


def source_kind(source: str) -> str:
    """'camera', 'gstreamer', 'stream' (a URL) or 'file'."""
    if "!" in source:
        return "gstreamer"
    if _CAMERA_INDEX.match(source.strip()) or source.startswith("/dev/"):
        return "camera"
    if _URL.match(source):
        return "stream"
    return "file"


def masked(source: str) -> str:
    """The source with a URL's password replaced by ***."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://[^/@:]*):[^/@]*@", r"\1:***@", source)


def _cv2():
    try:
        import cv2
    except ImportError:
        raise InputError("camera needs OpenCV: pip install 'paligemma-edge[apps]' "
                         "(on a Jetson, JetPack's python3-opencv, which can open GStreamer pipelines)") from None
    return cv2


def open_source(source: str) -> VideoSource:
    """Open a --source, or raise InputError with one line naming it."""
    cv2 = _cv2()
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # FFmpeg's own lines would follow our one-line error
    kind, name = source_kind(source), masked(source)
    previous = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)  # OpenCV's warnings on a failed open
    try:
        capture, problem = _open_capture(cv2, source, kind, name)
    finally:
        cv2.utils.logging.setLogLevel(previous)
    if not capture.isOpened():
        capture.release()
        raise InputError(problem)
    fps = capture.get(cv2.CAP_PROP_FPS)
    width, height = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
    return VideoSource(capture, name, live=kind != "file", fps=fps if fps > 0 and math.isfinite(fps) else None,
                       size=(width, height) if width > 0 and height > 0 else None)


def _open_capture(cv2, source: str, kind: str, name: str):
    if kind == "gstreamer":
        if not cv2.videoio_registry.hasBackend(cv2.CAP_GSTREAMER):
            raise InputError(f"GStreamer pipeline '{name}': this OpenCV was built without GStreamer (the PyPI wheel "
                             "is; on a Jetson use JetPack's python3-opencv)")
        return cv2.VideoCapture(source, cv2.CAP_GSTREAMER), (
            f"GStreamer pipeline '{name}': cannot open it (try it with gst-launch-1.0, ending in fakesink)")
    if kind == "camera":
        index = _CAMERA_INDEX.match(source.strip())
        capture = cv2.VideoCapture(int(index.group(1))) if index else cv2.VideoCapture(source, cv2.CAP_V4L2)
        return capture, f"camera {name}: cannot open it (not connected, busy, or no such device; see ls /dev/video*)"
    if kind == "stream":
        return cv2.VideoCapture(source), f"{name}: cannot open the stream (check the URL, credentials and network)"
    if not Path(source).is_file():
        raise InputError(f"{name}: no such video file (or camera, URL, GStreamer pipeline)")
    return cv2.VideoCapture(source), f"{name}: cannot read it as a video (unsupported or damaged file)"


def file_timestamp(index: int, position_ms: float, fps: float | None) -> float:
    """A file frame's time: the container's timestamp when the backend gives one, else index / fps."""
    if math.isfinite(position_ms) and (position_ms > 0 or (index == 0 and position_ms == 0)):
        return round(position_ms / 1000, 6)
    return round(index / fps, 6) if fps else 0.0


class _FileReader:
    """A video file, frame after frame, on its own timeline."""

    def __init__(self, source: VideoSource):
        self._source = source
        self._position = _cv2().CAP_PROP_POS_MSEC
        self.frames_read = 0
        self.error: str | None = None

    def frames(self) -> Iterator[Frame]:
        while True:
            ok, image = self._source.capture.read()
            if not ok or image is None:
                return
            position = self._source.capture.get(self._position)
            frame = Frame(self.frames_read, file_timestamp(self.frames_read, position, self._source.fps), image,
                          time.monotonic())
            self.frames_read += 1
            yield frame

    def close(self) -> None:
        self._source.capture.release()


class FrameGrabber:
    """Reads a live source on its own thread, keeping only the newest frame.

    :meth:`take` hands out the newest frame not handed out before (waiting for one); frames read
    while nobody takes them are replaced, so ``frames_read - frames_taken`` were dropped. The
    thread ends when the source does (``read()`` fails or raises: see ``error``) or on :meth:`stop`.
    """

    def __init__(self, capture: Capture, clock: Callable[[], float] = time.monotonic):
        self._capture = capture
        self._clock = clock
        self._ready = threading.Condition()
        self._newest: Frame | None = None
        self._stopping = threading.Event()
        self._ended = False
        self._thread = threading.Thread(target=self._run, name="camera-grabber", daemon=True)
        self.frames_read = 0
        self.frames_taken = 0
        self.error: str | None = None

    def start(self) -> "FrameGrabber":
        self._thread.start()
        return self

    def _run(self) -> None:
        origin = None
        try:
            while not self._stopping.is_set():
                ok, image = self._capture.read()
                if not ok or image is None:
                    break
                now = self._clock()
                origin = now if origin is None else origin
                with self._ready:
                    self._newest = Frame(self.frames_read, round(now - origin, 6), image, now)
                    self.frames_read += 1
                    self._ready.notify_all()
        except Exception as exc:  # a driver or decoder failure ends the source; the loop reports it
            self.error = first_line(exc)
        finally:
            with self._ready:
                self._ended = True
                self._ready.notify_all()

    @property
    def ended(self) -> bool:
        """The source has ended and its last frame has been taken."""
        with self._ready:
            return self._ended and self._newest is None

    def take(self, timeout: float | None = None) -> Frame | None:
        """The newest frame not taken yet; None when the source has ended or ``timeout`` passed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._ready:
            while self._newest is None and not self._ended:
                left = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
                if left <= 0:
                    return None
                self._ready.wait(left)  # short waits keep Ctrl-C responsive
            frame, self._newest = self._newest, None
            if frame is not None:
                self.frames_taken += 1
            return frame

    def stop(self, timeout: float = 2.0) -> bool:
        """Ask the thread to end; True when it has (a source stuck in read() may outlive the timeout)."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()


class _LiveReader:
    def __init__(self, source: VideoSource):
        self._source = source
        self._grabber = FrameGrabber(source.capture).start()

    @property
    def frames_read(self) -> int:
        return self._grabber.frames_read

    @property
    def error(self) -> str | None:
        return self._grabber.error

    def frames(self) -> Iterator[Frame]:
        while True:
            frame = self._grabber.take(timeout=0.5)
            if frame is not None:
                yield frame
            elif self._grabber.ended:
                return

    def close(self) -> None:
        if self._grabber.stop():  # releasing a capture another thread is reading can crash the driver
            self._source.capture.release()


# -- pacing -----------------------------------------------------------------------------------


class Pacer:
    """Which frames run: all, one at least ``every`` frames after the last run, or the first at or
    after each 1/``fps``-second tick since the first frame seen."""

    def __init__(self, every: int | None = None, fps: float | None = None):
        self.every, self.fps = every, fps
        self._next_index = 0
        self._origin: float | None = None
        self._next_time = 0.0

    def due(self, index: int, timestamp: float) -> bool:
        """Whether to run this frame; a True answer counts it as run."""
        if self.every:
            if index < self._next_index:
                return False
            self._next_index = index + self.every
            return True
        if self.fps:
            self._origin = timestamp if self._origin is None else self._origin
            elapsed = timestamp - self._origin
            if elapsed < self._next_time - _EPS:
                return False
            self._next_time = (math.floor(elapsed * self.fps + _EPS) + 1) / self.fps
        return True


# -- drawing and writing ----------------------------------------------------------------------


def frame_to_picture(image: np.ndarray) -> Image.Image:
    """An OpenCV frame (BGR, BGRA or gray) as the RGB PIL image the model sees, through the runtime's
    loader. Video frames are opaque: a BGRA frame's fourth channel (0 on some capture backends) is dropped."""
    if image.ndim == 3 and image.shape[2] >= 3:
        image = image[:, :, 2::-1]  # BGR(A) -> RGB
    return load_image(image)


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
        cv2 = _cv2()
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


def run_camera(model, options: CameraOptions, progress: Callable[[str], None] | None = None) -> CameraSummary:
    """Open ``options.source`` and run ``options.prompt`` on its frames with a loaded model."""
    model.check_can_parse([options.prompt])  # segment without a mask decoder fails before any frame
    return run_on_source(model, open_source(options.source), options, progress)


def run_on_source(model, source: VideoSource, options: CameraOptions,
                  progress: Callable[[str], None] | None = None) -> CameraSummary:
    """The loop over an opened source (released at the end): pace, generate, write, summarize."""
    say = progress or (lambda _message: None)
    model.check_can_parse([options.prompt])
    reader = _LiveReader(source) if source.live else _FileReader(source)
    results = video = None
    latencies: list[float] = []
    skipped, stopped, interrupted = 0, "end of source", False
    started = time.monotonic()
    try:
        results = _open_results(options.out) if options.out else None
        video = _AnnotatedVideo(options.annotate) if options.annotate else None
        pacer = Pacer(options.every, options.fps)
        size = f", {source.size[0]}x{source.size[1]}" if source.size else ""
        rate = f", {source.fps:g} fps" if source.fps else ""
        say(f"camera: {source.name} ({'live' if source.live else 'file'}{size}{rate}), prompt '{options.prompt}'")
        for frame in reader.frames():
            if not pacer.due(frame.index, frame.timestamp):
                skipped += 1
                continue
            picture = frame_to_picture(frame.image)
            result = model.generate(picture, options.prompt, options.generation)
            latency_ms = (time.monotonic() - frame.read_at) * 1000
            line = json.dumps({"frame": frame.index, "timestamp": frame.timestamp, "wall_time": round(time.time(), 6),
                               "latency_ms": round(latency_ms, 3), "result": result.to_dict()})
            annotated = (annotate_picture(picture, getattr(result, "objects", ()), _caption(frame, result, latency_ms))
                         if video else None)
            with _interrupts_held():
                if video:
                    video.write(annotated, _annotation_rate(options, source, latency_ms / 1000))
                if results:
                    results.write(line + "\n")
                    results.flush()
                latencies.append(latency_ms)
            if len(latencies) % PROGRESS_EVERY == 0:
                elapsed = time.monotonic() - started
                say(f"processed {len(latencies)} frames ({reader.frames_read} read), "
                    f"{len(latencies) / elapsed:.2f}/s, last {latency_ms:.0f} ms")
            if options.max_frames and len(latencies) >= options.max_frames:
                stopped = "max frames"
                break
        else:
            stopped = f"the source failed: {reader.error}" if reader.error else "end of source"
    except KeyboardInterrupt:
        interrupted, stopped = True, "interrupted"
    finally:
        seconds = time.monotonic() - started
        with _interrupts_held():  # a second Ctrl-C waits until the video is playable
            reader.close()
            if video:
                video.close()
            if results:
                results.close()
    frames_read = reader.frames_read
    return CameraSummary(
        source=source.name, live=source.live, frames_read=frames_read, processed=len(latencies), skipped=skipped,
        dropped=frames_read - len(latencies) - skipped, latencies_ms=tuple(latencies), seconds=seconds,
        out=options.out, annotate=options.annotate if video and video.frames else None, stopped=stopped,
        interrupted=interrupted,
    )


def _open_results(path: str):
    try:
        return open(path, "w", encoding="utf-8")
    except OSError as exc:
        raise InputError(f"{path}: cannot write the results ({exc.strerror or exc})") from None
