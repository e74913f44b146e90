"""Export-friendly PyTorch modules around a transformers PaliGemma model.

The modules reuse the checkpoint's own layers (projections, norms, MLPs, rotary
frequencies) and spell out only what has to be explicit in a graph a runtime drives:
the attention with a caller-built mask, the KV cache as plain tensors, the tied LM head
fed in as an input so the bundle stores that matrix once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ..runtime.bundle.manifest import SLIDING, DecoderSpec
from .cache_ops import add_to_cache
from .attention import QUERY_CHUNK, attention_implementation, chunked_grouped_attention, vision_attention_name

if TYPE_CHECKING:
    from transformers import PaliGemmaForConditionalGeneration


class VisionEncoder(nn.Module):
    """pixel_values [batch, 3, H, W] -> image embeddings [batch, tokens, text hidden].

    The output is what the decoder consumes at the image-token positions: the
    projector's output, without the text embedding scale. The tower's attention runs in
    chunks of ``query_chunk`` image tokens (see export/attention.py), selected on the
    vision config only while this module's forward runs.
    """

    def __init__(self, model: PaliGemmaForConditionalGeneration, query_chunk: int = QUERY_CHUNK):
        super().__init__()
        self.tower = model.model.vision_tower
        self.projector = model.model.multi_modal_projector
        self.vision_config = model.config.vision_config
        self.attention = vision_attention_name(query_chunk)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with attention_implementation(self.vision_config, self.attention):
            return self.projector(self.tower(pixel_values).last_hidden_state)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class DecoderStep(nn.Module):
    """One call of the text decoder, for prefill (empty past) and for each decode step.

    Inputs: inputs_embeds [b, s, hidden]; attention_mask [b, 1, s, past+s] (bool, True =
    attend); for Gemma 2 also sliding_attention_mask of the same shape; position_ids [b, s];
    embedding [vocab, hidden] (the tied table); past key/value per layer [b, kv, past, d]; for an
    in-place cache (spec.cache_in_place) past is the whole buffer [b, kv, cache, d], the masks cover it,
    and write_indices [b] comes last (see export/cache_ops.py).
    Outputs: logits of the last position [b, vocab]; present key/value per layer.
    The attention runs over chunks of ``query_chunk`` query rows, enough of them to cover
    spec.max_seq_len (see export/attention.py); a decode step (seq = 1) fills the first chunk.
    """

    def __init__(self, model: PaliGemmaForConditionalGeneration, spec: DecoderSpec, query_chunk: int = QUERY_CHUNK):
        super().__init__()
        self.query_chunk = query_chunk
        language_model = model.model.language_model
        text_config = model.config.text_config
        self.spec = spec
        self.layers = language_model.layers
        self.final_norm = language_model.norm
        self.register_buffer("inv_freq", language_model.rotary_emb.inv_freq.detach().clone(), persistent=False)
        self.rope_scaling = float(getattr(language_model.rotary_emb, "attention_scaling", 1.0))
        self.attn_softcap = getattr(text_config, "attn_logit_softcapping", None)
        self.final_softcap = getattr(text_config, "final_logit_softcapping", None)
        self.gemma2_norms = hasattr(self.layers[0], "pre_feedforward_layernorm")

    def forward(self, inputs_embeds, attention_mask, *rest):
        if self.spec.has_sliding_layers:
            sliding_attention_mask, position_ids, embedding, *past = rest
        else:
            sliding_attention_mask = attention_mask
            position_ids, embedding, *past = rest
        write_indices = past.pop() if self.spec.cache_in_place else None  # the last input (decoder_io)
        hidden = inputs_embeds
        freqs = position_ids[..., None].float() * self.inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)
        cos = (angles.cos() * self.rope_scaling).unsqueeze(1)
        sin = (angles.sin() * self.rope_scaling).unsqueeze(1)
        presents = []
        for index, layer in enumerate(self.layers):
            mask = sliding_attention_mask if self.spec.layer_types[index] == SLIDING else attention_mask
            residual = hidden
            attn_out, key, value = self._attention(
                layer.self_attn, layer.input_layernorm(hidden), cos, sin, mask, past[2 * index], past[2 * index + 1],
                write_indices,
            )
            presents += [key, value]
            if self.gemma2_norms:
                hidden = residual + layer.post_attention_layernorm(attn_out)
                ff = layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(hidden)))
            else:
                hidden = residual + attn_out
                ff = layer.mlp(layer.post_attention_layernorm(hidden))
            hidden = hidden + ff
        last = self.final_norm(hidden[:, -1, :])
        # [vocab, hidden] @ [hidden, batch]: the big matrix streams once, unpacked.
        logits = torch.matmul(embedding, last.transpose(0, 1)).transpose(0, 1)
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return (logits, *presents)

    def _attention(self, attn, x, cos, sin, mask, past_key, past_value, write_indices):
        batch, seq, _ = x.shape
        spec = self.spec
        query = attn.q_proj(x).view(batch, seq, spec.num_heads, spec.head_dim).transpose(1, 2)
        key = attn.k_proj(x).view(batch, seq, spec.num_kv_heads, spec.head_dim).transpose(1, 2)
        value = attn.v_proj(x).view(batch, seq, spec.num_kv_heads, spec.head_dim).transpose(1, 2)
        query = query * cos + _rotate_half(query) * sin
        key = key * cos + _rotate_half(key) * sin
        key = add_to_cache(past_key, key, write_indices)
        value = add_to_cache(past_value, value, write_indices)

        out = chunked_grouped_attention(query, key, value, mask, attn.scaling, self.attn_softcap, spec.num_kv_heads,
                                        spec.max_seq_len, self.query_chunk)
        out = out.transpose(1, 2).reshape(batch, seq, -1)
        return attn.o_proj(out), key, value
