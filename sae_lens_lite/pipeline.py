"""Every stage from one run file: harvest → train → evaluate → analyze → export.

The run file (TOML, see configs/demo.toml) has a top-level `out` directory and one table per
stage, holding that stage's config fields; the stages, their order, their folders and the paths
wired between them are the registry's (stages.py), so a run file only says what differs from
the defaults. The whole file is checked (unknown keys, types) before any stage starts. Each stage
then applies the rerun rule (outputs.py): finished work with the same settings is skipped, work
with other settings is refused, and an interrupted stage resumes. A stage downstream of one that
did new work is redone, since its input changed.
"""

from __future__ import annotations

import math
import re
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Callable

from sae_lens_lite import stages
from sae_lens_lite.config import build
from sae_lens_lite.data.corpus import corpus_tokens
from sae_lens_lite.data.harvest import HarvestConfig
from sae_lens_lite.errors import UserError
from sae_lens_lite.evaluation.evaluate import EvalConfig, same_corpus
from sae_lens_lite.export import ExportConfig
from sae_lens_lite.outputs import plural
from sae_lens_lite.training.train import check_config
from sae_lens_lite.training.train_config import TrainConfig

DEFAULT_OUT = "runs/run"  # where a run file without `out` writes


# A function to run in place of a stage's own (stages.py), by stage name: tests stand in one that
# passes a small model. Empty otherwise.
FUNCS: dict[str, Callable] = {}


def plan(cfg: dict) -> tuple[list[tuple[str, Any, Path]], dict[str, Path]]:
    """Every stage's config built and checked up front: [(stage, config, output dir)], paths."""
    names = [s.name for s in stages.run_file_stages()]
    unknown = set(cfg) - {"out", "stages", *names}
    if unknown:
        raise UserError(
            f"unknown run-file entries {', '.join(sorted(unknown))}; valid: out, stages, {', '.join(names)}"
        )
    for s in names:
        if not isinstance(cfg.get(s, {}), dict):
            raise UserError(f"{s} in the run file must be a table ([{s}]), not {cfg[s]!r}")
    out = Path(cfg.get("out", DEFAULT_OUT))
    chosen = cfg.get("stages", names)
    bad = set(chosen) - set(names)
    if bad:
        raise UserError(f"unknown stage(s) {', '.join(sorted(bad))}; valid: {', '.join(names)}")
    paths = {s.run_dir: out / s.run_dir for s in stages.run_file_stages() if s.run_dir}
    made: dict[str, list] = {}  # each stage's configs, for the plans of the stages after it
    for stage in stages.run_file_stages():
        made[stage.name] = PLANS.get(stage.name, _plan_stage)(stage, cfg, paths, chosen, made)
    steps = [(name, c, Path(c.out)) for name, configs in made.items() for c in configs]
    return [s for s in steps if s[0] in chosen], paths


def _wired(stage: stages.Stage, cfg: dict, paths: dict[str, Path], **values) -> dict:
    """A stage's run-file values: its inputs from the folders of the stages before it, its own
    folder, `values`, and then its table of the run file, which may set any of them."""
    wired = {field: str(paths[src]) for field, src in stage.reads}
    assert stage.run_dir is not None  # a stage of the run file
    return {**wired, "out": str(paths[stage.run_dir]), **values, **cfg.get(stage.name, {})}


def _plan_stage(stage: stages.Stage, cfg: dict, paths: dict[str, Path], chosen: list[str], made: dict) -> list:
    """A stage with nothing to its plan but its wiring."""
    return [_build(stage.config, _wired(stage, cfg, paths), stage.name)]


def _plan_harvest(stage: stages.Stage, cfg: dict, paths: dict[str, Path], chosen: list[str], made: dict) -> list:
    h = _build(HarvestConfig, {"out": str(paths["acts"]), **cfg.get("harvest", {})}, "harvest")
    if len(h.hooks) != 1:
        raise UserError(
            "a run file trains one SAE: give [harvest] exactly one hook (use `sae-lite harvest` for several)"
        )
    paths["acts"] = Path(h.out)
    return [h]


def _plan_train(stage: stages.Stage, cfg: dict, paths: dict[str, Path], chosen: list[str], made: dict) -> list:
    t = _build(TrainConfig, _wired(stage, cfg, paths), "train")
    _in_run_file_terms(lambda: check_config(t), "train", TrainConfig)
    return [t]


def _plan_evaluate(stage: stages.Stage, cfg: dict, paths: dict[str, Path], chosen: list[str], made: dict) -> list:
    h, ev = made["harvest"][0], cfg.get("evaluate", {})
    # evaluate reads the harvest's corpus (held out after the harvested tokens) unless [evaluate] names its own
    e = _build(EvalConfig, _wired(stage, cfg, paths, dataset=h.dataset), "evaluate")
    if same_corpus(e.dataset, h.dataset):  # the harvest's corpus, read the same way
        if "text_column" not in ev:
            e.text_column = h.text_column
        if "split" not in ev:
            e.split = h.split
    if "evaluate" in chosen:
        check_held_out(h, e)
    return [e]


