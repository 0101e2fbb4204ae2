import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import SHARED_DATA, needs_smollm2, tiny_model

from sae_lens_lite.cli import build_parser
from sae_lens_lite.config import from_namespace
from sae_lens_lite.data.corpus import tokenize_corpus
from sae_lens_lite.errors import UserError
from sae_lens_lite.evaluation.baselines import fit_pca, fit_vae, kl_to_prior, vae_activity
from sae_lens_lite.evaluation.evaluate import EvalConfig, baseline_sizes, eval_contexts, evaluate
from sae_lens_lite.evaluation.metrics import (
    ReconStats,
    SparsityStats,
    ce_loss,
    ce_loss_recovered,
    kl_div,
    reconstruction_metrics,
    sparsity_metrics,
    splice,
)
from sae_lens_lite.evaluation.report import plot_density
from sae_lens_lite.training.sae import SAE, SAEConfig

HOOK = "blocks.0.hook_resid_post"


# ---- metrics on hand-made inputs ------------------------------------------------------------


def test_reconstruction_metrics_known_answers():
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0]])  # mean [2, 0]; total squared deviation 2
    m = reconstruction_metrics(x, torch.tensor([[2.0, 0.0], [2.0, 0.0]]))  # predicts the mean
    assert m["explained_variance"] == 0.0 and m["fvu"] == 1.0
    assert m["mse"] == 2 / 4  # squared error 2 over 2 tokens x 2 dims
    m = reconstruction_metrics(x, torch.tensor([[1.5, 0.0], [3.0, 0.0]]))  # error 0.25
    assert m["explained_variance"] == pytest.approx(1 - 0.25 / 2) and m["fvu"] == pytest.approx(0.125)
    assert reconstruction_metrics(x, x)["explained_variance"] == 1.0
    same = reconstruction_metrics(torch.ones(3, 2), torch.zeros(3, 2))
    assert same["explained_variance"] is None and same["mse"] == 1.0  # no variance: EV undefined


def test_explained_variance_is_relative_to_the_mean_not_to_zero():
    x = torch.tensor([[10.0], [12.0]])
    m = reconstruction_metrics(x, torch.tensor([[11.0], [11.0]]))
    # Relative to zero this would be 1 - 2/244 ≈ 0.99; relative to the mean it is 0.
    assert m["explained_variance"] == 0.0


def test_mse_does_not_scale_with_batch_size_and_streaming_matches_one_shot():
    g = torch.Generator().manual_seed(0)
    x, x_hat = torch.randn(100, 8, generator=g), torch.randn(100, 8, generator=g)
    one = reconstruction_metrics(x, x_hat)
    assert reconstruction_metrics(x.repeat(5, 1), x_hat.repeat(5, 1))["mse"] == pytest.approx(one["mse"])
    stream = ReconStats(x.mean(0))
    for i in range(0, 100, 7):
        stream.add(x[i : i + 7], x_hat[i : i + 7])
    got = stream.result()
    for k in ("mse", "explained_variance", "fvu"):
        assert got[k] == pytest.approx(one[k], rel=1e-12)


def test_sparsity_metrics_known_answers():
    f = torch.tensor([[0.0, 1.0, 0.0, 2.0], [0.0, 3.0, 0.0, 0.0], [0.0, 0.0, 0.0, 5.0]])
    m = sparsity_metrics(f)
    assert m["l0"] == pytest.approx(4 / 3) and m["l1"] == pytest.approx(11 / 3)
    assert m["firing_frequency"].tolist() == pytest.approx([0, 2 / 3, 0, 2 / 3])
    assert (m["dead"], m["dead_fraction"], m["dense"], m["dense_fraction"]) == (2, 0.5, 2, 0.5)
    # dense means strictly more than 10% of tokens: 1 in 10 is not dense, 2 in 10 is
    f = torch.zeros(10, 2)
    f[0, 0] = 1.0
    f[:2, 1] = 1.0
    m = sparsity_metrics(f)
    assert m["dense"] == 1 and m["dead"] == 0
    s = SparsityStats(2).add(f[:3]).add(f[3:])
    assert s.result()["firing_frequency"].tolist() == m["firing_frequency"].tolist()


