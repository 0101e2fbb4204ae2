"""Absorption and feature splitting (sae_lens_lite/evaluation/absorption.py) on a dictionary built to absorb:
the planted rate and the planted number of split latents must come back."""

import torch

from sae_lens_lite.evaluation.absorption import (
    FirstLetterData,
    absorption_fractions,
    absorption_scores,
    f1,
    icl_prefix,
    vocabulary_words,
    word_activations,
)

D, N_CLASSES, N_CHILDREN = 64, 4, 40
CHILD0 = 6  # latents 6 .. 6 + N_CHILDREN - 1 absorb class 0


def decoder() -> torch.Tensor:
    """[d_sae, D]: latents 0, 2, 3 the classes' directions e_c; 4 and 5 both e_1 (class 1 split in
    two); each child w of class 0 the direction (e_0 + q_w)/√2, q_w = e_(8 + w); latent 1 unused."""
    W = torch.zeros(CHILD0 + N_CHILDREN, D)
    for c in (0, 2, 3):
        W[c, c] = 1
    W[4, 1] = W[5, 1] = 1
    for w in range(N_CHILDREN):
        W[CHILD0 + w, 0] = W[CHILD0 + w, 8 + w] = 2**-0.5
    return W


def planted(n_per_class: int, rate: float, seed: int):
    """Tokens of N_CLASSES classes, their latents and activations x = f @ decoder + noise. A share
    `rate` of class 0's tokens are words whose child latent fires *instead of* latent 0 (absorption);
    class 1's tokens go half to latent 4, half to latent 5 (splitting)."""
    g = torch.Generator().manual_seed(seed)
    n = N_CLASSES * n_per_class
    y = torch.arange(n) % N_CLASSES
    a = 1 + torch.rand(n, generator=g)  # each token's magnitude
    f = torch.zeros(n, CHILD0 + N_CHILDREN)
    absorbed = (y == 0) & (torch.rand(n, generator=g) < rate)
    word = torch.randint(N_CHILDREN, (n,), generator=g)
    for c in (0, 2, 3):
        f[(y == c) & ~absorbed, c] = a[(y == c) & ~absorbed]
    half = torch.rand(n, generator=g) < 0.5
    f[(y == 1) & half, 4] = a[(y == 1) & half]
    f[(y == 1) & ~half, 5] = a[(y == 1) & ~half]
    rows = absorbed.nonzero()[:, 0]
    f[rows, CHILD0 + word[rows]] = a[rows] * 2**0.5
    x = f @ decoder()
    x[:, 50:] += 0.05 * torch.randn(n, D - 50, generator=g)  # noise the dictionary does not explain
    return x, f, y, absorbed


def scores(rate: float) -> dict:
    x_tr, f_tr, y_tr, _ = planted(500, rate, seed=0)
    x_te, f_te, y_te, absorbed = planted(500, rate, seed=1)
    data = FirstLetterData(x_tr, f_tr, y_tr, x_te, f_te, y_te, n_classes=N_CLASSES)
    r = absorption_scores(data, decoder(), min_letters=N_CLASSES)
    r["planted"] = float(absorbed[y_te == 0].double().mean())
    return r


def test_the_planted_absorption_rate_comes_back():
    r = scores(0.3)
    by = {row["letter"]: row for row in r["letters"]}
    assert all(row["probe_f1"] > 0.95 for row in r["letters"])
    assert by["0"]["main_latents"] == [0]  # forty small children do not count as a split
    assert abs(by["0"]["absorption_fraction"] - r["planted"]) < 0.01
    assert abs(by["0"]["full_absorption_rate"] - r["planted"]) < 0.01
    for c in "123":
        assert by[c]["absorption_fraction"] == 0 and by[c]["full_absorption_rate"] == 0
    assert abs(r["absorption_fraction"] - r["planted"] / N_CLASSES) < 0.01


def test_no_absorption_planted_reads_zero():
    r = scores(0.0)
    assert r["absorption_fraction"] == 0 and r["full_absorption_rate"] == 0


