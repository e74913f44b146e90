"""``quantize_bundle``: an fp32 bundle -> an fp16, int8 or int4 bundle, written atomically beside it.

The manifest of the result records, per graph, the precision, method and parameters, and for
every graph that computes in fp16 which nodes were kept in fp32 and why (measured on calibration
feeds: see ``fp16``); every backend reads that, nothing is guessed from
file names. The tied embedding / LM head is stored once: fp16 for fp16 bundles, int8 in blocks for
int8 and int4 bundles (``keep_embeddings`` leaves it fp32).

Two targets. ``onnxruntime`` (the default) uses the formats ONNX Runtime's CPU kernels are
fastest with: int8 DynamicQuantizeMatMul (dynamic) and int4 MatMulNBits, with the int8 table read by an
8-bit MatMulNBits LM head (see ``embedding``). ``tensorrt`` writes what TensorRT's ONNX parser takes in a strongly typed
network: weight-only int8 (per-channel Q/DQ) and int4 (blocked DequantizeLinear), both on fp16
activations, and the table in fp16 (TensorRT has no integer LM head). Both run on ONNX Runtime too.
"""

from __future__ import annotations

import logging
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from ..runtime.bundle.writer import EXTERNAL_DATA_THRESHOLD, check_output, package_versions, staged_bundle, write_manifest
from ..runtime.errors import InputError, PaliGemmaEdgeError
from ..runtime.bundle.manifest import EmbeddingSpec, GraphSpec, Manifest, TensorSpec, read_manifest, verify_files
from . import calibration, embedding, fp16, methods

PRECISIONS = ("fp16", "int8", "int4")
INT8_METHODS = ("dynamic", "static", "weight-only")
TARGETS = ("onnxruntime", "tensorrt")
QUANTIZE_PACKAGES = ("paligemma-edge", "onnx", "onnxruntime", "numpy")

Progress = Callable[[str], None]

_ELEM_TYPES = {
    onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.BOOL: "bool", onnx.TensorProto.INT8: "int8",
}


@dataclass(frozen=True)
class QuantizeOptions:
    precision: str
    target: str = "onnxruntime"  # or "tensorrt": formats TensorRT's parser takes (see the module doc)
    # dynamic | static (Q/DQ weights and activations, calibrated) | weight-only (Q/DQ weights, fp16 activations);
    # default: dynamic for onnxruntime, weight-only for tensorrt
    int8_method: str | None = None
    calibration: Path | None = None  # images (and optional prompts.txt), or a dataset PATH[:split] (see calibration)
    block_size: int = 32  # int4
    int4_activations: str | None = None  # fp32 | fp16; default: fp32, fp16 for tensorrt
    keep_embeddings: bool = False  # int8/int4: leave the tied embedding at the source precision
    fp16_io: bool = False  # fp16: graph inputs/outputs and the KV cache in fp16 too
    overwrite: bool = False

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise InputError(f"unknown precision '{self.precision}'; choose from: {', '.join(PRECISIONS)}")
        if self.target not in TARGETS:
            raise InputError(f"unknown target '{self.target}'; choose from: {', '.join(TARGETS)}")
        tensorrt = self.target == "tensorrt"
        if self.int8_method is None:
            object.__setattr__(self, "int8_method", "weight-only" if tensorrt else "dynamic")
        if self.int4_activations is None:
            object.__setattr__(self, "int4_activations", "fp16" if tensorrt else "fp32")
        if self.int8_method not in INT8_METHODS:
            raise InputError(f"unknown int8 method '{self.int8_method}'; choose from: {', '.join(INT8_METHODS)}")
        if tensorrt and self.precision == "int8" and self.int8_method == "dynamic":
            raise InputError("TensorRT has no dynamic int8 (DynamicQuantizeLinear): use --int8-method weight-only "
                             "(the default for --target tensorrt) or static")
        if tensorrt and self.precision == "int4" and self.int4_activations != "fp16":
            raise InputError("TensorRT's int4 weights need fp16 activations: drop --int4-activations fp32")
        if self.precision == "int8" and self.int8_method == "static" and self.calibration is None:
            raise InputError("static int8 needs --calibration DIR with real images (and optionally prompts.txt), "
                             "or --calibration PATH[:split] of a PaliGemma JSONL dataset")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise InputError(f"--block-size must be a power of two >= 16, got {self.block_size}")
        if self.int4_activations not in ("fp32", "fp16"):
            raise InputError("--int4-activations is fp32 or fp16")


