"""The step's loss terms (loss.py with recipes/): each against its definition, AuxK's reach, and
the sparse path against the dense one for every recipe."""

import math
from dataclasses import replace

import pytest
import torch

from sae_lens_lite.training import latents, loss, recipes
from sae_lens_lite.training.loss import _terms, count_positive, total_loss, use_sparse
from sae_lens_lite.training.recipes import jumprelu
from sae_lens_lite.training.recipes.kl import KL_TAU
from sae_lens_lite.training.sae import SAE, SAEConfig
from sae_lens_lite.training.train import TrainConfig


def make(penalty, d_in=8, d_sae=32, **kw):
    cfg = TrainConfig(penalty=penalty, **kw)
    recipe = recipes.get(penalty, cfg)
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, **recipe.sae_options()))
    recipe.init(sae)
    return sae, recipe, cfg


def terms(sae, x, recipe, cfg, dead, sparse=False):
    return _terms(sae, x, recipe, cfg, dead, sparse)


def test_loss_terms_match_their_definitions():
    torch.manual_seed(0)
    x = torch.randn(50, 8)
    dead = torch.zeros(32, dtype=torch.bool)
    for pen in ("l1", "kl"):
        sae, recipe, cfg = make(pen, kl_rho=0.05)
        with torch.no_grad():
            sae.W_dec.mul_(torch.rand(32, 1) * 3)
            sae.input_scale.fill_(2.0)
            t = terms(sae, x, recipe, cfg, dead)
            out = sae(x)
            err = (x - out.x_hat) * 2.0
        assert t["mse"] == pytest.approx(float((err**2).sum(1).mean()), rel=1e-5)
        norms = sae.W_dec.detach().norm(dim=1)
        if pen == "l1":
            assert t["l1"] == pytest.approx(float((out.latents * norms).sum(1).mean()), rel=1e-5)
        else:
            rh = torch.tanh(out.latents * norms / KL_TAU).mean(0).clamp(1e-6, 1 - 1e-6)
            kl = sum(0.05 * math.log(0.05 / r) + 0.95 * math.log(0.95 / (1 - r)) for r in rh.tolist())
            assert t["kl"] == pytest.approx(kl, rel=1e-4)
        xs = x * 2.0
        ev = 1 - float(t["sse"] / t["sst"])
        assert ev == pytest.approx(1 - float((err**2).sum() / ((xs - xs.mean(0)) ** 2).sum()), rel=1e-5)


def test_batchtopk_keeps_the_k_n_largest_of_the_batch_and_jumprelu_counts_l0():
    """BatchTopK: exactly k·n entries, the batch's largest (so tokens differ in how many they get),
    even when one token holds more than its candidates' share. JumpReLU's L0 term is the number of
    pre-activations above their thresholds, per token."""
    torch.manual_seed(0)
    sae, recipe, cfg = make("batchtopk", k=2)
    pre = torch.randn(10, 32)
    pre[3] += 5.0  # token 3 holds all of the batch's largest values: more than 4·k candidates
    rows, idx = recipe.entries(sae, pre)
    assert len(rows) == 20 and int((rows == 3).sum()) == 20
    want = set(pre.reshape(-1).topk(20).indices.tolist())
    assert {int(r) * 32 + int(i) for r, i in zip(rows, idx)} == want
    assert torch.equal(recipe.mask(sae, pre).nonzero(as_tuple=True)[1], idx.sort().values)  # one token: its latents

    sae, recipe, cfg = make("jumprelu")
    with torch.no_grad():
        sae.threshold.copy_(torch.rand(32))
    x = torch.randn(40, 8)
    t = terms(sae, x, recipe, cfg, torch.zeros(32, dtype=torch.bool))
    with torch.no_grad():
        pre = sae.pre_activation(x)
    assert float(t["l0_ste"]) == pytest.approx(float((pre > sae.threshold).float().sum(1).mean()))
    assert float(t["l0"]) == float(t["l0_ste"])


