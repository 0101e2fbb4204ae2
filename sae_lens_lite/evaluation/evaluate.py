"""Evaluate an SAE on held-out text: reconstruction, sparsity, and the model's loss with it spliced in.

Every number is defined once, in metrics.py, and in words in docs/metrics.md; this module runs
the evaluation and writes its report.

    text → contexts [n_ctx, T]
    pass 1: forward stopped at the hook → activations x [n, d_in] at the evaluated positions
            → reconstruction and sparsity metrics (streamed through the SAE); baselines fitted
    pass 2: per batch, the full model clean, then with x_hat / zeros / the mean spliced in at the
            hook → sums of CE and KL(clean ‖ spliced)
    → report.json, report.md, density.png

A transcoder (sae.Transcoder) is scored the same way at the hook it writes (the MLP's output):
pass 1 reads its input and target hooks together, pass 2 splices its prediction from the input
recorded in the same forward, and zero/mean ablation replace the MLP's output, so the CE loss
recovered and KL are measured with the MLP spliced out.

Evaluated positions are chosen by the same filters as the harvest's rows, with the harvest's
defaults (special tokens and the first position dropped), for every SAE alike, native or
imported: the SAE is spliced and scored there only. The report's `footing` records them with the
tokens and the model, and `footing_differences` says why two reports are not comparable.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from sae_lens_lite.config import check_numbers, opt
from sae_lens_lite.data.corpus import (
    DEFAULT_CORPUS,
    check_context_length,
    keep_mask,
    load_texts,
    position_filters,
    special_token_ids,
    tokenize_corpus,
)
from sae_lens_lite.data.harvest import HarvestConfig
from sae_lens_lite.data.models import LoadedModel, edit_hook, hook_point, load_model, run_to_hooks
from sae_lens_lite.errors import UserError
from sae_lens_lite.evaluation.baselines import fit_baselines, vae_activity
from sae_lens_lite.evaluation.metrics import (
    CHUNK,
    DENSE_FREQ,
    SAEMetrics,
    ce_kl_sums,
    ce_summary,
    latent_sparsity,
    sae_pass,
    score_reconstruction,
    standard_error,
)
from sae_lens_lite.evaluation.report import density_histogram, fmt, markdown_summary, plot_density
from sae_lens_lite.fsutil import write_json_atomic, write_text_atomic
from sae_lens_lite.outputs import Output, pct, report_folder
from sae_lens_lite.runtime import resolve_device
from sae_lens_lite.training.sae import SAE

FIT_ROWS = 65536  # activations read from --acts to fit the baselines
REPORT_FILE = "report.json"  # the evaluation's figures; its presence (with the record) marks one done
OUR_FILES = (REPORT_FILE, "report.md", "density.png", "provenance.json")
OUTPUT = Output(  # outputs.py
    "evaluate",
    report_folder(REPORT_FILE, OUR_FILES, "an evaluation report"),
    inputs=("sae", "dataset", "acts", "sparsity_acts"),
    skip=("sae", "acts", "sparsity_acts", "batch_size"),
)


@dataclass
class EvalConfig:
    sae: str = opt("runs/sae", "SAE directory to evaluate (config.json + sae.safetensors)")
    model: str | None = opt(None, "model to splice the SAE into; default: the model named in the SAE's config")
    dataset: str = opt(
        DEFAULT_CORPUS,
        "evaluation text (a .txt/.jsonl/.json/.parquet/.csv file, a directory of .txt, 'pydoc' or a hub id); pass "
        "text held out from training",
    )
    text_column: str = opt(
        HarvestConfig.text_column, "column holding the text in .jsonl/.json/.parquet/.csv/hub corpora"
    )
    split: str = opt(HarvestConfig.split, "split of a hub dataset (e.g. test; local files and pydoc have one)")
    tokens: int = opt(
        16384, "evaluation tokens, in whole contexts (CPU: the full SmolLM2 does ~1k tokens/s per forward)"
    )
    skip_tokens: int | None = opt(
        None,
        "skip the corpus's first tokens (rounded up to whole contexts); default: what the SAE's training "
        "cache took from this corpus, else 0",
    )
    # Which positions are spliced and scored: harvest's row filters, with harvest's defaults, so a
    # native SAE and an imported one (no training cache to ask) are scored on the same positions.
    drop_special: bool = opt(
        HarvestConfig.drop_special,
        "leave BOS/EOS/pad positions unspliced and unscored (as harvest drops them by default)",
    )
    drop_first: int = opt(
        HarvestConfig.drop_first,
        "leave the first N positions of every context unspliced and unscored (harvest drops position 0 by "
        "default: an attention sink with a huge norm)",
    )
    outlier_factor: float = opt(
        HarvestConfig.outlier_factor,
        "also leave positions whose activation norm exceeds this multiple of the median norm over the eval "
        "text (0 = none; harvest's --outlier-factor)",
    )
    context_length: int | None = opt(None, "tokens per context; default: the SAE's training context length")
    batch_size: int = opt(8, "contexts per forward")
    device: str = opt("auto", "cpu, cuda, or auto")
    baselines: bool = opt(
        True,
        "also score PCA (k = SAE L0, 2x, 4x) and a Gaussian VAE of the same sizes (the VAEs' fitting adds up to "
        "~1,500 small training steps, a minute or more on a busy 2-core CPU; --no-baselines skips them)",
    )
    acts: str | None = opt(
        None, "activation cache to fit the baselines on (e.g. the SAE's); default: the first half of the eval contexts"
    )
    sparsity_acts: str | None = opt(
        None,
        "also count dead and dense latents over this activation cache (harvest held-out text at the SAE's "
        "hook): the eval tokens are too few to tell rare latents from dead ones",
    )
    out: str | None = opt(None, "directory for report.json, report.md and density.png; default: <sae>/eval")
    overwrite: bool = opt(False, "replace an existing report in --out")

    def __post_init__(self):
        # context_length >= 2: a context of one token predicts nothing
        check_numbers(
            self, tokens="positive", skip_tokens="non-negative", context_length=(2, None), batch_size="positive"
        )


# ---- the SAE written into the model ------------------------------------------------------


@contextlib.contextmanager
def written_by(sae: SAE, model):
    """The function that replaces the activation at the hook the SAE writes, for splice(): an
    SAE's reconstruction of that activation; a transcoder's prediction from its input hook,
    recorded in the same forward (the MLP's input, read before the MLP's output is replaced)."""
    if sae.cfg.target_hook is None:
        yield lambda a: sae(a).x_hat
        return
    held: dict[str, Tensor] = {}

    def record(a: Tensor) -> None:
        held["x"] = a

    assert sae.cfg.hook is not None  # evaluate and compare refuse an SAE without one
    with edit_hook(model, sae.cfg.hook, record):
        yield lambda a: sae(held["x"].reshape(-1, sae.d_in)).x_hat


# ---- the evaluation run -------------------------------------------------------------------


def eval_contexts(
    tokenizer,
    dataset: str,
    context_length: int,
    tokens: int,
    skip_tokens: int,
    text_column: str = "text",
    split: str = "train",
) -> Tensor:
    """Contexts [n_ctx, T] packed exactly as the harvest packs them, after the first skip_tokens."""
    skip = math.ceil(skip_tokens / context_length)  # whole contexts: no skipped token leaks in
    want = max(1, tokens // context_length)
    texts = load_texts(dataset, split, text_column)
    ctx = tokenize_corpus(tokenizer, texts, context_length, (skip + want) * context_length)
    if len(ctx) <= skip:
        raise UserError(
            f"{dataset} has only {len(ctx) * context_length} tokens in whole contexts, none left after skipping "
            f"the first {skip_tokens} (by default, the part the SAE was trained on); pass held-out text with --dataset"
        )
    return ctx[skip : skip + want]


def split_contexts(lm: LoadedModel, cfg, T: int, skip: int) -> tuple[Tensor, int]:
    """The evaluation contexts [n_ctx, T] of cfg.dataset after `skip` tokens, and how many of the
    first ones fit the baselines: with baselines and no --acts, they are fitted on the first half
    and everything in the comparison table is scored on the second half."""
    contexts = eval_contexts(lm.tokenizer, cfg.dataset, T, cfg.tokens, skip, cfg.text_column, cfg.split)
    n_fit = len(contexts) // 2 if cfg.baselines and not cfg.acts else 0
    if cfg.baselines and not cfg.acts and n_fit == 0:
        raise UserError(
            "baselines need at least 2 eval contexts (fit on one half, score on the other); raise --tokens "
            "or pass --no-baselines"
        )
    return contexts, n_fit


def hook_activations(
    lm: LoadedModel, cfg, contexts: Tensor, hook: str, filters: dict, device, target_hook: str | None = None
) -> tuple:
    """The activations at `hook` of every position the filters keep: x [n, d] ([x | target] with
    a target hook), each row's context [n], and the kept mask [n_ctx, T]; refuses text that
    leaves none."""
    x, row_ctx, keep = eval_activations(
        lm.model, contexts, hook, filters, special_token_ids(lm.tokenizer), cfg.batch_size, device, target_hook
    )
    if len(x) == 0:
        raise UserError(
            f"{cfg.dataset} gave no positions to evaluate on after the position filters {filters}; lower "
            "--drop-first or --outlier-factor"
        )
    return x, row_ctx, keep


def evaluate(cfg: EvalConfig, lm: LoadedModel | None = None) -> dict:
    """Evaluate the SAE in cfg.sae; writes report.json, report.md, density.png and returns the report."""
    times, t0 = {}, time.perf_counter()
    cfg.__post_init__()
    device = resolve_device(cfg.device)
    sae = SAE.load(cfg.sae, device).eval().requires_grad_(False)
    hook = sae.cfg.hook
    if not hook:
        raise UserError(f'{cfg.sae}/config.json names no hook; set "hook" there to where the SAE was trained')
    T = cfg.context_length or sae.cfg.context_length or 128
    # a wrong cache fails before the model runs
    held_cache = _open_cache(cfg.sparsity_acts, hook, sae.d_in, "--sparsity-acts") if cfg.sparsity_acts else None
    check_fit_cache(cfg, sae.cfg.target_hook or hook, sae.d_out)
    # the defaults are left out, so that reports written before --text-column and --split existed still match
    defaults = tuple(k for k in ("text_column", "split") if getattr(cfg, k) == getattr(HarvestConfig, k))
    stage = OUTPUT.start(cfg, cfg.out or Path(cfg.sae) / "eval", skip=defaults)
    if stage.done() is not None:  # the rerun rule (outputs.py)
        return json.loads((stage.out / REPORT_FILE).read_text())
    out = stage.claim()
    run = _prepare(cfg, sae, hook, lm, device, T)
    times["load"] = time.perf_counter() - t0

    t = time.perf_counter()
    acts = _activations(run)  # pass 1
    scored = sae_pass(sae, acts.rows)
    held_out = cache_sparsity(sae, held_cache, device) if held_cache is not None else None
    times["activations_and_sae"] = time.perf_counter() - t

    t = time.perf_counter()
    base = _fit_baselines(run, acts, scored.sparsity["l0"]) if cfg.baselines else None
    times["baselines_fit"] = time.perf_counter() - t

    t = time.perf_counter()
    sums = _spliced_sums(run, acts, base)  # pass 2
    times["ce_kl"] = time.perf_counter() - t

    report = _report(run, acts, scored, sums, held_out, base)
    _write_report(report, out, run, scored.sparsity["firing_frequency"], times, t0)
    headline = _headline(report)
    stage.finish(
        headline,  # last: its presence marks a finished evaluation
        f"evaluate: {out / 'report.md'}: CE loss recovered {fmt(headline['ce_loss_recovered'], 3)}, EV "
        f"{fmt(headline['explained_variance'], 3)}, L0 {headline['l0']:.1f}, dead "
        f"{pct(headline['dead_fraction'])} on {headline['n_tokens']:,} tokens of {cfg.dataset}",
    )
    return report


@dataclass
class EvalRun:
    """What one evaluation reads: its settings, the SAE, the model, the contexts and the positions."""

    cfg: EvalConfig
    sae: SAE
    hook: str  # the SAE's hook (evaluate refuses an SAE without one)
    lm: LoadedModel
    device: torch.device
    trained_on: tuple[str, int, str] | None  # the SAE's training text (training_text)
    skip: int  # tokens skipped at the corpus's start
    contexts: Tensor  # [n_ctx, T]
    n_fit: int  # the first n_fit contexts fit the baselines, the rest are the score split
    filters: dict  # the evaluated positions (corpus.position_filters)

    @property
    def written(self) -> str:
        """The hook the SAE is spliced at: a transcoder writes the MLP's output."""
        return self.sae.cfg.target_hook or self.hook


