"""Export from a PEFT adapter directory: load its base, apply the adapter, merge it for the graphs.

What fine-tuning produces is often an adapter (``adapter_config.json`` and
``adapter_model.safetensors``), not a full checkpoint. Decided here:

- A directory is an adapter when it holds ``adapter_config.json``. Its base is ``--base`` when
  given, else the config's ``base_model_name_or_path`` (a local directory, or a hub id where the
  network allows).
- Only LoRA is supported: it merges exactly into the weights, so the bundle's graphs are the base
  architecture's and the runtime needs nothing new. Prompt-learning types cannot be merged.
- The adapter's weights must match the base's modules key for key. peft only warns about
  missing keys, which leaves an adapter made for another architecture silently without effect.
- The unmerged PEFT model is the validation reference (what the user trained); the merged one is
  exported. The processor and tokenizer come from the base; a tokenizer in the adapter directory
  must have the base's vocabulary (a changed vocabulary needs a resized base, not an adapter).
- The bundle stores the embedding once, tied to the LM head; an adapter that unties them is refused.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

from ..runtime.errors import InputError, first_line
from ..runtime.bundle.manifest import AdapterRecord, BaseModelRecord, read_json_object, sha256_file
from .checkpoint import Checkpoint, load_checkpoint, looks_like_hub_id

ADAPTER_CONFIG = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")  # peft's names, the preferred first
SUPPORTED_PEFT_TYPES = ("LORA",)
BASE_WEIGHT_SUFFIXES = (".safetensors", ".bin")


@dataclass(frozen=True)
class AdapterSource:
    """An adapter directory as read from disk (no torch): its weights file, base and LoRA settings."""

    path: Path
    weights: Path
    base: str
    peft_type: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def read_adapter(path: str | Path, base: str | None = None) -> AdapterSource:
    """Read and check an adapter directory; ``base`` (``--base``) wins over the config's base."""
    path = Path(path)
    config = read_json_object(path / ADAPTER_CONFIG, InputError, "adapter config")
    peft_type = str(config.get("peft_type") or "unknown")
    if peft_type not in SUPPORTED_PEFT_TYPES:
        raise InputError(f"{path}: a {peft_type} adapter; export merges {', '.join(SUPPORTED_PEFT_TYPES)} adapters only")
    weights = next((path / name for name in WEIGHT_FILES if (path / name).is_file()), None)
    if weights is None:
        raise InputError(f"{path}: adapter has no weights ({' or '.join(WEIGHT_FILES)})")
    base = base or config.get("base_model_name_or_path")
    if not base:
        raise InputError(f"{path}: {ADAPTER_CONFIG} names no base model; pass --base DIR")
    if not Path(base).exists() and not looks_like_hub_id(base):
        raise InputError(f"{path}: base model {base} is not there; pass --base DIR")
    targets = config.get("target_modules") or ()
    return AdapterSource(
        path=path, weights=weights, base=str(base), peft_type=peft_type, rank=int(config.get("r", 0)),
        alpha=float(config.get("lora_alpha", 0)),
        target_modules=(targets,) if isinstance(targets, str) else tuple(sorted(str(t) for t in targets)),
    )


def _adapter_keys(weights: Path) -> set[str]:
    if weights.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as handle:
            return set(handle.keys())
    import torch

    return set(torch.load(weights, map_location="cpu", weights_only=True))


def _check_keys(source: AdapterSource, peft_model) -> None:
    """Every weight in the file loaded into a module of the base, and every adapted module got one."""
    from peft import get_peft_model_state_dict

    try:
        in_file = _adapter_keys(source.weights)
    except Exception as exc:  # safetensors and torch raise several types on a corrupt file
        raise InputError(f"{source.weights}: unreadable adapter weights ({first_line(exc)})") from exc
    expected = set(get_peft_model_state_dict(peft_model))
    unknown, missing = sorted(in_file - expected), sorted(expected - in_file)
    if unknown or missing:
        example = f"no module for {unknown[0]}" if unknown else f"no weights for {missing[0]}"
        raise InputError(f"{source.path}: adapter does not fit PaliGemma base {source.base} ({example}); "
                         "an adapter for another architecture or size?")


def _check_tokenizer(source: AdapterSource, processor) -> None:
    tokenizer_file = source.path / "tokenizer.json"
    if not tokenizer_file.is_file():
        return
    from tokenizers import Tokenizer

    try:
        vocab = Tokenizer.from_file(str(tokenizer_file)).get_vocab(with_added_tokens=True)
    except Exception as exc:  # tokenizers raises its own Exception type on a bad file
        raise InputError(f"{tokenizer_file}: unreadable tokenizer ({first_line(exc)})") from exc
    if vocab != processor.tokenizer.get_vocab():
        raise InputError(f"{tokenizer_file}: the adapter's tokenizer differs from its base's ({source.base}); "
                         "export uses the base's, so merge a base with that vocabulary instead")


def load_adapted(source: AdapterSource) -> Checkpoint:
    """The base checkpoint with the adapter applied, unmerged: ``model`` is the PEFT model."""
    from peft import PeftModel

    try:
        checkpoint = load_checkpoint(source.base)
    except InputError as exc:
        if not looks_like_hub_id(source.base):
            raise
        raise InputError(f"{source.path}: cannot load base model {source.base} ({exc}); "
                         "pass --base DIR with a local copy") from exc
    try:
        peft_model = PeftModel.from_pretrained(checkpoint.model, str(source.path))
    except Exception as exc:  # peft raises ValueError, RuntimeError (shapes), KeyError, ... on a foreign adapter
        raise InputError(f"{source.path}: adapter does not fit PaliGemma base {source.base} ({first_line(exc)})") from exc
    peft_model.eval()
    _check_keys(source, peft_model)
    _check_tokenizer(source, checkpoint.processor)
    return replace(checkpoint, model=peft_model)


def merge_adapter(checkpoint: Checkpoint) -> Checkpoint:
    """Fold the LoRA weights into the base's (in place, no copy) and check the LM head is still the embedding."""
    try:
        model = checkpoint.model.merge_and_unload(safe_merge=True)
    except ValueError as exc:  # safe_merge: the merged weights hold NaN or inf
        raise InputError(f"cannot merge the adapter ({first_line(exc)})") from exc
    embedding = model.model.language_model.embed_tokens.weight
    if model.lm_head.weight is not embedding and not bool((model.lm_head.weight == embedding).all()):
        raise InputError("the adapter changes the LM head apart from the token embedding; "
                         "bundles store them tied, as PaliGemma does")
    return replace(checkpoint, model=model)


def _base_weights_sha256(base: Path) -> str:
    """sha256 over the ``sha256sum``-style lines of the base's weight files, in name order."""
    lines = [f"{sha256_file(p)}  {p.name}\n" for p in sorted(base.iterdir())
             if p.is_file() and p.name.endswith(BASE_WEIGHT_SUFFIXES)]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def adapter_record(source: AdapterSource, merged: Checkpoint) -> AdapterRecord:
    """What the manifest records: the adapter's settings and weights digest, and its base's identity."""
    local = Path(source.base).is_dir()
    base = BaseModelRecord(
        source=str(Path(source.base).absolute()) if local else source.base,
        weights_sha256=_base_weights_sha256(Path(source.base)) if local else None,
        revision=None if local else getattr(merged.model.config, "_commit_hash", None),
    )
    return AdapterRecord(
        name=source.path.absolute().name, peft_type=source.peft_type, rank=source.rank, alpha=source.alpha,
        target_modules=source.target_modules, weights_file=source.weights.name, sha256=sha256_file(source.weights),
        base=base,
    )