def test_kl_and_ce_loss_recovered_known_answers():
    p, q = torch.tensor([0.5, 0.5]).log(), torch.tensor([0.25, 0.75]).log()
    assert float(kl_div(p, q)) == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(0.5 / 0.75), rel=1e-6)
    assert float(kl_div(p, p)) == 0.0
    assert ce_loss_recovered(clean=2.0, spliced=3.0, ablated=6.0) == 0.75
    assert ce_loss_recovered(clean=2.0, spliced=2.0, ablated=6.0) == 1.0
    assert ce_loss_recovered(clean=2.0, spliced=2.5, ablated=2.0) is None


# ---- CE loss with splicing on a tiny model ---------------------------------------------------


def test_ce_loss_matches_hf_and_identity_splice_is_exactly_clean():
    model = tiny_model("llama")
    ids = torch.randint(0, 96, (3, 12), generator=torch.Generator().manual_seed(0))
    clean = ce_loss(model, ids)  # [3, 11]
    assert clean.shape == (3, 11)
    with torch.no_grad():
        hf = model(input_ids=ids, labels=ids).loss
    assert float(clean.mean()) == pytest.approx(float(hf), rel=1e-5)
    mask = torch.ones(3, 12, dtype=torch.bool)
    assert torch.equal(ce_loss(model, ids, HOOK, splice(lambda a: a.clone(), mask)), clean)


def test_zero_splice_equals_running_on_zero_embeddings():
    model = tiny_model("llama")
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 10, dtype=torch.bool)
    zero = ce_loss(model, ids, "blocks.0.hook_resid_pre", splice(torch.zeros_like, mask))
    with torch.no_grad():  # resid_pre of block 0 is the embedding: ablating it = zero embeddings
        logits = model(inputs_embeds=torch.zeros(2, 10, 32)).logits
    want = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    torch.testing.assert_close(zero, want.view(2, 9))
    # a mask keeps the unmasked positions clean: ablating only the last position changes nothing before it
    last = torch.zeros(2, 10, dtype=torch.bool)
    last[:, -1] = True
    assert torch.equal(ce_loss(model, ids, HOOK, splice(torch.zeros_like, last)), ce_loss(model, ids))


# ---- baselines ------------------------------------------------------------------------------


def test_pca_known_answers():
    x = torch.tensor([[2.0, 1.0], [2.0, -1.0], [-2.0, 1.0], [-2.0, -1.0]]) + 7  # variances 4 and 1
    assert reconstruction_metrics(x, fit_pca(x, 1).reconstruct(x))["explained_variance"] == pytest.approx(0.8)
    g = torch.Generator().manual_seed(0)
    y = torch.randn(300, 16, generator=g) * 3 + 5
    assert torch.equal(fit_pca(y, 16).reconstruct(y), y)  # k = d: exact to float32
    z = torch.randn(300, 3, generator=g) @ torch.randn(3, 16, generator=g) + 4  # a 3-dim affine subspace
    torch.testing.assert_close(fit_pca(z, 3).reconstruct(z), z, rtol=0, atol=1e-5)
    with pytest.raises(UserError, match="1 <= k"):
        fit_pca(y, 17)


def test_vae_learns_low_rank_data_and_reports_its_activity():
    g = torch.Generator().manual_seed(0)
    x = (
        torch.randn(4096, 3, generator=g) @ torch.randn(3, 24, generator=g) * 2
        + 0.02 * torch.randn(4096, 24, generator=g)
        + 3
    )
    vae = fit_vae(x, 3, steps=600)
    assert reconstruction_metrics(x, vae.reconstruct(x))["explained_variance"] > 0.98
    act = vae_activity(vae, x)
    assert act["d_latent"] == 3 and act["active_units"] == 3 and act["active_dims_per_token"] <= 3
    assert act["kl_per_token"] > 0
    assert float(kl_to_prior(torch.zeros(2), torch.zeros(2)).sum()) == 0.0  # the prior itself


def test_baseline_sizes():
    assert baseline_sizes(10.4, 576) == [10, 20, 40]
    assert baseline_sizes(200, 576) == [200, 400, 576]
    assert baseline_sizes(0.0, 8) == [1, 2, 4]


# ---- the evaluation run ---------------------------------------------------------------------


