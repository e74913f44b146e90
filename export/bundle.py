"""``export_bundle``: checkpoint -> graphs, embedding, tokenizer, manifest; validated, then renamed into place.

MODEL is a full checkpoint or a PEFT adapter directory (see ``adapter``): an adapter is applied to
its base, the unmerged PEFT model gives the reference logits, and the merged model is exported.

The bundle is assembled in a temporary directory beside the output and renamed only
after validation passed, so an interrupted or failed export never leaves a bundle that loads.
"""

from __future__ import annotations

import gc
import math
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from ..runtime.bundle.writer import check_output, package_versions, staged_bundle, write_manifest
from ..runtime.errors import InputError
from ..runtime.bundle.manifest import GROWING, KV_CACHE_KINDS, EmbeddingSpec, Manifest, MaskDecoderSpec
from ..runtime.generation.mask_decoder import MaskDecoder
from .adapter import adapter_record, is_adapter_dir, load_adapted, merge_adapter, read_adapter
from .checkpoint import decoder_spec, load_checkpoint

Progress = Callable[[str], None]

DEFAULT_TEXT_TOKENS = 512
EXPORT_PACKAGES = ("paligemma-edge", "torch", "transformers", "peft", "onnx", "onnxscript", "onnxruntime", "tokenizers")
DEFAULT_TOLERANCE = 1e-3


@dataclass(frozen=True)
class ExportOptions:
    max_seq_len: int | None = None  # default: image tokens + DEFAULT_TEXT_TOKENS
    tolerance: float = DEFAULT_TOLERANCE  # max |delta logit| ONNX Runtime vs PyTorch, relative to max |logit|
    overwrite: bool = False
    mask_decoder: Path | None = None  # a vae-oid.npz, carried into the bundle for segmentation
    base: str | None = None  # an adapter's base checkpoint (dir or hub id); default: its adapter_config.json's
    # the decoder's cache: GROWING (opset 18; every backend) or INPLACE (one buffer, opset 24; ONNX Runtime, and
    # TensorRT 10.15+ / TensorRT for RTX 1.7+)
    kv_cache: str = GROWING
    # query rows per attention chunk in the vision and decoder graphs; None: export/attention.py's
    # default_query_chunk for each graph's length, 0: no chunks (every score of a layer at once)
    attention_chunk: int | None = None


def export_bundle(model: str, output: str | Path, options: ExportOptions = ExportOptions(),
                  progress: Progress = lambda message: None) -> Manifest:
    """Export MODEL to a bundle directory at OUTPUT and return its manifest."""
    from .onnx_graphs import export_decoder, export_vision
    from .validate import reference_outputs, validate_bundle

    output = Path(output).absolute()
    if not (options.tolerance > 0 and math.isfinite(options.tolerance)):
        raise InputError(f"--tolerance must be a positive number, got {options.tolerance}")
    check_output(output, options.overwrite)
    if options.base is not None and not is_adapter_dir(model):
        raise InputError(f"--base applies to a PEFT adapter directory; {model} has no adapter_config.json")
    adapter = read_adapter(model, options.base) if is_adapter_dir(model) else None
    mask_decoder = MaskDecoder.from_npz(options.mask_decoder) if options.mask_decoder else None
    started = time.perf_counter()

    def step(message: str) -> None:
        progress(f"[{time.perf_counter() - started:6.1f}s] {message}")

    if adapter is None:
        step(f"loading checkpoint {model}")
        checkpoint = load_checkpoint(model)
    else:
        step(f"loading base {adapter.base} and {adapter.peft_type} adapter {model} "
             f"(rank {adapter.rank}, targets {', '.join(adapter.target_modules)})")
        checkpoint = load_adapted(adapter)
    image_tokens = checkpoint.image.num_tokens
    max_seq_len = options.max_seq_len or image_tokens + DEFAULT_TEXT_TOKENS
    if options.kv_cache not in KV_CACHE_KINDS:
        raise InputError(f"--kv-cache must be one of {', '.join(KV_CACHE_KINDS)}, got {options.kv_cache!r}")
    if options.attention_chunk is not None and options.attention_chunk < 0:
        raise InputError(f"--attention-chunk must be 0 (no chunks) or a number of query rows, got {options.attention_chunk}")
    if max_seq_len <= image_tokens + 2:
        raise InputError(f"--max-seq-len must exceed the {image_tokens} image tokens plus <bos> and a token of text")
    step("computing PyTorch reference logits for validation" + (" (PEFT model, adapter unmerged)" if adapter else ""))
    reference = reference_outputs(checkpoint, "transformers + peft (adapter unmerged)" if adapter else "transformers")
    if adapter is not None:
        step("merging the adapter into the base weights")
        checkpoint = merge_adapter(checkpoint)
    spec = decoder_spec(checkpoint.model, max_seq_len, options.kv_cache)

    with staged_bundle(output, options.overwrite) as staging:
        step("exporting vision graph (SigLIP + projector)")
        vision = export_vision(checkpoint.model, checkpoint.image, staging / "vision.onnx", options.attention_chunk)
        step(f"exporting decoder graph ({spec.num_layers} layers, {spec.kv_cache} KV cache, prefix-LM mask)")
        decoder = export_decoder(checkpoint.model, spec, staging / "decoder.onnx", options.attention_chunk)
        step("writing tied embedding / LM head (stored once)")
        weight = checkpoint.model.model.language_model.embed_tokens.weight.detach().float().numpy()
        np.save(staging / "embedding.npy", weight)
        checkpoint.processor.tokenizer.backend_tokenizer.save(str(staging / "tokenizer.json"))
        mask_spec = None
        if mask_decoder is not None and options.mask_decoder is not None:
            shutil.copyfile(options.mask_decoder, staging / "mask_decoder.npz")
            mask_spec = MaskDecoderSpec(file="mask_decoder.npz", codebook_dim=mask_decoder.codebook_dim)

        manifest = Manifest(
            model_name=Path(model).name or model, family=checkpoint.family, precision="fp32",
            image=checkpoint.image, tokens=checkpoint.tokens, decoder=spec,
            vision_graph=vision, decoder_graph=decoder,
            embedding=EmbeddingSpec(file="embedding.npy", dtype="float32", shape=tuple(weight.shape)),
            tokenizer="tokenizer.json", files={}, versions=package_versions(EXPORT_PACKAGES), mask_decoder=mask_spec,
            adapter=adapter_record(adapter, checkpoint) if adapter else None,
        )
        manifest = write_manifest(staging, manifest)
        # The PyTorch model goes before ONNX Runtime loads the bundle: at 3B both would not fit in 24 GB.
        del checkpoint, weight
        gc.collect()
        step("validating: ONNX Runtime against PyTorch")
        report = validate_bundle(staging, manifest, reference, options.tolerance)
        manifest = write_manifest(staging, replace(manifest, validation=report.to_dict()))
        step(f"validation passed: max |delta logit| {report.max_abs_logit_diff:.2e} "
             f"(max |logit| {report.reference_max_abs_logit:.3g}, relative tolerance {options.tolerance:g})")
    step(f"wrote bundle {output}")
    return manifest


