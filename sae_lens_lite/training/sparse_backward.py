"""The sparse encoder backward of training's sparse path (loss.py): the gradient to the encoder
from the active (token, latent) entries only, and AuxK's pick among dead latents.

Training code, kept out of sae.py, which holds the SAE itself (inference and its on-disk format).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor


def with_ones_row(xc: Tensor, dtype: torch.dtype) -> Tensor:
    """[xc | 1]^T [d_in + 1, n] in dtype, contiguous, for encoder_grads."""
    return torch.cat([xc.t().to(dtype), torch.ones(1, xc.shape[0], dtype=dtype, device=xc.device)])


def encoder_grads(xc1_t: Tensor, grad_pre: Tensor, W_enc: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients to W_enc, b_enc and b_dec of pre = (x·s − b_dec) @ W_enc + b_enc from ∂pre
    [n, d_sae] (dense) and [xc | 1]^T (with_ones_row): one product whose last row is b_enc's
    gradient (no separate sum pass), and b_dec's as the matrix-vector product −W_enc ∂b_enc."""
    grads = (xc1_t @ grad_pre.to(xc1_t.dtype)).to(W_enc.dtype)  # [d_in + 1, d_sae]
    grad_b_enc = grads[-1]
    return grads[:-1], grad_b_enc, -(W_enc @ grad_b_enc)


class GatheredPre(torch.autograd.Function):
    """Pre-activations `pre` [nnz], already computed at entries (token rows[e], latent cols[e]),
    wired to the encoder weights with a sparse backward. The dense backward multiplies x^T [d_in, n]
    by a gradient [n, d_sae] that is zero outside the active latents; here the same numbers cost
    nnz·d_in, not n·d_sae·d_in. Entries must be in token order with no (token, latent) twice.

    pre[e] = xc[rows[e]] · W_enc[:, cols[e]] + b_enc[cols[e]],   xc = x·s − b_dec

    dense_in (a dtype, or None) takes the product densely in that dtype instead: the gradient
    scattered into [n, d_sae], times [xc | 1]^T, which also gives b_enc's gradient as its last row.
    On a CPU with AMX, bf16 products are fast enough for that to beat the sparse one up to
    n·d_sae = 2^25 (loss.dense_encoder_grad)."""

    @staticmethod
    def forward(ctx, pre, xc, rows, cols, W_enc, b_enc, b_dec, dense_in=None):
        ctx.save_for_backward(xc, rows, cols, W_enc)
        ctx.dense_in = dense_in
        return pre

    @staticmethod
    def backward(ctx, g):  # g [nnz]
        xc, rows, cols, W_enc = ctx.saved_tensors
        n = xc.shape[0]
        d_sae = W_enc.shape[1]
        if ctx.dense_in is not None:
            dtype = ctx.dense_in
            G = torch.zeros(n, d_sae, dtype=dtype, device=g.device)  # the gradient to pre [n, d_sae]
            G.view(-1)[rows * d_sae + cols] = g.to(dtype)  # no (token, latent) twice
            return None, None, None, None, *encoder_grads(with_ones_row(xc, dtype), G, W_enc), None
        g = g.float()
        grad_b_enc = torch.zeros(d_sae, device=g.device).index_add_(0, cols, g)  # [d_sae]
        # grad W_enc[:, j] = Σ_{e: cols[e] = j} g[e] xc[rows[e]]: xc^T [d_in, n] times the gradient as
        # a sparse [n, d_sae] matrix.
        if g.is_cuda:
            # As [d_sae, n] @ [n, d_in], its entries sorted by latent (stably) and so coalesced:
            # saying so spares CUDA's addmm its own coalesce, which sorts and then waits for the host.
            order = cols.argsort(stable=True)
            G = torch.sparse_coo_tensor(
                torch.stack([cols[order], rows[order]]), g[order], (d_sae, n), is_coalesced=True, check_invariants=False
            )
            grad_W_enc = torch.sparse.mm(G, xc.float()).t()  # [d_in, d_sae]
        else:
            # The CPU: token-ordered entries are already a CSR matrix (no sort), and dense @ CSR
            # writes the parameter's own layout (a transposed result would be copied, ~14 ms at 8x).
            crow = torch.searchsorted(rows, torch.arange(n + 1, device=rows.device))  # [n + 1]
            with warnings.catch_warnings():  # "CSR support is in beta": once per process, not the user's concern
                warnings.simplefilter("ignore")
                G = torch.sparse_csr_tensor(crow, cols, g, (n, d_sae), check_invariants=False)
            grad_W_enc = xc.float().t().contiguous() @ G  # [d_in, d_sae]
        grad_b_dec = -(W_enc @ grad_b_enc)  # ∂pre[t, j]/∂b_dec = −W_enc[:, j]
        return None, None, None, None, grad_W_enc, grad_b_enc, grad_b_dec, None


def top_dead(pre: Tensor, dead: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest of pre [n, d_sae] among the latents marked in dead [d_sae] (AuxK), as
    (values, indices) [n, k]; where fewer than k are dead, the extra picks get the value 0."""
    vals, idx = pre.masked_fill(~dead, -torch.inf).topk(k, dim=-1)
    return vals.masked_fill(~dead[idx], 0.0), idx  # the extra picks were -inf
