"""Video sources for ``camera``: opening them, reading their frames, and deciding which frames run.

Sources (a ``--source`` string), opened with OpenCV (the ``apps`` extra: opencv-python-headless)
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

Reading (decided here): every reader answers :meth:`FrameReader.next` without waiting on the
model, so one loop can serve several sources.
- Live sources (cameras, URLs, pipelines) are read on a grabber thread that keeps only the
  newest frame (:class:`FrameGrabber`): the driver's and the network's buffers are drained as
  fast as frames come, the model always gets the most recent frame, and frames that arrive while
  it is busy are replaced and counted as dropped. ``next()`` hands out the newest frame not handed
  out before, or None at once when there is none yet; the grabbers set one shared ``wake`` event
  on each frame so a loop with nothing to run sleeps until any source has something.
- Video files are not real time: ``next()`` reads the next frame on the file's own timeline, so a
  run gives the same frames every time.

Pacing (:class:`Pacer`, one per source): without ``every``/``fps`` every frame a reader hands out
runs. ``every N`` runs a frame at least N frames after the last one run (files: frames 0, N,
2N...); ``fps F`` the first frame at or after each 1/F-second tick since the first frame (live:
seconds of the wall clock since the first frame; files: ``CAP_PROP_POS_MSEC``, or index / the
file's fps). Frames seen but not due are skipped.

FFmpeg's own log lines are silenced (``OPENCV_FFMPEG_LOGLEVEL=-8`` unless already set) so a bad
source gives one clear error; set ``OPENCV_FFMPEG_LOGLEVEL=16`` to see FFmpeg's errors.
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, Sequence, runtime_checkable

import numpy as np
from PIL import Image

from ..runtime.errors import InputError, first_line
from ..runtime.images import load_image

_EPS = 1e-6  # seconds: container timestamps are not exact multiples (0.30000000000000004)
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_CAMERA_INDEX = re.compile(r"^(?:/dev/video)?(\d+)$")


class Capture(Protocol):
    """What a live source's reader needs: cv2.VideoCapture, or anything that reads frames like it."""

    def read(self) -> tuple[bool, np.ndarray | None]: ...

    def release(self) -> None: ...


@runtime_checkable
class FileCapture(Capture, Protocol):
    """What a file's reader needs besides: the position of the frame just read (``CAP_PROP_POS_MSEC``)."""

    def get(self, prop_id: int) -> float: ...


@dataclass(frozen=True)
class VideoSource:
    capture: Capture  # a FileCapture for files (live=False)
    name: str  # for messages (URL passwords masked)
    live: bool
    fps: float | None  # the rate the source reports, if any
    size: tuple[int, int] | None = None  # width, height, if reported

    @property
    def description(self) -> str:
        """The source for messages: its name, live or file, and the size and rate it reports."""
        size = f", {self.size[0]}x{self.size[1]}" if self.size else ""
        rate = f", {self.fps:g} fps" if self.fps else ""
        return f"{self.name} ({'live' if self.live else 'file'}{size}{rate})"


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


def short_name(source: str) -> str:
    """A file-name-safe word for a source (``{name}`` in output paths): a file's stem, ``video0``
    for a camera, host, port and path of a URL (no credentials), ``pipeline`` for a GStreamer pipeline."""
    kind = source_kind(source)
    if kind == "file":
        word = Path(source).stem
    elif kind == "camera":
        index = _CAMERA_INDEX.match(source.strip())
        word = f"video{index.group(1)}" if index else Path(source).name
    elif kind == "stream":
        word = re.sub(r"^[A-Za-z][A-Za-z0-9+.-]*://([^/@]*@)?", "", source)
    else:
        word = "pipeline"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", word).strip("-.") or "source"


def opencv():
    """The cv2 module, or one line saying how to install it."""
    try:
        import cv2
    except ImportError:
        raise InputError("camera needs OpenCV: pip install 'paligemma-edge[apps]' "
                         "(on a Jetson, JetPack's python3-opencv, which can open GStreamer pipelines)") from None
    return cv2


def open_source(source: str) -> VideoSource:
    """Open a --source, or raise InputError with one line naming it."""
    cv2 = opencv()
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


