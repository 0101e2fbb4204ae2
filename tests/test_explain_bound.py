"""scripts/bench_explain_bound.py: the lookup-table bound on held-out detection F1, on planted
features whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import load_script


@pytest.fixture(scope="module")
def bound():
    return load_script("bench_explain_bound")


def occurrences(keys, held):
    return [dict(zip(*(x.tolist() for x in np.unique(keys[held == s], return_counts=True)))) for s in (0, 1)]


def test_a_token_feature_is_fitted_exactly_and_scores_one(bound):
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 50, 20_000)
    held = rng.random(20_000) < 0.25
    fire = np.nonzero(np.isin(keys, [3, 17]))[0]
    occ = occurrences(keys, held)
    assert sorted(bound.fit(keys, fire[~held[fire]], occ[0]).tolist()) == [3, 17]
    assert bound.lookup_f1(keys, fire, held, occ) == pytest.approx(1.0)


def test_half_the_occurrences_of_a_token_score_two_thirds(bound):
    # The feature fires on every other "3": the best union is {3}, precision 0.5, recall 1.
    keys = np.tile(np.arange(10), 2000)
    held = np.arange(len(keys)) % 7 == 0
    threes = np.nonzero(keys == 3)[0]
    fire = threes[::2]
    assert bound.lookup_f1(keys, fire, held, occurrences(keys, held)) == pytest.approx(2 / 3, abs=0.01)


def test_random_firings_are_not_fitted_onto_held_out_text(bound):
    # A feature firing on 1 % of rows at random: whatever union the explain split suggests
    # scores near the base rate on held-out rows.
    rng = np.random.default_rng(1)
    keys = rng.integers(0, 2000, 50_000)
    held = rng.random(50_000) < 0.25
    fire = np.nonzero(rng.random(50_000) < 0.01)[0]
    assert bound.lookup_f1(keys, fire, held, occurrences(keys, held)) < 0.1


def test_widening_adds_only_unseen_tokens_near_a_chosen_one(bound):
    import torch

    # Token 5 never occurs in the explain split; its embedding equals token 3's.
    keys = np.tile(np.arange(10), 1000)
    held = np.arange(len(keys)) >= 8000
    keys[:8000][keys[:8000] == 5] = 6
    E = torch.eye(10)
    E[5] = E[3]
    occ = occurrences(keys, held)
    fire = np.nonzero(np.isin(keys, [3, 5]))[0]
    assert bound.lookup_f1(keys, fire, held, occ) == pytest.approx(2 / 3, abs=0.01)  # 5 missed: recall 1/2
    assert bound.lookup_f1(keys, fire, held, occ, bound.neighbours(occ, E, 0.9)) == pytest.approx(1.0)


def test_a_cell_that_rarely_fires_is_left_out_of_the_union(bound):
    # Fires on every "3" and on 2 % of the "4"s: {3} alone is the best union; adding "4" would
    # predict 50 times more misses than hits.
    rng = np.random.default_rng(2)
    keys = rng.integers(0, 10, 40_000)
    held = rng.random(40_000) < 0.25
    fire = np.nonzero((keys == 3) | ((keys == 4) & (rng.random(40_000) < 0.02)))[0]
    occ = occurrences(keys, held)
    assert bound.fit(keys, fire[~held[fire]], occ[0]).tolist() == [3]
    assert bound.lookup_f1(keys, fire, held, occ) > 0.97
