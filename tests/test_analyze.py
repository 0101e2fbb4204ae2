import csv
import json

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

from sae_lens_lite.data.cache import ActivationCache, CacheWriter
from sae_lens_lite.data.models import LoadedModel
from sae_lens_lite.errors import UserError
from sae_lens_lite.interpret.analyze import (
    N_BINS,
    AnalyzeConfig,
    analyze,
    at_rows,
    context_windows,
    feature_stats,
    final_norm,
    logit_lens,
    ordered_batches,
    window_activations,
)
from sae_lens_lite.training.sae import SAE, SAEConfig

D = 32  # the tiny models' hidden size


def write_cache(path, tokens, acts, keep=None, per_shard=8, model="tiny", hook="blocks.0.hook_resid_post"):
    """tokens [n_ctx, T], acts [n_ctx, T, d] → a cache; `keep` [n_ctx, T] drops rows like the harvest filters."""
    n_ctx, T = tokens.shape
    keep = torch.ones(n_ctx, T, dtype=torch.bool) if keep is None else keep
    doc = torch.arange(n_ctx)[:, None].expand(n_ctx, T)
    pos = torch.arange(T)[None, :].expand(n_ctx, T)
    w = CacheWriter(path, {"model": model, "hook": hook, "dtype": "float32", "context_length": T}, acts.shape[-1])
    for s in range(0, n_ctx, per_shard):
        k = keep[s : s + per_shard]
        w.add_shard(
            acts[s : s + per_shard][k],
            tokens[s : s + per_shard][k],
            doc[s : s + per_shard][k],
            pos[s : s + per_shard][k],
            len(k),
        )
    w.finish()
    return ActivationCache.open(path)


def random_sae(d_sae=24, seed=0, d_in=D):
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, hook="blocks.0.hook_resid_post"))
    sae.reset_parameters(dec_norm=1.0, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        sae.b_enc.fill_(-0.5)  # sparse-ish, with features of very different frequencies
    return sae


def test_streamed_stats_match_brute_force(tmp_path):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 96, (20, 16), generator=g)
    acts = torch.randn(20, 16, D, generator=g)
    keep = torch.rand(20, 16, generator=g) > 0.1
    cache = write_cache(tmp_path / "acts", tokens, acts, keep)
    sae, k = random_sae(), 7
    st = feature_stats(sae, ordered_batches(cache, 37, "cpu"), k)  # batches straddle shards

    x = cache.load(dtype=torch.float32)["activations"]
    f = sae.encode(x).detach()  # [n, d_sae] the brute-force reference
    assert st.n_rows == len(x)
    v, i = f.topk(k, dim=0)
    torch.testing.assert_close(st.top_vals, v.T)
    assert torch.equal(st.top_rows, torch.where(v.T > 0, i.T, -1))  # random data: no ties
    assert torch.equal(st.count, (f > 0).sum(0))
    torch.testing.assert_close(st.total, f.double().sum(0))
    torch.testing.assert_close(st.max, f.max(0).values)
    assert torch.equal(st.l0, torch.bincount((f > 0).sum(1), minlength=sae.d_sae + 1))
    for j in range(sae.d_sae):
        a = f[:, j][f[:, j] > 0].double()
        width = 2.0 ** int(st.hist_exp[j]) / N_BINS
        assert a.max() < width * N_BINS <= 2 * a.max()  # the range adapted to the max
        ref = torch.bincount((a / width).floor().long(), minlength=N_BINS)
        assert torch.equal(st.hist[j], ref)


def test_windows_and_their_activations(tmp_path):
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 96, (6, 12), generator=g)
    acts = torch.randn(6, 12, D, generator=g)
    keep = torch.ones(6, 12, dtype=torch.bool)
    keep[2, 5] = False  # a dropped row leaves a hole in windows
    cache = write_cache(tmp_path / "acts", tokens, acts, keep, per_shard=2)
    m = cache.load()
    sae = random_sae(d_sae=5)
    st = feature_stats(sae, ordered_batches(cache, 16, "cpu"), 4)
    win = context_windows(m["doc"], m["pos"], st.top_rows, 3, 2)  # [d_sae, k, 6]
    for j in range(5):
        for e in range(4):
            r = int(st.top_rows[j, e])
            if r < 0:
                assert (win[j, e] == -1).all()
                continue
            d, p = int(m["doc"][r]), int(m["pos"][r])
            for o, w in zip(range(-3, 3), win[j, e].tolist()):
                present = 0 <= p + o < 12 and bool(keep[d, p + o])
                assert (w >= 0) == present
                if present:
                    assert (int(m["doc"][w]), int(m["pos"][w])) == (d, p + o)
    wa = window_activations(sae, cache, win, batch_size=5)
    f = sae.encode(m["activations"]).detach()
    ref = torch.where(win >= 0, f.T[torch.arange(5)[:, None, None], win.clamp(min=0)], 0.0)
    torch.testing.assert_close(wa, ref)
    torch.testing.assert_close(wa[:, :, 3], st.top_vals)  # the centre is the top activation itself


