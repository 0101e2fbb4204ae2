"""Compare SAEs on the same footing: one run, the same tokens and positions, one table and a frontier plot.

    SAEs (one model, one hook) → eval contexts → activations at the hook, once → per SAE:
    reconstruction and sparsity; PCA and VAE reference curves fitted once → per batch: the clean
    forward once, then each SAE, both ablations and each baseline spliced in
    → compare.json, compare.md, frontier.png

Every number is evaluate's, computed by metrics.py (definitions: docs/metrics.md); what is new is
the sharing. Evaluating N SAEs one by one runs the model load, the activation pass, the clean
forward and both ablations N times; here they run once, and only the spliced forward is paid per SAE.

Given evaluation reports (report.json) instead of SAE directories, compare lays out their numbers
if their footings agree, and otherwise says which settings differ.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from sae_lens_lite.config import opt
from sae_lens_lite.data.corpus import check_context_length, position_filters
from sae_lens_lite.data.models import LoadedModel, hook_point, load_model
from sae_lens_lite.errors import UserError
from sae_lens_lite.evaluation.baselines import fit_baselines, vae_activity
from sae_lens_lite.evaluation.evaluate import (
    REPORT_FILE,
    EvalConfig,
    check_fit_cache,
    fit_activations,
    footing,
    footing_differences,
    hook_activations,
    same_corpus,
    split_contexts,
    training_text,
)
from sae_lens_lite.evaluation.metrics import (
    ce_kl_sums,
    ce_summary,
    labelled,
    paired_difference,
    sae_pass,
    score_reconstruction,
    standard_error,
)
from sae_lens_lite.evaluation.probe import FIRST_LETTER, compare_markdown, compare_probing
from sae_lens_lite.evaluation.probing import DEFAULT_TASKS
from sae_lens_lite.evaluation.report import fmt, positions_text
from sae_lens_lite.fsutil import claim_out_dir, save_figure_atomic, write_json_atomic, write_text_atomic
from sae_lens_lite.runtime import resolve_device
from sae_lens_lite.training.sae import CONFIG_FILE, SAE

OUR_FILES = ("compare.json", "compare.md", "frontier.png", "probing.png", "probing")
MAX_IN_LINE = 4  # SAEs whose figures the result line spells out
_EVAL = EvalConfig()  # the positions defaults are evaluate's, so that both score the same positions


@dataclass
class CompareConfig:
    saes: list[str] = opt(
        [], "SAE directories (from train, or import of a SAELens/sparsify SAE), or evaluation report.json files"
    )
    model: str | None = opt(None, "model to splice the SAEs into; default: the model they name")
    dataset: str = opt(
        "pydoc",
        "evaluation text (a .txt/.jsonl/.json/.parquet/.csv file, a directory of .txt, 'pydoc' or a hub id), held out "
        "from every SAE's training",
    )
    text_column: str = opt("text", "column holding the text in .jsonl/.json/.parquet/.csv/hub corpora")
    split: str = opt("train", "split of a hub dataset (e.g. test; local files and pydoc have one)")
    tokens: int = opt(16384, "evaluation tokens, in whole contexts")
    skip_tokens: int | None = opt(
        None,
        "skip the corpus's first tokens (rounded up to whole contexts); default: the most any SAE's "
        "training cache took from this corpus, else 0",
    )
    context_length: int | None = opt(None, "tokens per context; default: the SAEs' training context length")
    drop_special: bool = opt(
        _EVAL.drop_special, "leave BOS/EOS/pad positions unspliced and unscored (as evaluate and harvest do by default)"
    )
    drop_first: int = opt(
        _EVAL.drop_first,
        "leave the first N positions of every context unspliced and unscored (as evaluate and harvest do by default)",
    )
    outlier_factor: float = opt(
        _EVAL.outlier_factor,
        "also leave positions whose activation norm exceeds this multiple of the median norm over the eval "
        "text (0 = none)",
    )
    batch_size: int = opt(8, "contexts per forward")
    device: str = opt("auto", "cpu, cuda, or auto")
    baselines: bool = opt(
        True,
        "PCA and VAE reference curves at powers of two spanning the SAEs' L0 (every row is then scored on "
        "the second half of the eval contexts unless --acts is given)",
    )
    acts: str | None = opt(
        None, "activation cache at the same hook to fit the baselines on; default: the first half of the eval contexts"
    )
    out: str = opt("runs/compare", "directory for compare.json, compare.md and frontier.png")
    overwrite: bool = opt(False, "replace an existing comparison in --out")
    # sae-lite probe's suite on every SAE (probe.py): finished tasks are kept in <out>/probing and resume
    probe: bool = opt(False, "also k-sparse probing (with ceiling and floor) and absorption: a table and probing.png")
    probe_tasks: list[str] = opt([*DEFAULT_TASKS, FIRST_LETTER], "the tasks for --probe (as sae-lite probe --tasks)")


def compare(cfg: CompareConfig, lm: LoadedModel | None = None) -> dict:
    """Score every SAE in cfg.saes on the same tokens and positions; write the table and the plot."""
    if not cfg.saes:
        raise UserError("nothing to compare: pass SAE directories (or report.json files)")
    if all(_is_report(p) for p in cfg.saes):
        return compare_reports(cfg)
    if any(_is_report(p) for p in cfg.saes):
        raise UserError("pass either SAE directories or report.json files to compare, not both")
    if cfg.tokens < 1 or (cfg.skip_tokens or 0) < 0 or cfg.batch_size < 1:
        raise UserError("--tokens and --batch-size must be positive and --skip-tokens non-negative")
    times, t0 = {}, time.perf_counter()
    filters = position_filters(cfg)
    device = resolve_device(cfg.device)
    paths = _names(cfg.saes)
    saes = {name: SAE.load(path, device).eval().requires_grad_(False) for name, path in paths.items()}
    model_name, hook, d_in = _same_model_and_hook(saes, cfg)
    lengths = {s.cfg.context_length for s in saes.values() if s.cfg.context_length is not None}
    if cfg.context_length is None and len(lengths) > 1:
        raise UserError(
            f"the SAEs were trained on contexts of {sorted(lengths)} tokens; pass --context-length to "
            "evaluate all on one"
        )
    T = cfg.context_length or (lengths.pop() if lengths else 128)
    check_fit_cache(cfg, hook, d_in)
    out = claim_out_dir(cfg.out, cfg.overwrite, "compare.json", OUR_FILES, "a comparison")
    lm = _model_for(lm, model_name, hook, d_in, T, device)
    skip = cfg.skip_tokens if cfg.skip_tokens is not None else _held_out_skip(cfg, saes)
    contexts, n_fit = split_contexts(lm, cfg, T, skip)  # [n_ctx, T]
    times["load"] = time.perf_counter() - t0

    # the activations at the hook, once for every SAE
    t = time.perf_counter()
    x, row_ctx, keep = hook_activations(lm, cfg, contexts, hook, filters, device)
    xs = x[row_ctx >= n_fit]  # [n_score, d_in], what every row is scored on
    rows = {name: _sae_row(name, paths[name], sae, xs) for name, sae in saes.items()}
    methods = {name: _reconstruct(sae) for name, sae in saes.items()}
    times["activations_and_saes"] = time.perf_counter() - t

    t = time.perf_counter()
    if cfg.baselines:
        fit_x = x[row_ctx < n_fit] if not cfg.acts else fit_activations(cfg.acts, hook, d_in, device)
        methods |= _baseline_rows(rows, fit_x, xs, d_in)
    times["baselines_fit"] = time.perf_counter() - t

    # the model's loss: the clean forward once per batch, then each method spliced in
    t = time.perf_counter()
    mean = x.mean(0)  # [d_in], the mean-ablation value (as evaluate's: over every evaluated position)
    interventions = {**methods, "zero_ablation": torch.zeros_like, "mean_ablation": lambda a: mean.expand_as(a)}
    saes_in_order = [name for name, row in rows.items() if row["kind"] == "sae"]
    all_sums = ce_kl_sums(
        lm.model, contexts[n_fit:], keep[n_fit:], hook, interventions, 0, cfg.batch_size, device, saes_in_order
    )
    ce = ce_summary(all_sums["all"], list(methods))
    _add_ce(rows, ce, all_sums["contexts"], saes_in_order[0])
    times["ce_kl"] = time.perf_counter() - t

    result: dict[str, Any] = {
        "footing": footing(lm, hook, cfg.dataset, skip, contexts, filters, len(x)),
        "scored_on": f"eval contexts {n_fit}..{len(contexts) - 1}"
        + (f" (0..{n_fit - 1} fitted the baselines)" if n_fit else ""),
        "baselines_fit_on": (f"activation cache {cfg.acts}" if cfg.acts else f"eval contexts 0..{n_fit - 1}")
        if cfg.baselines
        else None,
        "n_scored_activations": len(xs),
        "n_predictions": int(all_sums["all"]["n"]),
        "ce": {k: ce[k] for k in ("clean", "zero_ablation", "mean_ablation", "kl_zero_ablation", "kl_mean_ablation")},
        "saes": [r for r in rows.values() if r["kind"] == "sae"],
        "baselines": [r for r in rows.values() if r["kind"] != "sae"],
        "config": asdict(cfg),
    }
    if cfg.probe:
        t = time.perf_counter()
        l0s: dict[str, float] = {r["name"]: r["active_dims_per_token"] for r in result["saes"]}
        result["probing"] = compare_probing(lm, saes, l0s, cfg.probe_tasks, out, device)
        times["probing"] = time.perf_counter() - t
    times["total"] = time.perf_counter() - t0
    result["timing_s"] = times
    _write(result, out)
    return result


def _model_for(lm: LoadedModel | None, model_name: str, hook: str, d_in: int, T: int, device) -> LoadedModel:
    """The model the SAEs are spliced into, checked to have their hook, their width and contexts of T tokens."""
    if lm is None:
        lm = load_model(model_name, device)
    hook_point(lm.model, hook)
    if lm.d_model != d_in:
        raise UserError(
            f"the SAEs read {d_in}-dim activations but {lm.name} has d_model {lm.d_model}; pass the right --model"
        )
    check_context_length(lm, T)
    return lm


def _held_out_skip(cfg: CompareConfig, saes: dict[str, SAE]) -> int:
    """The default --skip-tokens: the most any SAE's training cache took from cfg.dataset, so that
    the eval text is held out from every SAE's training text."""
    took = [t[1] for t in map(training_text, saes.values()) if t and same_corpus(t[0], cfg.dataset, t[2], cfg.split)]
    return max(took, default=0)


