"""PaliGemma JSONL datasets: both layouts, PATH:split, and every kind of bad line reported as file:line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from paligemma_edge.evaluation.datasets import (
    DatasetError, DatasetSpec, check_dataset, clean_prefix, load_dataset, parse_spec, suffix_problem, task_kind,
)
from paligemma_edge.evaluation.evaluate import load_eval_dataset
from paligemma_edge.runtime.errors import InputError

BOX = "<loc0100><loc0200><loc0500><loc0600>"
SEGS = "".join(f"<seg{i:03d}>" for i in range(16))
GOOD = [
    {"image": "a.png", "prefix": "detect cat ; dog", "suffix": f"{BOX} cat ; {BOX} dog"},
    {"image": "a.png", "prefix": "<image>caption en\n", "suffix": "a red square"},
    {"image": "b.png", "prefix": "segment cat", "suffix": f"{BOX}{SEGS} cat"},
    {"image": "b.png", "prefix": "answer en how many cats", "suffix": "2"},
    {"image": "b.png", "prefix": "ocr", "suffix": "HELLO"},
]


def picture(path: Path, size=(40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), 120, np.uint8)).save(path)
    return path


def write_lines(path: Path, lines) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


@pytest.fixture
def roboflow(tmp_path) -> Path:
    """Roboflow's PaliGemma export: dataset/_annotations.<split>.jsonl with the images beside them."""
    folder = tmp_path / "export" / "dataset"
    picture(folder / "a.png")
    picture(folder / "b.png", (20, 50))
    write_lines(folder / "_annotations.train.jsonl", GOOD)
    write_lines(folder / "_annotations.valid.jsonl", GOOD[:2])
    write_lines(folder / "_annotations.test.jsonl", GOOD[3:] + [""])  # a trailing blank line is fine
    return tmp_path / "export"


@pytest.fixture
def maestro(tmp_path) -> Path:
    """maestro's layout: one folder per split, each with annotations.jsonl and its images."""
    root = tmp_path / "maestro"
    for split, lines in (("train", GOOD), ("valid", GOOD[1:3])):
        picture(root / split / "a.png")
        picture(root / split / "b.png", (20, 50))
        write_lines(root / split / "annotations.jsonl", lines)
    return root


def test_roboflow_layout_counts_per_split_and_kind(roboflow):
    summary = check_dataset(roboflow)
    assert summary.ok and summary.layout == "roboflow"
    assert list(summary.counts) == ["train", "valid", "test"]
    assert summary.counts["train"] == {"caption": 1, "ocr": 1, "answer": 1, "detect": 1, "segment": 1}
    assert summary.counts["test"] == {"answer": 1, "ocr": 1}
    assert summary.images == {"train": 2, "valid": 1, "test": 1}
    text = summary.text()
    assert "roboflow layout" in text and "no problems" in text
    assert check_dataset(roboflow / "dataset").counts == summary.counts  # the dataset/ folder itself


def test_maestro_layout_and_records(maestro):
    dataset = load_dataset(maestro)
    assert dataset.layout == "maestro" and list(dataset.splits) == ["train", "valid"]
    first = dataset.splits["train"][0]
    assert (first.kind, first.prefix, first.image, first.line) == ("detect", "detect cat ; dog", maestro / "train/a.png", 1)
    assert (first.width, first.height) == (40, 30)
    caption = dataset.splits["train"][1]
    assert (caption.prefix, caption.kind) == ("caption en", "caption")  # <image> and the trailing newline dropped
    assert dataset.splits["train"][2].height == 50
    assert load_dataset(maestro / "valid").layout == "folder"
    assert load_dataset(maestro / "train" / "annotations.jsonl").splits.keys() == {"train"}


def test_path_split(roboflow, maestro, tmp_path):
    assert parse_spec(f"{roboflow}:valid") == DatasetSpec(roboflow, "valid")
    assert list(load_dataset(f"{roboflow}:valid").splits) == ["valid"]
    assert len(load_dataset(f"{maestro}:valid").records) == 2
    with pytest.raises(InputError, match="no split 'dev'; it has: train, valid, test"):
        load_dataset(f"{roboflow}:dev")
    odd = tmp_path / "odd:name"  # a path that exists with its colon is taken whole
    write_lines(odd / "annotations.jsonl", [])
    assert parse_spec(str(odd)) == DatasetSpec(odd)
    assert list(load_eval_dataset(roboflow).splits) == ["test"]  # eval: test, else valid, ...
    assert list(load_eval_dataset(maestro).splits) == ["valid"]


def test_not_a_dataset(tmp_path):
    with pytest.raises(InputError, match="no such dataset file or folder"):
        check_dataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="not a PaliGemma JSONL dataset"):
        check_dataset(tmp_path / "empty")


def test_task_kinds_from_prefixes():
    assert [task_kind(p) for p in ("detect cat ; dog", "segment cat", "ocr", "answer en what is it", "caption en",
                                   "describe de", "caption", "detection of cats", "extract the total")] == \
        ["detect", "segment", "ocr", "answer", "caption", "describe", "caption", "other", "other"]
    assert clean_prefix("<image><image>segment cat\n") == "segment cat"


