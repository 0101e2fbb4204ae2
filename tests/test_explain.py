import json

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer
from test_analyze import D, write_cache

from sae_lens_lite.data.models import LoadedModel
from sae_lens_lite.errors import UserError
from sae_lens_lite.interpret import explain
from sae_lens_lite.interpret.analyze import AnalyzeConfig, analyze, canonical_ids
from sae_lens_lite.interpret.contexts import RowContext
from sae_lens_lite.training.sae import SAE, SAEConfig

N_CTX, T = 64, 32


def single_ids(tok, n=96):
    """Token ids that are alone in their case-and-spacing class and not whitespace: a pattern on
    one of them matches exactly that id."""
    canon = canonical_ids(tok, n)
    texts = tok.batch_decode([[i] for i in range(n)])
    return [i for i in range(2, n) if (canon == i).sum() == 1 and canon[i] == i and texts[i].strip()]


def planted(tmp_path):
    """Features with known triggers: 0 fires on token A; 1 on whatever follows token B; 2 on token
    C only right after token E; 3 on token A but only in the explain contexts (so its explanation
    cannot be confirmed on held-out ones); 4..11 are random directions in a subspace of noise."""
    tok = tiny_tokenizer()
    A, B, C, E = single_ids(tok)[3:7]
    g = torch.Generator().manual_seed(3)
    zipf = 1.0 / torch.arange(1, 95).float()
    tokens = torch.multinomial(zipf, N_CTX * T, replacement=True, generator=g).view(N_CTX, T) + 2
    for t, p in ((A, 0.05), (B, 0.05), (C, 0.04)):
        tokens[torch.rand(N_CTX, T, generator=g) < p] = t
    at = torch.rand(N_CTX, T - 1, generator=g) < 0.04  # plant "E C" pairs
    tokens[:, :-1][at], tokens[:, 1:][at] = E, C
    acts = 0.5 * torch.randn(N_CTX, T, D, generator=g)
    acts[..., 0] += 6.0 * (tokens == A)
    acts[:, 1:, 1] += 6.0 * (tokens[:, :-1] == B)
    acts[:, 1:, 2] += 6.0 * ((tokens[:, 1:] == C) & (tokens[:, :-1] == E))
    held = explain.heldout_rows(torch.arange(N_CTX), 0.25)  # the analysis holds out these contexts
    acts[..., 3] += 6.0 * ((tokens == A) & ~held[:, None])
    write_cache(tmp_path / "acts", tokens, acts)
    d_sae = 12
    sae = SAE(SAEConfig(d_in=D, d_sae=d_sae, hook="blocks.0.hook_resid_post"))
    with torch.no_grad():
        W = torch.zeros(D, d_sae)
        W[:4, :4] = torch.eye(4)
        r = torch.randn(D - 4, d_sae - 4, generator=g)
        W[4:, 4:] = r / r.norm(dim=0)
        sae.W_enc.copy_(W)
        sae.W_dec.copy_(W.T)
        sae.b_enc.copy_(torch.tensor([-3.0] * 4 + [0.0] * (d_sae - 4)))
    sae.save(tmp_path / "sae")
    name = lambda i: explain.token_name(tok.decode([i]))  # noqa: E731
    return {"A": name(A), "B": name(B), "C": name(C), "E": name(E)}


def run(tmp_path, **kw):
    lm = LoadedModel(tiny_model("llama"), tiny_tokenizer(), "tiny-llama", "memory", "0" * 16)
    cfg = AnalyzeConfig(
        sae=str(tmp_path / "sae"), acts=str(tmp_path / "acts"), out=str(tmp_path / "out"), device="cpu", **kw
    )
    return analyze(cfg, lm=lm), json.loads((tmp_path / "out" / "features.json").read_text())