def _prepare(cfg: EvalConfig, sae: SAE, hook: str, lm: LoadedModel | None, device, T: int) -> EvalRun:
    """The model to splice the SAE into (cfg.model, else the one its config names), checked to
    have its hooks, its width and contexts of T tokens; the eval contexts, held out from the
    SAE's training text by default."""
    if lm is None:
        model = cfg.model or sae.cfg.model
        if not model:
            raise UserError(f"{cfg.sae}/config.json names no model; pass --model")
        lm = load_model(model, device)
    hook_point(lm.model, hook)
    hook_point(lm.model, sae.cfg.target_hook or hook)
    if lm.d_model != sae.d_in:
        raise UserError(
            f"the SAE reads {sae.d_in}-dim activations but {lm.name} has d_model {lm.d_model}; pass the right --model"
        )
    check_context_length(lm, T)
    trained_on = training_text(sae)
    skip = cfg.skip_tokens
    if skip is None:  # keep the eval text disjoint from the SAE's training text by default
        skip = trained_on[1] if trained_on and same_corpus(trained_on[0], cfg.dataset, trained_on[2], cfg.split) else 0
    contexts, n_fit = split_contexts(lm, cfg, T, skip)  # [n_ctx, T]
    return EvalRun(cfg, sae, hook, lm, device, trained_on, skip, contexts, n_fit, position_filters(cfg))