def test_values_at_window_rows_and_the_firing_share(tmp_path):
    got = at_rows(torch.tensor([5, 6, 7], dtype=torch.int32), torch.tensor([[2, -1], [0, 1]]))
    assert got.dtype == torch.int64 and got.tolist() == [[7, -1], [5, 6]]  # an absent row stays -1
    g = torch.Generator().manual_seed(3)
    cache = write_cache(tmp_path / "acts", torch.randint(0, 96, (6, 8), generator=g), torch.randn(6, 8, D, generator=g))
    sae = random_sae()
    st = feature_stats(sae, ordered_batches(cache, 16, "cpu"), 4)
    f = sae.encode(cache.load(dtype=torch.float32)["activations"]).detach()  # [n, d_sae]
    assert torch.equal(st.frequency(), (f > 0).sum(0).double() / len(f))
    assert 0 < st.frequency().min() and st.frequency().max() < 1  # features of different frequencies


def test_logit_lens_applies_the_norm_weight_and_ignores_biases():
    model = tiny_model("gpt2")
    W_U = model.get_output_embeddings().weight.detach()  # [V, d]
    W_dec = W_U[[7, 20]].clone()  # directions that should promote tokens 7 and 20
    up_v, up_i, down_v, down_i = logit_lens(model, W_dec, n=3)
    assert up_i[:, 0].tolist() == [7, 20]
    assert (up_v[:, 0] > 0).all() and (down_v[:, 0] < 0).all()
    norm = final_norm(model)
    assert norm is model.transformer.ln_f
    with torch.no_grad():
        norm.bias.copy_(50 * W_U[3])  # a bias towards token 3 is the same for every feature
        norm.weight.fill_(-1.0)  # a negative gain flips what each direction promotes
    up_v, up_i, down_v, down_i = logit_lens(model, W_dec, n=3)
    assert down_i[:, 0].tolist() == [7, 20]
    assert 3 not in up_i[:, 0].tolist()


def test_final_norm_is_found_in_each_family():
    for family, path in [
        ("llama", "model.norm"),
        ("gpt_neox", "gpt_neox.final_layer_norm"),
        ("gpt2", "transformer.ln_f"),
    ]:
        model = tiny_model(family)
        assert final_norm(model) is model.get_submodule(path)


# ---- the score on synthetic features whose answer is known ----------------------------------------

TOKEN_ID, PREV_ID = 10, 20


def synthetic(tmp_path, n_ctx=48, T=32):
    """Feature 0 fires on exactly one token id; feature 1 on whatever follows token PREV_ID;
    features 2..7 are random directions in a subspace that carries only noise."""
    g = torch.Generator().manual_seed(3)
    zipf = 1.0 / torch.arange(1, 95).float()
    tokens = torch.multinomial(zipf, n_ctx * T, replacement=True, generator=g).view(n_ctx, T) + 2
    tokens[torch.rand(n_ctx, T, generator=g) < 0.04] = TOKEN_ID
    tokens[torch.rand(n_ctx, T, generator=g) < 0.04] = PREV_ID
    acts = 0.5 * torch.randn(n_ctx, T, D, generator=g)
    acts[..., 0] += 6.0 * (tokens == TOKEN_ID)
    acts[:, 1:, 1] += 6.0 * (tokens[:, :-1] == PREV_ID)
    cache = write_cache(tmp_path / "acts", tokens, acts)
    sae = SAE(SAEConfig(d_in=D, d_sae=8, hook="blocks.0.hook_resid_post"))
    with torch.no_grad():
        W = torch.zeros(D, 8)
        W[0, 0] = W[1, 1] = 1.0
        r = torch.randn(D - 2, 6, generator=g)
        W[2:, 2:] = r / r.norm(dim=0)
        sae.W_enc.copy_(W)
        sae.W_dec.copy_(W.T)
        sae.b_enc.copy_(torch.tensor([-3.0, -3.0] + [0.0] * 6))
    sae.save(tmp_path / "sae")
    return cache, tokens


