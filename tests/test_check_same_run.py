"""scripts/check_same_run.py, the refactor guard: equal runs pass, and each kind of change is caught."""

import json

import torch
from conftest import load_script
from safetensors.torch import save_file

same_run = load_script("check_same_run")


def write_run(root, ev=0.9, weight=1.0, seconds=1.0):
    (root / "sae").mkdir(parents=True)
    meta = {"source_sae": json.dumps(str(root / "sae")), "d_sae": "4"}  # a path in the metadata, as export writes
    save_file({"W_dec": torch.full((4, 2), weight)}, str(root / "sae" / "sae.safetensors"), metadata=meta)
    (root / "report.md").write_text(f"# SAE evaluation: {root / 'sae'}\n\nin {seconds} s\n")
    report = {"sae": str(root / "sae"), "ev": ev, "timing_s": seconds, "per_context": [1.0, 2.0]}
    (root / "report.json").write_text(json.dumps(report))
    (root / "ranking.csv").write_text("rank,id,score\n1,5,0.9\n")
    (root / "plot.png").write_bytes(bytes([int(seconds)]))


def test_equal_runs_pass_whatever_their_paths_times_and_plots(tmp_path):
    write_run(tmp_path / "a")
    write_run(tmp_path / "b", seconds=7.0)
    assert same_run.compare(tmp_path / "a", tmp_path / "b") == []


def test_a_changed_figure_weights_or_missing_file_is_reported(tmp_path):
    write_run(tmp_path / "a")
    write_run(tmp_path / "b", ev=0.9000001, weight=1.5)
    (tmp_path / "b" / "extra.json").write_text("{}")
    assert same_run.compare(tmp_path / "a", tmp_path / "b") == [
        "extra.json: only in after",
        "report.json.ev: 0.9 vs 0.9000001",
        "sae/sae.safetensors: tensor bytes differ",
    ]
