"""The bundle manifest: the contract between export and every runtime backend.

A bundle is a directory holding ``manifest.json`` and the files it lists. The manifest
describes the model (sizes, token ids, image preprocessing), each graph's inputs and
outputs, the precision, a sha256 of every file, how the export was validated and, for a
bundle merged from a PEFT adapter, which adapter on which base. Readers reject a schema version
they do not know and unknown keys, rather than guess.

Schema history: 2 changed the int8 table's layout; 3 added the optional ``adapter`` record; 4 added
``decoder.kv_cache`` (a schema 3 decoder grows its cache). Each older manifest is upgraded on read, one
version at a time, so old bundles keep loading.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import BundleError

SCHEMA_VERSION = 4
MANIFEST_NAME = "manifest.json"

SLIDING = "sliding_attention"
FULL = "full_attention"

# How the decoder graph keeps its KV cache (DecoderSpec.kv_cache):
GROWING = "growing"  # past [b, kv, past, d] in, present [b, kv, past + seq, d] out: each step copies the cache
INPLACE = "inplace"  # one buffer [b, kv, cache, d] is past and present: new positions written at write_indices
KV_CACHE_KINDS = (INPLACE, GROWING)
WRITE_INDICES = "write_indices"  # in-place decoder input [batch] int64: the cache slot of each row's first new position


def past_names(layer: int) -> tuple[str, str]:
    return f"past_key_{layer}", f"past_value_{layer}"


def present_names(layer: int) -> tuple[str, str]:
    return f"present_key_{layer}", f"present_value_{layer}"


@dataclass(frozen=True)
class TokenIds:
    """Special token ids, read from the checkpoint at export time."""

    image: int
    bos: int
    eos: tuple[int, ...]
    pad: int


@dataclass(frozen=True)
class ImageSpec:
    """How the checkpoint's processor turns an image into pixel values."""

    height: int
    width: int
    num_tokens: int
    resample: int  # a PIL resampling filter: 0 nearest, 2 bilinear, 3 bicubic, ...
    rescale_factor: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self):
        if self.resample not in (0, 1, 2, 3, 4, 5):
            raise BundleError(f"manifest: image.resample {self.resample} is not a PIL resampling filter")
        if min(self.height, self.width, self.num_tokens) < 1:
            raise BundleError("manifest: image sizes and token count must be positive")


