"""Feature analysis: top activations, per-feature statistics, logit lens, monosemanticity ranking.

Pass 1 streams the cache in order (so a row index names a token) through the SAE and keeps, per
feature, the top-k activations and their rows, the firing count, sum and max, and a histogram.
Memory is bounded by k × d_sae whatever the cache size. Pass 2 re-encodes only the rows inside
the top examples' context windows, to shade every context token by the feature's activation.
The score (defined in docs/analysis.md) and the logit lens are computed from those, then
features.json, ranking.csv, the browser page (browser/) and the plots are written.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from sae_lens_lite.config import check_memory, check_numbers
from sae_lens_lite.data.cache import ActivationCache
from sae_lens_lite.data.models import LoadedModel, generate, hook_point, load_model
from sae_lens_lite.errors import UserError
from sae_lens_lite.evaluation.metrics import DENSE_FREQ
from sae_lens_lite.fsutil import save_figure_atomic, write_text_atomic
from sae_lens_lite.interpret import explain
from sae_lens_lite.interpret.contexts import RowContext
from sae_lens_lite.interpret.features import FEATURES_FILE, FORMAT, VERSION, Analysis, Feature
from sae_lens_lite.outputs import Output, resumable_folder
from sae_lens_lite.runtime import resolve_device
from sae_lens_lite.training.sae import SAE

if TYPE_CHECKING:
    from transformers import PreTrainedModel

LOG2_BINS = 6
N_BINS = 1 << LOG2_BINS  # histogram bins per feature
N_LENS = 10  # tokens listed as promoted / suppressed by the logit lens
N_TOP_TOKENS = 5
N_PER_QUANTILE = 2  # examples shown from each activation quantile
STEER_TOKENS = 20  # tokens generated for each --steer sample
OUTPUT = Output("analyze", resumable_folder(FEATURES_FILE), inputs=("sae", "acts"), skip=("sae", "acts", "batch_size"))


@dataclass
class AnalyzeConfig:
    sae: str = field(
        default="runs/sae", metadata={"help": "SAE directory (from `sae-lite train` or `sae-lite import`)"}
    )
    acts: str = field(
        default="runs/acts", metadata={"help": "activation cache to read the features on (from `sae-lite harvest`)"}
    )
    out: str = field(
        default="runs/analysis", metadata={"help": "output directory: features.json, ranking.csv, index.html, plots"}
    )
    top_k: int = field(
        default=16, metadata={"help": "top-activating examples kept per feature; memory is top_k × d_sae"}
    )
    ctx_before: int = field(default=16, metadata={"help": "context tokens shown before each example's token"})
    ctx_after: int = field(
        default=4, metadata={"help": "context tokens shown after it (the next one feeds the logit-lens check)"}
    )
    batch_size: int = field(
        default=4096, metadata={"help": "rows encoded at once; lower it if the device runs out of memory"}
    )
    device: str = field(default="auto", metadata={"help": "cuda, cpu or auto (GPU when there is one)"})
    max_features: int | None = field(
        default=None, metadata={"help": "put only the N best-ranked features in the page (features.json keeps all)"}
    )
    heldout: float = field(
        default=0.25,
        metadata={
            "help": (
                "share of the cache's contexts held out: explanations are read from the rest and scored on these only"
            )
        },
    )
    explain_top: int = field(
        default=0,
        metadata={
            "help": (
                "also have --explainer write and score explanations of the N best-ranked families "
                "(slow: seconds per feature on a CPU; resumes)"
            )
        },
    )
    explainer: str = field(
        default="smollm2-135m",
        metadata={
            "help": (
                "instruct model for --explain-top: smollm2-135m (SmolLM2-135M-Instruct, offline), a "
                "hub id or a local directory"
            )
        },
    )
    model: str | None = field(
        default=None,
        metadata={"help": "model for token text and the logit lens; default: the one the cache was harvested from"},
    )
    overwrite: bool = field(default=False, metadata={"help": "write into a non-empty --out that holds other files"})
    steer: int = field(
        default=0,
        metadata={
            "help": (
                "put a steered sample in the card of the N best-ranked features: --steer-prompt "
                "continued with the feature's decoder direction added (sae-lite steer --mode add)"
            )
        },
    )
    steer_prompt: str = field(default="The", metadata={"help": "prompt continued for the --steer samples"})
    steer_times: float = field(
        default=4.0, metadata={"help": "--steer strength, as a multiple of each feature's max activation"}
    )

    def __post_init__(self):
        # top-k >= 2: the score compares examples in pairs
        check_numbers(
            self,
            top_k=(2, None),
            ctx_before=(1, None),
            ctx_after="non-negative",
            batch_size="positive",
            max_features="positive",
            heldout="fraction",
            explain_top="non-negative",
            steer="non-negative",
        )


# ---- pass 1: streamed statistics --------------------------------------------------------------


@dataclass
class FeatureStats:
    top_vals: Tensor  # [d_sae, k] largest activations, descending (0 where fewer than k firings)
    top_rows: Tensor  # [d_sae, k] their cache rows, -1 where absent
    count: Tensor  # [d_sae] rows where the feature fired (> 0)
    total: Tensor  # [d_sae] sum of its activations
    max: Tensor  # [d_sae]
    hist: Tensor  # [d_sae, N_BINS] firing activations in bins of width 2**hist_exp / N_BINS
    hist_exp: Tensor  # [d_sae] int64
    l0: Tensor  # [d_sae + 1] number of rows with 0, 1, 2, ... features firing
    n_rows: int

    def frequency(self) -> Tensor:
        """[d_sae] float64: the share of rows on which each feature fired."""
        return self.count.double() / max(self.n_rows, 1)

    def cpu(self) -> FeatureStats:
        fields: dict[str, Any] = {k: t.cpu() if isinstance(t, Tensor) else t for k, t in vars(self).items()}
        return FeatureStats(**fields)


def ordered_batches(cache: ActivationCache, batch_size: int, device) -> Iterator[tuple[int, Tensor]]:
    """(first row index, activations [b, d_model]) over the whole cache in row order."""
    start = 0
    for i in tqdm(range(cache.n_shards), desc="analyze", unit="shard", dynamic_ncols=True):
        acts = cache.read_shard(i, ("activations",))["activations"]
        for b in range(0, len(acts), batch_size):
            yield start + b, acts[b : b + batch_size].to(device, torch.float32)
        start += len(acts)


@torch.no_grad()
def feature_stats(sae: SAE, batches, k: int, observe=None) -> FeatureStats:
    """`observe(start, latents)`, if given, sees every batch too (the explanation counts)."""
    d, dev = sae.d_sae, sae.W_enc.device
    top_vals = torch.zeros(d, k, device=dev)
    top_rows = torch.full((d, k), -1, dtype=torch.long, device=dev)
    count = torch.zeros(d, dtype=torch.long, device=dev)
    total = torch.zeros(d, dtype=torch.float64, device=dev)
    mx = torch.zeros(d, device=dev)
    hist = torch.zeros(d, N_BINS, dtype=torch.long, device=dev)
    hist_exp = torch.full((d,), -1000, dtype=torch.long, device=dev)
    l0 = torch.zeros(d + 1, dtype=torch.long, device=dev)
    n = 0
    for start, x in batches:
        f = sae.encode(x)  # [b, d_sae]
        fired = f > 0
        count += fired.sum(0)
        total += f.sum(0, dtype=torch.float64)
        mx = torch.maximum(mx, f.max(0).values)
        l0 += torch.bincount(fired.sum(1), minlength=d + 1)
        # Merge this batch's top rows into the running top-k: only k × d_sae values are kept.
        v, i = f.topk(min(k, len(f)), dim=0)  # [kb, d_sae]
        vals, rows = torch.cat([top_vals, v.T], 1), torch.cat([top_rows, i.T + start], 1)
        top_vals, j = vals.topk(k, dim=1)
        top_rows = rows.gather(1, j)
        _add_to_histogram(hist, hist_exp, f, fired)
        if observe is not None:
            observe(start, f)
        n += len(f)
    top_rows[top_vals <= 0] = -1
    return FeatureStats(top_vals, top_rows, count, total, mx, hist, hist_exp, l0, n)


def _add_to_histogram(hist: Tensor, hist_exp: Tensor, f: Tensor, fired: Tensor) -> None:
    """Exact linear histograms without knowing the max in advance: feature j's bins cover
    [0, 2**e_j); when a larger value arrives the range doubles and pairs of bins merge."""
    exp = torch.frexp(f.max(0).values).exponent.long()  # batch max < 2**exp exactly
    new_exp = torch.where(fired.any(0), torch.maximum(hist_exp, exp), hist_exp)
    shift = (new_exp - hist_exp).clamp(max=LOG2_BINS)  # doubling LOG2_BINS times puts all in bin 0
    for s in shift.unique().tolist():
        if s > 0:
            idx = (shift == s).nonzero().squeeze(1)
            merged = hist[idx].view(len(idx), N_BINS >> s, 1 << s).sum(-1)
            hist[idx] = F.pad(merged, (0, N_BINS - merged.shape[1]))
    hist_exp.copy_(new_exp)
    r, c = fired.nonzero(as_tuple=True)
    # v * 2**(LOG2_BINS - e) is exact in floating point, so the bin is too.
    b = torch.ldexp(f[r, c], LOG2_BINS - hist_exp[c]).floor().long().clamp_(0, N_BINS - 1)
    hist.view(-1).index_add_(0, c * N_BINS + b, torch.ones_like(b))


# ---- pass 2: context windows ---------------------------------------------------------------------


def context_windows(doc: Tensor, pos: Tensor, rows: Tensor, before: int, after: int) -> Tensor:
    """Cache rows of the window around each of `rows` [...] → [..., before + 1 + after], -1 where
    a position is absent (outside the context, or dropped by the harvest filters)."""
    span = int(pos.max()) + 1 + before + after  # windows of one context cannot reach the next
    key = doc.long() * span + pos.long()  # [n]
    order = key.argsort()
    sorted_key = key[order]
    r = rows.clamp(min=0)
    want = key[r][..., None] + torch.arange(-before, after + 1)  # [..., W]
    idx = torch.searchsorted(sorted_key, want).clamp(max=len(key) - 1)
    hit = (sorted_key[idx] == want) & (rows >= 0)[..., None]
    return torch.where(hit, order[idx], -1)


@torch.no_grad()
def window_activations(sae: SAE, cache: ActivationCache, win: Tensor, batch_size: int) -> Tensor:
    """Feature j's activation on every row of its windows: win [d_sae, k, W] → [d_sae, k, W]."""
    dev = sae.W_enc.device
    valid = win >= 0
    rows = win[valid]  # [p] one entry per (feature, window row) pair
    feats = torch.arange(win.shape[0])[:, None, None].expand_as(win)[valid]
    order = rows.argsort()
    rows, feats = rows[order], feats[order]
    vals = torch.zeros(len(rows))
    start = 0
    for i, shard in enumerate(cache.manifest["shards"]):
        lo, hi = torch.searchsorted(rows, torch.tensor([start, start + shard["n_rows"]])).tolist()
        if hi > lo:
            acts = cache.read_shard(i, ("activations",))["activations"]
            need, inv = rows[lo:hi].unique(return_inverse=True)  # sorted, so `inv` is too
            for c in range(0, len(need), batch_size):
                a, b = torch.searchsorted(inv, torch.tensor([c, c + batch_size])).tolist()
                lat = sae.encode(acts[need[c : c + batch_size] - start].to(dev, torch.float32))
                vals[lo + a : lo + b] = lat[(inv[a:b] - c).to(dev), feats[lo + a : lo + b].to(dev)].cpu()
        start += shard["n_rows"]
    out = torch.zeros(win.shape)
    out[valid] = torch.empty_like(vals).index_put_((order,), vals)
    return out


