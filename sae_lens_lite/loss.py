"""The loss terms of the three sparsity recipes, one function each way of computing them.

    mse   ‖x − x̂‖² per token, in the normalised space x · s (Anthropic, April 2024)
    l1    Σ_i f_i ‖W_dec,i‖: L1 weighted by the decoder norm (Anthropic, April 2024)
    kl    β Σ_j KL(ρ ‖ ρ̂_j): the classic sparse autoencoder's penalty (Ng, CS294A notes)
    aux   AuxK: the top dead latents reconstruct the main reconstruction's error (Gao et al. 2024)

`loss_terms` returns every term as a scalar tensor plus what the metrics need (firing latents,
L0, the sums for explained variance), all on the device; train.py weighs them (`total_loss`)
and reads them back only every `log_every` steps. Unless the dense path is asked for, the terms
come from `sparse_terms`: the same numbers from the active latents only (TopK everywhere; ReLU
SAEs on the CPU, once few enough latents are active).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from . import distributed
from .sae import SAE, top_dead

if TYPE_CHECKING:
    from .train import TrainConfig

AUX_COEF = 1 / 32  # AuxK loss weight (Gao et al. 2024)
KL_TAU = 0.1  # KL: a latent counts as firing once its contribution ‖f_j W_dec,j‖ passes ~τ (‖x‖ ≈ √d_in)
PENALTY_TERM = {"l1": "l1", "kl": "kl", "topk": "aux"}  # the term each recipe logs as its penalty
SPARSE_MAX_DENSITY = 0.05  # ReLU SAEs: the sparse path runs while at most this share of latents is active (d_in >= 256)


def loss_terms(sae: SAE, x: Tensor, cfg: TrainConfig, dead: Tensor) -> dict[str, Tensor]:
    """Every loss term for a batch x [n, d_in] (raw units), each a scalar, plus what the metrics
    need. `dead` [d_sae] bool marks latents for the AuxK loss."""
    # Sparse path: not under DDP (it wraps forward only); for ReLU SAEs not on CUDA, where reading
    # the number of active latents would stall every step.
    if cfg.sparse and isinstance(sae, SAE) and (cfg.penalty == "topk" or not x.is_cuda):
        t = sparse_terms(sae, x, cfg, dead)
        if t is not None:
            return t
    out = sae(x)
    s = sae.input_scale
    f = out.latents  # [n, d_sae]
    n = x.shape[0]
    err = (x - out.x_hat.float()) * s  # [n, d_in] reconstruction error in normalised units
    t = {}
    # Squared error summed over d_in, averaged over tokens: ‖x − x̂‖² per token.
    t["mse"] = err.pow(2).sum(-1).mean()
    fired = f.sum(0, dtype=torch.float32)  # [d_sae] total activation of each latent
    if cfg.penalty == "l1":
        # Σ_i f_i ‖W_dec,i‖ (Anthropic, April 2024): weighting by the decoder norm stops the
        # penalty from being dodged by shrinking f and growing W_dec.
        t["l1"] = (fired * sae.W_dec.norm(dim=1)).sum() / n  # elementwise: autocast would run a matmul in bf16
    if cfg.penalty == "kl":
        # ρ̂_j: soft firing rate, tanh of the latent's contribution ‖f_j W_dec,j‖ / τ: ≈1 when it
        # fires at a normal size, so ρ̂_j ≈ its firing rate, and saturated, so large activations
        # are not shrunk. A softer τ lets many tiny activations through (high L0).
        rho_hat = torch.tanh(f.float() * sae.W_dec.norm(dim=1) / KL_TAU).mean(0)  # [d_sae]
        t["kl"] = kl_penalty(distributed.batch_mean(rho_hat), cfg.kl_rho)  # under torchrun: over every rank's rows
    if cfg.penalty == "topk":
        # AuxK (Gao et al. 2024): the top k_aux dead latents reconstruct the residual error, which
        # gives dead latents a gradient again. Zero when nothing is dead. No ReLU here: a latent is
        # dead because its pre-activation stays low, often below 0 on every token, where a ReLU
        # would block the very gradient AuxK exists to give (measured: 5.7% dead at 16x with it).
        vals, idx = top_dead(out.pre_acts.float(), dead, aux_k(sae))  # [n, k_aux]
        t["aux"] = auxk(err, sae.W_dec, idx, vals, dead)
    t["fired"] = fired.detach() > 0  # [d_sae]
    t["l0"] = torch.count_nonzero(f.detach()) / n
    return metric_terms(t, x, err, s)


def kl_penalty(rho_hat: Tensor, rho: float) -> Tensor:
    """Σ_j KL(ρ ‖ ρ̂_j) between Bernoulli firing rates, ρ̂ [d_sae] clamped away from 0 and 1."""
    rho_hat = rho_hat.clamp(1e-6, 1 - 1e-6)
    return (rho * torch.log(rho / rho_hat) + (1 - rho) * torch.log((1 - rho) / (1 - rho_hat))).sum()


def aux_k(sae: SAE) -> int:
    """How many dead latents AuxK uses per token: d_in / 2 (Gao et al. 2024)."""
    return min(sae.d_in // 2, sae.d_sae)


def auxk(err: Tensor, W_dec: Tensor, idx: Tensor, vals: Tensor, dead: Tensor) -> Tensor:
    """AuxK: ‖e − ê‖² per token, averaged, with ê the dead latents idx/vals [n, k_aux] decoded and
    e = x − x̂ [n, d_in] the main reconstruction's error (no gradient). Zero when nothing is dead."""
    e_hat = torch.nn.functional.embedding_bag(idx, W_dec, per_sample_weights=vals, mode="sum")  # [n, d_in]
    return (err.detach() - e_hat).pow(2).sum(-1).mean() * dead.any()


