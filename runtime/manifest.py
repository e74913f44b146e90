"""The bundle manifest: the contract between export and every runtime backend.

A bundle is a directory holding ``manifest.json`` and the files it lists. The manifest
describes the model (sizes, token ids, image preprocessing), each graph's inputs and
outputs, the precision, a sha256 of every file and how the export was validated. Readers
reject a schema version they do not know and unknown keys, rather than guess.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import BundleError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"

SLIDING = "sliding_attention"
FULL = "full_attention"


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
    resample: int
    rescale_factor: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


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

    @property
    def has_sliding_layers(self) -> bool:
        return SLIDING in self.layer_types


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

    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


@dataclass(frozen=True)
class EmbeddingSpec:
    """The token embedding, tied to the LM head: stored once, fed to the decoder graph."""

    file: str
    dtype: str
    shape: tuple[int, int]


@dataclass(frozen=True)
class MaskDecoderSpec:
    """The optional VQ-VAE mask decoder (vae-oid.npz layout) for segmentation answers."""

    file: str
    codebook_dim: int


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
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=False) + "\n"


def _build(cls, data: Any, where: str):
    """Build a (nested) frozen dataclass from JSON, rejecting unknown and missing keys."""
    if not dataclasses.is_dataclass(cls):
        return data
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
        kwargs[name] = _convert(f.type, data[name], f"{where}.{name}")
    return cls(**kwargs)


_NESTED = {
    "ImageSpec": ImageSpec, "TokenIds": TokenIds, "DecoderSpec": DecoderSpec,
    "GraphSpec": GraphSpec, "EmbeddingSpec": EmbeddingSpec, "TensorSpec": TensorSpec,
    "MaskDecoderSpec": MaskDecoderSpec,
}


def _convert(type_name: Any, value: Any, where: str):
    name = type_name if isinstance(type_name, str) else getattr(type_name, "__name__", "")
    if name.endswith(" | None"):
        if value is None:
            return None
        name = name[: -len(" | None")]
    if name in _NESTED:
        return _build(_NESTED[name], value, where)
    if name.startswith("tuple[TensorSpec"):
        return tuple(_build(TensorSpec, v, f"{where}[{i}]") for i, v in enumerate(value))
    if name.startswith("tuple"):
        return tuple(value)
    return value


def read_manifest(bundle_dir: Path) -> Manifest:
    path = Path(bundle_dir) / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"{bundle_dir}: not a bundle (no {MANIFEST_NAME}); create one with 'paligemma-edge export'")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(data, dict):
        raise BundleError(f"{path}: manifest must be a JSON object")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BundleError(
            f"{path}: manifest schema version {version!r} is not supported (this version reads "
            f"{SCHEMA_VERSION}); re-export the bundle with this version of paligemma-edge"
        )
    return _build(Manifest, data, "manifest")


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
