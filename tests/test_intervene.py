"""Steering, ablation and attribution on tiny models, with SAEs built by hand so the answer is known."""

import pytest
import torch
from conftest import FAMILIES, tiny_model, tiny_tokenizer

from sae_lens_lite.cli import main
from sae_lens_lite.data.models import LoadedModel, edit_hook, generate, generate_batch, run_to_hooks
from sae_lens_lite.errors import UserError
from sae_lens_lite.evaluation.metrics import next_token_logprobs
from sae_lens_lite.interpret.intervene import (
    AttributeConfig,
    SteerConfig,
    ablation_effects,
    attribute,
    attribution,
    encode_prompt,
    positions,
    steer,
    steering_edit,
)
from sae_lens_lite.training.sae import SAE, SAEConfig

PROMPT = "The quick brown fox jumps over the lazy dog. Sparse autoencoders find"


def tiny_lm(family="llama", n_layers=3):
    return LoadedModel(tiny_model(family, n_layers), tiny_tokenizer(), f"tiny-{family}", "memory", "0" * 16)


def random_sae(lm, hook="blocks.1.hook_resid_post", d_sae=64, seed=0, dec_norm=0.1, drop_first=1):
    torch.manual_seed(seed)
    sae = SAE(
        SAEConfig(d_in=lm.d_model, d_sae=d_sae, model=lm.name, hook=hook, meta={"filters": {"drop_first": drop_first}})
    )
    with torch.no_grad():
        sae.reset_parameters(dec_norm=dec_norm)
        sae.W_enc.mul_(20.0)  # residuals of a fresh tiny model are small: make latents fire
        sae.b_enc.fill_(-0.05)
    return sae.requires_grad_(False)


def logits_with(lm, ids, hook=None, fn=None):
    with torch.no_grad(), edit_hook(lm.model, hook, fn) if fn else torch.no_grad():
        return lm.model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_strength_and_self_clamp_change_nothing(family):
    lm = tiny_lm(family)
    sae = random_sae(lm)
    hook = sae.cfg.hook
    ids = encode_prompt(lm, PROMPT)
    mask = positions(lm, sae, ids)
    clean = logits_with(lm, ids)
    # strength 0 adds exactly nothing, at every position
    assert torch.equal(logits_with(lm, ids, hook, steering_edit(sae, [3, 5], 0.0, "add", mask)), clean)
    # a latent forced off everywhere, clamped to 0: its own value, so the error term must survive
    with torch.no_grad():
        sae.b_enc[7] = -1e4
    assert torch.equal(logits_with(lm, ids, hook, steering_edit(sae, [7], 0.0, "clamp", mask)), clean)
    # at one spliced position, clamp the most active latent to exactly its value there
    two = ids[:, :2]
    x = _act(lm, two, hook)[0, 1]
    f = sae.encode(x[None])[0]
    j = int(f.argmax())
    assert f[j] > 0
    m2 = positions(lm, sae, two)
    assert m2.tolist() == [[False, True]]
    assert torch.equal(
        logits_with(lm, two, hook, steering_edit(sae, [j], float(f[j]), "clamp", m2)), logits_with(lm, two)
    )
    # ... and the edits do act when they should
    assert not torch.equal(logits_with(lm, ids, hook, steering_edit(sae, [3], 1.0, "add", mask)), clean)


def _act(lm, ids, hook):
    return run_to_hooks(lm.model, ids, [hook])[hook].clone()


def test_clamp_is_add_of_the_difference_and_leaves_unread_positions():
    lm = tiny_lm()
    sae = random_sae(lm)
    hook = sae.cfg.hook
    ids = encode_prompt(lm, PROMPT)
    mask = positions(lm, sae, ids)
    assert not mask[0, 0] and mask[0, 1:].all()  # drop_first=1: position 0 is not read
    x = _act(lm, ids, hook)  # [1, T, d]
    j, S = 4, 2.5
    new = steering_edit(sae, [j], S, "clamp", mask)(x)
    f = sae.encode(x[0])[:, j]  # [T]
    want = x[0] + (S - f)[:, None] * sae.W_dec[j] / sae.input_scale
    torch.testing.assert_close(new[0, 1:], want[1:])
    assert torch.equal(new[0, 0], x[0, 0])
    added = steering_edit(sae, [j, 2], S, "add", mask)(x)
    torch.testing.assert_close(added[0, 1:], x[0, 1:] + S * (sae.W_dec[j] + sae.W_dec[2]) / sae.input_scale)


