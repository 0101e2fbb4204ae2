"""Docs that name report.json keys must name the keys the code writes (docs/metrics.md)."""

import re
from pathlib import Path

import torch

from sae_lens_lite.evaluation.evaluate import EvalConfig, _training_dead, evaluate
from sae_lens_lite.training.sae import SAE, SAEConfig

METRICS = (Path(__file__).resolve().parents[1] / "docs" / "metrics.md").read_text()
DOCUMENTED = set(re.findall(r"`([A-Za-z_][A-Za-z0-9_.]*)`", METRICS))


def _sae(meta: dict | None = None) -> SAE:
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=32, d_sae=64, model="tiny", hook="blocks.0.hook_resid_post", context_length=16))
    with torch.no_grad():
        for p in (sae.W_enc, sae.W_dec):
            p.copy_(torch.randn_like(p) / 32**0.5)
    sae.cfg.meta.update(meta or {})
    return sae


def test_the_training_dead_fraction_keys_are_the_documented_ones():
    measured = _sae({"final_eval": {"dead_frac": 0.01, "n_tokens": 32768}})
    logged = _sae({"final_metrics": {"dead_frac": 0.02, "tokens": 2_000_000}, "train_config": {"dead_window": 10**6}})
    for sae in (measured, logged):
        keys = set(_training_dead(sae))
        assert keys and keys <= DOCUMENTED, keys - DOCUMENTED
    assert _training_dead(measured) == {"dead_fraction_end_of_training": 0.01, "end_of_training_tokens": 32768}
    assert "no firing on 32,768 training tokens" in METRICS  # report.md's wording, quoted by the docs


def test_every_report_json_key_is_documented(tiny_lm, corpus_file, tmp_path):
    path = _sae({"final_eval": {"dead_frac": 0.0, "n_tokens": 512}}).save(tmp_path / "sae")
    r = evaluate(EvalConfig(sae=str(path), dataset=str(corpus_file), tokens=64), lm=tiny_lm)
    named = {
        "report.json": set(r),
        "sparsity": set(r["sparsity"]),
        "reconstruction": set(r["reconstruction"]),
        "density_histogram": set(r["density_histogram"]),
        "baselines": set(r["baselines"]),
        "baselines.rows": set().union(*map(set, r["baselines"]["rows"])),
        "timing_s": set(),  # described in words
    }
    for where, keys in named.items():
        missing = {k for k in keys if k not in DOCUMENTED and f"ce.{k}" not in DOCUMENTED}
        assert not missing, f"{where}: {sorted(missing)} not in docs/metrics.md"
    missing = {k for k in r["ce"] if f"ce.{k}" not in DOCUMENTED and k not in DOCUMENTED}
    assert not missing, f"ce: {sorted(missing)} not in docs/metrics.md"
