"""An SAE's figures, defined once: reconstruction and sparsity on activations, the chunked pass
that feeds them, and the model's loss with an activation replaced. evaluate, compare, training's
end-of-run figures and the benchmarks all call this module; the definitions in words are in
docs/metrics.md.

    rows [n, d_in] ([n, d_in + d_out] for a transcoder: input | target)
    → sae_pass: the SAE over chunks of CHUNK rows
    → ReconStats (mse, explained variance, FVU)        report.json's "reconstruction"
      SparsityStats (L0, L1, dead, dense, firing rate)  report.json's "sparsity"

    contexts [n_ctx, T] → ce_kl_sums: per batch the clean forward, then each intervention spliced
    in at the evaluated positions → sums of CE and KL(clean ‖ spliced) → ce_summary  report.json's "ce"

Adding a metric is one function and one line: a function giving the metric's sum over one chunk
of tokens, registered in RECONSTRUCTION (a function of the target and the reconstruction) or in
SPARSITY (a function of the latents). Its mean per token then appears in report.json and
compare.json under its name, and, given a label, as a row of report.md and a column of compare.md.

This module sits below the training loop (tests/test_layering.py), which measures the saved SAE
with it: it imports nothing from training but the SAE module.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Any, Callable, Iterable, NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from sae_lens_lite.data.models import edit_hook
from sae_lens_lite.training.sae import SAE

DENSE_FREQ = 0.1  # a latent firing on more than 10% of tokens is "dense"
CHUNK = 4096  # rows per SAE/baseline call when streaming over activations


class Metric(NamedTuple):
    """A figure reported as its mean per token: `chunk_sum` gives its sum over one chunk's tokens,
    of (target [n, d_out], x_hat [n, d_out]) in RECONSTRUCTION, of latents [n, d_sae] in SPARSITY."""

    chunk_sum: Callable[..., float]
    label: str | None = None  # its row in report.md and column in compare.md; None: laid out there by hand


def l0_sum(latents: Tensor) -> float:
    """Latents active (nonzero), summed over the chunk's tokens."""
    return float((latents != 0).sum())


def l1_sum(latents: Tensor) -> float:
    """|latents| in the SAE's latent units (not weighted by decoder norms), summed over the chunk."""
    return float(latents.double().abs().sum())


# ---- the registry: a new metric is one line in one of these --------------------------------

RECONSTRUCTION: dict[str, Metric] = {}  # per-token means beside mse and explained variance
SPARSITY: dict[str, Metric] = {
    "l0": Metric(l0_sum),
    "l1": Metric(l1_sum),
}


def labelled(reconstruction: dict, sparsity: dict) -> dict[str, float | None]:
    """label → value of every registered metric with a label, read from a report's (or a compare
    row's) reconstruction and sparsity figures; None where they predate the metric. The tables
    show these as generic rows or columns, so that a new metric needs no edit there."""
    return {
        m.label: figures.get(name)
        for figures, registry in ((reconstruction, RECONSTRUCTION), (sparsity, SPARSITY))
        for name, m in registry.items()
        if m.label
    }


# ---- the accumulators -----------------------------------------------------------------------


class ReconStats:
    """Sums for reconstruction metrics over one set of tokens, added in any number of batches.

    `mean` [d_in] must be that whole set's mean: explained variance is relative to the mean,
    not to zero (relative to zero it looks near-perfect for any x with a large offset)."""

    def __init__(self, mean: Tensor):
        self.mean = mean.detach().double()
        self.sse = self.sst = 0.0
        self.n = 0
        self.sums = dict.fromkeys(RECONSTRUCTION, 0.0)

    def add(self, x: Tensor, x_hat: Tensor) -> "ReconStats":
        for name, m in RECONSTRUCTION.items():
            self.sums[name] += m.chunk_sum(x, x_hat)
        x = x.double()  # [n, d_in]
        self.sse += float((x - x_hat.double()).pow(2).sum())
        self.sst += float((x - self.mean).pow(2).sum())
        self.n += x.shape[0]
        return self

    def result(self) -> dict:
        d = self.mean.numel()
        fvu = self.sse / self.sst if self.sst > 0 else None  # undefined if every x is the same
        return {
            "mse": self.sse / (self.n * d),  # per element: independent of batch size and d_in
            "explained_variance": None if fvu is None else 1 - fvu,
            "fvu": fvu,
            "n_tokens": self.n,
            **{name: s / self.n for name, s in self.sums.items()},
        }


def reconstruction_metrics(x: Tensor, x_hat: Tensor) -> dict:
    """mse, explained_variance, fvu of x_hat [n, d_in] against x [n, d_in]."""
    return ReconStats(x.double().mean(0)).add(x, x_hat).result()


