"""Synthetic superposition with known ground truth, and the scores that compare an SAE to it.

Toy-models-of-superposition style data (Elhage et al. 2022; Sharkey et al. 2022): many more
features than dimensions, each a random unit direction, each firing rarely and independently
with its own probability (a power law, like real features) at a random magnitude:

    x = Σ_i  m_i · 1[fires_i] · feature_i          # [d]

Because the features are known, we can ask whether an SAE found them: `mean_max_cosine` (for
each true feature, the best |cosine| with any decoder row) and `mcc` (the mean |cosine| after a
one-to-one Hungarian matching of decoder rows to features, the "mean correlation coefficient").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor


@dataclass
class Superposition:
    features: Tensor  # [n_features, d] unit rows, the ground-truth dictionary
    probs: Tensor  # [n_features] firing probability of each feature
    mag_low: float = 0.5  # magnitudes are uniform in [mag_low, mag_high] when a feature fires
    mag_high: float = 1.5

    @property
    def true_l0(self) -> float:
        return float(self.probs.sum())

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """n activation vectors [n, d]."""
        fires = torch.rand(n, len(self.probs), generator=generator) < self.probs  # [n, n_features]
        mags = torch.empty(n, len(self.probs)).uniform_(self.mag_low, self.mag_high, generator=generator)
        return (fires * mags) @ self.features

    def batches(self, batch_size: int, tokens_per_epoch: int, seed: int = 0) -> Callable[[int], Iterator[Tensor]]:
        """A factory epoch -> iterator of [batch_size, d] batches, deterministic for (seed, epoch),
        in the shape `train.train_on_batches` expects."""

        def factory(epoch: int) -> Iterator[Tensor]:
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            for _ in range(tokens_per_epoch // batch_size):
                yield self.sample(batch_size, g)

        return factory


def make_superposition(
    n_features: int = 512, d: int = 100, true_l0: float = 5.0, power: float = 0.5, seed: int = 0
) -> Superposition:
    """Random unit features; firing probabilities p_i ∝ (i+1)^-power, scaled so Σ p_i = true_l0."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(n_features, d, generator=g)
    features = features / features.norm(dim=1, keepdim=True)
    probs = (torch.arange(n_features) + 1.0) ** -power
    probs = (probs * true_l0 / probs.sum()).clamp(max=1.0)
    return Superposition(features, probs)


def zipf_probs(n_features: int, p_max: float, p_min: float, true_l0: float) -> Tensor:
    """Zipf-Mandelbrot firing probabilities p_i = p_max · ((1 + c) / (i + c))^a, i = 1..n, with a
    set so that p_n = p_min and the offset c so that Σ p_i = true_l0 (bisection)."""
    i = torch.arange(1, n_features + 1, dtype=torch.float64)

    def probs(c: float) -> Tensor:
        a = math.log(p_max / p_min) / math.log((n_features + c) / (1 + c))
        return p_max * ((1 + c) / (i + c)) ** a

    lo, hi = 0.0, 1e6
    if not float(probs(lo).sum()) <= true_l0 <= float(probs(hi).sum()):
        raise ValueError(f"no Zipf law from {p_max} to {p_min} over {n_features} features sums to {true_l0}")
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if float(probs(mid).sum()) < true_l0 else (lo, mid)
    return probs(lo).float()


# ---- scores ---------------------------------------------------------------------------------


def abs_cosines(W_dec: Tensor, features: Tensor) -> Tensor:
    """|cosine| between every true feature and every decoder row: [n_features, d_sae]."""
    a = features / features.norm(dim=1, keepdim=True)
    b = W_dec.detach().float().cpu()
    b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (a.float() @ b.T).abs()


def mean_max_cosine(W_dec: Tensor, features: Tensor) -> float:
    """Mean over true features of the best |cosine| with any decoder row (rows may be reused)."""
    return float(abs_cosines(W_dec, features).max(dim=1).values.mean())


def mcc(W_dec: Tensor, features: Tensor) -> float:
    """Mean |cosine| over a one-to-one matching of true features to decoder rows that maximises
    the total (Hungarian algorithm); every feature needs a row of its own, so duplicated or
    merged latents are not rewarded."""
    cos = abs_cosines(W_dec, features).numpy().astype(np.float64)
    if cos.shape[0] > cos.shape[1]:
        cos = cos.T
    rows, cols = linear_sum_assignment_max(cos)
    return float(cos[rows, cols].mean())


