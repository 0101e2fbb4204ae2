import itertools

import numpy as np
import torch

from sae_lens_lite.training.synthetic import linear_sum_assignment_max, make_superposition, mcc, mean_max_cosine


def test_hungarian_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(100):
        n = int(rng.integers(1, 6))
        m = int(rng.integers(n, 7))
        score = rng.random((n, m))
        rows, cols = linear_sum_assignment_max(score)
        assert len(set(cols.tolist())) == n
        best = max(sum(score[i, p[i]] for i in range(n)) for p in itertools.permutations(range(m), n))
        assert abs(score[rows, cols].sum() - best) < 1e-9


def test_scores_on_known_dictionaries():
    data = make_superposition(n_features=40, d=16, true_l0=3.0, seed=0)
    F = data.features
    perm = torch.randperm(40)
    # the true features, shuffled, rescaled and sign-flipped, plus spare rows: a perfect score
    W = torch.cat([F[perm] * -2.0, torch.randn(10, 16)])
    assert mcc(W, F) > 0.999 and mean_max_cosine(W, F) > 0.999
    # one feature copied into every row: the best cosine is perfect for that feature only, and
    # the one-to-one matching cannot reuse it
    W = F[:1].repeat(50, 1)
    assert mean_max_cosine(W, F) < 0.6
    assert mcc(W, F) < mean_max_cosine(W, F) + 1e-6


def test_superposition_statistics():
    data = make_superposition(n_features=200, d=50, true_l0=5.0, power=0.5, seed=1)
    assert abs(data.true_l0 - 5.0) < 1e-4
    assert torch.allclose(data.features.norm(dim=1), torch.ones(200), atol=1e-5)
    assert (data.probs[:-1] >= data.probs[1:]).all()  # power law: decreasing
    factory = data.batches(batch_size=1000, tokens_per_epoch=5000, seed=3)
    a, b = list(factory(0)), list(factory(0))
    assert len(a) == 5 and all(torch.equal(x, y) for x, y in zip(a, b))  # deterministic
    assert not torch.equal(a[0], next(factory(1)))  # a new epoch is new data
    x = torch.cat(a)  # [5000, 50]
    # independent firing at magnitudes U(0.5, 1.5): E‖x‖² ≈ true L0 · E[m²] (cross terms are small)
    expected = 5.0 * (1.0 + 1.0 / 12)
    assert abs(x.pow(2).sum(-1).mean() / expected - 1) < 0.1
