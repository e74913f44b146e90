"""Datasets in PaliGemma JSONL: finding the splits, reading and checking every line.

A line is ``{"image": "...", "prefix": "...", "suffix": "..."}`` with the image path relative to
the JSONL file. Two layouts are in use and both are read:

- Roboflow's PaliGemma export: ``dataset/_annotations.{train,valid,test}.jsonl`` with the images
  beside them (``PATH`` may be the export folder or its ``dataset/`` folder);
- maestro's: one folder per split, each with an ``annotations.jsonl`` and its images.

``PATH`` may also be one JSONL file or one split folder. ``PATH:split`` takes one split.

What is decided here:

- Every problem is reported as ``file:line: what is wrong``, one per line (the first found), and a
  dataset with any problem is refused as a whole (:class:`DatasetError`, listing the first few),
  before a model runs: a metric over the lines that happened to parse would be a different dataset.
- A prefix is taken as PaliGemma reads it: ``<image>`` placeholders and the trailing newline some
  datasets keep are dropped (the runtime adds both itself); the task kind is the prefix's first
  word as runtime/generation/tasks.py spells the tasks, and any other prefix is kind ``other``.
- A detect / segment suffix must parse entry by entry with the runtime's own parser
  (runtime/generation/parsing.py), which otherwise drops a malformed entry silently; an empty suffix means
  "none of the named objects is in the picture". Segment entries need exactly 16 seg tokens.
- Each image is decoded once with the runtime's loader (runtime/images.py), however many lines use it,
  so a picture that ``eval`` could not read is found by ``dataset check``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from ..runtime.errors import InputError
from ..runtime.images import load_image
from ..runtime.generation.parsing import SEG_CODES, SEG_TOKENS, parse_detections
from ..runtime.generation.tasks import TASKS

KINDS = (*TASKS, "other")  # caption, describe, ocr, answer, detect, segment, other
FIELDS = ("image", "prefix", "suffix")
ROBOFLOW_PATTERN = re.compile(r"^_annotations\.(.+)\.jsonl$")
MAESTRO_FILE = "annotations.jsonl"
SHOWN_PROBLEMS = 5  # listed in a DatasetError

_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_IMAGE_PLACEHOLDER = "<image>"
_LOC_LIKE = re.compile(r"<loc(\d+)>")
_SEG_LIKE = re.compile(r"<seg(\d+)>")
# the literal head of each task's template: "caption", "ocr", "detect", ...
_TASK_HEADS = {name: task.template.split("{")[0].strip() for name, task in TASKS.items()}


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset, at a line of a file (line 0: the file itself)."""

    file: Path
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}" if self.line else f"{self.file}: {self.message}"


class DatasetError(InputError):
    """A dataset with problems: refused whole, before any training or evaluation."""

    def __init__(self, path: Path, problems: Sequence[Problem]):
        self.problems = tuple(problems)
        shown = [f"  {p}" for p in self.problems[:SHOWN_PROBLEMS]]
        more = len(self.problems) - len(shown)
        if more:
            shown.append(f"  ... and {more} more (paligemma-edge dataset check {path} lists them all)")
        plural = "s" if len(self.problems) > 1 else ""
        super().__init__(f"{path}: {len(self.problems)} problem{plural} in the dataset, refusing it:\n" + "\n".join(shown))


@dataclass(frozen=True)
class Record:
    """One line of a dataset, checked: its image exists and decodes, its suffix parses for its kind."""

    file: Path
    line: int
    split: str
    image: Path  # resolved against the JSONL file's folder
    prefix: str  # as the model is prompted: no <image> placeholder, no trailing newline
    suffix: str
    kind: str  # one of KINDS
    width: int  # of the upright image, as the runtime loads it
    height: int

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class DatasetSpec:
    """``PATH`` or ``PATH:split``."""

    path: Path
    split: str | None = None

    def __str__(self) -> str:
        return f"{self.path}:{self.split}" if self.split else str(self.path)


@dataclass(frozen=True)
class Dataset:
    """The splits read from a dataset (all of them, or the one asked for), every line checked."""

    path: Path
    layout: str  # "roboflow", "maestro", "file" or "folder"
    splits: Mapping[str, tuple[Record, ...]]

    @property
    def records(self) -> tuple[Record, ...]:
        return tuple(record for records in self.splits.values() for record in records)

    def __str__(self) -> str:
        return f"{self.path}:{','.join(self.splits)}"


def parse_spec(text: str | Path) -> DatasetSpec:
    """``PATH`` or ``PATH:split``; a path that exists as given is never split at a colon."""
    if isinstance(text, Path) or Path(text).exists():
        return DatasetSpec(Path(text))
    head, sep, split = str(text).rpartition(":")
    if sep and head and _SPLIT_NAME.match(split):
        return DatasetSpec(Path(head), split)
    return DatasetSpec(Path(text))


