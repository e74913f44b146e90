"""Tiny random PaliGemma checkpoints, built locally from configs.

These go through exactly the loading code a real checkpoint does: a config,
safetensors weights, a tokenizer and a processor config written with
``save_pretrained``. They are what the tests, ``make demo`` and CI smoke
benchmarks use, because model hubs are out of reach on those machines.

    python -m paligemma_edge.export.tiny OUTPUT_DIR [--family 2] [--image-size 28]
"""

from __future__ import annotations

import argparse
import string
from dataclasses import dataclass
from pathlib import Path

LOC_TOKENS = [f"<loc{i:04d}>" for i in range(1024)]
SEG_TOKENS = [f"<seg{i:03d}>" for i in range(128)]
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
IMAGE_TOKEN = "<image>"

# A small corpus in the style of PaliGemma prompts and answers; the BPE merges
# learnt from it make the tokenizer behave like a real subword tokenizer.
_CORPUS = [
    "caption en", "describe en", "ocr", "answer en what is in the image",
    "answer en how many shapes are there", "detect cat ; dog", "segment cat",
    "a red circle and a blue square", "a green triangle on a white table",
    "the quick brown fox jumps over the lazy dog", "What color is the car?",
    "There are 3 shapes in the picture.", "cat", "dog", "car", "person",
]


@dataclass(frozen=True)
class TinySpec:
    """Sizes of a random checkpoint; the defaults (tiny) run in seconds on a CPU.

    The benchmarks use the same builder for the real PaliGemma architectures."""

    family: int = 2
    image_size: int = 28
    patch_size: int = 14
    vision_hidden: int = 32
    vision_intermediate: int | None = None  # default: 2 x hidden
    vision_layers: int = 2
    vision_heads: int = 2
    text_hidden: int = 64
    text_intermediate: int | None = None  # default: 2 x hidden
    text_layers: int = 3
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    sliding_window: int = 8
    vocab_rows: int | None = None  # default: the tokenizer's size, padded to a multiple of 64
    # At transformers' default init (0.02) a tiny decoder mostly echoes its last input token;
    # larger decoder weights make the greedy outputs varied, so parity tests can see a wrong token.
    # None keeps transformers' init (the benchmarks: speed does not depend on values).
    decoder_weight_std: float | None = 0.2
    # Gemma 2's real 256 / 50 / 30 (query scale, attention and final softcaps); the tiny default
    # uses values its small logits feel, so a missing softcap or a wrong scale changes them measurably.
    real_softcaps: bool = False
    seed: int = 0


