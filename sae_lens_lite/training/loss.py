"""One training step's forward and loss terms, for every recipe, on the dense or the sparse path.

    mse   ‖x − x̂‖² per token, in the normalised space x · s (Anthropic, April 2024)
    + the recipe's sparsity term (recipes/: l1, kl, l0) or AuxK for the top-k family

The latents of a batch are a `Latents`: either dense [n, d_sae] or the active ones as entries
(token rows[e], latent idx[e], value vals[e]). A recipe writes its penalty once, against that
interface, and it holds on both paths. The sparse path computes only the encoder's forward
densely (it chooses the latents); the decoder is a weighted gather of the active rows and the
encoder's backward a sparse product (sparse_backward.GatheredPre): 2·d_in·d_sae FLOPs a token instead of
10·d_in·d_sae. Which path runs is decided here (`use_sparse`), never by the recipe.

`step_terms` returns every term as a scalar tensor plus what the metrics need (firing latents,
L0, the sums for explained variance), all on the device; train.py reads them back only every
`log_every` steps.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.nn import functional as F

from sae_lens_lite import runtime
from sae_lens_lite.training import latents
from sae_lens_lite.training.activations import token_rows
from sae_lens_lite.training.latents import Latents, count_positive
from sae_lens_lite.training.sae import SAE
from sae_lens_lite.training.sparse_backward import GatheredPre, encoder_grads, top_dead, with_ones_row

if TYPE_CHECKING:
    from sae_lens_lite.training.recipes import Recipe
    from sae_lens_lite.training.train_config import TrainConfig

AUX_COEF = 1 / 32  # AuxK loss weight (Gao et al. 2024)
PROBE_TOKENS = 64  # tokens whose activity decides between the sparse and dense paths
# Variable-count recipes: the sparse path runs while at most this share of latents is active. Past
# it, the per-entry bookkeeping costs more than the rows it saves (where the crossing lies, by d_in,
# is measured in docs/benchmarks.md, `scripts/bench_sparse_switch.py`).
SPARSE_MAX_DENSITY = 0.05
# The same under bf16 autocast on a CPU with AMX: its bf16 matmuls run several times faster while
# the sparse kernels do not, so the dense path wins from a much smaller share (docs/benchmarks.md).
SPARSE_MAX_DENSITY_AMX = 0.01
# On such a CPU the sparse path's encoder gradient is a dense bf16 product while n·d_sae is below
# this size, where that product is the faster of the two (docs/training.md has the measurement).
DENSE_GRAD_MAX = 2**25


def use_sparse(sae: SAE, x: Tensor, recipe: Recipe, cfg: TrainConfig) -> bool:
    """The sparse path for fixed-count recipes (top-k family) always, for variable-count ones on
    the CPU (counting active latents on CUDA would stall every step) while few latents fire,
    judged on the batch's first 64 tokens."""
    if not cfg.sparse:
        return False
    if recipe.fixed_count:
        return True
    if latents.sync_free(x):
        return False
    with torch.no_grad():
        probe = sae.pre_activation(x[:PROBE_TOKENS])  # [64, d_sae]
        density = float((probe > recipe.entry_floor(sae)).float().mean())
    return density <= sparse_max_density(x) * min(1.0, sae.d_in / 256)


def sparse_max_density(x: Tensor) -> float:
    """The share of active latents up to which the sparse path runs, for this CPU and precision."""
    amx = torch.is_autocast_enabled(x.device.type) and torch.get_autocast_dtype(x.device.type) == torch.bfloat16
    return SPARSE_MAX_DENSITY_AMX if amx and amx_bf16(x) else SPARSE_MAX_DENSITY


def amx_bf16(x: Tensor) -> bool:
    """Whether x is on a CPU with AMX (fast bf16 matmuls)."""
    return x.device.type == "cpu" and "amx_bf16" in runtime.cpu_flags()


def forward_latents(sae: SAE, x: Tensor, recipe: Recipe, sparse: bool) -> tuple[Latents, Tensor | None, Tensor | None]:
    """(latents, pre [n, d_sae], xc [n, d_in]) of a batch x [n, d_in]. On the sparse path `pre` has
    no gradient (the entries carry it); on the dense path it is the one with the gradient, or None
    (recipe.plain_relu: only the ReLU's output is made)."""
    n = x.shape[0]
    xc = x.to(sae.W_enc.dtype) * sae.input_scale - sae.b_center.detach()  # [n, d_in] centred, no gradient
    if not sparse:
        if recipe.plain_relu:  # the ReLU in the encoder's node: no pre-activations kept
            return Latents(dense_pre(sae, xc, relu=True), None, None, None, None, n, sae.d_sae), None, None
        pre = dense_pre(sae, xc)  # [n, d_sae]
        vals = recipe.activate(sae, pre, None)
        mask = recipe.mask(sae, pre.detach())
        if mask is not None:
            vals = vals * mask
        return Latents(vals, pre, None, None, None, n, sae.d_sae), pre, None
    with torch.no_grad():
        dtype = compute_dtype(xc.device, sae.W_enc.dtype)
        pre = linear(xc.to(dtype), sae.W_enc.to(dtype), sae.b_enc.to(dtype))  # [n, d_sae], bf16 under autocast
        rows, idx = recipe.entries(sae, pre)  # [nnz] each, in token order
    pre_e = gather_pre(sae, pre, xc, rows, idx)
    starts = torch.searchsorted(rows, torch.arange(n, device=rows.device))  # [n], once: Matryoshka decodes 5 times
    return Latents(recipe.activate(sae, pre_e, idx), pre_e, rows, idx, starts, n, sae.d_sae), pre, xc