def metric_terms(t: dict[str, Tensor], x: Tensor, err: Tensor, s: Tensor) -> dict[str, Tensor]:
    """Adds the sums for explained variance (1 − Σ‖x − x̂‖² / Σ‖x − x̄‖²); no gradient."""
    t["sse"] = err.detach().pow(2).sum()
    xs = x * s
    t["sst"] = (xs - xs.mean(0)).pow(2).sum()
    return t


def sparse_terms(sae: SAE, x: Tensor, cfg: TrainConfig, dead: Tensor, sync_free: bool | None = None,
                 max_density: float | None = None) -> dict[str, Tensor] | None:  # fmt: skip
    """loss_terms through SAE.forward_sparse: the same loss and metrics, with the decoder and the
    encoder's backward working on the active latents only (docs/training.md#speed). None where a
    ReLU SAE has more than max_density of its latents active (the dense path is faster then)."""
    s = sae.input_scale
    n = x.shape[0]
    if max_density is None:
        # Measured on a 2-core CPU (benchmarks.md): the sparse step stops paying at ~5% active
        # latents for d_in 256 and 576, at ~2.7% for d_in 128, where its per-entry bookkeeping
        # weighs more against the d_in-long rows it saves.
        max_density = SPARSE_MAX_DENSITY * min(1.0, sae.d_in / 256)
    k_aux = aux_k(sae) if cfg.penalty == "topk" else 0
    out = sae.forward_sparse(x, dead, k_aux=k_aux, sync_free=sync_free, max_density=max_density)
    if out is None:
        return None
    err = (x - out.x_hat.float()) * s  # [n, d_in] in normalised units
    t = {"mse": err.pow(2).sum(-1).mean()}
    norms = sae.W_dec.norm(dim=1)[out.idx]  # [nnz] decoder norm of each active latent
    if cfg.penalty == "l1":  # as in loss_terms, over the nonzero activations only
        t["l1"] = (out.vals * norms).sum() / n
    if cfg.penalty == "kl":  # latents that do not fire add tanh(0) = 0 to ρ̂
        soft = torch.tanh(out.vals * norms / KL_TAU)  # [nnz]
        t["kl"] = kl_penalty(torch.zeros(sae.d_sae, device=x.device).index_add(0, out.idx, soft) / n, cfg.kl_rho)
    if cfg.penalty == "topk":  # AuxK (Gao et al. 2024), as in loss_terms
        t["aux"] = auxk(err, sae.W_dec, out.aux_idx, out.aux_vals, dead) if out.aux_vals is not None else torch.zeros((), device=x.device)
    on = (out.vals.detach() > 0).float()  # [nnz]
    t["fired"] = torch.zeros(sae.d_sae, device=x.device).index_add_(0, out.idx, on) > 0
    t["l0"] = on.sum() / n
    return metric_terms(t, x, err, s)


def total_loss(t: dict[str, Tensor], lam: Tensor, cfg: TrainConfig) -> Tensor:
    if cfg.penalty == "l1":
        return t["mse"] + lam * t["l1"]
    if cfg.penalty == "kl":
        return t["mse"] + lam * t["kl"]
    return t["mse"] + AUX_COEF * t["aux"]
