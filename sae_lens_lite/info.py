"""`sae-lite info PATH`: what a directory written by sae-lite holds, at a glance.

Each kind of directory is read with its own format's reader (cache.py's manifest, SAE.load's
config, the analysis's features.json, the export headers); a folder in none of these formats
that holds the record of a stage of the registry (stages.py) is shown by that stage's result
line. Nothing here writes anything.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from sae_lens_lite import stages
from sae_lens_lite.errors import UserError
from sae_lens_lite.outputs import fingerprint, pct, plural, read_record


def describe(path: str) -> str:
    """A few lines describing the cache, SAE, training run, evaluation, analysis or export at `path`."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{path} not found")
    if p.is_file():
        p = p.parent
    from sae_lens_lite.data.cache import MANIFEST, per_hook_caches
    from sae_lens_lite.evaluation.evaluate import REPORT_FILE
    from sae_lens_lite.export import DICT_HEADER, SAELENS_CFG, SAELENS_WEIGHTS
    from sae_lens_lite.interpret.features import FEATURES_FILE
    from sae_lens_lite.training.sae import CONFIG_FILE, WEIGHTS_FILE
    from sae_lens_lite.training.train import CHECKPOINT

    if (p / MANIFEST).exists():
        lines = _cache(p)
    elif (p / CONFIG_FILE).exists() and (p / WEIGHTS_FILE).exists():
        lines = _sae(p)
    elif (p / CHECKPOINT).exists():
        lines = _training(p)
    elif (p / FEATURES_FILE).exists():
        lines = _analysis(p)
    elif (p / REPORT_FILE).exists():
        lines = _evaluation(p)
    elif (p / DICT_HEADER).exists():
        lines = _dictionary(p)
    elif (p / SAELENS_CFG).exists() and (p / SAELENS_WEIGHTS).exists():
        lines = _saelens(p)
    elif per_hook_caches(p):
        lines = _per_hook_caches(p)
    elif stage := _recorded_stage(p):
        lines = [f"{stage.name} output {p}: {stage.headline(p)}"]
    else:
        raise UserError(
            f"{p} holds nothing sae-lite wrote (no manifest.json, config.json, features.json, report.json, "
            "dictionary.json or SAELens cfg.json); pass a cache, SAE, analysis, evaluation or export directory"
        )
    rec = read_record(p)
    if rec:
        lines.append(
            f"  made by `sae-lite {rec['stage']}` ({rec.get('finished', '?')}, sae_lens_lite "
            f"{rec.get('sae_lens_lite_version', '?')})"
        )
    return "\n".join(lines)


def _recorded_stage(p: Path) -> stages.Stage | None:
    """The stage of the registry (stages.py) whose record `p` holds: a folder in no format above
    is described by its stage's result line."""
    rec = read_record(p)
    stage = rec.get("stage") if rec else None
    return stages.get(stage) if isinstance(stage, str) else None


def _size(p: Path) -> str:
    n = sum(f.stat().st_size for f in p.iterdir() if f.is_file())
    return f"{n / 2**20:,.1f} MiB"


def _cache_state(p: Path, m: dict) -> str:
    """Complete, partial or damaged, from the manifest and which shard files exist. Hashing the
    shards would take minutes on a large cache, so their checksums are left to `cache verify`."""
    per, n_ctx, n_shards = m["contexts_per_shard"], m["n_contexts"], len(m["shards"])
    missing = [s["file"] for s in m["shards"] if not (p / s["file"]).is_file()]
    if missing:
        return (
            f"DAMAGED: {len(missing)} of {n_shards} shards missing ({', '.join(missing[:5])}"
            f"{', ...' if len(missing) > 5 else ''}); run the same harvest command again to repair it"
        )
    if m["complete"]:
        return "complete (shards not verified; `sae-lite cache verify` checks them)"
    want = m.get("max_contexts") or 0
    of = (
        f" of {math.ceil(want / per)} shards ({n_ctx:,} of {want:,} contexts, {pct(n_ctx / want)})"
        if want
        else " shards"
    )
    return f"PARTIAL: {n_shards}{of}; run the same harvest command to finish it"


def _per_hook_caches(p: Path) -> list[str]:
    from sae_lens_lite.data.cache import per_hook_caches, read_manifest

    hooks = per_hook_caches(p)
    lines = [
        f"activation caches {p}, one per hook ({len(hooks)}); pass one of them to train or analyze, "
        f"e.g. --acts {p / hooks[0]}"
    ]
    for h in hooks:
        m = read_manifest(p / h)
        assert m is not None  # per_hook_caches found its manifest
        lines.append(f"  {h}: {_cache_state(p / h, m)}, {m['n_tokens']:,} rows x {m['d_model']} ({m['dtype']})")
    return lines


