"""scripts/check_same_run.py, the refactor guard: equal runs pass, and each kind of change is caught."""

import json

from conftest import load_script

same_run = load_script("check_same_run")


def write_run(root, ev=0.9, weights=b"\x00\x01", seconds=1.0):
    (root / "sae").mkdir(parents=True)
    (root / "sae" / "sae.safetensors").write_bytes(weights)
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
    write_run(tmp_path / "b", ev=0.9000001, weights=b"\x00\x02")
    (tmp_path / "b" / "extra.json").write_text("{}")
    assert same_run.compare(tmp_path / "a", tmp_path / "b") == [
        "extra.json: only in after",
        "report.json.ev: 0.9 vs 0.9000001",
        "sae/sae.safetensors: bytes differ",
    ]
