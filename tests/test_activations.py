import json

import pytest
import torch

from sae_lens_lite.errors import UserError
from sae_lens_lite.export import SAELENS_ARCH
from sae_lens_lite.training import recipes
from sae_lens_lite.training.activations import ACTIVATIONS, JumpReLU, ReLU, TopK, parse
from sae_lens_lite.training.sae import CONFIG_FILE, SAE, SAEConfig
from sae_lens_lite.training.train_config import TrainConfig

PRE = torch.tensor([[-1.0, 0.2, 0.5, 2.0, 0.1], [-3.0, -1.0, -2.0, 0.4, -0.5]])  # [n=2, d_sae=5]
THETA = torch.tensor([0.0, 0.3, 0.3, 0.3, 0.0])  # a JumpReLU's θ [d_sae]
WANT = {
    ReLU(): [[0.0, 0.2, 0.5, 2.0, 0.1], [0.0, 0.0, 0.0, 0.4, 0.0]],
    JumpReLU(): [[0.0, 0.0, 0.5, 2.0, 0.1], [0.0, 0.0, 0.0, 0.4, 0.0]],
    # the 2 largest of each token, then the ReLU: the second token's runner-up (-0.5) gives 0
    TopK(2): [[0.0, 0.0, 0.5, 2.0, 0.0], [0.0, 0.0, 0.0, 0.4, 0.0]],
}


def sae_for(act) -> SAE:
    sae = SAE(SAEConfig(d_in=3, d_sae=5, **act.config_fields()))
    if act.thresholded:
        with torch.no_grad():
            sae.threshold.copy_(THETA)
    return sae


@pytest.mark.parametrize("act", list(WANT), ids=str)
def test_each_activation_encodes_a_known_vector(act):
    sae = sae_for(act)
    f = act.activate(sae, PRE)
    assert torch.equal(f, torch.tensor(WANT[act]))
    assert torch.equal(sae.activate(PRE), f)  # the SAE asks its config's activation
    rows, idx = act.entries(sae, PRE)  # the sparse form: the same latents, in token order
    if isinstance(act, TopK):  # topk's entries are its k picks, whatever their sign
        assert len(rows) == 2 * act.k and torch.equal(rows, torch.tensor([0, 0, 1, 1]))
        assert torch.equal(f[rows, idx], PRE[rows, idx].relu())
    else:
        assert torch.equal(torch.stack([rows, idx]), f.nonzero().T)


@pytest.mark.parametrize("act", list(WANT), ids=str)
def test_config_json_keeps_the_string_and_loads_the_same_object(act, tmp_path):
    sae = sae_for(act)
    sae.save(tmp_path / "sae")
    raw = json.loads((tmp_path / "sae" / CONFIG_FILE).read_text())
    assert raw["activation"] == act.name and raw["k"] == (act.k if isinstance(act, TopK) else None)
    back = SAE.load(tmp_path / "sae")
    assert back.cfg.act == act and type(back.cfg.act) is type(act)
    assert back.cfg.activation == act.name  # the field stays the on-disk string
    assert hasattr(back, "threshold") == act.thresholded
    if act.thresholded:
        assert torch.equal(back.threshold, THETA)


def test_labels_and_names():
    assert [a.name for a in (ReLU(), TopK(3), JumpReLU())] == list(ACTIVATIONS) == ["relu", "topk", "jumprelu"]
    assert (ReLU().label, JumpReLU().label, TopK(32).label) == ("relu", "jumprelu", "topk k=32")
    assert (str(ReLU()), str(TopK(32))) == ("relu", "topk, k=32")  # a module repr's keyword style
    assert SAEConfig(d_in=4, d_sae=8, activation="topk", k=2).architecture == "topk k=2"
    assert ReLU() != JumpReLU() and TopK(2) == TopK(2) != TopK(3)
    assert parse("topk", 4) == TopK(4) and parse("relu", 4) == ReLU()  # k is topk's alone


def test_unknown_activations_and_bad_k_are_user_errors():
    with pytest.raises(UserError, match="unknown SAE activation 'gelu': use one of relu, topk, jumprelu"):
        SAEConfig(d_in=4, d_sae=8, activation="gelu")
    for k in (None, 0, 9):
        with pytest.raises(UserError, match="a topk SAE needs 0 < k <= d_sae = 8"):
            SAEConfig(d_in=4, d_sae=8, activation="topk", k=k)


def test_each_recipe_names_its_inference_activation_and_saelens_knows_every_one():
    want = {
        "l1": ReLU(),
        "kl": ReLU(),
        "topk": TopK(7),
        "batchtopk": JumpReLU(),
        "jumprelu": JumpReLU(),
        "matryoshka": JumpReLU(),
    }
    assert set(want) == set(recipes.RECIPES)
    for name, act in want.items():
        recipe = recipes.get(name, TrainConfig(penalty=name, k=7))
        assert recipe.sae_activation() == act
        assert SAEConfig(d_in=4, d_sae=8, **recipe.sae_options()).act == act
    assert set(SAELENS_ARCH) == set(ACTIVATIONS.values())