def test_matryoshka_loss_is_the_mean_over_nested_prefixes():
    from sae_lens_lite.training.recipes.matryoshka import prefixes

    torch.manual_seed(0)
    sae, recipe, cfg = make("matryoshka", d_sae=64, k=6)
    sae.reset_parameters(dec_norm=0.1)  # short rows: each latent added moves x̂ towards x, not past it
    assert prefixes(64) == [4, 8, 16, 32, 64]
    x = torch.randn(30, 8)
    with torch.no_grad():
        t = terms(sae, x, recipe, cfg, torch.zeros(64, dtype=torch.bool))
        f = torch.zeros(30, 64)
        rows, idx = recipe.entries(sae, sae.pre_activation(x))
        f[rows, idx] = sae.pre_activation(x)[rows, idx].relu()
        mses = [float(((x - f[:, :m] @ sae.W_dec[:m] - sae.b_dec) ** 2).sum(1).mean()) for m in prefixes(64)]
    assert float(t["mse"]) == pytest.approx(sum(mses) / len(mses), rel=1e-5)
    assert mses[0] > mses[-1]


def test_auxk_loss_reaches_only_dead_latents():
    torch.manual_seed(0)
    sae, recipe, cfg = make("topk", k=2)
    x = torch.randn(40, 8)
    assert float(terms(sae, x, recipe, cfg, torch.zeros(32, dtype=torch.bool))["aux"].detach()) == 0.0
    dead = torch.zeros(32, dtype=torch.bool)
    dead[:5] = True
    t = terms(sae, x, recipe, cfg, dead)
    assert float(t["aux"].detach()) > 0
    sae.zero_grad()
    t["aux"].backward()
    grad_cols = sae.W_enc.grad.abs().sum(0)  # [d_sae]
    assert (grad_cols[5:] == 0).all() and (grad_cols[:5] > 0).any()


SPARSE_CASES = [  # (penalty, dead latents, sync_free); sync_free=True is the CUDA default, forced here on the CPU
    ("topk", 0, False),
    ("topk", 5, False),
    ("topk", 0, True),
    ("topk", 5, True),
    ("l1", 0, False),
    ("kl", 0, False),
    ("batchtopk", 5, False),
    ("jumprelu", 0, False),
    ("jumprelu", 5, False),
    ("jumprelu", 5, True),
    ("matryoshka", 5, True),
    ("matryoshka", 0, False),
]