@dataclass
class EvalActivations:
    """Pass 1's activations at the evaluated positions."""

    rows: Tensor  # [n, d_in] ([n, d_in + d_out] for a transcoder: read | written)
    x: Tensor  # [n, d_in] what the SAE reads
    y: Tensor  # [n, d_out] what it writes (x itself for an SAE)
    in_score: Tensor  # [n] bool: the row's context is in the score split (contexts n_fit..)
    keep: Tensor  # [n_ctx, T] bool: the evaluated positions
    mean: Tensor  # [d_out] the mean-ablation value


def _activations(run: EvalRun) -> EvalActivations:
    """Pass 1: the activations at the SAE's hook (and at its target hook) of every evaluated position."""
    sae = run.sae
    rows, row_ctx, keep = hook_activations(
        run.lm, run.cfg, run.contexts, run.hook, run.filters, run.device, sae.cfg.target_hook
    )
    x, y = sae.split(rows)  # [n, d_in] read and [n, d_out] written (the same for an SAE)
    return EvalActivations(rows, x, y, row_ctx >= run.n_fit, keep, y.mean(0))


@dataclass
class Baselines:
    """The reference methods, fitted once: reconstruct functions, active dims per token, VAE activity."""

    methods: dict[str, Callable[[Tensor], Tensor]]
    active: dict[str, float]  # the SAE's L0 too
    vae_info: dict[str, dict]


