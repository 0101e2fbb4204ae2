"""Quality and cost of the explanations of one analysis (docs/analysis.md, "Measured").

    python scripts/bench_explain.py runs/analysis

reads runs/analysis/features.json (written by `sae-lite analyze`, with `--explain-top N` for the
model-written part) and prints: distinct explanations among the 100 best-ranked features and
families, median held-out detection F1 of the top 100 and of all live features, the model
explanations' balanced accuracy and AUROC, and the cost per 1,000 features, built in and
model-written, as ratios to pass 1 (streaming the cache through the SAE) measured in the same run.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def main(path: str) -> None:
    a = json.loads((Path(path) / "features.json").read_text(encoding="utf-8"))
    feats = sorted(a["features"], key=lambda f: f["rank"])
    live = [f for f in feats if f["frequency"] > 0]
    f1 = lambda fs: statistics.median(f["detection"]["f1"] or 0.0 for f in fs)  # noqa: E731
    by_id = {f["id"]: f for f in feats}
    heads = [by_id[fam["members"][0]] for fam in a["families"][:100]]
    print(
        f"{len(feats)} features ({len(live)} live) in {len(a['families'])} families; "
        f"{a['heldout']['tokens']} held-out tokens ({a['heldout']['share']:.0%} of the contexts)"
    )
    print(
        f"top 100 features: {len({f['explanation'] for f in feats[:100]})} distinct explanations, median "
        f"held-out F1 {f1(feats[:100]):.3f}"
    )
    print(
        f"top 100 families: {len({f['explanation'] for f in heads})} distinct explanations, median "
        f"held-out F1 {f1(heads):.3f}"
    )
    print(
        f"all live features: median held-out F1 {f1(live):.3f}; F1 >= 0.8 for "
        f"{sum((f['detection']['f1'] or 0) >= 0.8 for f in live)}"
    )
    c, k = a["cost"], len(feats) / 1000
    print(
        f"built in: {c['builtin_explain_cpu_s'] / k:.2f} CPU-s ({c['builtin_explain_s'] / k:.1f} s wall) "
        "per 1,000 features; "
        f"{c['builtin_explain_cpu_s'] / c['pass1_cpu_s']:.2f}x the CPU time of pass 1"
    )
    model = [f["model_explanation"] for f in feats if f.get("model_explanation")]
    if model:
        n = len(model) / 1000
        scored = [m for m in model if m["balanced_accuracy"] is not None]
        print(
            f"model-written ({len(model)} families): {c['model_explain_cpu_s'] / n:.0f} CPU-s "
            f"({c['model_explain_s'] / n:.0f} s wall) "
            "per 1,000 features, "
            f"{c['model_explain_cpu_s'] / len(model) / (c['builtin_explain_cpu_s'] / len(feats)):.0f}x "
            "the built-in cost per feature"
        )
        print(
            f"  balanced accuracy: median {statistics.median(m['balanced_accuracy'] for m in scored):.3f}, "
            f"mean {statistics.mean(m['balanced_accuracy'] for m in scored):.3f}; "
            f"AUROC median {statistics.median(m['auroc'] for m in scored):.3f} ({len(scored)} scored)"
        )
        for f in feats:
            m = f.get("model_explanation")
            if m:
                print(
                    f"  #{f['id']} built in: {f['explanation']} (F1 {f['detection']['f1']}) | model: "
                    f"{m['explanation']!r} "
                    f"(balanced accuracy {m['balanced_accuracy']}, AUROC {m['auroc']})"
                )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/analysis")
