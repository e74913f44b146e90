"""Token selection: pure functions, no model."""

from __future__ import annotations

import numpy as np
import pytest

from paligemma_edge import GenerationOptions, InputError
from paligemma_edge.runtime.generation.sampling import filtered_probabilities, next_tokens

LOGITS = np.array([[0.0, 3.0, 1.0, 2.0, -1.0], [5.0, 4.0, 4.5, 0.0, 0.0]], dtype=np.float32)


def test_greedy_is_argmax_with_first_index_on_ties():
    rng = np.random.default_rng(0)
    tied = np.array([[1.0, 7.0, 7.0]])
    assert next_tokens(LOGITS, GenerationOptions(), rng).tolist() == [1, 0]
    assert next_tokens(tied, GenerationOptions(), rng).tolist() == [1]


def test_top_k_keeps_only_the_k_best():
    probs = filtered_probabilities(LOGITS, GenerationOptions(temperature=1.0, top_k=2))
    assert (probs > 0).sum(axis=1).tolist() == [2, 2]
    assert probs[0, 1] > probs[0, 3] > 0 and probs[1, 0] > probs[1, 2] > 0
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    probs = filtered_probabilities(LOGITS, GenerationOptions(temperature=1.0, top_p=0.7))
    full = filtered_probabilities(LOGITS, GenerationOptions(temperature=1.0))
    order = np.argsort(-full[0])
    assert full[0, order[0]] < 0.7 <= full[0, order[:2]].sum()  # the example needs two tokens
    assert set(np.flatnonzero(probs[0])) == set(order[:2])
    tiny = filtered_probabilities(LOGITS, GenerationOptions(temperature=1.0, top_p=1e-6))
    assert np.argmax(tiny, axis=1).tolist() == [1, 0] and (tiny > 0).sum() == 2


def test_temperature_sharpens_and_flattens():
    cold = filtered_probabilities(LOGITS, GenerationOptions(temperature=0.25))
    hot = filtered_probabilities(LOGITS, GenerationOptions(temperature=4.0))
    assert cold[0].max() > hot[0].max()


def test_sampling_is_reproducible_and_follows_the_distribution():
    options = GenerationOptions(temperature=1.0, top_k=3, seed=0)
    first = [next_tokens(LOGITS, options, np.random.default_rng(11)).tolist() for _ in range(3)]
    assert first[0] == first[1] == first[2]
    rng = np.random.default_rng(5)
    draws = np.array([next_tokens(LOGITS, options, rng) for _ in range(4000)])
    probs = filtered_probabilities(LOGITS, options)
    for row in range(2):
        counts = np.bincount(draws[:, row], minlength=5) / len(draws)
        np.testing.assert_allclose(counts, probs[row], atol=0.03)
        assert counts[probs[row] == 0].sum() == 0


@pytest.mark.parametrize("bad", [
    dict(max_new_tokens=0), dict(temperature=-1.0), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5),
])
def test_bad_options_are_input_errors(bad):
    with pytest.raises(InputError):
        GenerationOptions(**bad)


def test_ignore_eos_decodes_past_eos_to_the_budget_row_by_row(shapes_bundle):
    """A trained model stops at eos; with ignore_eos its row goes on to max_new_tokens, eos kept as a token,
    while the other rows of the same batch still stop at eos."""
    from paligemma_edge import load
    from paligemma_edge.shapes import scenes

    picture = scenes.render(scenes.scene("heldout", 2))
    prompts = ["caption en", "answer en how many shapes are there"]
    with load(shapes_bundle, verify=False) as model:
        eos = set(model.manifest.tokens.eos)
        plain = model.generate_batch([picture], prompts, GenerationOptions(max_new_tokens=20))
        assert all(g.finish_reason == "eos" and len(g.token_ids) < 10 for g in plain)
        mixed = model.generate_batch([picture], prompts, [GenerationOptions(max_new_tokens=20, ignore_eos=True),
                                                          GenerationOptions(max_new_tokens=20)])
    on, stopped = mixed
    assert on.finish_reason == "length" and len(on.token_ids) == 20
    assert on.token_ids[:len(plain[0].token_ids)] == plain[0].token_ids  # the same answer first ...
    assert on.token_ids[len(plain[0].token_ids)] in eos  # ... then the eos it would have stopped at
    assert (stopped.token_ids, stopped.finish_reason, stopped.text) == (plain[1].token_ids, "eos", plain[1].text)
