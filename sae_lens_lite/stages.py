"""The stages of sae-lite, one line each: the registry that the CLI, run files and `info` read.

A stage is a command that makes an output folder from its inputs. Its module holds its config
(a dataclass whose fields are its flags and its run-file keys, with their help), its function
`run(cfg)`, which ends by printing its result line, and, when it records what it made, its
`outputs.Output` (the rerun rule and the claim of its folder). The line here names them, so that
a new stage is one module and one line:

- `sae-lite --help` lists the stages in this order; each subcommand's flags come from its config;
- `sae-lite run` runs the stages that have a `run_dir`, in this order, each from its table of the
  run file, its inputs wired from the folders of the stages before it (`reads`);
- `sae-lite info` names a folder holding a stage's record, when no format of its own says more.

Modules are named here, and imported only when their stage is used.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sae_lens_lite.outputs import RECORD, read_record


def record_headline(out: Path) -> str:
    """The result line its record keeps, less its 'stage: path:' prefix."""
    line = (read_record(out) or {}).get("line", "")
    return line.split(": ", 2)[-1] if line.count(": ") >= 2 else line


def cache_headline(out: Path) -> str:
    """An activation cache's result, from its manifest (the cache's record; see harvest.py)."""
    from sae_lens_lite.data.cache import MANIFEST

    m = json.loads((out / MANIFEST).read_text())
    return f"{m['n_tokens']:,} rows x {m['d_model']} at {m['hook']}"


def _load(where: str):
    """The object at "module:name", its module imported now (so that --help imports configs only)."""
    module, name = where.split(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Stage:
    name: str  # the subcommand, its run-file table and the "stage" its record names
    help: str  # its line in `sae-lite --help`
    config_at: str  # "module:Class" of its config dataclass
    run_at: str  # "module:function" of run(cfg), which does the work (or finds it done) and prints its line
    # (list field, metavar, help): a field given as arguments, not as a flag (compare's SAEs)
    positional: tuple[str, str, str] | tuple[()] = ()
    run_dir: str | None = None  # its folder under a run file's `out`; None: not run by `sae-lite run`
    reads: tuple[tuple[str, str], ...] = ()  # (config field, run_dir of an earlier stage) wired by `run`
    marker: str = RECORD  # the file written last into its folder: there, the output is complete
    headline: Callable[[Path], str] = record_headline  # its finished folder's result, in a few words

    @property
    def config(self) -> type:
        return _load(self.config_at)

    @property
    def run(self) -> Callable:
        return _load(self.run_at)

    def stamp(self, out: Path) -> int | None:
        """What changes when the stage writes its folder: the time of its marker."""
        return (out / self.marker).stat().st_mtime_ns if (out / self.marker).exists() else None


@dataclass(frozen=True)
class Result:
    """What a stage's run left: its folder, its result line and whether it did new work."""

    stage: str
    out: Path
    headline: str
    did: bool


def run(stage: Stage, cfg, out: Path, function: Callable | None = None) -> Result:
    """Run a stage (its function applies the rerun rule) and read its result from its folder."""
    before = stage.stamp(out)
    (function or stage.run)(cfg)
    return Result(stage.name, out, stage.headline(out), stage.stamp(out) != before)


STAGES: list[Stage] = [
    Stage(
        "harvest",
        "run a model over a corpus and cache activations at hook points",
        "sae_lens_lite.data.harvest:HarvestConfig",
        "sae_lens_lite.data.harvest:harvest",
        run_dir="acts",
        marker="manifest.json",  # the cache's manifest is its record (harvest.py)
        headline=cache_headline,
    ),
    Stage(
        "train",
        "train an SAE on a cached activation set",
        "sae_lens_lite.training.train_config:TrainConfig",
        "sae_lens_lite.training.train:train",
        run_dir="sae",
        reads=(("acts", "acts"),),
    ),
    Stage(
        "evaluate",
        "reconstruction, sparsity and spliced CE loss on held-out text, with PCA/VAE baselines",
        "sae_lens_lite.evaluation.evaluate:EvalConfig",
        "sae_lens_lite.evaluation.evaluate:evaluate",
        run_dir="eval",
        reads=(("sae", "sae"),),
    ),
    Stage(
        "probe",
        "k-sparse probing on labelled text tasks (with ceiling and random floor), first-letter absorption",
        "sae_lens_lite.evaluation.probe:ProbeConfig",
        "sae_lens_lite.evaluation.probe:probe",
    ),
    Stage(
        "analyze",
        "top activations, monosemanticity ranking, logit lens, HTML feature browser",
        "sae_lens_lite.interpret.analyze:AnalyzeConfig",
        "sae_lens_lite.interpret.analyze:analyze",
        run_dir="analysis",
        reads=(("sae", "sae"), ("acts", "acts")),
    ),
    Stage(
        "export",
        "write a feature dictionary or a SAELens-compatible directory",
        "sae_lens_lite.export:ExportConfig",
        "sae_lens_lite.export:export",
        run_dir="export",
        reads=(("sae", "sae"), ("acts", "acts"), ("analysis", "analysis")),
    ),
    Stage(
        "import",
        "convert a SAELens or sparsify SAE into ours",
        "sae_lens_lite.export:ImportConfig",
        "sae_lens_lite.export:import_cmd",
    ),
    Stage(
        "steer",
        "generate with and without a feature added to (or clamped at) the hook",
        "sae_lens_lite.interpret.intervene:SteerConfig",
        "sae_lens_lite.interpret.intervene:steer",
    ),
    Stage(
        "sweep",
        "steering strength against concept and fluency, per feature: table, plots, best strength",
        "sae_lens_lite.interpret.sweep:SweepConfig",
        "sae_lens_lite.interpret.sweep:sweep",
    ),
    Stage(
        "attribute",
        "which features raise or lower the next token's log-probability (activation x gradient, checked by ablation)",
        "sae_lens_lite.interpret.intervene:AttributeConfig",
        "sae_lens_lite.interpret.intervene:attribute",
    ),
    Stage(
        "compare",
        "score several SAEs of one model and hook on the same tokens and positions: a table and a frontier plot",
        "sae_lens_lite.evaluation.compare:CompareConfig",
        "sae_lens_lite.evaluation.compare:compare",
        positional=("saes", "SAE", "SAE directories (trained or imported), or evaluation report.json files"),
    ),
]


def get(name: str) -> Stage | None:
    return next((s for s in STAGES if s.name == name), None)


def run_file_stages() -> list[Stage]:
    """The stages `sae-lite run` runs, in order."""
    return [s for s in STAGES if s.run_dir]
