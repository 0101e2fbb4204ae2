"""BatchTopK (Bussmann et al. 2024): keep the k·n largest activations of the whole batch of n
tokens rather than k per token, so that busy tokens take more latents and quiet ones fewer, at
the same mean L0. After training the SAE runs with one threshold θ instead (a JumpReLU with the
same θ for every latent), estimated during training as a running mean of the smallest activation
the batch kept; that is the SAE saved and exported."""

import torch
from torch import Tensor

from sae_lens_lite import runtime
from sae_lens_lite.training import activations
from sae_lens_lite.training.recipes.topk import TopK

THRESHOLD_RATE = 0.01  # θ ← θ + rate · (this batch's smallest kept activation − θ)
GUESSES = (0.8, 0.4, 0.0)  # candidate floors tried, as fractions of the last batch's cut


class BatchTopK(TopK):
    name = "batchtopk"

    def sae_activation(self):
        return activations.JumpReLU()  # one θ for every latent, estimated (step_end)

    @torch.no_grad()
    def init(self, sae):
        sae.threshold.requires_grad_(False)  # estimated, not learned
        sae.threshold.zero_()

    def select(self, sae, pre: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(θ_batch, rows, latents) [nnz]: the batch's k·n-th largest positive pre-activation (over
        every rank's rows under torchrun) and the entries at or above it, in token order.

        Exact, without sorting rows: the candidates are the pre-activations above a floor just below
        the last batch's cut; if fewer than k·n clear it, a lower floor is tried, down to 0."""
        n = pre.shape[0]
        want = self.cfg.k * n * runtime.world_size()  # entries kept in the global batch
        last = getattr(self, "batch_threshold", None)
        last = float((sae.threshold.max() if last is None else last).detach())
        for frac in GUESSES if last > 0 else (0.0,):
            rows, idx = (pre > frac * last).nonzero(as_tuple=True)  # token order
            vals = pre[rows, idx]
            mine = vals.topk(min(want, len(vals)), sorted=False).values  # this rank's best
            # A fixed length for all_gather: padded with -inf
            mine = torch.cat([mine, mine.new_full((want - len(mine),), float("-inf"))])
            every = runtime.gather_rows(mine)
            found = int((every > float("-inf")).sum())
            if found >= want or frac == 0.0:
                break
        thr = every.topk(want, sorted=False).values.min() if found else pre.new_zeros(())
        keep = vals >= thr
        self.batch_threshold = thr.float().clamp_min(0)
        return thr, rows[keep], idx[keep]

    def mask(self, sae, pre):
        _, rows, idx = self.select(sae, pre)
        return torch.zeros_like(pre, dtype=torch.bool).index_put_((rows, idx), torch.ones_like(rows, dtype=torch.bool))

    def entries(self, sae, pre):
        _, rows, idx = self.select(sae, pre)
        return rows, idx

    @torch.no_grad()
    def step_end(self, sae, step):
        super().step_end(sae, step)
        # The plain mean of the cuts so far for the first 1/rate steps, then a running mean at that
        # rate: a mean started from θ = 0, or from an early batch's cut, stays off for ~1/rate steps.
        rate = max(THRESHOLD_RATE, 1 / (step + 1))
        sae.threshold.lerp_(self.batch_threshold.expand_as(sae.threshold), rate)