@dataclass(frozen=True)
class DecoderSpec:
    """Sizes of the Gemma / Gemma 2 decoder and the attention pattern of each layer."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_seq_len: int
    embedding_scale: float
    layer_types: tuple[str, ...]
    sliding_window: int | None = None
    kv_cache: str = GROWING  # GROWING or INPLACE: see KV_CACHE_KINDS

    def __post_init__(self):
        if self.kv_cache not in KV_CACHE_KINDS:
            raise BundleError(f"manifest: decoder.kv_cache must be one of {', '.join(KV_CACHE_KINDS)}, "
                              f"got {self.kv_cache!r}")
        if len(self.layer_types) != self.num_layers or set(self.layer_types) - {SLIDING, FULL}:
            raise BundleError(f"manifest: decoder.layer_types must name {self.num_layers} layers as {FULL} or {SLIDING}")
        if self.has_sliding_layers and not self.sliding_window:
            raise BundleError("manifest: sliding-window layers need decoder.sliding_window")

    @property
    def has_sliding_layers(self) -> bool:
        return SLIDING in self.layer_types

    @property
    def cache_in_place(self) -> bool:
        return self.kv_cache == INPLACE


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, element type and symbolic or fixed dims."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]


@dataclass(frozen=True)
class GraphSpec:
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    precision: str
    external_data: tuple[str, ...] = ()
    quantization: dict[str, Any] = field(default_factory=dict)  # method and parameters, if quantized

    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def fp32_nodes(self) -> tuple[str, ...]:
        """Nodes of an fp16-activation graph that compute in fp32: measured on calibration feeds at
        quantize time (``quantization["ranges"]``); empty for other graphs and for older bundles."""
        return tuple(self.quantization.get("ranges", {}).get("kept_nodes", ()))


@dataclass(frozen=True)
class EmbeddingSpec:
    """The token embedding, tied to the LM head: stored once.

    ``shape`` is [vocab, hidden]. A float table is fed to the decoder graph as its 'embedding' input.
    An int8 table (``block_size`` > 0) is stored in blocks, [vocab, blocks, block_size] uint8 with zero
    point 128, and a float32 scale per block in ``scale_file``: the decoder's LM head reads both files
    itself (they are its initializers' external data), the host lookup reads rows of them."""

    file: str
    dtype: str
    shape: tuple[int, int]
    scale_file: str | None = None
    block_size: int = 0

    def __post_init__(self):
        if self.block_size and not self.scale_file:
            raise BundleError("manifest: the embedding is int8 in blocks but names no scale_file")

    @property
    def blocks(self) -> int:
        return -(-self.shape[1] // self.block_size) if self.block_size else 0

    @property
    def stored_shape(self) -> tuple[int, ...]:
        return (self.shape[0], self.blocks, self.block_size) if self.block_size else tuple(self.shape)


@dataclass(frozen=True)
class MaskDecoderSpec:
    """The optional VQ-VAE mask decoder (vae-oid.npz layout) for segmentation answers."""

    file: str
    codebook_dim: int


@dataclass(frozen=True)
class EngineSpec:
    """One TensorRT engine: its file, the graph it came from, I/O as the network saw it, profile shapes."""

    file: str
    graph: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    profiles: dict[str, Any]  # profile name -> input name -> {"min", "opt", "max"} shapes


@dataclass(frozen=True)
class EngineSet:
    """Engines built for one device tag (TensorRT flavour and version, GPU)."""

    flavour: str
    tensorrt_version: str
    device: str
    max_batch: int
    max_seq_len: int
    vision: EngineSpec
    decoder: EngineSpec
    build_seconds: float
    # the decoder graph's cache (DecoderSpec.kv_cache) the engines were built from: an in-place decoder's
    # engine has a fixed number of cache slots, max_seq_len (TensorRT's KV-cache update layer needs it static)
    kv_cache: str = GROWING

    def __post_init__(self):
        if self.kv_cache not in KV_CACHE_KINDS:
            raise BundleError(f"manifest: engines.{self.device}.kv_cache must be one of {', '.join(KV_CACHE_KINDS)}, "
                              f"got {self.kv_cache!r}")


@dataclass(frozen=True)
class BaseModelRecord:
    """The base model an adapter was merged onto: where it came from and what identifies its weights."""

    source: str  # the local directory or hub id it was loaded from
    weights_sha256: str | None = None  # a local base: sha256 over its weight files' "sha256  name" lines, sorted
    revision: str | None = None  # a hub base: the commit it was loaded at


@dataclass(frozen=True)
class AdapterRecord:
    """The PEFT adapter merged into the bundle's weights at export (provenance; the runtime never needs it)."""

    name: str
    peft_type: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    weights_file: str  # the adapter's weights file, e.g. adapter_model.safetensors
    sha256: str  # of that file
    base: BaseModelRecord


@dataclass(frozen=True)
class Manifest:
    model_name: str
    family: int
    precision: str
    image: ImageSpec
    tokens: TokenIds
    decoder: DecoderSpec
    vision_graph: GraphSpec
    decoder_graph: GraphSpec
    embedding: EmbeddingSpec
    tokenizer: str
    files: dict[str, str]
    versions: dict[str, str] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)
    mask_decoder: MaskDecoderSpec | None = None
    quantization: dict[str, Any] = field(default_factory=dict)  # source bundle, options, what was kept
    engines: dict[str, EngineSet] = field(default_factory=dict)  # device tag -> TensorRT engines
    adapter: AdapterRecord | None = None  # the PEFT adapter merged at export; None for a full checkpoint
    schema_version: int = SCHEMA_VERSION

    def weight_files(self, include_vision: bool = True) -> list[str]:
        """Files holding model weights: graphs, their external data, the embedding table and its scales."""
        graphs = [self.decoder_graph] + ([self.vision_graph] if include_vision else [])
        files = [name for graph in graphs for name in (graph.file, *graph.external_data)]
        return files + [name for name in (self.embedding.file, self.embedding.scale_file) if name]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=False) + "\n"


def _build(cls, data: Any, where: str):
    """Build a (nested) frozen dataclass from JSON, rejecting unknown, missing and mistyped values."""
    if not isinstance(data, dict):
        raise BundleError(f"manifest: {where} must be an object")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise BundleError(f"manifest: unknown key(s) in {where}: {', '.join(sorted(unknown))}")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise BundleError(f"manifest: {where} is missing '{name}'")
            continue
        if not isinstance(f.type, str):  # the module's own dataclasses: annotations from __future__
            raise TypeError(f"{cls.__name__}.{name}: manifest fields need string annotations, got {f.type!r}")
        kwargs[name] = _convert(f.type, data[name], f"{where}.{name}")
    return cls(**kwargs)


_SCALARS: dict[str, type | tuple[type, ...]] = {"int": int, "float": (int, float), "str": str, "bool": bool}


def _is_scalar(value: Any, type_name: str) -> bool:
    """Whether a JSON value has a scalar field's type (a bool is not an int, and only a bool is a bool)."""
    return isinstance(value, bool) == (type_name == "bool") and isinstance(value, _SCALARS[type_name])


def _split_args(inner: str) -> list[str]:
    """'int | str, ...' -> ['int | str', '...'] (no nested brackets occur in the manifest's types)."""
    return [part.strip() for part in inner.split(",")]


