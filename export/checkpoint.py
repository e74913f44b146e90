"""Load a PaliGemma checkpoint and read what the bundle needs from it, never guessing ids."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..runtime.errors import InputError, first_line
from ..runtime.bundle.manifest import FULL, GROWING, SLIDING, DecoderSpec, ImageSpec, TokenIds, read_json_object

FAMILIES = {"gemma": 1, "gemma2": 2}


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: the transformers model and processor, and facts read from them."""

    model: Any
    processor: Any
    family: int
    tokens: TokenIds
    image: ImageSpec


def _check_local_dir(path: Path) -> None:
    if not path.is_dir():
        raise InputError(f"{path}: no such checkpoint directory")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise InputError(f"{path}: not a Hugging Face checkpoint (no config.json)")
    model_type = read_json_object(config_path, InputError, "config").get("model_type")
    if model_type != "paligemma":
        raise InputError(f"{path}: a {model_type or 'unknown'} checkpoint, not PaliGemma (model_type 'paligemma')")


def _as_tuple(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),)


def read_token_ids(model, processor) -> TokenIds:
    """Ids as generate() and the processor use them: generation config first, then config, then tokenizer."""
    generation = model.generation_config
    text_config = model.config.text_config
    tokenizer = processor.tokenizer
    eos = _as_tuple(generation.eos_token_id) or _as_tuple(text_config.eos_token_id) or _as_tuple(tokenizer.eos_token_id)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else text_config.bos_token_id
    pad = generation.pad_token_id if generation.pad_token_id is not None else tokenizer.pad_token_id
    if pad is None:
        pad = text_config.pad_token_id
    image = model.config.image_token_id
    missing = [n for n, v in (("eos", eos), ("bos", bos), ("pad", pad), ("image", image)) if v in (None, ())]
    if missing:
        raise InputError(f"checkpoint does not define token id(s): {', '.join(missing)}")
    if tokenizer.convert_tokens_to_ids(processor.image_token) != image:
        raise InputError("checkpoint's tokenizer and config disagree on the <image> token id")
    return TokenIds(image=int(image), bos=int(bos), eos=eos, pad=int(pad))


def read_image_spec(model, processor) -> ImageSpec:
    ip = processor.image_processor
    size = ip.size
    height, width = (size["height"], size["width"]) if "height" in size else (size["shortest_edge"],) * 2
    vision = model.config.vision_config
    num_tokens = int(processor.image_seq_length)
    expected = (vision.image_size // vision.patch_size) ** 2
    if num_tokens != expected:
        raise InputError(f"processor uses {num_tokens} image tokens but the vision tower makes {expected}")
    do_rescale = getattr(ip, "do_rescale", True)
    do_normalize = getattr(ip, "do_normalize", True)
    return ImageSpec(
        height=int(height), width=int(width), num_tokens=num_tokens,
        resample=int(ip.resample if ip.resample is not None else 3),
        rescale_factor=float(ip.rescale_factor) if do_rescale else 1.0,
        mean=_per_channel(ip.image_mean, "image_mean") if do_normalize else (0.0, 0.0, 0.0),
        std=_per_channel(ip.image_std, "image_std") if do_normalize else (1.0, 1.0, 1.0),
    )


def _per_channel(values, name: str) -> tuple[float, float, float]:
    """An RGB triple from the processor's per-channel list."""
    channels = tuple(float(v) for v in values)
    if len(channels) != 3:
        raise InputError(f"processor {name} has {len(channels)} values, expected 3 (RGB)")
    return channels[0], channels[1], channels[2]


def decoder_spec(model, max_seq_len: int, kv_cache: str = GROWING) -> DecoderSpec:
    config = model.config.text_config
    layer_types = getattr(config, "layer_types", None) or [FULL] * config.num_hidden_layers
    sliding_window = getattr(config, "sliding_window", None) if SLIDING in layer_types else None
    return DecoderSpec(
        hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        vocab_size=config.vocab_size,
        max_seq_len=max_seq_len,
        embedding_scale=float(model.model.language_model.embed_tokens.embed_scale),
        layer_types=tuple(layer_types),
        sliding_window=sliding_window,
        kv_cache=kv_cache,
    )


def looks_like_hub_id(model_ref: str) -> bool:
    """'owner/name' that is not a path here: loaded from the hub, where the network allows."""
    return not Path(model_ref).exists() and model_ref.count("/") == 1 and not model_ref.startswith((".", "/"))


def load_checkpoint(model_ref: str) -> Checkpoint:
    """Load MODEL (a local directory, or a hub id where the network allows) in fp32 on the CPU."""
    import torch
    from transformers import AutoProcessor, PaliGemmaForConditionalGeneration, PreTrainedConfig

    if not looks_like_hub_id(model_ref):
        _check_local_dir(Path(model_ref))
    try:
        # The PIL backend: the runtime resizes with PIL, and transformers would pick its torchvision
        # backend (antialiased resize, different pixels) whenever torchvision is importable.
        processor = AutoProcessor.from_pretrained(model_ref, backend="pil")
        model = PaliGemmaForConditionalGeneration.from_pretrained(model_ref, dtype=torch.float32)
    except Exception as exc:  # loaders raise OSError, ValueError, SafetensorError, ... on a bad checkpoint
        raise InputError(f"{model_ref}: cannot load checkpoint ({first_line(exc)})") from exc
    model.eval()
    text_config = model.config.text_config
    if not isinstance(text_config, PreTrainedConfig):  # PaliGemmaConfig builds it from a dict or its default
        raise InputError(f"{model_ref}: config has no text decoder config")
    family = FAMILIES.get(text_config.model_type)
    if family is None:
        raise InputError(f"{model_ref}: text decoder '{text_config.model_type}' is not Gemma or Gemma 2")
    return Checkpoint(
        model=model, processor=processor, family=family,
        tokens=read_token_ids(model, processor), image=read_image_spec(model, processor),
    )
