"""Run SAEBench's sparse probing on one of our SAEs, offline, next to `sae-lite probe`'s numbers.

SAEBench (`sae-bench` on PyPI) pins numpy<2 and datasets<4, so it gets its own venv; this script
runs in that venv and imports nothing from sae_lens_lite. It calls SAEBench's
`sparse_probing_sae_probes` eval, which wraps the `sae-probes` package: 113+ binary text tasks that
ship inside the sae-probes wheel, so no dataset comes from the Hugging Face hub. (SAEBench's other
probing eval, `sparse_probing`, downloads its datasets from the hub and cannot run offline.)

The model: sae-probes loads it with TransformerLens's
`HookedTransformer.from_pretrained_no_processing(model_name)`, which needs the hub, and
TransformerLens 3.9 does not list SmolLM2 among HookedTransformer's models. This script builds the
HookedTransformer from the local HF copy of the model (the directory `sae-lite` caches under
~/.cache/sae_lens_lite/models), accepting that directory as an official name for the duration of
the call, and hands it to sae-probes' own `ensure_dataset_activations(model=...)`; SAEBench's
`run_eval` then finds the activations cached and never loads a model itself.

Build the venv (once; about 2.4 GB):

    python3 -m venv .saebench-venv
    .saebench-venv/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
    .saebench-venv/bin/pip install sae-bench==0.6.0
    # sae-bench's requirements pull a newer CUDA torch and a torchvision built for it: put the
    # CPU torch back, and drop torchvision (transformers imports it when present, and it fails)
    .saebench-venv/bin/pip install --no-deps --force-reinstall torch==2.13.0 \
        --index-url https://download.pytorch.org/whl/cpu
    .saebench-venv/bin/pip uninstall -y torchvision

Run (our venv for the first two commands, SAEBench's for the third):

    TASKS="5_hist_fig_ismale 21_headline_istrump 92_glue_sst2 105_click_bait 113_movie_sent \
126_art_type_book 149_twt_emotion_happiness 87_glue_cola"
    sae-lite export --sae runs/demo/sae --format saelens --out runs/saebench/export
    sae-lite probe --sae runs/demo/sae --tasks $TASKS --out runs/saebench/ours
    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .saebench-venv/bin/python scripts/check_saebench.py \
        --sae runs/saebench/export --ours runs/saebench/ours/probe.json \
        --work runs/saebench/run --out runs/saebench/saebench.json

It prints a markdown table (per task and the mean: SAEBench's test accuracy per k and its probe on
the full residual stream, then ours per k and our ceiling) and writes it all to --out as JSON.
`--absorption` also runs SAEBench's absorption eval the same way (offline, but about 4.5 hours of
its first step alone on a 2-core CPU: it probes all 47,078 alphabetic tokens of SmolLM2's vocabulary).
Model activations and sae-probes' per-task results are cached under --work, keyed by the SAE's
weights hash, so a rerun with more tasks only computes the new ones (a different --ks needs a
fresh --work: sae-probes skips a task whose result file exists).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import time
import warnings
from importlib.metadata import version
from pathlib import Path

PACKAGES = ["sae-bench", "sae-probes", "sae-lens", "transformer-lens", "transformers", "torch", "scikit-learn"]


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.machine()


def default_model_dir() -> Path:
    """The local HF copy of SmolLM2 that sae-lite made (models.cache_root: $SAE_LITE_CACHE or
    ~/.cache/sae_lens_lite; this venv cannot import sae_lens_lite, so the rule is restated)."""
    models = Path(os.environ.get("SAE_LITE_CACHE", Path.home() / ".cache" / "sae_lens_lite")) / "models"
    found = sorted(models.glob("SmolLM2-135M*"))
    if not found:
        raise SystemExit(f"no local SmolLM2 under {models}: run any sae-lite command once")
    return found[0]


@contextlib.contextmanager
def local_dir_as_official_name(model_dir: str):
    """Let TransformerLens take a local directory where it wants a name from its model list.

    Past the name check it already reads a local directory's config.json, and with `hf_model`
    given it converts those weights instead of downloading any."""
    import transformer_lens.loading_from_pretrained as loading

    original = loading.get_official_model_name
    loading.get_official_model_name = lambda name: name if name == model_dir else original(name)
    try:
        yield
    finally:
        loading.get_official_model_name = original


def load_hooked_transformer(model_dir: Path):
    import torch
    from transformer_lens import HookedTransformer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with local_dir_as_official_name(str(model_dir)):
        return HookedTransformer.from_pretrained_no_processing(
            str(model_dir), hf_model=hf_model, tokenizer=tokenizer, device="cpu"
        )


def load_sae(sae_dir: Path):
    """The SAELens SAE, and a name for it that changes with its weights (results are cached by it)."""
    from sae_lens import SAE

    weights = sae_dir / "sae_weights.safetensors"
    release = f"{sae_dir.name}-{hashlib.sha256(weights.read_bytes()).hexdigest()[:12]}"
    return release, SAE.load_from_disk(str(sae_dir), device="cpu")


def run_absorption(args: argparse.Namespace) -> dict:
    """SAEBench's absorption eval (first-letter spelling over the whole alphabetic vocabulary).

    It loads the model itself by name: given the local directory as the name, TransformerLens
    reads config and weights from it. Its artifacts go to relative paths, hence the chdir."""
    from sae_bench.evals.absorption.eval_config import AbsorptionEvalConfig
    from sae_bench.evals.absorption.main import run_eval

    release, sae = load_sae(args.sae)
    work = args.work / "absorption"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with local_dir_as_official_name(str(args.model)), contextlib.chdir(work):
        results = run_eval(AbsorptionEvalConfig(model_name=str(args.model)), [(release, sae)], "cpu", "eval_results")
    if not results:  # run_eval skips an SAE whose result file exists
        raise SystemExit(f"absorption results already under {work}/eval_results: delete them to rerun")
    (output,) = results.values()
    return {"mean": output["eval_result_metrics"]["mean"], "seconds": round(time.perf_counter() - t0, 1)}


def run_saebench(args: argparse.Namespace) -> dict:
    """SAEBench's sparse_probing_sae_probes eval; returns its per-task accuracies."""
    from sae_bench.evals.sparse_probing_sae_probes.eval_config import SparseProbingSaeProbesEvalConfig
    from sae_bench.evals.sparse_probing_sae_probes.main import run_eval
    from sae_probes.generate_model_activations import ensure_dataset_activations

    release, sae = load_sae(args.sae)
    hook = sae.cfg.metadata.hook_name
    cache = args.work / "model_acts"

    t0 = time.perf_counter()
    ensure_dataset_activations(
        model_name=args.model_label,
        dataset_short_names=args.tasks,
        hook_names=[hook],
        model_cache_path=cache,
        device="cpu",
        model=load_hooked_transformer(args.model),
    )
    t_acts = time.perf_counter() - t0

    config = SparseProbingSaeProbesEvalConfig(
        model_name=args.model_label,
        dataset_names=args.tasks,
        ks=args.ks,
        results_path=str(args.work / "sae_probes"),
        model_cache_path=str(cache),
        include_llm_baseline=not args.no_baseline,
    )
    results = run_eval(
        config, [(release, sae)], device="cpu", output_path=str(args.work / "eval_results"), force_rerun=True
    )
    (output,) = results.values()
    tasks = {}
    for detail in output["eval_result_details"]:
        by_k = detail["sae_metrics_by_k"] or {}
        tasks[detail["dataset_name"]] = {
            "accuracy": {str(k): m["test_accuracy"] for k, m in sorted(by_k.items())},
            "llm_test_accuracy": detail.get("llm_test_accuracy"),
        }
    return {
        "release": release,
        "hook": hook,
        "tasks": tasks,
        "seconds": {"model_activations": round(t_acts, 1), "total": round(time.perf_counter() - t0, 1)},
        "eval_config": output["eval_config"],
    }