def _sae(tmp_path, kind: str, d: int = 32, context_length: int = 16):
    """'identity': relu(x) - relu(-x) = x exactly, with d_sae = 2d; 'zero': x_hat = 0."""
    sae = SAE(SAEConfig(d_in=d, d_sae=2 * d, model="tiny", hook=HOOK, context_length=context_length))
    eye = torch.eye(d)
    with torch.no_grad():
        if kind == "identity":
            sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))  # [d, 2d]
            sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))  # [2d, d]
        else:
            sae.W_dec.zero_()
    return sae.save(tmp_path / kind)


def test_eval_contexts_skip_whole_contexts_like_the_harvest(tiny_lm, corpus_file):
    full = tokenize_corpus(tiny_lm.tokenizer, [corpus_file.read_text()], 16)
    assert torch.equal(eval_contexts(tiny_lm.tokenizer, str(corpus_file), 16, 48, 32), full[2:5])
    assert torch.equal(eval_contexts(tiny_lm.tokenizer, str(corpus_file), 16, 16, 33), full[3:4])  # rounds up
    with pytest.raises(UserError, match="held-out text"):
        eval_contexts(tiny_lm.tokenizer, str(corpus_file), 16, 16, 10**7)


def test_evaluate_reads_the_column_named_by_text_column(tiny_lm, corpus_file, tmp_path):
    """A corpus harvest can read with --text-column can be evaluated too (evaluate had no such flag)."""
    c = tmp_path / "c.jsonl"
    c.write_text("\n".join(json.dumps({"content": d}) for d in corpus_file.read_text().split(". ")))
    sae = str(_sae(tmp_path, "identity"))
    with pytest.raises(UserError, match=r"no column 'text' \(columns: content\); pass --text-column"):
        evaluate(EvalConfig(sae=sae, dataset=str(c), tokens=64, baselines=False, out=str(tmp_path / "e0")), lm=tiny_lm)
    args = build_parser().parse_args(["evaluate", "--sae", sae, "--dataset", str(c), "--text-column", "content"])
    cfg = from_namespace(EvalConfig, args)
    r = evaluate(replace(cfg, tokens=64, baselines=False, device="cpu"), lm=tiny_lm)
    assert cfg.text_column == "content" and r["sparsity"]["n_tokens"] > 0


