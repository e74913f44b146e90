"""paligemma-shapes: the committed trained model, its training script, and `paligemma-edge eval`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from paligemma_edge.shapes import evaluate, scenes, tasks

from .conftest import SHAPES_CHECKPOINT, Reference, run_cli

EVAL_SCENES = 60


@pytest.fixture(scope="module")
def shapes_eval(shapes_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "shapes.json"
    result = run_cli("eval", str(shapes_bundle), "--dataset", "shapes", "--n", str(EVAL_SCENES), "--json", str(out),
                     check=True)
    return json.loads(out.read_text()), result.stdout


def test_committed_checkpoint_is_small_and_complete():
    files = {p.name: p.stat().st_size for p in SHAPES_CHECKPOINT.iterdir()}
    for name in ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json", "vae-oid.npz",
                 "training.json"):
        assert name in files
    assert sum(files.values()) < 25e6


def test_fp32_bundle_meets_the_task_targets(shapes_eval):
    report, stdout = shapes_eval
    assert report["scenes"] == EVAL_SCENES and "caption_exact_match" in stdout
    for name, target in evaluate.TARGETS.items():
        assert report[name] >= target, (name, report[name], target)
    assert report["detection_precision"] >= 0.8
    assert report["examples"] and {"prompt", "expected", "answer", "score"} <= set(report["examples"][0])


def test_token_parity_with_transformers_on_the_trained_model(shapes_bundle):
    from paligemma_edge.runtime.model import load

    reference = Reference(SHAPES_CHECKPOINT)
    with load(shapes_bundle) as model:
        for index in range(3):
            scene = scenes.scene("heldout", index)
            image = scenes.render(scene)
            prompts = ["caption en", "detect " + " ; ".join(scene.shapes_present()), f"answer en {tasks.COUNT_QUESTION}"]
            ours = [list(g.token_ids) for g in model.generate_batch([image], prompts,
                                                                     _options(max_new_tokens=30))]
            theirs = reference.generate([image] * len(prompts), prompts, max_new_tokens=30)
            eos = set(model.manifest.tokens.eos)
            assert ours == [[t for t in row if t not in eos] for row in theirs]


def _options(**kwargs):
    from paligemma_edge.runtime.generation.sampling import GenerationOptions

    return GenerationOptions(**kwargs)


def test_mask_decoder_reproduces_the_shapes_from_their_seg_codes():
    from paligemma_edge.runtime.generation.mask_decoder import MaskDecoder
    from paligemma_edge.shapes.metrics import mask_iou
    from PIL import Image

    codes = json.loads((SHAPES_CHECKPOINT / "training.json").read_text())["seg_codes"]
    decoder = MaskDecoder.from_npz(SHAPES_CHECKPOINT / "vae-oid.npz")
    for shape in scenes.SHAPES:
        logits = decoder(np.array([codes[shape]]))[0]
        for size in (64, 37):  # and pasted onto a box of another size, as the runtime does
            resized = np.asarray(Image.fromarray(logits, mode="F").resize((size, size), Image.Resampling.BILINEAR)) > 0
            assert mask_iou(resized, scenes.box_mask(shape, size)) > 0.95, shape


def test_training_script_runs_end_to_end(tmp_path):
    """Two steps of each stage: the script writes a checkpoint transformers loads (no accuracy claim)."""
    import subprocess
    import sys

    from transformers import PaliGemmaForConditionalGeneration, PreTrainedConfig

    out = tmp_path / "trained"
    result = subprocess.run([sys.executable, "-m", "paligemma_edge.shapes.train", str(out), "--steps", "2",
                             "--batch", "2", "--vqvae-steps", "2"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "[3/3] saving" in result.stdout
    model = PaliGemmaForConditionalGeneration.from_pretrained(out)
    vision = model.config.vision_config
    assert isinstance(vision, PreTrainedConfig) and vision.patch_size == 14 and (out / "vae-oid.npz").exists()
    assert set(json.loads((out / "training.json").read_text())["seg_codes"]) == set(scenes.SHAPES)


def test_int8_compare_reports_task_metrics(shapes_bundle, tmp_path):
    int8 = tmp_path / "int8"
    run_cli("quantize", str(shapes_bundle), "--precision", "int8", "-o", str(int8), check=True)
    out = tmp_path / "compare.json"
    result = run_cli("compare", str(shapes_bundle), str(int8), "--dataset", "shapes", "--n", "10",
                     "--max-new-tokens", "24", "--json", str(out), check=True)
    report = json.loads(out.read_text())
    assert set(report["task_metrics"]) == {"reference", "candidate"}
    assert set(report["task_metrics"]["candidate"]) >= set(evaluate.TARGETS)
    assert report["task_metrics"]["candidate"]["vqa_accuracy"] >= 0.9
    assert "| task metric (`held-out shapes, 10 scenes`) | reference | candidate | delta |" in result.stdout


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_tensorrt_target_bundles_keep_the_task_metrics(shapes_bundle, shapes_eval, precision, tmp_path):
    """Weight-only int8 / int4 on fp16 activations (what build-engines takes), run here on ONNX Runtime."""
    bundle = tmp_path / precision
    run_cli("quantize", str(shapes_bundle), "--precision", precision, "--target", "tensorrt", "-o", str(bundle),
            check=True)
    out = tmp_path / "eval.json"
    run_cli("eval", str(bundle), "--dataset", "shapes", "--n", str(EVAL_SCENES), "--json", str(out), check=True)
    quantized, (reference, _) = json.loads(out.read_text()), shapes_eval
    for name in ("caption_exact_match", "vqa_accuracy", "detection_recall", "segmentation_miou"):
        assert quantized[name] >= reference[name] - 0.05, (name, quantized[name], reference[name])


def test_eval_runs_on_any_bundle(segment_bundle, tmp_path):
    """A random tiny bundle scores near zero, but every metric and count is reported."""
    out = tmp_path / "eval.json"
    result = run_cli("eval", str(segment_bundle), "--n", "2", "--json", str(out), check=True)
    report = json.loads(out.read_text())
    for name in ("caption_exact_match", "vqa_accuracy", "ocr_exact_match", "detection_precision",
                 "detection_recall", "segmentation_miou"):
        assert 0.0 <= report[name] <= 1.0 and name in result.stdout
    assert report["counts"]["caption"] == 2


def test_eval_usage_errors(tmp_path):
    assert run_cli("eval", str(tmp_path), "--dataset", "coco").returncode == 2
    missing = run_cli("eval", str(tmp_path / "nope"))
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