def planted(family="llama", token=None):
    """A tiny model and an SAE whose latent 0 writes `token`'s unembedding direction at the last block."""
    lm = tiny_lm(family, n_layers=2)
    sae = random_sae(lm, hook="blocks.1.hook_resid_post")
    token = token if token is not None else lm.tokenizer.convert_tokens_to_ids("fox")
    W_U = lm.model.get_output_embeddings().weight  # [vocab, d]
    d = W_U[token] - W_U.mean(0)
    with torch.no_grad():
        sae.W_dec[0] = d / d.norm()
    return lm, sae, token


@pytest.mark.parametrize("family", FAMILIES)
def test_steering_a_planted_feature_raises_its_token(family):
    lm, sae, fox = planted(family)
    hook = sae.cfg.hook
    ids = encode_prompt(lm, PROMPT)
    clean = next_token_logprobs(lm.model, ids, hook, None)[0, :, fox]  # [T-1]
    for mode, S in (("add", 1.0), ("add", 5.0), ("clamp", 5.0)):
        steered = next_token_logprobs(lm.model, ids, hook, steering_edit(sae, [0], S, mode, positions(lm, sae, ids)))[
            0, :, fox
        ]
        assert (steered[1:] > clean[1:]).all(), (mode, S)  # every position the SAE reads
    out = steer(SteerConfig(feature=[0], strength=20.0, prompt=PROMPT, max_new_tokens=5), lm=lm, sae=sae)
    assert out["steered"].token_ids == [fox] * 5 and out["clean"].token_ids != [fox] * 5
    # a fresh model's logits are small (log p ~ -4.6 for any token), but fox is always its top choice now
    assert min(out["steered"].logprobs) > max(clean.tolist())
    assert len(out["clean"].logprobs) == len(out["clean"].token_ids)


def test_generation_is_greedy_or_seeded():
    lm = tiny_lm()
    ids = encode_prompt(lm, PROMPT)
    g = generate(lm, ids, 6)
    # greedy: each token is the argmax of a plain forward over the text so far
    full = torch.cat([ids, torch.tensor([g.token_ids])], 1)
    logp = next_token_logprobs(lm.model, full)[0, ids.shape[1] - 1 :]
    assert logp.argmax(-1).tolist()[: len(g.token_ids)] == g.token_ids
    torch.testing.assert_close(torch.tensor(g.logprobs), logp.gather(1, torch.tensor(g.token_ids)[:, None])[:, 0])
    a, b = (generate(lm, ids, 8, sample=True, seed=3) for _ in range(2))
    c = generate(lm, ids, 8, sample=True, seed=4)
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids


def _recompute(lm, ids, n, hook=None, edit_for=None):
    """Greedy decoding the slow way: a full forward over the whole text for every new token."""
    out = []
    for _ in range(n):
        fn = edit_for(ids) if edit_for else None
        with torch.no_grad(), edit_hook(lm.model, hook, fn) if fn else torch.no_grad():
            tok = int(lm.model(input_ids=ids, use_cache=False).logits[0, -1].argmax())
        out.append(tok)
        ids = torch.cat([ids, torch.tensor([[tok]])], 1)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_generation_gives_the_recomputed_tokens(family):
    """Keys and values reused: the same greedy tokens as recomputing the prefix, with and without
    an edit at the hook (the edit also acts on the generated tokens), one row or a batch."""
    lm, sae, _ = planted(family)  # latent 0 writes a token's direction: edits visibly change the text
    hook = sae.cfg.hook
    ids = encode_prompt(lm, PROMPT)
    n = 12
    assert generate(lm, ids, n).token_ids == _recompute(lm, ids, n)
    for mode, S in (("add", 3.0), ("clamp", 2.0)):
        edit_for = lambda cur, mode=mode, S=S: steering_edit(sae, [0], S, mode, positions(lm, sae, cur))  # noqa: E731
        want = _recompute(lm, ids, n, hook, edit_for)
        assert generate(lm, ids, n, hook, edit_for).token_ids == want
        assert want != _recompute(lm, ids, n), "the edit should change the text"
    # a batch of rows, each with its own strength, gives each row's own continuation
    strengths = torch.tensor([0.0, 3.0, -3.0])
    d = sae.W_dec[0] / sae.input_scale

    def per_row(cur):
        mask = positions(lm, sae, cur)

        def fn(act):
            return torch.where(mask[..., None], act + strengths[:, None, None] * d, act)

        return fn

    rows = generate_batch(lm, ids.expand(3, -1), n, hook, per_row)
    assert rows[0].token_ids == _recompute(lm, ids, n)
    for g, S in zip(rows[1:], strengths[1:].tolist()):
        one = lambda cur, S=S: steering_edit(sae, [0], S, "add", positions(lm, sae, cur))  # noqa: E731
        assert g.token_ids == _recompute(lm, ids, n, hook, one)