def test_identity_sae_gives_clean_loss_and_baselines_are_scored(tiny_lm, corpus_file, tmp_path):
    cfg = EvalConfig(sae=str(_sae(tmp_path, "identity")), dataset=str(corpus_file), tokens=128, batch_size=3)
    r = evaluate(cfg, lm=tiny_lm)
    ce = r["ce"]
    assert ce["sae"] == ce["clean"] and ce["kl_sae"] == 0.0 and ce["sae_recovered"] == 1.0
    assert ce["zero_ablation"] > ce["clean"] and ce["kl_zero_ablation"] > 0
    assert r["reconstruction"]["explained_variance"] == pytest.approx(1.0, abs=1e-9)
    assert r["sparsity"]["l0"] == 32  # one of relu(x_i), relu(-x_i) fires per coordinate
    assert r["n_contexts"] == 8 and r["n_predictions"] == 8 * 15
    rows = {row["method"]: row for row in r["baselines"]["rows"]}
    assert set(rows) == {"sae", "pca_32", "vae_32"}  # k = L0 = d_in caps every size
    assert rows["pca_32"]["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    assert rows["pca_32"]["kl"] < 1e-6 and rows["pca_32"]["active_dims_per_token"] == 32
    assert rows["sae"]["ce_loss"] == r["baselines"]["ce_clean"]
    out = tmp_path / "identity" / "eval"
    assert json.loads((out / "report.json").read_text())["ce"] == ce
    assert "SAE vs PCA vs VAE" in (out / "report.md").read_text() and (out / "density.png").stat().st_size > 0
    assert evaluate(cfg, lm=tiny_lm)["ce"] == ce  # the same request again: nothing to do (outputs.py)
    with pytest.raises(UserError, match=r"differs in: tokens.*overwrite"):
        evaluate(EvalConfig(**{**vars(cfg), "tokens": cfg.tokens // 2}), lm=tiny_lm)


def test_zero_sae_gives_the_zero_ablation_loss(tiny_lm, corpus_file, tmp_path):
    cfg = EvalConfig(
        sae=str(_sae(tmp_path, "zero")), dataset=str(corpus_file), tokens=64, baselines=False, out=str(tmp_path / "ev")
    )
    r = evaluate(cfg, lm=tiny_lm)
    assert r["ce"]["sae"] == r["ce"]["zero_ablation"] and r["ce"]["sae_recovered"] == 0.0
    # per-context means: as many as contexts, averaging to the reported figures, whose standard
    # error is their spread over √contexts
    kl, ce = (torch.tensor(r["per_context"][k], dtype=torch.float64) for k in ("kl_sae", "ce_sae"))
    assert len(kl) == len(ce) == r["n_contexts"] >= 2
    assert float(kl.mean()) == pytest.approx(r["ce"]["kl_sae"], rel=1e-9) and float(kl.std()) > 0
    assert float(ce.mean()) == pytest.approx(r["ce"]["sae"], rel=1e-9)
    assert r["ce"]["kl_sae_se"] == pytest.approx(float(kl.std()) / len(kl) ** 0.5, rel=1e-9)
    assert r["ce"]["sae_se"] == pytest.approx(float(ce.std()) / len(ce) ** 0.5, rel=1e-9)
    assert f"{r['ce']['kl_sae']:.4f} ± {r['ce']['kl_sae_se']:.4f}" in (tmp_path / "ev" / "report.md").read_text()
    assert r["reconstruction"]["explained_variance"] < 0  # predicting 0 is worse than predicting the mean
    assert "baselines" not in r


def test_eval_text_skips_the_sae_training_text_by_default(tiny_lm, corpus_file, tmp_path):
    from sae_lens_lite.data.harvest import HarvestConfig, harvest

    acts = tmp_path / "acts"
    harvest(
        HarvestConfig(
            model="tiny", hooks=[HOOK], dataset=str(corpus_file), tokens=64, context_length=16, out=str(acts)
        ),
        lm=tiny_lm,
    )
    sae = SAE(SAEConfig(d_in=32, d_sae=64, hook=HOOK, context_length=16, meta={"acts": str(acts)}))
    path = sae.save(tmp_path / "s")
    r = evaluate(EvalConfig(sae=str(path), dataset=str(corpus_file), tokens=32, baselines=False), lm=tiny_lm)
    assert r["skip_tokens"] == 64 and not any("overlap" in w for w in r["warnings"])
    r = evaluate(
        EvalConfig(sae=str(path), dataset=str(corpus_file), tokens=32, skip_tokens=0, baselines=False, overwrite=True),
        lm=tiny_lm,
    )
    assert any("--skip-tokens 64" in w for w in r["warnings"])
    other = tmp_path / "other.txt"
    other.write_text(corpus_file.read_text())
    r = evaluate(EvalConfig(sae=str(path), dataset=str(other), tokens=32, acts=str(acts), overwrite=True), lm=tiny_lm)
    assert r["skip_tokens"] == 0  # a different corpus is held out already
    # baselines fitted on the training cache are scored on every eval context
    assert (
        r["baselines"]["fit_on"] == f"activation cache {acts}" and r["baselines"]["scored_on"] == "eval contexts 0..1"
    )
    assert r["baselines"]["ce_clean"] == r["ce"]["clean"]


def test_matplotlib_is_a_core_dependency_so_the_plots_are_always_written(tmp_path):
    import tomllib

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    assert any(d.replace(" ", "").startswith("matplotlib") for d in project["dependencies"])
    assert "plots" not in project.get("optional-dependencies", {})  # no extra a README user could miss
    plot_density(torch.tensor([0.0, 0.5, 0.01]), tmp_path / "d.png", "t", 0.1)
    assert (tmp_path / "d.png").read_bytes()[:4] == b"\x89PNG"


def test_mismatched_model_is_a_user_error(tiny_lm, corpus_file, tmp_path):
    sae = SAE(SAEConfig(d_in=16, d_sae=32, hook=HOOK, context_length=16)).save(tmp_path / "s")
    with pytest.raises(UserError, match="d_model 32"):
        evaluate(EvalConfig(sae=str(sae), dataset=str(corpus_file)), lm=tiny_lm)


@pytest.mark.slow
@needs_smollm2
def test_identity_and_zero_splice_on_real_smollm2(tmp_path):
    from sae_lens_lite.data.models import load_model

    lm = load_model("smollm2-135m")
    text = SHARED_DATA / "wikitext2-test.txt"
    dataset = str(text) if text.exists() else "pydoc"
    ident = SAE(
        SAEConfig(d_in=576, d_sae=1152, model="smollm2-135m", hook="blocks.3.hook_resid_post", context_length=64)
    )
    with torch.no_grad():
        eye = torch.eye(576)
        ident.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        ident.W_dec.copy_(torch.cat([eye, -eye], dim=0))
    r = evaluate(EvalConfig(sae=str(ident.save(tmp_path / "id")), dataset=dataset, tokens=256, baselines=False), lm=lm)
    assert r["ce"]["sae"] == r["ce"]["clean"] and r["ce"]["kl_sae"] == 0.0
    assert 1.0 < r["ce"]["clean"] < 6.0 < r["ce"]["zero_ablation"]  # a real LM on real text; ablation hurts


def test_report_carries_the_trainers_dead_fraction_when_the_sae_records_it(tiny_lm, corpus_file, tmp_path):
    path = _sae(tmp_path, "zero")
    r = evaluate(EvalConfig(sae=str(path), dataset=str(corpus_file), tokens=32, baselines=False), lm=tiny_lm)
    assert "dead_fraction_in_training" not in r["sparsity"]  # no training record: nothing invented
    sae = SAE.load(path)
    sae.cfg.meta.update(
        final_metrics={"dead_frac": 0.0125, "tokens": 2_000_000}, train_config={"dead_window": 1_000_000}
    )
    sae.save(path)
    r = evaluate(
        EvalConfig(sae=str(path), dataset=str(corpus_file), tokens=32, baselines=False, overwrite=True), lm=tiny_lm
    )
    assert r["sparsity"]["dead_fraction_in_training"] == 0.0125 and r["sparsity"]["training_dead_window"] == 1_000_000
    assert (
        "| dead latents in training (no firing in its last 1,000,000 tokens) | 1.25% |"
        in (path / "eval" / "report.md").read_text()
    )


def test_sparsity_on_a_held_out_cache_counts_rare_latents_as_alive(tiny_lm, corpus_file, tmp_path):
    """The identity SAE's latent i fires where x_i > 0 and latent 32 + i where x_i < 0. In a cache
    of 5000 rows that are -1 everywhere but one row (+1 on coordinate 0 only), latent 0 fires once
    (alive, though 32 eval tokens would call it dead), latents 1-31 never (dead), 32-63 on nearly
    every row (dense)."""
    from sae_lens_lite.data.cache import CacheWriter

    n, d = 5000, 32
    acts = -torch.ones(n, d)
    acts[17] = 0.0
    acts[17, 0] = 1.0
    w = CacheWriter(tmp_path / "held", {"model": "tiny", "hook": HOOK, "dtype": "float32", "context_length": 16}, d)
    rows = torch.arange(n)
    w.add_shard(acts, rows % 90, rows // 16, rows % 16, n_contexts=n // 16)
    w.finish()
    path = _sae(tmp_path, "identity")
    r = evaluate(
        EvalConfig(
            sae=str(path), dataset=str(corpus_file), tokens=32, baselines=False, sparsity_acts=str(tmp_path / "held")
        ),
        lm=tiny_lm,
    )
    h = r["sparsity_on_acts"]
    assert (h["n_tokens"], h["dead"], h["dense"], h["d_sae"]) == (n, 31, 32, 64)
    assert h["dead_fraction"] == 31 / 64 and h["l0"] == pytest.approx(((n - 1) * 32 + 1) / n)
    md = (path / "eval" / "report.md").read_text()
    assert f"| dead latents on 5,000 tokens of `{tmp_path / 'held'}` | 31 (48.44%) |" in md
    assert any("count on 5000 tokens of --sparsity-acts" in x for x in r["warnings"])
    wrong = SAE(SAEConfig(d_in=32, d_sae=64, hook="blocks.0.hook_mlp_out", context_length=16)).save(tmp_path / "w")
    with pytest.raises(UserError, match="--sparsity-acts .* holds blocks.0.hook_resid_post"):
        evaluate(
            EvalConfig(
                sae=str(wrong),
                dataset=str(corpus_file),
                tokens=32,
                baselines=False,
                sparsity_acts=str(tmp_path / "held"),
            ),
            lm=tiny_lm,
        )


def test_a_wrong_or_unused_acts_is_refused_before_the_model_runs(tiny_lm, corpus_file, tmp_path, monkeypatch):
    import sae_lens_lite.evaluation.evaluate as ev

    path = _sae(tmp_path, "identity")

    def no_model(*a, **k):
        raise AssertionError("the model ran before --acts was checked")

    monkeypatch.setattr(ev, "_prepare", no_model)
    with pytest.raises(UserError, match="--acts only fits the baselines, which --no-baselines turns off"):
        evaluate(EvalConfig(sae=str(path), dataset=str(corpus_file), baselines=False, acts=str(path)), lm=tiny_lm)
    with pytest.raises(UserError, match="not an activation cache"):
        evaluate(EvalConfig(sae=str(path), dataset=str(corpus_file), acts=str(path)), lm=tiny_lm)
    assert not (path / "eval").exists()


# ---- which positions are spliced and scored -------------------------------------------------


def _documents(tmp_path):
    """A directory of short documents: packed, their contexts hold EOS separators (special tokens)."""
    from conftest import CORPUS_TEXT

    docs = tmp_path / "docs"
    docs.mkdir()
    for i, sentence in enumerate(CORPUS_TEXT.split(". ")[:40]):
        (docs / f"{i:03d}.txt").write_text(sentence)
    return docs


def test_positions_setting_changes_zero_ablation_ce_as_computed_by_hand(tiny_lm, tmp_path):
    """Zero ablation at block 0's output, recomputed with a plain forward hook and cross_entropy:
    positions that are special or among the first drop_first of a context keep their activation."""
    from torch.nn import functional as F

    docs = _documents(tmp_path)
    ids = tokenize_corpus(tiny_lm.tokenizer, [p.read_text() for p in sorted(docs.glob("*.txt"))], 16, 64)  # [4, 16]
    eos = tiny_lm.tokenizer.eos_token_id
    assert (ids == eos).sum() > 2  # the setting has special positions to leave alone

    def expected(drop_special: bool, drop_first: int) -> float:
        zeroed = torch.ones_like(ids, dtype=torch.bool)
        if drop_special:
            zeroed &= ids != eos
        zeroed[:, :drop_first] = False

        def hook(mod, args, out):
            h = out[0] if isinstance(out, tuple) else out
            h = torch.where(zeroed[..., None], torch.zeros_like(h), h)
            return (h, *out[1:]) if isinstance(out, tuple) else h

        handle = tiny_lm.model.model.layers[0].register_forward_hook(hook)
        try:
            with torch.no_grad():
                logits = tiny_lm.model(input_ids=ids).logits  # [4, 16, vocab]
        finally:
            handle.remove()
        return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1)))

    sae = _sae(tmp_path, "zero")
    got = {}
    for drop_special, drop_first in ((True, 1), (True, 4), (False, 0)):
        cfg = EvalConfig(
            sae=str(sae),
            dataset=str(docs),
            tokens=64,
            baselines=False,
            drop_special=drop_special,
            drop_first=drop_first,
            overwrite=True,
        )
        r = evaluate(cfg, lm=tiny_lm)
        got[drop_special, drop_first] = r["ce"]["zero_ablation"]
        assert r["ce"]["zero_ablation"] == pytest.approx(expected(drop_special, drop_first), rel=1e-5)
        n_kept = int(((ids != eos) | (not drop_special))[:, drop_first:].sum())
        assert r["n_activations"] == n_kept and r["footing"]["positions"]["drop_first"] == drop_first
        assert r["positions"] == {"drop_special": drop_special, "drop_first": drop_first, "outlier_factor": 0.0}
    assert len({round(v, 6) for v in got.values()}) == 3  # each setting changes the answer
    assert "Spliced and scored at positions all;" in (sae / "eval" / "report.md").read_text()  # the last setting


def test_outlier_factor_leaves_out_the_positions_harvest_would_drop(tiny_lm, tmp_path):
    """Kept: norm at most factor x the median norm over every position of the eval text."""
    docs = _documents(tmp_path)
    ids = tokenize_corpus(tiny_lm.tokenizer, [p.read_text() for p in sorted(docs.glob("*.txt"))], 16, 64)
    with torch.no_grad():
        h = tiny_lm.model(input_ids=ids, output_hidden_states=True).hidden_states[1]  # block 0's output [4, 16, 32]
    norms = h.norm(dim=-1)
    factor = float(norms.max() / norms.median()) * 0.9  # at least the largest norm is out
    kept = (norms <= factor * norms.median()) & (ids != tiny_lm.tokenizer.eos_token_id)
    kept[:, 0] = False
    r = evaluate(
        EvalConfig(
            sae=str(_sae(tmp_path, "zero")), dataset=str(docs), tokens=64, baselines=False, outlier_factor=factor
        ),
        lm=tiny_lm,
    )
    assert r["n_activations"] == int(kept.sum()) < int(((ids != tiny_lm.tokenizer.eos_token_id)[:, 1:]).sum())


def test_footing_differences_name_each_differing_setting():
    from sae_lens_lite.evaluation.evaluate import footing_differences

    f = {
        "model": "m",
        "weights_hash": "w",
        "hook": "h",
        "dataset": "d",
        "skip_tokens": 0,
        "context_length": 128,
        "n_contexts": 64,
        "tokens_sha256": "t",
        "positions": {"drop_special": True, "drop_first": 1, "outlier_factor": 0.0},
        "n_activations": 8128,
    }
    assert footing_differences({"footing": f}, {"footing": dict(f)}) == []
    g = {**f, "positions": {**f["positions"], "drop_first": 0}, "n_activations": 8192}
    assert footing_differences({"footing": f}, {"footing": g}) == [
        "positions.drop_first 1 vs 0",
        "n_activations 8128 vs 8192",
    ]
    assert "evaluate it again" in footing_differences({"ce": {}}, {"footing": f})[0]


def test_the_report_notes_when_the_training_cache_filtered_positions_differently():
    from sae_lens_lite.evaluation.evaluate import position_warnings

    filters = {"drop_special": True, "drop_first": 1, "outlier_factor": 0.0}
    sae = SAE(
        SAEConfig(d_in=4, d_sae=8, meta={"filters": {"drop_special": True, "drop_first": 0, "outlier_factor": 0.0}})
    )
    (w,) = position_warnings(sae, filters)
    assert "drop_first 0 (here 1)" in w and "--drop-first" in w
    assert position_warnings(SAE(SAEConfig(d_in=4, d_sae=8, meta={"filters": filters})), filters) == []
    assert position_warnings(SAE(SAEConfig(d_in=4, d_sae=8)), filters) == []  # imported: nothing to compare with


def test_evaluate_reads_the_split_of_a_hub_dataset_named_by_split(tiny_lm, corpus_file, tmp_path, monkeypatch):
    """A hub dataset's test split is held out from an SAE trained on its train split: evaluate
    (and compare) read the split named by --split, and skip nothing there by default."""
    import datasets

    from sae_lens_lite.data.harvest import HarvestConfig, harvest

    text = corpus_file.read_text()
    splits = {"train": text, "test": " ".join(reversed(text.split()))}
    asked = []

    def load_dataset(name, split="train", **kw):
        assert name == "org/corpus", name
        asked.append(split)
        return datasets.Dataset.from_dict({"text": [splits[split]]})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    acts = tmp_path / "acts"
    h = HarvestConfig(model="tiny", hooks=[HOOK], dataset="org/corpus", tokens=64, context_length=16, out=str(acts))
    harvest(h, lm=tiny_lm)
    test_ctx = eval_contexts(tiny_lm.tokenizer, "org/corpus", 16, 32, 0, "text", "test")
    assert torch.equal(test_ctx, tokenize_corpus(tiny_lm.tokenizer, [splits["test"]], 16)[:2])
    sae = SAE(SAEConfig(d_in=32, d_sae=64, hook=HOOK, context_length=16, meta={"acts": str(acts)}))
    path = str(sae.save(tmp_path / "s"))
    args = build_parser().parse_args(["evaluate", "--sae", path, "--dataset", "org/corpus", "--split", "test"])
    cfg = replace(from_namespace(EvalConfig, args), tokens=32, baselines=False, device="cpu")
    asked.clear()
    r = evaluate(cfg, lm=tiny_lm)
    assert asked == ["test"] and r["skip_tokens"] == 0 and not any("overlap" in w for w in r["warnings"])
    r = evaluate(replace(cfg, split="train", out=str(tmp_path / "e_train")), lm=tiny_lm)
    assert r["skip_tokens"] == 64  # the train split is what the SAE was trained on
