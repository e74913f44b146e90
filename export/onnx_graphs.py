"""Trace the export modules to ONNX with declarative I/O specs.

Each graph is described once as :class:`TensorSpec` lists (name, dtype, dims; a string dim
is dynamic). The same specs drive the sample inputs, torch.export's dynamic shapes, the
symbolic dim names written into the ONNX file and the manifest entry.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from ..runtime.bundle.writer import EXTERNAL_DATA_THRESHOLD
from ..runtime.errors import PaliGemmaEdgeError, first_line
from ..runtime.bundle.manifest import WRITE_INDICES, DecoderSpec, GraphSpec, ImageSpec, TensorSpec, past_names, present_names
from .attention import default_query_chunk
from .cache_ops import INPLACE_OPSET, ONNX_TRANSLATIONS
from .graphs import DecoderStep, VisionEncoder

OPSET = 18
# Sample sizes for tracing: distinct and >= 2 so that no dynamic dim gets specialised.
SAMPLE_DIMS = {"batch": 2, "seq": 3, "past": 5, "total": 8, "cache": 8}

_TORCH_DTYPES = {"float32": torch.float32, "int64": torch.int64, "bool": torch.bool}


class GraphExportError(PaliGemmaEdgeError):
    """torch.export or the ONNX translation failed on a graph."""


def vision_io(image: ImageSpec, hidden_size: int) -> tuple[list[TensorSpec], list[TensorSpec]]:
    inputs = [TensorSpec("pixel_values", "float32", ("batch", 3, image.height, image.width))]
    outputs = [TensorSpec("image_embeds", "float32", ("batch", image.num_tokens, hidden_size))]
    return inputs, outputs


def decoder_io(spec: DecoderSpec) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The decoder graph's inputs and outputs for the spec's cache kind: a growing cache takes ``past``
    positions and returns ``total`` (past + seq); an in-place one takes and returns ``cache`` slots and
    the slot each row writes at."""
    in_place = spec.cache_in_place
    past_dim, total_dim = ("cache", "cache") if in_place else ("past", "total")
    mask_dims = ("batch", 1, "seq", total_dim)
    inputs = [
        TensorSpec("inputs_embeds", "float32", ("batch", "seq", spec.hidden_size)),
        TensorSpec("attention_mask", "bool", mask_dims),
    ]
    if spec.has_sliding_layers:
        inputs.append(TensorSpec("sliding_attention_mask", "bool", mask_dims))
    inputs += [
        TensorSpec("position_ids", "int64", ("batch", "seq")),
        TensorSpec("embedding", "float32", (spec.vocab_size, spec.hidden_size)),
    ]
    outputs = [TensorSpec("logits", "float32", ("batch", spec.vocab_size))]
    cache_dims = ("batch", spec.num_kv_heads)
    for layer in range(spec.num_layers):
        inputs += [TensorSpec(n, "float32", (*cache_dims, past_dim, spec.head_dim)) for n in past_names(layer)]
        outputs += [TensorSpec(n, "float32", (*cache_dims, total_dim, spec.head_dim)) for n in present_names(layer)]
    if in_place:
        inputs.append(TensorSpec(WRITE_INDICES, "int64", ("batch",)))
    return inputs, outputs


def _sample(spec: TensorSpec, overrides: dict[str, torch.Tensor]) -> torch.Tensor:
    if spec.name in overrides:
        return overrides[spec.name]
    shape = [SAMPLE_DIMS[d] if isinstance(d, str) else d for d in spec.shape]
    dtype = _TORCH_DTYPES[spec.dtype]
    if dtype == torch.bool:
        return torch.ones(shape, dtype=dtype)
    if dtype == torch.int64:
        return torch.arange(shape[-1]).expand(shape).contiguous()
    return torch.randn(shape, dtype=dtype)


def _dynamic(spec: TensorSpec):
    dims = {axis: torch.export.Dim.AUTO for axis, d in enumerate(spec.shape) if isinstance(d, str)}
    return dims or None


