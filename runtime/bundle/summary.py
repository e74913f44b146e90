"""``inspect``: a readable summary of a bundle from its manifest and file sizes (no checksums)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import BundleError
from .manifest import MANIFEST_NAME, read_manifest
from .packing import human_size

_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def _plain(value: Any) -> Any:
    """JSON-safe: non-finite floats (an fp16 range can be inf) become strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _brief(details: dict, nested: bool = True) -> dict:
    """The scalars of a manifest record (one nested level flattened as 'key.sub'); long lists and deeper
    objects (an fp16 graph's list of kept node names) are left to the manifest itself."""
    out: dict[str, Any] = {}
    for key, value in details.items():
        if isinstance(value, dict) and nested:
            out |= {f"{key}.{k}": v for k, v in _brief(value, nested=False).items()}
        elif isinstance(value, (list, tuple)) and 0 < len(value) <= 6 and not any(isinstance(v, (dict, list)) for v in value):
            out[key] = list(value)
        elif not isinstance(value, (dict, list, tuple)):
            out[key] = value
    return _plain(out)


def _file_size(bundle: Path, name: str) -> int | None:
    path = bundle / name
    return path.stat().st_size if path.is_file() else None


def _line(details: dict) -> str:
    return ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in details.items())


def _validation_line(v: dict) -> str:
    """The export's measurements (ONNX Runtime against PyTorch), in words where the keys are known."""
    words = []
    if "passed" in v:
        words.append("passed" if v["passed"] else "FAILED")
    if "max_abs_logit_diff" in v:
        words.append(f"max |delta logit| {v['max_abs_logit_diff']:.2e}"
                     + (f" (tolerance {v['tolerance']:g})" if "tolerance" in v else ""))
    if "top1_agrees" in v:
        words.append("top-1 token agrees" if v["top1_agrees"] else "top-1 token DIFFERS")
    if "pixel_max_abs_diff" in v:
        words.append(f"pixels max diff {v['pixel_max_abs_diff']:.2g}")
    known = {"passed", "max_abs_logit_diff", "tolerance", "top1_agrees", "pixel_max_abs_diff", "of",
             "prefill_max_abs_logit_diff", "decode_max_abs_logit_diff"}
    rest = {k: val for k, val in v.items() if k not in known}
    line = ", ".join(words + ([_line(rest)] if rest else []))
    return f"{line} ({v['of']})" if "of" in v else line


def _adapter_line(a: dict) -> str:
    base = a["base"]
    identity = (f"weights sha256 {base['weights_sha256'][:12]}" if base.get("weights_sha256")
                else f"revision {base['revision']}" if base.get("revision") else "unidentified")
    return (f"{a['peft_type']} {a['name']} (rank {a['rank']}, alpha {a['alpha']:g}, targets "
            f"{', '.join(a['target_modules'])}; {a['weights_file']} sha256 {a['sha256'][:12]}) "
            f"merged onto {base['source']} ({identity})")


@dataclass(frozen=True)
class BundleSummary:
    path: str
    model_name: str
    family: int
    schema_version: int
    precision: str
    image: dict
    vocab_size: int
    decoder: dict
    graphs: list[dict]  # name, file(s), precision, bytes, quantization
    embedding: dict
    tokenizer: str
    files: dict[str, int | None]  # listed file -> size in bytes (None: missing)
    total_bytes: int  # listed files present plus the manifest
    engines: dict[str, dict]
    mask_decoder: dict | None
    quantization: dict
    validation: dict
    versions: dict
    adapter: dict | None = None  # the PEFT adapter merged at export (manifest schema 3), as recorded

    def to_dict(self) -> dict:
        return asdict(self)

    def text(self) -> str:
        image, decoder = self.image, self.decoder
        lines = [
            f"bundle        {self.path}",
            f"model         {self.model_name}: PaliGemma {self.family} (manifest schema {self.schema_version})",
            f"image         {image['height']}x{image['width']} px -> {image['tokens']} image tokens, "
            f"{image['resample']} resize, mean {image['mean']}, std {image['std']}",
            f"tokenizer     {self.tokenizer}, vocab {self.vocab_size}",
            f"decoder       {decoder['layers']} layers, hidden {decoder['hidden']}, {decoder['heads']} heads / "
            f"{decoder['kv_heads']} KV heads x {decoder['head_dim']}"
            + (f", sliding window {decoder['sliding_window']} on {decoder['sliding_layers']} layers"
               if decoder["sliding_layers"] else ""),
            f"max sequence  {decoder['max_seq_len']} tokens (image tokens, prompt and answer)",
            f"precision     {self.precision}",
        ]
        for graph in self.graphs:
            size = human_size(graph["bytes"]) if graph["bytes"] is not None else "missing"
            quantized = f"  {_line(graph['quantization'])}" if graph["quantization"] else ""
            lines.append(f"  {graph['name']:<9} {', '.join(graph['files'])}: {graph['precision']}, {size}{quantized}")
        emb = self.embedding
        emb_bytes = self.files.get(emb["file"])
        size = human_size(emb_bytes) if emb_bytes is not None else "missing"
        lines.append(f"  embedding {emb['file']}: {emb['dtype']} {emb['shape']}, {size}"
                     + (f", int8 in blocks of {emb['block_size']} (scales in {emb['scale_file']}), read by the decoder's LM head"
                        if emb["block_size"] else ""))
        if self.quantization:
            shown = {k: v for k, v in self.quantization.items() if not k.startswith("options.")}
            lines.append(f"quantization  {_line(shown)}")
        lines.append("mask decoder  " + (f"{self.mask_decoder['file']} (codebook dim {self.mask_decoder['codebook_dim']})"
                                         if self.mask_decoder else "none (segment answers cannot be decoded)"))
        if self.adapter:
            lines.append(f"adapter       {_adapter_line(self.adapter)}")
        lines.append("engines       " + ("none" if not self.engines else ""))
        for tag, engines in self.engines.items():
            lines.append(f"  {tag}: {_line({k: v for k, v in engines.items() if k != 'files'})}; "
                         + ", ".join(f"{name} {human_size(size) if size is not None else 'missing'}"
                                     for name, size in engines["files"].items()))
        if self.validation:
            lines.append(f"validation    {_validation_line(self.validation)}")
        missing = [name for name, size in self.files.items() if size is None]
        lines.append(f"on disk       {human_size(self.total_bytes)} in {len(self.files) + 1} files (manifest included)"
                     + (f"; MISSING: {', '.join(missing)}" if missing else ""))
        if self.versions:
            lines.append(f"exported with {_line(self.versions)}")
        return "\n".join(lines)