# ---- logit lens -----------------------------------------------------------------------------------


def final_norm(model: PreTrainedModel) -> nn.Module:
    """The norm between the last block and the unembedding (Llama model.norm, GPT-2
    transformer.ln_f, NeoX gpt_neox.final_layer_norm): the last norm child of the base model."""
    norms = [m for m in model.base_model.children() if "norm" in type(m).__name__.lower()]
    if not norms:
        raise UserError(f"cannot find the final norm of {type(model).__name__} for the logit lens")
    return norms[-1]


class LogitLens(NamedTuple):
    """The tokens each decoder direction promotes and suppresses most, and their logits; each [d_sae, n]."""

    up_vals: Tensor
    up_ids: Tensor
    down_vals: Tensor
    down_ids: Tensor


@torch.no_grad()
def logit_lens(
    model: PreTrainedModel, W_dec: Tensor, n: int = N_LENS, n_vocab: int | None = None, chunk: int = 256
) -> LogitLens:
    """Tokens each decoder direction promotes and suppresses: W_dec [d_sae, d_model] → LogitLens.

    A direction is scaled to RMS 1 (a normalised residual), passed through the final norm and the
    unembedding, and the output for the zero vector is subtracted: that removes the norm's and the
    head's biases, which would add the same logits to every feature."""
    norm, head = final_norm(model), model.get_output_embeddings()
    p = head.weight
    zero = head(norm(torch.zeros(1, 1, W_dec.shape[1], device=p.device, dtype=p.dtype)))[0].float()  # [1, V]
    out = []
    for c in range(0, len(W_dec), chunk):
        d = W_dec[c : c + chunk].to(p.device, p.dtype)
        d = d / d.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-12)
        logits = (head(norm(d[None]))[0].float() - zero)[:, :n_vocab]  # [c, V]
        up, down = logits.topk(n, dim=1), logits.topk(n, dim=1, largest=False)
        out.append((up.values.cpu(), up.indices.cpu(), down.values.cpu(), down.indices.cpu()))
    return LogitLens(*(torch.cat(t) for t in zip(*out)))


