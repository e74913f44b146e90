"""Pixels, prompt ids and masks against transformers' processor and masking code."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import paligemma_edge
from paligemma_edge.runtime.errors import InputError
from paligemma_edge.runtime.generation.attention_masks import attention_mask, position_ids
from paligemma_edge.runtime.generation.tasks import resolve_prompt
from paligemma_edge.runtime.images import load_image
from paligemma_edge.runtime.preprocess import preprocess

from .conftest import model_id


def _pictures(tmp_path):
    rng = np.random.default_rng(3)
    rgb = Image.fromarray(rng.integers(0, 256, (97, 61, 3), dtype=np.uint8))
    rgba = Image.fromarray(rng.integers(0, 256, (20, 300, 4), dtype=np.uint8), "RGBA")
    gray = Image.fromarray(rng.integers(0, 256, (50, 50), dtype=np.uint8), "L")
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 3
    paths = []
    for name, picture in [("rgb.jpg", rgb), ("rgba.png", rgba), ("gray.png", gray), ("palette.png", palette)]:
        picture.save(tmp_path / name)
        paths.append(tmp_path / name)
    return paths


@pytest.mark.parametrize("model", [(1, 28), (2, 42)], ids=model_id)
def test_pixels_equal_the_processor(model, bundles, references, tmp_path):
    spec = paligemma_edge.load(bundles[model]).manifest.image
    for path in _pictures(tmp_path):
        ours = preprocess([load_image(path)], spec)
        theirs = references[model].processor.image_processor(images=[Image.open(path)], return_tensors="np")
        np.testing.assert_array_equal(ours, theirs["pixel_values"], err_msg=path.name)


@pytest.mark.parametrize("model", [(1, 28), (2, 42)], ids=model_id)
def test_prompt_ids_equal_the_processor(model, bundles, references, images):
    prompts = ["caption en", "answer en what colour is the   car?", "detect cat ; dog", "", "ocr"]
    with paligemma_edge.load(bundles[model]) as runtime:
        batch = runtime.tokenizer.batch(prompts)
    inputs = references[model].inputs([images[0]] * len(prompts), prompts)
    np.testing.assert_array_equal(batch.input_ids, inputs["input_ids"].numpy())
    np.testing.assert_array_equal(batch.valid, inputs["attention_mask"].numpy().astype(bool))


def test_positions_are_one_indexed_and_skip_left_padding():
    valid = np.array([[False, False, True, True], [True, True, True, True]])
    np.testing.assert_array_equal(position_ids(valid), [[1, 1, 1, 2], [1, 2, 3, 4]])


@pytest.mark.parametrize("window", [None, 3])
def test_prefill_mask_equals_transformers(window):
    """Our caller-built masks against transformers' own mask code for the prefix-LM block."""
    import torch
    from transformers import Gemma2Config
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    valid = np.array([[False, False, True, True, True, True], [True] * 6, [False] * 5 + [True]])
    config = Gemma2Config(hidden_size=8, num_attention_heads=2, num_key_value_heads=1, head_dim=4,
                          num_hidden_layers=2, sliding_window=window or 4096)
    config._attn_implementation = "sdpa"
    batch, seq = valid.shape
    # Prompt rows and a batch with generated (suffix, type 1) tokens appended after the prompt.
    token_types = np.zeros((batch, seq), dtype=np.int64)
    token_types[:, 4:] = 1
    for prefix_len, types in [(seq, np.zeros_like(token_types)), (4, token_types)]:
        kwargs = dict(
            config=config, inputs_embeds=torch.zeros(batch, seq, 8), attention_mask=torch.from_numpy(valid),
            past_key_values=None, position_ids=torch.from_numpy(position_ids(valid)),
            block_sequence_ids=torch.where(torch.from_numpy(types) == 0, 0, -1),
        )
        make = create_causal_mask if window is None else create_sliding_window_causal_mask
        theirs = make(**kwargs).numpy()
        ours = attention_mask(valid, prefix_len, 0, seq, window)
        # Rows of padding queries are don't-care (their outputs are never used): compare real queries.
        np.testing.assert_array_equal(ours[:, 0][valid], theirs[:, 0][valid])


def test_decode_mask_is_causal_with_window():
    valid = np.array([[False, True, True, True, True, True, True]])
    mask = attention_mask(valid, prefix_len=3, q_start=6, q_len=1, window=3)[0, 0, 0]
    assert mask.tolist() == [False, False, False, False, True, True, True]
    mask = attention_mask(valid, prefix_len=3, q_start=6, q_len=1)[0, 0, 0]
    assert mask.tolist() == [False, True, True, True, True, True, True]


def test_request_prompts_take_a_free_prompt_or_a_task_and_treat_blank_fields_as_absent():
    assert resolve_prompt("  caption en ", None, None, None, None) == "caption en"
    assert resolve_prompt(" ", " detect ", "", None, "cat ; dog") == "detect cat ; dog"
    assert resolve_prompt(None, "answer", " de ", "what is it", "  ") == "answer de what is it"
    assert resolve_prompt(None, "caption", None, "", None) == "caption en"
    for fields, message in [(("x", "caption", None, None, None), "not both"),
                            (("x", None, "en", None, None), "go with 'task'"),
                            (("", " ", None, None, None), "give a 'prompt' or a 'task'")]:
        with pytest.raises(InputError, match=message):
            resolve_prompt(*fields)
