"""``finetune(base, dataset, out, options)``: a checkpoint fine-tuned on a PaliGemma JSONL dataset.

What is decided here:

- The dataset is read and checked whole (evaluation/datasets.py) before the model loads: a bad line
  refuses it (DatasetError). ``PATH`` trains on its ``train`` split (or its only split) and evaluates
  on ``valid`` / ``validation`` / ``val`` when there is one; ``PATH:split`` trains on that split, no eval.
- ``OUT`` is never half written: everything goes to ``OUT.partial`` and is renamed at the end. An
  existing ``OUT`` is refused unless ``overwrite``.
- Resumable checkpoints live beside ``OUT``, in ``OUT.checkpoints/last.pt`` (the latest only), not
  inside it, since ``OUT`` does not exist until the run ends; a finished run deletes them. ``resume``
  continues from there and is refused when the checkpoint is of other settings.
- Seeds are fixed (``seed``): torch for the adapters' initialization, the data order a function of
  (seed, step). On the CPU the same command gives the same losses, resumed or not.
- ``training.json`` in ``OUT``: the options, base, dataset, every step's loss, the log, the
  evaluations, the seconds, the device and the library versions.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from ..evaluation.datasets import Dataset, load_dataset
from ..runtime.errors import InputError
from . import adapters
from .data import Collator, Example, dataset_source
from .loop import LoopConfig, LoopResult, LoopState, load_checkpoint, make_optimizer, save_checkpoint, train_loop
from .options import FinetuneOptions

VALID_SPLITS = ("valid", "validation", "val")
TRAINING_JSON = "training.json"
# options that may differ between a run and its resumption
_RESUMABLE = ("resume", "save_every", "log_every", "overwrite")


@dataclass(frozen=True)
class TrainingResult:
    output: Path
    kind: str  # adapter | merged | full
    steps: int
    first_loss: float
    final_loss: float
    evals: tuple[dict, ...]
    seconds: float
    trainable_parameters: int
    total_parameters: int
    resumed_at: int


def split_dataset(dataset_spec: str | Path) -> tuple[Dataset, str, str | None]:
    """The dataset with its train split's name and its valid split's name (None when it has none)."""
    dataset = load_dataset(dataset_spec)
    names = list(dataset.splits)
    if len(names) == 1:
        return dataset, names[0], None
    if "train" not in names:
        raise InputError(f"{dataset.path}: no 'train' split (it has {', '.join(names)}); name one with PATH:split")
    return dataset, "train", next((n for n in VALID_SPLITS if n in names), None)


def checkpoint_path(out: Path) -> Path:
    return out.with_name(out.name + ".checkpoints") / "last.pt"


def resolve_device(options: FinetuneOptions) -> tuple[str, bool]:
    """(torch device, bf16 autocast): auto picks CUDA when present, bf16 where that device has it."""
    import torch

    if options.device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: torch sees no CUDA device here")
    device = "cuda" if options.device == "cuda" or (options.device == "auto" and torch.cuda.is_available()) else "cpu"
    if options.bf16 == "auto":
        return device, device == "cuda" and torch.cuda.is_bf16_supported()
    return device, options.bf16 == "on"


def load_base(base: str | Path):
    """(model in fp32, processor, the checkpoint's own dtype) of a checkpoint folder or hub id."""
    import torch
    from transformers import AutoProcessor, PaliGemmaForConditionalGeneration

    path = Path(base)
    if not path.exists() and (str(base).startswith((".", "/")) or str(base).count("/") != 1):
        raise InputError(f"{base}: no such checkpoint folder (nor a hub id: owner/name)")
    try:
        processor = AutoProcessor.from_pretrained(base, backend="pil")
        model = PaliGemmaForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
    except OSError as exc:
        raise InputError(f"{base}: cannot load a PaliGemma checkpoint ({str(exc).splitlines()[0]})") from None
    saved = getattr(model.config, "dtype", None)
    dtype = saved if isinstance(saved, torch.dtype) else getattr(torch, str(saved or "float32"), torch.float32)
    return model, processor, dtype


def _versions() -> dict:
    import importlib.metadata as md

    found: dict[str, str | None] = {}
    for name in ("paligemma-edge", "torch", "transformers", "peft"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            found[name] = None
    return found


def _run_meta(base: str | Path, dataset_spec, options: FinetuneOptions) -> dict:
    settings = {k: v for k, v in asdict(options).items() if k not in _RESUMABLE}
    return {"base": adapters.base_reference(base), "dataset": str(dataset_spec), "options": settings}


def finetune(base: str | Path, dataset_spec: str | Path, out: str | Path, options: FinetuneOptions = FinetuneOptions(),
             progress: Callable[[str], None] = lambda line: None) -> TrainingResult:
    """Fine-tune ``base`` on ``dataset_spec`` and write ``out`` (an adapter folder, or a checkpoint)."""
    import torch

    out = Path(out)
    if out.exists() and not options.overwrite:
        raise InputError(f"{out} exists; pass --force to replace it")
    dataset, train_split, valid_split = split_dataset(dataset_spec)
    train = [Example.from_record(r) for r in dataset.splits[train_split]]
    valid = [Example.from_record(r) for r in dataset.splits[valid_split]][: options.eval_lines] if valid_split else []
    saved = checkpoint_path(out)
    if options.resume and not saved.is_file():
        raise InputError(f"--resume: no checkpoint at {saved} (a run with --save-every N writes one)")
    device, bf16 = resolve_device(options)
    steps = options.total_steps(len(train))
    progress(f"[1/3] {dataset.path}: {len(train)} {train_split} lines"
             + (f", {len(valid)} {valid_split} lines for eval" if valid else "") + f"; {steps} steps on {device}"
             + (" (bf16)" if bf16 else ""))

    torch.manual_seed(options.seed)
    model, processor, dtype = load_base(base)
    model = adapters.prepare_model(model, options).to(device)
    trainable, total = adapters.parameter_counts(model)
    progress(f"[2/3] {'full' if options.full else f'LoRA r{options.lora_rank} on {options.target}'}: "
             f"{trainable / 1e6:.2f}M of {total / 1e6:.1f}M parameters train")
    collate = Collator(processor)
    config = LoopConfig(steps=steps, lr=options.lr, schedule=options.schedule(steps), weight_decay=options.weight_decay,
                        max_grad_norm=options.max_grad_norm, bf16=bf16, device=device, log_every=options.log_every,
                        eval_every=options.eval_every, save_every=options.save_every)
    evaluate = None
    if valid:
        from .validation import make_evaluator

        evaluate = make_evaluator(valid, collate, options.eval_max_new_tokens, device)
    optimizer = make_optimizer(model, config)
    meta = _run_meta(base, dataset_spec, options)
    state = load_checkpoint(saved, model, optimizer, meta) if options.resume else LoopState()
    if options.resume:
        progress(f"      resuming at step {state.step} from {saved}")
    result = train_loop(
        model, dataset_source(train, options.batch_size, options.grad_accum, options.seed), collate, config,
        progress=lambda line: progress("      " + line), evaluate=evaluate,
        checkpoint=lambda m, o, s: save_checkpoint(saved, m, o, s, meta), state=state, optimizer=optimizer,
        kind_of=lambda e: e.kind)

    kind = "full" if options.full else "merged" if options.merge else "adapter"
    progress(f"[3/3] writing the {kind} {'folder' if kind == 'adapter' else 'checkpoint'} to {out}")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    model.to("cpu")
    if kind == "adapter":
        adapters.save_adapter(model, processor, partial, base)
    else:
        adapters.save_checkpoint_dir(model, processor, partial, dtype)
    record = _record(base, dataset, train_split, valid_split, len(train), options, result, kind, device, bf16,
                     trainable, total)
    (partial / TRAINING_JSON).write_text(json.dumps(record, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)
    shutil.rmtree(saved.parent, ignore_errors=True)
    return TrainingResult(out, kind, result.steps, result.losses[0], result.losses[-1], result.evals, result.seconds,
                          trainable, total, result.resumed_at)


def _record(base, dataset: Dataset, train_split: str, valid_split: str | None, lines: int, options: FinetuneOptions,
            result: LoopResult, kind: str, device: str, bf16: bool, trainable: int, total: int) -> dict:
    return {
        "base": adapters.base_reference(base), "dataset": str(dataset.path), "train_split": train_split,
        "valid_split": valid_split, "train_lines": lines, "output": kind, "options": asdict(options),
        "device": device, "bf16": bf16, "trainable_parameters": trainable, "total_parameters": total,
        "steps": result.steps, "resumed_at": result.resumed_at, "losses": [round(x, 6) for x in result.losses],
        "log": list(result.log), "evals": list(result.evals), "seconds": result.seconds,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "versions": _versions(),
    }
