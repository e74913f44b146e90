"""finetune: labels on the suffix only, the data order, the schedule, and tiny checkpoints trained for a few steps.

The checkpoint is the tiny PaliGemma 1 with its embedding table scaled up (x10): at transformers'
init (0.02) a 64-wide tied head cannot make any token likely, so no training could show a falling loss.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from paligemma_edge.evaluation.datasets import DatasetError
from paligemma_edge.finetune.data import Collator, Example, example_indices
from paligemma_edge.finetune.options import FinetuneOptions
from paligemma_edge.finetune.run import checkpoint_path, finetune
from paligemma_edge.runtime.errors import InputError

WORDS = ["cat", "dog", "car", "person"]
FAST = FinetuneOptions(batch_size=4, lr=1e-2, log_every=5, eval_lines=2, eval_max_new_tokens=4)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    import torch

    from paligemma_edge.fixtures.tiny import TinySpec, build_model

    model, processor = build_model(TinySpec(family=1, image_size=28))
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(10.0)
    path = tmp_path_factory.mktemp("finetune") / "base"
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def _write_split(folder: Path, split: str, lines: int, rng) -> None:
    rows = []
    for index in range(lines):
        name = f"{split}{index}.png"
        Image.fromarray(rng.integers(0, 256, (20 + index, 24, 3), dtype=np.uint8)).save(folder / name)
        rows.append(json.dumps({"image": name, "prefix": "<image>caption en\n", "suffix": WORDS[index % len(WORDS)]}))
    (folder / f"_annotations.{split}.jsonl").write_text("\n".join(rows) + "\n")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A Roboflow-layout export: 8 train and 2 valid lines of 'caption en' -> a fixed word, random pictures."""
    root = tmp_path_factory.mktemp("dataset")
    (root / "dataset").mkdir()
    rng = np.random.default_rng(3)
    _write_split(root / "dataset", "train", 8, rng)
    _write_split(root / "dataset", "valid", 2, rng)
    return root


@pytest.fixture(scope="module")
def adapter(base, dataset, tmp_path_factory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("runs") / "adapter"
    return out, finetune(base, dataset, out, replace(FAST, steps=20))


def test_processor_labels_are_the_suffix_and_eos_only(base):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(base, backend="pil")
    picture = Image.new("RGB", (30, 20), (200, 10, 10))
    examples = [Example(picture, "caption en", "a red circle"), Example(picture, "answer en what is in the image", "cat")]
    batch = Collator(processor)(examples)
    tokenizer = processor.tokenizer
    image_tokens = processor.image_seq_length
    for row, example in enumerate(examples):
        ids = batch["input_ids"][row].tolist()
        head = tokenizer.encode(example.prefix + "\n", add_special_tokens=False)
        tail = tokenizer.encode(example.suffix, add_special_tokens=False) + [tokenizer.eos_token_id]
        n = image_tokens + 1 + len(head) + len(tail)
        assert ids[:n] == [processor.image_token_id] * image_tokens + [tokenizer.bos_token_id] + head + tail
        assert ids[n:] == [tokenizer.pad_token_id] * (len(ids) - n)  # right padding
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (len(ids) - n)
        labels = batch["labels"][row].tolist()
        assert labels == [-100] * (n - len(tail)) + tail + [-100] * (len(ids) - n)
        token_type = batch["token_type_ids"][row].tolist()
        assert token_type == [0] * (n - len(tail)) + [1] * len(tail) + [0] * (len(ids) - n)


def test_example_order_is_a_permutation_per_epoch_and_a_function_of_the_step():
    steps = [example_indices(step, 3, 2, 10, seed=5) for step in range(5)]  # 30 examples: 3 epochs of 10
    flat = [i for step in steps for micro in step for i in micro]
    assert all(len(micro) == 3 for step in steps for micro in step)
    for epoch in range(3):
        assert sorted(flat[epoch * 10:(epoch + 1) * 10]) == list(range(10))
    assert flat[:10] != flat[10:20]  # each epoch shuffled anew
    assert example_indices(3, 3, 2, 10, seed=5) == steps[3]
    assert example_indices(3, 3, 2, 10, seed=6) != steps[3]


def test_schedule_is_the_shapes_recipe():
    from paligemma_edge.shapes.train import TrainConfig

    schedule = TrainConfig(steps=400, lr=1e-3, warmup=30, decay_from=0.6).schedule()
    lr = lambda step: schedule.lr_at(step, 400, 1e-3)
    assert lr(0) == pytest.approx(1e-3 / 30) and lr(29) == pytest.approx(1e-3)  # linear warmup
    assert lr(30) == lr(239) == 1e-3  # the peak until 60% of the steps
    assert lr(240) == pytest.approx(1e-3)  # the cosine starts at the peak ...
    assert lr(320) == pytest.approx(1e-3 * (0.05 + 0.95 * 0.5))  # ... is halfway down halfway through ...
    assert lr(399) == pytest.approx(1e-3 * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * 159 / 160))))  # ... to 5%
    default = FinetuneOptions(steps=100).schedule(100)
    assert default.lr_at(0, 100, 1.0) == pytest.approx(0.2) and default.lr_at(99, 100, 1.0) < 0.01