def run(tmp_path, **kw):
    lm = LoadedModel(tiny_model("llama"), tiny_tokenizer(), "tiny-llama", "memory", "0" * 16)
    cfg = AnalyzeConfig(
        sae=str(tmp_path / "sae"), acts=str(tmp_path / "acts"), out=str(tmp_path / "out"), device="cpu", **kw
    )
    return analyze(cfg, lm=lm), json.loads((tmp_path / "out" / "features.json").read_text())


def test_score_knows_a_token_feature_a_context_feature_and_random_directions(tmp_path):
    synthetic(tmp_path)
    summary, res = run(tmp_path)
    f = {x["id"]: x for x in res["features"]}
    assert f[0]["token_score"] == pytest.approx(1.0) and f[0]["monosemanticity"] == pytest.approx(1.0)
    assert f[0]["top_tokens"] == [[TOKEN_ID, 1.0]]
    assert f[1]["context_score"] > 0.95 and f[1]["monosemanticity"] > 0.95  # the previous token is always PREV_ID
    assert f[1]["token_score"] < 0.3
    randoms = [f[j]["monosemanticity"] for j in range(2, 8)]
    assert max(randoms) < 0.3 and sum(randoms) / 6 < 0.15, randoms
    assert {f[0]["rank"], f[1]["rank"]} == {1, 2}
    assert summary["top_features"][:2] in ([0, 1], [1, 0])
    with open(tmp_path / "out" / "ranking.csv") as fh:
        ranked = list(csv.DictReader(fh))
    assert [int(r["rank"]) for r in ranked] == list(range(1, 9))
    assert {int(ranked[0]["id"]), int(ranked[1]["id"])} == {0, 1}
    assert [float(r["score"]) for r in ranked] == sorted((float(r["score"]) for r in ranked), reverse=True)