def _save_graph(model: onnx.ModelProto, path: Path) -> tuple[str, ...]:
    if model.ByteSize() >= EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{path.name}.data", size_threshold=1024)
        return (f"{path.name}.data",)
    onnx.save_model(model, str(path))
    return ()


def _io_specs(model: onnx.ModelProto, old: GraphSpec) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """I/O specs of a rewritten graph: names and dtypes from the graph, dims from the source spec."""
    dims = {t.name: t.shape for t in (*old.inputs, *old.outputs)}

    def spec(value) -> TensorSpec:
        tensor = value.type.tensor_type
        old = dims.get(value.name, ())
        shape = [d.dim_param or d.dim_value or (old[i] if i < len(old) else 0) for i, d in enumerate(tensor.shape.dim)]
        return TensorSpec(value.name, _ELEM_TYPES[tensor.elem_type], tuple(shape))

    return tuple(spec(v) for v in model.graph.input), tuple(spec(v) for v in model.graph.output)


@contextmanager
def _quiet_quantizers():
    """onnxruntime.quantization logs advice and per-node skips at WARNING/INFO; our progress lines suffice."""
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    from onnxruntime.quantization import matmul_nbits_quantizer  # noqa: F401 - it calls logging.basicConfig

    names = [""] + [n for n in logging.root.manager.loggerDict if n.startswith("onnxruntime")]
    loggers = [logging.getLogger(n) for n in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]