# ---- monosemanticity score (definition and reasoning: docs/analysis.md) -------------------------


def pair_agreement(labels: Tensor, w: Tensor, exclude: Tensor | None = None) -> Tensor:
    """Activation-weighted share of example pairs i ≠ j whose labels are equal; an unknown label
    (-1) agrees with nothing. labels [F, k], w [F, k] weights; exclude [F, k, k] pairs to skip → [F]."""
    W = w[:, :, None] * w[:, None, :] * (1 - torch.eye(w.shape[1]))  # [F, k, k]
    if exclude is not None:
        W = W * ~exclude
    eq = (labels[:, :, None] == labels[:, None, :]) & (labels >= 0)[:, :, None]
    return (W * eq).sum((1, 2)) / W.sum((1, 2))


def heaviest(labels: Tensor, w: Tensor) -> Tensor:
    """The label carrying the most weight in each row: labels [F, k], w [F, k] → [F] (-1: none)."""
    eq = (labels[:, :, None] == labels[:, None, :]) & (labels >= 0)[:, None, :]
    mass = (eq * w[:, None, :]).sum(-1)  # [F, k] weight of each example's label
    return torch.where(mass.amax(1) > 0, labels.gather(1, mass.argmax(1, keepdim=True))[:, 0], -1)


def window_jaccard(a: Tensor, b: Tensor) -> Tensor:
    """Jaccard similarity of the token sets of windows a [..., L] and b [..., L] (-1 = absent)."""

    def first(x):  # each token once: drop repeats and absent positions
        rep = (x[..., :, None] == x[..., None, :]).tril(-1).any(-1)
        return (x >= 0) & ~rep

    va, vb = first(a), first(b)
    inter = (va[..., :, None] & vb[..., None, :] & (a[..., :, None] == b[..., None, :])).sum((-1, -2))
    union = va.sum(-1) + vb.sum(-1) - inter
    return inter / union.clamp(min=1)


def kappa(observed: Tensor, chance: Tensor | float) -> Tensor:
    """Agreement beyond chance, as in Cohen's kappa, clipped to [0, 1]."""
    return ((observed - chance) / (1 - chance)).nan_to_num(0.0).clamp(0, 1)


def monosemanticity(
    win_tokens: Tensor,
    win_docs: Tensor,
    win_pos: Tensor,
    acts: Tensor,
    center: int,
    promoted: Tensor,
    unigram: Tensor,
    freq: Tensor,
    bag_chance: float,
    k: int,
) -> dict[str, Tensor]:
    """Score features from their top examples. win_tokens/win_docs/win_pos [F, k, W] (-1 absent),
    acts [F, k] top activations, promoted [F, n] logit-lens token ids, unigram [V] token
    frequencies, freq [F] the features' firing frequencies."""
    p_same = float((unigram**2).sum())  # chance that two random tokens are equal

    def bound(share: Tensor) -> Tensor:
        # An explanation covering tokens of total frequency `share` can account for at most
        # share / freq of the feature's firings: a dense feature is not "one token" however
        # its top examples look (random directions in a residual stream with outlier tokens).
        return (share / freq.clamp(min=1e-12)).clamp(max=1)

    cur, prv = win_tokens[:, :, center], win_tokens[:, :, center - 1]

    def share_of(t: Tensor) -> Tensor:  # each token's unigram frequency, 0 where absent (-1)
        return torch.where(t >= 0, unigram[t.clamp(min=0)], 0.0)

    tok = kappa(pair_agreement(cur, acts), p_same) * bound(share_of(heaviest(cur, acts)))
    prev = kappa(pair_agreement(prv, acts), p_same) * bound(share_of(heaviest(prv, acts)))
    # Context bags: pairs whose windows overlap (same context, nearby) would agree trivially.
    d, p = win_docs[:, :, center], win_pos[:, :, center]
    overlap = (d[:, :, None] == d[:, None, :]) & ((p[:, :, None] - p[:, None, :]).abs() <= center)
    bag = torch.zeros(len(acts))
    for c in range(0, len(acts), 128):
        ctx = win_tokens[c : c + 128, :, :center]  # [c, k, before]
        J = window_jaccard(ctx[:, :, None], ctx[:, None, :])  # [c, k, k]
        w = acts[c : c + 128]
        W = w[:, :, None] * w[:, None, :] * (1 - torch.eye(k)) * ~overlap[c : c + 128]
        bag[c : c + 128] = (W * J).sum((1, 2)) / W.sum((1, 2))
    # Logit lens: is the token that follows one the decoder direction promotes?
    nxt = (
        win_tokens[:, :, center + 1]
        if win_tokens.shape[2] > center + 1
        else torch.full_like(acts, -1, dtype=torch.long)
    )
    hit = (nxt[:, :, None] == promoted[:, None, :]).any(-1).float()  # an absent next token is a miss
    lens_obs = (acts * hit).sum(1) / acts.sum(1)
    lens_chance = unigram[promoted].sum(1)
    lens = kappa(lens_obs, lens_chance) * bound(lens_chance)
    s = {"token": tok, "context": torch.maximum(prev, kappa(bag, bag_chance)), "lens": lens}
    n_ex = (acts > 0).sum(1)
    support = ((n_ex - 1) / (k - 1)).clamp(0, 1)  # few firings: weak evidence, whatever they agree on
    s["score"] = support * torch.stack([s["token"], s["context"], s["lens"]]).amax(0)
    return s