def _sae_row(name: str, path: str, sae: SAE, xs: Tensor) -> dict:
    """One SAE's row before its CE and KL: what it is, and its figures (metrics.sae_pass) on xs [n, d_in]."""
    scored = sae_pass(sae, xs)
    return {
        "name": name,
        "kind": "sae",
        "path": str(path),
        **sae.cfg.provenance(),
        "d_sae": sae.d_sae,
        "active_dims_per_token": scored.sparsity["l0"],
        **scored.reconstruction,
        "sparsity": scored.sparsity_json(),
    }


def _reconstruct(sae: SAE) -> Callable[[Tensor], Tensor]:
    return lambda a: sae(a).x_hat


def _baseline_rows(rows: dict, fit_x: Tensor, xs: Tensor, d_in: int) -> dict[str, Callable[[Tensor], Tensor]]:
    """PCA and VAE curves spanning the SAEs' L0, fitted on fit_x and scored on xs: their rows are
    added to `rows`, their reconstruct functions returned."""
    methods: dict[str, Callable[[Tensor], Tensor]] = {}
    mean = xs.mean(0)  # the SAE rows' mean (sae_pass's), so that every row's EV is relative to the same one
    for k, (pca, vae) in fit_baselines(
        fit_x, curve_sizes([r["active_dims_per_token"] for r in rows.values()], d_in)
    ).items():
        methods[f"pca_{k}"], methods[f"vae_{k}"] = pca.reconstruct, vae.reconstruct
        for name, fn, active in (
            (f"pca_{k}", pca.reconstruct, {"active_dims_per_token": float(k)}),
            (f"vae_{k}", vae.reconstruct, vae_activity(vae, xs)),
        ):
            rows[name] = {"name": name, "kind": name.split("_")[0], **active, **score_reconstruction(fn, xs, mean=mean)}
    return methods