def _fit_baselines(run: EvalRun, acts: EvalActivations, l0: float) -> Baselines:
    """PCA and VAE of the SAE's L0 and 2x, 4x that. They reconstruct the written activation from
    itself (for a transcoder: a k-dim code of the MLP's output), the SAE from what it reads."""
    cfg, sae = run.cfg, run.sae
    fit_x = acts.y[~acts.in_score] if not cfg.acts else fit_activations(cfg.acts, run.written, sae.d_out, run.device)
    base = Baselines({}, {"sae": l0}, {})
    for k, (pca, vae) in fit_baselines(fit_x, baseline_sizes(l0, sae.d_out)).items():
        base.methods[f"pca_{k}"] = pca.reconstruct
        base.active[f"pca_{k}"] = float(k)
        base.methods[f"vae_{k}"] = vae.reconstruct
        base.vae_info[f"vae_{k}"] = vae_activity(vae, acts.y[acts.in_score])
        base.active[f"vae_{k}"] = base.vae_info[f"vae_{k}"]["active_dims_per_token"]
    return base


def _spliced_sums(run: EvalRun, acts: EvalActivations, base: Baselines | None) -> dict:
    """Pass 2: the sums of CE and KL (ce_kl_sums) with the SAE, each baseline and both ablations spliced in."""
    with written_by(run.sae, run.lm.model) as sae_fn:
        methods = {"sae": sae_fn, **(base.methods if base else {})}
        ablations = {"zero_ablation": torch.zeros_like, "mean_ablation": lambda a: acts.mean.expand_as(a)}
        return ce_kl_sums(
            run.lm.model,
            run.contexts,
            acts.keep,
            run.written,
            methods | ablations,
            run.n_fit,
            run.cfg.batch_size,
            run.device,
        )