def canonical_ids(tokenizer, n_vocab: int) -> Tensor:
    """[n_vocab] → the smallest id whose text is the same up to case and surrounding spaces, so
    that " index", "index" and "Index" count as one token in the score. Whitespace-only tokens
    keep their own ids (a newline and a space are different explanations)."""
    texts = tokenizer.batch_decode([[i] for i in range(n_vocab)])
    first: dict[str, int] = {}
    canon = torch.arange(n_vocab)
    for i, t in enumerate(texts):
        key = t.strip().lower()
        if key:
            canon[i] = first.setdefault(key, i)
    return canon


def row_context(tokenizer, tokens, canon, doc, pos, held, n_vocab) -> RowContext:
    """Every row's context (contexts.py) from its token text and context order."""
    used = tokens.unique()
    text = dict(zip(used.tolist(), tokenizer.batch_decode([[i] for i in used.tolist()])))
    texts = [text[t] for t in tokens.tolist()]
    return RowContext.build(
        texts, canon[tokens].numpy(), doc.long().numpy(), pos.long().numpy(), held.long().numpy(), n_vocab + 1
    )


def random_window_jaccard(tokens: Tensor, doc: Tensor, pos: Tensor, before: int, n_pairs: int = 2048) -> float:
    """Chance level of the context-bag agreement: mean Jaccard of windows at random rows of
    different contexts."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(len(tokens), (2, n_pairs), generator=g)
    keep = doc[a] != doc[b]
    if not keep.any():
        return 0.0
    win = context_windows(doc, pos, torch.stack([a[keep], b[keep]]), before, 0)[..., :before]  # [2, p, before]
    t = at_rows(tokens, win)
    return float(window_jaccard(t[0], t[1]).mean())


def at_rows(values: Tensor, rows: Tensor) -> Tensor:
    """values [n] at cache rows [...] (e.g. windows) → int64 [...], -1 where a row is absent (-1)."""
    return torch.where(rows >= 0, values[rows.clamp(min=0)].long(), -1)


# ---- the stage ------------------------------------------------------------------------------------


def analyze(cfg: AnalyzeConfig, lm: LoadedModel | None = None) -> dict:
    """Write features.json, ranking.csv, index.html and plots to cfg.out; returns a summary."""
    t0 = time.time()
    cfg.__post_init__()
    if cfg.steer and not cfg.steer_prompt.strip():
        raise UserError("--steer needs a prompt to continue: pass --steer-prompt TEXT")
    device = resolve_device(cfg.device)
    sae = SAE.load(cfg.sae).folded().to(device)  # folded: W_dec rows in activation units
    # Peak: about ten [d_sae, k, window] tensors of 8 bytes (rows, tokens, docs, positions, activations, masks).
    window = cfg.ctx_before + 1 + cfg.ctx_after
    check_memory(
        80 * sae.d_sae * cfg.top_k * window,
        torch.device("cpu"),
        f"--top-k {cfg.top_k} with a window of {window} tokens",
        "lower --top-k, --ctx-before or --ctx-after",
    )
    cache = ActivationCache.open(cfg.acts)
    m = cache.manifest
    if cache.n_tokens == 0:
        raise UserError(
            f"the cache {cfg.acts} holds no activations (its harvest filters dropped every row); harvest more text"
        )
    if sae.d_in != cache.d_model:
        raise UserError(
            f"the SAE reads vectors of size {sae.d_in} but the cache {cfg.acts} holds {cache.d_model}; "
            "pass the cache it was trained on"
        )
    if sae.cfg.hook and m.get("hook") and sae.cfg.hook != m["hook"]:
        raise UserError(
            f"the SAE was trained on {sae.cfg.hook} but the cache holds {m['hook']}; pass the matching --acts"
        )
    run = OUTPUT.start(cfg)
    if (done := run.done()) is not None:  # the rerun rule (outputs.py)
        return done
    model_name = cfg.model or m.get("model") or sae.cfg.model
    if lm is None:
        if not model_name:
            raise UserError("the cache does not name its model; pass --model for token text and the logit lens")
        lm = load_model(model_name, device)
    out = run.claim()

    rows = _cache_rows(cache, lm, cfg.heldout)
    cost: dict[str, float] = {}  # wall and CPU seconds of each step, for features.json
    counter = explain.PatternCounts(rows.canon[rows.tokens], rows.prev_tok, rows.held, rows.n_vocab, sae.d_sae)
    st = _first_pass(cfg, sae, cache, counter, device, cost)
    explained = _builtin_explanations(counter, lm.tokenizer, rows, cost)
    win = _example_windows(cfg, sae, cache, rows, st, explained.counts)  # pass 2
    lens = logit_lens(lm.model, sae.W_dec, n_vocab=rows.n_vocab)
    scores = _score(rows, st, win, lens, cfg.ctx_before, cfg.top_k)
    ranking = _rank(explained, scores, st.frequency())
    features = _feature_entries(cfg, st, win, explained, ranking, scores, lens, explain.nearest(sae.W_dec))
    analysis = _analysis(cfg, lm, m.get("hook"), st, explained, scores, win, lens, features, ranking, cost)
    order = ranking.order
    if cfg.steer > 0:
        analysis["steer"] = _steer_samples(cfg, lm, sae, m.get("hook"), features, order[: cfg.steer].tolist())
    _write_outputs(out, analysis, order, cfg.max_features)
    if cfg.explain_top:
        _add_model_explanations(cfg, lm, sae, cache, rows, explained, ranking, analysis, out)
    plots = write_plots(out, st.frequency(), st.l0, explained.detection, st.n_rows)
    summary = _summary(out, plots, analysis, st, order, t0)
    l0_mean = summary["mean_l0"]
    best = int(order[0].item())
    run.finish(
        summary,
        f"analyze: {out / 'index.html'}: {sae.d_sae:,} features on {st.n_rows:,} tokens, "
        f"{summary['dead_features']:,} never fire, "
        f"mean L0 {l0_mean:.1f}; best feature {best} (score {features[best]['score']:.3f}, "
        f"monosemanticity {features[best]['monosemanticity']:.3f}); in {summary['seconds']} s",
    )
    return summary


# ---- the stage's steps, in the order analyze() takes them -----------------------------------------


@dataclass
class CacheRows:
    """The cache's rows in order: each one's token and place, and the split explanations are scored on."""

    tokens: Tensor  # [n] int64 token ids
    doc: Tensor  # [n] the context of each row
    pos: Tensor  # [n] its position in that context
    canon: Tensor  # [V] each token's canonical id (canonical_ids)
    prev_tok: Tensor  # [n] canonical id of the token before; n_vocab at the start of a context
    held: Tensor  # [n] bool: the row is held out (explanations are read from the rest, scored on these)
    n_vocab: int


def _cache_rows(cache: ActivationCache, lm: LoadedModel, heldout: float) -> CacheRows:
    meta = cache.load(("tokens", "doc", "pos"))
    tokens, doc, pos = meta["tokens"].long(), meta["doc"], meta["pos"]
    n_vocab = len(lm.tokenizer)
    if int(tokens.max()) >= n_vocab:
        raise UserError(
            f"the cache holds token ids up to {int(tokens.max())} but the tokenizer of {lm.name} has "
            f"{n_vocab}; pass the right --model"
        )
    # The score compares tokens up to case and spacing; the page still shows the exact tokens.
    canon = canonical_ids(lm.tokenizer, n_vocab)  # [V]
    prev_row = context_windows(doc, pos, torch.arange(len(tokens)), 1, 0)[:, 0]  # [n] -1: none
    prev_tok = torch.where(prev_row >= 0, canon[tokens[prev_row.clamp(min=0)]], n_vocab)
    return CacheRows(tokens, doc, pos, canon, prev_tok, _heldout_rows(doc, heldout), n_vocab)


def _heldout_rows(doc: Tensor, share: float) -> Tensor:
    """[n] bool: the rows of the held-out contexts (explain.heldout_rows), or of one context by row."""
    held = explain.heldout_rows(doc, share)
    if int(doc.max()) == 0:
        # One context cannot be split by context: hold out rows instead, and say what that costs.
        held = torch.rand(len(doc), generator=torch.Generator().manual_seed(0)) < share
        print(
            "warning: the cache holds one context, so held-out tokens are drawn from it by row and the "
            "detection scores are optimistic; harvest more text for honest scores",
            file=sys.stderr,
        )
    elif held.all() or not held.any():
        raise UserError(
            f"--heldout {share} holds out {'none' if not held.any() else 'all'} of the cache's "
            f"{int(doc.max()) + 1} contexts; "
            "explanations need contexts to read and contexts to score on: change --heldout or harvest more"
        )
    return held


def _first_pass(
    cfg: AnalyzeConfig, sae: SAE, cache: ActivationCache, counter: explain.PatternCounts, device, cost: dict
) -> FeatureStats:
    """Pass 1: the feature statistics, with the explanations' pattern counts taken on the way
    (their time is counted apart, as the built-in explanations')."""
    t1, c1 = time.time(), time.process_time()
    st = feature_stats(sae, ordered_batches(cache, cfg.batch_size, device), cfg.top_k, observe=counter.update).cpu()
    cost["pass1_s"] = round(time.time() - t1 - counter.seconds, 2)
    cost["pass1_cpu_s"] = round(time.process_time() - c1 - counter.cpu_seconds, 2)
    return st


@dataclass
class Explained:
    """The built-in explanations (explain.py) and the counts they were read from."""

    counts: explain.Counts  # pattern counts per split, and a sample of each feature's firings
    features: list[dict]  # per feature: explanation, pattern, explain_f1, detection
    detection: Tensor  # [d_sae] held-out detection score of each explanation: the ranking key


def _builtin_explanations(counter: explain.PatternCounts, tokenizer, rows: CacheRows, cost: dict) -> Explained:
    """Built-in explanations (explain split) and their detection scores (held-out split)."""
    t1, c1 = time.time(), time.process_time()
    counts = counter.finish()
    names = {rows.n_vocab: "the start of a context"}

    def name(i: int) -> str:
        return names.setdefault(i, explain.token_name(tokenizer.decode([i])))

    ctx = row_context(tokenizer, rows.tokens, rows.canon, rows.doc, rows.pos, rows.held, rows.n_vocab)
    expl = explain.explain_all(counts, name, ctx)
    cost["builtin_explain_s"] = round(time.time() - t1 + counter.seconds, 2)
    cost["builtin_explain_cpu_s"] = round(time.process_time() - c1 + counter.cpu_seconds, 2)
    return Explained(counts, expl, torch.tensor([e["detection"]["score"] for e in expl]))


@dataclass
class Windows:
    """Context windows around each feature's examples: its top k, then N_PER_QUANTILE from each
    activation quantile. Each tensor is [d_sae, k + q, W], W = ctx_before + 1 + ctx_after, with -1
    (an activation of 0) where a position is absent."""

    rows: Tensor  # cache rows
    acts: Tensor  # the feature's activation on each
    tokens: Tensor
    docs: Tensor
    pos: Tensor
    picks: list[list[list[int]]]  # per feature and quantile: the sampled firings shown


def _example_windows(
    cfg: AnalyzeConfig, sae: SAE, cache: ActivationCache, rows: CacheRows, st: FeatureStats, counts: explain.Counts
) -> Windows:
    """Pass 2: the windows of the top examples and of the quantile examples, re-encoded."""
    # Examples across activation quantiles, from a uniform sample of each feature's firings.
    samp_rows = counts.sample_rows.permute(1, 0, 2).flatten(1)
    samp_vals = counts.sample_vals.permute(1, 0, 2).flatten(1)
    picks = [explain.quantile_picks(samp_vals[j], N_PER_QUANTILE) for j in range(sae.d_sae)]
    q_rows = torch.full((sae.d_sae, explain.N_QUANTILES * N_PER_QUANTILE), -1, dtype=torch.long)
    for j, pj in enumerate(picks):
        flat = [i for q in pj for i in q]
        q_rows[j, : len(flat)] = samp_rows[j, flat]
    win = context_windows(rows.doc, rows.pos, torch.cat([st.top_rows, q_rows], 1), cfg.ctx_before, cfg.ctx_after)
    acts = window_activations(sae, cache, win, cfg.batch_size)
    return Windows(win, acts, at_rows(rows.tokens, win), at_rows(rows.doc, win), at_rows(rows.pos, win), picks)


@dataclass
class Scores:
    parts: dict[str, Tensor]  # [d_sae] each: "token", "context", "lens", and "score" made of them
    chance: dict[str, float]  # features.json's "chance": the levels the parts are measured against


def _score(rows: CacheRows, st: FeatureStats, win: Windows, lens: LogitLens, before: int, k: int) -> Scores:
    """The monosemanticity score of every feature's top-k examples (docs/analysis.md)."""
    unigram = (torch.bincount(rows.tokens, minlength=rows.n_vocab).double() / len(rows.tokens)).float()
    bag_chance = random_window_jaccard(rows.tokens, rows.doc, rows.pos, before)
    unigram_canon = torch.zeros(rows.n_vocab).index_add_(0, rows.canon, unigram)
    tokens, docs, pos = (t[:, :k].contiguous() for t in (win.tokens, win.docs, win.pos))  # the top-k windows
    s = monosemanticity(
        at_rows(rows.canon, tokens),
        docs,
        pos,
        st.top_vals,
        before,
        rows.canon[lens.up_ids],
        unigram_canon,
        st.frequency().float(),
        bag_chance,
        k,
    )
    s = {c: v.nan_to_num(0.0) for c, v in s.items()}  # never NaN (it would rank first); kept as a guard
    return Scores(s, {"same_token": float((unigram**2).sum()), "context_jaccard": bag_chance})


@dataclass
class Ranking:
    order: Tensor  # [d_sae] feature ids, best first
    rank: Tensor  # [d_sae] each feature's place in that order, 1 = best
    dense: list[bool]  # fires on more than DENSE_FREQ of tokens (evaluate's definition)
    families: list[dict]  # features sharing an explanation: {"id", "explanation", "members"}, best first
    family_of: dict[int, int]  # feature id → the id of its family


def _rank(explained: Explained, scores: Scores, freq: Tensor) -> Ranking:
    """Ranked by the held-out detection score of the built-in explanation; ties by the
    monosemanticity score of the top examples. Dense features come after every other, flagged:
    a '\\n' feature firing on 15% of tokens is not what a ranking should lead with."""
    d_sae, det, score = len(freq), explained.detection, scores.parts["score"]
    dense = (freq > DENSE_FREQ).tolist()
    order = torch.tensor(sorted(range(d_sae), key=lambda j: (dense[j], -float(det[j]), -float(score[j]), j)))
    rank = torch.empty(d_sae, dtype=torch.long)
    rank[order] = torch.arange(1, d_sae + 1)
    labels = [e["explanation"] or "never fires in the explain split" for e in explained.features]
    fams = explain.families(labels, order.tolist())
    return Ranking(order, rank, dense, fams, {j: f["id"] for f in fams for j in f["members"]})


def _feature_entries(
    cfg: AnalyzeConfig,
    st: FeatureStats,
    win: Windows,
    explained: Explained,
    ranking: Ranking,
    scores: Scores,
    lens: LogitLens,
    nearest: tuple[Tensor, Tensor],
) -> list[Feature]:
    """The features.json entry of every feature, in id order (tensors are listed once for all)."""
    before = cfg.ctx_before
    freq, means, maxes = st.frequency().tolist(), _round(st.total / st.count.clamp(min=1), 4), _round(st.max, 4)
    part = {c: _round(v, 4) for c, v in scores.parts.items()}
    near_cos, near_ids = nearest
    features = []
    for j, expl in enumerate(explained.features):
        n_ex = int((st.top_vals[j] > 0).sum())
        examples, quantiles = _examples(win, j, n_ex, cfg.top_k, before)
        features.append(
            Feature(
                id=j,
                rank=int(ranking.rank[j]),
                score=expl["detection"]["score"],
                explanation=expl["explanation"],
                family=ranking.family_of[j],
                pattern=expl["pattern"],
                explain_f1=expl["explain_f1"],
                detection=expl["detection"],
                monosemanticity=part["score"][j],
                token_score=part["token"][j],
                context_score=part["context"][j],
                lens_score=part["lens"][j],
                frequency=freq[j],
                dense=ranking.dense[j],
                mean_act=means[j],
                max_act=maxes[j],
                hist=_histogram(st.hist[j], int(st.hist_exp[j])),
                top_tokens=_top_tokens(win.tokens[j, :n_ex, before].tolist(), st.top_vals[j, :n_ex].tolist()),
                lens={
                    "promoted": [[t, v] for t, v in zip(lens.up_ids[j].tolist(), _round(lens.up_vals[j], 3))],
                    "suppressed": [[t, v] for t, v in zip(lens.down_ids[j].tolist(), _round(lens.down_vals[j], 3))],
                },
                examples=examples,
                quantiles=quantiles,
                nearest=[[i, c] for i, c in zip(near_ids[j].tolist(), _round(near_cos[j], 3))],
            )
        )
    return features


def _round(t: Tensor, decimals: int) -> list:
    return t.double().round(decimals=decimals).tolist()


def _examples(win: Windows, j: int, n_top: int, k: int, before: int) -> tuple[list[dict], list[list[dict]]]:
    """Feature j's top examples (its first n_top windows) and its examples from each quantile."""
    toks, docs, poss, acts = win.tokens[j].tolist(), win.docs[j].tolist(), win.pos[j].tolist(), _round(win.acts[j], 4)
    rows = win.rows[j, :, before].tolist()

    def example(e: int) -> dict:
        keep = [i for i, t in enumerate(toks[e]) if t >= 0]
        return {
            "row": rows[e],
            "doc": docs[e][before],
            "pos": poss[e][before],
            "act": acts[e][before],
            "center": sum(i < before for i in keep),
            "tokens": [toks[e][i] for i in keep],
            "acts": [acts[e][i] for i in keep],
        }

    quantiles = [[example(k + q * N_PER_QUANTILE + i) for i in range(len(p))] for q, p in enumerate(win.picks[j])]
    return [example(e) for e in range(n_top)], quantiles


def _histogram(hist: Tensor, exp: int) -> dict:
    """features.json's "hist" of one feature: its bins [N_BINS] up to the last non-empty one."""
    counts = hist.tolist()
    while counts and counts[-1] == 0:
        counts.pop()
    return {"bin_width": 2.0 ** (exp - LOG2_BINS) if counts else 0.0, "counts": counts}


def _top_tokens(center: list[int], acts: list[float]) -> list[list]:
    """[[token id, share of the activation]] of the tokens the top examples fire on, most first."""
    mass: dict[int, float] = {}
    for t, a in zip(center, acts):
        # Unrounded: a near-dead feature's top activations can all round to 0.
        mass[t] = mass.get(t, 0.0) + a
    total = sum(acts)  # > 0: every example fired
    return [[t, round(v / total, 4)] for t, v in sorted(mass.items(), key=lambda kv: -kv[1])[:N_TOP_TOKENS]]


def _analysis(
    cfg: AnalyzeConfig,
    lm: LoadedModel,
    hook: str | None,
    st: FeatureStats,
    explained: Explained,
    scores: Scores,
    win: Windows,
    lens: LogitLens,
    features: list[Feature],
    ranking: Ranking,
    cost: dict,
) -> Analysis:
    """The whole of features.json, its vocabulary being every token id the features name."""
    used = set(win.tokens[win.tokens >= 0].tolist()) | set(lens.up_ids.flatten().tolist())
    ids = sorted(used | set(lens.down_ids.flatten().tolist()))
    return Analysis(
        format=FORMAT,
        version=VERSION,
        sae=str(cfg.sae),
        acts=str(cfg.acts),
        model=lm.name,
        hook=hook,
        n_tokens=st.n_rows,
        d_sae=len(features),
        top_k=cfg.top_k,
        ctx_before=cfg.ctx_before,
        ctx_after=cfg.ctx_after,
        chance=scores.chance,
        heldout={"share": cfg.heldout, "tokens": int(explained.counts.unigram[1][0].sum())},
        cost=cost,
        vocab={str(i): lm.tokenizer.decode([i]) for i in ids},
        features=features,
        families=ranking.families,
    )


def _add_model_explanations(
    cfg: AnalyzeConfig,
    lm: LoadedModel,
    sae: SAE,
    cache: ActivationCache,
    rows: CacheRows,
    explained: Explained,
    ranking: Ranking,
    analysis: Analysis,
    out: Path,
) -> None:
    """--explain-top: the explainer's explanations of the best families, added to the analysis and
    written again (the built-in analysis is on disk already; the slow model explanations come on top)."""
    features = analysis["features"]
    heads = [f["members"][0] for f in ranking.families[: cfg.explain_top]]
    heads = [j for j in heads if explained.features[j]["pattern"] is not None]
    t1 = time.time()
    done = model_explanations(cfg, lm, sae, cache, explained.counts, heads, rows, out)
    for j, entry in done.items():
        features[j]["model_explanation"] = entry
    analysis["cost"]["model_explain_s"] = round(sum(e["seconds"] for e in done.values()), 2)
    analysis["cost"]["model_explain_cpu_s"] = round(sum(e.get("cpu_seconds", 0.0) for e in done.values()), 2)
    analysis["cost"]["model_explained"] = len(done)
    print(f"model explanations: {len(done)} families in {time.time() - t1:.0f} s")
    _write_outputs(out, analysis, ranking.order, cfg.max_features)


def _summary(out: Path, plots: list[str], analysis: Analysis, st: FeatureStats, order: Tensor, t0: float) -> dict:
    """analyze's result: where its outputs are, and their headline figures."""
    return {
        "out": str(out),
        "features_json": str(out / FEATURES_FILE),
        "page": str(out / "index.html"),
        "ranking": str(out / "ranking.csv"),
        "plots": plots,
        "n_tokens": st.n_rows,
        "d_sae": len(analysis["features"]),
        "dead_features": int((st.count == 0).sum()),
        "mean_l0": float((st.l0 * torch.arange(len(st.l0))).sum() / max(st.n_rows, 1)),
        "top_features": order[:10].tolist(),
        "n_families": len(analysis["families"]),
        "cost": analysis["cost"],
        "seconds": round(time.time() - t0, 1),
    }


def _write_outputs(out: Path, analysis: Analysis, order: Tensor, max_features: int | None) -> None:
    from sae_lens_lite.interpret.browser import write_page

    features = analysis["features"]
    # allow_nan=False: JSON has no NaN, and browsers' JSON.parse rejects the whole file over one.
    write_text_atomic(
        out / FEATURES_FILE, json.dumps(analysis, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    )
    _write_ranking(out / "ranking.csv", [features[i] for i in order.tolist()], analysis["vocab"])
    write_page(analysis, out / "index.html", max_features)


def _steer_samples(
    cfg: AnalyzeConfig, lm: LoadedModel, sae: SAE, hook: str | None, features: list[Feature], ids: list[int]
) -> dict:
    """Greedy continuations of cfg.steer_prompt with feature j's decoder direction added at the hook
    (strength steer_times x its max activation), at the positions the SAE reads: what
    `sae-lite steer --mode add` does (tests/test_intervene.py checks that they agree). Adds a
    "steer" entry to those features; returns the shared settings and the unsteered text."""
    from sae_lens_lite.data.corpus import special_token_ids
    from sae_lens_lite.evaluation.evaluate import evaluated_positions

    hook = sae.cfg.target_hook or sae.cfg.hook or hook  # a transcoder writes (and is steered at) the MLP's output
    if not hook:
        raise UserError("--steer needs the SAE's hook, but neither the SAE's config nor the cache names one")
    hook_point(lm.model, hook)
    dev = next(lm.model.parameters()).device
    prompt = lm.tokenizer(cfg.steer_prompt, return_tensors="pt")["input_ids"].to(dev)  # [1, T]
    special = special_token_ids(lm.tokenizer)
    drop_first = int((sae.cfg.meta.get("filters") or {}).get("drop_first", 0))

    def add(delta: Tensor):  # delta [d_model]: sae is folded, so W_dec rows are in activation units
        def edit_for(ids: Tensor):
            mask = evaluated_positions(ids, special, drop_first)

            def fn(act: Tensor) -> Tensor:
                out = act.clone()
                out[mask] = act[mask] + delta.to(act.dtype)
                return out

            return fn

        return edit_for

    for j in tqdm(ids, desc="steered samples", unit="feature", dynamic_ncols=True):
        strength = cfg.steer_times * features[j]["max_act"]
        g = generate(lm, prompt, STEER_TOKENS, hook, add(strength * sae.W_dec[j]))
        features[j]["steer"] = {"strength": round(strength, 4), "text": g.text}
    clean = generate(lm, prompt, STEER_TOKENS).text
    return {
        "prompt": cfg.steer_prompt,
        "clean": clean,
        "times_max": cfg.steer_times,
        "new_tokens": STEER_TOKENS,
        "hook": hook,
    }


def _write_ranking(path: Path, ranked: list[dict], vocab: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        cols = ["rank", "id", "score", "family", "explanation"]
        det = ["precision", "recall", "f1", "fires"]
        more = ["monosemanticity", "token_score", "context_score", "lens_score", "frequency", "mean_act", "max_act"]
        more += ["dense"]
        w.writerow(cols + det + more + ["top_token", "top_promoted", "model_explanation", "model_balanced_accuracy"])
        for r in ranked:
            top = vocab[str(r["top_tokens"][0][0])] if r["top_tokens"] else ""
            m = r.get("model_explanation") or {}
            w.writerow(
                [r[c] for c in cols]
                + [r["detection"][c] for c in det]
                + [r[c] for c in more]
                + [
                    top,
                    vocab[str(r["lens"]["promoted"][0][0])],
                    m.get("explanation", ""),
                    m.get("balanced_accuracy", ""),
                ]
            )
    os.replace(tmp, path)


N_EXPLAIN, N_SCORE = 2, 3  # contexts per quantile: shown to the explainer (explain split), scored (held-out)


def model_explanations(
    cfg: AnalyzeConfig,
    lm: LoadedModel,
    sae: SAE,
    cache: ActivationCache,
    counts: explain.Counts,
    heads: list[int],
    rows: CacheRows,
    out: Path,
) -> dict[int, dict]:
    """Explanations of features `heads` by cfg.explainer, each scored yes/no on held-out contexts:
    activating ones from every quantile and as many random held-out ones where it never fires."""
    from sae_lens_lite.fsutil import sha256_file

    header = {
        "explainer": cfg.explainer,
        "sae": sha256_file(Path(cfg.sae) / "sae.safetensors"),
        "acts": str(cfg.acts),
        "heldout": cfg.heldout,
        "ctx": [cfg.ctx_before, cfg.ctx_after],
        "prompt": explain.PROMPT_VERSION,
    }
    results = explain.ResultCache(out / "model_explanations.json", header)
    todo = [j for j in heads if results.get(j) is None]
    if todo:
        win, plan = _explainer_windows(cfg, sae.d_sae, counts, todo, rows)  # [d_sae, R, W]
        acts = window_activations(sae, cache, win, cfg.batch_size)
        xlm = lm if cfg.explainer == lm.name else load_model(cfg.explainer, sae.W_enc.device)
        model = explain.ModelExplainer(xlm)
        for j in tqdm(todo, desc="model explanations", unit="feature", dynamic_ncols=True):
            t1, c1 = time.time(), time.process_time()
            entry = _explain_and_score(model, lm.tokenizer, rows.tokens, win[j], acts[j], plan[j])
            entry["seconds"], entry["cpu_seconds"] = round(time.time() - t1, 2), round(time.process_time() - c1, 2)
            results.put(j, entry)
    done: dict[int, dict] = {}
    for j in heads:
        found = results.get(j)
        assert found is not None  # each of heads was explained (and put) above, or found in results
        done[j] = found
    return done


class ExplainerSplit(NamedTuple):
    """How a feature's windows for the explainer divide: the first `shown` are shown to it, the
    next `scored` are activating held-out ones to score on, and random held-out ones follow."""

    shown: int
    scored: int


def _explainer_windows(
    cfg: AnalyzeConfig, d_sae: int, counts: explain.Counts, todo: list[int], rows: CacheRows
) -> tuple[Tensor, dict[int, ExplainerSplit]]:
    """The windows of each feature in `todo` [d_sae, R, W] (-1 elsewhere), and how they divide."""
    n_pos = explain.N_QUANTILES * N_SCORE
    g = torch.Generator().manual_seed(1)
    held = explain.heldout_rows(rows.doc, cfg.heldout).nonzero().squeeze(1)
    picked = torch.full((d_sae, explain.N_QUANTILES * (N_EXPLAIN + N_SCORE) + 4 * n_pos), -1, dtype=torch.long)
    plan = {}
    for j in todo:
        ex = [i for q in explain.quantile_picks(counts.sample_vals[0, j], N_EXPLAIN) for i in q]
        po = [i for q in explain.quantile_picks(counts.sample_vals[1, j], N_SCORE) for i in q]
        r = torch.cat(
            [
                counts.sample_rows[0, j, ex],
                counts.sample_rows[1, j, po],
                held[torch.randint(len(held), (4 * n_pos,), generator=g)],
            ]
        )
        picked[j, : len(r)] = r
        plan[j] = ExplainerSplit(len(ex), len(po))
    return context_windows(rows.doc, rows.pos, picked, cfg.ctx_before, cfg.ctx_after), plan


def _explain_and_score(
    model: explain.ModelExplainer, tokenizer, tokens: Tensor, win: Tensor, acts: Tensor, split: ExplainerSplit
) -> dict:
    """One feature's explanation, from its shown windows (win, acts [R, W]), scored on its
    activating held-out windows and as many held-out ones where it never fires."""

    def text(w: Tensor) -> str:
        return tokenizer.decode(tokens[w[w >= 0]].tolist()).replace("\n", " ")

    n_ex, n_po = split
    shown = [
        explain.marked([tokenizer.decode([int(tokens[r])]) for r in w[w >= 0]], a[w >= 0].tolist())
        for w, a in zip(win[:n_ex], acts[:n_ex])
    ]
    phrase = model.explain(shown)
    pos_txt = [text(w) for w in win[n_ex : n_ex + n_po]]
    quiet = [text(w) for w, a in zip(win[n_ex + n_po :], acts[n_ex + n_po :]) if (w >= 0).any() and not (a > 0).any()]
    neg_txt = quiet[: len(pos_txt)]
    entry: dict[str, Any] = {"explanation": phrase, "balanced_accuracy": None, "auroc": None, "n_scored": 0}
    if pos_txt and len(neg_txt) == len(pos_txt):
        margin = model.yes_margin(phrase, pos_txt + neg_txt)
        label = torch.arange(len(margin)) < len(pos_txt)
        entry.update(
            balanced_accuracy=round(explain.balanced_accuracy(margin, label), 4),
            auroc=round(explain.auroc(margin, label), 4),
            n_scored=len(margin),
        )
    return entry


def write_plots(out: Path, freq: Tensor, l0: Tensor, score: Tensor, n_rows: int) -> list[str]:
    """feature_density.png, l0_per_token.png, score_distribution.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alive = freq[freq > 0]
    figs = {
        "feature_density.png": (
            torch.log10(alive).numpy(),
            "log10 firing frequency",
            f"feature density ({int((freq == 0).sum())} dead of {len(freq)})",
        ),
        "score_distribution.png": (score.numpy(), "monosemanticity score", "score distribution"),
    }
    paths = []
    for name, (x, xlabel, title) in figs.items():
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.hist(x, bins=50)
        ax.set(xlabel=xlabel, ylabel="features", title=title)
        paths.append(_save(fig, out / name))
    fig, ax = plt.subplots(figsize=(6, 4))
    last = int(l0.nonzero().max()) + 1 if l0.any() else 1
    ax.bar(range(last), (l0[:last] / max(n_rows, 1)).numpy(), width=1.0)
    ax.set(xlabel="features firing on a token (L0)", ylabel="share of tokens", title="L0 per token")
    paths.append(_save(fig, out / "l0_per_token.png"))
    return paths


def _save(fig, path: Path) -> str:
    save_figure_atomic(fig, path)
    return str(path)