class SparsityStats:
    """Sums for sparsity metrics over latents [n, d_sae], added in any number of batches."""

    def __init__(self, d_sae: int):
        self.fires = torch.zeros(d_sae, dtype=torch.float64)  # tokens on which each latent is nonzero
        self.sums = dict.fromkeys(SPARSITY, 0.0)
        self.n = 0

    def add(self, latents: Tensor) -> "SparsityStats":
        self.fires += (latents != 0).sum(0).double().cpu()
        for name, m in SPARSITY.items():
            self.sums[name] += m.chunk_sum(latents)
        self.n += latents.shape[0]
        return self

    def result(self) -> dict:
        freq = self.fires / self.n  # [d_sae] firing frequency
        d = freq.numel()
        dead, dense = int((freq == 0).sum()), int((freq > DENSE_FREQ).sum())
        return {
            **{name: s / self.n for name, s in self.sums.items()},  # l0, l1, and any added
            "dead": dead,
            "dead_fraction": dead / d,
            "dense": dense,
            "dense_fraction": dense / d,
            "d_sae": d,
            "n_tokens": self.n,
            "firing_frequency": freq,  # tensor; dropped from the JSON report
        }


def sparsity_metrics(latents: Tensor) -> dict:
    """l0, l1, dead/dense counts and fractions, and per-latent firing frequency of latents [n, d_sae]."""
    return SparsityStats(latents.shape[1]).add(latents).result()


# ---- the chunked pass -----------------------------------------------------------------------


class SAEMetrics(NamedTuple):
    """What sae_pass measured: report.json's "reconstruction" and "sparsity"."""

    reconstruction: dict  # ReconStats.result()
    sparsity: dict  # SparsityStats.result(), with the firing frequency [d_sae] as a tensor

    def sparsity_json(self) -> dict:
        """The sparsity figures without the per-latent tensor, as report.json and compare.json hold them."""
        return {k: v for k, v in self.sparsity.items() if k != "firing_frequency"}


@torch.inference_mode()
def sae_pass(sae: SAE, rows: Tensor, chunk: int = CHUNK) -> SAEMetrics:
    """The SAE over rows [n, d_in] (a transcoder's [n, d_in + d_out]: input | target) in chunks of
    `chunk` rows, every accumulator fed; explained variance is relative to the target's mean over
    all the rows."""
    x, target = sae.split(rows)  # [n, d_in], [n, d_out] (the same tensor for an SAE)
    recon, sparse = ReconStats(target.mean(0)), SparsityStats(sae.d_sae)
    for i in range(0, len(x), chunk):
        o = sae(x[i : i + chunk])
        recon.add(target[i : i + chunk], o.x_hat)
        sparse.add(o.latents)
    return SAEMetrics(recon.result(), sparse.result())


@torch.no_grad()
def score_reconstruction(
    reconstruct: Callable[[Tensor], Tensor], x: Tensor, target: Tensor | None = None, mean: Tensor | None = None
) -> dict:
    """reconstruction_metrics of reconstruct(x) against target (default x: an SAE's own input),
    streamed in chunks (x [n, d_in], target [n, d_out]); explained variance relative to `mean`
    [d_out] (default: the target's, in float64)."""
    target = x if target is None else target
    stats = ReconStats(target.double().mean(0) if mean is None else mean)
    for i in range(0, len(x), CHUNK):
        stats.add(target[i : i + CHUNK], reconstruct(x[i : i + CHUNK]))
    return stats.result()


@torch.inference_mode()
def latent_sparsity(sae: SAE, batches: Iterable[Tensor]) -> dict:
    """Sparsity figures (SparsityStats, without the per-latent tensor) of the SAE's latents over
    batches of its input [b, d_in]: only the encoder runs."""
    stats = SparsityStats(sae.d_sae)
    for x in batches:
        stats.add(sae.encode(x))
    r = stats.result()
    del r["firing_frequency"]
    return r


# ---- the model's loss with an activation replaced -----------------------------------------


def next_token_logprobs(model, input_ids: Tensor, hook: str | None = None, fn=None) -> Tensor:
    """log p(next token) [b, T-1, vocab] from positions 0..T-2 of input_ids [b, T]. With `hook`,
    fn(act [b, T, d]) may return a replacement for the activation there (see models.edit_hook)."""
    with contextlib.ExitStack() as stack, torch.inference_mode():
        if hook is not None and fn is not None:
            stack.enter_context(edit_hook(model, hook, fn))
        logits = model(input_ids=input_ids, use_cache=False).logits  # [b, T, vocab]
    return logits[:, :-1].float().log_softmax(-1)


def token_ce(logp: Tensor, input_ids: Tensor) -> Tensor:
    """Cross-entropy in nats [b, T-1] of next-token log-probs [b, T-1, vocab]: position t predicts input_ids[:, t+1]."""
    return -logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)


def ce_loss(model, input_ids: Tensor, hook: str | None = None, fn=None) -> Tensor:
    """Per-prediction CE [b, T-1] (nats) of the model on input_ids [b, T], optionally edited at `hook`."""
    return token_ce(next_token_logprobs(model, input_ids, hook, fn), input_ids)


