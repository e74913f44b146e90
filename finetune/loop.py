"""The one training loop of the repository: finetune (LoRA or full) and the shapes trainer both run it.

    result = train_loop(model, source, collate, LoopConfig(steps=..., lr=...), progress=print)

``source(step)`` gives the micro-batches of examples of an optimizer step and ``collate`` turns a
micro-batch into the model's inputs with ``labels`` (-100 where there is no loss). What is decided here:

- The loss is the mean cross entropy over the step's label tokens, all micro-batches together
  (each micro-batch's token sum is divided by the step's total token count before ``backward``),
  so ``grad_accum`` x ``batch`` gives the same gradient as one big batch.
- AdamW over the trainable parameters, weight decay only on matrices that are not embeddings;
  gradients clipped to ``max_grad_norm``; the lr set from the schedule before every step.
- bf16 autocast (when asked) covers the forward pass only; weights, loss and optimizer stay fp32.
- A checkpoint (:func:`save_checkpoint`) holds the trainable weights, the optimizer, the torch RNG and
  the log, written to a temporary file and renamed; with a source that is a pure function of the step
  (finetune's is) a resumed run repeats an uninterrupted one step for step.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence, TypeVar

from ..runtime.errors import InputError
from .options import Schedule

if TYPE_CHECKING:
    import torch

Progress = Callable[[str], None]
ExampleT = TypeVar("ExampleT")  # what ``source`` gives and ``collate`` takes (finetune's and shapes' Example)


@dataclass(frozen=True)
class LoopConfig:
    """How the loop trains; the defaults are finetune's, the shapes recipe sets its own."""

    steps: int
    lr: float
    schedule: Schedule = Schedule()
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float | None = 1.0
    bf16: bool = False
    device: str = "cpu"
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate at the end only
    save_every: int = 0  # 0: no checkpoints

    def __post_init__(self):
        if self.steps < 1 or self.log_every < 1 or self.lr <= 0:
            raise InputError("steps and log_every must be at least 1, lr positive")


@dataclass(frozen=True)
class LogEntry:
    step: int  # 1-based: the number of optimizer steps done
    loss: float  # mean over the steps since the last entry
    lr: float
    seconds: float
    kinds: dict[str, float] = field(default_factory=dict)  # mean loss per task kind since the last entry


@dataclass
class LoopState:
    """What a checkpoint restores: the next step, the per-step losses, the log and the evaluations."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    log: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    seconds: float = 0.0  # training time before this process (resumed runs)


@dataclass(frozen=True)
class LoopResult:
    steps: int
    losses: tuple[float, ...]  # one per optimizer step
    log: tuple[dict, ...]
    evals: tuple[dict, ...]
    seconds: float
    resumed_at: int  # 0 for a run from scratch


def trainable_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def make_optimizer(model, config: LoopConfig):
    import torch

    named = trainable_parameters(model)
    if not named:
        raise InputError("nothing to train: every parameter of the model is frozen")
    decay = [p for n, p in named if p.dim() >= 2 and "embed" not in n]
    rest = [p for n, p in named if not (p.dim() >= 2 and "embed" not in n)]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, betas=config.betas)


def _token_losses(model, batch: dict, config: LoopConfig):
    """Per-token cross entropy [rows, tokens-1] and its mask (labels shifted by one, as causal LMs are)."""
    import torch

    inputs = {k: v.to(config.device) for k, v in batch.items() if k != "labels"}
    labels = batch["labels"].to(config.device)
    with torch.autocast(torch.device(config.device).type, dtype=torch.bfloat16, enabled=config.bf16):
        logits = model(**inputs).logits
    token_loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), labels[:, 1:], reduction="none", ignore_index=-100)
    return token_loss, (labels[:, 1:] != -100).float()


def train_step(model, optimizer, micro_batches: Sequence[dict], config: LoopConfig, lr: float
               ) -> tuple[float, list[float]]:
    """One optimizer step over ``micro_batches``: (the step's mean token loss, each row's mean loss)."""
    import torch

    total = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches)
    if total == 0:
        raise InputError("a training step has no answer tokens to learn (every suffix empty?)")
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss_sum, rows = 0.0, []
    for batch in micro_batches:
        token_loss, mask = _token_losses(model, batch, config)
        summed = (token_loss * mask).sum()
        (summed / total).backward()
        loss_sum += float(summed.detach())
        rows += ((token_loss * mask).sum(1) / mask.sum(1).clamp(min=1)).tolist()
    if config.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_([p for _, p in trainable_parameters(model)], config.max_grad_norm)
    optimizer.step()
    return loss_sum / total, rows


def save_checkpoint(path: Path, model, optimizer, state: LoopState, meta: dict) -> Path:
    """The trainable weights, optimizer, RNG, log and ``meta`` (what the run was) at ``state.step``."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "meta": meta, "step": state.step, "losses": state.losses, "log": state.log, "evals": state.evals,
        "seconds": state.seconds,
        "weights": {n: p.detach().cpu() for n, p in trainable_parameters(model)},
        "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(),
    }
    temporary = path.with_name(path.name + ".partial")
    torch.save(payload, temporary)
    os.replace(temporary, path)
    return path


