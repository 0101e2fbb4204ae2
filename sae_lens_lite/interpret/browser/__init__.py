"""The offline feature browser: one self-contained HTML page built from an analysis.

The page is template.html with style.css, app.js and the data inlined: no network, no CDN (a
Content-Security-Policy forbids every fetch). The data sits in a <script type="application/json">
block with every "<" written as \\u003c, so no token text (say "</script>") can end the block, and
app.js puts token text into the page with textContent only, so tokens are never parsed as markup.

To stay usable with 40,000 features the data is compact: features are positional arrays (the
field order is FIELDS, mirrored at the top of app.js), token strings are stored once in a vocab
table keyed by token id, and context activations are quantised to 0..99 of the feature's max. The list renders
100 rows at a time as it scrolls; a feature's card is built only when it is opened.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

from sae_lens_lite.interpret.features import Analysis  # the schema of features.json

FIELDS = (
    "id",
    "rank",
    "score",
    "components",
    "frequency",
    "mean_act",
    "max_act",
    "bin_width",
    "hist",
    "top_tokens",
    "promoted",
    "suppressed",
    "examples",
    "explanation",
    "detection",
    "family",
    "quantiles",
    "nearest",
    "model_explanation",
    "steer",
    "sweep",
)
# An example is [center index, activation, [token id ...], [activation 0..99 ...]]; quantiles are
# lists of examples, highest quantile first; detection is [precision, recall, F1, held-out firings,
# held-out tokens matched]; nearest is [[feature id, cosine, explanation], ...]; model_explanation
# is [text, balanced accuracy, AUROC, contexts scored] or null; "steer" is {"strength", "text"}
# from `analyze --steer`, or null; meta.steer holds the prompt. "sweep" is the feature's entry from
# `sae-lite sweep` ({"best_times", "best_strength", "times", "activation", "fluency_cost", "text",
# ...}) or null; meta.sweep holds its settings.


def page_data(analysis: Analysis, max_features: int | None = None) -> dict:
    """The compact form of features.json that the page embeds (best-ranked first)."""
    feats = sorted(analysis["features"], key=lambda f: f["rank"])
    if max_features is not None:
        feats = feats[:max_features]
    used: set[int] = set()
    rows = []
    expl = {f["id"]: f.get("explanation", "") for f in analysis["features"]}
    for f in feats:
        scale = 99 / (f["max_act"] or 1.0)

        def compact(e):
            used.update(e["tokens"])
            return [e["center"], e["act"], e["tokens"], [min(99, int(a * scale + 0.5)) for a in e["acts"]]]

        examples = [compact(e) for e in f["examples"]]
        d = f.get("detection") or {}
        m = f.get("model_explanation")
        lens = f["lens"]["promoted"] + f["lens"]["suppressed"]
        used.update(t for t, _ in f["top_tokens"] + lens)
        rows.append(
            [
                f["id"],
                f["rank"],
                f["score"],
                [f["token_score"], f["context_score"], f["lens_score"], f.get("monosemanticity")],
                f["frequency"],
                f["mean_act"],
                f["max_act"],
                f["hist"]["bin_width"],
                f["hist"]["counts"],
                [[t, round(100 * s, 1)] for t, s in f["top_tokens"]],
                f["lens"]["promoted"],
                f["lens"]["suppressed"],
                examples,
                f.get("explanation", ""),
                [d.get(k) for k in ("precision", "recall", "f1", "fires", "predicted")],
                f.get("family"),
                [[compact(e) for e in q] for q in f.get("quantiles", [])],
                [[i, c, expl.get(i, "")] for i, c in f.get("nearest", [])],
                [m["explanation"], m["balanced_accuracy"], m["auroc"], m["n_scored"]] if m else None,
                f.get("steer"),
                f.get("sweep"),
            ]
        )
    vocab = {str(t): analysis["vocab"].get(str(t), f"<{t}>") for t in sorted(used)}
    meta = {
        k: analysis.get(k)
        for k in ("model", "hook", "sae", "n_tokens", "d_sae", "top_k", "ctx_before", "ctx_after", "heldout")
    }
    meta["n_shown"] = len(rows)
    shown = {f["id"] for f in feats}
    # Families (same explanation) restricted to the features on the page, best family first.
    families = [[f["explanation"], [j for j in f["members"] if j in shown]] for f in analysis.get("families", [])]
    families = [f for f in families if f[1]] if families else [[expl.get(f["id"], ""), [f["id"]]] for f in feats]
    meta["steer"] = analysis.get("steer")
    meta["sweep"] = analysis.get("sweep")
    return {"meta": meta, "fields": FIELDS, "vocab": vocab, "features": rows, "families": families}


def render(data: dict) -> str:
    """The HTML page for `page_data` output."""
    files = resources.files(__name__)
    template = (files / "template.html").read_text(encoding="utf-8")
    css = (files / "style.css").read_text(encoding="utf-8")
    js = (files / "app.js").read_text(encoding="utf-8")
    assert "</script" not in js.lower() and "</style" not in css.lower()
    # "<" → \u003c keeps "</script>" (and "<!--") out of the block; JSON.parse reads it back as "<".
    # U+2028/2029 are escaped too, as every JSON-in-HTML writer does.
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    payload = payload.replace("<", "\\u003c").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    parts = {"/*STYLE*/": css, "/*DATA*/": payload, "/*APP*/": js}
    for marker in parts:
        assert template.count(marker) == 1, marker
    # Split on the markers instead of str.replace, so no inserted text is ever scanned again.
    out, rest = [], template
    for marker in sorted(parts, key=template.index):
        before, rest = rest.split(marker, 1)
        out += [before, parts[marker]]
    return "".join(out + [rest])


def write_page(analysis: Analysis, path: str | os.PathLike, max_features: int | None = None) -> Path:
    """Write the browser page for an analysis (the dict in features.json) atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render(page_data(analysis, max_features)), encoding="utf-8")
    os.replace(tmp, path)
    return path