def kl_div(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p ‖ q) = Σ_v p(v) (log p(v) − log q(v)) per position, in nats; [..., vocab] → [...]."""
    return (logp.exp() * (logp - logq)).sum(-1)


def ce_loss_recovered(clean: float, spliced: float, ablated: float) -> float | None:
    """(L_ablated − L_spliced) / (L_ablated − L_clean): 1 = as good as clean, 0 = as bad as ablating."""
    gap = ablated - clean
    return None if abs(gap) < 1e-9 else (ablated - spliced) / gap


def splice(reconstruct: Callable[[Tensor], Tensor], mask: Tensor):
    """An edit_hook fn replacing act [b, T, d] by reconstruct(act) where mask [b, T] is True."""

    def fn(act: Tensor) -> Tensor:
        new = reconstruct(act.reshape(-1, act.shape[-1])).reshape(act.shape).to(act.dtype)
        return torch.where(mask[..., None], new, act)

    return fn


@torch.inference_mode()
def ce_kl_sums(model, contexts, keep, hook, interventions, n_fit, batch_size, device, per_context=("sae",)) -> dict:
    """Sums of CE (clean and per intervention) and KL(clean ‖ intervention) over all predictions,
    and over the score split (contexts n_fit..). Baselines run on the score split only. Each
    intervention is spliced at the positions keep [n_ctx, T] marks; the clean pass is shared.
    sums["contexts"] holds, for the interventions named in per_context, each context's mean KL
    and CE ("kl_<name>", "ce_<name>": lists in context order), from which a standard error, or a
    paired difference between two of them, follows."""
    sums: dict[str, Any] = {"all": defaultdict(float), "score": defaultdict(float), "contexts": defaultdict(list)}
    always = ("sae", "zero_ablation", "mean_ablation")
    # batches never straddle the fit/score boundary
    starts = [*range(0, n_fit, batch_size), *range(n_fit, len(contexts), batch_size)]
    for b in tqdm(starts, desc="eval: CE/KL", unit="batch", dynamic_ncols=True):
        e = min(b + batch_size, n_fit if b < n_fit else len(contexts))
        ids = contexts[b:e].to(device)  # [b, T]
        mask = keep[b:e].to(device)  # [b, T]
        scored = b >= n_fit
        clean = next_token_logprobs(model, ids)  # [b, T-1, vocab]
        splits = [sums["all"], sums["score"]] if scored else [sums["all"]]
        for s in splits:
            s["n"] += ids.shape[0] * (ids.shape[1] - 1)
            s["ce/clean"] += float(token_ce(clean, ids).double().sum())
        for name, reconstruct in interventions.items():
            if name not in always and not scored:
                continue
            logp = next_token_logprobs(model, ids, hook, splice(reconstruct, mask))
            ce_t, kl_t = token_ce(logp, ids).double(), kl_div(clean, logp).double()  # [b, T-1]
            ce, kl = float(ce_t.sum()), float(kl_t.sum())
            if name in per_context:
                sums["contexts"][f"kl_{name}"] += kl_t.mean(1).tolist()
                sums["contexts"][f"ce_{name}"] += ce_t.mean(1).tolist()
            for s in splits:
                s[f"ce/{name}"] += ce
                s[f"kl/{name}"] += kl
    return sums


def standard_error(values: list[float]) -> float | None:
    """The standard error of the mean of per-context values (None below two contexts): contexts,
    not tokens, are the independent draws, since a context's tokens move together."""
    if len(values) < 2:
        return None
    return float(torch.tensor(values, dtype=torch.float64).std() / len(values) ** 0.5)


def paired_difference(a: list[float], b: list[float]) -> dict | None:
    """mean(a − b) and its standard error for per-context values of two methods on the same
    contexts: the contexts' own spread cancels, so the error is usually far below either's."""
    if len(a) != len(b) or len(a) < 2:
        return None
    diff = [x - y for x, y in zip(a, b)]
    return {"mean": sum(diff) / len(diff), "se": standard_error(diff)}


def ce_summary(s: dict, methods: list[str]) -> dict:
    """Per-prediction CE clean, ablated and with each method spliced in, each method's CE loss
    recovered (against zero and against mean ablation) and KL, from one split of ce_kl_sums."""
    n = s["n"]
    clean, zero, mean = s["ce/clean"] / n, s["ce/zero_ablation"] / n, s["ce/mean_ablation"] / n
    out = {"clean": clean, "zero_ablation": zero, "mean_ablation": mean}
    for m in methods:
        out[m] = s[f"ce/{m}"] / n
        out[f"{m}_recovered"] = ce_loss_recovered(clean, out[m], zero)
        out[f"{m}_recovered_vs_mean"] = ce_loss_recovered(clean, out[m], mean)
    for m in [*methods, "zero_ablation", "mean_ablation"]:
        out[f"kl_{m}"] = s[f"kl/{m}"] / n
    return out
