"""What a fine-tuning run is told: :class:`FinetuneOptions` (the command's settings) and :class:`Schedule`.

What is decided here:

- LoRA through peft is the default (rank 16, alpha 32, on the language model's attention); ``full``
  trains every weight instead (no peft). The vision tower and projector stay frozen by default
  (``freeze_vision``): PaliGemma's own fine-tuning recipe freezes them for small datasets, and the
  image features of a frozen tower stay exactly those the exported image encoder computes.
- ``target="all"`` puts adapters on the vision tower too, so it cannot go with ``freeze_vision``;
  that combination is refused rather than silently trained one way or the other.
- The learning rate follows one schedule shape, shared with the shapes trainer: a linear warmup,
  flat until ``decay_from`` of the steps, then a cosine down to ``floor`` of the peak.
- Every value is checked here, so bad settings stop before the model loads (one InputError line).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..runtime.errors import InputError

TARGETS = ("attention", "attention+mlp", "all")
DEVICES = ("auto", "cpu", "cuda")
BF16_MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class Schedule:
    """Warmup for ``warmup`` steps, the peak until ``decay_from`` of the steps, then a cosine to ``floor`` x peak."""

    warmup: int = 0
    decay_from: float = 0.0
    floor: float = 0.0

    def __post_init__(self):
        if self.warmup < 0:
            raise InputError(f"warmup must be 0 or more steps, got {self.warmup}")
        if not 0.0 <= self.decay_from <= 1.0:
            raise InputError(f"decay_from is a fraction of the steps (0 to 1), got {self.decay_from}")
        if not 0.0 <= self.floor <= 1.0:
            raise InputError(f"floor is a fraction of the peak learning rate (0 to 1), got {self.floor}")

    def lr_at(self, step: int, steps: int, peak: float) -> float:
        """The learning rate of optimizer step ``step`` (0-based) of ``steps``."""
        if step < self.warmup:
            return peak * (step + 1) / self.warmup
        start = int(self.decay_from * steps)
        if step < start:
            return peak
        progress = (step - start) / max(1, steps - start)
        return peak * (self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


@dataclass(frozen=True)
class FinetuneOptions:
    """Settings of ``paligemma-edge finetune``; ``steps`` (when set) wins over ``epochs``."""

    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.0
    target: str = "attention"  # attention | attention+mlp | all
    full: bool = False  # train every weight, no adapters
    freeze_vision: bool = True
    epochs: float = 1.0
    steps: int | None = None
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    warmup: int | None = None  # steps; None: 5% of the steps
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end (when a valid split exists)
    eval_lines: int = 16
    eval_max_new_tokens: int = 64
    save_every: int = 0  # 0: no resumable checkpoints
    resume: bool = False
    merge: bool = False  # write a full checkpoint with the adapters merged in
    overwrite: bool = False
    device: str = "auto"  # auto | cpu | cuda
    bf16: str = "auto"  # auto: on CUDA with bf16 support; on | off

    def __post_init__(self):
        positive = {"lora_rank": self.lora_rank, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                    "log_every": self.log_every, "eval_lines": self.eval_lines,
                    "eval_max_new_tokens": self.eval_max_new_tokens}
        if self.steps is not None:
            positive["steps"] = self.steps
        for name, value in positive.items():
            if value < 1:
                raise InputError(f"{name} must be at least 1, got {value}")
        for name, amount in {"eval_every": self.eval_every, "save_every": self.save_every,
                             "weight_decay": self.weight_decay, "lora_dropout": self.lora_dropout}.items():
            if amount < 0:
                raise InputError(f"{name} must be 0 or more, got {amount}")
        if not (self.lr > 0 and self.lora_alpha > 0 and self.epochs > 0):
            raise InputError("lr, lora_alpha and epochs must be positive")
        if self.warmup is not None and self.warmup < 0:
            raise InputError(f"warmup must be 0 or more steps, got {self.warmup}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise InputError(f"max_grad_norm must be positive (or None: no clipping), got {self.max_grad_norm}")
        if self.lora_dropout >= 1:
            raise InputError(f"lora_dropout must be below 1, got {self.lora_dropout}")
        for name, choice, allowed in (("target", self.target, TARGETS), ("device", self.device, DEVICES),
                                      ("bf16", self.bf16, BF16_MODES)):
            if choice not in allowed:
                raise InputError(f"{name} must be one of {', '.join(allowed)}, got '{choice}'")
        if self.full and self.merge:
            raise InputError("--merge goes with LoRA adapters; --full already writes a full checkpoint")
        if not self.full and self.target == "all" and self.freeze_vision:
            raise InputError("target 'all' puts adapters on the vision tower: pass --no-freeze-vision with it")

    def total_steps(self, train_lines: int) -> int:
        """``steps``, or ``epochs`` passes over ``train_lines`` (a partial last step counts)."""
        if self.steps is not None:
            return self.steps
        per_step = self.batch_size * self.grad_accum
        return max(1, math.ceil(self.epochs * train_lines / per_step))

    def schedule(self, steps: int) -> Schedule:
        """Warmup then a cosine to 0 over the whole run (the usual LoRA recipe)."""
        warmup = self.warmup if self.warmup is not None else max(1, steps // 20)
        return Schedule(warmup=min(warmup, steps))