BAD = [
    ("{not json", "not valid JSON (Expecting property name enclosed in double quotes at column 2)"),
    ('["a.png", "ocr", "x"]', "a line must be a JSON object with image, prefix, suffix, not a list"),
    ({"image": "a.png", "prefix": "ocr"}, 'missing "suffix"'),
    ({"image": "a.png", "prefix": 3, "suffix": "x"}, '"prefix" must be a string, not int'),
    ({"image": "a.png", "prefix": "<image>\n", "suffix": "x"}, 'empty "prefix"'),
    ({"image": "gone.png", "prefix": "ocr", "suffix": "x"}, "image 'gone.png': no such file"),
    ({"image": "broken.jpg", "prefix": "ocr", "suffix": "x"},
     "image 'broken.jpg': not a supported image (Pillow does not know its format)"),
    ({"image": "a.png", "prefix": "detect cat", "suffix": "<loc0100><loc0200><loc0500> cat"},
     "suffix entry 1 ('<loc0100><loc0200><loc0500> cat'): needs 4 <locNNNN> tokens first, found 3"),
    ({"image": "a.png", "prefix": "detect cat", "suffix": f"{BOX} cat ; <loc0100><loc0200><loc1024><loc0600> cat"},
     "suffix entry 2 ('<loc0100><loc0200><loc1024><loc0600> cat'): loc tokens are <loc0000> to <loc1023>"),
    ({"image": "a.png", "prefix": "detect cat", "suffix": "<loc0500><loc0200><loc0100><loc0600> cat"},
     "empty box (y 500..100, x 200..600): the order is y_min x_min y_max x_max"),
    ({"image": "a.png", "prefix": "detect cat", "suffix": f"{BOX}"}, "no label after the tokens"),
    ({"image": "a.png", "prefix": "detect cat", "suffix": f"{BOX} cat ;"}, "suffix entry 2 (''): empty (a stray ';')"),
    ({"image": "a.png", "prefix": "detect cat", "suffix": f"{BOX}{SEGS} cat"},
     "seg tokens in a detect answer (is the prefix meant to be 'segment'?)"),
    ({"image": "a.png", "prefix": "segment cat", "suffix": f"{BOX}{SEGS[:-8]} cat"},
     "needs 16 <segNNN> tokens after the 4 loc tokens, found 15"),
    ({"image": "a.png", "prefix": "segment cat", "suffix": f"{BOX}{SEGS[:-8]}<seg128> cat"},
     "seg tokens are <seg000> to <seg127>"),
    ({"image": "a.png", "prefix": "detect cat", "suffix": f"{BOX} cat <loc0001>"},
     "not <loc>x4 [<seg>x16] label: stray tokens after the label or between the tokens"),
]


def test_every_problem_is_reported_at_its_file_and_line(tmp_path):
    picture(tmp_path / "ds" / "train" / "a.png")
    (tmp_path / "ds" / "train" / "broken.jpg").write_bytes(b"not a picture at all")
    lines = [GOOD[1]] + [line for line, _ in BAD] + [GOOD[4] | {"image": "a.png"}]
    jsonl = write_lines(tmp_path / "ds" / "train" / "annotations.jsonl", lines)
    summary = check_dataset(tmp_path / "ds")
    assert summary.counts == {"train": {"caption": 1, "ocr": 1}}
    assert len(summary.problems) == len(BAD)
    for number, (problem, (_, expected)) in enumerate(zip(summary.problems, BAD), start=2):
        assert str(problem).startswith(f"{jsonl}:{number}: ")
        assert expected in str(problem), str(problem)
    assert f"{len(BAD)} problems:" in summary.text() and f"  {jsonl}:2: not valid JSON" in summary.text()
    assert summary.text(limit=3).endswith(f"... and {len(BAD) - 3} more")


def test_a_dataset_with_problems_is_refused_listing_the_first_few(tmp_path):
    picture(tmp_path / "d" / "a.png")
    jsonl = write_lines(tmp_path / "d" / "_annotations.train.jsonl", [GOOD[1], "{", "{", "[]", "{", "{", "{", "{"])
    with pytest.raises(DatasetError) as caught:
        load_dataset(tmp_path / "d")
    error = caught.value
    assert isinstance(error, InputError) and error.exit_code == 2 and len(error.problems) == 7
    lines = str(error).splitlines()
    assert lines[0] == f"{tmp_path / 'd'}: 7 problems in the dataset, refusing it:"
    assert lines[1].startswith(f"  {jsonl}:2: not valid JSON") and lines[3].startswith(f"  {jsonl}:4: a line must be")
    assert len(lines) == 7 and lines[-1].startswith("  ... and 2 more")


def test_empty_and_unreadable_files(tmp_path):
    write_lines(tmp_path / "e" / "_annotations.train.jsonl", ["", "  "])
    (tmp_path / "e" / "_annotations.test.jsonl").write_bytes(b"\xff\xfe\x00bad")
    problems = [str(p) for p in check_dataset(tmp_path / "e").problems]
    assert problems[0] == f"{tmp_path / 'e' / '_annotations.train.jsonl'}: no lines"
    assert problems[1].startswith(f"{tmp_path / 'e' / '_annotations.test.jsonl'}: unreadable")


def test_suffix_rules_follow_the_runtime_parser():
    assert suffix_problem("", "detect") is None  # none of the named objects in the picture
    assert suffix_problem(f"{BOX} cat ; {BOX} big dog", "detect") is None
    assert suffix_problem(f"{BOX}{SEGS} cat ; {BOX}{SEGS} dog", "segment") is None
    assert suffix_problem("<loc1> cat", "caption") is None  # text tasks: any suffix
