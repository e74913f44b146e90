"""The camera loop: pacing on a file's timeline, the newest-frame grabber for live sources,
JSON lines and annotated video, errors, and Ctrl-C. Runs the real CLI on tiny bundles."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")

from paligemma_edge.apps.camera import CameraOptions, run_on_sources  # noqa: E402
from paligemma_edge.apps.camera_outputs import annotate_picture  # noqa: E402
from paligemma_edge.apps.video_sources import (  # noqa: E402
    FrameGrabber, Pacer, VideoSource, file_timestamp, frame_to_picture, masked, source_kind,
)
from paligemma_edge.runtime.drawing import PALETTE  # noqa: E402
from paligemma_edge.runtime.errors import InputError  # noqa: E402
from paligemma_edge.runtime.generation.parsing import Detection  # noqa: E402

from .conftest import run_cli  # noqa: E402

RESULT_KEYS = {"prompt", "text", "token_ids", "finish_reason", "timings"}
WIDTH, HEIGHT, RATE = 64, 48, 10.0


def scene(index: int) -> np.ndarray:
    """A BGR frame: a red square moving right over a blue-green gradient."""
    frame = np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)
    frame[:, :, 0] = np.linspace(40, 200, WIDTH, dtype=np.uint8)[None, :]
    frame[:, :, 1] = 90
    x = (index * 3) % (WIDTH - 12)
    frame[18:30, x:x + 12] = (0, 0, 255)
    return frame


def write_video(path: Path, frames: int) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), RATE, (WIDTH, HEIGHT))
    assert writer.isOpened()
    for index in range(frames):
        writer.write(scene(index))
    writer.release()
    return path


def count_frames(path: Path) -> tuple[int, tuple[int, int]]:
    capture = cv2.VideoCapture(str(path))
    assert capture.isOpened(), path
    size = (int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    count = 0
    while capture.read()[0]:
        count += 1
    capture.release()
    return count, size


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("paligemma-edge: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    return write_video(tmp_path_factory.mktemp("camera") / "clip.mp4", 30)


@pytest.fixture(scope="module")
def bundle(bundles) -> Path:
    return bundles[(1, 28)]


def camera(bundle: Path, source: Path | str, *args: str):
    return run_cli("camera", str(bundle), "--source", str(source), *args)


# -- the CLI on a video file ------------------------------------------------------------------


def test_every_nth_frame_to_json_lines_and_annotated_video(bundle, video, tmp_path):
    out, annotated = tmp_path / "r.jsonl", tmp_path / "a.mp4"
    result = camera(bundle, video, "--task", "caption", "--every", "5", "--out", str(out), "--annotate", str(annotated))
    assert result.returncode == 0, result.stderr
    lines = read_lines(out)
    assert [line["frame"] for line in lines] == [0, 5, 10, 15, 20, 25]
    assert [line["timestamp"] for line in lines] == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 2.5])
    for line in lines:
        assert set(line) == {"frame", "timestamp", "wall_time", "latency_ms", "result"}
        assert set(line["result"]) == RESULT_KEYS and line["result"]["prompt"] == "caption en"
        assert line["latency_ms"] > 0 and line["wall_time"] > 1.7e9
    assert count_frames(annotated) == (6, (WIDTH, HEIGHT))
    assert "30 frames read, 6 processed, 24 skipped by pacing, 0 dropped" in result.stdout
    assert "stopped: end of source" in result.stdout and "p95" in result.stdout

    # The frame the model saw is the file's frame in RGB: `run --json` on it gives the same answer.
    capture = cv2.VideoCapture(str(video))
    ok, first = capture.read()
    capture.release()
    png = tmp_path / "frame0.png"
    frame_to_picture(first).save(png)
    single = run_cli("run", str(bundle), "--image", str(png), "--task", "caption", "--json", check=True)
    expected = json.loads(single.stdout)
    assert set(expected) == RESULT_KEYS
    assert lines[0]["result"]["token_ids"] == expected["token_ids"]


def test_fps_follows_the_files_timeline(bundle, video, tmp_path):
    out = tmp_path / "r.jsonl"
    result = camera(bundle, video, "--task", "caption", "--fps", "3", "--out", str(out), "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr
    # 10 fps file: ticks at 0, 1/3, 2/3, 1 s ... take the first frame at or after each.
    assert [line["frame"] for line in read_lines(out)] == [0, 4, 7, 10, 14, 17, 20, 24, 27]
    assert "9 processed, 21 skipped by pacing" in result.stdout


def test_max_frames_stops_early(bundle, video, tmp_path):
    out = tmp_path / "r.jsonl"
    result = camera(bundle, video, "--task", "ocr", "--max-frames", "3", "--out", str(out), "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr
    assert [line["frame"] for line in read_lines(out)] == [0, 1, 2]
    assert "3 frames read, 3 processed" in result.stdout and "stopped: max frames" in result.stdout


def test_detect_results_carry_detections(bundle, video, tmp_path):
    out, annotated = tmp_path / "d.jsonl", tmp_path / "d.avi"
    result = camera(bundle, video, "--task", "detect", "--objects", "square ; gradient", "--every", "10",
                    "--out", str(out), "--annotate", str(annotated))
    assert result.returncode == 0, result.stderr
    lines = read_lines(out)
    assert [line["frame"] for line in lines] == [0, 10, 20]
    for line in lines:
        assert set(line["result"]) == RESULT_KEYS | {"detections"}
        assert line["result"]["prompt"] == "detect square ; gradient"
        assert all(set(d) == {"label", "box"} for d in line["result"]["detections"])
    assert count_frames(annotated)[0] == 3


def test_segment_results_carry_segmentations(segment_bundle, video, tmp_path):
    out = tmp_path / "s.jsonl"
    result = camera(segment_bundle, video, "--task", "segment", "--objects", "square", "--max-frames", "2",
                    "--out", str(out), "--annotate", str(tmp_path / "s.mp4"))
    assert result.returncode == 0, result.stderr
    assert [set(line["result"]) for line in read_lines(out)] == [RESULT_KEYS | {"segmentations"}] * 2


# -- errors -----------------------------------------------------------------------------------


def test_unopenable_sources_are_one_line_errors(bundle, tmp_path):
    missing = tmp_path / "missing.mp4"
    assert_one_line_error(camera(bundle, missing, "--task", "caption"), str(missing), "no such video file")
    damaged = tmp_path / "damaged.mp4"
    damaged.write_bytes(b"not a video at all")
    assert_one_line_error(camera(bundle, damaged, "--task", "caption"), str(damaged), "cannot read it as a video")
    assert_one_line_error(camera(bundle, "/dev/video99", "--task", "caption"), "camera /dev/video99", "cannot open")


@pytest.mark.skipif(cv2.videoio_registry.hasBackend(cv2.CAP_GSTREAMER), reason="this OpenCV has GStreamer")
def test_pipeline_without_gstreamer_says_so(bundle):
    assert_one_line_error(camera(bundle, "videotestsrc ! appsink", "--task", "caption"), "built without GStreamer")


def test_bad_options_fail_before_loading(bundle, video, tmp_path):
    assert_one_line_error(camera(bundle, video, "--task", "caption", "--every", "2", "--fps", "1"),
                          "--every or --fps, not both")
    assert_one_line_error(camera(bundle, video, "--task", "caption", "--annotate", str(tmp_path / "a.gif")),
                          "unknown video extension '.gif'")
    assert_one_line_error(camera(bundle, video, "--task", "caption", "--out", str(tmp_path / "no" / "r.jsonl")),
                          "no such directory")
    # A source that does not open fails before the model loads; segment without a mask decoder
    # fails before the first frame.
    assert_one_line_error(camera(bundle, tmp_path / "missing.mp4", "--task", "caption"), "no such video file")
    assert_one_line_error(camera(bundle, video, "--task", "segment", "--objects", "square"), "no mask decoder")


def test_camera_options_are_checked():
    with pytest.raises(InputError, match="--fps must be a positive number"):
        CameraOptions(sources=("0",), prompt="caption en", fps=0.0)
    with pytest.raises(InputError, match="--every must be at least 1"):
        CameraOptions(sources=("0",), prompt="caption en", every=0)
    with pytest.raises(InputError, match="same file"):
        CameraOptions(sources=("0",), prompt="caption en", out="x.mp4", annotate="x.mp4")


# -- Ctrl-C -----------------------------------------------------------------------------------


def interrupt_camera(args: list[str], out: Path) -> tuple[int, str, str]:
    """Run ``camera ARGS`` until ``out`` has two JSON lines, then Ctrl-C it: (exit code, stdout, stderr)."""
    process = subprocess.Popen([sys.executable, "-m", "paligemma_edge", "camera", *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (out.exists() and out.read_text().count("\n") >= 2):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no JSON line in 300 s"
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    return process.returncode, stdout, stderr


def test_ctrl_c_stops_cleanly(bundle, tmp_path):
    long_video = write_video(tmp_path / "long.mp4", 3000)
    out, annotated = tmp_path / "r.jsonl", tmp_path / "a.mp4"
    code, stdout, stderr = interrupt_camera(
        [str(bundle), "--source", str(long_video), "--task", "caption", "--max-new-tokens", "4", "--out", str(out),
         "--annotate", str(annotated)], out)
    assert code == 0, stderr
    assert "stopped: interrupted (Ctrl-C)" in stdout, stdout
    lines = read_lines(out)
    processed = len(lines)
    assert 2 <= processed < 3000
    assert [line["frame"] for line in lines] == list(range(processed))
    assert f", {processed} processed" in stdout
    assert count_frames(annotated) == (processed, (WIDTH, HEIGHT))


# -- library: pacing, the grabber, a live source --------------------------------------------


def test_pacer():
    every = Pacer(every=4)
    assert [i for i in range(12) if every.due(i, i / 10)] == [0, 4, 8]
    live_every = Pacer(every=3)  # live: indices with gaps (frames dropped while busy)
    assert [i for i in [0, 2, 5, 6, 7, 11] if live_every.due(i, 0.0)] == [0, 5, 11]
    fps = Pacer(fps=3)
    assert [i for i in range(30) if fps.due(i, file_timestamp(i, i * 100.00000000000001, 10.0))] == \
        [0, 4, 7, 10, 14, 17, 20, 24, 27]
    fps = Pacer(fps=2)  # timeline starting late, irregular, with a long stall
    stamps = [5.0, 5.2, 5.49, 5.51, 6.0, 6.1, 9.3, 9.4, 9.6]
    assert [t for t in stamps if fps.due(0, t)] == [5.0, 5.51, 6.0, 9.3, 9.6]
    assert [i for i in range(5) if Pacer().due(i, 0.0)] == [0, 1, 2, 3, 4]


def test_file_timestamp_falls_back_to_index_over_fps():
    assert file_timestamp(0, 0.0, 25.0) == 0.0
    assert file_timestamp(3, 120.0, 25.0) == 0.12
    assert file_timestamp(3, 0.0, 25.0) == 0.12  # backend without positions
    assert file_timestamp(3, float("nan"), None) == 0.0


class PacedFrames:
    """A live-like source: ``count`` frames, one per ``period`` seconds, each filled with its index."""

    def __init__(self, count: int, period: float):
        self.count, self.period = count, period
        self.produced = 0
        self.released = False

    def read(self):
        if self.produced == self.count:
            return False, None
        time.sleep(self.period)
        frame = np.full((HEIGHT, WIDTH, 3), self.produced % 256, dtype=np.uint8)
        self.produced += 1
        return True, frame

    def release(self):
        self.released = True


def wait_for(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_grabber_keeps_only_the_newest_frame():
    source = PacedFrames(200, 0.002)
    grabber = FrameGrabber(source).start()
    taken = []
    while (frame := grabber.take(timeout=5)) is not None:
        assert frame.image[0, 0, 0] == frame.index % 256
        taken.append(frame.index)
        time.sleep(0.03)  # a slow model: ~15 frames arrive meanwhile
    assert grabber.ended and grabber.stop()
    assert grabber.frames_read == 200 and grabber.frames_taken == len(taken)
    assert taken == sorted(set(taken)) and taken[-1] == 199  # in order, and the last frame is seen
    assert len(taken) < 50  # most frames were replaced while the consumer slept
    assert max(b - a for a, b in zip(taken, taken[1:])) > 5


def test_grabber_hands_out_the_newest_after_a_burst():
    grabber = FrameGrabber(PacedFrames(20, 0.0)).start()
    wait_for(lambda: grabber.frames_read == 20)
    frame = grabber.take(timeout=5)  # frames 0..18 were replaced before anyone looked
    assert frame is not None and frame.index == 19 and grabber.take(timeout=5) is None and grabber.ended
    assert grabber.frames_taken == 1 and grabber.stop()


def test_grabber_reports_a_failing_source():
    class Failing(PacedFrames):
        def read(self):
            if self.produced == 3:
                raise RuntimeError("camera unplugged\nmore detail")
            return super().read()

    grabber = FrameGrabber(Failing(10, 0.0)).start()
    wait_for(lambda: grabber.error is not None)
    last = grabber.take(timeout=5)
    assert grabber.error == "camera unplugged" and last is not None and last.index == 2
    assert grabber.take(timeout=5) is None and grabber.ended and grabber.frames_read == 3


def test_live_source_drops_frames_while_the_model_is_busy(bundle, tmp_path):
    from paligemma_edge import load

    source = PacedFrames(150, 0.002)
    options = CameraOptions(sources=("fake",), prompt="caption en", out=str(tmp_path / "live.jsonl"),
                            annotate=str(tmp_path / "live.mp4"))
    with load(bundle) as model:
        run = run_on_sources(model, [VideoSource(source, "fake", live=True, fps=None)], options)
    (summary,) = run.summaries
    assert run.text() == summary.text()  # one source: the summary as it always was
    lines = read_lines(tmp_path / "live.jsonl")
    frames = [line["frame"] for line in lines]
    assert summary.frames_read == 150 and summary.processed == len(lines) >= 2
    assert summary.dropped > 0 and summary.skipped == 0
    assert summary.processed + summary.dropped == 150
    assert frames == sorted(set(frames)) and frames[-1] == 149
    assert [line["timestamp"] for line in lines] == sorted(line["timestamp"] for line in lines)
    assert source.released and not summary.interrupted and summary.stopped == "end of source"
    assert count_frames(tmp_path / "live.mp4")[0] == summary.processed
    assert "150 frames read" in summary.text() and f"{summary.dropped} dropped" in summary.text()


# -- small pieces -----------------------------------------------------------------------------


def test_sources_are_classified_and_passwords_masked():
    assert source_kind("0") == source_kind("/dev/video1") == "camera"
    assert source_kind("rtsp://cam.local:554/stream1") == "stream"
    assert source_kind("nvarguscamerasrc ! nvvidconv ! appsink drop=1") == "gstreamer"
    assert source_kind("clips/street 0.mp4") == "file"
    assert masked("rtsp://admin:hunter2@10.0.0.5:554/s") == "rtsp://admin:***@10.0.0.5:554/s"
    assert masked("clip.mp4") == "clip.mp4"


def test_frames_become_rgb_pictures():
    bgr = np.zeros((2, 3, 3), dtype=np.uint8)
    bgr[..., 0] = 255  # blue in OpenCV's order
    assert frame_to_picture(bgr).getpixel((0, 0)) == (0, 0, 255)
    assert frame_to_picture(np.dstack([bgr, np.full((2, 3), 7, np.uint8)])).getpixel((1, 1)) == (0, 0, 255)
    assert frame_to_picture(np.full((2, 3), 9, np.uint8)).getpixel((2, 1)) == (9, 9, 9)


def test_annotation_draws_boxes_and_the_answer():
    picture = frame_to_picture(np.full((120, 160, 3), 128, np.uint8))
    drawn = annotate_picture(picture, [Detection("cat", (40.0, 60.0, 120.0, 110.0))], "#0 12 ms: 1 object(s): cat")
    assert drawn.size == picture.size
    assert drawn.getpixel((80, 110)) == PALETTE[0]  # the box's bottom edge
    band = drawn.getpixel((158, 0))
    assert isinstance(band, tuple) and sum(band) < 3 * 128  # the dark band behind the caption
    assert drawn.getpixel((150, 100)) == (128, 128, 128)  # untouched elsewhere