def _plan_export(stage: stages.Stage, cfg: dict, paths: dict[str, Path], chosen: list[str], made: dict) -> list:
    ex = dict(cfg.get("export", {}))
    formats = ex.pop("formats", ["saelens", "dictionary"])
    if not isinstance(formats, list) or not set(formats) <= {"saelens", "dictionary"}:
        raise UserError(f"[export] formats = {formats!r} should be a list of saelens and/or dictionary")
    analysis = str(paths["analysis"]) if "analyze" in chosen or (paths["analysis"] / "features.json").exists() else None
    wired = _wired(stage, {}, paths, analysis=analysis)  # its table (ex) applies to each format's config
    return [
        _build(
            ExportConfig, {**wired, "format": f, "out": str(paths["export"] / f), **ex}, "export", extra=("formats",)
        )
        for f in formats
    ]


# What `sae-lite run` does for a stage beyond wiring its folders (_plan_stage): a harvest trains
# one SAE, train's settings are checked whole, evaluate reads the harvest's corpus, export writes
# each of its formats.
PLANS = {"harvest": _plan_harvest, "train": _plan_train, "evaluate": _plan_evaluate, "export": _plan_export}


def check_held_out(h: HarvestConfig, e: EvalConfig) -> None:
    """Refuse, before any stage, a run whose evaluate would find no text left after training.

    On the harvest's corpus, evaluate skips the tokens the harvest took (or evaluate.skip_tokens),
    and a small corpus is used up: pydoc holds about 113k tokens, a harvest may ask for 200k.
    Without this check the run would fail only after harvesting and training. Checked where
    the corpus's size is cheap to know (a local corpus, a tokenizer on this machine); counting
    stops as soon as there is enough."""
    skip = e.skip_tokens
    if skip == 0 or e.text_column != h.text_column or not same_corpus(e.dataset, h.dataset, e.split, h.split):
        return
    T_h, T_e = h.context_length, e.context_length or h.context_length
    need = 2 if e.baselines and not e.acts else 1  # contexts: baselines fit on one half, score on the other
    limit = (math.ceil((skip if skip is not None else max(h.tokens, T_h)) / T_e) + need) * T_e
    try:
        n = corpus_tokens(h.model, h.dataset, h.split, h.text_column, limit, h.trust_remote_code)
    except UserError as err:
        raise UserError(f"[harvest] {run_file_advice(str(err), 'harvest', HarvestConfig)}") from None
    if n is None or n >= limit or n < T_h:  # unknown, plenty, or too little for the harvest (it says so at once)
        return
    if skip is None:  # what the harvest takes: whole contexts from the start
        skip = min(n // T_h, max(1, h.tokens // T_h)) * T_h
        taken = f"harvest takes {skip:,} of them (harvest.tokens = {h.tokens:,}), which evaluate skips as training text"
    else:
        taken = f"evaluate skips the first {skip:,} (evaluate.skip_tokens)"
    left = n // T_e - math.ceil(skip / T_e)
    if left >= need:
        return
    what = "nothing" if left <= 0 else f"1 context of {T_e} (the baselines need 2: one to fit, one to score)"
    if e.skip_tokens is not None:
        fix = "lower evaluate.skip_tokens"
    else:  # the most the harvest can take and still leave evaluate.tokens (else the least evaluate needs)
        room = (n // T_e - max(need, e.tokens // T_e)) * T_e
        room = room if room >= T_h else (n // T_e - need) * T_e
        fix = f"set harvest.tokens to at most {room // T_h * T_h:,}" if room >= T_h else "use a larger corpus"
    raise UserError(
        f"[evaluate] {e.dataset} holds {n:,} tokens and {taken}, leaving {what} to evaluate on; {fix}, or set "
        "evaluate.dataset to held-out text"
    )


def run_pipeline(cfg: dict) -> dict[str, Path]:
    """Run the stages named in cfg["stages"] (default all); prints a table of them; returns the output paths."""
    steps, paths = plan(cfg)
    if "out" not in cfg:
        print(f'run: the run file sets no `out`; writing under {DEFAULT_OUT} (set out = "..." or pass out=DIR)')
    rows, changed = [], False
    for name, c, out in steps:
        if changed and hasattr(c, "overwrite"):
            c = replace(c, overwrite=True)  # its input was just made again: its old output is stale
        print(f"== {name}" + (f" {c.format}" if name == "export" else ""))
        stage = stages.get(name)
        assert stage is not None  # plan() names only the registry's stages
        r = _in_run_file_terms(lambda: stages.run(stage, c, out, FUNCS.get(name)), name, type(c))
        changed |= r.did
        rows.append(
            (
                name + (f" {c.format}" if name == "export" else ""),
                "done" if r.did else "nothing to do",
                str(out),
                r.headline,
            )
        )
    print(
        "\nrun: "
        + ("every stage was complete already" if not changed else plural(len(rows), "stage"))
        + f" ({', '.join(r[0] for r in rows)})"
    )
    w = [max(len(r[i]) for r in rows + [("stage", "status", "output", "")]) for i in range(3)]
    for r in [("stage", "status", "output", "result"), *rows]:
        print(f"  {r[0]:{w[0]}}  {r[1]:{w[1]}}  {r[2]:{w[2]}}  {r[3]}")
    return paths


def _build(cls, values: dict, stage: str, **kw):
    """config.build, its own checks of the values worded in run-file terms (harvest.tokens, not --tokens)."""
    return _in_run_file_terms(lambda: build(cls, values, stage, **kw), stage, cls)


def _in_run_file_terms(make, stage: str, cls):
    """make(), its UserError prefixed with [stage] and its advice worded in run-file terms."""
    try:
        return make()
    except UserError as err:
        msg = str(err)
        if msg.startswith(f"[{stage}] "):  # build's own messages already name the section
            raise
        raise UserError(f"[{stage}] {run_file_advice(msg, stage, cls)}") from None


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