def linear_sum_assignment_max(score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of a maximum-score matching of every row (n_rows <= n_cols).

    scipy's linear_sum_assignment when installed; otherwise the O(n²m) Hungarian algorithm with
    potentials (Kuhn-Munkres, in the shortest-augmenting-path form), its inner loop vectorised."""
    try:
        from scipy.optimize import linear_sum_assignment

        return linear_sum_assignment(score, maximize=True)
    except ImportError:
        pass
    cost = -np.asarray(score, dtype=np.float64)
    n, m = cost.shape
    assert n <= m
    u = np.zeros(n + 1)  # row potentials (1-based; index 0 is a sentinel)
    v = np.zeros(m + 1)  # column potentials
    p = np.zeros(m + 1, dtype=np.int64)  # p[j]: row matched to column j (0: none)
    way = np.zeros(m + 1, dtype=np.int64)  # previous column on the augmenting path
    for i in range(1, n + 1):
        p[0] = i
        j0 = 0
        minv = np.full(m + 1, np.inf)
        used = np.zeros(m + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = p[j0]
            free = ~used
            free[0] = False
            cur = cost[i0 - 1] - u[i0] - v[1:]  # reduced costs from row i0, [m]
            better = free[1:] & (cur < minv[1:])
            minv[1:][better] = cur[better]
            way[1:][better] = j0
            masked = np.where(free[1:], minv[1:], np.inf)
            j1 = int(np.argmin(masked)) + 1
            delta = masked[j1 - 1]
            u[p[used]] += delta
            v[used] -= delta
            minv[free] -= delta
            j0 = j1
            if p[j0] == 0:
                break
        while j0:  # flip the augmenting path
            j1 = way[j0]
            p[j0] = p[j1]
            j0 = j1
    cols = np.zeros(n, dtype=np.int64)
    for j in range(1, m + 1):
        if p[j]:
            cols[p[j] - 1] = j - 1
    return np.arange(n), cols


@dataclass
class TranscoderPairs:
    """Ground truth for a transcoder: sparse latents s (Superposition's law) read through one
    dictionary and written through another, plus an optional dense linear part:

        x = s @ features_in                    # [d_in]   what the MLP reads
        y = s @ features_out + x @ linear      # [d_out]  what it writes

    A transcoder should find the latents s themselves (`activation_mcc`) and, without a linear
    part, features_out in its decoder rows (`mcc`). With one, the split is not unique: any skip
    map A' leaves y − x A' = s (features_out + features_in (linear − A')), exactly as sparse, so
    the decoder rows are only known given the learned skip map, while s is known whatever it is."""

    latents: Superposition  # its features are the input directions
    features_out: Tensor  # [n_features, d_out] unit rows
    linear: Tensor  # [d_in, d_out], zero for a purely sparse map

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """n pairs side by side, [x | y] [n, d_in + d_out] (Transcoder.split takes them apart)."""
        return self.sample_with_latents(n, generator)[0]

    def sample_with_latents(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(pairs [n, d_in + d_out], the true latents s [n, n_features])."""
        p = self.latents
        fires = torch.rand(n, len(p.probs), generator=generator) < p.probs  # [n, n_features]
        s = fires * torch.empty(n, len(p.probs)).uniform_(p.mag_low, p.mag_high, generator=generator)
        x = s @ p.features
        return torch.cat([x, s @ self.features_out + x @ self.linear], 1), s

    def batches(self, batch_size: int, tokens_per_epoch: int, seed: int = 0) -> Callable[[int], Iterator[Tensor]]:
        def factory(epoch: int) -> Iterator[Tensor]:
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            for _ in range(tokens_per_epoch // batch_size):
                yield self.sample(batch_size, g)

        return factory


def make_transcoder_pairs(
    n_features: int = 256,
    d_in: int = 64,
    d_out: int = 64,
    true_l0: float = 2.5,
    power: float = 0.3,
    linear: float = 0.0,
    seed: int = 0,
) -> TranscoderPairs:
    """make_superposition's latents in d_in, random unit output features in d_out, and a random
    linear map of gain `linear` (0: none)."""
    sup = make_superposition(n_features, d_in, true_l0, power, seed)
    g = torch.Generator().manual_seed(seed + 1)
    out = torch.randn(n_features, d_out, generator=g)
    lin = torch.randn(d_in, d_out, generator=g) * (linear / math.sqrt(d_in))
    return TranscoderPairs(sup, out / out.norm(dim=1, keepdim=True), lin)


def activation_mcc(latents: Tensor, truth: Tensor) -> float:
    """The mean correlation coefficient of activations: Pearson correlation between every true
    latent truth [n, n_features] and every learned one latents [n, d_sae], matched one to one
    (Hungarian, as `mcc`), averaged over the true latents. Learned latents that never fire
    correlate 0."""
    a = truth.double() - truth.double().mean(0)
    b = latents.detach().double().cpu() - latents.detach().double().cpu().mean(0)
    corr = (a.T @ b) / (a.norm(dim=0)[:, None] * b.norm(dim=0)[None, :]).clamp_min(1e-12)  # [n_features, d_sae]
    score = corr.clamp_min(0).numpy()
    if score.shape[0] > score.shape[1]:
        score = score.T
    rows, cols = linear_sum_assignment_max(score)
    return float(score[rows, cols].mean())
