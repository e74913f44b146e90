"""What a camera run writes for each source: a JSON-lines file of results and an annotated video.

What is decided here:
- Paths. ``--out`` and ``--annotate`` are templates: ``{index}`` (the source's position among the
  ``--source`` options, from 0) and ``{name}`` (a file-name-safe word for it: a file's stem,
  ``video0``, a URL's host and path, ``pipeline``; see :func:`~.video_sources.short_name`) are
  replaced per source. With several sources each template must hold one of them; a template
  without either, or two sources or outputs landing on one file, is refused in one line before
  any source opens or model loads. With one source the placeholders are replaced too (index 0),
  and a path without them is used as given. Only these two words are replaced; other braces stay.
- Lines. One JSON line per processed frame, flushed as written (a killed run leaves valid
  lines): ``frame`` (index in the source; for live sources, frames read so far), ``timestamp``
  (seconds on the source's timeline; live: since the first frame), ``wall_time`` (Unix seconds
  when the result was ready), ``latency_ms`` (frame read -> result, so for live sources it
  includes the frame's wait for the model, and in a batch the wait for the batch) and
  ``result`` (what ``run --json`` prints; its ``timings`` are the batch's). Lines name no source:
  each source has its own file, and a line reads the same whether its source ran alone or with
  others.
- The video. The processed frames with the answer, boxes and masks drawn (mp4v for
  .mp4/.m4v/.mov/.mkv, MJPG for .avi), opened at the first frame (its size is the video's), at
  ``fps``, else the file's rate / ``every``, else (live) the first frame's processing rate.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..runtime.drawing import draw_results
from ..runtime.errors import InputError
from .video_sources import Frame, VideoSource, opencv, short_name

if TYPE_CHECKING:
    import cv2

    from ..runtime.model import TaskResult

VIDEO_CODECS = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".mkv": "mp4v", ".avi": "MJPG"}
PLACEHOLDERS = ("{index}", "{name}")

Font = ImageFont.ImageFont | ImageFont.FreeTypeFont


# -- paths ------------------------------------------------------------------------------------


def output_path(template: str | None, index: int, source: str) -> str | None:
    """Source ``index``'s file from an ``--out`` / ``--annotate`` template (None: nowhere)."""
    if not template:
        return None
    return template.replace("{index}", str(index)).replace("{name}", short_name(source))


def check_output_paths(sources: Sequence[str], out: str | None, annotate: str | None) -> None:
    """Refuse, in one line, templates that do not give every source files of its own it can write."""
    several = len(sources) > 1
    for flag, template in (("--out", out), ("--annotate", annotate)):
        if template and several and not any(p in template for p in PLACEHOLDERS):
            raise InputError(f"{flag} {template}: with {len(sources)} sources it needs {{index}} or {{name}} "
                             "in the path, for one file per source (e.g. r-{name}.jsonl)")
    owners: dict[Path, tuple[str, int]] = {}
    for index, source in enumerate(sources):
        results, video = output_path(out, index, source), output_path(annotate, index, source)
        if results:
            _check_writable(results, "the results")
        if video:
            _check_writable(video, "the annotated video")
            suffix = Path(video).suffix.lower()
            if suffix not in VIDEO_CODECS:
                raise InputError(f"{video}: cannot write the annotated video (unknown video extension "
                                 f"'{suffix}'; use one of {', '.join(sorted(VIDEO_CODECS))})")
        for flag, path in (("--out", results), ("--annotate", video)):
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


def _check_writable(path: str, what: str) -> None:
    target = Path(path)
    if target.is_dir():
        raise InputError(f"{path}: cannot write {what} (it is a directory)")
    if not target.parent.is_dir():
        raise InputError(f"{path}: cannot write {what} (no such directory {target.parent})")
    if not os.access(target.parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise InputError(f"{path}: cannot write {what} (permission denied)")


# -- the JSON lines ---------------------------------------------------------------------------


def open_results(path: str) -> IO[str]:
    """The JSON-lines file, truncated, or one line saying why it cannot be written."""
    try:
        return open(path, "w", encoding="utf-8")
    except OSError as exc:
        raise InputError(f"{path}: cannot write the results ({exc.strerror or exc})") from None


def result_line(frame: Frame, latency_ms: float, result: TaskResult) -> str:
    """A processed frame's JSON line (without the newline); ``wall_time`` is now."""
    return json.dumps({"frame": frame.index, "timestamp": frame.timestamp, "wall_time": round(time.time(), 6),
                       "latency_ms": round(latency_ms, 3), "result": result.to_dict()})


# -- the annotated video ----------------------------------------------------------------------


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


def frame_caption(frame: Frame, result: TaskResult, latency_ms: float) -> str:
    """The line drawn on an annotated frame: its index, latency and answer (or the objects found)."""
    objects = getattr(result, "objects", None)
    if objects is None:
        answer = result.text
    else:
        answer = f"{len(objects)} object(s)" + (": " + ", ".join(o.label or "?" for o in objects) if objects else "")
    return f"#{frame.index} {latency_ms:.0f} ms: {answer}"


def _font(size: int) -> Font:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # pillow < 10.1: one fixed-size bitmap font
        return ImageFont.load_default()


def _line_height(font: Font) -> int:
    left, top, right, bottom = font.getbbox("Ag")
    return int(bottom - top) + 2


def _wrap(text: str, draw: ImageDraw.ImageDraw, font: Font, width: int) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def annotation_rate(source: VideoSource, fps: float | None, every: int | None, first_latency_s: float) -> float:
    """Frames per second of a source's annotated video: ``fps``, else the file's rate / ``every``,
    else (live) the rate the model processed the first frame at."""
    if fps:
        return float(fps)
    if source.fps and (every or not source.live):
        return source.fps / (every or 1)
    if source.live:  # as fast as the model goes: its first frame is the best guess before the run
        return min(source.fps or 30.0, max(1.0, 1.0 / max(first_latency_s, 1e-3)))
    return 10.0


class AnnotatedVideo:
    """A VideoWriter opened at the first frame (its size is the frames')."""

    def __init__(self, path: str):
        self.path = path
        self.frames = 0
        self._writer: cv2.VideoWriter | None = None
        self._size: tuple[int, int] | None = None

    def write(self, picture: Image.Image, rate: float) -> None:
        cv2 = opencv()
        writer, size = self._writer, self._size
        if writer is None or size is None:
            fourcc = VIDEO_CODECS[Path(self.path).suffix.lower()]
            size = picture.size
            writer = cv2.VideoWriter(self.path, cv2.VideoWriter_fourcc(*fourcc), rate, size)
            if not writer.isOpened():
                raise InputError(f"{self.path}: cannot write the annotated video (OpenCV has no '{fourcc}' writer here)")
            self._writer, self._size = writer, size
        if picture.size != size:  # a live source that changed resolution
            picture = picture.resize(size)
        writer.write(np.ascontiguousarray(np.asarray(picture)[:, :, ::-1]))
        self.frames += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()
