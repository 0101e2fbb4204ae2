"""JumpReLU (Rajamanoharan et al. 2024, as in Gemma Scope): a latent is active where its
pre-activation passes its own learned threshold θ_j, f = z·H(z − θ), and the sparsity term is L0
itself, λ Σ_j H(z_j − θ_j). H has no useful derivative, so θ learns through straight-through
estimators: the derivative of H(z − θ) by θ is taken as −(1/ε)·K((z − θ)/ε), K the rectangle
kernel of width ε, and that of z·H(z − θ) as −(θ/ε)·K((z − θ)/ε). Only pre-activations within
ε/2 of their threshold teach it, so those enter the sparse path too (with value 0 below θ)."""

import torch
from torch import Tensor

from .base import Recipe

BANDWIDTH = 0.05  # ε, in the units of the normalised pre-activations (unit-norm decoder rows)
INIT_THRESHOLD = 0.05  # θ at the start: a little above 0, like a ReLU


def _rectangle(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, theta):
        ctx.save_for_backward(z, theta)
        return z * (z > theta)

    @staticmethod
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        g_theta = -(theta / BANDWIDTH) * _rectangle((z - theta) / BANDWIDTH) * g
        return (z > theta) * g, _reduce_to(g_theta, theta)


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, theta):
        ctx.save_for_backward(z, theta)
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        g_theta = -(1 / BANDWIDTH) * _rectangle((z - theta) / BANDWIDTH) * g
        return None, _reduce_to(g_theta, theta)  # no gradient to z: only θ learns from L0


def _reduce_to(g: Tensor, theta: Tensor) -> Tensor:
    """Sum a gradient over the broadcast token axis when θ was [d_sae] against z [n, d_sae]."""
    return g.sum(0) if g.dim() > theta.dim() else g


class JumpReLU(Recipe):
    name, activation, term = "jumprelu", "jumprelu", "l0_ste"
    unit_decoder = True  # keeps θ and ε in the units of the normalised pre-activations
    # AuxK on dead latents, as TopK's: nothing else moves a latent whose pre-activation stays
    # below θ (the L0 term's gradient reaches θ only within ε/2 of it), and without it 18% of a
    # 16x SmolLM2 JumpReLU ended dead.
    aux = True

    def coefficient(self):
        return self.cfg.l0_coef

    @torch.no_grad()
    def init(self, sae):
        sae.threshold.fill_(INIT_THRESHOLD)

    def entry_floor(self, sae):
        return sae.threshold - BANDWIDTH / 2

    def activate(self, sae, pre, idx):
        theta = sae.threshold if idx is None else sae.threshold[idx]
        return _JumpReLU.apply(pre.float(), theta)

    def penalty(self, sae, lat):
        theta = sae.threshold if lat.idx is None else sae.threshold[lat.idx]
        return {"l0_ste": _Step.apply(lat.pre.float(), theta).sum() / lat.n}

    @torch.no_grad()
    def step_end(self, sae, step):
        super().step_end(sae, step)
        sae.threshold.clamp_(min=0.0)