def _add_ce(rows: dict, ce: dict, per_context: dict, first: str) -> None:
    """Each row's CE loss, CE loss recovered and KL; an SAE's also with its standard error and its
    paired difference from the first SAE (every SAE is scored on the same contexts)."""
    for name, row in rows.items():
        row.update(
            ce_loss=ce[name],
            ce_loss_recovered=ce[f"{name}_recovered"],
            ce_loss_recovered_vs_mean=ce[f"{name}_recovered_vs_mean"],
            kl=ce[f"kl_{name}"],
        )
        if row["kind"] == "sae":
            row.update(
                kl_se=standard_error(per_context[f"kl_{name}"]),
                kl_vs_first=None
                if name == first
                else paired_difference(per_context[f"kl_{name}"], per_context[f"kl_{first}"]),
            )


def curve_sizes(l0s: list[float], d_in: int) -> list[int]:
    """Sizes k of the PCA/VAE reference curves: the powers of two from the one at or below the
    smallest L0 to the one at or above the largest (capped at d_in), so the curves span every SAE."""
    lo, hi = math.floor(math.log2(max(1.0, min(l0s)))), math.ceil(math.log2(max(1.0, max(l0s))))
    return sorted({min(d_in, 2**i) for i in range(lo, hi + 1)})


def compare_reports(cfg: CompareConfig) -> dict:
    """The table and plot of finished evaluations (report.json files), refused unless every
    report's footing (model, hook, tokens, positions) equals the first's."""
    if cfg.probe:
        raise UserError("--probe needs SAE directories, not report.json files")
    paths = [_report_path(p) for p in cfg.saes]
    reports = [json.loads(p.read_text()) for p in paths]
    for p, r in zip(paths[1:], reports[1:]):
        if diff := footing_differences(reports[0], r):
            raise UserError(
                f"{p} is not comparable with {paths[0]}: {'; '.join(diff)}; evaluate them with the same "
                "settings, or run sae-lite compare on the SAE directories"
            )
    out = claim_out_dir(cfg.out, cfg.overwrite, "compare.json", OUR_FILES, "a comparison")
    names = _names([str(p.parent.parent if p.parent.name == "eval" else p.parent) for p in paths])
    rows = []
    for name, r in zip(names, reports):
        ce = r["ce"]
        rows.append(
            {
                "name": name,
                "kind": "sae",
                "path": r["sae"],
                # absent from reports written before evaluate recorded them
                **{k: r.get(k) for k in ("source", "recipe", "architecture")},
                "active_dims_per_token": r["sparsity"]["l0"],
                **r["reconstruction"],
                "ce_loss": ce["sae"],
                "ce_loss_recovered": ce["sae_recovered"],
                "ce_loss_recovered_vs_mean": ce["sae_recovered_vs_mean"],
                "kl": ce["kl_sae"],
                "kl_se": ce.get("kl_sae_se"),  # absent from reports written before it existed
                "kl_vs_first": None
                if r is reports[0]
                else paired_difference(*(x.get("per_context", {}).get("kl_sae", []) for x in (r, reports[0]))),
                "sparsity": r["sparsity"],
                "d_sae": r["sparsity"]["d_sae"],
            }
        )
    ce = reports[0]["ce"]
    result = {
        "footing": reports[0]["footing"],
        "scored_on": f"all {reports[0]['n_contexts']} eval contexts (from the reports)",
        "baselines_fit_on": None,
        "n_scored_activations": reports[0]["n_activations"],
        "n_predictions": reports[0]["n_predictions"],
        "ce": {k: ce[k] for k in ("clean", "zero_ablation", "mean_ablation", "kl_zero_ablation", "kl_mean_ablation")},
        "saes": rows,
        "baselines": [],
        "config": asdict(cfg),
        "reports": [str(p) for p in paths],
    }
    _write(result, out)
    return result


