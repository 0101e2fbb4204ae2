"""A training batch's latents, the one interface the recipes (recipes/) and the step (loss.py) share.

Either dense [n, d_sae] or the active ones as entries (token rows[e], latent idx[e], value
vals[e]), so a recipe writes its penalty once and it holds on both of loss.py's paths. Apart from
loss.py so that the recipes, which loss.py runs, need not import it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.nn import functional as F


def sync_free(t: Tensor) -> bool:
    """Whether work on t's device must avoid reading values on the host (CUDA: each read stalls
    the queue), choosing fixed shapes instead. Tests set it on the CPU to run the CUDA choices."""
    return t.is_cuda


class Latents(NamedTuple):
    """A batch's latents, dense (idx is None: vals, pre [n, d_sae]) or as entries in token order
    (vals, pre, rows, idx [nnz]). vals are the activations, pre the pre-activations, both with
    gradient; pre is None on the dense path of a recipe whose ReLU runs in the encoder's node.
    An entry may have value 0 (a JumpReLU latent just below its threshold still carries the
    threshold's gradient)."""

    vals: Tensor
    pre: Tensor | None
    rows: Tensor | None
    idx: Tensor | None
    starts: Tensor | None  # [n] where each token's entries begin (the decoder's offsets)
    n: int
    d_sae: int

    def at(self, w: Tensor) -> Tensor:
        """A per-latent quantity w [d_sae] at each value: [d_sae] (broadcasts) or [nnz]."""
        return w if self.idx is None else w[self.idx]

    def per_latent(self, v: Tensor) -> Tensor:
        """v (shaped like vals) summed over tokens for each latent: [d_sae], fp32. A bf16 v is summed
        in its own dtype (the CPU accumulates in fp32 and rounds once; sum(dtype=float32) would
        first copy [n, d_sae] to fp32, ~10x slower)."""
        if self.idx is None:
            return v.sum(0).float()
        return torch.zeros(self.d_sae, device=v.device).index_add_(0, self.idx, v.float())

    def decode(self, W_dec: Tensor, weight: Tensor | None = None) -> Tensor:
        """Σ_j f_j W_dec,j per token [n, d_in] (no bias); weight [d_sae] scales each latent."""
        v = self.vals if weight is None else self.vals * self.at(weight)
        if self.idx is None:
            return v @ W_dec
        return F.embedding_bag(self.idx, W_dec, self.starts, per_sample_weights=v.float(), mode="sum")

    def decode_band(self, W_dec: Tensor, lo: int, hi: int) -> Tensor:
        """decode() of latents lo <= j < hi only [n, d_in]: only their entries are read (off the
        sync-free path, which masks the rest instead of counting them on the host)."""
        if self.idx is None:
            return self.vals[:, lo:hi] @ W_dec[lo:hi]
        if sync_free(self.vals):
            latent = torch.arange(self.d_sae, device=W_dec.device)
            return self.decode(W_dec, ((latent >= lo) & (latent < hi)).float())
        band = (self.idx >= lo) & (self.idx < hi)
        assert self.rows is not None  # entries always come with their rows
        idx, rows = self.idx[band], self.rows[band]  # still in token order
        counts = torch.bincount(rows, minlength=self.n)
        starts = counts.cumsum(0) - counts
        return F.embedding_bag(idx, W_dec, starts, per_sample_weights=self.vals[band].float(), mode="sum")


def count_positive(v: Tensor) -> Tensor:
    """How many entries of v, a recipe's activations in training, are > 0. Those are never
    negative and never −0.0 (Recipe.activate and JumpReLU write +0 below their thresholds, masks
    multiply values >= 0), so this counts the nonzero integers of the same width: on the CPU ~4x
    faster for bf16 than count_nonzero (or > 0) on the floats."""
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[v.element_size()]
    return torch.count_nonzero(v.view(ints))