def _report(
    run: EvalRun, acts: EvalActivations, scored: SAEMetrics, sums: dict, held_out: dict | None, base: Baselines | None
) -> dict:
    """report.json: what was evaluated, the SAE's CE and KL, reconstruction and sparsity, the
    baselines, the footing and the notes."""
    cfg, sae = run.cfg, run.sae
    ce_all = ce_summary(sums["all"], ["sae"])
    per_context = dict(sums["contexts"])
    ce_all["kl_sae_se"], ce_all["sae_se"] = (standard_error(per_context[k]) for k in ("kl_sae", "ce_sae"))
    report = {
        "sae": str(cfg.sae),
        **sae.cfg.provenance(),
        "model": run.lm.name,
        "hook": sae.cfg.hook,
        **({"target_hook": run.written} if run.written != sae.cfg.hook else {}),
        "dataset": cfg.dataset,
        "skip_tokens": run.skip,
        "context_length": run.contexts.shape[1],
        "positions": run.filters,
        "n_contexts": len(run.contexts),
        "n_predictions": int(sums["all"]["n"]),
        "n_activations": len(acts.x),
        "ce": ce_all,
        "per_context": per_context,  # each context's mean KL and CE with the SAE spliced in
        "reconstruction": scored.reconstruction,
        "sparsity": scored.sparsity_json() | _training_dead(sae),
        "density_histogram": density_histogram(scored.sparsity["firing_frequency"]),
    }
    if held_out is not None:
        report["sparsity_on_acts"] = held_out
    if base is not None:
        report["baselines"] = _baseline_table(run, base, sums["score"], acts)
    # the hook it is spliced at: a transcoder's numbers compare with an SAE's at the MLP's output
    report["footing"] = footing(run.lm, run.written, cfg.dataset, run.skip, run.contexts, run.filters, len(acts.x))
    report["warnings"] = _warnings(
        cfg.dataset, cfg.split, run.skip, run.trained_on, scored.sparsity, held_out
    ) + position_warnings(sae, run.filters)
    report["config"] = asdict(cfg)
    return report