def load_checkpoint(path: Path, model, optimizer, meta: dict) -> LoopState:
    """Restore a :func:`save_checkpoint` file into ``model`` and ``optimizer``; refused when it was a different run."""
    import torch

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as exc:
        raise InputError(f"{path}: not a readable checkpoint ({exc})") from None
    if payload["meta"] != meta:
        changed = sorted(k for k in set(meta) | set(payload["meta"]) if meta.get(k) != payload["meta"].get(k))
        raise InputError(f"{path}: the checkpoint is of a different run (differs in {', '.join(changed)}); "
                         "resume with the same settings or start again without --resume")
    named = dict(trainable_parameters(model))
    if set(named) != set(payload["weights"]):
        raise InputError(f"{path}: the checkpoint's trainable weights do not match this model")
    with torch.no_grad():
        for name, value in payload["weights"].items():
            named[name].copy_(value)
    optimizer.load_state_dict(payload["optimizer"])
    torch.set_rng_state(payload["rng"])
    return LoopState(payload["step"], list(payload["losses"]), list(payload["log"]), list(payload["evals"]),
                     float(payload["seconds"]))


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


def _scores_line(scores: dict) -> str:
    """The numeric results of an evaluation, ``name value`` each (the rest, e.g. samples, left out)."""
    shown = [f"{name} {value:.3f}" for name, value in scores.items()
             if isinstance(value, (int, float)) and not isinstance(value, bool) and name != "lines"]
    return ", ".join(shown) or "done"


def train_loop(model, source: Callable[[int], Sequence[Sequence[ExampleT]]],
               collate: Callable[[Sequence[ExampleT]], dict],
               config: LoopConfig, progress: Progress = lambda line: None,
               evaluate: Callable[[object, int], dict] | None = None,
               checkpoint: Callable[[object, object, LoopState], object] | None = None,
               state: LoopState | None = None, optimizer=None, kind_of: Callable[[ExampleT], str] | None = None
               ) -> LoopResult:
    """Train ``model`` for ``config.steps`` optimizer steps from ``state.step`` (0: from scratch).

    ``evaluate(model, step)`` runs every ``eval_every`` steps and after the last; ``checkpoint(model,
    optimizer, state)`` every ``save_every`` steps; ``kind_of(example)`` groups the logged loss by task."""
    state = state or LoopState()
    optimizer = optimizer or make_optimizer(model, config)
    resumed_at, before = state.step, state.seconds
    started = time.perf_counter()
    window: list[float] = []
    kinds: dict[str, list[float]] = {}
    model.train()
    for step in range(state.step, config.steps):
        examples = source(step)
        lr = config.schedule.lr_at(step, config.steps, config.lr)
        loss, rows = train_step(model, optimizer, [collate(micro) for micro in examples], config, lr)
        if not math.isfinite(loss):
            raise InputError(f"the loss is {loss} at step {step + 1}: lower the learning rate")
        state.step, state.losses = step + 1, state.losses + [loss]
        window.append(loss)
        if kind_of is not None:
            for example, value in zip((e for micro in examples for e in micro), rows):
                kinds.setdefault(kind_of(example), []).append(value)
        elapsed = before + time.perf_counter() - started
        if state.step % config.log_every == 0 or state.step == config.steps:
            done = state.step - resumed_at
            left = (time.perf_counter() - started) / done * (config.steps - state.step)
            entry = LogEntry(state.step, sum(window) / len(window), lr, round(elapsed, 2),
                             {k: sum(v) / len(v) for k, v in sorted(kinds.items())})
            state.log = state.log + [entry.__dict__]
            by_kind = "".join(f" {k} {v:.3f}" for k, v in entry.kinds.items()) if len(entry.kinds) > 1 else ""
            progress(f"step {state.step}/{config.steps}  loss {entry.loss:.4f}{by_kind}  lr {lr:.2e}  "
                     f"{_clock(elapsed)} elapsed, {_clock(left)} left")
            window, kinds = [], {}
        last = state.step == config.steps
        if evaluate is not None and (last or (config.eval_every and state.step % config.eval_every == 0)):
            model.eval()
            scores = evaluate(model, state.step)
            state.evals = state.evals + [{"step": state.step, **scores}]
            progress(f"eval at step {state.step}: {_scores_line(scores)}")
            model.train()
        if checkpoint is not None and config.save_every and state.step % config.save_every == 0 and not last:
            state.seconds = before + time.perf_counter() - started
            checkpoint(model, optimizer, state)
    model.eval()
    seconds = before + time.perf_counter() - started
    return LoopResult(state.step, tuple(state.losses), tuple(state.log), tuple(state.evals), round(seconds, 2),
                      resumed_at)