def dense_pre(sae: SAE, xc: Tensor, relu: bool = False) -> Tensor:
    """sae.pre_activation [n, d_sae] of the centred input xc = x·s − b_dec (no gradient), or its
    ReLU (relu=True)."""
    return _DenseEncode.apply(xc, sae.W_enc, sae.b_enc, sae.b_center, relu)


class _DenseEncode(torch.autograd.Function):
    """pre = xc @ W_enc + b_enc [n, d_sae] (in the autocast dtype where autocast is on), or its
    ReLU f (relu=True, made by `linear` in the product's own output: a ReLU into new memory costs
    the CPU ~7 ms at 8x, batch 2048), with a backward that keeps [xc | 1]^T [d_in + 1, n]
    contiguous: ∂W_enc = xc^T @ ∂pre through a transposed view runs ~1.8x slower on the CPU in
    bf16 (11 against 6 ms), and the row of ones makes ∂b_enc = Σ_t ∂pre_t the product's last row
    (~0.2 ms, not a 2 ms pass). b_dec's gradient is a matrix-vector product, −W_enc ∂b_enc:
    through (x·s − b_dec) @ W_enc autograd would spend a whole [n, d_sae] × [d_sae, d_in]
    product on it. The ReLU writes +0 below 0 (see Recipe.activate)."""

    @staticmethod
    def forward(ctx, xc, W_enc, b_enc, b_dec, relu):
        dtype = compute_dtype(xc.device, W_enc.dtype)
        xc = xc.to(dtype)
        out = linear(xc, W_enc.to(dtype), b_enc.to(dtype), relu)
        ctx.save_for_backward(with_ones_row(xc, dtype), W_enc, out if relu else None)  # [d_in + 1, n]
        return out

    @staticmethod
    def backward(ctx, grad_out):  # [n, d_sae]
        xc1_t, W_enc, f = ctx.saved_tensors
        grad_pre = grad_out if f is None else torch.ops.aten.threshold_backward(grad_out.to(f.dtype), f, 0)
        return None, *encoder_grads(xc1_t, grad_pre, W_enc), None


def compute_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype matmuls run in on device: autocast's where it is on, else dtype."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else dtype


def linear(x: Tensor, W: Tensor, b: Tensor, relu: bool = False) -> Tensor:
    """x @ W + b [n, d_out], or its ReLU (+0 below 0), as one oneDNN call where PyTorch has it (a
    CPU, bf16: the bias and the ReLU then cost no passes of their own; addmm first copies the bias
    into its output, and a ReLU that writes new memory costs ~7 ms at 8x, batch 2048), else addmm
    and a ReLU in place."""
    if x.device.type == "cpu" and x.dtype == torch.bfloat16 and _onednn_linear():
        return torch.ops.mkldnn._linear_pointwise(x, W.t(), b, "relu" if relu else "none", [], "")
    out = torch.addmm(b, x, W)
    return F.threshold(out, 0.0, 0.0, inplace=True) if relu else out


@functools.cache
def _onednn_linear() -> bool:
    """Whether oneDNN's fused linear (an internal op of PyTorch's compiler) runs here and agrees
    with addmm + ReLU in bf16 on a small case; checked once."""
    try:
        x, W, b = (torch.linspace(-1, 1, k).to(torch.bfloat16) for k in (64, 256, 32))
        x, W = x.reshape(4, 16), W.reshape(16, 16)
        ref = torch.addmm(b[:16], x, W).float()
        for attr, want in (("none", ref), ("relu", ref.relu())):
            got = torch.ops.mkldnn._linear_pointwise(x, W.t(), b[:16], attr, [], "")
            if not torch.allclose(got.float(), want, atol=1e-2):
                return False
        return True
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def gather_pre(sae: SAE, pre: Tensor, xc: Tensor | None, rows: Tensor, idx: Tensor) -> Tensor:
    """pre[rows, idx] [nnz] with the gradient to the encoder: a gather of the dense pre where it
    has one (dense path), else wired to the weights by a sparse backward."""
    if xc is None:
        return pre[rows, idx].float()
    dense_in = pre.dtype if dense_encoder_grad(pre) else None
    return GatheredPre.apply(pre[rows, idx].float(), xc, rows, idx, sae.W_enc, sae.b_enc, sae.b_center, dense_in)


def dense_encoder_grad(pre: Tensor) -> bool:
    """Whether the sparse path takes its encoder's weight gradient as a dense bf16 product
    (GatheredPre): on a CPU with AMX under bf16 autocast, while n·d_sae < DENSE_GRAD_MAX."""
    return pre.dtype == torch.bfloat16 and amx_bf16(pre) and pre.numel() < DENSE_GRAD_MAX