def _baseline_table(run: EvalRun, base: Baselines, score: dict, acts: EvalActivations) -> dict:
    """report.json's "baselines": the SAE and every baseline scored on the score split."""
    x, y = acts.x[acts.in_score], acts.y[acts.in_score]
    table = []
    for m in ["sae", *base.methods]:
        ce = ce_summary(score, [m])
        if m == "sae":
            scored = score_reconstruction(lambda a: run.sae(a).x_hat, x, y)
        else:
            scored = score_reconstruction(base.methods[m], y, y)
        row = {"method": m, "active_dims_per_token": base.active[m], **scored}
        row.update(ce_loss=ce[m], ce_loss_recovered=ce[f"{m}_recovered"], kl=ce[f"kl_{m}"])
        table.append(row | base.vae_info.get(m, {}))
    return {
        "fit_on": f"activation cache {run.cfg.acts}" if run.cfg.acts else f"eval contexts 0..{run.n_fit - 1}",
        "scored_on": f"eval contexts {run.n_fit}..{len(run.contexts) - 1}",
        "ce_clean": score["ce/clean"] / score["n"],
        "ce_zero_ablation": score["ce/zero_ablation"] / score["n"],
        "rows": table,
    }


def _write_report(report: dict, out: Path, run: EvalRun, freq: Tensor, times: dict, t0: float) -> None:
    """density.png of the firing frequencies freq [d_sae], then report.md and report.json."""
    plot_density(freq, out / "density.png", f"{Path(run.cfg.sae).name} at {run.written}", DENSE_FREQ)
    report["files"] = {"report": REPORT_FILE, "summary": "report.md", "density": "density.png"}
    times["total"] = time.perf_counter() - t0
    report["timing_s"] = times
    write_text_atomic(out / "report.md", markdown_summary(report))
    write_json_atomic(out / REPORT_FILE, report)


def _headline(report: dict) -> dict:
    """evaluate's result in its finish record: CE loss recovered, EV, L0, dead fraction, tokens."""
    return {
        "ce_loss_recovered": report["ce"]["sae_recovered"],
        "explained_variance": report["reconstruction"]["explained_variance"],
        "l0": report["sparsity"]["l0"],
        "dead_fraction": report["sparsity"]["dead_fraction"],
        "n_tokens": report["sparsity"]["n_tokens"],
    }


def baseline_sizes(l0: float, d_in: int) -> list[int]:
    """PCA components / VAE latent dims: the SAE's L0 (rounded) and 2x, 4x that, capped at d_in."""
    k = max(1, round(l0))
    return sorted({min(d_in, m * k) for m in (1, 2, 4)})