def test_features_json_contexts_and_outputs(tmp_path):
    _, tokens = synthetic(tmp_path)
    summary, res = run(tmp_path, top_k=5, ctx_before=4, ctx_after=2)
    tok = tiny_tokenizer()
    f0 = next(x for x in res["features"] if x["id"] == 0)
    assert len(f0["examples"]) == 5
    for e in f0["examples"]:
        assert e["tokens"][e["center"]] == TOKEN_ID
        assert e["tokens"] == tokens[e["doc"], max(0, e["pos"] - 4) : e["pos"] + 3].tolist()
        assert e["acts"][e["center"]] == pytest.approx(e["act"], abs=1e-3)
        assert e["act"] == pytest.approx(max(e["acts"]), abs=1e-3)
    acts = [e["act"] for e in f0["examples"]]
    assert acts == sorted(acts, reverse=True) and acts[0] == pytest.approx(f0["max_act"], abs=1e-3)
    assert sum(f0["hist"]["counts"]) == round(f0["frequency"] * res["n_tokens"])
    assert res["vocab"][str(TOKEN_ID)] == tok.decode([TOKEN_ID])
    assert len(f0["lens"]["promoted"]) == 10 and len(f0["lens"]["suppressed"]) == 10
    out = tmp_path / "out"
    for name in ("features.json", "ranking.csv", "index.html"):
        assert (out / name).stat().st_size > 0
    for name in ("feature_density.png", "l0_per_token.png", "score_distribution.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["mean_l0"] > 0 and summary["d_sae"] == 8
    assert not list(out.glob("*.tmp*"))


def test_refuses_what_it_cannot_do(tmp_path):
    synthetic(tmp_path)
    with pytest.raises(UserError, match="top-k"):
        run(tmp_path, top_k=1)
    SAE(SAEConfig(d_in=16, d_sae=4)).save(tmp_path / "small")
    lm = LoadedModel(tiny_model("llama"), tiny_tokenizer(), "tiny-llama", "memory", "0" * 16)
    with pytest.raises(UserError, match="size 16"):
        analyze(
            AnalyzeConfig(
                sae=str(tmp_path / "small"), acts=str(tmp_path / "acts"), out=str(tmp_path / "o2"), device="cpu"
            ),
            lm=lm,
        )
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        analyze(
            AnalyzeConfig(
                sae=str(tmp_path / "sae"), acts=str(tmp_path / "acts"), out=str(tmp_path / "busy"), device="cpu"
            ),
            lm=lm,
        )


def test_canonical_ids_merge_case_and_spacing_variants_only():
    from sae_lens_lite.interpret.analyze import canonical_ids

    class Tok:
        texts = [" index", "Index", "index", " the", "\n", " ", "The", "indexes"]

        def batch_decode(self, ids):
            return [self.texts[i[0]] for i in ids]

    assert canonical_ids(Tok(), 8).tolist() == [0, 0, 0, 3, 4, 5, 3, 7]


# ---- what real SAEs and caches throw at it: near-dead, dead, one token ---------------------------


def strict_json(path):
    """features.json parsed as browsers parse it: NaN and Infinity are errors."""
    return json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in {path.name}"))


def test_a_feature_whose_top_activations_round_to_zero_gets_top_tokens(tmp_path):
    synthetic(tmp_path)
    sae = SAE.load(tmp_path / "sae")
    with torch.no_grad():
        sae.W_enc[:, 2] = 0.0
        sae.b_enc[2] = 1e-5  # fires on every token at 1e-5: rounded to 4 decimals, every top value is 0
    sae.save(tmp_path / "sae")
    run(tmp_path)
    f2 = strict_json(tmp_path / "out" / "features.json")["features"][2]
    assert f2["max_act"] == 0.0 and len(f2["examples"]) == 16
    shares = [s for _, s in f2["top_tokens"]]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1.0001


@pytest.mark.parametrize("case", ["all_dead", "one_token"])
def test_all_dead_sae_and_one_token_cache_give_a_valid_analysis(tmp_path, case):
    synthetic(tmp_path)
    sae = SAE.load(tmp_path / "sae")
    if case == "all_dead":
        with torch.no_grad():
            sae.b_enc.fill_(-100.0)  # no feature ever fires
        sae.save(tmp_path / "sae")
    else:
        import shutil

        shutil.rmtree(tmp_path / "acts")
        write_cache(
            tmp_path / "acts", torch.tensor([[TOKEN_ID]]), 6.0 * torch.eye(D)[None, :1]
        )  # one row: feature 0 fires
    summary, _ = run(tmp_path)
    res = strict_json(tmp_path / "out" / "features.json")
    feats = res["features"]
    assert sorted(f["rank"] for f in feats) == list(range(1, 9))
    if case == "all_dead":
        assert summary["dead_features"] == 8 and summary["mean_l0"] == 0.0
        assert all(
            f["score"] == 0.0 and f["top_tokens"] == [] and f["examples"] == [] and f["frequency"] == 0.0 for f in feats
        )
    else:
        assert res["n_tokens"] == 1 and feats[0]["frequency"] == 1.0 and feats[0]["top_tokens"] == [[TOKEN_ID, 1.0]]
        assert feats[0]["examples"][0]["tokens"] == [TOKEN_ID] and feats[0]["score"] == 0.0  # one example: no evidence
    for name in ("feature_density.png", "l0_per_token.png", "score_distribution.png"):
        assert (tmp_path / "out" / name).read_bytes()[:4] == b"\x89PNG"
    with open(tmp_path / "out" / "ranking.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 8


def test_read_features_checks_the_schema(tmp_path):
    from sae_lens_lite.interpret.features import FORMAT, Feature, read_features

    synthetic(tmp_path)
    run(tmp_path)
    out = tmp_path / "out"
    data = read_features(out, d_sae=8)
    assert all(set(Feature.__required_keys__) <= set(f) for f in data["features"])
    with pytest.raises(UserError, match="8 features, this one has 9"):
        read_features(out, d_sae=9)
    f = tmp_path / "bad" / "features.json"
    f.parent.mkdir()
    good = json.loads((out / "features.json").read_text())
    cases = {
        "{not json": "not valid JSON",
        json.dumps([{"id": 0}]): "not a features.json written by",
        json.dumps({**good, "version": 99}): "upgrade",
        json.dumps({k: v for k, v in good.items() if k != "vocab"}): "lacks vocab",
        json.dumps({**good, "features": good["features"][:3]}): "should list 8 features",
        json.dumps(
            {**good, "features": [{k: v for k, v in x.items() if k != "lens"} for x in good["features"]]}
        ): "entry 0",
    }
    for text, msg in cases.items():
        f.write_text(text)
        with pytest.raises(UserError, match=msg):
            read_features(f.parent)
    assert good["format"] == FORMAT
    with pytest.raises(UserError, match="not found"):
        read_features(tmp_path / "nowhere")


def test_result_line_names_the_ranking_score_and_monosemanticity_apart(tmp_path, capsys):
    # The result line once printed monosemanticity as "score"; `score` is the ranking key (docs/analysis.md).
    synthetic(tmp_path)
    summary, res = run(tmp_path)
    best = next(f for f in res["features"] if f["rank"] == 1)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary["top_features"][0] == best["id"]
    assert (
        f"best feature {best['id']} (score {best['score']:.3f}, monosemanticity {best['monosemanticity']:.3f})" in line
    ), line
    assert best["score"] != best["monosemanticity"]  # otherwise the test could not tell them apart