def find_splits(path: Path) -> tuple[str, dict[str, Path]]:
    """(layout, split name -> JSONL file) of a dataset path, in the splits' usual order."""
    if path.is_file():
        return "file", {_split_of_file(path): path}
    if not path.is_dir():
        raise InputError(f"{path}: no such dataset file or folder")
    for folder in (path / "dataset", path):  # Roboflow: the export folder or its dataset/ folder
        found = {m.group(1): f for f in sorted(folder.glob("_annotations.*.jsonl"))
                 if (m := ROBOFLOW_PATTERN.match(f.name))} if folder.is_dir() else {}
        if found:
            return "roboflow", _ordered(found)
    if (path / MAESTRO_FILE).is_file():
        return "folder", {path.name: path / MAESTRO_FILE}
    found = {sub.name: sub / MAESTRO_FILE for sub in sorted(path.iterdir()) if (sub / MAESTRO_FILE).is_file()}
    if found:
        return "maestro", _ordered(found)
    raise InputError(f"{path}: not a PaliGemma JSONL dataset: expected dataset/_annotations.<split>.jsonl "
                     f"(Roboflow) or <split>/{MAESTRO_FILE} folders (maestro)")


def _split_of_file(path: Path) -> str:
    match = ROBOFLOW_PATTERN.match(path.name)
    if match:
        return match.group(1)
    return path.parent.name if path.name == MAESTRO_FILE and path.parent.name else path.stem


def _ordered(splits: dict[str, Path]) -> dict[str, Path]:
    usual = ["train", "valid", "validation", "val", "test"]
    return dict(sorted(splits.items(), key=lambda item: (usual.index(item[0]) if item[0] in usual else len(usual),
                                                         item[0])))


def task_kind(prefix: str) -> str:
    """The task a prefix asks for: ``detect cat ; dog`` -> detect, ``caption en`` -> caption; else other."""
    for name, head in _TASK_HEADS.items():
        if prefix == head or prefix.startswith(head + " "):
            return name
    return "other"


def clean_prefix(prefix: str) -> str:
    """The prefix as the runtime prompts with it: <image> placeholders and surrounding whitespace dropped."""
    return prefix.replace(_IMAGE_PLACEHOLDER, "").strip()


def suffix_problem(suffix: str, kind: str) -> str | None:
    """What is wrong with a detect or segment answer, or None when every entry parses."""
    if kind not in ("detect", "segment") or not suffix.strip():
        return None
    for number, entry in enumerate(suffix.split(";"), start=1):
        problem = _entry_problem(entry.strip(), kind)
        if problem:
            return f"suffix entry {number} ({_quoted(entry.strip())}): {problem}"
    return None


def _entry_problem(entry: str, kind: str) -> str | None:
    if not entry:
        return "empty (a stray ';')"
    locs = _LOC_LIKE.findall(entry)
    segs = _SEG_LIKE.findall(entry)
    if len(parse_detections(entry, 1, 1)) != 1:  # the runtime's parser is the judge; the rest says why
        if not entry.startswith("<loc") or len(locs) < 4:
            return f"needs 4 <locNNNN> tokens first, found {len(locs)}"
        if any(len(v) != 4 or int(v) > 1023 for v in locs[:4]):
            return "loc tokens are <loc0000> to <loc1023>"
        y0, x0, y1, x1 = (int(v) for v in locs[:4])
        if y1 <= y0 or x1 <= x0:
            return f"empty box (y {y0}..{y1}, x {x0}..{x1}): the order is y_min x_min y_max x_max"
        return "not <loc>x4 [<seg>x16] label: stray tokens after the label or between the tokens"
    label = _SEG_LIKE.sub("", _LOC_LIKE.sub("", entry)).strip()
    if not label:
        return "no label after the tokens"
    if kind == "detect" and segs:
        return "seg tokens in a detect answer (is the prefix meant to be 'segment'?)"
    if kind == "segment":
        if len(segs) != SEG_TOKENS:
            return f"needs {SEG_TOKENS} <segNNN> tokens after the 4 loc tokens, found {len(segs)}"
        if any(len(v) != 3 or int(v) >= SEG_CODES for v in segs):
            return f"seg tokens are <seg000> to <seg{SEG_CODES - 1:03d}>"
    return None


