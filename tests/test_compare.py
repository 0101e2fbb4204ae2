import json

import pytest
import torch

from sae_lens_lite.cli import main
from sae_lens_lite.errors import UserError
from sae_lens_lite.evaluation.compare import CompareConfig, compare, curve_sizes
from sae_lens_lite.evaluation.evaluate import EvalConfig, evaluate
from sae_lens_lite.export import import_sae, save_saelens
from sae_lens_lite.training.sae import SAE, SAEConfig

HOOK = "blocks.0.hook_resid_post"


def _random_sae(
    path, seed: int, activation: str = "relu", model: str = "tiny", hook: str = HOOK, d: int = 32, d_sae: int = 64
):
    torch.manual_seed(seed)
    sae = SAE(
        SAEConfig(
            d_in=d,
            d_sae=d_sae,
            activation=activation,
            k=8 if activation == "topk" else None,
            model=model,
            hook=hook,
            context_length=16,
        )
    )
    with torch.no_grad():
        for p in (sae.W_enc, sae.W_dec):
            p.copy_(torch.randn_like(p) / d**0.5)
        sae.b_enc.copy_(torch.randn(d_sae) * 0.05)
        sae.b_dec.copy_(torch.randn(d) * 0.1)
        sae.input_scale.fill_(0.7)  # folded into the weights on export: the round trip must undo nothing twice
    return sae.save(path)


def _through_saelens(native, tmp_path):
    """Our SAELens export, loaded and saved again by SAELens itself when it is installed, then imported."""
    exported = save_saelens(SAE.load(native), tmp_path / "saelens_export", source=native)
    try:
        from sae_lens import SAE as SAELensSAE
    except ImportError:
        src = exported
    else:
        src = tmp_path / "saelens_resaved"
        SAELensSAE.load_from_disk(str(exported), device="cpu").save_model(str(src))
    return import_sae(src).save(tmp_path / "imported")


def test_native_and_saelens_round_trip_score_identically_in_one_run(tiny_lm, corpus_file, tmp_path):
    native = _random_sae(tmp_path / "native", 0)
    imported = _through_saelens(native, tmp_path)
    topk = _random_sae(tmp_path / "topk", 1, "topk")
    out = tmp_path / "cmp"
    r = compare(
        CompareConfig(
            saes=[str(native), str(imported), str(topk)],
            dataset=str(corpus_file),
            tokens=128,
            batch_size=3,
            out=str(out),
        ),
        lm=tiny_lm,
    )
    rows = {s["name"]: s for s in r["saes"]}
    assert set(rows) == {"native", "imported", "topk"} and rows["imported"]["source"] == "imported (saelens)"
    a, b = rows["native"], rows["imported"]
    for key in ("explained_variance", "mse", "ce_loss", "ce_loss_recovered", "kl"):
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
    assert a["active_dims_per_token"] == b["active_dims_per_token"] and a["sparsity"]["dead"] == b["sparsity"]["dead"]
    assert a["kl"] > 0 and rows["topk"]["active_dims_per_token"] == 8
    # every row scored on the second half of 8 contexts; baselines fitted on the first half
    assert r["scored_on"].startswith("eval contexts 4..7") and r["n_predictions"] == 4 * 15
    assert r["footing"]["positions"] == {"drop_special": True, "drop_first": 1, "outlier_factor": 0.0}
    sizes = curve_sizes([s["active_dims_per_token"] for s in r["saes"]], 32)
    assert {b["name"] for b in r["baselines"]} == {f"{kind}_{k}" for k in sizes for kind in ("pca", "vae")}
    md = (out / "compare.md").read_text()
    assert (
        "| native | unknown |  | relu | 64 |" in md
        and "| imported | imported (saelens) |  | relu | 64 |" in md
        and "| pca_" in md
    )
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "compare.json").read_text())["saes"][0]["kl"] == r["saes"][0]["kl"]
    with pytest.raises(UserError, match="overwrite"):
        compare(
            CompareConfig(saes=[str(native), str(topk)], dataset=str(corpus_file), tokens=128, out=str(out)), lm=tiny_lm
        )


