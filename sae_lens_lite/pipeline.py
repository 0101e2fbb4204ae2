"""Every stage from one run file: harvest → train → evaluate → analyze → export.

The run file (TOML, see configs/demo.toml) has a top-level `out` directory and one table per
stage, holding that stage's config fields. Paths between stages are filled in here, so a run
file only says what differs from the defaults. Each stage resumes or skips finished work, so
running the same command again after an interruption continues where it stopped.
"""

from __future__ import annotations

from pathlib import Path

from .analyze import AnalyzeConfig, analyze
from .config import build
from .errors import UserError
from .evaluate import EvalConfig, evaluate
from .export import ExportConfig, export
from .harvest import HarvestConfig, harvest
from .train import TrainConfig, train

STAGES = ("harvest", "train", "evaluate", "analyze", "export")


def run_pipeline(cfg: dict) -> dict[str, Path]:
    """Run the stages named in cfg["stages"] (default all); returns the output paths."""
    unknown = set(cfg) - {"out", "stages", *STAGES}
    if unknown:
        raise UserError(f"unknown run-file entries {', '.join(sorted(unknown))}; valid: out, stages, {', '.join(STAGES)}")
    out = Path(cfg.get("out", "runs/run"))
    stages = cfg.get("stages", list(STAGES))
    bad = set(stages) - set(STAGES)
    if bad:
        raise UserError(f"unknown stage(s) {', '.join(sorted(bad))}; valid: {', '.join(STAGES)}")
    h = build(HarvestConfig, {"out": str(out / "acts"), **cfg.get("harvest", {})}, "harvest")
    if len(h.hooks) != 1:
        raise UserError("a run file trains one SAE: give [harvest] exactly one hook (use `sae-lite harvest` for several)")
    paths = {"acts": Path(h.out), "sae": out / "sae", "eval": out / "eval", "analysis": out / "analysis", "export": out / "export"}
    # Every stage's settings are checked before the first stage runs: a typo in [export] should
    # not surface after an hour of harvesting and training.
    t = build(TrainConfig, {"acts": str(paths["acts"]), "out": str(paths["sae"]), **cfg.get("train", {})}, "train")
    ev = build(EvalConfig, {"sae": str(paths["sae"]), "out": str(paths["eval"]), "overwrite": True, **cfg.get("evaluate", {})}, "evaluate")
    an = build(AnalyzeConfig, {"sae": str(paths["sae"]), "acts": str(paths["acts"]), "out": str(paths["analysis"]), **cfg.get("analyze", {})}, "analyze")
    ex = dict(cfg.get("export", {}))
    formats = ex.pop("formats", ["saelens", "dictionary"])
    exports = {fmt: build(ExportConfig, {"sae": str(paths["sae"]), "format": fmt, "out": str(paths["export"] / fmt), "acts": str(paths["acts"]), **ex}, "export")
               for fmt in formats}  # fmt: skip

    if "harvest" in stages:
        print(f"== harvest {h.hooks[0]} of {h.model} on {h.dataset}")
        harvest(h)
    if "train" in stages:
        print("== train")
        train(t)
    if "evaluate" in stages:
        report, weights = paths["eval"] / "report.json", paths["sae"] / "sae.safetensors"
        if report.exists() and weights.exists() and report.stat().st_mtime >= weights.stat().st_mtime:
            print(f"== evaluate: done already ({report}; delete it to evaluate again)")
        else:
            print("== evaluate")
            evaluate(ev)
    if "analyze" in stages:
        print("== analyze")
        analyze(an)
    if "export" in stages:
        for fmt, e in exports.items():
            print(f"== export {fmt}")
            if e.analysis is None and (paths["analysis"] / "features.json").exists():
                e.analysis = str(paths["analysis"])
            export(e)
    return paths