def test_builtin_explainer_names_planted_triggers_and_ranks_them_first(tmp_path):
    names = planted(tmp_path)
    summary, res = run(tmp_path)
    f = {x["id"]: x for x in res["features"]}
    assert f[0]["explanation"] == names["A"]
    assert f[1]["explanation"] == f"the token after {names['B']}"
    assert f[2]["explanation"] == f"{names['C']} after {names['E']}"
    for j in (0, 1, 2):  # the pattern is the trigger: perfect on held-out tokens
        d = f[j]["detection"]
        assert d["precision"] == d["recall"] == d["f1"] == 1.0 and d["fires"] >= 10, d
    assert {f[j]["rank"] for j in (0, 1, 2)} == {1, 2, 3}  # planted features above random directions
    # Feature 3 reads as A on the explain contexts but never fires on held-out ones: scored 0.
    assert f[3]["explanation"] == names["A"] and f[3]["explain_f1"] == 1.0
    assert f[3]["detection"]["f1"] == 0.0 and f[3]["detection"]["fires"] == 0 and f[3]["score"] == 0.0
    for j in range(4, 12):  # random directions: the explanation does no better than the base rate
        d, base = f[j]["detection"], f[j]["frequency"]
        assert f[j]["score"] < 0.7 and abs(d["precision"] - base) < 0.12, (j, d, base)
    # Same explanation, one family: 0 and 3 both read as A; the family lists its best member first.
    fam = res["families"][f[0]["family"]]
    assert fam["explanation"] == names["A"] and fam["members"] == [0, 3] and f[3]["family"] == f[0]["family"]
    assert len(res["families"]) == len({x["explanation"] for x in res["features"]}) == summary["n_families"]
    assert res["heldout"]["share"] == 0.25 and 0 < res["heldout"]["tokens"] < res["n_tokens"]
    # Examples across activation quantiles, each on a firing token, highest quantile first.
    q = f[0]["quantiles"]
    assert len(q) == explain.N_QUANTILES and all(len(x) == 2 for x in q)
    acts = [e["act"] for x in q for e in x]
    assert all(a > 0 for a in acts) and acts == sorted(acts, reverse=True)
    assert all(e["acts"][e["center"]] == e["act"] for x in q for e in x)
    # The nearest decoder direction of a random direction is another random one (the planted
    # directions are orthogonal to everything else).
    assert f[5]["nearest"][0][0] >= 4 and abs(f[0]["nearest"][0][1]) < 1e-6
    assert summary["cost"]["builtin_explain_s"] > 0


def test_detection_scores_have_known_answers():
    """A perfect pattern scores F1 1.0; a pattern unrelated to the firing gets precision at the
    base rate; everything is counted on the held-out split only."""
    g = torch.Generator().manual_seed(0)
    n, V = 20000, 50
    cur = torch.randint(0, V, (n,), generator=g)
    prev = torch.cat([torch.tensor([V]), cur[:-1]])
    held = torch.arange(n) % 2 == 1
    f = torch.zeros(n, 3)
    f[:, 0] = (cur == 7).float()  # perfect: token 7
    f[:, 1] = (torch.rand(n, generator=g) < 0.1).float()  # random, base rate 0.1
    f[:, 2] = ((cur == 3) & ~held).float()  # fires on token 3 only in the explain half
    pc = explain.PatternCounts(cur, prev, held, V, 3)
    for s in range(0, n, 777):
        pc.update(s, f[s : s + 777])
    counts = pc.finish()
    d = explain.detection(counts, 0, "token", [(-1, 7)])
    assert d["precision"] == d["recall"] == d["f1"] == 1.0 and d["fires"] == int((f[held, 0] > 0).sum())
    d = explain.detection(counts, 1, "token", [(-1, t) for t in range(10)])  # 20 % of the tokens
    assert d["precision"] == pytest.approx(0.1, abs=0.02) and d["recall"] == pytest.approx(0.2, abs=0.03)
    assert d["f1"] == pytest.approx(2 * 0.1 * 0.2 / 0.3, abs=0.03)
    assert explain.detection(counts, 2, "token", [(-1, 3)], split=0)["f1"] == 1.0
    assert explain.detection(counts, 2, "token", [(-1, 3)])["f1"] == 0.0
    assert explain.find_pattern(counts, 0) == ("token", [(-1, 7)], 1.0)
    # The uniform sample of firings lies on firing rows of the right split.
    rows, vals = counts.sample_rows[1, 0], counts.sample_vals[1, 0]
    assert (rows >= 0).all() and (cur[rows] == 7).all() and held[rows].all() and (vals == 1).all()


def test_a_feature_no_token_marks_out_is_explained_as_such():
    """Firing at random on 0.5% of tokens of a 4-token vocabulary: no token, previous token or pair
    raises F1 by MIN_GAIN, so there is no pattern, and the explanation says so (a 16x SmolLM2 SAE
    had such features; they crashed the phrase)."""
    g = torch.Generator().manual_seed(0)
    n, V = 20000, 4
    cur = torch.randint(0, V, (n,), generator=g)
    prev = torch.cat([torch.tensor([V]), cur[:-1]])
    f = (torch.rand(n, 2, generator=g) < 0.005).float()
    f[:, 1] = (cur == 2).float()
    pc = explain.PatternCounts(cur, prev, torch.arange(n) % 2 == 1, V, 2)
    pc.update(0, f)
    counts = pc.finish()
    assert explain.find_pattern(counts, 0) == ("", [], 0.0)
    e = explain.explain_all(counts, lambda i: f"t{i}")
    assert e[0]["explanation"] == explain.NO_PATTERN and e[0]["pattern"] is None and e[0]["detection"]["hits"] == 0
    assert e[1]["explanation"] == "t2"


