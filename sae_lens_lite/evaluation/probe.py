"""`sae-lite probe`: judge a dictionary as the field does, by sparse probing and absorption.

    SAE → its model, its hook → per task (resumable: one JSON file each under <out>/tasks/):
        a labelled text task: k-sparse probing accuracy (probing.py) for the SAE, next to the
        ceiling (every dimension of the activations) and the floor (random directions)
        first_letter: absorption and feature splitting (absorption.py)
    → probe.json, probe.md

`compare --probe` runs the same tasks for several SAEs on one model pass per task (suite_tasks)
and adds their columns and a plot of accuracy against L0 (probing_markdown, plot_probing).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from sae_lens_lite.config import check_numbers, opt
from sae_lens_lite.data.models import LoadedModel, hook_point, load_model
from sae_lens_lite.errors import UserError
from sae_lens_lite.evaluation.absorption import (
    WORDS_PER_DRAW,
    absorption_scores,
    first_letter_data,
    letter_labels,
    vocabulary_words,
    word_activations,
)
from sae_lens_lite.evaluation.probing import (
    DEFAULT_TASKS,
    KS,
    Encode,
    balanced_split,
    check_task,
    dense_probe,
    k_sparse_probe,
    load_task,
    random_dictionary,
    text_activations,
)
from sae_lens_lite.fsutil import save_figure_atomic, write_json_atomic, write_text_atomic
from sae_lens_lite.outputs import Output, report_folder, settings_of
from sae_lens_lite.runtime import resolve_device
from sae_lens_lite.training.sae import SAE

FIRST_LETTER = "first_letter"
FLOOR = "random directions"
OUR_FILES = ("probe.json", "probe.md", "provenance.json", "tasks")
OUTPUT = Output(  # outputs.py
    "probe", report_folder("probe.json", OUR_FILES, "a probing result"), inputs=("sae",), skip=("sae", "batch_size")
)


@dataclass
class ProbeConfig:
    sae: str = opt("runs/sae", "SAE directory to judge (config.json + sae.safetensors)")
    model: str | None = opt(None, "model the SAE reads; default: the model named in the SAE's config")
    tasks: list[str] = opt(
        [*DEFAULT_TASKS, FIRST_LETTER],
        "tasks: sae-probes task names (e.g. 113_movie_sent; pip install --no-deps sae-probes), local "
        ".csv/.jsonl/.json/.parquet files, hub dataset ids, and first_letter (absorption and splitting)",
    )
    text_column: str = opt("text", "column holding the text in task files and hub datasets")
    label_column: str = opt("label", "column holding the binary label in task files and hub datasets")
    split: str = opt("train", "split of a hub dataset task")
    n_train: int = opt(256, "texts per task to choose latents and fit probes on (half of each class)")
    n_test: int = opt(256, "held-out texts per task to score the probes on (half of each class)")
    max_tokens: int = opt(128, "tokens read from each text (its beginning; SAEBench's context length)")
    ks: list[int] = opt(list(KS), "numbers of latents k the sparse probes use")
    words_per_letter: int = opt(40, "first_letter: vocabulary words per first letter (a quarter held out)")
    batch_size: int = opt(64, "texts per forward (sorted by length, so little of it is padding)")
    seed: int = opt(0, "seed of the task splits, the word sample and the random-direction floor")
    device: str = opt("auto", "cpu, cuda, or auto")
    out: str | None = opt(None, "directory for probe.json and probe.md; default: <sae>/probe")
    overwrite: bool = opt(False, "redo every task and replace the result in --out")

    def __post_init__(self):
        check_numbers(self, n_train="positive", n_test="positive", max_tokens="positive", batch_size="positive")
        if not self.tasks:
            raise UserError("--tasks is empty: name at least one task")
        if not self.ks or min(self.ks) < 1:
            raise UserError(f"--ks must be positive integers, got {self.ks}")
        for spec in self.tasks:
            if spec != FIRST_LETTER:
                check_task(spec)  # a mistyped name is refused before the model loads


def probe(cfg: ProbeConfig, lm: LoadedModel | None = None) -> dict:
    """Run every task of cfg.tasks on the SAE in cfg.sae; write probe.json and probe.md; return the result."""
    cfg.__post_init__()
    device = resolve_device(cfg.device)
    sae = SAE.load(cfg.sae, device).eval().requires_grad_(False)
    run = OUTPUT.start(cfg, cfg.out or Path(cfg.sae) / "probe")
    if (done := run.done()) is not None:  # the rerun rule (outputs.py)
        return json.loads((run.out / "probe.json").read_text()) if (run.out / "probe.json").exists() else done
    out = run.claim()
    if cfg.overwrite:
        shutil.rmtree(out / "tasks", ignore_errors=True)
    t0 = time.perf_counter()
    lm = lm or _model_for(sae, cfg.model, device)
    tasks = suite_tasks(lm, {Path(cfg.sae).name: sae}, cfg, out / "tasks", device)
    summary = summarise(tasks, cfg.ks)
    result = {
        "sae": cfg.sae,
        "model": lm.name,
        "hook": sae.cfg.hook,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "tasks": tasks,
        "summary": summary,
        "config": asdict(cfg),
        "timing_s": time.perf_counter() - t0,
    }
    write_text_atomic(out / "probe.md", probing_markdown(result))
    write_json_atomic(out / "probe.json", result)
    name = Path(cfg.sae).name
    run.finish(summary, f"probe: {out / 'probe.md'}: " + headline(summary, name))
    return result


def headline(s: dict, name: str) -> str:
    parts = []
    if s["n_tasks"]:
        accs = s["accuracy"][name]
        parts.append(
            f"k-sparse probing over {s['n_tasks']} tasks "
            + ", ".join(f"k={k} {accs[str(k)]:.3f}" for k in list(accs)[:2])
            + f" (ceiling {s['accuracy']['ceiling']:.3f}, floor "
            + ", ".join(f"k={k} {v:.3f}" for k, v in list(s["accuracy"][FLOOR].items())[:2])
            + ")"
        )
    if name in s.get("absorption", {}):
        a = s["absorption"][name]
        parts.append(
            a["reason"]
            if a["absorption_fraction"] is None
            else f"absorption {a['absorption_fraction']:.3f}, split latents {a['split_latents']:.2f}"
        )
    return "; ".join(parts)


def _model_for(sae: SAE, model: str | None, device) -> LoadedModel:
    if not sae.cfg.hook:
        raise UserError('the SAE\'s config.json names no hook; set "hook" there to where it was trained')
    name = model or sae.cfg.model
    if not name:
        raise UserError("the SAE's config.json names no model; pass --model")
    lm = load_model(name, device)
    hook_point(lm.model, sae.cfg.hook)
    if lm.d_model != sae.d_in:
        raise UserError(f"the SAE reads {sae.d_in}-dim activations but {lm.name} has {lm.d_model}; pass --model")
    return lm


# ---- the tasks ----------------------------------------------------------------------------


def suite_tasks(lm: LoadedModel, saes: dict[str, SAE], cfg: ProbeConfig, where: Path, device) -> dict:
    """Each task's result for every SAE (one model pass per task), read from `where` when a
    finished task file with the same settings and SAEs is there, written there otherwise."""
    where.mkdir(parents=True, exist_ok=True)
    key = settings_of(cfg, ("sae", "tasks", "batch_size"))
    prints = {name: fingerprint_sae(s) for name, s in saes.items()}
    results = {}
    bar = tqdm(cfg.tasks, desc="probe: tasks", unit="task", dynamic_ncols=True)
    for spec in bar:
        bar.set_postfix_str(spec)
        path = where / (_safe(spec) + ".json")
        if path.exists():
            old = json.loads(path.read_text())
            if old.get("settings") == key and old.get("saes_sha") == prints:
                results[spec] = old["result"]
                continue
        t = time.perf_counter()
        if spec == FIRST_LETTER:
            r = first_letter_task(lm, saes, cfg, device)
        else:
            r = probing_task(lm, saes, spec, cfg, device)
        r["seconds"] = time.perf_counter() - t
        write_json_atomic(path, {"settings": key, "saes_sha": prints, "result": r})
        results[spec] = r
    bar.close()
    return results


def fingerprint_sae(sae: SAE) -> str:
    """What the SAE computes, hashed: a task file is reused only for the same weights."""
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(sae.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def probing_task(lm: LoadedModel, saes: dict[str, SAE], spec: str, cfg: ProbeConfig, device) -> dict:
    """One labelled task: the ceiling, each SAE's and the floor's k-sparse accuracies."""
    task = load_task(spec, cfg.text_column, cfg.label_column, cfg.split)
    tr, te = balanced_split(task.labels, cfg.n_train, cfg.n_test, cfg.seed)
    if min(len(tr), len(te)) < 4:
        raise UserError(f"task {spec} has too few texts of each class for a train and a test split")
    hook = next(iter(saes.values())).cfg.hook
    assert hook is not None  # checked with the model: _model_for, compare's _same_model_and_hook
    order = torch.cat([tr, te])
    acts = text_activations(lm, hook, [task.texts[i] for i in order], cfg.max_tokens, cfg.batch_size, 1, device)
    has = torch.bincount(acts.text, minlength=acts.n_texts) > 0  # texts of one token have none left
    y = task.labels[order]
    is_tr = torch.arange(len(order)) < len(tr)
    a, b = has & is_tr, has & ~is_tr
    x = acts.pool()
    out: dict[str, Any] = {
        "task": task.name,
        "classes": list(task.classes),
        "n_train": int(a.sum()),
        "n_test": int(b.sum()),
        "ceiling": dense_probe(x[a], y[a], x[b], y[b]),
        "saes": {},
    }
    center = acts.x[torch.isin(acts.text, a.nonzero()[:, 0])].mean(0)  # the training tokens' mean
    encoders: dict[str, Encode] = {name: s.encode for name, s in saes.items()}
    for d_sae in sorted({s.d_sae for s in saes.values()}):
        floor = random_dictionary(lm.d_model, d_sae, center, cfg.seed)
        encoders[FLOOR if len({s.d_sae for s in saes.values()}) == 1 else f"{FLOOR} ({d_sae})"] = floor
    for name, encode in encoders.items():
        with torch.inference_mode():
            f = acts.pool(encode)  # [n_texts, d_sae]
        r = k_sparse_probe(f[a], y[a], f[b], y[b], cfg.ks)
        out["saes"][name] = {"accuracy": {str(k): v for k, v in r["accuracy"].items()}, "latents": r["latents"]}
    return out


def first_letter_task(lm: LoadedModel, saes: dict[str, SAE], cfg: ProbeConfig, device) -> dict:
    """Absorption and splitting for each SAE on the same words and activations."""
    hook = next(iter(saes.values())).cfg.hook
    assert hook is not None  # checked with the model: _model_for, compare's _same_model_and_hook
    words = vocabulary_words(lm.tokenizer, cfg.words_per_letter, cfg.seed)
    x = word_activations(lm, hook, words, 10, WORDS_PER_DRAW, cfg.seed, device).to(device)
    y = letter_labels(words).to(device)
    out: dict[str, Any] = {"n_words": len(words), "saes": {}}
    for name, sae in saes.items():
        data = first_letter_data(x, y, sae.encode, seed=cfg.seed)
        decoder = (sae.W_dec / sae.input_scale).detach()  # each latent's direction in the model's units
        r = absorption_scores(data, decoder)
        out["saes"][name] = r
    return out


def _safe(spec: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in spec.replace("/", "__"))


# ---- the summary and the report -----------------------------------------------------------


def summarise(tasks: dict, ks: list[int]) -> dict:
    """Mean accuracy over the probing tasks per SAE (and ceiling, floor) and k; absorption per SAE."""
    probing = [r for spec, r in tasks.items() if spec != FIRST_LETTER]
    acc: dict = {}
    if probing:
        acc["ceiling"] = sum(r["ceiling"] for r in probing) / len(probing)
        for name in probing[0]["saes"]:
            acc[name] = {str(k): sum(r["saes"][name]["accuracy"][str(k)] for r in probing) / len(probing) for k in ks}
    out = {"n_tasks": len(probing), "accuracy": acc}
    if FIRST_LETTER in tasks:
        out["absorption"] = {
            name: {
                k: r.get(k)
                for k in ("absorption_fraction", "full_absorption_rate", "split_latents", "n_letters_counted", "reason")
            }
            for name, r in tasks[FIRST_LETTER]["saes"].items()
        }
    return out


def probing_markdown(r: dict) -> str:
    """probe.md: the summary table (SAE, floor, ceiling) and the per-task accuracies."""
    s, ks = r["summary"], r["config"]["ks"]
    lines = ["# Sparse probing and absorption", "", preamble(r["model"], r["hook"]), "", *summary_table(s, ks)]
    names = [n for n in s["accuracy"] if n != "ceiling"]
    if s["n_tasks"]:
        lines += ["", f"Per task (k={ks[0]}):", ""]
        lines += ["| task | train / test | ceiling | " + " | ".join(names) + " |", "| --- " * (3 + len(names)) + "|"]
        for spec, t in r["tasks"].items():
            if spec != FIRST_LETTER:
                accs = " | ".join(f"{t['saes'][n]['accuracy'][str(ks[0])]:.3f}" for n in names)
                lines.append(f"| {t['task']} | {t['n_train']} / {t['n_test']} | {t['ceiling']:.3f} | {accs} |")
    return "\n".join(lines) + "\n"


def preamble(model: str, hook: str) -> str:
    return (
        f"{model} at `{hook}`. Each text's activations are averaged over its tokens (the SAE's latents encoded "
        "per token, then averaged; special tokens and the first position left out); accuracies are on held-out "
        "texts, half of each class, averaged over the tasks. Absorption: SAEBench's first-letter task. "
        "Definitions: docs/metrics.md."
    )


def summary_table(s: dict, ks: list[int], l0s: dict[str, float] | None = None) -> list[str]:
    """One row per SAE, then the floor and the ceiling: mean k-sparse accuracy per k, absorption."""
    absorb = s.get("absorption", {})
    l0 = ["L0"] if l0s else []
    head = ["", *l0, *(f"k={k}" for k in ks), "absorption fraction", "full absorption", "split latents / letter"]
    lines = ["| " + " | ".join(head) + " |", "| --- " * len(head) + "|"]
    names = [n for n in s["accuracy"] if n != "ceiling"] or list(absorb)
    for n in names:
        a = absorb.get(n) or {}
        cells = [n, *([f"{l0s[n]:.1f}" if n in l0s else ""] if l0s else [])]
        cells += [f"{s['accuracy'][n][str(k)]:.3f}" if n in s["accuracy"] else "" for k in ks]
        if a.get("absorption_fraction") is not None:
            cells += [
                f"{a['absorption_fraction']:.3f}",
                f"{a['full_absorption_rate']:.3f}",
                f"{a['split_latents']:.2f}",
            ]
        else:
            cells += ["n/a" if a else ""] * 3
        lines.append("| " + " | ".join(cells) + " |")
    if "ceiling" in s["accuracy"]:
        c = f"{s['accuracy']['ceiling']:.3f}"
        lines.append(
            "| " + " | ".join(["ceiling: probe on every dimension", *[""] * len(l0), *[c] * len(ks)]) + " | | | |"
        )
    lines.append("")
    lines += [f"Absorption of {n} not measured: {a['reason']}." for n, a in absorb.items() if a.get("reason")]
    return lines


def compare_probing(lm: LoadedModel, saes: dict[str, SAE], l0s: dict[str, float], tasks: list[str], out: Path, device):
    """`compare --probe`: the suite for every SAE on one model pass per task; its plot in out/probing.png."""
    cfg = ProbeConfig(tasks=tasks, device=str(device))
    results = suite_tasks(lm, saes, cfg, out / "probing", device)
    summary = summarise(results, cfg.ks)
    if summary["n_tasks"]:
        points = [(n, l0s[n], summary["accuracy"][n]) for n in saes]
        plot_probing(points, summary, cfg.ks, out / "probing.png")
    return {"tasks": results, "summary": summary, "config": asdict(cfg), "l0": l0s}


def compare_markdown(p: dict, model: str, hook: str) -> list[str]:
    """compare.md's section for `compare --probe`."""
    lines = ["", "## Sparse probing and absorption", "", preamble(model, hook), ""]
    lines += summary_table(p["summary"], p["config"]["ks"], p["l0"])
    if p["summary"]["n_tasks"]:
        lines += ["![probing accuracy against L0](probing.png)"]
    return lines