class _Quantizer:
    """One quantize run: the source bundle, the options, the staging directory, the report."""

    def __init__(self, source: Path, manifest: Manifest, options: QuantizeOptions, staging: Path, step: Progress):
        self.source, self.manifest, self.options, self.staging, self.step = source, manifest, options, staging, step
        self.report: dict = {"source_precision": manifest.precision}

    def calibration_set(self, inputs: calibration.CalibrationInputs) -> calibration.CalibrationSet:
        self.step(f"recording calibration inputs: {inputs.describe()}")
        recorded = calibration.record(self.source, inputs.pairs)
        self.report["calibration"] = inputs.report() | {"decoder_feeds": len(recorded.decoder)}
        return recorded

    @property
    def table_dtype(self) -> str:
        """The tied table's dtype in the new bundle."""
        options = self.options
        if options.precision == "fp16" or (options.target == "tensorrt" and not options.keep_embeddings):
            return "float16"
        return "float32" if options.keep_embeddings else "int8"

    def embedding(self) -> tuple[EmbeddingSpec, dict[str, np.ndarray]]:
        """Write the tied table at its new precision; returns its spec and the 'embedding' input the decoder
        takes while it is quantized (an int8 table replaces the float head only after that)."""
        spec = self.manifest.embedding
        table = np.load(self.source / spec.file, mmap_mode="r")
        if self.table_dtype == "int8":
            block_size = embedding.head_block_size(spec.shape[1])
            blocks, scales = embedding.quantize_blocks(table, block_size)
            np.save(self.staging / embedding.TABLE_FILE, blocks)
            np.save(self.staging / embedding.SCALE_FILE, scales)
            return (EmbeddingSpec(embedding.TABLE_FILE, "uint8", spec.shape, scale_file=embedding.SCALE_FILE,
                                  block_size=block_size), {"embedding": table})
        table = np.asarray(table, dtype=np.float16 if self.table_dtype == "float16" else np.float32)
        np.save(self.staging / embedding.TABLE_FILE, table)
        return EmbeddingSpec(embedding.TABLE_FILE, str(table.dtype), spec.shape), {"embedding": table}

    @property
    def fp16_activations(self) -> bool:
        """Whether the new graphs compute in fp16: --precision fp16, and the weight-only formats on fp16
        activations (int8 weight-only, int4 with --int4-activations fp16: every --target tensorrt bundle)."""
        options = self.options
        return (options.precision == "fp16" or options.precision == "int4" and options.int4_activations == "fp16"
                or options.precision == "int8" and options.int8_method == "weight-only")

    def graph(self, name: str, spec: GraphSpec, feeds: list[dict]) -> GraphSpec:
        model = onnx.load(str(self.source / spec.file))
        options = self.options
        exclude: list[str] = []
        fp16_activations = self.fp16_activations and options.precision != "fp16"
        head = ""
        if name == "decoder" and self.table_dtype == "float16" and options.precision != "fp16" and not fp16_activations:
            exclude = embedding.fp16_lm_head(model)  # an fp32 graph with the fp16 table
            head = "fp16 table (Cast, MatMul, Cast)"
        elif name == "decoder" and options.precision != "fp16":
            exclude = [embedding.lm_head_node(model).name]  # the head stays at the table's precision
        kept = self._measured_fp32(name, model, feeds) if self.fp16_activations else None
        kept_nodes = list(kept.kept_nodes) if kept else []
        # a MatMul kept in fp32 keeps its fp32 weight too (and its name, which the fp16 conversion looks for)
        kept_matmuls = [n.name for n in model.graph.node if n.name in set(kept_nodes) and n.op_type == "MatMul"]
        if options.precision == "fp16":
            model = fp16.convert(model, keep_io=self._fp32_io(model), node_block_list=kept_nodes + exclude)
            params = {"method": "fp16", "fp16_io": self.options.fp16_io}
        elif options.precision == "int8" and options.int8_method == "static":
            model, params = methods.int8_static(model, feeds, exclude)
        elif options.precision == "int8" and options.int8_method == "weight-only":
            model, params = methods.int8_weight_only(model, exclude + kept_matmuls)
        elif options.precision == "int8":
            model, params = methods.int8_dynamic(model, exclude)
        elif options.target == "tensorrt":
            model, params = methods.int4_qdq(model, options.block_size, exclude + kept_matmuls)
        else:
            model, params = methods.int4_blocks(model, options.block_size, exclude + kept_matmuls)
        if fp16_activations:
            # with an fp16 table the head is converted with the rest; an fp32 or int8 table keeps its head
            blocked = exclude if self.table_dtype != "float16" else []
            model = fp16.convert(model, keep_io=self._fp32_io(model), node_block_list=blocked + kept_nodes)
            params["activations"] = "fp16"
        if kept is not None:
            params["ranges"] = kept.to_dict()
        params["target"] = options.target
        if name == "decoder" and self.table_dtype == "int8":
            # after the layers are quantized: the new head reads the table embedding() wrote beside the graph
            head = embedding.blocked_int8_lm_head(model, self.staging, head_name=exclude[0])
        if head:
            params["lm_head"] = head
        external = _save_graph(model, self.staging / spec.file)
        inputs, outputs = _io_specs(model, spec)
        return GraphSpec(spec.file, inputs, outputs, options.precision, external, params)

    def _fp32_io(self, model: onnx.ModelProto) -> list[str]:
        """Graph I/O that stays fp32 in an fp16 conversion: everything unless --fp16-io, and the embedding
        table unless the table itself is fp16."""
        keep = {"embedding"} if self.table_dtype != "float16" else set()
        names = [v.name for v in (*model.graph.input, *model.graph.output)]
        return [n for n in names if n in keep or (not self.options.fp16_io and n != "embedding")]

    def _measured_fp32(self, name: str, model: onnx.ModelProto, feeds: list[dict]) -> fp16.RangeReport:
        """What stays fp32 in an fp16-activation graph: measured on the source graph's calibration feeds."""
        maxima = fp16.measure_ranges(model, feeds)
        kept = fp16.nodes_out_of_range(model, maxima, feeds=len(feeds))
        rule = f", RMSNorm reductions whole: {kept.rms_norm_reductions}" if kept.rms_norm_reductions else ""
        self.step(f"{name}: max |activation| {kept.max_abs_activation:.4g} over {len(feeds)} feed(s); "
                  f"{len(kept.measured_nodes)} node(s) beyond +-{kept.threshold:g}{rule}; "
                  f"{len(kept.kept_nodes)} kept in fp32")
        return kept


class NonFiniteOutputError(PaliGemmaEdgeError):
    """The quantized bundle's smoke run gave inf or NaN: the bundle is not written."""


_NON_FINITE_ADVICE = {
    "fp16": "try --precision int8 or int4 (fp32 activations), or --calibration DIR with your own pictures so the "
            "ranges that overflow are measured",
    "fp32": "try --calibration DIR with your own pictures, or --keep-embeddings",
}


def _check_finite(values: np.ndarray, graph: str, stage: str, options: QuantizeOptions, activations: str) -> None:
    if not np.isfinite(values).all():
        bad = int(np.size(values) - np.isfinite(values).sum())
        advice = ("drop --fp16-io (the graphs' inputs and outputs in fp16), or "
                  if options.fp16_io else "") + _NON_FINITE_ADVICE[activations]
        raise NonFiniteOutputError(
            f"the quantized {graph} graph gives non-finite values ({bad} of {np.size(values)} {stage}) on the smoke "
            f"input; the bundle was not written: {advice}")


