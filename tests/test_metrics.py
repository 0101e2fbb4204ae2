import json

import pytest
import torch

from sae_lens_lite.evaluation import metrics
from sae_lens_lite.evaluation.compare import CompareConfig, compare
from sae_lens_lite.evaluation.evaluate import EvalConfig, evaluate
from sae_lens_lite.evaluation.metrics import (
    Metric,
    ReconStats,
    SparsityStats,
    labelled,
    sae_pass,
    score_reconstruction,
)
from sae_lens_lite.training.sae import SAE, SAEConfig

HOOK = "blocks.0.hook_resid_post"


# ---- each accumulator on a case with a known answer -----------------------------------------


def test_explained_variance_is_one_for_a_perfect_reconstruction_and_zero_for_the_mean():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=g) + 3.0  # an offset: EV is relative to the mean, not to zero
    assert ReconStats(x.mean(0)).add(x, x).result()["explained_variance"] == 1.0
    mean = ReconStats(x.mean(0)).add(x, x.mean(0).expand_as(x)).result()
    assert mean["explained_variance"] == pytest.approx(0.0, abs=1e-12) and mean["fvu"] == pytest.approx(1.0)
    zero = ReconStats(x.mean(0)).add(x, torch.zeros_like(x)).result()
    assert zero["explained_variance"] < -1 and zero["mse"] == pytest.approx(float(x.double().pow(2).mean()))


def test_l0_l1_dead_and_dense_of_a_known_latent_matrix():
    f = torch.zeros(20, 5)
    f[:, 0] = 2.0  # every token: dense
    f[:3, 1] = 1.0  # 3 of 20 = 15%: dense (more than 10%)
    f[0, 2] = -4.0  # 1 of 20: alive, not dense; negative values count as firing
    # latents 3 and 4 never fire: dead
    s = SparsityStats(5).add(f[:7]).add(f[7:]).result()
    assert s["l0"] == (20 + 3 + 1) / 20 and s["l1"] == (40 + 3 + 4) / 20
    assert (s["dead"], s["dead_fraction"], s["dense"], s["dense_fraction"]) == (2, 0.4, 2, 0.4)
    assert s["firing_frequency"].tolist() == pytest.approx([1.0, 0.15, 0.05, 0.0, 0.0])
    assert (s["d_sae"], s["n_tokens"]) == (5, 20)


def _sae(d: int = 8, d_sae: int = 32, seed: int = 0, **cfg) -> SAE:
    torch.manual_seed(seed)
    sae = SAE.build(SAEConfig(d_in=d, d_sae=d_sae, model="tiny", hook=HOOK, context_length=16, **cfg))
    with torch.no_grad():
        for p in (sae.W_enc, sae.W_dec):
            p.copy_(torch.randn_like(p) / d**0.5)
        sae.b_enc.copy_(torch.randn(d_sae) * 0.1)
    return sae.eval()


@pytest.mark.parametrize("activation", ["relu", "topk"])
def test_the_chunked_pass_gives_the_same_figures_whatever_the_chunk_size(activation):
    sae = _sae(activation=activation, k=4 if activation == "topk" else None)
    x = torch.randn(301, 8, generator=torch.Generator().manual_seed(1))
    whole = sae_pass(sae, x, chunk=len(x))
    with torch.no_grad():
        o = sae(x)
    # one chunk is the definition applied to all rows at once
    assert whole.reconstruction == ReconStats(x.mean(0)).add(x, o.x_hat).result()
    assert whole.sparsity_json() == {
        k: v for k, v in SparsityStats(32).add(o.latents).result().items() if k != "firing_frequency"
    }
    # the SAE's float32 matmuls round differently on fewer rows; the sums themselves run in float64
    for chunk in (1, 7, 64, 4096):
        got = sae_pass(sae, x, chunk=chunk)
        for k in ("mse", "explained_variance", "fvu"):
            assert got.reconstruction[k] == pytest.approx(whole.reconstruction[k], rel=1e-6), (chunk, k)
        assert got.sparsity["l1"] == pytest.approx(whole.sparsity["l1"], rel=1e-6)
        for k in ("l0", "dead", "dense", "n_tokens"):
            assert got.sparsity[k] == whole.sparsity[k], (chunk, k)
        assert torch.equal(got.sparsity["firing_frequency"], whole.sparsity["firing_frequency"])
    if activation == "topk":
        assert whole.sparsity["l0"] == 4


