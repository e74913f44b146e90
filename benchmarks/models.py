"""Benchmark models: the real PaliGemma architectures and smaller ones, built from configs with random weights.

Speed does not depend on weight values, so no download is needed: a checkpoint of the real
architecture is made locally (config, safetensors, a small tokenizer, processor config) and goes
through the same export as a user's checkpoint. Vocabulary rows are the real 257,216 so the tied
embedding / LM head costs what it costs on a real model.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from ..fixtures.tiny import TinySpec, build_checkpoint

REAL_VOCAB_ROWS = 257_216

_MID = TinySpec(
    family=2, image_size=224, vision_hidden=384, vision_intermediate=1536, vision_layers=6, vision_heads=6,
    text_hidden=512, text_intermediate=2048, text_layers=8, heads=8, kv_heads=4, head_dim=64,
    sliding_window=4096, vocab_rows=REAL_VOCAB_ROWS, decoder_weight_std=None, real_softcaps=True,
)

_PALIGEMMA2_3B = TinySpec(
    family=2, image_size=224, vision_hidden=1152, vision_intermediate=4304, vision_layers=27, vision_heads=16,
    text_hidden=2304, text_intermediate=9216, text_layers=26, heads=8, kv_heads=4, head_dim=256,
    sliding_window=4096, vocab_rows=REAL_VOCAB_ROWS, decoder_weight_std=None, real_softcaps=True,
)


@dataclass(frozen=True)
class BenchModel:
    name: str
    spec: TinySpec
    description: str


MODELS = {
    model.name: model
    for model in (
        BenchModel("tiny", TinySpec(), "CI smoke: the test suite's tiny PaliGemma 2"),
        BenchModel("mid", _MID, "~175M parameters: PaliGemma 2 layout, 224 px (256 image tokens), real vocabulary"),
        *(BenchModel(f"mid-{size}", replace(_MID, image_size=size), f"mid at {size} px ({(size // 14) ** 2:,} image tokens)")
          for size in (448, 896)),
        BenchModel(
            "paligemma-3b-224",
            TinySpec(
                family=1, image_size=224, vision_hidden=1152, vision_intermediate=4304, vision_layers=27,
                vision_heads=16, text_hidden=2048, text_intermediate=16384, text_layers=18, heads=8, kv_heads=1,
                head_dim=256, vocab_rows=REAL_VOCAB_ROWS, decoder_weight_std=None, real_softcaps=True,
            ),
            "PaliGemma 1 3B at 224 px: SigLIP-So400m + Gemma 2B",
        ),
        BenchModel("paligemma2-3b-224", _PALIGEMMA2_3B, "PaliGemma 2 3B at 224 px: SigLIP-So400m + Gemma 2 2B"),
        BenchModel("paligemma2-3b-448", replace(_PALIGEMMA2_3B, image_size=448),
                   "PaliGemma 2 3B at 448 px (1,024 image tokens)"),
    )
}


def build_model(name_or_path: str, directory: Path) -> Path:
    """A checkpoint directory for a preset name (built once into ``directory``) or an existing path."""
    if name_or_path not in MODELS:
        return Path(name_or_path)
    target = Path(directory) / name_or_path
    if not (target / "config.json").is_file():
        build_checkpoint(target, MODELS[name_or_path].spec)
    return target
