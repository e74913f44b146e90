"""``export_bundle``: checkpoint -> graphs, embedding, tokenizer, manifest; validated, then renamed into place.

The bundle is assembled in a temporary directory beside the output and renamed only
after validation passed, so an interrupted or failed export never leaves a bundle that loads.
"""

from __future__ import annotations

import importlib.metadata
import math
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from ..runtime.errors import InputError
from ..runtime.manifest import MANIFEST_NAME, EmbeddingSpec, Manifest, MaskDecoderSpec, sha256_file
from ..runtime.mask_decoder import MaskDecoder
from .checkpoint import decoder_spec, load_checkpoint

Progress = Callable[[str], None]

DEFAULT_TEXT_TOKENS = 512
DEFAULT_TOLERANCE = 1e-3


@dataclass(frozen=True)
class ExportOptions:
    max_seq_len: int | None = None  # default: image tokens + DEFAULT_TEXT_TOKENS
    tolerance: float = DEFAULT_TOLERANCE  # max |delta logit| ONNX Runtime vs PyTorch, relative to max |logit|
    overwrite: bool = False
    mask_decoder: Path | None = None  # a vae-oid.npz, carried into the bundle for segmentation


def _versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("paligemma-edge", "torch", "transformers", "onnx", "onnxscript", "onnxruntime", "tokenizers"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def _check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise InputError(f"{output}: exists and is not a directory")
    if output.exists() and not overwrite:
        raise InputError(f"{output}: already exists (use --force to replace it)")
    if output.exists() and not (output / MANIFEST_NAME).is_file() and any(output.iterdir()):
        raise InputError(f"{output}: exists and is not a bundle; refusing to replace it")
    if not output.parent.is_dir():
        raise InputError(f"{output.parent}: no such directory")


def _staging_dir(output: Path) -> Path:
    """A fresh hidden directory beside OUTPUT; leftovers of killed exports to the same OUTPUT go first."""
    for stale in output.parent.glob(f".{output.name}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.partial-", dir=output.parent))
    except OSError as exc:
        raise InputError(f"{output.parent}: cannot create the bundle here ({exc.strerror})") from None
    staging.chmod(0o755)  # mkdtemp makes it private; a bundle is an ordinary directory
    return staging


def _move_into_place(staging: Path, output: Path) -> None:
    if output.exists():
        trash = output.with_name(f".{output.name}.old-{int(time.time())}")
        output.rename(trash)
        staging.rename(output)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        staging.rename(output)


def export_bundle(model: str, output: str | Path, options: ExportOptions = ExportOptions(),
                  progress: Progress = lambda message: None) -> Manifest:
    """Export MODEL to a bundle directory at OUTPUT and return its manifest."""
    from .onnx_graphs import export_decoder, export_vision
    from .validate import validate_bundle

    output = Path(output).absolute()
    if not (options.tolerance > 0 and math.isfinite(options.tolerance)):
        raise InputError(f"--tolerance must be a positive number, got {options.tolerance}")
    _check_output(output, options.overwrite)
    mask_decoder = MaskDecoder.from_npz(options.mask_decoder) if options.mask_decoder else None
    started = time.perf_counter()

    def step(message: str) -> None:
        progress(f"[{time.perf_counter() - started:6.1f}s] {message}")

    step(f"loading checkpoint {model}")
    checkpoint = load_checkpoint(model)
    image_tokens = checkpoint.image.num_tokens
    max_seq_len = options.max_seq_len or image_tokens + DEFAULT_TEXT_TOKENS
    if max_seq_len <= image_tokens + 2:
        raise InputError(f"--max-seq-len must exceed the {image_tokens} image tokens plus <bos> and a token of text")
    spec = decoder_spec(checkpoint.model, max_seq_len)

    staging = _staging_dir(output)
    try:
        step("exporting vision graph (SigLIP + projector)")
        vision = export_vision(checkpoint.model, checkpoint.image, staging / "vision.onnx")
        step(f"exporting decoder graph ({spec.num_layers} layers, KV cache, prefix-LM mask)")
        decoder = export_decoder(checkpoint.model, spec, staging / "decoder.onnx")
        step("writing tied embedding / LM head (stored once)")
        weight = checkpoint.model.model.language_model.embed_tokens.weight.detach().float().numpy()
        np.save(staging / "embedding.npy", weight)
        checkpoint.processor.tokenizer.backend_tokenizer.save(str(staging / "tokenizer.json"))
        mask_spec = None
        if mask_decoder is not None:
            shutil.copyfile(options.mask_decoder, staging / "mask_decoder.npz")
            mask_spec = MaskDecoderSpec(file="mask_decoder.npz", codebook_dim=mask_decoder.codebook_dim)

        manifest = Manifest(
            model_name=Path(model).name or model, family=checkpoint.family, precision="fp32",
            image=checkpoint.image, tokens=checkpoint.tokens, decoder=spec,
            vision_graph=vision, decoder_graph=decoder,
            embedding=EmbeddingSpec(file="embedding.npy", dtype="float32", shape=tuple(weight.shape)),
            tokenizer="tokenizer.json", files={}, versions=_versions(), mask_decoder=mask_spec,
        )
        manifest = _write_manifest(staging, manifest)
        step("validating: ONNX Runtime against PyTorch")
        report = validate_bundle(staging, manifest, checkpoint, options.tolerance)
        manifest = _write_manifest(staging, replace(manifest, validation=report.to_dict()))
        step(f"validation passed: max |delta logit| {report.max_abs_logit_diff:.2e} "
             f"(max |logit| {report.reference_max_abs_logit:.3g}, relative tolerance {options.tolerance:g})")
        _move_into_place(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    step(f"wrote bundle {output}")
    return manifest


def _write_manifest(directory: Path, manifest: Manifest) -> Manifest:
    files = {
        p.name: sha256_file(p) for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST_NAME
    }
    manifest = replace(manifest, files=files)
    (directory / MANIFEST_NAME).write_text(manifest.to_json())
    return manifest