def _cache(p: Path) -> list[str]:
    from sae_lens_lite.data.cache import read_manifest

    m = read_manifest(p)
    assert m is not None  # describe() found its manifest
    n_ctx, n_shards = m["n_contexts"], len(m["shards"])
    state = _cache_state(p, m)
    f = m.get("filters") or {}
    lines = [
        f"activation cache {p}: {state}",
        f"  {m['model']} at {m['hook']}, corpus {m['corpus']}",
        f"  {m['n_tokens']:,} rows x {m['d_model']} ({m['dtype']}), {n_ctx:,} contexts of "
        f"{m['context_length']} tokens, "
        f"{plural(n_shards, 'shard')}, {_size(p)}",
        f"  filters: drop_special={f.get('drop_special')}, drop_first={f.get('drop_first')}, "
        f"outlier_factor={f.get('outlier_factor')}, "
        f"nonfinite={f.get('nonfinite')}"
        + (f"; {m['nonfinite_rows']:,} non-finite rows dropped" if m.get("nonfinite_rows") else ""),
    ]
    asked = (m.get("harvest_config") or {}).get("tokens")
    if m["complete"] and asked and n_ctx < max(1, asked // m["context_length"]):
        lines.append(
            f"  note: {asked:,} tokens were asked; the corpus held {n_ctx * m['context_length']:,} in whole contexts"
        )
    return lines


def _sae(p: Path) -> list[str]:
    from sae_lens_lite.training.sae import SAE

    sae = SAE.load(p)
    c, meta = sae.cfg, sae.cfg.meta
    prov = c.provenance()
    act = (
        c.architecture if prov["recipe"] in (None, c.activation) else f"{c.architecture} (trained as {prov['recipe']})"
    )
    lines = [
        f"SAE {p}: {act}, d_in {c.d_in} -> d_sae {c.d_sae:,} ({c.d_sae / c.d_in:g}x), input scale "
        f"{float(sae.input_scale):.4g}",
        f"  {c.model} at {c.hook}, context {c.context_length}"
        + (f", corpus {meta['corpus']}" if meta.get("corpus") else ""),
    ]
    if meta.get("acts"):
        lines.append(f"  trained on the cache {meta['acts']} ({meta.get('acts_n_tokens', 0):,} rows)")
    if meta.get("imported_from"):
        src = meta["imported_from"]
        lines.append(
            f"  imported from {src.get('format')} {src.get('path') or src.get('release', '')} "
            f"{src.get('sae_id') or ''}".rstrip()
        )
    tc = meta.get("train_config") or {}
    if tc:
        coefs: dict[Any, str] = {
            "l1": f"l1 {tc.get('l1')}",
            "kl": f"kl_beta {tc.get('kl_beta')}, kl_rho {tc.get('kl_rho')}",
            "jumprelu": f"l0_coef {tc.get('l0_coef')}",
        }
        coef = coefs.get(tc.get("penalty"), f"k {tc.get('k')}")  # the top-k family
        target = f", target_l0 {tc['target_l0']}" if tc.get("target_l0") else ""
        trained = (meta.get("final_metrics") or {}).get("tokens")
        lines.append(
            f"  training: penalty {tc.get('penalty')} ({coef}{target}), lr {tc.get('lr')}, batch "
            f"{tc.get('batch_size'):,}, "
            f"seed {tc.get('seed')}" + (f", {trained:,} tokens" if trained else "")
        )
    fe = meta.get("final_eval")
    if fe:
        lines.append(
            f"  end of training (saved weights, {fe['n_tokens']:,} cache rows): EV {fe['explained_variance']:.3f}, "
            f"L0 {fe['l0']:.1f}, dead {pct(fe['dead_frac'])}"
        )
    from sae_lens_lite.evaluation.evaluate import REPORT_FILE

    for report in (p / "eval" / REPORT_FILE, p.parent / "eval" / REPORT_FILE):
        if report.exists():
            r = json.loads(report.read_text())
            # its own eval/, or a run's sibling eval/ of this SAE (run files name paths relative to where they ran)
            if (
                Path(r.get("sae", "")).resolve() == p.resolve()
                or report.parent.parent == p
                or Path(r.get("sae", "")).name == p.name
            ):
                lines.append(f"  evaluation ({report.parent}): " + _eval_summary(r))
                if _evaluated_other_weights(report.parent, p):
                    lines[-1] = (
                        f"  evaluation ({report.parent}): STALE, of other weights (the SAE was trained again "
                        f"since); run `sae-lite evaluate --sae {p} --overwrite` to evaluate these"
                    )
                break
    return lines


def _evaluated_other_weights(eval_dir: Path, sae_dir: Path) -> bool:
    """Whether the evaluation in eval_dir read other weights than sae_dir holds now: evaluate records
    the sha256 of the weights it read (provenance.json), and a retrained SAE keeps its directory."""
    read = ((read_record(eval_dir) or {}).get("inputs") or {}).get("sae")
    return read is not None and read != fingerprint(sae_dir)


def _eval_summary(r: dict) -> str:
    ce, rec, sp = r["ce"], r["reconstruction"], r["sparsity"]
    ev = rec.get("explained_variance")
    return (
        f"CE loss recovered {ce['sae_recovered']:.3f}, EV {'n/a' if ev is None else f'{ev:.3f}'}, L0 {sp['l0']:.1f}, "
        f"dead {pct(sp['dead_fraction'])} on {sp['n_tokens']:,} tokens of {r['dataset']}"
    )


def _training(p: Path) -> list[str]:
    from sae_lens_lite.training.train import CHECKPOINT

    ck = json.loads((p / CHECKPOINT).read_text())
    if not ck.get("step"):  # stopped before its first checkpoint (train marks --out with a step-0 checkpoint.json)
        every = (ck.get("train_config") or {}).get("checkpoint_every")
        return [
            f"SAE training in progress {p}: no checkpoint yet"
            + (f" (one is saved every {every:,} tokens)" if every else "")
            + "; run the same train command to resume (it starts from the beginning)"
        ]
    return [
        f"SAE training in progress {p}: checkpoint at step {ck['step']:,} ({ck['tokens']:,} tokens); "
        "run the same train command to resume"
    ]


def _evaluation(p: Path) -> list[str]:
    from sae_lens_lite.evaluation.evaluate import REPORT_FILE

    r = json.loads((p / REPORT_FILE).read_text())
    lines = [f"evaluation {p} of the SAE {r['sae']} ({r['model']} at {r['hook']})", "  " + _eval_summary(r)]
    if Path(r["sae"]).is_dir() and _evaluated_other_weights(p, Path(r["sae"])):
        lines.append(f"  STALE: {r['sae']} holds other weights now (trained again since this evaluation)")
    return lines + [f"  note: {w}" for w in r.get("warnings", [])] + [f"  report: {p / 'report.md'}"]


def _analysis(p: Path) -> list[str]:
    from sae_lens_lite.interpret.features import FEATURES_FILE

    a = json.loads((p / FEATURES_FILE).read_text())
    feats = sorted(a["features"], key=lambda f: f.get("rank") or math.inf)
    vocab = a.get("vocab", {})
    never = sum(1 for f in a["features"] if not f.get("frequency"))
    lines = [
        f"analysis {p} of the SAE {a.get('sae')} on {a.get('n_tokens', 0):,} tokens of {a.get('acts')}",
        f"  {a.get('model')} at {a.get('hook')}: {a.get('d_sae', len(feats)):,} features, {never:,} never fire; "
        f"top {a.get('top_k')} examples each",
        "  best-ranked features (rank 1 = best):",
    ]
    for f in feats[:5]:
        top = vocab.get(str(f["top_tokens"][0][0]), "?") if f.get("top_tokens") else "-"
        lines.append(
            f"    rank {f['rank']}: feature {f['id']}, score {f['score']:.3f}, fires on "
            f"{pct(f['frequency'])} of tokens, top token {top!r}" + (" (DENSE)" if f.get("dense") else "")
        )
    n_dense = sum(1 for f in a["features"] if f.get("dense"))
    if n_dense:
        lines.append(
            f"  {plural(n_dense, 'dense feature')} (firing on more than 10% of tokens) ranked after all others"
        )
    if (p / "index.html").exists():
        lines.append(f"  browser: {p / 'index.html'}")
    return lines


def _dictionary(p: Path) -> list[str]:
    from sae_lens_lite.export import DICT_FEATURES, DICT_HEADER
    from sae_lens_lite.training.activations import parse

    h = json.loads((p / DICT_HEADER).read_text())
    with open(p / DICT_FEATURES) as f:
        n = sum(1 for line in f if line.strip())
    act = parse(h["activation"], h.get("k")).label if h.get("activation") else None
    return [
        f"feature dictionary {p}: {h['d_sae']:,} features ({n:,} lines), {act}, d_in {h['d_in']}",
        f"  {h.get('model')} at {h.get('hook')}; from the SAE {h.get('source_sae')} (sha256 "
        f"{str(h.get('source_sae_sha256'))[:12]})",
        f"  analysis: {'yes' if h.get('has_analysis') else 'no'}, firing frequencies: "
        f"{'yes' if h.get('has_frequency') else 'no'}",
    ]


def _saelens(p: Path) -> list[str]:
    from sae_lens_lite.export import SAELENS_CFG, SAELENS_SPARSITY

    c = json.loads((p / SAELENS_CFG).read_text())
    meta = c.get("metadata") or {}
    ours = meta.get("sae_lens_lite") or {}
    lines = [
        f"SAELens directory {p}: architecture {c.get('architecture')}"
        + (f" (k={c['k']})" if c.get("k") else "")
        + f", d_in {c.get('d_in')} -> d_sae {c.get('d_sae'):,}",
        f"  {meta.get('model_name')} at {meta.get('hook_name')}, context {meta.get('context_size')}",
        f"  sparsity file: {'yes' if (p / SAELENS_SPARSITY).exists() else 'no'}",
    ]
    if ours.get("source_sae"):
        lines.append(f"  exported from the SAE {ours['source_sae']} (sha256 {str(ours.get('source_sae_sha256'))[:12]})")
    return lines