def eval_activations(
    model, contexts, hook, filters: dict, special: set[int], batch_size, device, target_hook: str | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Activations [n, d] at the evaluated positions of contexts [n_ctx, T], each row's context
    index [n], and the evaluated-position mask [n_ctx, T]. The positions are harvest's rows
    (`keep_mask` with these filters), except that an outlier norm is measured against the median
    over the whole eval text, not per batch, so that it does not depend on --batch-size. With a
    target hook (a transcoder's), rows are [x | target] [n, d + d_target], read in the same pass
    and kept where x is, as a pair harvest keeps them."""
    acts, targets = [], []
    for b in tqdm(range(0, len(contexts), batch_size), desc="eval: activations", unit="batch", dynamic_ncols=True):
        ids = contexts[b : b + batch_size].to(device)  # [b, T]
        got = run_to_hooks(model, ids, [hook] + ([target_hook] if target_hook else []))
        acts.append(got[hook].float())  # [b, T, d]
        if target_hook:
            targets.append(got[target_hook].float())
    act = torch.cat(acts)  # [n_ctx, T, d]
    keep = keep_mask(contexts.to(device), act, special, **filters)  # [n_ctx, T]
    ctx_idx = torch.arange(len(contexts), device=device)[:, None].expand_as(keep)[keep]
    rows = torch.cat([act[keep], torch.cat(targets)[keep]], 1) if target_hook else act[keep]
    return rows, ctx_idx, keep


def tokens_hash(contexts: Tensor) -> str:
    """sha256 prefix of the eval token ids [n_ctx, T]: equal only for the same tokens in the same contexts."""
    return hashlib.sha256(contexts.to(torch.int64).cpu().numpy().tobytes()).hexdigest()[:16]


# What two reports must share for their numbers to be compared (docs/metrics.md, "Comparing").
FOOTING_KEYS = (
    "model",
    "weights_hash",
    "hook",
    "dataset",
    "skip_tokens",
    "context_length",
    "n_contexts",
    "tokens_sha256",
    "positions",
    "n_activations",
)


def evaluated_positions(ids: Tensor, special: set[int], drop_first: int) -> Tensor:
    """Which positions of ids [b, T] an SAE reads when it edits a live model (intervene.py,
    analyze --steer): not special tokens and not the first `drop_first` (attention sinks)."""
    return keep_mask(ids, None, special, drop_special=True, drop_first=drop_first, outlier_factor=0.0)


def footing(
    lm: LoadedModel, hook: str, dataset: str, skip: int, contexts: Tensor, filters: dict, n_activations: int
) -> dict:
    """The model, hook, tokens and positions a report's numbers were measured on."""
    return {
        "model": lm.name,
        "weights_hash": lm.weights_hash,
        "hook": hook,
        "dataset": dataset,
        "skip_tokens": skip,
        "context_length": contexts.shape[1],
        "n_contexts": len(contexts),
        "tokens_sha256": tokens_hash(contexts),
        "positions": filters,
        "n_activations": n_activations,
    }


def footing_differences(a: dict, b: dict) -> list[str]:
    """Why two reports (or footings) are not comparable, one item per differing setting; [] if they are."""
    fa, fb = a.get("footing", a), b.get("footing", b)
    if not all(k in f for f in (fa, fb) for k in FOOTING_KEYS):
        return ["a report records no footing (written by an older sae-lite); evaluate it again"]
    out = []
    for k in FOOTING_KEYS:
        if k == "positions":
            out += [
                f"positions.{p} {fa[k].get(p)} vs {fb[k].get(p)}"
                for p in sorted(set(fa[k]) | set(fb[k]))
                if fa[k].get(p) != fb[k].get(p)
            ]
        elif fa[k] != fb[k]:
            out.append(f"{k} {fa[k]} vs {fb[k]}")
    return out


def position_warnings(sae: SAE, filters: dict) -> list[str]:
    """A note when the SAE's training cache filtered positions differently from this evaluation."""
    trained = sae.cfg.meta.get("filters") or {}
    differ = [k for k in ("drop_special", "drop_first", "outlier_factor") if k in trained and trained[k] != filters[k]]
    if not differ:
        return []
    pairs = ", ".join(f"{k} {trained[k]} (here {filters[k]})" for k in differ)
    return [
        f"the SAE's training cache filtered positions with {pairs}; every SAE is evaluated with the same "
        f"setting, pass --{differ[0].replace('_', '-')} to change it"
    ]


def _open_cache(path: str, hook: str, d_in: int, flag: str):
    """The activation cache at `path`, checked to hold the SAE's hook point and width."""
    from sae_lens_lite.data.cache import ActivationCache

    cache = ActivationCache.open(path)
    if cache.manifest.get("hook") != hook or cache.d_model != d_in:
        raise UserError(
            f"{flag} {path} holds {cache.manifest.get('hook')} (d={cache.d_model}) but the SAE reads "
            f"{hook} (d={d_in}); harvest {hook} for it"
        )
    if cache.n_tokens == 0:
        raise UserError(
            f"{flag} {path} holds no activations (its harvest filters dropped every row); harvest more text"
        )
    return cache


def check_fit_cache(cfg, hook: str, d: int) -> None:
    """cfg.acts (evaluate's and compare's), checked before the model runs: used only with the
    baselines on, and a cache of the activation they reconstruct (hook, width d)."""
    if cfg.acts:
        if not cfg.baselines:
            raise UserError("--acts only fits the baselines, which --no-baselines turns off: drop one of the two")
        _open_cache(cfg.acts, hook, d, "--acts")


def fit_activations(path: str, hook: str, d_in: int, device) -> Tensor:
    """Up to FIT_ROWS activations from the leading shards of a cache."""
    cache = _open_cache(path, hook, d_in, "--acts")
    rows, n = [], 0
    for i in range(cache.n_shards):
        rows.append(cache.read_shard(i, ("activations",))["activations"].float())
        n += len(rows[-1])
        if n >= FIT_ROWS:
            break
    return torch.cat(rows)[:FIT_ROWS].to(device)


def cache_sparsity(sae: SAE, cache, device) -> dict:
    """Sparsity figures over every activation in an ActivationCache (see _open_cache): with many
    more tokens than the eval set, a latent that fires once in 100k tokens is not counted as dead."""
    batches = cache.iter_batches(CHUNK, shuffle=False, device=device)
    total = -(-cache.n_tokens // CHUNK)
    bar = tqdm(batches, total=total, desc="sparsity on --sparsity-acts", unit="batch", leave=False)
    return {"acts": str(cache.path), **latent_sparsity(sae, bar)}


def training_text(sae: SAE) -> tuple[str, int, str] | None:
    """(corpus, tokens harvested from its start, split) of the cache the SAE was trained on, if still readable."""
    from sae_lens_lite.data.cache import ActivationCache

    acts = sae.cfg.meta.get("acts")
    if not acts:
        return None
    try:
        m = ActivationCache.open(acts, verify=False).manifest
    except UserError:
        return None  # the cache was moved or deleted; the report then says overlap was not checked
    split = (m.get("harvest_config") or {}).get("split", HarvestConfig.split)
    return m["corpus"], int(m["n_contexts"]) * int(m["context_length"]), split


def _training_dead(sae: SAE) -> dict:
    """The trainer's dead fraction (no firing in its last dead_window tokens), where the SAE
    records it: a small eval set cannot tell rare latents from dead ones, the trainer's window can."""
    measured = sae.cfg.meta.get("final_eval") or {}
    if "dead_frac" in measured:  # train.measure_saved: the saved weights on a sample of the training cache
        return {"dead_fraction_end_of_training": measured["dead_frac"], "end_of_training_tokens": measured["n_tokens"]}
    final, tc = sae.cfg.meta.get("final_metrics") or {}, sae.cfg.meta.get("train_config") or {}
    if "dead_frac" not in final or "dead_window" not in tc:
        return {}
    if final.get("tokens", 0) < tc["dead_window"]:
        # a run shorter than the window cannot see a latent stay silent for a whole window: its 0 % means nothing
        return {}
    return {"dead_fraction_in_training": final["dead_frac"], "training_dead_window": tc["dead_window"]}


def same_corpus(a: str, b: str, split_a: str = "train", split_b: str = "train") -> bool:
    """Whether corpora a and b are the same text: the same file, or the same hub dataset and split."""
    if Path(a).exists() and Path(b).exists():
        return Path(a).resolve() == Path(b).resolve()
    return a == b and (split_a == split_b or a == DEFAULT_CORPUS or Path(a).suffix != "")  # files have no splits


def _warnings(
    dataset: str, split: str, skip: int, trained_on: tuple[str, int, str] | None, sparse: dict, held_out: dict | None
) -> list[str]:
    w = []
    if trained_on is None:
        w.append("the SAE's training cache was not found, so overlap between training and eval text was not checked")
    elif same_corpus(trained_on[0], dataset, trained_on[2], split) and skip < trained_on[1]:
        w.append(
            f"the eval text overlaps the SAE's training text (its first {trained_on[1]} tokens); "
            f"pass --skip-tokens {trained_on[1]} or held-out text"
        )
    n = sparse["n_tokens"]
    more = (
        f"see the count on {held_out['n_tokens']} tokens of --sparsity-acts"
        if held_out
        else "pass --sparsity-acts with a held-out cache to count on more"
    )
    w.append(f"'dead' means no firing on these {n} tokens; latents rarer than 1 in {n} look dead ({more})")
    return w
