"""Baselines an SAE must beat on the same activations: PCA and a Gaussian VAE.

Both expose `reconstruct(x [n, d_in]) -> x_hat [n, d_in]`, which is all `evaluate` needs to
score them with the same code as the SAE (reconstruction metrics, and CE/KL with x_hat spliced
into the model). Definitions of every number: docs/metrics.md.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor, nn
from tqdm import tqdm

from sae_lens_lite.errors import UserError

# The VAE is a reference point, not a product: trained briefly, with fixed settings, on CPU.
VAE_STEPS = 500  # at most; on SmolLM2 layer-6 activations 500 and 1000 steps give the same EV
VAE_EPOCHS = 40  # and at most this many passes over the fitting set: more only memorises a small one
VAE_BATCH = 256
VAE_LR = 3e-3
KL_ACTIVE_NATS = 0.01  # a latent dim is "active" for a token if its posterior is this far from the prior


class PCA(nn.Module):
    """x_hat = mean + (x - mean) V V^T, V the top-k principal directions of the fitting set.

    Kept in float64 so that k = d_in reconstructs to float32 precision exactly."""

    mean: Tensor
    components: Tensor
    explained: Tensor

    def __init__(self, mean: Tensor, components: Tensor, explained: Tensor):
        super().__init__()
        self.register_buffer("mean", mean.double())  # [d_in]
        self.register_buffer("components", components.double())  # [k, d_in], orthonormal rows
        self.register_buffer("explained", explained.double())  # [k] variance along each

    @property
    def k(self) -> int:
        return self.components.shape[0]

    def reconstruct(self, x: Tensor) -> Tensor:
        xc = x.double() - self.mean  # [n, d_in]
        return (self.mean + (xc @ self.components.T) @ self.components).to(x.dtype)


def fit_pca(x: Tensor, k: int) -> PCA:
    """Top-k eigenvectors of the covariance of x [n, d_in]."""
    n, d = x.shape
    if not 1 <= k <= d:
        raise UserError(f"PCA needs 1 <= k <= d_in = {d}, got k = {k}")
    x = x.double()
    mean = x.mean(0)
    cov = (x - mean).T @ (x - mean) / n  # [d, d]
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    top = evals.argsort(descending=True)[:k]
    return PCA(mean, evecs[:, top].T, evals[top])


class GaussianVAE(nn.Module):
    """Kingma & Welling (2014) with q(z|x) = N(mu(x), diag sigma(x)^2), prior N(0, I).

    Encoder: one hidden layer; decoder: linear, like the SAE's and PCA's, so the comparison is
    about the code and not about decoder capacity. The observation noise is one learned scalar
    (Rybkin et al. 2021, "sigma-VAE"), so the ELBO weighs reconstruction against KL without a
    hand-set beta. Inputs are centred and scaled to unit per-element variance inside the module.
    """

    shift: Tensor
    scale: Tensor

    def __init__(self, d_in: int, d_latent: int, d_hidden: int):
        super().__init__()
        self.d_latent = d_latent
        self.register_buffer("shift", torch.zeros(d_in))
        self.register_buffer("scale", torch.ones(()))
        self.enc = nn.Sequential(nn.Linear(d_in, d_hidden), nn.GELU(), nn.Linear(d_hidden, 2 * d_latent))
        self.W_dec = nn.Parameter(torch.randn(d_latent, d_in) / math.sqrt(d_latent))  # [d_latent, d_in]
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.log_sigma = nn.Parameter(torch.zeros(()))  # observation noise, in standardised units

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.enc((x.float() - self.shift) / self.scale)
        mu, logvar = h.chunk(2, dim=-1)  # [n, d_latent] each
        return mu, logvar.clamp(-12, 8)

    def decode_std(self, z: Tensor) -> Tensor:
        return z @ self.W_dec + self.b_dec  # [n, d_in], standardised units

    def reconstruct(self, x: Tensor) -> Tensor:
        """The decoder at the posterior mean: deterministic, as PCA and the SAE are."""
        mu, _ = self.encode(x)
        return (self.decode_std(mu) * self.scale + self.shift).to(x.dtype)

    def loss(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Negative ELBO per token (nats, constants dropped), split as (reconstruction, kl)."""
        mu, logvar = self.encode(x)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        err = (x.float() - self.shift) / self.scale - self.decode_std(z)
        recon = (err.pow(2) / (2 * (2 * self.log_sigma).exp()) + self.log_sigma).sum(-1).mean()
        kl = kl_to_prior(mu, logvar).sum(-1).mean()
        return recon, kl