def _quoted(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


@dataclass
class _ImageChecker:
    """Decodes each image once: (width, height) or the loader's one-line reason."""

    seen: dict[Path, tuple[int, int] | str] = field(default_factory=dict)

    def check(self, path: Path) -> tuple[int, int] | str:
        if path not in self.seen:
            if not path.is_file():
                self.seen[path] = "no such file"
            else:
                try:
                    self.seen[path] = load_image(path, name=path.name).size
                except InputError as exc:
                    self.seen[path] = str(exc).removeprefix(f"{path.name}: ")
        return self.seen[path]


def read_split(split: str, jsonl: Path, images: _ImageChecker | None = None) -> tuple[list[Record], list[Problem]]:
    """Every line of one JSONL file: its checked records and its problems (one per bad line)."""
    images = images or _ImageChecker()
    try:
        text = jsonl.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return [], [Problem(jsonl, 0, f"unreadable ({exc})")]
    records: list[Record] = []
    problems: list[Problem] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        result = _read_line(split, jsonl, number, line, images)
        if isinstance(result, Record):
            records.append(result)
        else:
            problems.append(result)
    if not records and not problems:
        problems.append(Problem(jsonl, 0, "no lines"))
    return records, problems


def _read_line(split: str, jsonl: Path, number: int, line: str, images: _ImageChecker) -> Record | Problem:
    problem = lambda message: Problem(jsonl, number, message)
    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        return problem(f"not valid JSON ({exc.msg} at column {exc.colno})")
    if not isinstance(data, dict):
        return problem(f"a line must be a JSON object with {', '.join(FIELDS)}, not a {type(data).__name__}")
    for name in FIELDS:
        if name not in data:
            return problem(f'missing "{name}"')
        if not isinstance(data[name], str):
            return problem(f'"{name}" must be a string, not {type(data[name]).__name__}')
    prefix = clean_prefix(data["prefix"])
    if not prefix:
        return problem('empty "prefix"')
    kind = task_kind(prefix)
    image = jsonl.parent / data["image"]
    size = images.check(image)
    if isinstance(size, str):
        return problem(f"image {data['image']!r}: {size}")
    bad_suffix = suffix_problem(data["suffix"], kind)
    if bad_suffix:
        return problem(bad_suffix)
    return Record(jsonl, number, split, image, prefix, data["suffix"].strip(), kind, *size)


def _select(spec: DatasetSpec, splits: dict[str, Path], prefer: Sequence[str] | None) -> dict[str, Path]:
    if spec.split is not None:
        if spec.split not in splits:
            raise InputError(f"{spec.path}: no split '{spec.split}'; it has: {', '.join(splits)}")
        return {spec.split: splits[spec.split]}
    if prefer is None or len(splits) == 1:
        return splits
    chosen = next((name for name in prefer if name in splits), None)
    if chosen is None:
        raise InputError(f"{spec.path}: name a split with {spec.path}:SPLIT (it has: {', '.join(splits)})")
    return {chosen: splits[chosen]}


def _read(spec: DatasetSpec, prefer: Sequence[str] | None) -> tuple[str, dict[str, list[Record]], list[Problem]]:
    layout, splits = find_splits(spec.path)
    images = _ImageChecker()
    records, problems = {}, []
    for name, jsonl in _select(spec, splits, prefer).items():
        records[name], found = read_split(name, jsonl, images)
        problems += found
    return layout, records, problems


def load_dataset(spec: str | Path | DatasetSpec, prefer: Sequence[str] | None = None) -> Dataset:
    """The split ``PATH:split`` names, or without one all splits (with ``prefer``, the first of those
    present); :class:`DatasetError` when any line has a problem."""
    spec = spec if isinstance(spec, DatasetSpec) else parse_spec(spec)
    layout, records, problems = _read(spec, prefer)
    if problems:
        raise DatasetError(spec.path, problems)
    return Dataset(spec.path, layout, {name: tuple(found) for name, found in records.items()})


@dataclass(frozen=True)
class DatasetSummary:
    """What ``dataset check`` prints: lines per split and task kind, images per split, every problem."""

    path: Path
    layout: str
    counts: Mapping[str, Mapping[str, int]]  # split -> kind -> good lines
    images: Mapping[str, int]  # split -> distinct images of its good lines
    problems: tuple[Problem, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"path": str(self.path), "layout": self.layout, "counts": {k: dict(v) for k, v in self.counts.items()},
                "images": dict(self.images), "problems": [str(p) for p in self.problems]}

    def text(self, limit: int = 50) -> str:
        kinds = [k for k in KINDS if any(c.get(k) for c in self.counts.values())]
        header = ["split", "lines", "images", *kinds]
        rows = [[name, str(sum(c.values())), str(self.images[name]), *(str(c.get(k, 0)) for k in kinds)]
                for name, c in self.counts.items()]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        out = [f"{self.path} ({self.layout} layout)", line(header), *map(line, rows)]
        if self.ok:
            out.append("no problems")
        else:
            out.append(f"{len(self.problems)} problem{'s' if len(self.problems) > 1 else ''}:")
            out += [f"  {p}" for p in self.problems[:limit]]
            if len(self.problems) > limit:
                out.append(f"  ... and {len(self.problems) - limit} more")
        return "\n".join(out)


def check_dataset(spec: str | Path | DatasetSpec) -> DatasetSummary:
    """Read every split (or the one named) and report counts and problems; raises only for a path
    that is not a dataset at all."""
    spec = spec if isinstance(spec, DatasetSpec) else parse_spec(spec)
    layout, records, problems = _read(spec, None)
    counts = {name: {k: n for k in KINDS if (n := sum(r.kind == k for r in found))} for name, found in records.items()}
    images = {name: len({r.image for r in found}) for name, found in records.items()}
    return DatasetSummary(spec.path, layout, counts, images, tuple(problems))