def test_phrases_name_tokens_for_people():
    assert explain.token_name(" The") == '"The"' and explain.token_name("\n") == "newline"
    assert explain.token_name("    ") == "4 spaces" and explain.token_name("\n\n") == "2 newlines"
    assert explain.token_name("\n\n   ") == "2 newlines + 3 spaces" and explain.token_name("\u3000") == '"\\u3000"'
    name = {1: '"of"', 2: '"in"', 3: '"the"', 4: '"a"'}.get
    assert explain.phrase("token", [(-1, 3), (-1, 4)], name) == '"the" or "a"'
    assert explain.phrase("after", [(1, -1), (2, -1), (4, -1)], name) == 'the token after "of", "in" or "a"'
    assert explain.phrase("pair", [(1, 3), (2, 3)], name) == '"the" after "of" or "in"'
    assert explain.phrase("pair", [(1, 3), (2, 4)], name) == '"the" after "of", or "a" after "in"'


def test_families_group_equal_explanations_best_first():
    fams = explain.families(['"a"', '"b"', '"a"', '"c"'], [2, 1, 3, 0])
    assert fams == [
        {"id": 0, "explanation": '"a"', "members": [2, 0]},
        {"id": 1, "explanation": '"b"', "members": [1]},
        {"id": 2, "explanation": '"c"', "members": [3]},
    ]


def test_nearest_and_agreement_metrics():
    W = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, -2.0]])
    cos, ids = explain.nearest(W, n=2)
    assert ids.tolist() == [[1, 2], [0, 2], [0, 1]]
    torch.testing.assert_close(cos, torch.tensor([[0.6, 0.0], [0.6, -0.8], [0.0, -0.8]]))
    label = torch.tensor([True, True, False, False])
    assert explain.balanced_accuracy(torch.tensor([1.0, 1.0, 1.0, 1.0]), label) == 0.5  # always yes
    assert explain.balanced_accuracy(torch.tensor([1.0, -1.0, -1.0, -1.0]), label) == 0.75
    assert explain.auroc(torch.tensor([3.0, 2.0, 1.0, 0.0]), label) == 1.0
    assert explain.auroc(torch.tensor([1.0, 1.0, 1.0, 1.0]), label) == 0.5


def test_model_explanations_are_scored_cached_and_resumed(tmp_path, monkeypatch):
    planted(tmp_path)
    summary, res = run(tmp_path, explain_top=2, explainer="tiny-llama")  # the analysis model doubles as explainer
    done = [f for f in res["features"] if "model_explanation" in f]
    heads = [fam["members"][0] for fam in res["families"][:2]]
    assert sorted(f["id"] for f in done) == sorted(heads)
    for f in done:
        m = f["model_explanation"]
        assert isinstance(m["explanation"], str) and 0 <= m["balanced_accuracy"] <= 1 and 0 <= m["auroc"] <= 1
        assert m["n_scored"] >= 8 and m["n_scored"] % 2 == 0  # as many non-activating contexts as activating ones
    cached = json.loads((tmp_path / "out" / "model_explanations.json").read_text())
    assert set(cached["features"]) == {str(j) for j in heads}
    assert summary["cost"]["model_explained"] == 2

    def fail(*a, **k):
        raise AssertionError("a finished feature was explained again")

    monkeypatch.setattr(explain.ModelExplainer, "explain", fail)
    _, again = run(tmp_path, explain_top=2, explainer="tiny-llama")
    assert [f.get("model_explanation") for f in again["features"]] == [
        f.get("model_explanation") for f in res["features"]
    ]
    # More families is a change of settings (the rerun rule asks for --overwrite); the two
    # finished explanations are still reused, so the first model call is for the third family.
    with pytest.raises(UserError, match="explain_top"):
        run(tmp_path, explain_top=3, explainer="tiny-llama")
    calls = []
    monkeypatch.setattr(explain.ModelExplainer, "explain", lambda self, shown: calls.append(1) or "a word")
    _, third = run(tmp_path, explain_top=3, explainer="tiny-llama", overwrite=True)
    assert len(calls) == 1 and sum("model_explanation" in f for f in third["features"]) == 3


def test_refuses_bad_explain_settings(tmp_path):
    planted(tmp_path)
    with pytest.raises(UserError, match="heldout"):
        run(tmp_path, heldout=1.0)
    with pytest.raises(UserError, match="explain-top"):
        run(tmp_path, explain_top=-1)
    with pytest.raises(UserError, match="holds out none of the cache's 64 contexts"):
        run(tmp_path, heldout=0.001)  # 64 contexts: none held out