def test_attribution_matches_ablation_where_linear():
    """Latents of size ~1 whose decoder rows are 1% of the residual's norm keep the model in its
    linear regime, where activation x gradient is the first-order ablation effect: within 10%.
    (On a real SAE, large latents and the norms make it less exact: see docs/analysis.md.)"""
    lm = tiny_lm()
    lm.model.double()
    sae = random_sae(lm, hook="blocks.0.hook_resid_post").double()
    ids = encode_prompt(lm, PROMPT)
    scale = float(_act(lm, ids, sae.cfg.hook)[0, 1:].norm(dim=-1).mean())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(lm.d_model, sae.d_sae, generator=g) / scale)  # latents ~ relu(N(0, 1))
        sae.b_enc.zero_()
        sae.W_dec.mul_(0.01 * scale / sae.W_dec.norm(dim=1, keepdim=True))
    a = attribution(lm, sae, ids)
    per = a.latents.sum(0)
    top = per.abs().topk(8).indices.tolist()
    abl = ablation_effects(lm, sae, ids, a.target, top)
    assert (per[top].abs() > 0).all()
    for j, m in zip(top, abl.tolist()):
        assert abs(per[j].item() - m) <= 0.10 * abs(m), (j, per[j].item(), m)
    # the parts add up to x . d log p / dx at the hook, computed here without the SAE
    x = _act(lm, ids, sae.cfg.hook).clone().requires_grad_(True)
    with torch.enable_grad(), edit_hook(lm.model, sae.cfg.hook, lambda _: x):
        lp = lm.model(input_ids=ids, use_cache=False).logits[0, -1].log_softmax(-1)[a.target]
        (g,) = torch.autograd.grad(lp, x)
    want = (x * g).sum(-1)[0]  # [T]
    mask = positions(lm, sae, ids)[0]
    torch.testing.assert_close(a.total[mask], want[mask].to(a.total.dtype))
    assert a.target == int(lm.model(input_ids=ids).logits[0, -1].argmax())
    assert a.logp == pytest.approx(lp.item())


def test_attribution_finds_the_planted_feature():
    lm, sae, fox = planted()
    ids = encode_prompt(lm, PROMPT)
    with torch.no_grad():
        sae.b_enc[0] = 1.0  # latent 0 fires everywhere
    r = attribute(AttributeConfig(prompt=PROMPT, target="fox", top=3), lm=lm, sae=sae)
    assert r["target"] == fox and r["raising"][0]["feature"] == 0
    assert r["raising"][0]["ablation"] > 0
    assert len(r["raising"][0]["per_position"]) == ids.shape[1]


@pytest.mark.parametrize("family", FAMILIES)
def test_attribute_runs_on_every_family(family):
    lm = tiny_lm(family)
    sae = random_sae(lm)
    r = attribute(AttributeConfig(prompt=PROMPT, top=4), lm=lm, sae=sae)
    assert r["total"] == pytest.approx(r["sum_latents"] + r["error"] + r["bias"], abs=1e-5)
    assert r["raising"] and all(x["attribution"] > 0 for x in r["raising"])


