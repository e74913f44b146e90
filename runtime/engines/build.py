"""Building TensorRT engines from a bundle's graphs, recorded in its manifest under a device tag
(``paligemma-edge build-engines``; the TensorRT backend runs them).

One code path for NVIDIA TensorRT (``tensorrt``, JetPack and x86) and TensorRT for RTX
(``tensorrt_rtx_bindings``, which also builds on a machine without a GPU); the flavours differ
only in the module imported. Networks are strongly typed: the precision comes from the graph
(fp32 graph -> fp32 engine, fp16 -> fp16, Q/DQ -> int8). The decoder is one engine. With TensorRT
it has two optimization profiles, prefill (prompt up to the max sequence, empty past) and decode
(one token, past up to the max), each tuned for its own shapes. TensorRT for RTX stores the float
weights once per profile (a two-profile fp16 engine is twice the size of a one-profile one) and
can specialize its kernels to the shapes it meets at run time, so there it gets one profile
spanning both.

An in-place decoder (``decoder.kv_cache: inplace``) writes its cache with ONNX TensorScatter, which
TensorRT (10.15+; TensorRT for RTX 1.7+) parses into a KV-cache update layer. That layer needs the
cache's sequence dim static, so the graph's ``cache`` dim is fixed at the engines' max sequence before
parsing (which reads the graph with the ``onnx`` package) and the profiles range over batch and seq
only; the engine set records the cache kind. An older TensorRT is refused before parsing, with the
way out: re-export with ``--kv-cache growing``.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from ..bundle.manifest import EngineSet, EngineSpec, GraphSpec, Manifest, TensorSpec, read_manifest, verify_files
from ..bundle.writer import write_manifest
from ..errors import BackendUnavailableError, BundleError, InputError, PaliGemmaEdgeError
from .common import FLAVOURS, CollectingLogger, device_tag, gpu_description, import_tensorrt

# quantization methods whose ops only ONNX Runtime has (TensorRT's parser looks for a plugin and fails)
_ONNXRUNTIME_ONLY = {"int8-dynamic": "DynamicQuantizeMatMul", "int4-matmulnbits": "MatMulNBits"}

# decoder optimization profiles per flavour: 2 = prefill and decode, 1 = one spanning both
DEFAULT_DECODER_PROFILES = {"tensorrt": 2, "tensorrt-rtx": 1}

# the first release of each flavour that parses TensorScatter into a KV-cache update layer
KV_CACHE_UPDATE_SINCE = {"tensorrt": (10, 15), "tensorrt-rtx": (1, 7)}
CACHE_DIM = "cache"  # an in-place decoder's symbolic dim of cache slots (export's decoder_io names it)
# what TensorRT logs when a KV-cache update reads a tensor computed in the graph (a Cast of the past), not an input
CAST_CACHE_ERROR = "The cache tensor must be a network input"

Progress = Callable[[str], None]


class EngineBuildError(PaliGemmaEdgeError):
    """TensorRT's parser or builder refused a graph; the message carries its own words."""


@dataclass(frozen=True)
class EngineOptions:
    flavour: str = "tensorrt"
    max_batch: int = 1
    max_seq_len: int | None = None  # default: the bundle's
    timing_cache: Path | None = None
    decoder_profiles: int | None = None  # default: the flavour's (DEFAULT_DECODER_PROFILES)

    def __post_init__(self):
        if self.flavour not in FLAVOURS:
            raise InputError(f"unknown TensorRT flavour '{self.flavour}'; choose from: {', '.join(FLAVOURS)}")
        if self.max_batch < 1 or (self.max_seq_len is not None and self.max_seq_len < 2):
            raise InputError("--max-batch must be >= 1 and --max-seq-len >= 2")
        if self.decoder_profiles is None:
            object.__setattr__(self, "decoder_profiles", DEFAULT_DECODER_PROFILES[self.flavour])
        if self.decoder_profiles not in (1, 2):
            raise InputError(f"--decoder-profiles must be 1 or 2, got {self.decoder_profiles}")


def onnxruntime_only_ops(manifest: Manifest) -> list[str]:
    """Where a bundle uses ops only ONNX Runtime runs, from its manifest: 'graph: op' for each; empty for
    bundles TensorRT takes (fp32, fp16, the Q/DQ formats of quantize --target tensorrt)."""
    found = [f"{name}: {_ONNXRUNTIME_ONLY[graph.quantization['method']]}"
             for name, graph in (("vision", manifest.vision_graph), ("decoder", manifest.decoder_graph))
             if graph.quantization.get("method") in _ONNXRUNTIME_ONLY]
    if manifest.embedding.block_size:  # an int8 table: the LM head reads it with an 8-bit MatMulNBits
        found.append("LM head: 8-bit MatMulNBits on the int8 table")
    return found


def check_tensorrt_takes(bundle: Path, manifest: Manifest) -> None:
    """Refuse, in one line and before TensorRT is imported, a bundle quantized for ONNX Runtime."""
    found = onnxruntime_only_ops(manifest)
    if found:
        raise BundleError(
            f"{bundle} was quantized for ONNX Runtime ({'; '.join(found)}), which TensorRT cannot parse; make "
            f"one for TensorRT with 'paligemma-edge quantize FP32_BUNDLE --precision {manifest.precision} "
            "--target tensorrt' (fp32 and fp16 bundles build as they are)"
        )


