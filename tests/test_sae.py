import json

import pytest
import torch

from sae_lens_lite.errors import UserError
from sae_lens_lite.training.sae import CONFIG_FILE, SAE, SAEConfig


def random_sae(activation="relu", k=None, scale=1.7, seed=0) -> SAE:
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(d_in=16, d_sae=64, activation=activation, k=k, model="m", hook="blocks.0.hook_resid_post"))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
        sae.input_scale.fill_(scale)
    return sae


def test_forward_matches_the_formula():
    sae = random_sae()
    x = torch.randn(10, 16)
    out = sae(x)
    s = sae.input_scale
    pre = (x * s - sae.b_dec) @ sae.W_enc + sae.b_enc
    f = pre.relu()
    assert torch.allclose(out.pre_acts, pre, atol=1e-5)
    assert torch.allclose(out.latents, f, atol=1e-5)
    assert torch.allclose(out.x_hat, (f @ sae.W_dec + sae.b_dec) / s, atol=1e-4)


def test_topk_keeps_at_most_k_latents():
    sae = random_sae("topk", k=5)
    f = sae(torch.randn(32, 16)).latents
    assert ((f > 0).sum(-1) <= 5).all() and (f >= 0).all()
    pre = sae.pre_activation(torch.randn(3, 16))
    # the kept values are the k largest pre-activations
    f = sae.activate(pre)
    assert torch.equal(f.topk(5).values, pre.topk(5).values.relu())


def test_folded_is_the_same_function_with_unit_scale():
    for act, k in (("relu", None), ("topk", 8)):
        sae = random_sae(act, k)
        folded = sae.folded()
        x = torch.randn(20, 16)
        assert float(folded.input_scale) == 1.0
        assert torch.allclose(folded(x).x_hat, sae(x).x_hat, atol=1e-4)
        assert torch.allclose(folded(x).latents, sae(x).latents, atol=1e-4)


def test_save_load_round_trip(tmp_path):
    sae = random_sae("topk", k=4)
    sae.save(tmp_path / "sae")
    back = SAE.load(tmp_path / "sae")
    assert back.cfg == sae.cfg
    for k, v in sae.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    assert json.loads((tmp_path / "sae" / CONFIG_FILE).read_text())["hook"] == "blocks.0.hook_resid_post"


def test_bad_configs_and_missing_dirs_are_user_errors(tmp_path):
    with pytest.raises(UserError):
        SAEConfig(d_in=0, d_sae=8)
    with pytest.raises(UserError):
        SAEConfig(d_in=4, d_sae=8, activation="topk", k=9)
    with pytest.raises(UserError):
        SAEConfig(d_in=4, d_sae=8, activation="gelu")
    with pytest.raises(UserError):
        SAE.load(tmp_path)