def kl_to_prior(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, e^logvar) || N(0, 1)) per latent dimension, in nats. Same shape as mu."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar)


def vae_steps(n: int) -> int:
    """Adam steps a VAE is fitted for on n rows: VAE_STEPS, or fewer where that many would pass over
    a small fitting set more than VAE_EPOCHS times."""
    return max(1, min(VAE_STEPS, math.ceil(VAE_EPOCHS * n / VAE_BATCH)))


def fit_baselines(x: Tensor, sizes: list[int]) -> dict[int, tuple[PCA, "GaussianVAE"]]:
    """PCA and a VAE of each size k, fitted on x [n, d_in], with one progress bar over the VAEs'
    steps (the slow part: PCA is one eigendecomposition)."""
    steps = vae_steps(len(x))
    fitted = {}
    with (
        tqdm(
            total=steps * len(sizes), desc=f"baselines: PCA, VAE (k = {sizes})", unit="step", dynamic_ncols=True
        ) as bar,
        one_thread(x.device),
    ):
        for k in sizes:
            fitted[k] = (fit_pca(x, k), fit_vae(x, k, steps, on_step=bar.update))
    return fitted


@contextlib.contextmanager
def one_thread(device: torch.device):
    """One CPU thread for the VAEs' small products: threads that wait on each other at every op
    cost more than they share, and on a CPU busy with other work much more (docs/metrics.md:
    a VAE step took 18x longer with two threads than with one on a loaded 2-core machine)."""
    n = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def fit_vae(x: Tensor, d_latent: int, steps: int | None = None, seed: int = 0, on_step=None) -> GaussianVAE:
    """Train a GaussianVAE on x [n, d_in] for `steps` Adam steps (default vae_steps(n)); on_step()
    is called after each."""
    n, d = x.shape
    steps = vae_steps(n) if steps is None else steps
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        torch.manual_seed(seed)
        vae = GaussianVAE(d, d_latent, d_hidden=max(d, 2 * d_latent)).to(x.device)
        with torch.no_grad():
            vae.shift.copy_(x.float().mean(0))
            vae.scale.copy_((x.float() - vae.shift).pow(2).mean().sqrt().clamp_min(1e-8))
        opt = torch.optim.Adam(vae.parameters(), lr=VAE_LR)
        for _ in range(steps):
            batch = x[torch.randint(0, n, (min(VAE_BATCH, n),), device=x.device)]
            recon, kl = vae.loss(batch)
            opt.zero_grad(set_to_none=True)
            (recon + kl).backward()
            opt.step()
            if on_step is not None:
                on_step()
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def vae_activity(vae: GaussianVAE, x: Tensor) -> dict:
    """How many latent dims the VAE uses on x [n, d_in] (definitions in docs/metrics.md)."""
    mu, logvar = vae.encode(x)
    kl = kl_to_prior(mu, logvar)  # [n, d_latent]
    return {
        "active_dims_per_token": float((kl > KL_ACTIVE_NATS).sum(-1).double().mean()),
        # Burda et al. 2016: a unit is active if its posterior mean varies across inputs.
        "active_units": int((mu.double().var(0) > 0.01).sum()),
        "kl_per_token": float(kl.sum(-1).double().mean()),
        "d_latent": vae.d_latent,
    }