def _smoke_test(bundle: Path, options: QuantizeOptions, activations: str) -> None:
    """Load the staged bundle with the runtime, encode pictures, prefill and decode two tokens: every
    image embedding and logit must be finite. A bundle that cannot run is not written."""
    from ..runtime.generation.loop import decode_step, prefill
    from ..runtime.model import load

    with load(bundle, verify=False) as model:
        images = calibration.synthetic_images(count=2)
        embeds = model.encode_images(images)
        _check_finite(embeds, "vision", "image embeddings", options, activations)
        batch = model.tokenizer.batch(calibration.DEFAULT_PROMPTS[:2])
        logits, state = prefill(model.backend, model.manifest.decoder, batch, embeds, new_tokens=2)
        _check_finite(logits, "decoder", "prefill logits", options, activations)
        for _ in range(2):
            logits = decode_step(model.backend, model.manifest.decoder, state, np.argmax(logits, axis=1))
            _check_finite(logits, "decoder", "decode-step logits", options, activations)


def quantize_bundle(source: str | Path, output: str | Path, options: QuantizeOptions,
                    progress: Progress = lambda message: None) -> Manifest:
    """Quantize the fp32 bundle SOURCE into a new bundle OUTPUT (SOURCE is left untouched)."""
    source, output = Path(source), Path(output).resolve()
    if not source.is_dir():
        raise InputError(f"{source}: no such bundle directory")
    manifest = read_manifest(source)
    if manifest.precision != "fp32":
        raise InputError(f"{source} is already {manifest.precision}; quantize starts from the fp32 bundle export wrote")
    verify_files(source, manifest)
    if source.resolve() == output:
        raise InputError("--output must differ from the source bundle (the source is left untouched)")
    check_output(output, options.overwrite)
    # a bad directory or dataset fails here, before any work
    inputs = calibration.calibration_inputs(options.calibration)
    started = time.perf_counter()

    def step(message: str) -> None:
        progress(f"[{time.perf_counter() - started:6.1f}s] {message}")

    with staged_bundle(output, options.overwrite) as staging, _quiet_quantizers():
        run = _Quantizer(source, manifest, options, staging, step)
        needs_feeds = run.fp16_activations or options.int8_method == "static" and options.precision == "int8"
        recorded = run.calibration_set(inputs) if needs_feeds else calibration.CalibrationSet()
        step(f"writing the tied embedding as {run.table_dtype}")
        embedding_spec, constants = run.embedding()
        step(f"quantizing vision graph to {options.precision}")
        vision = run.graph("vision", manifest.vision_graph, recorded.vision)
        step(f"quantizing decoder graph to {options.precision}")
        # Feeds for the source (fp32) decoder: fp16 ranges are measured there; static int8 calibrates the rewritten one.
        source_table = {"embedding": np.load(source / manifest.embedding.file, mmap_mode="r")}
        decoder_feeds = [feed | (source_table if run.fp16_activations else constants) for feed in recorded.decoder]
        decoder = run.graph("decoder", manifest.decoder_graph, decoder_feeds)
        for name in {manifest.tokenizer, *(m.file for m in [manifest.mask_decoder] if m)}:
            shutil.copyfile(source / name, staging / name)
        run.report["options"] = {
            "precision": options.precision, "target": options.target, "int8_method": options.int8_method, "block_size": options.block_size,
            "int4_activations": options.int4_activations, "keep_embeddings": options.keep_embeddings,
            "fp16_io": options.fp16_io, "calibration": str(options.calibration) if options.calibration else None,
        }
        result = replace(
            manifest, precision=options.precision, vision_graph=vision, decoder_graph=decoder, embedding=embedding_spec,
            versions=manifest.versions | {f"quantize:{k}": v for k, v in package_versions(QUANTIZE_PACKAGES).items()},
            quantization=run.report | {"source_validation": manifest.validation}, validation={},
        )
        result = write_manifest(staging, result)
        step("checking that the runtime loads and runs the new bundle")
        _smoke_test(staging, options, "fp16" if run.fp16_activations else "fp32")
    step(f"wrote {options.precision} bundle {output}")
    return result