def _dims(spec: TensorSpec, sizes: dict[str, int]) -> tuple[int, ...]:
    return tuple(sizes[d] if isinstance(d, str) else d for d in spec.shape)


def profiles_for(graph: GraphSpec, name: str, max_batch: int, max_seq_len: int,
                 decoder_profiles: int = 2) -> dict[str, dict[str, dict[str, list]]]:
    """min/opt/max shapes of every input, per profile.

    The decoder gets prefill and decode profiles, or with ``decoder_profiles=1`` one profile
    ("prefill+decode") spanning both, tuned at decode's shapes. A growing decoder's past and total
    range with them; an in-place decoder's cache slots are ``max_seq_len`` in every profile.
    """
    half = max_seq_len // 2
    if name == "vision":
        ranges = {"vision": [{"batch": 1}, {"batch": 1}, {"batch": max_batch}]}
    elif decoder_profiles == 1:
        ranges = {"prefill+decode": [dict(batch=1, seq=1, past=0, total=1),
                                     dict(batch=1, seq=1, past=half, total=half + 1),
                                     dict(batch=max_batch, seq=max_seq_len, past=max_seq_len - 1, total=max_seq_len)]}
    else:
        ranges = {
            "prefill": [dict(batch=1, seq=1, past=0, total=1), dict(batch=1, seq=half, past=0, total=half),
                        dict(batch=max_batch, seq=max_seq_len, past=0, total=max_seq_len)],
            "decode": [dict(batch=1, seq=1, past=1, total=2), dict(batch=1, seq=1, past=half, total=half + 1),
                       dict(batch=max_batch, seq=1, past=max_seq_len - 1, total=max_seq_len)],
        }
    return {
        profile: {t.name: {k: list(_dims(t, s | {CACHE_DIM: max_seq_len})) for k, s in zip(("min", "opt", "max"), sizes)}
                  for t in graph.inputs}
        for profile, sizes in ranges.items()
    }


def check_kv_cache_support(manifest: Manifest, flavour: str, version: str) -> None:
    """Refuse, in one line and before parsing, an in-place decoder on a TensorRT without the KV-cache update layer."""
    since = KV_CACHE_UPDATE_SINCE[flavour]
    numbers = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    if manifest.decoder.cache_in_place and numbers < since:
        raise BundleError(
            f"this bundle's decoder keeps its KV cache in place (ONNX TensorScatter), which {flavour} {version} cannot "
            f"build (it needs {flavour} {'.'.join(map(str, since))}+): re-export it with "
            "'paligemma-edge export MODEL --kv-cache growing'")


def _parse(parser, path: Path, static_dims: dict[str, int]) -> bool:
    """Parse the graph at ``path``, its symbolic dims named in ``static_dims`` fixed at those sizes first."""
    if not static_dims:
        return parser.parse_from_file(str(path))
    try:
        import onnx
    except ImportError:
        raise BackendUnavailableError("building engines for an in-place KV cache decoder reads its graph with the "
                                      "onnx package: pip install 'paligemma-edge[gpu]'") from None
    model = onnx.load(str(path), load_external_data=False)  # the weights stay in their files, read by TensorRT
    for value in (*model.graph.input, *model.graph.output, *model.graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in static_dims:
                dim.dim_value = static_dims[dim.dim_param]  # clears dim_param (a oneof)
    return parser.parse(model.SerializeToString(), str(path))


_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT64": "int64", "BOOL": "bool", "INT8": "int8",
           "INT32": "int32"}


def layer_dtypes(network) -> dict[str, tuple[str, ...]]:
    """Each layer of a parsed network (named after its ONNX node) -> its outputs' dtypes. In a strongly
    typed network these are the types the builder must keep: the engine computes each layer in them."""
    layers = (network.get_layer(i) for i in range(network.num_layers))
    return {layer.name: tuple(_DTYPES.get(layer.get_output(i).dtype.name, layer.get_output(i).dtype.name.lower())
                              for i in range(layer.num_outputs)) for layer in layers}


def check_fp32_layers(network, graph: GraphSpec) -> int:
    """The graph's fp32 nodes (``GraphSpec.fp32_nodes``, measured at quantize time) must be fp32 layers of
    the network; returns how many were found. A node TensorRT would run in another float type stops the build."""
    dtypes = layer_dtypes(network)
    found = [node for node in graph.fp32_nodes() if node in dtypes]
    wrong = [node for node in found if any(d in ("float16", "bfloat16", "bf16") for d in dtypes[node])]
    if wrong:
        raise EngineBuildError(
            f"{graph.file}: {len(wrong)} node(s) the manifest keeps in fp32 are not fp32 in TensorRT's network "
            f"(first: {wrong[0]}, {dtypes[wrong[0]]}); re-create the bundle with this version's quantize")
    return len(found)


