"""L1 (Anthropic, April 2024 update): ReLU latents, loss ‖x − x̂‖² + λ Σ_i f_i ‖W_dec,i‖, inputs
scaled so that E‖x‖ = √d_in, λ warmed up over the first 5% of steps."""

import torch
from torch import Tensor

from sae_lens_lite.training.recipes.base import Recipe


class L1(Recipe):
    name, term, resamples = "l1", "l1", True
    plain_relu = True

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
        x_hat, l1, sums = _DecodeL1.apply(lat.vals, sae.W_dec)
        return x_hat, {"l1": l1 / lat.n, "fired": sums > 0}


class _DecodeL1(torch.autograd.Function):
    """The dense path's decoder and L1 sum in one node: from the ReLU latents f [n, d_sae],
    x̂ = f @ W_dec [n, d_in] and Σ_j ‖W_dec,j‖ Σ_t f_tj (fp32), with each latent's sum [d_sae] (no
    gradient). On the CPU every pass over [n, d_sae] or [d_sae, d_in] costs, so the backward
    folds what autograd would do in separate passes into the products:
      ∂f = [∂x̂ | ∂l1] @ [W_dec | w]^T  the sum's gradient, w_j at every token, as one more column
                                         (~0.5 ms, against ~5 ms for a row added over [n, d_sae])
      ∂W_dec = (∂x̂^T @ f)^T + ∂l1 Σ_t f_t ⊙ W_dec / w   as ∂x̂^T [d_in, n] @ f: the same product
                                         through f's transposed view runs ~1.7x slower in bf16; the
                                         norm's gradient added in the same pass as the transpose."""

    @staticmethod
    def forward(ctx, f: Tensor, W_dec: Tensor):
        w = W_dec.norm(dim=1)  # [d_sae] fp32
        sums = f.sum(0).float()  # a bf16 f summed in bf16: the CPU accumulates in fp32, rounds once
        Ww = f.new_empty(W_dec.shape[0], W_dec.shape[1] + 1)  # [W_dec | w] in the autocast dtype
        Ww[:, :-1], Ww[:, -1] = W_dec, w
        ctx.save_for_backward(f, Ww, W_dec, w, sums)
        ctx.mark_non_differentiable(sums)
        return f @ Ww[:, :-1], (sums * w).sum(), sums

    @staticmethod
    def backward(ctx, grad_x_hat: Tensor, grad_l1: Tensor, _):
        f, Ww, W_dec, w, sums = ctx.saved_tensors
        grad_x_hat = grad_x_hat.to(f.dtype)
        a = torch.cat([grad_x_hat, grad_l1.to(f.dtype).expand(f.shape[0], 1)], 1)  # [n, d_in + 1]
        grad_f = a @ Ww.t()  # [n, d_sae]
        coef = torch.where(w > 0, grad_l1 * sums / w, 0.0)  # ∂l1/∂w_j · ∂w_j/∂W_dec,j = coef_j W_dec,j
        grad_W_dec = torch.empty_like(W_dec)  # [d_sae, d_in] in W_dec's layout and dtype
        torch.addcmul(torch.mm(grad_x_hat.t().contiguous(), f).t(), W_dec, coef[:, None], out=grad_W_dec)
        return grad_f, grad_W_dec
