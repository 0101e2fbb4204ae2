"""The evaluation report's human side: report.md, the density plot, the histogram in report.json.

evaluate.py and metrics.py compute every number; this module only lays them out (definitions:
docs/metrics.md).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from sae_lens_lite.evaluation.metrics import labelled
from sae_lens_lite.fsutil import save_figure_atomic


def density_histogram(freq: Tensor, bins: int = 40) -> dict:
    """Counts of log10 firing frequency freq [d_sae] over the latents that fire, in `bins` equal
    bins from the smallest value to 0 (always firing), and the number that never fire."""
    live = freq[freq > 0].log10()
    if len(live) == 0:
        return {"bin_edges_log10": [], "counts": [], "dead": int((freq == 0).sum())}
    lo = float(live.min())
    counts = torch.histc(live.float(), bins=bins, min=lo, max=0.0)
    edges = torch.linspace(lo, 0.0, bins + 1)
    return {
        "bin_edges_log10": [round(float(e), 4) for e in edges],
        "counts": [int(c) for c in counts],
        "dead": int((freq == 0).sum()),
    }


def plot_density(freq: Tensor, path: Path, title: str, dense_freq: float) -> None:
    """Histogram of log10 firing frequency of the latents that fire at all, with the `dense_freq`
    threshold marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    live = freq[freq > 0].log10().cpu().numpy()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(live, bins=50, color="#4477aa")
    ax.axvline(
        math.log10(dense_freq), color="#cc3311", linestyle="--", linewidth=1, label=f"dense ({100 * dense_freq:g}%)"
    )
    ax.set_xlabel("log10 firing frequency")
    ax.set_ylabel("latents")
    ax.set_title(f"{title}\n{int((freq == 0).sum())} of {len(freq)} latents dead (not shown)", fontsize=9)
    ax.legend(fontsize=8)
    save_figure_atomic(fig, path, dpi=120)


def fmt(v, digits: int = 4) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _se(se: float | None) -> str:
    """' ± SE' (standard error over contexts), or nothing where there is none (older reports)."""
    return "" if se is None else f" ± {se:.4f} (SE over contexts)"


def positions_text(p: dict) -> str:
    """The positions setting in words, e.g. 'not special tokens, not the first 1 of each context'."""
    parts = (["not special tokens"] if p["drop_special"] else []) + (
        [f"not the first {p['drop_first']} of each context"] if p["drop_first"] else []
    )
    parts += [f"norm at most {p['outlier_factor']:g}x the median"] if p["outlier_factor"] else []
    return ", ".join(parts) if parts else "all"


def markdown_summary(r: dict) -> str:
    ce, rec, sp = r["ce"], r["reconstruction"], r["sparsity"]
    lines = [
        f"# SAE evaluation: {r['sae']}",
        "",
        f"{r['model']} at `{r['hook']}`; {r['n_contexts']} contexts of {r['context_length']} tokens from "
        f"`{r['dataset']}` (after skipping {r['skip_tokens']} tokens); {r['n_predictions']} next-token predictions, "
        f"{r['n_activations']} activations. Definitions: docs/metrics.md.",
        *(
            [
                f"Spliced and scored at positions {positions_text(r['positions'])}; tokens "
                f"`{r['footing']['tokens_sha256']}`."
            ]
            if "footing" in r
            else []
        ),
        "",
        "| metric | value |",
        "| --- | --- |",
        f"| CE loss clean / SAE spliced (nats) | {ce['clean']:.4f} / {ce['sae']:.4f}{_se(ce.get('sae_se'))} |",
        f"| CE loss zero-ablated / mean-ablated | {ce['zero_ablation']:.4f} / {ce['mean_ablation']:.4f} |",
        f"| CE loss recovered (vs zero / vs mean ablation) | {fmt(ce['sae_recovered'])} / "
        f"{fmt(ce['sae_recovered_vs_mean'])} |",
        f"| KL(clean ‖ SAE) per token (nats) | {ce['kl_sae']:.4f}{_se(ce.get('kl_sae_se'))} |",
        f"| explained variance / FVU | {fmt(rec['explained_variance'])} / {fmt(rec['fvu'])} |",
        f"| MSE (per element) | {rec['mse']:.6g} |",
        f"| L0 / L1 | {sp['l0']:.2f} / {sp['l1']:.4g} |",
        f"| dead latents | {sp['dead']} of {sp['d_sae']} ({100 * sp['dead_fraction']:.1f}%) |",
        *(
            [
                f"| dead latents in training (no firing in its last {sp['training_dead_window']:,} tokens) | "
                f"{100 * sp['dead_fraction_in_training']:.2f}% |"
            ]
            if "dead_fraction_in_training" in sp
            else []
        ),
        *(
            [
                f"| dead latents at the end of training (no firing on {sp['end_of_training_tokens']:,} "
                "training tokens) | "
                f"{100 * sp['dead_fraction_end_of_training']:.2f}% |"
            ]
            if "dead_fraction_end_of_training" in sp
            else []
        ),
        f"| dense latents (>10% of tokens) | {sp['dense']} ({100 * sp['dense_fraction']:.1f}%) |",
        # the metrics registered with a label (metrics.py)
        *(f"| {label} | {fmt(v)} |" for label, v in labelled(rec, sp).items()),
    ]
    if "sparsity_on_acts" in r:
        h = r["sparsity_on_acts"]
        lines += [
            f"| dead latents on {h['n_tokens']:,} tokens of `{h['acts']}` | {h['dead']} "
            f"({100 * h['dead_fraction']:.2f}%) |",
            f"| dense latents on those tokens / L0 there | {h['dense']} ({100 * h['dense_fraction']:.1f}%) "
            f"/ {h['l0']:.2f} |",
        ]
    if "baselines" in r:
        b = r["baselines"]
        lines += [
            "",
            "## SAE vs PCA vs VAE",
            "",
            f"Baselines fitted on {b['fit_on']}; every row scored on {b['scored_on']} "
            f"(CE clean {b['ce_clean']:.4f}, zero-ablated {b['ce_zero_ablation']:.4f}).",
            "",
            "| method | active dims / token | explained variance | CE loss recovered | CE loss | KL (nats) |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for row in b["rows"]:
            lines.append(
                f"| {row['method']} | {row['active_dims_per_token']:.1f} | {fmt(row['explained_variance'])} | "
                f"{fmt(row['ce_loss_recovered'])} | {row['ce_loss']:.4f} | {row['kl']:.4f} |"
            )
    if r.get("warnings"):
        lines += ["", *[f"- note: {w}" for w in r["warnings"]]]
    if "density" in r["files"]:
        lines += ["", "![feature density](density.png)"]
    return "\n".join(lines) + "\n"