def test_options_refuse_contradictions():
    with pytest.raises(InputError, match="no-freeze-vision"):
        FinetuneOptions(target="all")
    with pytest.raises(InputError, match="--merge"):
        FinetuneOptions(full=True, merge=True)
    with pytest.raises(InputError, match="batch_size"):
        FinetuneOptions(batch_size=0)
    FinetuneOptions(target="all", freeze_vision=False)


def test_lora_loss_falls_and_writes_a_peft_adapter(base, adapter):
    from safetensors import safe_open

    out, result = adapter
    assert result.kind == "adapter" and result.steps == 20
    assert result.final_loss < 0.3 * result.first_loss, (result.first_loss, result.final_loss)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 16
    assert config["base_model_name_or_path"] == str(base.resolve())
    with safe_open(out / "adapter_model.safetensors", "pt") as weights:
        names = list(weights.keys())
    assert names and all("language_model" in n and "self_attn" in n and "lora_" in n for n in names)
    record = json.loads((out / "training.json").read_text())
    assert len(record["losses"]) == 20 and record["losses"][0] == pytest.approx(result.first_loss, rel=1e-5)
    assert record["options"]["lora_rank"] == 16 and record["versions"]["peft"]
    assert record["evals"] and record["evals"][-1]["step"] == 20 and "caption/exact_match" in record["evals"][-1]
    assert not out.with_name(out.name + ".partial").exists()


