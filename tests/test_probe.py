"""`sae-lite probe` (sae_lens_lite/evaluation/probe.py): one SAE through a labelled task and first_letter on a
tiny model; per-task resume; the rerun rule; the CLI flags."""

import json

import pytest
import torch

from sae_lens_lite.cli import build_parser
from sae_lens_lite.evaluation import probe as probe_mod
from sae_lens_lite.evaluation.probe import FIRST_LETTER, FLOOR, ProbeConfig, probe
from sae_lens_lite.training.sae import SAE, SAEConfig

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture
def setup(tmp_path):
    torch.manual_seed(0)
    sae = SAE(SAEConfig(32, 64, model="tiny", hook=HOOK))
    sae.save(tmp_path / "sae")
    words = ["quick brown fox", "lazy dog", "sparse features", "a dictionary", "the activations", "a direction"]
    rows = [{"text": f"{words[i % 6]} {words[(i * 5) % 6]}", "label": int(i % 6 < 3)} for i in range(60)]
    (tmp_path / "task.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = ProbeConfig(
        sae=str(tmp_path / "sae"),
        tasks=[str(tmp_path / "task.jsonl"), FIRST_LETTER],
        n_train=20,
        n_test=20,
        ks=[1, 2],
        words_per_letter=2,
        device="cpu",
    )
    return cfg, tmp_path


def test_probe_writes_the_table_with_ceiling_floor_and_a_reason_for_absorption(setup, tiny_lm):
    cfg, tmp = setup
    r = probe(cfg, lm=tiny_lm)
    out = tmp / "sae" / "probe"
    assert {"probe.json", "probe.md", "provenance.json"} <= {p.name for p in out.iterdir()}
    acc = r["summary"]["accuracy"]
    assert set(acc) == {"ceiling", "sae", FLOOR}
    assert set(acc["sae"]) == {"1", "2"} and all(0 <= v <= 1 for v in acc["sae"].values())
    task = r["tasks"][cfg.tasks[0]]
    assert task["n_train"] == 20 and task["n_test"] == 20
    # a random tiny model has no first-letter probe: a reason, not a number
    a = r["summary"]["absorption"]["sae"]
    assert a["absorption_fraction"] is None and "letters" in a["reason"]
    md = (out / "probe.md").read_text()
    assert "ceiling" in md and FLOOR in md and "not measured" in md


def test_an_interrupted_run_resumes_per_task(setup, tiny_lm, monkeypatch):
    cfg, tmp = setup
    first = probe(cfg, lm=tiny_lm)
    out = tmp / "sae" / "probe"
    for name in ("probe.json", "probe.md", "provenance.json"):  # as if stopped after the tasks
        (out / name).unlink()

    def no_rerun(*a, **k):
        raise AssertionError("a finished task was run again")

    monkeypatch.setattr(probe_mod, "probing_task", no_rerun)
    monkeypatch.setattr(probe_mod, "first_letter_task", no_rerun)
    again = probe(cfg, lm=tiny_lm)
    assert again["summary"] == first["summary"]
    # other settings: the task files are not reused
    cfg.n_train = 16
    cfg.overwrite = True
    with pytest.raises(AssertionError, match="run again"):
        probe(cfg, lm=tiny_lm)


def test_a_finished_result_is_not_redone(setup, tiny_lm, capsys):
    cfg, _ = setup
    probe(cfg, lm=tiny_lm)
    probe(cfg, lm=tiny_lm)
    assert "nothing to do" in capsys.readouterr().out


def test_cli_maps_tasks_and_ks():
    args = build_parser().parse_args(
        ["probe", "--sae", "s", "--tasks", "113_movie_sent", "first_letter", "--ks", "1", "5"]
    )
    assert args.tasks == ["113_movie_sent", "first_letter"] and args.ks == [1, 5]


def test_compare_probe_gives_each_sae_the_numbers_probe_gives_it(setup, tiny_lm, corpus_file):
    from sae_lens_lite.evaluation.compare import CompareConfig, compare

    cfg, tmp = setup
    torch.manual_seed(1)
    SAE(SAEConfig(32, 64, activation="topk", k=4, model="tiny", hook=HOOK)).save(tmp / "other")
    task = cfg.tasks[0]
    r = compare(
        CompareConfig(
            saes=[cfg.sae, str(tmp / "other")],
            dataset=str(corpus_file),
            tokens=96,
            baselines=False,
            probe=True,
            probe_tasks=[task],
            out=str(tmp / "cmp"),
        ),
        lm=tiny_lm,
    )
    p = r["probing"]["summary"]["accuracy"]
    assert set(p) == {"ceiling", "sae", "other", FLOOR}
    alone = probe(ProbeConfig(sae=cfg.sae, tasks=[task], device="cpu"), lm=tiny_lm)["summary"]["accuracy"]
    assert p["sae"] == alone["sae"] and p[FLOOR] == alone[FLOOR] and p["ceiling"] == alone["ceiling"]
    md = (tmp / "cmp" / "compare.md").read_text()
    assert "## Sparse probing and absorption" in md and "| other |" in md
    assert (tmp / "cmp" / "probing.png").stat().st_size > 0