# ---- inputs -------------------------------------------------------------------------------


def _is_report(p: str) -> bool:
    path = Path(p)
    return (path.is_file() and path.suffix == ".json") or (
        path.is_dir() and (path / REPORT_FILE).exists() and not (path / CONFIG_FILE).exists()
    )


def _report_path(p: str) -> Path:
    path = Path(p)
    return path if path.is_file() else path / REPORT_FILE


def _names(paths: list[str]) -> dict[str, str]:
    """A short unique label per SAE: its directory name, with parents added until labels differ."""
    parts = [Path(p).resolve().parts for p in paths]
    for depth in range(1, max(map(len, parts)) + 1):
        names = ["/".join(q[-depth:]) for q in parts]
        if len(set(names)) == len(names):
            return dict(zip(names, paths))
    raise UserError(f"an SAE is listed twice: {' '.join(paths)}")


def _same_model_and_hook(saes: dict[str, SAE], cfg: CompareConfig) -> tuple[str, str, int]:
    """The model, hook and activation width d_in every SAE shares; refuses SAEs of another model or
    hook. d_sae may differ (a width sweep): every row is scored with its own SAE's latents."""
    first = next(iter(saes))
    for name, sae in saes.items():
        if not sae.cfg.hook:
            raise UserError(f'{name}/config.json names no hook; set "hook" there to where the SAE was trained')
        a, b = saes[first].cfg, sae.cfg
        if (a.model, a.hook, a.d_in) != (b.model, b.hook, b.d_in) and not (
            cfg.model and a.hook == b.hook and a.d_in == b.d_in
        ):
            raise UserError(
                f"{name} is an SAE of {b.model} at {b.hook} (d_in {b.d_in}), {first} of {a.model} at "
                f"{a.hook} (d_in {a.d_in}); "
                "compare SAEs of one model and one hook (pass --model if the names differ for one model)"
            )
    model, hook = cfg.model or saes[first].cfg.model, saes[first].cfg.hook
    if not model:
        raise UserError(f"{first}/config.json names no model; pass --model")
    if not hook:
        raise UserError(f'{first}/config.json names no hook; set "hook" there to where the SAE was trained')
    return model, hook, saes[first].d_in


