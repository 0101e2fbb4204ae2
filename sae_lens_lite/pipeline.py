"""Every stage from one run file: harvest → train → evaluate → analyze → export.

The run file (TOML, see configs/demo.toml) has a top-level `out` directory and one table per
stage, holding that stage's config fields. Paths between stages are filled in here, so a run
file only says what differs from the defaults. The whole file is checked (unknown keys, types)
before any stage starts. Each stage then applies the rerun rule (outputs.py): finished work with
the same settings is skipped, work with other settings is refused, and an interrupted stage
resumes. A stage downstream of one that did new work is redone, since its input changed.
"""

from __future__ import annotations

import json
import re
from dataclasses import fields, replace
from pathlib import Path

from .analyze import AnalyzeConfig, analyze
from .config import build
from .errors import UserError
from .evaluate import EvalConfig, evaluate
from .export import ExportConfig, export
from .harvest import HarvestConfig, harvest
from .outputs import RECORD, read_record
from .train import TrainConfig, check_config, train

STAGES = ("harvest", "train", "evaluate", "analyze", "export")
FUNCS = {"harvest": harvest, "train": train, "evaluate": evaluate, "analyze": analyze, "export": export}


def plan(cfg: dict) -> tuple[list[tuple[str, object, Path]], dict[str, Path]]:
    """Every stage's config built and checked up front: [(stage, config, output dir)], paths."""
    unknown = set(cfg) - {"out", "stages", *STAGES}
    if unknown:
        raise UserError(
            f"unknown run-file entries {', '.join(sorted(unknown))}; valid: out, stages, {', '.join(STAGES)}"
        )
    for s in STAGES:
        if not isinstance(cfg.get(s, {}), dict):
            raise UserError(f"{s} in the run file must be a table ([{s}]), not {cfg[s]!r}")
    out = Path(cfg.get("out", "runs/run"))
    stages = cfg.get("stages", list(STAGES))
    bad = set(stages) - set(STAGES)
    if bad:
        raise UserError(f"unknown stage(s) {', '.join(sorted(bad))}; valid: {', '.join(STAGES)}")
    h = build(HarvestConfig, {"out": str(out / "acts"), **cfg.get("harvest", {})}, "harvest")
    if len(h.hooks) != 1:
        raise UserError(
            "a run file trains one SAE: give [harvest] exactly one hook (use `sae-lite harvest` for several)"
        )
    paths = {
        "acts": Path(h.out),
        "sae": out / "sae",
        "eval": out / "eval",
        "analysis": out / "analysis",
        "export": out / "export",
    }
    t = build(TrainConfig, {"acts": str(paths["acts"]), "out": str(paths["sae"]), **cfg.get("train", {})}, "train")
    check_config(t)
    e = build(EvalConfig, {"sae": str(paths["sae"]), "out": str(paths["eval"]), **cfg.get("evaluate", {})}, "evaluate")
    a = build(
        AnalyzeConfig,
        {"sae": str(paths["sae"]), "acts": str(paths["acts"]), "out": str(paths["analysis"]), **cfg.get("analyze", {})},
        "analyze",
    )
    ex = dict(cfg.get("export", {}))
    formats = ex.pop("formats", ["saelens", "dictionary"])
    if not isinstance(formats, list) or not set(formats) <= {"saelens", "dictionary"}:
        raise UserError(f"[export] formats = {formats!r} should be a list of saelens and/or dictionary")
    analysis = str(paths["analysis"]) if "analyze" in stages or (paths["analysis"] / "features.json").exists() else None
    exports = [
        build(
            ExportConfig,
            {
                "sae": str(paths["sae"]),
                "format": f,
                "out": str(paths["export"] / f),
                "analysis": analysis,
                "acts": str(paths["acts"]),
                **ex,
            },
            "export",
            extra=("formats",),
        )
        for f in formats
    ]
    steps = [
        ("harvest", h, paths["acts"]),
        ("train", t, paths["sae"]),
        ("evaluate", e, Path(e.out)),
        ("analyze", a, Path(a.out)),
    ]
    steps += [("export", x, Path(x.out)) for x in exports]
    return [s for s in steps if s[0] in stages], paths


def run_pipeline(cfg: dict) -> dict[str, Path]:
    """Run the stages named in cfg["stages"] (default all); prints a table of them; returns the output paths."""
    steps, paths = plan(cfg)
    rows, changed = [], False
    for name, c, out in steps:
        if changed and hasattr(c, "overwrite"):
            c = replace(c, overwrite=True)  # its input was just made again: its old output is stale
        print(f"== {name}" + (f" {c.format}" if name == "export" else ""))
        before = _stamp(out)
        try:
            FUNCS[name](c)
        except UserError as err:
            raise UserError(f"[{name}] {run_file_advice(str(err), name, type(c))}") from None
        did = _stamp(out) != before
        changed |= did
        rows.append(
            (
                name + (f" {c.format}" if name == "export" else ""),
                "done" if did else "nothing to do",
                str(out),
                _headline(out),
            )
        )
    print(
        "\nrun: "
        + ("every stage was complete already" if not changed else f"{len(rows)} stages")
        + f" ({', '.join(r[0] for r in rows)})"
    )
    w = [max(len(r[i]) for r in rows + [("stage", "status", "output", "")]) for i in range(3)]
    for r in [("stage", "status", "output", "result"), *rows]:
        print(f"  {r[0]:{w[0]}}  {r[1]:{w[1]}}  {r[2]:{w[2]}}  {r[3]}")
    return paths


def _stamp(out: Path):
    """What changes when a stage writes its output: the time of its record (the manifest for a cache)."""
    for name in (RECORD, "manifest.json"):
        if (out / name).exists():
            return (out / name).stat().st_mtime_ns
    return None


def _headline(out: Path) -> str:
    """The stage's result line without its 'stage: path:' prefix."""
    if (out / "manifest.json").exists():
        m = json.loads((out / "manifest.json").read_text())
        return f"{m['n_tokens']:,} rows x {m['d_model']} at {m['hook']}"
    rec = read_record(out)
    line = (rec or {}).get("line", "")
    return line.split(": ", 2)[-1] if line.count(": ") >= 2 else line


def run_file_advice(message: str, stage: str, cls) -> str:
    """A stage's advice in run-file terms: --overwrite becomes train.overwrite=true, --out out, ..."""
    names = {f.name for f in fields(cls)}

    def sub(m: re.Match) -> str:
        key = m.group(1).replace("-", "_")
        if key == "overwrite":
            return f"{stage}.overwrite=true"
        if key == "out":
            return "top-level out"
        return f"{stage}.{key}" if key in names else m.group(0)

    return re.sub(r"(?<![\w-])--([a-z][a-z0-9-]*)", sub, message)