def plot_probing(points: list[tuple[str, float, dict]], summary: dict, ks: list[int], path: Path) -> None:
    """Mean k-sparse probing accuracy against L0: one point per SAE and k, the ceiling and floor as lines.
    points: (name, L0, {k: accuracy})."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    shown = [k for k in (1, 5) if k in ks] or ks[:2]  # the k the field reports most (SAEBench: 1, 2, 5)
    for j, k in enumerate(shown):
        ax.scatter([p[1] for p in points], [p[2][str(k)] for p in points], color=f"C{j}", label=f"SAEs, k={k}")
        floor = [v[str(k)] for n, v in summary["accuracy"].items() if n.startswith(FLOOR)]
        if floor:
            ax.axhline(sum(floor) / len(floor), color=f"C{j}", linestyle=":", label=f"random directions, k={k}")
    for name, l0, acc in points:
        ax.annotate(name, (l0, acc[str(shown[0])]), fontsize=7, xytext=(3, -9), textcoords="offset points")
    ax.axhline(summary["accuracy"]["ceiling"], color="black", linestyle="--", label="all dims (ceiling)")
    ax.set_xlabel("L0 (active latents per token)")
    ax.set_ylabel(f"k-sparse probing accuracy (mean of {summary['n_tasks']} tasks)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure_atomic(fig, path)
