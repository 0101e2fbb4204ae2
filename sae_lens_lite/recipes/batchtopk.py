"""BatchTopK (Bussmann et al. 2024): keep the k·n largest activations of the whole batch of n
tokens rather than k per token, so that busy tokens take more latents and quiet ones fewer, at
the same mean L0. After training the SAE runs with one threshold θ instead (a JumpReLU with the
same θ for every latent), estimated during training as a running mean of the smallest activation
the batch kept; that is the SAE saved and exported."""

import torch
from torch import Tensor

from .. import runtime
from .topk import TopK

THRESHOLD_RATE = 0.01  # θ ← θ + rate · (this batch's smallest kept activation − θ)
CANDIDATES = 4  # each token offers its CANDIDATES·k largest pre-activations to the batch's top k·n


class BatchTopK(TopK):
    name, activation = "batchtopk", "jumprelu"

    def sae_options(self):
        return {"activation": "jumprelu"}

    @torch.no_grad()
    def init(self, sae):
        sae.threshold.requires_grad_(False)  # estimated, not learned
        sae.threshold.zero_()

    def select(self, pre: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(θ_batch, values, latents [n, c]): the batch's k·n-th largest pre-activation (over every
        rank's rows under torchrun) and each token's c largest, among which its kept ones are."""
        n, d_sae = pre.shape
        k = self.cfg.k
        want = k * n * runtime.world_size()  # entries kept in the global batch
        c = min(d_sae, CANDIDATES * k)
        while True:
            cand = pre.topk(c, dim=-1)  # [n, c], sorted
            mine = cand.values.reshape(-1).topk(min(want, n * c), sorted=False).values  # this rank's best
            every = runtime.gather_rows(mine)
            thr = every.topk(min(want, every.numel()), sorted=False).values.min()
            # Exact unless a token offered only candidates above θ: it might have had more.
            short = c < d_sae and bool((cand.values[:, -1] >= thr).any())
            if not runtime.any_rank(short):
                break
            c = d_sae
        self.batch_threshold = thr.float().clamp_min(0)
        return thr, cand.values, cand.indices

    def mask(self, sae, pre):
        thr, vals, idx = self.select(pre)
        return torch.zeros_like(pre, dtype=torch.bool).scatter_(-1, idx, (vals >= thr) & (vals > 0))

    def entries(self, sae, pre):
        thr, vals, idx = self.select(pre)
        rows, j = ((vals >= thr) & (vals > 0)).nonzero(as_tuple=True)  # token order
        return rows, idx[rows, j]

    @torch.no_grad()
    def step_end(self, sae, step):
        super().step_end(sae, step)
        # The plain mean of the cuts so far for the first 1/rate steps, then a running mean at that
        # rate: a mean started from θ = 0, or from an early batch's cut, stays off for ~1/rate steps.
        rate = max(THRESHOLD_RATE, 1 / (step + 1))
        sae.threshold.lerp_(self.batch_threshold.expand_as(sae.threshold), rate)