def test_merge_writes_a_checkpoint_that_answers_as_the_adapter(base, dataset, adapter, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoProcessor, PaliGemmaForConditionalGeneration

    from paligemma_edge.finetune.validation import greedy_answer

    merged = tmp_path / "merged"
    result = finetune(base, dataset, merged, replace(FAST, steps=20, merge=True))
    assert result.kind == "merged" and (merged / "config.json").is_file() and not (merged / "adapter_config.json").exists()
    assert result.final_loss == pytest.approx(adapter[1].final_loss, rel=1e-5)  # same seeds, same run
    collate = Collator(AutoProcessor.from_pretrained(merged, backend="pil"))
    full = PaliGemmaForConditionalGeneration.from_pretrained(merged, dtype=torch.float32).eval()
    with_adapter = PeftModel.from_pretrained(
        PaliGemmaForConditionalGeneration.from_pretrained(base, dtype=torch.float32), adapter[0]).eval()
    pictures = sorted((dataset / "dataset").glob("*.png"))[:4]
    answers = [[greedy_answer(m, collate, p, "caption en", 6, "cpu") for p in pictures] for m in (full, with_adapter)]
    assert answers[0] == answers[1]
    assert any(a in WORDS for a in answers[0])


class _Interrupt(Exception):
    pass


def test_resume_continues_the_same_run(base, dataset, tmp_path):
    options = replace(FAST, steps=8, save_every=4, eval_every=0, log_every=1)
    whole = finetune(base, f"{dataset}:train", tmp_path / "whole", options)

    out = tmp_path / "resumed"

    def stop_at_six(line: str) -> None:
        if "step 6/8" in line:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        finetune(base, f"{dataset}:train", out, options, progress=stop_at_six)
    assert not out.exists() and checkpoint_path(out).is_file()
    with pytest.raises(InputError, match="different run"):
        finetune(base, f"{dataset}:train", out, FinetuneOptions(**{**options.__dict__, "lr": 2e-2, "resume": True}))
    resumed = finetune(base, f"{dataset}:train", out, FinetuneOptions(**{**options.__dict__, "resume": True}))
    assert resumed.resumed_at == 4 and resumed.steps == 8
    record = json.loads((out / "training.json").read_text())
    np.testing.assert_allclose(record["losses"], json.loads((tmp_path / "whole" / "training.json").read_text())["losses"],
                               rtol=1e-6)
    assert resumed.final_loss == pytest.approx(whole.final_loss, rel=1e-6)
    assert not checkpoint_path(out).parent.exists()  # a finished run removes its checkpoints


def test_bad_dataset_is_refused_before_the_model_loads(dataset, tmp_path):
    bad = tmp_path / "bad"
    (bad / "dataset").mkdir(parents=True)
    for f in (dataset / "dataset").iterdir():
        (bad / "dataset" / f.name).write_bytes(f.read_bytes())
    with (bad / "dataset" / "_annotations.train.jsonl").open("a") as handle:
        handle.write('{"image": "missing.png", "prefix": "caption en", "suffix": "cat"}\n')
    with pytest.raises(DatasetError, match="missing.png"):
        finetune(tmp_path / "no-such-base", bad, tmp_path / "out", FinetuneOptions(steps=2))
    assert not (tmp_path / "out").exists()


def test_full_trains_every_decoder_weight_without_peft(base, dataset, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "full"
    result = finetune(base, f"{dataset}:train", out, replace(FAST, steps=10, full=True))
    assert result.kind == "full" and not (out / "adapter_config.json").exists()
    assert result.final_loss < 0.3 * result.first_loss
    before, after = load_file(base / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(before) == set(after)
    vision = [n for n in before if "vision_tower" in n or "multi_modal_projector" in n]
    assert vision and all(np.array_equal(before[n].numpy(), after[n].numpy()) for n in vision)  # frozen
    assert not np.array_equal(before[next(n for n in before if "q_proj" in n and "language_model" in n)].numpy(),
                              after[next(n for n in after if "q_proj" in n and "language_model" in n)].numpy())


def test_cli_finetune_then_export_the_adapter_answers_as_trained(base, dataset, tmp_path):
    """The user's path: `finetune` writes an adapter, `export` takes it, `run` answers the trained word."""
    from .conftest import run_cli

    adapter_dir, bundle = tmp_path / "adapter", tmp_path / "bundle"
    trained = run_cli("finetune", str(base), "--dataset", str(dataset), "-o", str(adapter_dir), "--steps", "20",
                      "--batch-size", "4", "--lr", "1e-2", "--eval-lines", "2", check=True)
    assert "wrote adapter" in trained.stdout and (adapter_dir / "adapter_config.json").is_file()
    run_cli("export", str(adapter_dir), "-o", str(bundle), "--max-seq-len", "64", check=True)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["adapter"]["rank"] == 16 and manifest["adapter"]["base"]["source"] == str(base.resolve())
    lines = [json.loads(line) for line in (dataset / "dataset" / "_annotations.train.jsonl").read_text().splitlines()]
    right = 0
    for line in lines[:4]:
        answer = run_cli("run", str(bundle), "--image", str(dataset / "dataset" / line["image"]), "--prompt",
                         "caption en", "--json", "--max-new-tokens", "4", check=True)
        right += json.loads(answer.stdout)["text"].strip() == line["suffix"]
    assert right >= 3, f"{right}/4 training lines answered with their word"
    refused = run_cli("finetune", str(base), "--dataset", str(tmp_path / "nothing"), "-o", str(tmp_path / "x"))
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
