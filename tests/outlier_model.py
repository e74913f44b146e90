"""A random PaliGemma whose residual stream carries "massive activations" (Sun et al. 2024).

Measured LLMs carry values of hundreds to thousands in a few fixed residual channels at the first
token(s) (<bos> and delimiters), written there by one MLP neuron in an early layer that fires on
that token only, and carried unchanged by the residual adds to the last layer. Gemma 2's post-norms
get there through large post-feed-forward norm weights. This module builds exactly that mechanism
into a random checkpoint of the real layout, with its own weights (seeded here, not export.tiny's):

- a *marker* channel that only <bos> carries (its embedding row; every writer to the residual
  stream leaves the channel alone), so the early neuron's gate sees it at <bos> and nothing else;
- that neuron (layer 0's MLP, neuron 0) writes +-OUTLIER into a few *massive* channels, through
  the post-feed-forward norm's weight on Gemma 2.

``outliers=False`` builds the same model with the neuron silent: the control that tells what the
quantization costs without outliers. The checkpoint is saved with ``save_pretrained`` and exported
with the normal CLI; export.tiny supplies only the config and tokenizer building.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypedDict

import numpy as np

OUTLIER = 3000.0  # |value| in the massive channels at <bos>, as measured in 7B-class LLMs' residual streams
MARKER_CHANNEL = 5
MASSIVE_CHANNELS = (11, 37, 50)  # +OUTLIER, +OUTLIER, -OUTLIER/2
NEURON = 0
SEED = 20240227  # own weights, not export.tiny's


def _massive_targets(outlier: float) -> dict[int, float]:
    return {MASSIVE_CHANNELS[0]: outlier, MASSIVE_CHANNELS[1]: outlier, MASSIVE_CHANNELS[2]: -outlier / 2}


def build_outlier_model(family: int = 2, outliers: bool = True, outlier: float = OUTLIER, image_size: int = 28,
                        text_layers: int = 3):
    """(model, processor): a random PaliGemma ``family`` with (or without) massive activations of about
    ``outlier`` at <bos>."""
    import torch

    from paligemma_edge.fixtures.tiny import TinySpec, build_model

    model, processor = build_model(TinySpec(family=family, image_size=image_size, text_layers=text_layers,
                                            decoder_weight_std=None, real_softcaps=True,
                                            seed=SEED % 1000))
    rng = np.random.default_rng(SEED + family)
    language = model.model.language_model
    bos = processor.tokenizer.convert_tokens_to_ids("<bos>")

    def fill(tensor, std):
        tensor.copy_(torch.from_numpy(rng.normal(0.0, std, tuple(tensor.shape)).astype(np.float32)))

    with torch.no_grad():
        for name, parameter in language.layers.named_parameters():
            if parameter.dim() == 2:
                fill(parameter, 0.15)
            elif "norm" in name:  # Gemma's RMSNorm scales by (1 + weight)
                fill(parameter, 0.1)
        embedding = language.embed_tokens.weight
        fill(embedding, 0.05)
        # The marker channel: only <bos> has it, and nothing writes to it.
        embedding[:, MARKER_CHANNEL] = 0.0
        embedding[bos] *= 0.2
        embedding[bos, MARKER_CHANNEL] = 1.0
        projector = model.model.multi_modal_projector.linear
        projector.weight[MARKER_CHANNEL] = 0.0
        projector.bias[MARKER_CHANNEL] = 0.0
        for layer in language.layers:
            layer.self_attn.o_proj.weight[MARKER_CHANNEL] = 0.0
            layer.mlp.down_proj.weight[MARKER_CHANNEL] = 0.0
            for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm"):
                if hasattr(layer, norm):
                    getattr(layer, norm).weight[MARKER_CHANNEL] = 0.0
        # The early neuron: reads only the marker, writes only the massive channels.
        mlp = language.layers[0].mlp
        for projection in (mlp.gate_proj, mlp.up_proj):
            projection.weight[NEURON] = 0.0
            projection.weight[:, MARKER_CHANNEL] = 0.0
            projection.weight[NEURON, MARKER_CHANNEL] = 0.5
        targets = _massive_targets(outlier)
        for channel in targets:
            mlp.down_proj.weight[channel] = 0.0
        gemma2 = hasattr(language.layers[0], "post_feedforward_layernorm")
        if outliers:
            for channel, value in targets.items():
                mlp.down_proj.weight[channel, NEURON] = float(np.sign(value))
            if gemma2:  # large post-norm weights, as real Gemma 2 checkpoints have
                language.layers[0].post_feedforward_layernorm.weight[list(targets)] = 0.0
            _scale_to_targets(model, processor, targets, gemma2)
    return model, processor


def _scale_to_targets(model, processor, targets: dict[int, float], gemma2: bool) -> None:
    """Scale the writer of each massive channel (down_proj's weight, or Gemma 2's post-norm scale 1 + w,
    both linear in the value) so that <bos> carries the target value after layer 0 on a sample input."""
    import torch
    from PIL import Image

    inputs = processor(images=[Image.new("RGB", (64, 64), (128, 128, 128))], text=["<image>caption en"],
                       return_tensors="pt")
    bos = processor.tokenizer.convert_tokens_to_ids("<bos>")
    position = int((inputs["input_ids"][0] == bos).nonzero()[0, 0])
    inputs.pop("labels", None)
    with torch.no_grad():
        after = model(**inputs, output_hidden_states=True).hidden_states[1][0, position]
        layer = model.model.language_model.layers[0]
        for channel, value in targets.items():
            factor = value / float(after[channel])
            if gemma2:
                weight = layer.post_feedforward_layernorm.weight
                weight[channel] = (1.0 + weight[channel]) * factor - 1.0
            else:
                layer.mlp.down_proj.weight[channel, NEURON] *= factor


def save_outlier_checkpoint(output_dir: str | Path, family: int = 2, outliers: bool = True,
                            outlier: float = OUTLIER) -> Path:
    model, processor = build_outlier_model(family, outliers, outlier)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return output_dir


class ResidualMaxima(TypedDict):
    max_abs_per_layer: list[float]  # one per layer boundary (the embeddings first)
    position: int  # where the largest |value| at the last layer's input sits
    channel: int
    token: int  # the input token at that position
    bos: int | list[int]
    max_square: float  # the largest x^2 over every boundary


def residual_maxima(checkpoint: str | Path, image, prompt: str = "caption en") -> ResidualMaxima:
    """transformers' fp32 model on one input: max |residual| per layer output and where it sits, and the
    largest RMSNorm x^2 (what overflows fp16 above 65504)."""
    import torch
    from transformers import AutoProcessor, PaliGemmaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(checkpoint, backend="pil")
    model = PaliGemmaForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    inputs = processor(images=[image], text=[f"<image>{prompt}"], return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    states = [h[0] for h in out.hidden_states]  # [seq, hidden] per layer boundary
    maxima = [float(s.abs().max()) for s in states]
    last = states[-2].abs()  # the input of the last layer
    position, channel = divmod(int(last.argmax()), last.shape[1])
    bos = processor.tokenizer.convert_tokens_to_ids("<bos>")
    return {
        "max_abs_per_layer": maxima,
        "position": position, "channel": channel,
        "token": int(inputs["input_ids"][0, position]), "bos": bos,
        "max_square": max(float((s.double() ** 2).max()) for s in states),
    }
