"""Several camera sources in one run: batched frames, one JSON-lines file and summary per source,
the output-path rules, and sources that fail. Runs the real loop and the real CLI on tiny bundles."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

cv2 = pytest.importorskip("cv2")

from paligemma_edge.apps.camera import CameraOptions, batch_limit, run_on_sources  # noqa: E402
from paligemma_edge.apps.video_sources import (  # noqa: E402
    FrameGrabber, VideoSource, open_source, open_sources, short_name,
)
from paligemma_edge.runtime.errors import InputError  # noqa: E402
from paligemma_edge.runtime.generation.sampling import GenerationOptions  # noqa: E402

from .conftest import run_cli  # noqa: E402
from .test_camera import (  # noqa: E402
    HEIGHT, RATE, WIDTH, PacedFrames, assert_one_line_error, count_frames, interrupt_camera, read_lines, scene,
    write_video,
)

TOKENS = GenerationOptions(max_new_tokens=6)


@pytest.fixture(scope="module")
def bundle(bundles) -> Path:
    return bundles[(1, 28)]


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> list[Path]:
    """Three 10 fps files of different lengths (30, 12, 20 frames), each starting at another scene."""
    folder = tmp_path_factory.mktemp("clips")
    paths = []
    for name, frames, shift in [("front", 30, 0), ("back", 12, 7), ("side", 20, 3)]:
        writer = cv2.VideoWriter(str(folder / f"{name}.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), RATE, (WIDTH, HEIGHT))
        for index in range(frames):
            writer.write(scene(index + shift))
        writer.release()
        paths.append(folder / f"{name}.mp4")
    return paths


@pytest.fixture(scope="module")
def model(bundle):
    from paligemma_edge import load

    with load(bundle) as loaded:
        yield loaded


def run_files(model, paths, tmp_path, **options):
    """run_on_sources on the files, results in tmp_path/r-{index}.jsonl; returns (run, lines per source)."""
    out = str(tmp_path / "r-{index}.jsonl")
    camera = CameraOptions(sources=tuple(map(str, paths)), prompt="caption en", out=out, generation=TOKENS, **options)
    run = run_on_sources(model, open_sources(camera.sources), camera)
    return run, [read_lines(out_file(camera, i)) for i in range(len(paths))]


def out_file(options: CameraOptions, index: int) -> Path:
    path = options.out_path(index)
    assert path is not None, "the options name an --out"
    return Path(path)


def answers(lines: list[dict]) -> list[tuple[int, list[int]]]:
    return [(line["frame"], line["result"]["token_ids"]) for line in lines]


# -- several files ----------------------------------------------------------------------------


def test_files_run_batched_and_each_gets_what_it_gets_alone(model, clips, tmp_path):
    run, lines = run_files(model, clips, tmp_path, every=5)
    alone = []
    for clip, folder in zip(clips, _folders(tmp_path, len(clips))):
        single, (single_lines,) = run_files(model, [clip], folder, every=5)
        assert single.batches == len(single_lines)
        alone.append(single_lines)
    # Pacing per source on its own timeline; greedy decoding: token for token what the file gives alone.
    assert [[frame for frame, _ in answers(source)] for source in lines] == [[0, 5, 10, 15, 20, 25], [0, 5, 10],
                                                                              [0, 5, 10, 15]]
    assert [answers(source) for source in lines] == [answers(source) for source in alone]
    assert len({tuple(ids) for source in lines for _, ids in answers(source)}) > 3  # the clips differ
    for source in lines:
        assert all(set(line) == {"frame", "timestamp", "wall_time", "latency_ms", "result"} for line in source)
        assert [line["timestamp"] for line in source] == pytest.approx([i * 0.5 for i in range(len(source))])
    # Rounds: all three, all three, all three, front and side, front, front.
    assert run.batches == 6 and run.processed == 13
    front, back, side = run.summaries
    assert (front.frames_read, front.processed, front.skipped, front.dropped) == (30, 6, 24, 0)
    assert (back.frames_read, back.processed, back.skipped, back.dropped) == (12, 3, 9, 0)
    assert (side.frames_read, side.processed, side.skipped) == (20, 4, 16)
    assert all(s.stopped == "end of source" and not s.interrupted for s in run.summaries)
    assert back.seconds <= front.seconds  # the short clip dropped out first
    text = run.text()
    assert "3 sources: 13 frames in 6 batches (2.17 frames per batch)" in text
    assert all(s.text() in text for s in run.summaries)


def test_max_batch_chunks_a_round_and_max_frames_counts_per_source(model, clips, tmp_path):
    run, lines = run_files(model, clips, tmp_path, max_batch=2, max_frames=4)
    assert [len(source) for source in lines] == [4, 4, 4]
    assert run.batches == 8  # four rounds of three frames, two calls each
    assert all(s.stopped == "max frames" and s.frames_read == 4 for s in run.summaries)
    assert [answers(source) for source in lines] == [answers(run_files(model, [clip], folder, max_frames=4)[1][0])
                                                     for clip, folder in zip(clips, _folders(tmp_path, 3))]


def _folders(root: Path, count: int) -> list[Path]:
    folders = [root / f"alone{i}" for i in range(count)]
    for folder in folders:
        folder.mkdir()
    return folders


def test_the_backends_max_batch_caps_the_batch(model, monkeypatch):
    options = CameraOptions(sources=("a.mp4", "b.mp4"), prompt="caption en", max_batch=3)
    assert getattr(model.backend, "max_batch", None) is None and batch_limit(model, options) == 3
    assert batch_limit(model, CameraOptions(sources=("a.mp4",), prompt="caption en")) is None
    monkeypatch.setattr(model.backend, "max_batch", 2, raising=False)  # what a TensorRT backend exposes
    assert batch_limit(model, options) == 2


# -- live sources next to files ---------------------------------------------------------------


def test_a_live_source_mixed_with_a_file(model, clips, tmp_path):
    live = PacedFrames(150, 0.002)
    options = CameraOptions(sources=(str(clips[1]), "fake"), prompt="caption en", generation=TOKENS,
                            out=str(tmp_path / "r-{name}.jsonl"), annotate=str(tmp_path / "a-{index}.avi"))
    sources = [open_source(str(clips[1])), VideoSource(live, "fake", live=True, fps=None)]
    run = run_on_sources(model, sources, options)
    file_summary, live_summary = run.summaries
    file_lines, live_lines = read_lines(tmp_path / "r-back.jsonl"), read_lines(tmp_path / "r-fake.jsonl")
    # The file runs every frame, in order, and answers as it does alone.
    (tmp_path / "alone").mkdir()
    assert answers(file_lines) == answers(run_files(model, [clips[1]], tmp_path / "alone")[1][0])
    assert [frame for frame, _ in answers(file_lines)] == list(range(12))
    # The live source: newest frames only, the rest dropped and counted, its last frame seen.
    frames = [line["frame"] for line in live_lines]
    assert live_summary.live and live_summary.frames_read == 150 and live_summary.skipped == 0
    assert live_summary.processed == len(live_lines) >= 2 and live_summary.dropped > 0
    assert live_summary.processed + live_summary.dropped == 150
    assert frames == sorted(set(frames)) and frames[-1] == 149 and live.released
    assert (file_summary.processed, file_summary.dropped) == (12, 0)
    assert count_frames(tmp_path / "a-0.avi")[0] == 12
    assert count_frames(tmp_path / "a-1.avi")[0] == live_summary.processed
    assert run.batches < run.processed  # some rounds carried both sources


def test_a_failing_live_source_drops_out_and_the_others_go_on(model, clips, tmp_path):
    class Unplugged(PacedFrames):
        def read(self):
            if self.produced == 3:
                raise RuntimeError("camera unplugged\nmore detail")
            return super().read()

    options = CameraOptions(sources=("0", str(clips[2])), prompt="caption en", generation=TOKENS,
                            out=str(tmp_path / "r-{index}.jsonl"), every=2)
    sources = [VideoSource(Unplugged(100, 0.001), "camera 0", live=True, fps=None), open_source(str(clips[2]))]
    run = run_on_sources(model, sources, options)
    live_summary, file_summary = run.summaries
    assert live_summary.stopped == "the source failed: camera unplugged" and live_summary.frames_read == 3
    assert "stopped: the source failed: camera unplugged" in run.text()
    assert file_summary.stopped == "end of source" and file_summary.processed == 10
    assert [line["frame"] for line in read_lines(tmp_path / "r-1.jsonl")] == list(range(0, 20, 2))


def test_live_sources_wake_the_loop_through_one_event():
    import threading

    wake = threading.Event()
    grabbers = [FrameGrabber(PacedFrames(5, 0.05), wake=wake).start() for _ in range(2)]
    assert wake.wait(5)  # the first frame of either source sets it
    for grabber in grabbers:
        while not grabber.ended:
            wake.clear()
            if grabber.take(timeout=0) is None and not grabber.ended:
                assert wake.wait(5)
        assert grabber.stop() and grabber.frames_read == 5


# -- output paths -----------------------------------------------------------------------------


def test_output_paths_need_a_placeholder_with_several_sources(tmp_path):
    two = ("front.mp4", "rtsp://admin:hunter2@10.0.0.5:554/stream1")
    for flag, out, annotate in [("--out", str(tmp_path / "r.jsonl"), None),
                                ("--annotate", None, str(tmp_path / "a.mp4"))]:
        with pytest.raises(InputError, match=f"^{flag} .*with 2 sources it needs {{index}} or {{name}}"):
            CameraOptions(sources=two, prompt="caption en", out=out, annotate=annotate)
    options = CameraOptions(sources=two, prompt="caption en", out=str(tmp_path / "r-{name}.jsonl"),
                            annotate=str(tmp_path / "{index}-{name}.mp4"))
    assert options.out_path(0) == str(tmp_path / "r-front.jsonl")
    assert options.out_path(1) == str(tmp_path / "r-10.0.0.5-554-stream1.jsonl")  # no credentials in names
    assert options.annotate_path(1) == str(tmp_path / "1-10.0.0.5-554-stream1.mp4")
    # One source: a path is used as given; placeholders, if any, are filled; other braces stay.
    one = CameraOptions(sources=("0",), prompt="caption en", out=str(tmp_path / "r{x}.jsonl"),
                        annotate=str(tmp_path / "a-{name}.mp4"))
    assert one.out_path(0) == str(tmp_path / "r{x}.jsonl") and one.annotate_path(0) == str(tmp_path / "a-video0.mp4")
    a_list: Any = ["0"]  # not the declared tuple: taken, and stored as one
    assert CameraOptions(sources=a_list, prompt="caption en").sources == ("0",)


def test_output_paths_that_collide_are_refused(tmp_path):
    same_stem = (str(tmp_path / "day1" / "clip.mp4"), str(tmp_path / "day2" / "clip.mp4"))
    with pytest.raises(InputError, match=r"r-clip.jsonl: --out of source 0 and --out of source 1 name the same "
                                         r"file \(use \{index\} in the path\)"):
        CameraOptions(sources=same_stem, prompt="caption en", out=str(tmp_path / "r-{name}.jsonl"))
    CameraOptions(sources=same_stem, prompt="caption en", out=str(tmp_path / "r-{index}.jsonl"))
    with pytest.raises(InputError, match="--out of source 0 and --annotate of source 0 name the same file"):
        CameraOptions(sources=("0", "1"), prompt="caption en", out=str(tmp_path / "{index}.mp4"),
                      annotate=str(tmp_path / "{index}.mp4"))
    with pytest.raises(InputError, match="^--out and --annotate name the same file$"):
        CameraOptions(sources=("0",), prompt="caption en", out=str(tmp_path / "x.mp4"), annotate=str(tmp_path / "x.mp4"))
    with pytest.raises(InputError, match=r"a-video0.gif: cannot write the annotated video \(unknown video extension"):
        CameraOptions(sources=("0", "1"), prompt="caption en", annotate=str(tmp_path / "a-{name}.gif"))
    with pytest.raises(InputError, match="no such directory"):
        CameraOptions(sources=("0", "1"), prompt="caption en", out=str(tmp_path / "{index}" / "r.jsonl"))


def test_bad_source_lists_and_batch_sizes_are_refused():
    one_string: Any = "clip.mp4"  # a str is a sequence of strings too: refused at run time
    with pytest.raises(InputError, match="tuple of --source strings"):
        CameraOptions(sources=one_string, prompt="caption en")
    for sources in [(), ("0", " ")]:
        with pytest.raises(InputError, match="give a --source"):
            CameraOptions(sources=sources, prompt="caption en")
    with pytest.raises(InputError, match="--max-batch must be at least 1, got 0"):
        CameraOptions(sources=("0",), prompt="caption en", max_batch=0)


def test_short_names():
    assert short_name("clips/street 0.mp4") == "street-0"
    assert short_name("0") == short_name("/dev/video0") == "video0"
    assert short_name("rtsp://cam.local/live") == "cam.local-live"
    assert short_name("v4l2src device=/dev/video0 ! videoconvert ! appsink") == "pipeline"


def test_a_source_that_does_not_open_is_named_and_the_others_released(clips, tmp_path):
    missing = tmp_path / "missing.mp4"
    with pytest.raises(InputError, match=f"^{missing}: no such video file"):
        open_sources([str(clips[0]), str(missing)])


# -- the CLI (needs --source repeatable in cli.py) --------------------------------------------


def test_cli_runs_two_sources_batched(bundle, clips, tmp_path):
    result = run_cli("camera", str(bundle), "--source", str(clips[0]), "--source", str(clips[1]), "--task", "caption",
                     "--every", "5", "--max-new-tokens", "6", "--out", str(tmp_path / "r-{name}.jsonl"),
                     "--annotate", str(tmp_path / "a-{index}.mp4"))
    assert result.returncode == 0, result.stderr
    assert [line["frame"] for line in read_lines(tmp_path / "r-front.jsonl")] == [0, 5, 10, 15, 20, 25]
    assert [line["frame"] for line in read_lines(tmp_path / "r-back.jsonl")] == [0, 5, 10]
    assert count_frames(tmp_path / "a-0.mp4") == (6, (WIDTH, HEIGHT)) and count_frames(tmp_path / "a-1.mp4")[0] == 3
    assert "30 frames read, 6 processed, 24 skipped by pacing, 0 dropped" in result.stdout
    assert "12 frames read, 3 processed, 9 skipped by pacing, 0 dropped" in result.stdout
    assert "2 sources: 9 frames in 6 batches" in result.stdout
    assert f"camera: {clips[1]} (file, {WIDTH}x{HEIGHT}, 10 fps)" in result.stderr
    single = run_cli("camera", str(bundle), "--source", str(clips[1]), "--task", "caption", "--every", "5",
                     "--max-new-tokens", "6", "--out", str(tmp_path / "alone.jsonl"), check=True)
    assert "sources:" not in single.stdout
    assert answers(read_lines(tmp_path / "alone.jsonl")) == answers(read_lines(tmp_path / "r-back.jsonl"))


def test_cli_refuses_before_loading(clips, tmp_path):
    no_bundle = tmp_path / "no-bundle"  # the sources and paths are checked before the bundle is read
    missing = tmp_path / "missing.mp4"
    assert_one_line_error(run_cli("camera", str(no_bundle), "--source", str(clips[0]), "--source", str(missing),
                                  "--task", "caption"), str(missing), "no such video file")
    assert_one_line_error(run_cli("camera", str(no_bundle), "--source", str(clips[0]), "--source", str(clips[1]),
                                  "--task", "caption", "--out", str(tmp_path / "r.jsonl")),
                          "with 2 sources it needs {index} or {name}")


def test_cli_ctrl_c_closes_every_source(bundle, tmp_path):
    videos = [write_video(tmp_path / f"long{i}.mp4", 3000) for i in range(2)]
    out = tmp_path / "r-1.jsonl"
    code, stdout, stderr = interrupt_camera(
        [str(bundle), "--source", str(videos[0]), "--source", str(videos[1]), "--task", "caption", "--max-new-tokens",
         "4", "--out", str(tmp_path / "r-{index}.jsonl"), "--annotate", str(tmp_path / "a-{index}.mp4")], out)
    assert code == 0, stderr
    assert stdout.count("stopped: interrupted (Ctrl-C)") == 2, stdout
    for index in range(2):
        lines = read_lines(tmp_path / f"r-{index}.jsonl")
        assert 2 <= len(lines) < 3000 and [line["frame"] for line in lines] == list(range(len(lines)))
        assert count_frames(tmp_path / f"a-{index}.mp4") == (len(lines), (WIDTH, HEIGHT))
    assert abs(len(read_lines(tmp_path / "r-0.jsonl")) - len(read_lines(tmp_path / "r-1.jsonl"))) <= 1