def build_tokenizer(corpus: list[str] = _CORPUS, vocab_size: int = 320):
    """A small BPE tokenizer with Gemma's special tokens and PaliGemma's loc/seg tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never")
    tokenizer.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="never")
    alphabet = sorted(set(string.printable.replace(" ", "\u2581")))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=alphabet, show_progress=False
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in LOC_TOKENS + SEG_TOKENS])
    tokenizer.add_special_tokens([AddedToken(IMAGE_TOKEN, normalized=False, special=True)])
    return tokenizer


def build_checkpoint(output_dir: str | Path, spec: TinySpec = TinySpec()) -> Path:
    """Write a random PaliGemma checkpoint (model, tokenizer, processor) to ``output_dir``."""
    model, processor = build_model(spec)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return output_dir


def build_model(spec: TinySpec = TinySpec(), tokenizer_object=None):
    """A random PaliGemmaForConditionalGeneration and its processor (``tokenizer_object``: a
    ``tokenizers.Tokenizer`` with the special, loc and seg tokens; default :func:`build_tokenizer`)."""
    import torch
    from transformers import (
        Gemma2Config,
        GemmaConfig,
        GenerationConfig,
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        PreTrainedTokenizerFast,
        SiglipVisionConfig,
    )
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer_object or build_tokenizer(),
        bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>", padding_side="left",
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (*SPECIAL_TOKENS, IMAGE_TOKEN)}
    vocab_rows = spec.vocab_rows or -(-len(tokenizer) // 64) * 64  # padded like PaliGemma's 257216-row table

    text_kwargs = dict(
        hidden_size=spec.text_hidden, intermediate_size=spec.text_intermediate or 2 * spec.text_hidden,
        num_hidden_layers=spec.text_layers, num_attention_heads=spec.heads,
        head_dim=spec.head_dim, vocab_size=vocab_rows,
        pad_token_id=ids["<pad>"], bos_token_id=ids["<bos>"], eos_token_id=ids["<eos>"],
    )
    if spec.family == 1:
        text_config = GemmaConfig(num_key_value_heads=1, **text_kwargs)  # Gemma 2B: multi-query attention
        eos_ids: list[int] | int = ids["<eos>"]
    elif spec.family == 2:
        scalar, attn_cap, final_cap = (256, 50.0, 30.0) if spec.real_softcaps else (spec.head_dim + 8, 2.0, 0.5)
        text_config = Gemma2Config(
            num_key_value_heads=spec.kv_heads, sliding_window=spec.sliding_window,
            query_pre_attn_scalar=scalar, attn_logit_softcapping=attn_cap, final_logit_softcapping=final_cap,
            **text_kwargs,
        )
        eos_ids = [ids["<eos>"], ids["<end_of_turn>"]]
    else:
        raise ValueError(f"family must be 1 or 2, got {spec.family}")
    vision_config = SiglipVisionConfig(
        hidden_size=spec.vision_hidden, intermediate_size=spec.vision_intermediate or 2 * spec.vision_hidden,
        num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
        image_size=spec.image_size, patch_size=spec.patch_size, vision_use_head=False,
    )
    config = PaliGemmaConfig(
        vision_config=vision_config, text_config=text_config, image_token_index=ids[IMAGE_TOKEN],
        vocab_size=vocab_rows, projection_dim=spec.text_hidden, hidden_size=spec.text_hidden,
        pad_token_id=ids["<pad>"], bos_token_id=ids["<bos>"], eos_token_id=eos_ids,
    )
    torch.manual_seed(spec.seed)
    model = PaliGemmaForConditionalGeneration(config).eval()
    if spec.decoder_weight_std is not None:
        with torch.no_grad():
            for parameter in model.model.language_model.layers.parameters():
                if parameter.dim() == 2:
                    parameter.normal_(0.0, spec.decoder_weight_std)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<bos>"], eos_token_id=eos_ids, pad_token_id=ids["<pad>"], max_new_tokens=20,
    )
    image_processor = SiglipImageProcessorPil(
        size={"height": spec.image_size, "width": spec.image_size},
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    image_processor.image_seq_length = (spec.image_size // spec.patch_size) ** 2
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return model, processor


def build_mask_decoder_npz(path: str | Path, codebook_dim: int = 16, seed: int = 0) -> Path:
    """Random weights in the vae-oid.npz layout (real key names and shapes; codebook width is free)."""
    import numpy as np

    from ..runtime.mask_decoder import required_shapes

    rng = np.random.default_rng(seed)
    arrays = {}
    for name, shape in required_shapes(codebook_dim).items():
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        arrays[name] = (rng.standard_normal(shape) / np.sqrt(max(fan_in, 1))).astype(np.float32)
    path = Path(path)
    np.savez(path, **arrays)
    return path


def scene_image(size: tuple[int, int] = (320, 240)):
    """A deterministic sample picture (a few coloured shapes) for demos, tests and benchmarks."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, (245, 245, 240))
    draw = ImageDraw.Draw(image)
    draw.ellipse((30, 40, 130, 140), fill=(220, 40, 40))
    draw.rectangle((170, 60, 280, 170), fill=(40, 80, 220))
    draw.polygon([(90, 220), (150, 150), (210, 220)], fill=(40, 170, 60))
    return image


def draw_scene(path: str | Path) -> Path:
    """Save :func:`scene_image` to ``path``."""
    path = Path(path)
    scene_image().save(path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", help="directory to write the checkpoint to")
    parser.add_argument("--family", type=int, choices=(1, 2), default=2, help="PaliGemma 1 or 2")
    parser.add_argument("--image-size", type=int, default=28, help="square input size in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = build_checkpoint(args.output, TinySpec(family=args.family, image_size=args.image_size, seed=args.seed))
    draw_scene(path / "sample.png")
    build_mask_decoder_npz(path / "vae-oid.npz")
    print(f"wrote tiny PaliGemma {args.family} checkpoint (random weights), vae-oid.npz and sample.png to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