def read_ours(path: Path, name: str | None) -> dict:
    """Per-task accuracies from a `sae-lite probe` probe.json."""
    probe = json.loads(path.read_text())
    tasks = {}
    for task, result in probe["tasks"].items():
        saes = result.get("saes") or {}
        names = [n for n in saes if n != "random directions"]
        if not names:  # first_letter and the like
            continue
        chosen = name or names[0]
        tasks[task] = {
            "accuracy": saes[chosen]["accuracy"],
            "ceiling": result.get("ceiling"),
            "n_train": result.get("n_train"),
            "n_test": result.get("n_test"),
        }
    return {"probe_json": str(path), "config": probe.get("config"), "tasks": tasks}


def mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def table(saebench: dict, ours: dict, ks: list[int]) -> str:
    def cell(value: float | None) -> str:
        return "" if value is None else f"{value:.3f}"

    head = [f"SAEBench k={k}" for k in ks] + ["SAEBench LLM"] + [f"ours k={k}" for k in ks] + ["our ceiling"]
    lines = ["| task | " + " | ".join(head) + " |", "| --- " * (len(head) + 1) + "|"]
    rows = {}
    for task, theirs in saebench["tasks"].items():
        mine = ours["tasks"].get(task, {})
        rows[task] = (
            [theirs["accuracy"].get(str(k)) for k in ks]
            + [theirs["llm_test_accuracy"]]
            + [mine.get("accuracy", {}).get(str(k)) for k in ks]
            + [mine.get("ceiling")]
        )
    for task, row in rows.items():
        lines.append(f"| {task} | " + " | ".join(cell(v) for v in row) + " |")
    means = [mean([row[i] for row in rows.values()]) for i in range(len(head))]
    lines.append(f"| mean ({len(rows)} tasks) | " + " | ".join(cell(v) for v in means) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sae", type=Path, required=True, help="SAELens directory from `sae-lite export`")
    parser.add_argument("--ours", type=Path, help="probe.json from `sae-lite probe` on the same SAE")
    parser.add_argument("--ours-name", help="which SAE in probe.json (default: the first)")
    parser.add_argument("--model", type=Path, default=None, help="local HF model directory")
    parser.add_argument("--model-label", default="SmolLM2-135M-Instruct", help="name sae-probes files results under")
    parser.add_argument(
        "--tasks", nargs="+", default=None, help="sae-probes task names (default: the probing tasks in --ours)"
    )
    parser.add_argument("--ks", nargs="+", type=int, default=[1, 2, 5, 20])
    parser.add_argument("--no-baseline", action="store_true", help="skip the probe on the full residual stream")
    parser.add_argument(
        "--absorption", action="store_true", help="also run SAEBench's absorption eval (hours on a CPU)"
    )
    parser.add_argument("--work", type=Path, default=Path("runs/saebench"), help="cache and result directory")
    parser.add_argument("--out", type=Path, default=None, help="JSON to write (default: <work>/check_saebench.json)")
    args = parser.parse_args()
    # sae-probes passes sklearn's deprecated `penalty=`; one warning per fit buries the output
    warnings.filterwarnings("ignore", module="sklearn")
    args.model = (args.model or default_model_dir()).resolve()
    args.sae, args.work = args.sae.resolve(), args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)

    ours = read_ours(args.ours, args.ours_name) if args.ours else {"tasks": {}}
    args.tasks = args.tasks or list(ours["tasks"])
    if not args.tasks:
        raise SystemExit("name the tasks: --tasks, or --ours with a probe.json that probed some")
    saebench = run_saebench(args)
    if args.absorption:
        saebench["absorption"] = run_absorption(args)
    markdown = table(saebench, ours, args.ks)
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "sae": str(args.sae),
        "model": str(args.model),
        "cpu": f"{cpu_name()}, {os.cpu_count()} cores",
        "versions": {p: version(p) for p in PACKAGES},
        "saebench": saebench,
        "ours": ours,
        "table": markdown,
    }
    out = args.out or args.work / "check_saebench.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown)
    if args.absorption:
        print("\nSAEBench absorption (mean over letters):", json.dumps(saebench["absorption"]["mean"]))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