def test_a_transcoders_pass_scores_its_prediction_against_the_target_half_of_each_row():
    tc = _sae(d_out=8)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(100, 8, generator=g), torch.randn(100, 8, generator=g)
    got = sae_pass(tc, torch.cat([x, y], 1), chunk=30)
    with torch.no_grad():
        want = score_reconstruction(lambda a: tc(a).x_hat, x, y, mean=y.mean(0))
    for k in ("mse", "explained_variance"):
        assert got.reconstruction[k] == pytest.approx(want[k], rel=1e-6)


# ---- a new metric is one function and one registry line -------------------------------------


def cosine_sum(target, x_hat) -> float:
    """A metric a user adds: the cosine between the target and the reconstruction, summed over tokens."""
    return float(torch.nn.functional.cosine_similarity(target.double(), x_hat.double(), dim=-1).sum())


def active_pairs_sum(latents) -> float:
    """Another: pairs of latents active together on a token, summed over tokens."""
    n = (latents != 0).sum(1).double()
    return float((n * (n - 1) / 2).sum())


@pytest.fixture
def registered(monkeypatch):
    """The two new metrics, each registered in one line, as docs/metrics.md says."""
    monkeypatch.setitem(metrics.RECONSTRUCTION, "cosine", Metric(cosine_sum, "cosine(x, x̂)"))
    monkeypatch.setitem(metrics.SPARSITY, "active_pairs", Metric(active_pairs_sum, "active pairs"))


def _identity_sae(path, d: int = 32) -> str:
    """relu(x) - relu(-x) = x exactly: a cosine of 1, and d latents on every token (one of each pair)."""
    sae = SAE(SAEConfig(d_in=d, d_sae=2 * d, model="tiny", hook=HOOK, context_length=16))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
    return str(sae.save(path))


def test_a_registered_metric_appears_in_evaluates_report_and_in_compares_table(
    registered, tiny_lm, corpus_file, tmp_path
):
    ident, other = _identity_sae(tmp_path / "ident"), _identity_sae(tmp_path / "other")
    with torch.no_grad():  # the other SAE's reconstruction is scaled: cosine still 1, its latents the same
        s = SAE.load(other)
        s.W_dec.mul_(0.5)
        s.save(tmp_path / "other")
    r = evaluate(EvalConfig(sae=ident, dataset=str(corpus_file), tokens=64, baselines=False), lm=tiny_lm)
    on_disk = json.loads((tmp_path / "ident" / "eval" / "report.json").read_text())
    assert on_disk["reconstruction"]["cosine"] == pytest.approx(1.0, abs=1e-6) == r["reconstruction"]["cosine"]
    assert on_disk["sparsity"]["active_pairs"] == 32 * 31 / 2  # 32 latents on every token
    md = (tmp_path / "ident" / "eval" / "report.md").read_text()
    assert "| cosine(x, x̂) | 1.0000 |" in md and "| active pairs | 496.0000 |" in md

    c = compare(
        CompareConfig(saes=[ident, other], dataset=str(corpus_file), tokens=128, out=str(tmp_path / "cmp")),
        lm=tiny_lm,
    )
    rows = {row["name"]: row for row in json.loads((tmp_path / "cmp" / "compare.json").read_text())["saes"]}
    assert rows["ident"]["cosine"] == pytest.approx(1.0, abs=1e-6) and rows["other"]["cosine"] == pytest.approx(1.0)
    assert rows["other"]["sparsity"]["active_pairs"] == 496.0 and c["saes"][0]["cosine"] == rows["ident"]["cosine"]
    assert all("cosine" in b for b in c["baselines"])  # a reconstruction metric scores PCA and VAE too
    table = (tmp_path / "cmp" / "compare.md").read_text().splitlines()
    header = next(ln for ln in table if ln.startswith("| SAE |"))
    assert header.endswith("| dead on these tokens | cosine(x, x̂) | active pairs |")
    assert any(ln.startswith("| ident |") and ln.endswith("| 1.0000 | 496.0000 |") for ln in table)


def test_the_tables_list_nothing_more_without_a_registered_label():
    """l0 and l1 are laid out by hand in both tables: no generic row or column repeats them."""
    assert labelled({"mse": 1.0}, {"l0": 3.0, "l1": 2.0}) == {}
    assert set(metrics.SPARSITY) == {"l0", "l1"} and not metrics.RECONSTRUCTION