def test_bad_input_is_a_user_error():
    lm = tiny_lm()
    sae = random_sae(lm)
    with pytest.raises(UserError, match=r"out of range: this SAE has features 0..63"):
        steer(SteerConfig(feature=[64], prompt=PROMPT), lm=lm, sae=sae)
    with pytest.raises(UserError, match="pass at least one feature"):
        steer(SteerConfig(prompt=PROMPT), lm=lm, sae=sae)
    for fn, cfg in ((steer, SteerConfig(feature=[1], prompt="  ")), (attribute, AttributeConfig(prompt=""))):
        with pytest.raises(UserError, match="prompt is empty"):
            fn(cfg, lm=lm, sae=sae)
    wide = SAE(SAEConfig(d_in=48, d_sae=64, hook="blocks.1.hook_resid_post"))
    with pytest.raises(UserError, match="reads 48-dim activations but tiny-llama has d_model 32"):
        steer(SteerConfig(feature=[1], prompt=PROMPT), lm=lm, sae=wide)
    with pytest.raises(UserError, match=r"is 3 tokens \[.fox., .jump., .s.\], not one"):
        attribute(AttributeConfig(prompt=PROMPT, target="fox jumps"), lm=lm, sae=sae)
    with pytest.raises(UserError, match="no position the SAE reads"):
        attribute(AttributeConfig(prompt="fox"), lm=lm, sae=sae)


def test_cli_steer_and_attribute(tmp_path, capsys):
    lm, sae, fox = planted()
    lm.model.save_pretrained(tmp_path / "model")
    lm.tokenizer.save_pretrained(tmp_path / "model")
    sae.cfg.model = str(tmp_path / "model")
    sae.save(tmp_path / "sae")
    base = ["--sae", str(tmp_path / "sae"), "--device", "cpu", "--prompt", PROMPT]
    assert main(["steer", *base, "--feature", "0", "--strength", "20", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "[clean]" in out and f"{PROMPT}fox fox fox\n" in out
    assert main(["attribute", *base, "--target", "fox", "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "raising log p" in out and "ablation agrees in sign" in out
    assert main(["steer", *base, "--feature", "99"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "out of range" in err


def test_analyze_steer_puts_the_steer_sample_in_the_card(tmp_path):
    """analyze --steer writes, for the N best-ranked features, what `steer --mode add` generates."""
    import json

    from test_analyze import run, synthetic

    synthetic(tmp_path)
    sae = SAE.load(tmp_path / "sae")
    with torch.no_grad():
        sae.input_scale.fill_(2.0)  # analyze folds the scale into W_dec; the strength must mean the same
    sae.save(tmp_path / "sae")
    _, res = run(tmp_path, steer=2, steer_prompt="The quick brown", steer_times=3.0)
    steered = [f for f in res["features"] if "steer" in f]
    assert sorted(f["rank"] for f in steered) == [1, 2]
    lm = LoadedModel(tiny_model("llama"), tiny_tokenizer(), "tiny-llama", "memory", "0" * 16)
    sae = SAE.load(tmp_path / "sae")
    for f in steered:
        assert f["steer"]["strength"] == pytest.approx(3.0 * f["max_act"], rel=1e-4)
        want = steer(
            SteerConfig(feature=[f["id"]], strength=3.0 * f["max_act"], prompt="The quick brown", max_new_tokens=20),
            lm=lm,
            sae=sae,
        )
        assert f["steer"]["text"] == want["steered"].text
    assert res["steer"]["clean"] == want["clean"].text and res["steer"]["prompt"] == "The quick brown"
    page = (tmp_path / "out" / "index.html").read_text()
    assert json.dumps(steered[0]["steer"]["text"], ensure_ascii=False)[1:-1].replace("<", "\\u003c") in page


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_the_gpu_the_same_as_on_the_cpu():
    lm, sae, fox = planted()
    cfg = SteerConfig(feature=[0], strength=20.0, prompt=PROMPT, max_new_tokens=4)
    cpu = steer(cfg, lm=lm, sae=sae)
    a_cpu = attribute(AttributeConfig(prompt=PROMPT, top=3), lm=lm, sae=sae)
    lm.model.cuda()
    gpu = steer(cfg, lm=lm, sae=sae.cuda())
    a_gpu = attribute(AttributeConfig(prompt=PROMPT, top=3), lm=lm, sae=sae)
    assert gpu["steered"].token_ids == cpu["steered"].token_ids == [fox] * 4
    assert [r["feature"] for r in a_gpu["raising"]] == [r["feature"] for r in a_cpu["raising"]]
    assert a_gpu["total"] == pytest.approx(a_cpu["total"], rel=1e-3, abs=1e-5)