# ---- outputs ------------------------------------------------------------------------------


def _write(result: dict, out: Path) -> None:
    plot_frontier(result, out / "frontier.png")
    result["files"] = {"table": "compare.md", "data": "compare.json", "plot": "frontier.png"}
    write_text_atomic(out / "compare.md", markdown_table(result))
    write_json_atomic(out / "compare.json", result)  # last: its presence marks a finished comparison
    print(result_line(result, out / "compare.md"))


def result_line(r: dict, table: Path) -> str:
    """compare's last line: where the table is, and each SAE's headline figures (the first few)."""
    figures = [
        f"{s['name']} L0 {s['active_dims_per_token']:.1f}, EV {fmt(s['explained_variance'], 3)}, "
        f"CE loss recovered {fmt(s['ce_loss_recovered'], 3)}, KL {s['kl']:.4f}"
        for s in r["saes"][:MAX_IN_LINE]
    ]
    more = f"; {len(r['saes']) - MAX_IN_LINE} more in the table" if len(r["saes"]) > MAX_IN_LINE else ""
    return (
        f"compare: {table}: {len(r['saes'])} SAE{'s' if len(r['saes']) != 1 else ''} on "
        f"{r['n_scored_activations']:,} activations: {'; '.join(figures)}{more}"
    )