def test_compare_scores_what_evaluate_scores(tiny_lm, corpus_file, tmp_path):
    """Without baselines every row is scored on all eval contexts: the numbers are evaluate's headline."""
    sae = _random_sae(tmp_path / "s", 2)
    other = _random_sae(tmp_path / "t", 3, "topk")
    r = compare(
        CompareConfig(
            saes=[str(sae), str(other)], dataset=str(corpus_file), tokens=96, baselines=False, out=str(tmp_path / "c")
        ),
        lm=tiny_lm,
    )
    e = evaluate(EvalConfig(sae=str(sae), dataset=str(corpus_file), tokens=96, baselines=False), lm=tiny_lm)
    row = r["saes"][0]
    assert row["ce_loss"] == pytest.approx(e["ce"]["sae"], rel=1e-9) and row["kl"] == pytest.approx(
        e["ce"]["kl_sae"], rel=1e-9
    )
    assert row["explained_variance"] == pytest.approx(e["reconstruction"]["explained_variance"], rel=1e-9)
    assert r["ce"]["zero_ablation"] == pytest.approx(e["ce"]["zero_ablation"], rel=1e-9)
    assert r["footing"] == e["footing"] and r["baselines"] == []


def test_mixed_model_or_hook_is_refused_with_one_line(tmp_path, capsys):
    a = _random_sae(tmp_path / "a", 0)
    b = _random_sae(tmp_path / "b", 0, model="other-model")
    c = _random_sae(tmp_path / "c", 0, hook="blocks.1.hook_resid_post")
    for other, what in ((b, "other-model"), (c, "blocks.1.hook_resid_post")):
        assert main(["compare", str(a), str(other), "--dataset", "pydoc", "--out", str(tmp_path / "cmp")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and what in err and "one model and one hook" in err
    assert not (tmp_path / "cmp").exists()  # refused before anything was written


def test_an_unused_or_wrong_acts_is_refused_before_anything_is_written(tmp_path, capsys):
    a, b = _random_sae(tmp_path / "a", 0), _random_sae(tmp_path / "b", 1)
    base = ["compare", str(a), str(b), "--dataset", "pydoc", "--out", str(tmp_path / "cmp"), "--acts", str(a)]
    assert main([*base, "--no-baselines"]) == 2
    assert "--acts only fits the baselines" in capsys.readouterr().err
    assert main(base) == 2  # no model named here loads: the cache is checked first
    assert "not an activation cache" in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists()


def test_a_width_sweep_at_one_hook_is_compared_each_sae_on_its_own_latents(tiny_lm, corpus_file, tmp_path):
    """docs/metrics.md: model and hook must match, d_sae may differ; each row is that SAE's evaluate numbers."""
    small, wide = _random_sae(tmp_path / "small", 4, d_sae=64), _random_sae(tmp_path / "wide", 5, d_sae=256)
    r = compare(
        CompareConfig(
            saes=[str(small), str(wide)], dataset=str(corpus_file), tokens=96, baselines=False, out=str(tmp_path / "c")
        ),
        lm=tiny_lm,
    )
    rows = {s["name"]: s for s in r["saes"]}
    assert rows["small"]["d_sae"] == 64 and rows["wide"]["d_sae"] == 256
    assert rows["wide"]["sparsity"]["d_sae"] == 256
    e = evaluate(EvalConfig(sae=str(wide), dataset=str(corpus_file), tokens=96, baselines=False), lm=tiny_lm)
    assert rows["wide"]["ce_loss"] == pytest.approx(e["ce"]["sae"], rel=1e-9)
    assert rows["wide"]["active_dims_per_token"] == pytest.approx(e["sparsity"]["l0"], rel=1e-9)
    assert rows["wide"]["sparsity"]["dead"] == e["sparsity"]["dead"]
    assert "| wide | unknown |  | relu | 256 |" in (tmp_path / "c" / "compare.md").read_text()


def test_reports_compare_only_on_the_same_footing(tiny_lm, corpus_file, tmp_path):
    a, b = _random_sae(tmp_path / "a", 0), _random_sae(tmp_path / "b", 1)
    evaluate(EvalConfig(sae=str(a), dataset=str(corpus_file), tokens=64, baselines=False), lm=tiny_lm)
    evaluate(EvalConfig(sae=str(b), dataset=str(corpus_file), tokens=64, baselines=False, drop_first=0), lm=tiny_lm)
    reports = [str(a / "eval" / "report.json"), str(b / "eval" / "report.json")]
    with pytest.raises(UserError, match=r"not comparable .*positions.drop_first 1 vs 0; n_activations"):
        compare(CompareConfig(saes=reports, out=str(tmp_path / "c1")))
    evaluate(EvalConfig(sae=str(b), dataset=str(corpus_file), tokens=64, baselines=False, overwrite=True), lm=tiny_lm)
    r = compare(CompareConfig(saes=reports, out=str(tmp_path / "c2")))
    assert [s["name"] for s in r["saes"]] == ["a", "b"] and (tmp_path / "c2" / "frontier.png").exists()
    assert r["saes"][1]["kl"] == json.loads((b / "eval" / "report.json").read_text())["ce"]["kl_sae"]


def test_curve_sizes_span_every_sae():
    assert curve_sizes([20.0, 100.0], 576) == [16, 32, 64, 128]
    assert curve_sizes([32.0], 576) == [32]
    assert curve_sizes([0.0, 3.0], 576) == [1, 2, 4]
    assert curve_sizes([300.0, 500.0], 384) == [256, 384]


def test_compare_reads_the_column_named_by_text_column(tiny_lm, corpus_file, tmp_path):
    """A .jsonl corpus whose text is in another column scores as the same text in a .txt does."""
    c = tmp_path / "c.jsonl"
    c.write_text(json.dumps({"content": corpus_file.read_text()}))
    sae = _random_sae(tmp_path / "s", 2)
    kw = dict(saes=[str(sae)], tokens=96, baselines=False)
    with pytest.raises(UserError, match=r"no column 'text'"):
        compare(CompareConfig(dataset=str(c), out=str(tmp_path / "c0"), **kw), lm=tiny_lm)
    got = compare(CompareConfig(dataset=str(c), text_column="content", out=str(tmp_path / "c1"), **kw), lm=tiny_lm)
    ref = compare(CompareConfig(dataset=str(corpus_file), out=str(tmp_path / "c2"), **kw), lm=tiny_lm)
    assert got["saes"][0]["kl"] == pytest.approx(ref["saes"][0]["kl"], rel=1e-9)


def test_kl_differences_against_the_first_sae_are_paired_over_contexts(tiny_lm, corpus_file, tmp_path):
    """Every SAE is scored on the same contexts, so compare gives each one's KL minus the first's
    context by context: the mean of the per-context differences of evaluate's per_context values,
    with the standard error of those differences, from the SAEs and from their reports alike."""
    a, b = _random_sae(tmp_path / "a", 6), _random_sae(tmp_path / "b", 7, "topk")
    r = compare(
        CompareConfig(
            saes=[str(a), str(b)], dataset=str(corpus_file), tokens=128, baselines=False, out=str(tmp_path / "c")
        ),
        lm=tiny_lm,
    )
    ev = [
        evaluate(EvalConfig(sae=str(s), dataset=str(corpus_file), tokens=128, baselines=False), lm=tiny_lm)
        for s in (a, b)
    ]
    kl_a, kl_b = (torch.tensor(e["per_context"]["kl_sae"], dtype=torch.float64) for e in ev)
    diff = kl_b - kl_a
    first, second = r["saes"]
    assert first["kl_vs_first"] is None and first["kl_se"] == pytest.approx(ev[0]["ce"]["kl_sae_se"], rel=1e-9)
    assert second["kl_vs_first"]["mean"] == pytest.approx(float(diff.mean()), rel=1e-9)
    assert second["kl_vs_first"]["se"] == pytest.approx(float(diff.std()) / len(diff) ** 0.5, rel=1e-9)
    assert second["kl_vs_first"]["se"] > 0
    d = second["kl_vs_first"]
    assert f"| {d['mean']:+.4f} ± {d['se']:.4f} |" in (tmp_path / "c" / "compare.md").read_text()
    from_reports = compare(
        CompareConfig(saes=[str(s / "eval" / "report.json") for s in (a, b)], out=str(tmp_path / "c2"))
    )
    assert from_reports["saes"][1]["kl_vs_first"]["mean"] == pytest.approx(d["mean"], rel=1e-9)