def open_sources(sources: Sequence[str]) -> list[VideoSource]:
    """Open every --source in order; when one fails, the ones already open are released and its error raised."""
    opened: list[VideoSource] = []
    try:
        for source in sources:
            opened.append(open_source(source))
    except BaseException:
        for video in opened:
            video.capture.release()
        raise
    return opened


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


def frame_to_picture(image: np.ndarray) -> Image.Image:
    """An OpenCV frame (BGR, BGRA or gray) as the RGB PIL image the model sees, through the runtime's
    loader. Video frames are opaque: a BGRA frame's fourth channel (0 on some capture backends) is dropped."""
    if image.ndim == 3 and image.shape[2] >= 3:
        image = image[:, :, 2::-1]  # BGR(A) -> RGB
    return load_image(image)


# -- readers ----------------------------------------------------------------------------------


class FrameReader(Protocol):
    """A source's frames as a loop over several sources takes them."""

    @property
    def frames_read(self) -> int: ...

    @property
    def error(self) -> str | None:
        """Why a live source ended early (read() raised), else None."""

    def next(self) -> Frame | None:
        """The next frame to consider, or None: the source has ended, or (live) nothing new yet."""

    @property
    def ended(self) -> bool:
        """No frame will come any more."""

    def close(self) -> None: ...


class FileReader:
    """A video file, frame after frame, on its own timeline."""

    def __init__(self, source: VideoSource):
        if not isinstance(source.capture, FileCapture):
            raise TypeError(f"{source.name}: a video file's capture must report positions (get), "
                            f"{type(source.capture).__name__} does not")
        self._source = source
        self._capture: FileCapture = source.capture
        self._position = opencv().CAP_PROP_POS_MSEC
        self.frames_read = 0
        self.error: str | None = None
        self._ended = False

    def next(self) -> Frame | None:
        if self._ended:
            return None
        ok, image = self._capture.read()
        if not ok or image is None:
            self._ended = True
            return None
        position = self._capture.get(self._position)
        frame = Frame(self.frames_read, file_timestamp(self.frames_read, position, self._source.fps), image,
                      time.monotonic())
        self.frames_read += 1
        return frame

    @property
    def ended(self) -> bool:
        return self._ended

    def close(self) -> None:
        self._capture.release()


class FrameGrabber:
    """Reads a live source on its own thread, keeping only the newest frame.

    :meth:`take` hands out the newest frame not handed out before (waiting for one up to
    ``timeout``); frames read while nobody takes them are replaced, so ``frames_read -
    frames_taken`` were dropped. The thread ends when the source does (``read()`` fails or raises:
    see ``error``) or on :meth:`stop`. ``wake``, when given, is set on every frame and at the end.
    """

    def __init__(self, capture: Capture, clock: Callable[[], float] = time.monotonic,
                 wake: threading.Event | None = None):
        self._capture = capture
        self._clock = clock
        self._wake = wake
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
                if self._wake is not None:
                    self._wake.set()
        except Exception as exc:  # a driver or decoder failure ends the source; the loop reports it
            self.error = first_line(exc)
        finally:
            with self._ready:
                self._ended = True
                self._ready.notify_all()
            if self._wake is not None:
                self._wake.set()

    @property
    def ended(self) -> bool:
        """The source has ended and its last frame has been taken."""
        with self._ready:
            return self._ended and self._newest is None

    def take(self, timeout: float | None = None) -> Frame | None:
        """The newest frame not taken yet; None when the source has ended or ``timeout`` passed (0: do not wait)."""
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


class LiveReader:
    """A live source through a :class:`FrameGrabber` started here: ``next()`` never waits."""

    def __init__(self, source: VideoSource, wake: threading.Event | None = None):
        self._source = source
        self._grabber = FrameGrabber(source.capture, wake=wake).start()

    @property
    def frames_read(self) -> int:
        return self._grabber.frames_read

    @property
    def error(self) -> str | None:
        return self._grabber.error

    def next(self) -> Frame | None:
        return self._grabber.take(timeout=0)

    @property
    def ended(self) -> bool:
        return self._grabber.ended

    def close(self) -> None:
        if self._grabber.stop():  # releasing a capture another thread is reading can crash the driver
            self._source.capture.release()


def open_reader(source: VideoSource, wake: threading.Event | None = None) -> FrameReader:
    """The reader for an opened source: a grabber thread for live ones, the file's timeline otherwise."""
    return LiveReader(source, wake) if source.live else FileReader(source)


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
