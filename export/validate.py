"""Export validation: the written bundle, run by the runtime on ONNX Runtime, against PyTorch.

On a seeded random image and a sample prompt this checks, in order: the runtime's pixels
equal the processor's, the runtime's prompt ids equal the processor's, and the logits of
the prefill and of one KV-cached decode step match the PyTorch model's within tolerance.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..runtime.errors import PaliGemmaEdgeError
from ..runtime.generate import decode_step, prefill
from ..runtime.manifest import Manifest
from ..runtime.model import load
from ..runtime.preprocess import preprocess
from .checkpoint import Checkpoint

SAMPLE_PROMPT = "caption en"
# Prompts whose ids must equal the processor's: spaces, punctuation, non-ASCII, loc tokens, digits.
TOKENIZER_PROMPTS = [
    SAMPLE_PROMPT, "answer en what's in the  picture? ", "detect cat ; red car", "ocr",
    "answer fr Ça coûte 12,50 €?", "segment <loc0010> dog", "describe ja 猫",
]


class ValidationError(PaliGemmaEdgeError):
    """The exported graphs disagree with the PyTorch model."""


@dataclass(frozen=True)
class ValidationReport:
    """Differences of the bundle (ONNX Runtime) from PyTorch. The tolerance is relative to the
    largest reference logit (at least 1): max |delta| <= tolerance * max(1, max |logit|)."""

    prompt: str
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


def _reference_logits(checkpoint: Checkpoint, inputs: dict, next_token: int | None):
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
        out = checkpoint.model(**inputs, use_cache=False, logits_to_keep=1)
    return out.logits[:, -1, :].float().numpy()


def validate_bundle(bundle_dir: Path, manifest: Manifest, checkpoint: Checkpoint, tolerance: float) -> ValidationReport:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (manifest.image.height + 13, manifest.image.width + 7, 3), dtype=np.uint8))
    inputs = checkpoint.processor(images=[image], text=[f"<image>{SAMPLE_PROMPT}"], return_tensors="pt")
    inputs.pop("labels", None)

    with load(bundle_dir, verify=False) as runtime:
        for prompt in TOKENIZER_PROMPTS:
            ours = runtime.tokenizer.encode(prompt)
            theirs = checkpoint.processor(images=[image], text=[f"<image>{prompt}"])["input_ids"][0]
            if ours != list(theirs):
                raise ValidationError(
                    f"the bundle's tokenizer gives different ids than the checkpoint's processor for {prompt!r} "
                    f"({ours[-12:]} vs {list(theirs)[-12:]})"
                )
        batch = runtime.tokenizer.batch([SAMPLE_PROMPT])
        pixels = preprocess([image], manifest.image)
        pixel_diff = float(np.abs(pixels - inputs["pixel_values"].numpy()).max())
        if pixel_diff > 1e-5:
            raise ValidationError(f"runtime preprocessing differs from the processor by {pixel_diff:.3g} in pixel values")
        image_embeds = runtime.backend.encode_images(pixels)
        logits, state = prefill(runtime.backend, manifest.decoder, batch, image_embeds)
        reference = _reference_logits(checkpoint, inputs, None)
        prefill_diff = float(np.abs(logits - reference).max())
        next_token = int(np.argmax(reference[0]))
        decode_logits = decode_step(runtime.backend, manifest.decoder, state, np.array([next_token]))
        decode_reference = _reference_logits(checkpoint, inputs, next_token)
        decode_diff = float(np.abs(decode_logits - decode_reference).max())

    scale = float(max(np.abs(reference).max(), np.abs(decode_reference).max()))
    allowed = tolerance * max(1.0, scale)
    report = ValidationReport(
        prompt=SAMPLE_PROMPT, pixel_max_abs_diff=pixel_diff, prefill_max_abs_logit_diff=prefill_diff,
        decode_max_abs_logit_diff=decode_diff, reference_max_abs_logit=scale,
        top1_agrees=bool(np.argmax(logits[0]) == next_token and np.argmax(decode_logits[0]) == np.argmax(decode_reference[0])),
        tolerance=tolerance, passed=max(prefill_diff, decode_diff) <= allowed,
    )
    if not report.passed:
        raise ValidationError(
            f"ONNX Runtime logits differ from PyTorch by {report.max_abs_logit_diff:.3g} (allowed {allowed:.3g}: "
            f"tolerance {tolerance:g} x max |logit| {max(1.0, scale):.3g}); the export is wrong for this model, "
            "no bundle was written"
        )
    return report
