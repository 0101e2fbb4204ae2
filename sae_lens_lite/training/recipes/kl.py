"""KL: the classic sparse autoencoder's penalty (Ng, CS294A notes), β Σ_j KL(ρ ‖ ρ̂_j), with ρ̂_j
a latent's mean soft firing over the batch and ρ the target rate."""

import torch
from torch import Tensor

from sae_lens_lite.training import distributed
from sae_lens_lite.training.recipes.base import Recipe

KL_TAU = 0.1  # a latent counts as firing once its contribution ‖f_j W_dec,j‖ passes ~τ (‖x‖ ≈ √d_in)


class KL(Recipe):
    name, term, resamples = "kl", "kl", True
    plain_relu = True

    def coefficient(self):
        return self.cfg.kl_beta

    def penalty(self, sae, lat):
        # ρ̂_j: tanh of the latent's contribution ‖f_j W_dec,j‖ / τ: ≈1 when it fires at a normal
        # size, so ρ̂_j ≈ its firing rate, and saturated, so large activations are not shrunk.
        # Latents that do not fire add tanh(0) = 0.
        # In vals' dtype (bf16 on the dense path under autocast: an fp32 copy of [n, d_sae] costs more than the rest).
        soft = torch.tanh(lat.vals * lat.at(sae.W_dec.norm(dim=1) / KL_TAU).to(lat.vals.dtype))
        rho_hat = lat.per_latent(soft) / lat.n  # [d_sae]
        return {"kl": kl_penalty(distributed.batch_mean(rho_hat), self.cfg.kl_rho)}  # under torchrun: every rank's rows


def kl_penalty(rho_hat: Tensor, rho: float) -> Tensor:
    """Σ_j KL(ρ ‖ ρ̂_j) between Bernoulli firing rates, ρ̂ [d_sae] clamped away from 0 and 1."""
    rho_hat = rho_hat.clamp(1e-6, 1 - 1e-6)
    return (rho * torch.log(rho / rho_hat) + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat))).sum()