def _build_one(trt, bundle: Path, graph: GraphSpec, name: str, options: EngineOptions, max_seq_len: int,
               cache: bytes, step: Progress) -> tuple[bytes, EngineSpec, bytes]:
    collector = CollectingLogger(trt)
    builder = trt.Builder(collector.logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, collector.logger)
    static = {CACHE_DIM: max_seq_len} if any(CACHE_DIM in t.shape for t in graph.inputs) else {}
    step(f"parsing {graph.file}" + (f" ({max_seq_len} cache slots)" if static else ""))
    if not _parse(parser, bundle / graph.file, static):
        messages = [parser.get_error(i).desc() for i in range(parser.num_errors)] or collector.errors
        raise EngineBuildError(f"TensorRT cannot parse {graph.file}: {'; '.join(messages[:3])}")
    kept = check_fp32_layers(network, graph)
    if kept:
        step(f"{name}: the {kept} node(s) the manifest keeps in fp32 are fp32 layers of the strongly typed network")
    config = builder.create_builder_config()
    # The cache travels as bytes: a timing-cache object dies with the builder that made it, and
    # handing it to the next engine's builder crashed TensorRT for RTX (a segfault).
    cache = config.create_timing_cache(cache)
    config.set_timing_cache(cache, ignore_mismatch=False)
    assert options.decoder_profiles is not None  # EngineOptions.__post_init__ puts the flavour's default there
    profiles = profiles_for(graph, name, options.max_batch, max_seq_len, options.decoder_profiles)
    for shapes in profiles.values():
        profile = builder.create_optimization_profile()
        for tensor, ranges in shapes.items():
            profile.set_shape(tensor, ranges["min"], ranges["opt"], ranges["max"])
        config.add_optimization_profile(profile)
    layout = f"{', '.join(profiles)} profiles" if len(profiles) > 1 else f"{next(iter(profiles))} profile"
    step(f"building the {name} engine ({layout})")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None and any(CAST_CACHE_ERROR in error for error in collector.errors):
        raise EngineBuildError(
            f"TensorRT cannot build {graph.file}'s in-place KV cache: the graph casts its float32 past key/values "
            "to float16 (a bundle quantized with float32 inputs and outputs), and TensorRT's KV-cache update needs "
            "the cache as the network's input; quantize with --fp16-io, or re-export with --kv-cache growing")
    if serialized is None:
        raise EngineBuildError(f"TensorRT could not build {graph.file}: {collector.last(3)}")
    io = [network.get_input(i) for i in range(network.num_inputs)], [network.get_output(i) for i in range(network.num_outputs)]
    inputs, outputs = (tuple(TensorSpec(t.name, _DTYPES.get(t.dtype.name, t.dtype.name.lower()), tuple(t.shape))
                             for t in tensors) for tensors in io)
    spec = EngineSpec(file="", graph=name, inputs=inputs, outputs=outputs, profiles=profiles)
    return bytes(serialized), spec, bytes(config.get_timing_cache().serialize())


def build_engines(bundle: str | Path, options: EngineOptions = EngineOptions(),
                  progress: Progress = lambda message: None) -> EngineSet:
    """Build and record the vision and decoder engines of BUNDLE for this machine."""
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise BundleError(f"{bundle}: no such bundle directory")
    manifest = read_manifest(bundle)
    check_tensorrt_takes(bundle, manifest)
    max_seq_len = options.max_seq_len or manifest.decoder.max_seq_len
    if max_seq_len > manifest.decoder.max_seq_len:
        raise InputError(f"--max-seq-len {max_seq_len} exceeds the bundle's {manifest.decoder.max_seq_len}")
    verify_files(bundle, manifest)
    trt = import_tensorrt(options.flavour)
    check_kv_cache_support(manifest, options.flavour, trt.__version__)
    started = time.perf_counter()

    def step(message: str) -> None:
        progress(f"[{time.perf_counter() - started:6.1f}s] {message}")

    tag = device_tag(options.flavour, trt.__version__, gpu_description())
    cache = options.timing_cache.read_bytes() if options.timing_cache and options.timing_cache.is_file() else b""
    built = {}
    for name, graph in (("vision", manifest.vision_graph), ("decoder", manifest.decoder_graph)):
        data, spec, cache = _build_one(trt, bundle, graph, name, options, max_seq_len, cache, step)
        built[name] = (data, replace(spec, file=f"{name}.{tag}.engine"))
    if options.timing_cache:
        options.timing_cache.write_bytes(cache)
    for data, spec in built.values():
        temporary = bundle / f".{spec.file}.partial"
        temporary.write_bytes(data)
        os.replace(temporary, bundle / spec.file)
    record = EngineSet(
        flavour=options.flavour, tensorrt_version=trt.__version__, device=tag, max_batch=options.max_batch,
        max_seq_len=max_seq_len, vision=built["vision"][1], decoder=built["decoder"][1],
        build_seconds=round(time.perf_counter() - started, 2), kv_cache=manifest.decoder.kv_cache,
    )
    updated = replace(manifest, engines=manifest.engines | {tag: record})
    write_manifest(bundle, updated)
    step(f"recorded {tag} engines in {bundle / 'manifest.json'}")
    return record
