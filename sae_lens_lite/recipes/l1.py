"""L1 (Anthropic, April 2024 update): ReLU latents, loss ‖x − x̂‖² + λ Σ_i f_i ‖W_dec,i‖, inputs
scaled so that E‖x‖ = √d_in, λ warmed up over the first 5% of steps."""

import torch
from torch import Tensor

from .base import Recipe


class L1(Recipe):
    name, term, resamples = "l1", "l1", True

    def coefficient(self):
        return self.cfg.l1

    def penalty(self, sae, lat):
        # Weighting by the decoder norm stops the penalty from being dodged by shrinking f and
        # growing W_dec. Each latent's activations are summed first (in fp32), then weighted: on the
        # dense path that is one pass over [n, d_sae] each way instead of a weighted copy of it.
        sums = lat.per_latent(lat.vals)  # [d_sae]
        return {"l1": (sums * sae.W_dec.norm(dim=1)).sum() / lat.n, "fired": sums.detach() > 0}

    def decode(self, sae, lat):
        if lat.idx is not None:
            return super().decode(sae, lat)
        x_hat, l1, sums = _DecodeL1.apply(lat.pre, lat.vals.detach(), sae.W_dec, sae.W_dec.norm(dim=1))
        return x_hat, {"l1": l1 / lat.n, "fired": sums > 0}


class _DecodeL1(torch.autograd.Function):
    """The dense path's ReLU backward, decoder and L1 sum in one node: from pre-activations pre
    [n, d_sae] and their ReLU f (already computed), x̂ = f @ W_dec [n, d_in] and Σ_j w_j Σ_t f_tj
    (fp32), with each latent's sum [d_sae] (no gradient). In the backward the sum's gradient, w_j
    at every token, is one more column of the decoder's product, [∂x̂ | ∂l1] @ [W_dec | w]^T,
    instead of a row added over all of [n, d_sae] afterwards, and the ReLU's mask is applied to
    that product in place: on the CPU every pass over [n, d_sae] that writes new memory costs
    5-15 ms at 8x, batch 2048, against ~0.5 ms for the extra column."""

    @staticmethod
    def forward(ctx, pre: Tensor, f: Tensor, W_dec: Tensor, w: Tensor):
        sums = f.sum(0).float()  # a bf16 f summed in bf16: the CPU accumulates in fp32, rounds once
        W = W_dec.to(f.dtype)  # the autocast dtype's copy, kept for the backward
        ctx.save_for_backward(f, W, w, sums)
        ctx.mark_non_differentiable(sums)
        ctx.param_dtype = W_dec.dtype
        return f @ W, (sums * w).sum(), sums

    @staticmethod
    def backward(ctx, grad_x_hat: Tensor, grad_l1: Tensor, _):
        f, W, w, sums = ctx.saved_tensors
        grad_x_hat = grad_x_hat.to(f.dtype)
        a = torch.cat([grad_x_hat, grad_l1.to(f.dtype).expand(f.shape[0], 1)], 1)  # [n, d_in + 1]
        b = torch.cat([W, w.to(f.dtype)[:, None]], 1)  # [d_sae, d_in + 1]
        grad_pre = a @ b.t()  # [n, d_sae] the gradient to f, then masked to pre's in place:
        torch.ops.aten.threshold_backward.grad_input(grad_pre, f, 0, grad_input=grad_pre)
        grad_W_dec = (f.t() @ grad_x_hat).to(ctx.param_dtype)  # [d_sae, d_in]
        return grad_pre, None, grad_W_dec, grad_l1 * sums