def test_the_planted_split_is_counted():
    r = scores(0.3)
    by = {row["letter"]: row for row in r["letters"]}
    assert sorted(by["1"]["main_latents"]) == [4, 5]
    assert [len(by[c]["main_latents"]) for c in "023"] == [1, 1, 1]
    assert r["split_latents"] == 5 / 4


def test_too_few_letters_with_a_usable_probe_gives_a_reason_not_a_number():
    x_tr, f_tr, y_tr, _ = planted(200, 0.3, seed=0)
    x_te, f_te, y_te, _ = planted(200, 0.3, seed=1)
    noise = torch.Generator().manual_seed(3)
    # activations that carry no class: no probe reaches F1 0.6
    data = FirstLetterData(
        torch.randn(x_tr.shape, generator=noise), f_tr, y_tr, torch.randn(x_te.shape, generator=noise), f_te, y_te, 4
    )
    r = absorption_scores(data, decoder(), min_letters=4)
    assert r["absorption_fraction"] is None and r["split_latents"] is None
    assert "only" in r["reason"] and "of 4 letters" in r["reason"]


def test_partial_absorption_fraction():
    # the main latent carries 0.25 of the probe projection, a child the other 0.75
    W = torch.tensor([[1.0, 0.0], [0.6, 0.8]])  # main along p; the child's cosine with p is 0.6
    x = torch.tensor([[1.0, 1.0]])
    f = torch.tensor([[0.25, 1.25]])  # contributions along p: 0.25 and 0.75
    frac, full = absorption_fractions(x, f, W, torch.tensor([1.0, 0.0]), [0])
    assert torch.allclose(frac, torch.tensor([0.75]))
    assert not full[0]  # the main latent fired


def test_absorption_shared_by_several_children_counts_the_three_largest():
    # main carries 0.1 of the projection; four children 0.3 each, none past 0.4·a alone: the three
    # largest together (0.9) are the absorbers, the fourth is not counted
    W = torch.tensor([[1.0, 0.0, 0.0], *[[0.6, 0.8, 0.0]] * 4])  # children's cosine with p: 0.6
    x = torch.tensor([[1.3, 0.0, 0.0]])
    f = torch.tensor([[0.1, 0.5, 0.5, 0.5, 0.5]])  # contributions along p: 0.1, then 0.3 each
    frac, _ = absorption_fractions(x, f, W, torch.tensor([1.0, 0.0, 0.0]), [0])
    assert torch.allclose(frac, torch.tensor([0.9 / 1.0]))  # min(A = 0.9, a − m = 1.2) / (0.9 + 0.1)


def test_f1():
    assert f1(torch.tensor([True, True, False]), torch.tensor([True, False, False])) == 2 / 3
    assert f1(torch.tensor([False]), torch.tensor([False])) == 0.0


def test_word_activations_equal_a_full_forward_of_each_prompt(tiny_lm):
    from sae_lens_lite.data.models import run_to_hooks

    hook = "blocks.1.hook_resid_post"
    words = vocabulary_words(tiny_lm.tokenizer, per_letter=3, seed=0)
    assert words and all(w.strip().isalpha() for _, w in words)
    x = word_activations(tiny_lm, hook, words, 3, 4, 0, "cpu")
    assert x.shape == (len(words), 32)
    # the first batch's prefix, drawn as word_activations draws it: the same seed, the same pool
    import random

    batch = {w for _, w in words[:4]}
    examples = random.Random(0).sample([w for _, w in words if w not in batch], 3)
    tail = tiny_lm.tokenizer(" has the first letter:", add_special_tokens=False).input_ids
    for i in range(4):
        ids = icl_prefix(tiny_lm.tokenizer, examples) + [words[i][0], *tail]
        pos = len(ids) - len(tail) - 1
        full = run_to_hooks(tiny_lm.model, torch.tensor([ids]), [hook])[hook][0, pos]
        assert torch.allclose(x[i], full, atol=1e-5)