def step_terms(model, x: Tensor, recipe: Recipe, cfg: TrainConfig, dead: Tensor) -> dict[str, Tensor]:
    """Every loss term for a batch x [n, d_in] (raw units), each a scalar, plus what the metrics
    need. `model` is the SAE or its DistributedDataParallel wrapper: the work runs inside its
    forward so that DDP sees it. `dead` [d_sae] bool marks latents for the AuxK loss. A
    transcoder's batch is [input | target] side by side (sae.split)."""
    sae = getattr(model, "module", model)
    sparse = use_sparse(sae, sae.split(x)[0], recipe, cfg)
    return model(x, fn=lambda sae, x: _terms(sae, x, recipe, cfg, dead, sparse))


def _terms(sae: SAE, x: Tensor, recipe: Recipe, cfg: TrainConfig, dead: Tensor, sparse: bool) -> dict[str, Tensor]:
    x, y = sae.split(x)  # input [n, d_in] and target [n, d_out]: the same tensor for an SAE
    lat, pre, xc = forward_latents(sae, x, recipe, sparse)
    xs = y * sae.target_scale  # [n, d_out] the target in normalised units, where the SAE works
    x_hat, t = recipe.decode(sae, lat)  # without b_dec, and the penalty's terms
    err = xs - sae.add_skip(x_hat + sae.b_dec, x).float()  # [n, d_out] reconstruction error, normalised
    t["mse"] = recipe.mse(sae, lat, err)
    if recipe.aux:
        # AuxK (Gao et al. 2024): the top k_aux dead latents reconstruct the residual error, which
        # gives dead latents a gradient again. Zero when nothing is dead. No ReLU here: a latent is
        # dead because its pre-activation stays low, often below 0 on every token, where a ReLU
        # would block the very gradient AuxK exists to give (measured: 5.7% dead at 16x with it).
        assert pre is not None, "a recipe with AuxK keeps its pre-activations (not plain_relu)"
        t["aux"] = aux_term(sae, pre, xc, err, dead)
    # Activations are >= 0 in every recipe, so a latent fired if its sum is > 0: on the dense path
    # that spares a bool [n, d_sae] (slow to make from bf16 on a CPU).
    v = lat.vals.detach()
    if "fired" not in t:  # a penalty that sums each latent's activations (L1's) returns it
        t["fired"] = lat.per_latent(v) > 0  # [d_sae]
    if "l0" not in t:  # a penalty that counts L0 (JumpReLU's) returns it: one pass over [n, d_sae] fewer
        t["l0"] = count_positive(v).float() / lat.n
    t["sse"] = err.detach().pow(2).sum()
    t["sst"] = (xs - xs.mean(0)).pow(2).sum()
    return t


def aux_term(sae: SAE, pre: Tensor, xc: Tensor | None, err: Tensor, dead: Tensor) -> Tensor:
    """The AuxK loss. Its dead latents are chosen either by reading their count on the host, so
    the work scales with it (the CPU), or, on CUDA, by always taking k_aux of the masked
    pre-activations: fixed shapes, no sync (the extra picks then get weight 0)."""
    k = aux_k(sae)
    with torch.no_grad():
        if latents.sync_free(pre):
            _, idx = top_dead(pre.float(), dead, k)  # [n, k_aux]
        else:
            dead_idx = dead.nonzero().squeeze(1)  # [n_dead]
            if len(dead_idx) == 0:
                return torch.zeros((), device=pre.device)
            idx = dead_idx[pre.index_select(1, dead_idx).topk(min(k, len(dead_idx)), dim=-1).indices]
    n, k_picked = idx.shape  # [n, k_aux] (fewer where fewer are dead)
    vals = gather_pre(sae, pre, xc, token_rows(n, k_picked, pre.device), idx.reshape(-1)).reshape(idx.shape)
    return auxk(err, sae.W_dec, idx, vals * dead[idx], dead)


def aux_k(sae: SAE) -> int:
    """How many dead latents AuxK uses per token: d_in / 2 (Gao et al. 2024)."""
    return min(sae.d_in // 2, sae.d_sae)


def auxk(err: Tensor, W_dec: Tensor, idx: Tensor, vals: Tensor, dead: Tensor) -> Tensor:
    """AuxK: ‖e − ê‖² per token, averaged, with ê the dead latents idx/vals [n, k_aux] decoded and
    e = x − x̂ [n, d_in] the main reconstruction's error (no gradient). Zero when nothing is dead."""
    e_hat = F.embedding_bag(idx, W_dec, per_sample_weights=vals, mode="sum")  # [n, d_in]
    return (err.detach() - e_hat).pow(2).sum(-1).mean() * dead.any()


def total_loss(t: dict[str, Tensor], lam: Tensor, recipe: Recipe) -> Tensor:
    loss = t["mse"]
    if recipe.term != "aux":
        loss = loss + lam * t[recipe.term]
    if "aux" in t:
        loss = loss + AUX_COEF * t["aux"]
    return loss