@pytest.mark.parametrize("penalty,n_dead,sync_free", SPARSE_CASES)
def test_sparse_path_equals_the_dense_one(penalty, n_dead, sync_free, monkeypatch):
    """The sparse path (gather decoder, sparse encoder backward) gives the dense path's loss terms,
    metrics and gradients for every parameter: the penalty's gradient included (λ = 0.7), AuxK with
    either way of picking the dead latents, JumpReLU's threshold gradient from the latents near it."""
    monkeypatch.setattr(latents, "sync_free", lambda t: sync_free)
    torch.manual_seed(0)
    sae, recipe, cfg = make(penalty, d_in=16, d_sae=64, k=4, kl_rho=0.05)
    with torch.no_grad():
        sae.b_enc.normal_(mean=-0.8 if penalty in ("l1", "kl") else 0.0)  # ReLU: about a quarter of the latents active
        sae.b_dec.normal_()
        sae.input_scale.fill_(1.7)
        if penalty == "jumprelu":
            sae.threshold.uniform_(0.5, 1.5)
    x = torch.randn(48, 16)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[torch.randperm(64)[:n_dead]] = True
    got = {}
    for sparse in (False, True):
        sae.zero_grad()
        t = terms(sae, x, recipe, cfg, dead, sparse)
        total_loss(t, torch.tensor(0.7), recipe).backward()
        got[sparse] = t, {name: p.grad.clone() for name, p in sae.named_parameters() if p.requires_grad}
    (t_dense, g_dense), (t_sparse, g_sparse) = got[False], got[True]
    if recipe.aux:
        assert (float(t_dense["aux"].detach()) > 0) == (n_dead > 0)
    if penalty in ("l1", "kl"):
        assert 0.1 < float(t_dense["l0"]) / 64 < 0.5
    for key in ("mse", recipe.term, "l0", "sse", "sst"):
        assert float(t_sparse[key]) == pytest.approx(float(t_dense[key]), rel=1e-5, abs=1e-7), key
    assert torch.equal(t_sparse["fired"], t_dense["fired"])
    for name, g in g_dense.items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(g_sparse[name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_jumprelu_compares_bf16_pre_activations_exactly_against_an_fp32_threshold():
    """The dense path compares bf16 pre-activations in bf16 (the fast kernel), against θ rounded
    the safe way: the same answers as comparing their fp32 values with θ, at and around every
    threshold (a plain bf16 θ would be off wherever z equals θ rounded up)."""
    torch.manual_seed(0)
    theta = torch.rand(512) * 3  # fp32, mostly not representable in bf16
    grid = theta.bfloat16()
    near = torch.stack([torch.nextafter(grid, grid.new_full(grid.shape, v)) for v in (-9.0, 9.0)] + [grid])  # [3, 512]
    edges = [(theta + e).bfloat16()[None] for e in (-jumprelu.BANDWIDTH / 2, jumprelu.BANDWIDTH / 2)]
    z = torch.cat([near, (theta + 0.1 * torch.randn(64, 512)).bfloat16(), *edges])  # [69, 512]
    zf = z.float()
    assert torch.equal(jumprelu._above(z, theta) > 0, zf > theta)
    assert torch.equal(jumprelu._keep(z, jumprelu._above(z, theta)), torch.where(zf > theta, z, 0))
    band = (zf > theta - jumprelu.BANDWIDTH / 2) & (zf < theta + jumprelu.BANDWIDTH / 2)
    ones = torch.ones((), dtype=z.dtype).expand_as(z)
    assert torch.equal(jumprelu._in_band(ones, z, theta), band.to(z.dtype))
    assert 0.1 < float(band.float().mean()) < 0.5


def test_relu_sparse_path_steps_aside_while_many_latents_are_active():
    """Early in an L1 run most latents fire; then the dense path runs (the faster one there)."""
    torch.manual_seed(0)
    sae, recipe, cfg = make("l1", d_in=16, d_sae=64)
    x = torch.randn(32, 16)
    with torch.no_grad():
        sae.b_enc.fill_(-3.0)  # almost nothing active
    assert use_sparse(sae, x, recipe, cfg)
    with torch.no_grad():
        sae.b_enc.fill_(0.5)  # most pre-activations positive
    assert not use_sparse(sae, x, recipe, cfg)
    assert not use_sparse(sae, x, recipe, replace(cfg, sparse=False))
    assert use_sparse(*make("topk", d_in=16, d_sae=64)[:1], x, recipes.get("topk", cfg), cfg)


@pytest.mark.parametrize("sparse", [False, True])
def test_auxk_revives_latents_whose_pre_activations_are_all_negative(sparse):
    """A dead latent's pre-activation is often negative on every token; AuxK must still give its
    encoder a gradient (a ReLU on the aux values would make it exactly zero)."""
    torch.manual_seed(0)
    sae, recipe, cfg = make("topk", k=2)
    with torch.no_grad():
        sae.b_enc[:4] = -100.0  # latents 0-3: pre-activation far below 0 everywhere
    x = torch.randn(40, 8)
    dead = torch.zeros(32, dtype=torch.bool)
    dead[:4] = True
    t = terms(sae, x, recipe, cfg, dead, sparse)
    sae.zero_grad()
    t["aux"].backward()
    assert (sae.W_enc.grad[:, :4].abs().sum(0) > 0).all()
    assert (sae.b_enc.grad[:4] != 0).all()


@pytest.mark.parametrize("sparse", [False, True])
def test_a_dead_jumprelu_latent_still_gets_an_encoder_gradient(sparse):
    """Neither the JumpReLU nor its L0 term sends a gradient to a latent whose pre-activations
    all stay below its threshold (the L0 term moves θ only within ε/2 of it); AuxK must."""
    torch.manual_seed(0)
    sae, recipe, cfg = make("jumprelu")
    with torch.no_grad():
        sae.b_enc[:4] = -100.0  # latents 0-3: never near θ
    dead = torch.zeros(32, dtype=torch.bool)
    dead[:4] = True
    t = terms(sae, torch.randn(40, 8), recipe, cfg, dead, sparse)
    sae.zero_grad()
    total_loss(t, torch.tensor(0.7), recipe).backward()
    assert (sae.W_enc.grad[:, :4].abs().sum(0) > 0).all()
    assert (sae.b_enc.grad[:4] != 0).all()


def test_batchtopk_threshold_is_the_mean_of_the_cuts_then_a_running_mean():
    from sae_lens_lite.training.recipes.batchtopk import THRESHOLD_RATE

    torch.manual_seed(0)
    sae, recipe, cfg = make("batchtopk", k=3)
    dead = torch.zeros(32, dtype=torch.bool)
    cuts = []
    for step in range(150):
        x = torch.randn(20, 8) * (1 + step % 3)
        terms(sae, x, recipe, cfg, dead, sparse=True)
        cuts.append(float(recipe.batch_threshold))
        if step == 0:  # the smallest activation kept: the 60th largest pre-activation of the batch
            with torch.no_grad():
                assert cuts[0] == pytest.approx(float(sae.pre_activation(x).reshape(-1).topk(60).values[-1]))
        recipe.step_end(sae, step)
        if step == 99:
            assert float(sae.threshold[0]) == pytest.approx(sum(cuts) / 100, rel=1e-4)  # the plain mean
    want = sum(cuts[:100]) / 100
    for c in cuts[100:]:
        want += THRESHOLD_RATE * (c - want)
    assert torch.allclose(sae.threshold, torch.full((32,), want), rtol=1e-4)


@pytest.mark.parametrize("penalty", sorted(recipes.RECIPES))
def test_l0_counts_the_activations_above_their_threshold_with_negative_zeros_and_subnormals(penalty):
    """L0 is counted on the activations read as integers (fast for bf16 on the CPU), which holds
    because every recipe's activation writes +0 below its threshold: a pre-activation of -0.0
    (which a plain relu passes on as -0.0, counted by the integers) or a negative subnormal must
    not count. Dense [n, d_sae] and as entries, in every float width."""
    sae, recipe, cfg = make(penalty, d_in=8, d_sae=8, k=2)
    theta = float(sae.threshold.detach().max()) if penalty == "jumprelu" else 0.0  # θ at its start (fp32)
    row = [0.0, -0.0, 1e-40, -1e-40, 3.5, -2.0, float("inf"), theta]
    pre = torch.tensor([row, row[::-1]])  # [2, d_sae]
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        z = pre.to(dtype)
        expected = int((z.double() > theta).sum())
        assert int(count_positive(recipe.activate(sae, z, None))) == expected, dtype
        idx = torch.arange(8).repeat(2)
        assert int(count_positive(recipe.activate(sae, z.reshape(-1), idx))) == expected, dtype
    if penalty != "jumprelu":  # the float32 row: 1e-40 (a subnormal), 3.5, inf
        assert int(count_positive(recipe.activate(sae, pre, None))) == 6


def test_the_sparse_path_stops_at_1_percent_under_bf16_autocast_on_an_amx_cpu(monkeypatch):
    """With AMX the dense bf16 matmuls are cheap, so the sparse path gives way sooner (1% of the
    latents active, not 5%); fp32 or a CPU without AMX keep 5%."""
    x = torch.randn(4, 8)
    monkeypatch.setattr(loss.runtime, "cpu_flags", lambda: frozenset({"amx_bf16", "avx512_bf16"}))
    assert loss.sparse_max_density(x) == loss.SPARSE_MAX_DENSITY
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert loss.sparse_max_density(x) == loss.SPARSE_MAX_DENSITY_AMX
    monkeypatch.setattr(loss.runtime, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert loss.sparse_max_density(x) == loss.SPARSE_MAX_DENSITY


@pytest.mark.parametrize("penalty", ["l1", "kl", "jumprelu"])
def test_the_dense_path_under_bf16_autocast_follows_the_float32_one(penalty):
    """The dense path keeps its [n, d_sae] tensors in bf16 under autocast (sums, masks, counts in
    their own dtype): every gradient stays within bf16 rounding of the float32 path's."""
    torch.manual_seed(0)
    sae, recipe, cfg = make(penalty, d_in=64, d_sae=256, kl_rho=0.05)
    with torch.no_grad():
        sae.b_enc.normal_(mean=-0.8 if penalty != "jumprelu" else 0.0)
        sae.b_dec.normal_()
        sae.input_scale.fill_(1.7)
    x = torch.randn(512, 64)
    dead = torch.zeros(256, dtype=torch.bool)
    got = []
    for amp in (False, True):
        sae.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            t = terms(sae, x, recipe, cfg, dead)
        total_loss(t, torch.tensor(0.7), recipe).backward()
        got.append({name: p.grad.clone() for name, p in sae.named_parameters() if p.requires_grad})
    for name, g in got[0].items():
        if name == "threshold":  # which pre-activations fall in θ's band moves with bf16 rounding
            continue
        assert got[1][name].dtype == torch.float32
        rel = float((got[1][name] - g).norm() / g.norm())
        assert rel < 0.02, (name, rel)


@pytest.mark.parametrize("autocast", [False, True])
def test_l1_dense_decode_has_the_gradients_of_its_definition(autocast):
    """L1's dense path takes the decoder and the L1 sum in one autograd node that folds the
    penalty's gradient into the decoder's product and the norm's into W_dec's: the same gradients
    as x̂ = f W_dec, l1 = Σ_j ‖W_dec,j‖ Σ_t f_tj (here behind a ReLU, f = relu(pre))."""
    torch.manual_seed(0)
    sae, recipe, cfg = make("l1", d_in=8, d_sae=32)
    pre0 = torch.randn(16, 32)
    probe = torch.randn(16, 8)

    def grads(fused):
        pre = pre0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            z = pre.to(torch.bfloat16) if autocast else pre
            vals = recipe.activate(sae, z, None)
            if fused:
                x_hat, t = recipe.decode(sae, loss.Latents(vals, z, None, None, None, 16, 32))
            else:
                x_hat = vals @ sae.W_dec.to(vals.dtype)
                t = {"l1": (vals.float() * sae.W_dec.norm(dim=1)).sum() / 16}
        total = (x_hat.float() * probe).sum() + 3.0 * t["l1"]
        sae.zero_grad()
        total.backward()
        return total.detach(), pre.grad, sae.W_dec.grad.clone(), t.get("fired")

    fused, plain = grads(True), grads(False)
    tol = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-5, atol=1e-5)
    for a, b in zip(fused[:3], plain[:3]):
        torch.testing.assert_close(a.float(), b.float(), **tol)
    assert (plain[1] == 0).float().mean() > 0.3  # the ReLU's mask is in the comparison
    assert torch.equal(fused[3], (pre0 > 0).any(0))


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("onednn", [False, True])
def test_the_encoder_with_its_relu_has_the_gradients_of_its_definition(autocast, onednn, monkeypatch):
    """The dense path of a plain-ReLU recipe applies the ReLU inside the encoder's node (in place,
    or in one oneDNN call under bf16 on the CPU): its output, +0 below 0, and its gradients to
    W_enc, b_enc and b_dec equal relu(pre) through plain autograd."""
    if onednn and not loss._onednn_linear():
        pytest.skip("no oneDNN fused linear in this PyTorch")
    monkeypatch.setattr(loss, "_onednn_linear", lambda: onednn)
    torch.manual_seed(0)
    sae, _, _ = make("l1", d_in=16, d_sae=64)
    with torch.no_grad():
        sae.b_enc.normal_(mean=-0.5)
        sae.b_dec.normal_()
    x = torch.randn(40, 16)
    probe = torch.randn(40, 64)

    def run(fused):
        sae.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            xc = x - sae.b_dec.detach()
            f = loss.dense_pre(sae, xc, relu=True) if fused else torch.relu(loss.dense_pre(sae, xc))
        (f.float() * probe).sum().backward()
        return f.detach(), [p.grad.clone() for p in (sae.W_enc, sae.b_enc, sae.b_dec)]

    (f_fused, g_fused), (f_plain, g_plain) = run(True), run(False)
    assert torch.equal(f_fused, f_plain)
    assert 0.2 < float((f_fused == 0).float().mean()) < 0.9  # the mask matters
    assert not (f_fused.view(torch.int16 if autocast else torch.int32) < 0).any()  # no -0.0
    for a, b in zip(g_fused, g_plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_only_recipes_with_the_base_relu_and_no_mask_fuse_it_into_the_encoder():
    """plain_relu moves a recipe's activation into the encoder's node: a recipe that changes
    activate() or mask() must not claim it (its own activation would be skipped)."""
    from sae_lens_lite.training.recipes.base import Recipe

    for name, cls in recipes.RECIPES.items():
        own = cls.activate is not Recipe.activate or cls.mask is not Recipe.mask
        assert not (cls.plain_relu and own), name
    assert recipes.RECIPES["l1"].plain_relu and recipes.RECIPES["kl"].plain_relu


@pytest.mark.parametrize("penalty", ["topk", "jumprelu"])
def test_the_sparse_paths_dense_encoder_gradient_equals_the_sparse_one(penalty, monkeypatch):
    """On a CPU with AMX under bf16 autocast the sparse path takes its encoder's gradient as a
    dense bf16 product while n·d_sae is small (DENSE_GRAD_MAX): the same gradients to W_enc, b_enc
    and b_dec as the sparse product, within bf16 rounding, and it is the dense one that ran."""
    monkeypatch.setattr(loss, "amx_bf16", lambda x: True)
    torch.manual_seed(0)
    sae, recipe, cfg = make(penalty, d_in=32, d_sae=128, k=4)
    with torch.no_grad():
        sae.b_dec.normal_()
        if penalty == "jumprelu":
            sae.threshold.uniform_(0.5, 1.5)
    x = torch.randn(64, 32)
    dead = torch.zeros(128, dtype=torch.bool)
    dead[:40] = True  # AuxK's entries take the same path
    got = {}
    for limit in (0, loss.DENSE_GRAD_MAX):
        monkeypatch.setattr(loss, "DENSE_GRAD_MAX", limit)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert loss.dense_encoder_grad(torch.zeros(64, 128, dtype=torch.bfloat16)) == (limit > 0)
            t = terms(sae, x, recipe, cfg, dead, sparse=True)
        sae.zero_grad()
        total_loss(t, torch.tensor(0.7), recipe).backward()
        got[limit] = [p.grad.clone() for p in (sae.W_enc, sae.b_enc, sae.b_dec)]
    for sparse_g, dense_g in zip(*got.values()):
        assert sparse_g.abs().max() > 0
        rel = float((dense_g - sparse_g).norm() / sparse_g.norm())
        assert rel < 1e-2, rel
