"""The loss terms (loss.py): each against its definition, AuxK's reach, and the sparse TopK
path against the dense one."""

import math
from dataclasses import replace

import pytest
import torch

from sae_lens_lite.loss import KL_TAU, loss_terms, sparse_terms, total_loss
from sae_lens_lite.sae import SAE, SAEConfig
from sae_lens_lite.train import TrainConfig


def test_loss_terms_match_their_definitions():
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=8, d_sae=32))
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(32, 1) * 3)
        sae.input_scale.fill_(2.0)
    x = torch.randn(50, 8)
    dead = torch.zeros(32, dtype=torch.bool)
    for pen in ("l1", "kl"):
        cfg = TrainConfig(penalty=pen, kl_rho=0.05)
        with torch.no_grad():
            t = loss_terms(sae, x, cfg, dead)
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


def test_auxk_loss_reaches_only_dead_latents():
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=8, d_sae=32, activation="topk", k=2))
    x = torch.randn(40, 8)
    cfg = TrainConfig(penalty="topk", k=2)
    assert float(loss_terms(sae, x, cfg, torch.zeros(32, dtype=torch.bool))["aux"].detach()) == 0.0
    dead = torch.zeros(32, dtype=torch.bool)
    dead[:5] = True
    t = loss_terms(sae, x, cfg, dead)
    assert float(t["aux"].detach()) > 0
    sae.zero_grad()
    t["aux"].backward()
    grad_cols = sae.W_enc.grad.abs().sum(0)  # [d_sae]
    assert (grad_cols[5:] == 0).all() and (grad_cols[:5] > 0).any()


SPARSE_CASES = [  # (penalty, dead latents, sync_free); sync_free=True is the CUDA default, forced here on the CPU
    ("topk", 0, False), ("topk", 5, False), ("topk", 0, True), ("topk", 5, True), ("l1", 0, None), ("kl", 0, None),
]  # fmt: skip


@pytest.mark.parametrize("penalty,n_dead,sync_free", SPARSE_CASES)
def test_sparse_path_equals_the_dense_one(penalty, n_dead, sync_free):
    """forward_sparse (gather decoder, sparse encoder backward) gives the dense path's loss terms,
    metrics and gradients for every parameter: the penalty's gradient included (λ = 0.7), AuxK with
    either way of picking the dead latents."""
    torch.manual_seed(0)
    topk = penalty == "topk"
    sae = SAE(SAEConfig(d_in=16, d_sae=64, activation="topk" if topk else "relu", k=4 if topk else None))
    with torch.no_grad():
        sae.b_enc.normal_(mean=0.0 if topk else -0.8)  # ReLU: about a quarter of the latents active
        sae.b_dec.normal_()
        sae.input_scale.fill_(1.7)
    x = torch.randn(48, 16)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[torch.randperm(64)[:n_dead]] = True
    cfg = TrainConfig(penalty=penalty, k=4, kl_rho=0.05)
    got = {}
    for sparse in (False, True):
        sae.zero_grad()
        t = sparse_terms(sae, x, cfg, dead, sync_free, max_density=1.0) if sparse else loss_terms(sae, x, replace(cfg, sparse=False), dead)
        total_loss(t, torch.tensor(0.7), cfg).backward()
        got[sparse] = t, {name: p.grad.clone() for name, p in sae.named_parameters()}
    (t_dense, g_dense), (t_sparse, g_sparse) = got[False], got[True]
    if topk:
        assert (float(t_dense["aux"].detach()) > 0) == (n_dead > 0)
    else:
        assert 0.1 < float(t_dense["l0"]) / 64 < 0.5
    for key in ("mse", {"topk": "aux"}.get(penalty, penalty), "l0", "sse", "sst"):
        assert float(t_sparse[key]) == pytest.approx(float(t_dense[key]), rel=1e-5, abs=1e-7), key
    assert torch.equal(t_sparse["fired"], t_dense["fired"])
    for name, g in g_dense.items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(g_sparse[name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_relu_sparse_path_steps_aside_while_many_latents_are_active():
    """Early in an L1 run most latents fire; above max_density the sparse path returns None and
    loss_terms computes the dense terms instead."""
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=16, d_sae=64))
    with torch.no_grad():
        sae.b_enc.fill_(0.5)  # most pre-activations positive
    x = torch.randn(32, 16)
    dead = torch.zeros(64, dtype=torch.bool)
    cfg = TrainConfig(penalty="l1")
    assert sparse_terms(sae, x, cfg, dead, max_density=0.05) is None
    t, t_dense = loss_terms(sae, x, cfg, dead), loss_terms(sae, x, replace(cfg, sparse=False), dead)
    assert float(t["l0"]) > 0.05 * 64 and float(t["l1"]) == float(t_dense["l1"])


@pytest.mark.parametrize("sparse", [False, True])
def test_auxk_revives_latents_whose_pre_activations_are_all_negative(sparse):
    """A dead latent's pre-activation is often negative on every token; AuxK must still give its
    encoder a gradient (a ReLU on the aux values would make it exactly zero)."""
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=8, d_sae=32, activation="topk", k=2))
    with torch.no_grad():
        sae.b_enc[:4] = -100.0  # latents 0-3: pre-activation far below 0 everywhere
    x = torch.randn(40, 8)
    dead = torch.zeros(32, dtype=torch.bool)
    dead[:4] = True
    t = loss_terms(sae, x, TrainConfig(penalty="topk", k=2, sparse=sparse), dead)
    sae.zero_grad()
    t["aux"].backward()
    assert (sae.W_enc.grad[:, :4].abs().sum(0) > 0).all()
    assert (sae.b_enc.grad[:4] != 0).all()
