"""Issue 17's dataset-driven commands: compare on a dataset, quantize calibrated on one, prefix variants.

The model tests use the committed paligemma-shapes bundle on a few held-out shapes scenes written as
a Roboflow export, so the metrics mean something; the rest (rules, ranking, picking calibration
pairs) needs no model. The last tests go through the CLI.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from paligemma_edge.evaluation.datasets import DatasetError
from paligemma_edge.evaluation.evaluate import EvalOptions, evaluate_dataset, load_eval_dataset
from paligemma_edge.evaluation.prefix_variants import (
    ORIGINAL, Rule, VariantReport, evaluate_prefix_variants, label_map, parse_rules, rank, read_rules, relabel,
    write_outputs,
)
from paligemma_edge.quantize import calibration
from paligemma_edge.quantize.bundle import QuantizeOptions, quantize_bundle
from paligemma_edge.quantize.compare import compare_bundles
from paligemma_edge.runtime.errors import InputError
from paligemma_edge.runtime.bundle.manifest import read_manifest
from paligemma_edge.runtime.model import load
from paligemma_edge.shapes import scenes, tasks

from .conftest import run_cli

pytest.importorskip("pycocotools", reason="detection mAP comes from pycocotools (test extra)")


def measured(value: float | None) -> float:
    """A metric the test expects to be there (None: the metric could not be computed)."""
    assert value is not None
    return value

# -- a few shapes scenes as a Roboflow export ------------------------------------------------------------

def scene_lines(scene: scenes.Scene, image: str) -> list[dict]:
    lines = [{"image": image, "prefix": "caption en", "suffix": tasks.caption(scene)},
             {"image": image, "prefix": f"answer en {tasks.COUNT_QUESTION}", "suffix": str(len(scene.objects))}]
    lines += [{"image": image, "prefix": f"detect {shape}", "suffix": tasks.detection_answer(scene, [shape])}
              for shape in scene.shapes_present()]
    return lines


def write_split(folder: Path, split: str, indices, lines_of=scene_lines) -> list[dict]:
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for index in indices:
        scene = scenes.scene("heldout", index)
        name = f"{split}-{index}.png"
        scenes.render(scene).save(folder / name)
        lines += lines_of(scene, name)
    (folder / f"_annotations.{split}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return lines


@pytest.fixture(scope="module")
def shapes_dataset(tmp_path_factory) -> tuple[Path, dict[str, list[dict]]]:
    """``export/dataset/_annotations.{test,train}.jsonl``: 4 test scenes, 6 train scenes."""
    root = tmp_path_factory.mktemp("shapes-export") / "export"
    lines = {"test": write_split(root / "dataset", "test", range(4)),
             "train": write_split(root / "dataset", "train", range(10, 16))}
    return root, lines


# -- prefix variant rules ------------------------------------------------------------------------------------

def test_rules_file_format_and_matching(tmp_path):
    path = tmp_path / "rules.txt"
    path.write_text("# plural names\n\ndetect {x} -> detect {x}s\n  caption en->describe en  \n"
                    "answer en {x} -> answer en {x} ; {x}\n")
    plural, describe, twice = read_rules(path)
    assert (plural.pattern, plural.rewrite, plural.where) == ("detect {x}", "detect {x}s", f"{path}:3")
    assert (describe.pattern, describe.rewrite, describe.where) == ("caption en", "describe en", f"{path}:4")
    assert plural.apply("detect cat ; dog") == "detect cat ; dogs"  # {x} takes the rest of the prefix
    assert plural.apply("detect") is None and plural.apply("segment cat") is None  # the whole prefix must match
    assert describe.apply("caption en") == "describe en" and describe.apply("caption en please") is None
    assert twice.apply("answer en what") == "answer en what ; what"
    assert Rule("detect {x} now", "find {x}", "r:1").apply("detect a.b now") == "find a.b"
    assert Rule("a.b", "c", "r:1").apply("axb") is None  # the pattern is literal text, not a regex


def test_bad_rules_are_reported_at_their_line(tmp_path):
    bad = {
        "detect {x}": "expected 'PATTERN -> REWRITE', e.g. 'detect {x} -> detect {x}s'",
        "-> detect": "no pattern before '->'",
        "detect {x} ->": "no rewrite after '->'",
        "a -> b -> c": "more than one '->' (one rule a line)",
        "detect {y} -> find {y}": "unknown placeholder {y} in the pattern: only {x} captures",
        "detect {x} -> find {objects}": "unknown placeholder {objects} in the rewrite: only {x} captures",
        "{x} and {x} -> {x}": "{x} may appear once in the pattern",
        "caption en -> caption {x}": "the rewrite uses {x} but the pattern captures nothing",
        "ocr -> ocr": "the rewrite is the pattern itself",
    }
    with pytest.raises(InputError) as one:
        parse_rules("# fine\nocr -> read the text\nocr -> read the text\n", "r.txt")
    assert str(one.value) == "r.txt:3: the same rule as line 2"
    with pytest.raises(InputError) as many:
        parse_rules("ocr -> read\n" + "\n".join(bad) + "\n", "r.txt")
    expected = [f"  r.txt:{number}: {message}" for number, message in enumerate(bad.values(), start=2)]
    assert str(many.value).splitlines() == [f"r.txt: {len(bad)} bad rules:", *expected]
    with pytest.raises(InputError, match=r"^r.txt: no rules"):
        parse_rules("# only a comment\n\n", "r.txt")
    with pytest.raises(InputError, match="unreadable rules file"):
        read_rules(tmp_path / "missing.txt")


def test_answer_labels_are_mapped_back_to_the_dataset_names():
    assert label_map("detect cat ; dog", "detect cats ; dogs", "detect") == {"cats": "cat", "dogs": "dog"}
    assert label_map("detect cat", "detect cat", "detect") == {}
    assert label_map("detect cat ; dog", "detect animals", "detect") == {}  # not as many names: no mapping
    assert label_map("detect cat", "find cat", "detect") == {}  # no longer a detect query
    assert label_map("detect cat ; dog", "detect pet ; pet", "detect") == {}  # ambiguous
    assert label_map("caption en", "describe en", "caption") == {}
    box, segs = "<loc0100><loc0200><loc0500><loc0600>", "<seg001>" * 16
    assert relabel(f"{box} cats ; {box}{segs} dogs ; {box} bird", {"cats": "cat", "dogs": "dog"}) == \
        f"{box} cat ; {box}{segs} dog ; {box} bird"
    assert relabel("cats are here", {"cats": "cat"}) == "cats are here"  # not an entry: left alone


def test_variants_rank_by_change_on_the_same_lines():
    def variant(name, examples, metrics, original):
        return VariantReport(name, None, max(examples.values(), default=0), 0, examples, metrics, original, 0)

    variants = [
        variant(ORIGINAL, {"ocr": 4, "detect": 4}, {"ocr/cer": 0.2, "detect/map_50": 0.5},
                {"ocr/cer": 0.2, "detect/map_50": 0.5}),
        variant("a", {"ocr": 2}, {"ocr/cer": 0.1}, {"ocr/cer": 0.3}),  # CER down 0.2: better
        variant("b", {"ocr": 4, "detect": 1}, {"ocr/cer": 0.25, "detect/map_50": 0.9},
                {"ocr/cer": 0.2, "detect/map_50": 0.4}),  # CER up 0.05; mAP up 0.5
        variant("c", {"detect": 2}, {"detect/map_50": None}, {"detect/map_50": None}),  # nothing to measure
        variant("d", {"ocr": 1}, {"ocr/cer": 0.0}, {"ocr/cer": None}),  # no change to rank by: last
    ]
    ocr, detect = rank(variants)
    assert (ocr.kind, ocr.metric, ocr.higher_is_better) == ("ocr", "cer", False)
    assert [r.name for r in ocr.ranked] == ["a", ORIGINAL, "b", "d"]
    changes = [r.change for r in ocr.ranked]
    assert changes[:3] == pytest.approx([-0.2, 0.0, 0.05]) and changes[3] is None
    assert [(r.name, r.lines) for r in detect.ranked] == [("b", 1), (ORIGINAL, 4)]
    assert detect.ranked[0].change == pytest.approx(0.5)


def test_prefix_variants_on_the_shapes_model(shapes_bundle, shapes_dataset, tmp_path):
    path, lines = shapes_dataset
    dataset = load_eval_dataset(path)
    detects = [line for line in lines["test"] if line["prefix"].startswith("detect ")]
    only_detect = tmp_path / "detect.jsonl"
    only_detect.write_text("".join(json.dumps(line) + "\n" for line in detects))
    for image in {line["image"] for line in detects}:  # the lines' images, beside the file
        (tmp_path / image).symlink_to(path / "dataset" / image)
    rules = parse_rules("detect {x} -> detect {x}s\nanswer en {x} -> answer en {x}?\n", "rules.txt")
    with load(shapes_bundle) as model:
        report = evaluate_prefix_variants(model, dataset, rules, EvalOptions(max_new_tokens=48))
        whole = evaluate_dataset(model, dataset, EvalOptions(max_new_tokens=48)).metrics()
        detect_only = evaluate_dataset(model, load_eval_dataset(only_detect), EvalOptions(max_new_tokens=48)).metrics()
    original, plural, question = report.variants
    assert report.lines == len(lines["test"]) and original.name == ORIGINAL
    assert (original.lines, original.left_out) == (len(lines["test"]), 0)
    assert original.metrics == whole == original.original  # the original phrasing is eval's own result
    assert (plural.lines, plural.left_out, plural.where) == (len(detects), len(lines["test"]) - len(detects), "rules.txt:1")
    assert set(plural.examples) == {"detect"} and plural.original == detect_only  # rescored on the same lines
    assert set(question.examples) == {"answer"}
    for ranking in report.rankings:
        changes = [measured(r.change) for r in ranking.ranked]
        sign = 1 if ranking.higher_is_better else -1
        assert [sign * c for c in changes] == sorted((sign * c for c in changes), reverse=True)
        assert ORIGINAL in [r.name for r in ranking.ranked]
    assert [r.kind for r in report.rankings] == ["caption", "answer", "detect"]

    written = write_outputs(report, tmp_path / "out/variants.json", tmp_path / "out/variants.md")
    saved = json.loads(written[0].read_text())
    assert [v["name"] for v in saved["variants"]] == [ORIGINAL, str(rules[0]), str(rules[1])]
    table = written[1].read_text()
    assert "### detect: map_50 (higher is better)" in table and f"| `{rules[0]}` | rules.txt:1 | {len(detects)} |" in table


def test_a_rewrite_that_names_objects_as_the_model_knows_them(shapes_bundle, tmp_path):
    """The dataset calls circles 'ball'; asking the model for 'circle' finds them, scored under 'ball'."""
    ball, circle = [], []
    for index in range(12):
        scene = scenes.scene("heldout", index)
        if scene.count("circle"):
            scenes.render(scene).save(tmp_path / f"{index}.png")
            truth = tasks.detection_answer(scene, ["circle"])
            circle.append({"image": f"{index}.png", "prefix": "detect circle", "suffix": truth})
            ball.append({"image": f"{index}.png", "prefix": "detect ball", "suffix": truth.replace(" circle", " ball")})
    for name, lines in (("ball", ball), ("circle", circle)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    with load(shapes_bundle) as model:
        report = evaluate_prefix_variants(model, load_eval_dataset(tmp_path / "ball.jsonl"),
                                          parse_rules("detect ball -> detect circle\n", "r"))
        as_circles = evaluate_dataset(model, load_eval_dataset(tmp_path / "circle.jsonl")).metrics()
    original, renamed = report.variants
    assert renamed.metrics == as_circles  # 'circle' answers scored against 'ball' truth as if named alike
    (ranking,) = report.rankings
    assert ranking.ranked[0].name == ("detect ball -> detect circle"
                                      if measured(as_circles["detect/map_50"]) > measured(original.metrics["detect/map_50"])
                                      else ORIGINAL)


def test_prefix_variants_check_every_prompt_first(shapes_bundle, shapes_dataset):
    path, _ = shapes_dataset
    rule = "caption en -> caption en " + "with many words " * 40
    refused = r"^r:1: rule 'caption en -> caption .*: .*prompt is \d+ tokens"
    with load(shapes_bundle) as model, pytest.raises(InputError, match=refused):
        evaluate_prefix_variants(model, load_eval_dataset(path), parse_rules(rule + "\n", "r"))


# -- calibration inputs --------------------------------------------------------------------------------------

def test_spread_pairs_covers_images_and_mixes_lines():
    a, b, c = Path("a.png"), Path("b.png"), Path("c.png")
    lines = [(a, "a1"), (a, "a2"), (a, "a3"), (b, "b1"), (c, "c1"), (c, "c2")]
    # round 0: a's 1st, b's 1st (its only), c's 1st (offset 2 of 2 lines); round 1: a's 2nd, then the cap
    assert calibration.spread_pairs(lines, limit=4) == [(a, "a1"), (a, "a2"), (b, "b1"), (c, "c1")]
    # two images of two lines each, one pair each: each starts at a different line
    assert calibration.spread_pairs([(a, "x1"), (a, "x2"), (b, "y1"), (b, "y2")], limit=2) == [(a, "x1"), (b, "y2")]
    # more images than the cap: evenly spaced ones, the first and the last included
    many = [(Path(f"{i}.png"), "caption en") for i in range(5)]
    assert calibration.spread_pairs(many, limit=3) == [many[0], many[2], many[4]]
    assert calibration.spread_pairs(lines, limit=32) == [(a, "a1"), (a, "a2"), (a, "a3"), (b, "b1"), (c, "c1"), (c, "c2")]


def test_calibration_path_is_a_dataset_or_a_directory_of_images(calibration_dir, shapes_dataset, tmp_path):
    images = calibration.calibration_inputs(calibration_dir)  # the old meaning, unchanged
    assert images.kind == "images" and (images.images, images.prompts) == (3, 2)
    assert [p for _, p in images.pairs] == ["caption en", "answer en what is this"] * 3
    assert not calibration.is_dataset(calibration_dir)

    path, lines = shapes_dataset
    train = calibration.calibration_inputs(path)  # the train split by default, each line's own prefix
    assert train.kind == "dataset" and train.origin == f"{path}:train"
    expected = {(path / "dataset" / line["image"], line["prefix"]) for line in lines["train"]}
    assert set(train.pairs) == expected and len(train.pairs) == len(lines["train"]) <= calibration.DATASET_PAIRS
    assert train.report() == {"source": f"{path}:train", "kind": "dataset", "images": 6,
                              "prompts": len({line["prefix"] for line in lines["train"]}), "pairs": len(lines["train"])}
    capped = calibration.calibration_inputs(f"{path}:test", limit=4)
    assert capped.origin == f"{path}:test" and len(capped.pairs) == 4 and capped.images == 4  # one line per image
    one_file = calibration.calibration_inputs(path / "dataset" / "_annotations.test.jsonl")
    assert one_file.kind == "dataset" and len(one_file.pairs) == len(lines["test"])
    assert calibration.is_dataset(path / "dataset") and calibration.is_dataset(f"{path}:train")

    synthetic = calibration.calibration_inputs(None)
    assert synthetic.kind == "synthetic" and (synthetic.images, synthetic.prompts) == (4, len(calibration.DEFAULT_PROMPTS))


def test_a_calibration_dataset_with_problems_is_refused(shapes_dataset, tmp_path):
    path, lines = shapes_dataset
    broken = tmp_path / "broken"
    (broken / "dataset").mkdir(parents=True)
    for name in {line["image"] for line in lines["test"]}:
        (broken / "dataset" / name).symlink_to(path / "dataset" / name)
    (broken / "dataset" / "_annotations.train.jsonl").write_text('{"image": "test-0.png", "prefix": "ocr"}\n')
    (broken / "dataset" / "_annotations.test.jsonl").write_text((path / "dataset" / "_annotations.test.jsonl").read_text())
    with pytest.raises(DatasetError, match=r"_annotations.train.jsonl:1: missing \"suffix\""):
        calibration.calibration_inputs(broken)
    assert len(calibration.calibration_inputs(f"{broken}:test").pairs) == len(lines["test"])  # only that split read
    with pytest.raises(InputError, match="no split 'valid'"):
        calibration.calibration_inputs(f"{path}:valid")


def test_record_runs_each_line_with_its_own_image(shapes_bundle, shapes_dataset):
    path, _ = shapes_dataset
    inputs = calibration.calibration_inputs(f"{path}:test", limit=3)
    recorded = calibration.record(shapes_bundle, inputs.pairs)
    assert len(recorded.vision) == 3  # one picture through the vision graph per pair
    prefills = [feed for feed in recorded.decoder if feed["past_key_0"].shape[2] == 0]
    with load(shapes_bundle) as model:
        lengths = [model.tokenizer.batch([prompt]).input_ids.shape[1] for _, prompt in inputs.pairs]
    assert [feed["inputs_embeds"].shape[1] for feed in prefills] == lengths


def test_quantize_calibrated_on_a_dataset_then_compare_on_it(shapes_bundle, shapes_dataset, tmp_path):
    path, lines = shapes_dataset
    fp16 = tmp_path / "shapes-fp16"
    manifest = quantize_bundle(shapes_bundle, fp16, QuantizeOptions("fp16", calibration=path))
    recorded = manifest.quantization["calibration"]
    assert {k: recorded[k] for k in ("source", "kind", "pairs", "images")} == \
        {"source": f"{path}:train", "kind": "dataset", "pairs": len(lines["train"]), "images": 6}
    assert recorded["decoder_feeds"] >= recorded["pairs"]  # a prefill each, then decode steps until eos

    comparison = compare_bundles(shapes_bundle, fp16, dataset=str(path), max_new_tokens=12, agreement_lines=5)
    assert comparison.cases == 5 and comparison.reference.accuracy is None
    with load(shapes_bundle) as model:
        reference = evaluate_dataset(model, load_eval_dataset(path)).metrics()
    with load(fp16) as model:
        candidate = evaluate_dataset(model, load_eval_dataset(path)).metrics()
    assert comparison.task_metrics == {"reference": reference, "candidate": candidate}
    assert comparison.dataset == f"{path}:test"
    table = comparison.markdown()
    delta = measured(candidate["detect/map_50"]) - measured(reference["detect/map_50"])
    assert (f"| detect/map_50 | {reference['detect/map_50']:.3f} | {candidate['detect/map_50']:.3f} | {delta:+.3f} |"
            in table)
    assert f"| task metric (`{path}:test`) | reference | candidate | delta |" in table


def test_compare_on_the_first_lines_of_a_dataset(shapes_bundle, shapes_dataset):
    path, lines = shapes_dataset
    same = compare_bundles(shapes_bundle, shapes_bundle, dataset=f"{path}:train", dataset_n=3, max_new_tokens=8)
    assert same.cases == 3 and same.exact_match_rate == 1.0 and same.top1_agreement == 1.0  # min(32, 3) lines
    task_metrics = same.task_metrics
    assert task_metrics is not None and task_metrics["reference"] == task_metrics["candidate"]
    assert same.dataset == f"{path}:train, first 3 lines"
    kinds = {line["prefix"].split()[0] for line in lines["train"][:3]}
    assert {name.split("/")[0] for name in task_metrics["reference"]} == kinds


def test_compare_refuses_a_bad_dataset_and_prompts_without_images(shapes_bundle, shapes_dataset, tmp_path):
    path, _ = shapes_dataset
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "nowhere.png", "prefix": "caption en", "suffix": "x"}\n')
    with pytest.raises(DatasetError, match=r"bad.jsonl:1: image 'nowhere.png': no such file"):
        compare_bundles(shapes_bundle, shapes_bundle, dataset=str(bad))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("caption en\n")
    with pytest.raises(InputError, match="^--prompts goes with --images"):
        compare_bundles(shapes_bundle, shapes_bundle, dataset=str(path), prompts_file=prompts)


# -- through the CLI ------------------------------------------------------------------------------------------


def test_cli_eval_prefix_variants(shapes_bundle, shapes_dataset, tmp_path):
    path, _ = shapes_dataset
    rules = tmp_path / "rules.txt"
    rules.write_text("# plural\ndetect {x} -> detect {x}s\n")
    result = run_cli("eval", str(shapes_bundle), "--dataset", str(path), "--prefix-variants", str(rules),
                     "--json", str(tmp_path / "v.json"), "--markdown", str(tmp_path / "v.md"), check=True)
    assert "### detect: map_50 (higher is better)" in result.stdout
    saved = json.loads((tmp_path / "v.json").read_text())
    assert [v["name"] for v in saved["variants"]] == [ORIGINAL, "detect {x} -> detect {x}s"]
    assert (tmp_path / "v.md").read_text() == result.stdout

    rules.write_text("detect {x} -> detect {x}s\ndetect {y}\n")
    bad = run_cli("eval", str(shapes_bundle), "--dataset", str(path), "--prefix-variants", str(rules))
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        f"paligemma-edge: error: {rules}:2: expected 'PATTERN -> REWRITE', e.g. 'detect {{x}} -> detect {{x}}s'"]
    shapes = run_cli("eval", str(shapes_bundle), "--prefix-variants", str(rules))
    assert shapes.returncode == 2 and "--prefix-variants" in shapes.stderr


def test_cli_compare_and_quantize_with_a_dataset(shapes_bundle, shapes_dataset, tmp_path):
    path, _ = shapes_dataset
    out = tmp_path / "fp16"
    run_cli("quantize", str(shapes_bundle), "--precision", "fp16", "--calibration", f"{path}:train",
            "--output", str(out), check=True)
    assert read_manifest(out).quantization["calibration"]["kind"] == "dataset"
    result = run_cli("compare", str(shapes_bundle), str(out), "--dataset", str(path), "--max-new-tokens", "8",
                     "--json", str(tmp_path / "c.json"), check=True)
    assert f"| task metric (`{path}:test`) | reference | candidate | delta |" in result.stdout
    assert set(json.loads((tmp_path / "c.json").read_text())["task_metrics"]) == {"reference", "candidate"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    refused = run_cli("compare", str(shapes_bundle), str(out), "--dataset", str(bad))
    assert refused.returncode == 2 and f"{bad}:1: not valid JSON" in refused.stderr