@contextmanager
def _quiet_exporter():
    """The exporter logs and warns a lot of internal detail; our progress lines say what happens."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _finish_graph(path: Path, inputs: list[TensorSpec], outputs: list[TensorSpec]) -> None:
    """Write our symbolic dim names (batch, seq, past, total, cache) over the tracer's s0, s1, ..., and
    drop the tracer's per-node metadata (source stack traces), which only makes the file larger.

    The tracer's value_info keeps each intermediate tensor's element type (quantize's fp16 converter reads
    them) and loses its shape, whose dims are sympy expressions such as ``2*Max(0, -Min(512, s29) +
    Min(1024, s29))``: ONNX Runtime infers the shapes itself, and with those annotations it held far more
    memory. Measured on the mid model's 896 px int8 decoder (prefill of 4,100 positions, peak RSS):
    1,988 MB with them, 784 MB without (attention in chunks); 2,984 and 2,231 MB without chunks."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    for value in model.graph.value_info:
        value.type.tensor_type.ClearField("shape")
    for values, specs in ((model.graph.input, inputs), (model.graph.output, outputs)):
        by_name = {v.name: v for v in values}
        if set(by_name) != {s.name for s in specs}:
            raise GraphExportError(f"{path.name}: exported I/O {sorted(by_name)} differ from the spec")
        for spec in specs:
            dims = by_name[spec.name].type.tensor_type.shape.dim
            for dim, want in zip(dims, spec.shape):
                if isinstance(want, str):
                    dim.dim_param = want
                elif dim.HasField("dim_value") and dim.dim_value != want:
                    raise GraphExportError(f"{path.name}: {spec.name} has dim {dim.dim_value}, expected {want}")
                else:
                    dim.dim_value = want
    onnx.save_model(model, str(path))


def _parameter_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def export_graph(
    module: torch.nn.Module,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    path: Path,
    overrides: dict[str, torch.Tensor] | None = None,
    opset: int = OPSET,
) -> GraphSpec:
    """Export ``module`` to ``path`` (with ``path.data`` external weights when large)."""
    args = [_sample(s, overrides or {}) for s in inputs]
    dynamic = [_dynamic(s) for s in inputs]
    # torch.export matches dynamic shapes to the signature: a *rest parameter takes one tuple.
    params = inspect.signature(module.forward).parameters.values()
    fixed = sum(p.kind == p.POSITIONAL_OR_KEYWORD for p in params)
    has_rest = any(p.kind == p.VAR_POSITIONAL for p in params)
    dynamic_shapes = (*dynamic[:fixed], tuple(dynamic[fixed:])) if has_rest else tuple(dynamic)
    external = _parameter_bytes(module) > EXTERNAL_DATA_THRESHOLD
    try:
        with _quiet_exporter(), torch.no_grad():
            program = torch.onnx.export(
                module, tuple(args), None, input_names=[s.name for s in inputs],
                output_names=[s.name for s in outputs], dynamic_shapes=dynamic_shapes,
                dynamo=True, opset_version=opset, verbose=False, custom_translation_table=ONNX_TRANSLATIONS,
            )
            if program is None:  # only the legacy (dynamo=False) exporter returns nothing
                raise RuntimeError("torch.onnx.export returned no program")
            program.save(str(path), external_data=external)
    except Exception as exc:  # the exporter raises many unrelated types; report its message
        raise GraphExportError(f"exporting {path.name} failed: {first_line(exc)}") from exc
    _finish_graph(path, inputs, outputs)
    data_files = tuple(sorted(p.name for p in path.parent.glob(f"{path.name}.data")))
    return GraphSpec(
        file=path.name, inputs=tuple(inputs), outputs=tuple(outputs), precision="fp32", external_data=data_files
    )


def _chunk(attention_chunk: int | None, length: int) -> int:
    """Query rows per attention chunk over ``length`` keys: None the default for that length, 0 all rows
    at once."""
    return default_query_chunk(length) if attention_chunk is None else attention_chunk or length


def export_vision(model, image: ImageSpec, path: Path, attention_chunk: int | None = None) -> GraphSpec:
    """The vision graph; its attention in chunks of ``attention_chunk`` queries (see :func:`_chunk`)."""
    module = VisionEncoder(model, _chunk(attention_chunk, image.num_tokens)).eval()
    inputs, outputs = vision_io(image, model.config.text_config.hidden_size)
    return export_graph(module, inputs, outputs, path)


def export_decoder(model, spec: DecoderSpec, path: Path, attention_chunk: int | None = None) -> GraphSpec:
    """The decoder graph with the KV cache ``spec.kv_cache`` names (an in-place one needs opset 24), its
    attention in chunks of ``attention_chunk`` queries (see :func:`_chunk`)."""
    module = DecoderStep(model, spec, _chunk(attention_chunk, spec.max_seq_len)).eval()
    inputs, outputs = decoder_io(spec)
    embedding = model.model.language_model.embed_tokens.weight.detach()
    opset = INPLACE_OPSET if spec.cache_in_place else OPSET
    return export_graph(module, inputs, outputs, path, overrides={"embedding": embedding}, opset=opset)