def planted_contexts(n_ctx=240, T=48, seed=0):
    """A token stream over a small vocabulary with brackets and a marker, and four features with
    known triggers: 0 fires on any token within 3 after the marker "M"; 1 on every token inside
    parentheses (not on "(" or ")" themselves); 2 on "w3" but only inside parentheses; 3 on "w5"
    anywhere. Returns the explainer's inputs and the ground truth."""
    vocab = [f" w{i}" for i in range(16)] + [" M", "(", ")", "[", "]", "\n"]
    V = len(vocab)
    ix = {t.strip() or t: i for i, t in enumerate(vocab)}
    g = torch.Generator().manual_seed(seed)
    p = torch.full((V,), 1.0)
    p[ix["M"]], p[ix["("]], p[ix[")"]], p[ix["["]], p[ix["]"]] = 0.3, 0.5, 0.5, 0.2, 0.2
    tok = torch.multinomial(p, n_ctx * T, replacement=True, generator=g).view(n_ctx, T)
    fire = torch.zeros(n_ctx, T, 4)
    for c in range(n_ctx):
        depth = 0
        for t in range(T):
            x = int(tok[c, t])
            before = depth
            depth = depth + 1 if x == ix["("] else depth - 1 if x == ix[")"] and depth > 0 else depth
            inside = before > 0 and depth > 0
            fire[c, t, 0] = float(ix["M"] in tok[c, max(0, t - 3) : t].tolist())
            fire[c, t, 1] = float(inside)
            fire[c, t, 2] = float(inside and x == ix["w3"])
            fire[c, t, 3] = float(x == ix["w5"])
    doc = torch.arange(n_ctx).repeat_interleave(T)
    pos = torch.arange(T).repeat(n_ctx)
    cur = tok.flatten()
    prev = torch.where(pos > 0, torch.cat([torch.tensor([V]), cur[:-1]]), V)
    held = explain.heldout_rows(doc, 0.25)
    pc = explain.PatternCounts(cur, prev, held, V, 4)
    for s in range(0, len(cur), 1000):
        pc.update(s, fire.view(-1, 4)[s : s + 1000])
    counts = pc.finish()
    ctx = RowContext.build(
        [vocab[i] for i in cur.tolist()], cur.numpy(), doc.numpy(), pos.numpy(), held.long().numpy(), V + 1
    )
    name = lambda i: explain.token_name(vocab[i]) if i < V else "the start of a context"  # noqa: E731
    return counts, ctx, name, fire.view(-1, 4), held, ix


def test_builtin_explainer_names_planted_context_features():
    counts, ctx, name, fire, held, ix = planted_contexts()
    e = explain.explain_all(counts, name, ctx)
    assert e[0]["explanation"] == 'a token within 3 tokens after "M"'
    assert e[1]["explanation"] == "a token inside parentheses"
    assert e[2]["explanation"] == '"w3", inside parentheses'
    assert e[3]["explanation"] == '"w5"'  # a token feature stays a token pattern: the simpler wins
    for j in range(4):
        d = e[j]["detection"]
        assert d["precision"] == d["recall"] == d["f1"] == 1.0 and d["fires"] >= 50, (j, d)
    # Without the row context, the same features get only token patterns, and score far lower.
    plain = explain.explain_all(counts, name)
    assert plain[0]["detection"]["f1"] < 0.7 and plain[1]["detection"]["f1"] < 0.7


def test_context_detection_counts_every_held_out_token():
    """A context pattern's counts are those of a direct count over the held-out rows, for a
    pattern that is not the feature's trigger (so precision and recall are both below 1)."""
    counts, ctx, name, fire, held, ix = planted_contexts(seed=1)
    rows = torch.arange(len(held))[held].numpy()
    for kind, items in (("window", [[ix["M"], 5]]), ("attribute", [[4, 1]]), ("token_in", [[4, ix["w3"]]])):
        match = torch.from_numpy(ctx.matches(kind, items, rows))
        for j in (0, 1):
            d = explain.detection(counts, j, kind, items, ctx=ctx)
            fired = fire[held, j] > 0
            assert d["predicted"] == int(match.sum()) and d["hits"] == int((match & fired).sum())
            assert d["fires"] == int(fired.sum())
    # ... and the match itself is the definition: "M" within the previous 5 tokens, same context
    tok = torch.from_numpy(ctx.cur)
    want = [ix["M"] in tok[max(r - r % 48, r - 5) : r].tolist() for r in rows.tolist()]
    assert ctx.matches("window", [[ix["M"], 5]], rows).tolist() == want