def markdown_table(r: dict) -> str:
    f, ce = r["footing"], r["ce"]
    added = list(labelled({}, {}))
    lines = [
        "# SAE comparison",
        "",
        f"{f['model']} at `{f['hook']}`; {f['n_contexts']} contexts of {f['context_length']} tokens from "
        f"`{f['dataset']}` "
        f"(after skipping {f['skip_tokens']} tokens; tokens `{f['tokens_sha256']}`), spliced and scored at positions "
        f"{positions_text(f['positions'])}. Every row scored on {r['scored_on']}: "
        f"{r['n_scored_activations']} activations, "
        f"{r['n_predictions']} predictions, CE clean {ce['clean']:.4f}, zero-ablated {ce['zero_ablation']:.4f}, "
        f"mean-ablated {ce['mean_ablation']:.4f} nats. Definitions: docs/metrics.md.",
        "",
        "| SAE | source | recipe | architecture | d_sae | L0 | explained variance | CE loss recovered | KL (nats) | "
        f"KL − {r['saes'][0]['name']}'s (paired) | CE loss | dead on these tokens |"
        + "".join(f" {label} |" for label in added),  # the metrics registered with a label (metrics.py)
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |" + " --- |" * len(added),
    ]
    for s in r["saes"]:
        kl = f"{s['kl']:.4f}" + (f" ± {s['kl_se']:.4f}" if s.get("kl_se") is not None else "")
        d = s.get("kl_vs_first")
        vs = "" if d is None or d["se"] is None else f"{d['mean']:+.4f} ± {d['se']:.4f}"
        lines.append(
            f"| {s['name']} | {s.get('source') or ''} | {s.get('recipe') or ''} | {s.get('architecture') or ''} | "
            f"{s['d_sae']} | "
            f"{s['active_dims_per_token']:.1f} | "
            f"{fmt(s['explained_variance'])} | {fmt(s['ce_loss_recovered'])} | {kl} | {vs} | {s['ce_loss']:.4f} | "
            f"{100 * s['sparsity']['dead_fraction']:.1f}% |"
            + "".join(f" {fmt(v)} |" for v in labelled(s, s["sparsity"]).values())
        )
    lines += [
        "",
        "± is a standard error over the scored contexts. The paired column is each SAE's KL minus the "
        "first's, context by context: the contexts' own spread cancels, so a difference larger than "
        "about twice its error is resolved by these tokens.",
    ]
    if r["baselines"]:
        lines += [
            "",
            f"Reference curves, fitted on {r['baselines_fit_on']}:",
            "",
            "| method | active dims / token | explained variance | CE loss recovered | KL (nats) | CE loss |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for b in r["baselines"]:
            lines.append(
                f"| {b['name']} | {b['active_dims_per_token']:.1f} | {fmt(b['explained_variance'])} | "
                f"{fmt(b['ce_loss_recovered'])} | {b['kl']:.4f} | {b['ce_loss']:.4f} |"
            )
    if "plot" in r["files"]:
        lines += ["", "![frontier](frontier.png)"]
    if "probing" in r:
        lines += compare_markdown(r["probing"], f["model"], f["hook"])
    return "\n".join(lines) + "\n"


def plot_frontier(r: dict, path: Path) -> None:
    """L0 against explained variance, CE loss recovered and KL: one point per SAE, PCA and VAE as
    curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    panels = [
        ("explained_variance", "explained variance"),
        ("ce_loss_recovered", "CE loss recovered (vs zero ablation)"),
        ("kl", "KL(clean ‖ spliced), nats"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, (key, label) in zip(axes, panels):
        for kind, style in (
            ("pca", dict(color="#999999", marker="s", linestyle="--")),
            ("vae", dict(color="#66aa55", marker="^", linestyle=":")),
        ):
            pts = sorted(
                (b["active_dims_per_token"], b[key]) for b in r["baselines"] if b["kind"] == kind and b[key] is not None
            )
            if pts:
                ax.plot(*zip(*pts), label=kind.upper(), markersize=4, linewidth=1, **style)
        for i, s in enumerate(r["saes"]):
            if s[key] is not None:
                ax.scatter(s["active_dims_per_token"], s[key], color=f"C{i % 10}", zorder=3, label=s["name"])
        ax.set_xscale("log", base=2)  # ticks at the reference curves' sizes
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("L0 (active dims per token)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    f = r["footing"]
    fig.suptitle(
        f"{f['model']} {f['hook']}: {r['n_scored_activations']} activations of {f['dataset']}, positions "
        f"{positions_text(f['positions'])}",
        fontsize=9,
    )
    save_figure_atomic(fig, path)
