"""Train paligemma-shapes: a small PaliGemma 2 that answers every task prefix on the shapes scenes.

    python -m paligemma_edge.shapes.train OUTPUT_DIR [--steps N] [--vqvae-steps N]

Steps: train the mask VQ-VAE (its encoder gives each shape's 16 seg codes, its decoder becomes
``vae-oid.npz``); build a small PaliGemmaForConditionalGeneration (real architecture, word-level
BPE tokenizer plus the 1024 loc and 128 seg tokens); train it on CPU with the repository's one
training loop (finetune/loop.py, as ``finetune`` does: batches from transformers' processor with
``suffix=``, loss on the suffix only, bf16 autocast), one random task per scene; save a normal Hugging Face
checkpoint with the npz and a sample picture. Fixed seeds: the same command gives the same model
on the same software. Needs the ``export`` extra (torch, transformers).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..fixtures.tiny import TinySpec, build_model, build_tokenizer
from ..finetune.data import Collator, Example
from ..finetune.loop import LoopConfig, train_loop
from ..finetune.options import Schedule
from . import scenes, tasks, vqvae

# Sampling weight of each task type per scene (the harder tasks more often).
TASK_WEIGHTS = {"caption": 2.0, "answer": 1.5, "ocr": 1.0, "detect": 2.5, "segment": 2.0}


@dataclass(frozen=True)
class TrainConfig:
    image_size: int = 112
    patch_size: int = 14
    vision_hidden: int = 192
    vision_layers: int = 4
    vision_heads: int = 4
    text_hidden: int = 256
    text_layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 64
    steps: int = 3200
    batch: int = 48
    lr: float = 1e-3
    warmup: int = 150
    decay_from: float = 0.6  # fraction of the steps after which the lr follows a cosine to 5%
    weight_decay: float = 0.01
    seed: int = 0
    vqvae_steps: int = 800
    task_weights: tuple[tuple[str, float], ...] = tuple(TASK_WEIGHTS.items())
    scene_offset: int = 0  # first training scene index (a resumed stage sees new scenes)
    resume_from: str | None = None  # a checkpoint this script wrote: keep training it

    def schedule(self) -> Schedule:
        """Warmup, the peak until ``decay_from`` of the steps, then a cosine to 5% of it."""
        return Schedule(warmup=self.warmup, decay_from=self.decay_from, floor=0.05)

    def loop(self) -> LoopConfig:
        """The recipe as the repository's training loop runs it (finetune/loop.py): AdamW with betas
        (0.9, 0.98), weight decay on matrices, gradients clipped to 1, bf16 autocast on the CPU."""
        return LoopConfig(steps=self.steps, lr=self.lr, schedule=self.schedule(), weight_decay=self.weight_decay,
                          betas=(0.9, 0.98), max_grad_norm=1.0, bf16=True, device="cpu", log_every=50)

    def spec(self) -> TinySpec:
        return TinySpec(
            family=2, image_size=self.image_size, patch_size=self.patch_size,
            vision_hidden=self.vision_hidden, vision_intermediate=4 * self.vision_hidden,
            vision_layers=self.vision_layers, vision_heads=self.vision_heads,
            text_hidden=self.text_hidden, text_intermediate=4 * self.text_hidden, text_layers=self.text_layers,
            heads=self.heads, kv_heads=self.kv_heads, head_dim=self.head_dim,
            sliding_window=512, decoder_weight_std=None, real_softcaps=True, seed=self.seed,
        )


def corpus(scenes_used: int = 3000) -> list[str]:
    """The prompts and answers of the first training scenes, so each word becomes one token."""
    placeholder = {shape: [0] * 16 for shape in scenes.SHAPES}
    lines = []
    for index in range(scenes_used):
        scene = scenes.scene("train", index)
        for prefix, suffix in tasks.examples(scene, placeholder, np.random.default_rng(index)):
            lines += [prefix, re.sub(r"<(loc|seg)\d+>", "", suffix)]  # those are added tokens
    lines += [" ".join(scenes.WORDS), " ".join(str(n) for n in range(100))]
    lines += list(scenes.WORDS) + [str(n) for n in range(100)]
    return lines


def _task_kind(prefix: str) -> str:
    return prefix.split(" ", 1)[0]


def sample_example(index: int, seg_codes: dict[str, list[int]], task_weights: dict[str, float] = TASK_WEIGHTS
                   ) -> Example:
    """Training scene ``index`` with one of its (prefix, suffix) pairs, drawn by ``task_weights``."""
    rng = np.random.default_rng([7, index])
    scene = scenes.scene("train", index)
    pairs = tasks.examples(scene, seg_codes, rng)
    weights = np.array([task_weights[_task_kind(p)] for p, _ in pairs])
    # each kind's weight is shared by its pairs, so a scene with many questions is not all questions
    kinds = [_task_kind(p) for p, _ in pairs]
    weights = weights / np.array([kinds.count(k) for k in kinds])
    prefix, suffix = pairs[rng.choice(len(pairs), p=weights / weights.sum())]
    return Example(scenes.render(scene), prefix, suffix, _task_kind(prefix))


def smooth_loc_embeddings(model, tokenizer, seed: int) -> None:
    """Start the loc-token rows as a smooth function of the bin (neighbouring bins alike), so the
    model can place boxes before it has seen every bin."""
    import torch

    ids = tokenizer.convert_tokens_to_ids([f"<loc{i:04d}>" for i in range(1024)])
    table = model.get_input_embeddings().weight
    generator = torch.Generator().manual_seed(seed)
    bins = torch.arange(1024, dtype=torch.float32)[:, None]
    freqs = 2 * math.pi * torch.logspace(0, math.log10(64), 16)[None] / 1024
    features = torch.cat([torch.sin(bins * freqs), torch.cos(bins * freqs)], dim=1)
    projected = features @ torch.randn(32, table.shape[1], generator=generator)
    with torch.no_grad():
        scale = table.std() / projected.std()
        table[ids] = projected * scale


def _fresh(config: TrainConfig, log):
    """Stage one: the VQ-VAE and its seg codes, then a new model from the config."""
    import torch

    log(f"[1/3] VQ-VAE: {config.vqvae_steps} steps on shape masks")
    mask_model = vqvae.train(steps=config.vqvae_steps, seed=config.seed)
    seg_codes = {s: [int(c) for c in mask_model.encode(scenes.box_mask(s)[None])[0]] for s in scenes.SHAPES}
    recon = {s: vqvae.mean_mask_iou(
        (mask_model.decoder(mask_model.lookup(torch.tensor([seg_codes[s]]))) > 0).numpy()[:, 0], scenes.box_mask(s)[None]
    ) for s in scenes.SHAPES}
    log(f"      seg codes {seg_codes}; reconstruction IoU {recon}")
    model, processor = build_model(config.spec(), build_tokenizer(corpus(), vocab_size=500))
    smooth_loc_embeddings(model, processor.tokenizer, config.seed)
    return model, processor, seg_codes, mask_model


def _resume(source: Path, log):
    """A checkpoint this script wrote, with its seg codes and training history (its mask decoder is kept)."""
    import torch
    from transformers import AutoProcessor, PaliGemmaForConditionalGeneration

    log(f"[1/3] resuming from {source}: its seg codes and mask decoder are kept")
    previous = json.loads((source / "training.json").read_text())
    model = PaliGemmaForConditionalGeneration.from_pretrained(source, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(source, backend="pil")
    return model, processor, previous["seg_codes"], previous["stages"]


def train(output_dir: Path, config: TrainConfig, log=print) -> dict:
    import torch

    torch.manual_seed(config.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.time()

    if config.resume_from:
        model, processor, seg_codes, history = _resume(Path(config.resume_from), log)
    else:
        model, processor, seg_codes, mask_model = _fresh(config, log)
        history = []
    vision = model.config.vision_config
    image_tokens = (vision.image_size // vision.patch_size) ** 2
    weights = dict(config.task_weights)
    parameters = sum(p.numel() for p in model.parameters())
    log(f"[2/3] PaliGemma: {parameters / 1e6:.1f}M parameters, {image_tokens} image tokens, "
        f"{config.steps} steps x {config.batch}")

    def source(step: int) -> list[list[Example]]:  # one batch a step, of scenes no step saw before
        first = config.scene_offset + step * config.batch
        return [[sample_example(first + i, seg_codes, weights) for i in range(config.batch)]]

    result = train_loop(model, source, Collator(processor), config.loop(), progress=lambda line: log("      " + line),
                        kind_of=lambda example: example.kind)

    log(f"[3/3] saving to {output_dir}")
    model.eval()
    output_dir.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(output_dir)  # 16-bit keeps the committed checkpoint small
    processor.save_pretrained(output_dir)
    if config.resume_from:
        shutil.copyfile(Path(config.resume_from) / "vae-oid.npz", output_dir / "vae-oid.npz")
    else:
        vqvae.save_npz(mask_model, output_dir / "vae-oid.npz")
    scenes.render(scenes.scene("heldout", 0)).save(output_dir / "sample.png")
    stage = {"config": asdict(config), "train_seconds": round(time.time() - started), "log": list(result.log),
             "losses": [round(x, 6) for x in result.losses]}
    record = {"seg_codes": seg_codes, "parameters": parameters, "stages": history + [stage]}
    (output_dir / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path, help="checkpoint directory to write")
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--batch", type=int, default=TrainConfig.batch)
    parser.add_argument("--vqvae-steps", type=int, default=TrainConfig.vqvae_steps)
    parser.add_argument("--lr", type=float, default=TrainConfig.lr)
    parser.add_argument("--warmup", type=int, default=TrainConfig.warmup)
    parser.add_argument("--decay-from", type=float, default=TrainConfig.decay_from,
                        help="fraction of the steps after which the lr decays (cosine to 5%%)")
    parser.add_argument("--task-weights", default=",".join(f"{k}={v:g}" for k, v in TASK_WEIGHTS.items()),
                        help="sampling weight per task kind, e.g. 'caption=2,answer=1.5,ocr=1,detect=2.5,segment=2'")
    parser.add_argument("--scene-offset", type=int, default=0, help="index of the first training scene")
    parser.add_argument("--resume-from", help="keep training a checkpoint this script wrote")
    args = parser.parse_args(argv)
    try:
        weights = {k.strip(): float(v) for k, v in (item.split("=") for item in args.task_weights.split(","))}
    except ValueError:
        parser.error(f"--task-weights: expected kind=number pairs, got '{args.task_weights}'")
    if set(weights) != set(TASK_WEIGHTS):
        parser.error(f"--task-weights needs exactly {', '.join(TASK_WEIGHTS)}")
    config = TrainConfig(steps=args.steps, batch=args.batch, vqvae_steps=args.vqvae_steps, lr=args.lr,
                         warmup=args.warmup, decay_from=args.decay_from, task_weights=tuple(weights.items()),
                         scene_offset=args.scene_offset, resume_from=args.resume_from)
    train(args.output, config, log=lambda line: print(line, flush=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