def inspect_bundle(bundle: str | Path) -> BundleSummary:
    """What a bundle holds, from its manifest and file sizes (no checksums: use verify for that)."""
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise BundleError(f"{bundle}: no such bundle directory")
    m = read_manifest(bundle)
    files = {name: _file_size(bundle, name) for name in m.files}
    graphs = []
    for name, graph in (("vision", m.vision_graph), ("decoder", m.decoder_graph)):
        sizes = [_file_size(bundle, f) for f in (graph.file, *graph.external_data)]
        present = [size for size in sizes if size is not None]
        graphs.append({"name": name, "files": [graph.file, *graph.external_data], "precision": graph.precision,
                       "bytes": sum(present) if len(present) == len(sizes) else None,
                       "quantization": _brief(graph.quantization)})
    # The fp32 bundle's validation travels with a quantized bundle as quantization.source_validation.
    quantization = dict(m.quantization)
    validation = _brief(m.validation)
    source_validation = quantization.pop("source_validation", None)
    if not validation and isinstance(source_validation, dict) and source_validation:
        validation = {"of": "the source bundle, before quantization"} | _brief(source_validation)
    return BundleSummary(
        path=str(bundle), model_name=m.model_name, family=m.family, schema_version=m.schema_version,
        precision=m.precision,
        image={"height": m.image.height, "width": m.image.width, "tokens": m.image.num_tokens,
               "resample": _RESAMPLE[m.image.resample], "rescale_factor": m.image.rescale_factor,
               "mean": list(m.image.mean), "std": list(m.image.std)},
        vocab_size=m.decoder.vocab_size,
        decoder={"layers": m.decoder.num_layers, "hidden": m.decoder.hidden_size, "heads": m.decoder.num_heads,
                 "kv_heads": m.decoder.num_kv_heads, "head_dim": m.decoder.head_dim,
                 "max_seq_len": m.decoder.max_seq_len, "sliding_window": m.decoder.sliding_window,
                 "sliding_layers": sum(t == "sliding_attention" for t in m.decoder.layer_types)},
        graphs=graphs,
        embedding={"file": m.embedding.file, "dtype": m.embedding.dtype, "shape": list(m.embedding.shape),
                   "scale_file": m.embedding.scale_file, "block_size": m.embedding.block_size},
        tokenizer=m.tokenizer, files=files,
        total_bytes=sum(size for size in files.values() if size is not None) + (bundle / MANIFEST_NAME).stat().st_size,
        engines={tag: {"flavour": e.flavour, "tensorrt": e.tensorrt_version, "max_batch": e.max_batch,
                       "max_seq_len": e.max_seq_len,
                       "decoder_profiles": f"{len(e.decoder.profiles)} ({' / '.join(e.decoder.profiles)})",
                       "files": {s.file: _file_size(bundle, s.file) for s in (e.vision, e.decoder)}}
                 for tag, e in m.engines.items()},
        mask_decoder=asdict(m.mask_decoder) if m.mask_decoder else None,
        quantization=_brief(quantization), validation=validation,
        versions=dict(m.versions), adapter=asdict(m.adapter) if m.adapter else None,
    )
