"""How high can a token or context explanation score? A bound on held-out detection F1.

    python scripts/bench_explain_bound.py --sae runs/demo/sae --acts runs/demo/acts \
        --analysis runs/demo/analysis

The built-in explainer (sae_lens_lite/interpret/explain.py) names a feature by a short list of
tokens, previous tokens, (previous, current) pairs, or a context condition, and is scored by F1 at
predicting, over every held-out token, whether the feature fires (activation > 0). Every token
phrase, and every attribute or token-and-attribute phrase, is a union of cells of one of these
lookup tables (the window kind, "a token within n after X", is not):

    token         the current token (canonical: up to case and spaces, as the explainer)
    pair          (previous token, current token)
    triple        (two tokens back, previous token, current token)
    token+place   (current token, its attribute bits: inside brackets, quotes, indented, ...)

For a sample of live features this script fits each table without a length limit: it takes the
cells in order of their firing rate on the explain split and keeps the prefix with the best
explain-split F1 (the F1-optimal union of cells on that split), then scores it on the held-out
split, which it never looked at: what the best explanation of that kind, however long, reaches on
unseen text. It prints the median over the sampled features of each, of the explainer's own F1
(from --analysis), the tables' figures again with "fires" read as an activation of at least
--strong × the feature's max (weak firings left out of both the fitting and the score), and the
share of firings under 10 % and 25 % of the max. docs/analysis.md quotes its output.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import torch

from sae_lens_lite.data.cache import ActivationCache
from sae_lens_lite.data.models import local_tokenizer
from sae_lens_lite.interpret.analyze import canonical_ids, ordered_batches
from sae_lens_lite.interpret.contexts import previous_tokens, row_attributes
from sae_lens_lite.interpret.explain import heldout_rows
from sae_lens_lite.training.sae import SAE


def firings(sae: SAE, cache: ActivationCache) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every firing of every feature, grouped by feature → (ptr [d_sae + 1], rows, values)."""
    feats, rows, vals = [], [], []
    with torch.no_grad():
        for start, x in ordered_batches(cache, 4096, "cpu"):
            f = sae.encode(x)
            r, c = (f > 0).nonzero(as_tuple=True)
            feats.append(c)
            rows.append(r + start)
            vals.append(f[r, c])
    feat = torch.cat(feats)
    order = feat.argsort(stable=True)
    ptr = np.r_[0, np.cumsum(np.bincount(feat.numpy(), minlength=sae.d_sae))]
    return ptr, torch.cat(rows)[order].numpy(), torch.cat(vals)[order].numpy()


def table_keys(cache: ActivationCache, held: np.ndarray) -> dict[str, np.ndarray]:
    """Per cache row, its cell of each lookup table, as one int64 key."""
    meta = cache.load(("tokens", "doc", "pos"))
    ids, doc, pos = meta["tokens"].long(), meta["doc"].long().numpy(), meta["pos"].long().numpy()
    tok = local_tokenizer(cache.manifest["model"])
    V = len(tok)
    cur = canonical_ids(tok, V)[ids].numpy()
    order = np.lexsort((pos, doc))
    back = previous_tokens(cur, order, doc)[:, :2] + 1  # [n, 2] 0 = none
    used = np.unique(ids.numpy()).tolist()
    text = dict(zip(used, tok.batch_decode([[i] for i in used])))
    bits = row_attributes([text[i] for i in ids.tolist()], order, doc)
    B = V + 1
    return {
        "token": cur,
        "pair": back[:, 0] * B + cur,
        "triple": (back[:, 1] * B + back[:, 0]) * B + cur,
        "token+place": cur * (1 << 24) + bits,
    }


def lookup_f1(keys: np.ndarray, fire: np.ndarray, held: np.ndarray, occ: list[dict]) -> float:
    """Held-out F1 of the explain-split-optimal union of table cells (module docstring)."""
    fe, fh = fire[~held[fire]], fire[held[fire]]
    if len(fe) == 0 or len(fh) == 0:
        return 0.0
    cells, hits = np.unique(keys[fe], return_counts=True)
    seen = np.array([occ[0][k] for k in cells.tolist()])
    by_rate = np.argsort(-hits / seen, kind="stable")
    f1 = 2 * np.cumsum(hits[by_rate]) / (np.cumsum(seen[by_rate]) + len(fe))
    chosen = cells[by_rate[: int(np.argmax(f1)) + 1]]
    tp = int(np.isin(keys[fh], chosen).sum())
    predicted = sum(occ[1].get(k, 0) for k in chosen.tolist())
    return 2 * tp / (predicted + len(fh))


def explainer_f1(analysis: str, feats: np.ndarray) -> tuple[float, float]:
    """The built-in explanations' held-out F1: median over all live features, and over `feats`."""
    a = json.loads((Path(analysis) / "features.json").read_text(encoding="utf-8"))
    f1 = {f["id"]: f["detection"]["f1"] or 0.0 for f in a["features"] if f["frequency"] > 0}
    return statistics.median(f1.values()), statistics.median(f1.get(int(j), 0.0) for j in feats)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sae", required=True, help="SAE directory")
    p.add_argument("--acts", required=True, help="activation cache the analysis read")
    p.add_argument("--analysis", help="its analysis directory (features.json), for the explainer's own F1")
    p.add_argument("--features", type=int, default=300, help="live features sampled (seed 0)")
    p.add_argument("--heldout", type=float, default=0.25, help="held-out share of contexts, as analyze's")
    p.add_argument("--strong", type=float, default=0.2, help="'strong' firing: activation >= this x max")
    a = p.parse_args()

    sae, cache = SAE.load(a.sae).folded(), ActivationCache.open(a.acts)
    held = heldout_rows(cache.load(("doc",))["doc"], a.heldout).numpy()
    ptr, rows, vals = firings(sae, cache)
    tables = table_keys(cache, held)
    occ = {
        name: [dict(zip(*(x.tolist() for x in np.unique(k[held == s], return_counts=True)))) for s in (0, 1)]
        for name, k in tables.items()
    }
    live = np.nonzero(np.diff(ptr))[0]
    feats = np.random.default_rng(0).choice(live, min(a.features, len(live)), replace=False)
    out: dict[str, list[float]] = {}
    for j in feats:
        r, v = rows[ptr[j] : ptr[j + 1]], vals[ptr[j] : ptr[j + 1]]
        out.setdefault("firings under 10 % of max", []).append(float(np.mean(v < 0.1 * v.max())))
        out.setdefault("firings under 25 % of max", []).append(float(np.mean(v < 0.25 * v.max())))
        strong = r[v >= a.strong * v.max()]
        for name, keys in tables.items():
            out.setdefault(f"{name} table, fires > 0", []).append(lookup_f1(keys, r, held, occ[name]))
            out.setdefault(f"{name} table, fires >= {a.strong:g} x max", []).append(
                lookup_f1(keys, strong, held, occ[name])
            )
    print(f"{len(feats)} of {len(live)} live features; {int(held.sum())} of {len(held)} rows held out")
    if a.analysis:
        every, sampled = explainer_f1(a.analysis, feats)
        print(f"{'built-in explainer, fires > 0':40s} median {sampled:.3f} (all live features: {every:.3f})")
    for name, xs in sorted(out.items()):
        print(f"{name:40s} median {statistics.median(xs):.3f} mean {statistics.fmean(xs):.3f}")


if __name__ == "__main__":
    main()
