"""Export validation: the written bundle, run by the runtime on ONNX Runtime, against PyTorch.

On a seeded random image and a sample prompt this checks, in order: the runtime's prompt ids
equal the processor's, the runtime's pixels equal the processor's, and the logits of
the prefill and of one KV-cached decode step match the PyTorch model's within tolerance.
The PyTorch side (``reference_outputs``) runs first, so the model can be released before the
bundle is loaded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..runtime.errors import PaliGemmaEdgeError
from ..runtime.generation.loop import decode_step, prefill
from ..runtime.bundle.manifest import Manifest
from ..runtime.model import load
from ..runtime.preprocess import preprocess
from .checkpoint import Checkpoint

SAMPLE_PROMPT = "caption en"
# Prompts whose ids must equal the processor's: spaces at either end and doubled, tabs, newlines,
# punctuation, non-Latin scripts, emoji, loc tokens, digits, the empty prompt.
TOKENIZER_PROMPTS = [
    SAMPLE_PROMPT, "answer en what's in the  picture? ", " detect cat ; red car", "ocr", "",
    "answer fr Ça coûte 12,50 €?", "segment <loc0010> dog", "describe ja 猫", "answer en a\tb\nc 🐈",
]


class ValidationError(PaliGemmaEdgeError):
    """The exported graphs disagree with the PyTorch model."""


@dataclass(frozen=True)
class ValidationReport:
    """Differences of the bundle (ONNX Runtime) from PyTorch. The tolerance is relative to the
    largest reference logit (at least 1): max |delta| <= tolerance * max(1, max |logit|)."""

    prompt: str
    reference: str  # what the logits were compared with: "transformers", or the unmerged PEFT model
    pixel_max_abs_diff: float
    prefill_max_abs_logit_diff: float
    decode_max_abs_logit_diff: float
    reference_max_abs_logit: float
    top1_agrees: bool
    tolerance: float
    passed: bool

    @property
    def max_abs_logit_diff(self) -> float:
        return max(self.prefill_max_abs_logit_diff, self.decode_max_abs_logit_diff)

    def to_dict(self) -> dict:
        return asdict(self) | {"max_abs_logit_diff": self.max_abs_logit_diff, "backend": "onnxruntime"}


@dataclass
class Reference:
    """What the PyTorch model and its processor give on the validation inputs, computed before the
    bundle is run so that the model can be released first (a 3B model and its bundle need not both fit)."""

    model: str  # what computed them, recorded in the report
    image: Image.Image
    pixel_values: np.ndarray
    prompt_ids: dict[str, list[int]]
    prefill_logits: np.ndarray
    next_token: int
    decode_logits: np.ndarray


def _reference_logits(model, inputs: dict, next_token: int | None) -> np.ndarray:
    """PyTorch logits at the last position: of the prompt, or of prompt + next_token."""
    import torch

    if next_token is not None:
        extra = torch.tensor([[next_token]])
        inputs = dict(inputs)
        inputs["input_ids"] = torch.cat([inputs["input_ids"], extra], dim=1)
        inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(extra)], dim=1)
        # The generated token is suffix (type 1): causal, outside the bidirectional prefix.
        inputs["token_type_ids"] = torch.cat([inputs["token_type_ids"], torch.ones_like(extra)], dim=1)
    with torch.no_grad():
        out = model(**inputs, use_cache=False, logits_to_keep=1)
    return out.logits[:, -1, :].float().numpy()


def reference_outputs(checkpoint: Checkpoint, model: str = "transformers") -> Reference:
    """The processor's pixels and prompt ids and the model's prefill and next-step logits on a seeded image.

    ``checkpoint.model`` is any module called like PaliGemmaForConditionalGeneration: the model
    itself, or a PEFT model wrapping it (``model`` names which, for the report)."""
    rng = np.random.default_rng(0)
    size = checkpoint.image
    image = Image.fromarray(rng.integers(0, 256, (size.height + 13, size.width + 7, 3), dtype=np.uint8))
    processor = checkpoint.processor
    inputs = processor(images=[image], text=[f"<image>{SAMPLE_PROMPT}"], return_tensors="pt")
    inputs.pop("labels", None)
    prompt_ids = {p: list(processor(images=[image], text=[f"<image>{p}"])["input_ids"][0]) for p in TOKENIZER_PROMPTS}
    prefill_logits = _reference_logits(checkpoint.model, inputs, None)
    next_token = int(np.argmax(prefill_logits[0]))
    return Reference(
        model=model, image=image, pixel_values=inputs["pixel_values"].numpy(), prompt_ids=prompt_ids,
        prefill_logits=prefill_logits, next_token=next_token,
        decode_logits=_reference_logits(checkpoint.model, inputs, next_token),
    )


def validate_bundle(bundle_dir: Path, manifest: Manifest, reference: Reference, tolerance: float) -> ValidationReport:
    with load(bundle_dir, verify=False) as runtime:
        for prompt, theirs in reference.prompt_ids.items():
            ours = runtime.tokenizer.encode(prompt)
            if ours != theirs:
                raise ValidationError(
                    f"the bundle's tokenizer gives different ids than the checkpoint's processor for {prompt!r} "
                    f"({ours[-12:]} vs {theirs[-12:]})"
                )
        batch = runtime.tokenizer.batch([SAMPLE_PROMPT])
        pixels = preprocess([reference.image], manifest.image)
        pixel_diff = float(np.abs(pixels - reference.pixel_values).max())
        if pixel_diff > 1e-5:
            raise ValidationError(f"runtime preprocessing differs from the processor by {pixel_diff:.3g} in pixel values")
        image_embeds = runtime.backend.encode_images(pixels)
        logits, state = prefill(runtime.backend, manifest.decoder, batch, image_embeds, new_tokens=1)
        prefill_diff = float(np.abs(logits - reference.prefill_logits).max())
        next_token = reference.next_token
        decode_logits = decode_step(runtime.backend, manifest.decoder, state, np.array([next_token]))
        decode_diff = float(np.abs(decode_logits - reference.decode_logits).max())

    scale = float(max(np.abs(reference.prefill_logits).max(), np.abs(reference.decode_logits).max()))
    allowed = tolerance * max(1.0, scale)
    report = ValidationReport(
        prompt=SAMPLE_PROMPT, reference=reference.model, pixel_max_abs_diff=pixel_diff,
        prefill_max_abs_logit_diff=prefill_diff, decode_max_abs_logit_diff=decode_diff, reference_max_abs_logit=scale,
        top1_agrees=bool(np.argmax(logits[0]) == next_token
                         and np.argmax(decode_logits[0]) == np.argmax(reference.decode_logits[0])),
        tolerance=tolerance, passed=max(prefill_diff, decode_diff) <= allowed,
    )
    if not report.passed:
        raise ValidationError(
            f"ONNX Runtime logits differ from PyTorch by {report.max_abs_logit_diff:.3g} (allowed {allowed:.3g}: "
            f"tolerance {tolerance:g} x max |logit| {max(1.0, scale):.3g}); the export is wrong for this model, "
            "no bundle was written"
        )
    return report