def _convert(type_name: str, value: Any, where: str):
    """Check one JSON value against a field's annotation (a string, from __future__ annotations)."""
    if type_name.endswith(" | None"):
        if value is None:
            return None
        type_name = type_name[: -len(" | None")]
    if type_name in _NESTED:
        return _build(_NESTED[type_name], value, where)
    if type_name == "Any":
        return value
    if type_name == "int | str":
        type_name = "str" if isinstance(value, str) else "int"
    if type_name in _SCALARS:
        if not _is_scalar(value, type_name):
            raise BundleError(f"manifest: {where} must be {type_name}, got {value!r}")
        return float(value) if type_name == "float" else value
    if type_name.startswith("tuple["):
        if not isinstance(value, list):
            raise BundleError(f"manifest: {where} must be a list, got {value!r}")
        parts = _split_args(type_name[len("tuple["):-1])
        types = [parts[0]] * len(value) if parts[-1] == "..." else parts
        if len(types) != len(value):
            raise BundleError(f"manifest: {where} must have {len(types)} entries, got {len(value)}")
        return tuple(_convert(t, v, f"{where}[{i}]") for i, (t, v) in enumerate(zip(types, value)))
    if type_name.startswith("dict["):
        if not isinstance(value, dict):
            raise BundleError(f"manifest: {where} must be an object, got {value!r}")
        value_type = _split_args(type_name[len("dict["):-1])[1]
        return {str(k): _convert(value_type, v, f"{where}.{k}") for k, v in value.items()}
    raise TypeError(f"manifest field type {type_name!r} has no reader")  # a bug in this module


_NESTED = {
    "ImageSpec": ImageSpec, "TokenIds": TokenIds, "DecoderSpec": DecoderSpec,
    "GraphSpec": GraphSpec, "EmbeddingSpec": EmbeddingSpec, "TensorSpec": TensorSpec,
    "MaskDecoderSpec": MaskDecoderSpec, "EngineSpec": EngineSpec, "EngineSet": EngineSet,
    "AdapterRecord": AdapterRecord, "BaseModelRecord": BaseModelRecord,
}


def read_json_object(path: Path, error: type[Exception], what: str) -> dict:
    """A JSON file that must hold an object; anything else raises ``error`` with one clear line."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path}: unreadable {what} ({exc})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: {what} must be a JSON object")
    return data


def read_manifest(bundle_dir: Path) -> Manifest:
    path = Path(bundle_dir) / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"{bundle_dir}: not a bundle (no {MANIFEST_NAME}); create one with 'paligemma-edge export'")
    data = read_json_object(path, BundleError, "manifest")
    if data.get("schema_version") == 1:
        data = _from_schema_1(data, path)
    if data.get("schema_version") == 2:
        data = _from_schema_2(data, path)
    if data.get("schema_version") == 3:
        data = _from_schema_3(data, path)
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BundleError(
            f"{path}: manifest schema version {version!r} is not supported (this version reads "
            f"{SCHEMA_VERSION}); re-export the bundle with this version of paligemma-edge"
        )
    return _build(Manifest, data, "manifest")


def _from_schema_1(data: dict, path: Path) -> dict:
    """Schema 1 differs only in the int8 table's layout (transposed, a scale per token): its other bundles
    read as schema 2; an int8 bundle of that layout has to be quantized again."""
    embedding = data.get("embedding")
    if not isinstance(embedding, dict):
        return data | {"schema_version": 2}  # _build reports what is wrong
    if embedding.get("transposed"):
        raise BundleError(f"{path}: this int8 bundle stores its table in the old layout (schema 1); quantize "
                          "its fp32 bundle again with this version of paligemma-edge")
    rest = {k: v for k, v in embedding.items() if k != "transposed"}
    return data | {"schema_version": 2, "embedding": rest}


def _from_schema_2(data: dict, path: Path) -> dict:
    """Schema 3 only added the optional ``adapter`` record, which a schema 2 manifest cannot hold."""
    if data.get("adapter") is not None:
        raise BundleError(f"{path}: a schema 2 manifest cannot hold an 'adapter' record (that is schema 3)")
    return data | {"schema_version": 3}


def _from_schema_3(data: dict, path: Path) -> dict:
    """Schema 4 added ``decoder.kv_cache``: every schema 3 decoder grows its cache (the default)."""
    decoder = data.get("decoder")
    if isinstance(decoder, dict) and decoder.get("kv_cache", GROWING) != GROWING:
        raise BundleError(f"{path}: a schema 3 decoder grows its cache; decoder.kv_cache {decoder['kv_cache']!r} is schema 4")
    return data | {"schema_version": 4}


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_files(bundle_dir: Path, manifest: Manifest, checksums: bool = True) -> None:
    """Check every listed file exists (and, by default, matches its sha256)."""
    bundle_dir = Path(bundle_dir)
    for name, expected in manifest.files.items():
        path = bundle_dir / name
        if not path.is_file():
            raise BundleError(f"{bundle_dir}: bundle is missing '{name}'; re-export it")
        if checksums and sha256_file(path) != expected:
            raise BundleError(f"{path}: checksum mismatch (file changed or corrupt); re-export the bundle")
