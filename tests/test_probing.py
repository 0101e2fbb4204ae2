"""k-sparse probing (sae_lens_lite/evaluation/probing.py) on cases with known answers: a planted latent found at
k = 1, the random-direction floor below a trained SAE, the probe itself, pooling and task loading."""

import json

import pytest
import torch

from sae_lens_lite.errors import UserError
from sae_lens_lite.evaluation.probing import (
    TokenActs,
    balanced_split,
    dense_probe,
    fit_logistic,
    k_sparse_probe,
    load_task,
    random_dictionary,
    sae_probes_dir,
    text_activations,
    top_mean_diff,
)
from sae_lens_lite.training.sae import SAEConfig
from sae_lens_lite.training.synthetic import make_superposition
from sae_lens_lite.training.train import TrainConfig, train_on_batches


def planted(n: int, d_sae: int, feature: int, seed: int):
    """Sparse non-negative latents [n, d_sae] of noise, with `feature` firing exactly on class 1."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    f = torch.rand(n, d_sae, generator=g) * (torch.rand(n, d_sae, generator=g) < 0.1)
    f[:, 7] = 5 * torch.rand(n, generator=g)  # a loud latent that carries no label: variance is not signal
    f[:, feature] = y * (0.5 + torch.rand(n, generator=g))
    return f, y


def test_a_planted_latent_is_found_at_k1():
    f_tr, y_tr = planted(400, 300, feature=137, seed=0)
    f_te, y_te = planted(400, 300, feature=137, seed=1)
    r = k_sparse_probe(f_tr, y_tr, f_te, y_te, ks=(1, 5))
    assert r["latents"][1] == [137]
    assert r["accuracy"][1] >= 0.98
    # without the planted latent, the best single latent is noise: the probe is at chance
    f_tr[:, 137], f_te[:, 137] = 0, 0
    assert k_sparse_probe(f_tr, y_tr, f_te, y_te, ks=(1,))["accuracy"][1] < 0.65


def test_selection_ranks_by_the_size_of_the_class_mean_difference():
    f = torch.zeros(4, 3)
    y = torch.tensor([0, 0, 1, 1])
    f[:, 0] = torch.tensor([0.0, 0.0, 1.0, 1.0])  # +1
    f[:, 1] = torch.tensor([3.0, 3.0, 0.0, 0.0])  # -3: the largest in size
    f[:, 2] = torch.tensor([0.0, 0.0, 0.5, 0.5])  # +0.5
    assert top_mean_diff(f, y, 2).tolist() == [1, 0]
    assert top_mean_diff(f, y, 2, signed=True).tolist() == [0, 2]


def test_the_logistic_probe_separates_and_regularises_like_sklearn():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g)
    y = (x[:, 2] > 0).long()
    w, b = fit_logistic(x, y)
    assert w[:, 0].abs().argmax() == 2
    # the gradient of mean BCE + ‖w‖²/(2n) vanishes at the optimum (sklearn's C=1 objective / n)
    p = torch.sigmoid(x.double() @ w + b)[:, 0]
    grad = x.double().T @ (p - y.double()) / len(x) + w[:, 0] / len(x)
    assert grad.abs().max() < 1e-4
    assert dense_probe(x, y, x, y) > 0.97


def test_the_random_floor_sits_below_a_trained_sae():
    data = make_superposition(n_features=96, d=32, true_l0=4.0, seed=0)
    cfg = TrainConfig(penalty="topk", k=4, batch_size=256, tokens=256 * 80, lr=1e-2, device="cpu", log_every=10**9)
    sae = train_on_batches(SAEConfig(32, 128, activation="topk", k=4), cfg, data.batches(256, 256 * 50), cfg.tokens)
    sae.eval().requires_grad_(False)
    # the task: does the commonest true feature fire on this token?
    g = torch.Generator().manual_seed(5)
    fires = torch.rand(6000, 96, generator=g) < data.probs
    mags = torch.empty(6000, 96).uniform_(0.5, 1.5, generator=g)
    x, y = (fires * mags) @ data.features, fires[:, 0].long()
    tr, te = balanced_split(y, 1000, 1000, seed=0)
    floor = random_dictionary(32, 128, x[tr].mean(0), seed=0)
    with torch.no_grad():
        acc_sae = k_sparse_probe(sae.encode(x[tr]), y[tr], sae.encode(x[te]), y[te], ks=(1,))["accuracy"][1]
    acc_floor = k_sparse_probe(floor(x[tr]), y[tr], floor(x[te]), y[te], ks=(1,))["accuracy"][1]
    ceiling = dense_probe(x[tr], y[tr], x[te], y[te])
    assert acc_sae > acc_floor + 0.05, (acc_sae, acc_floor)
    assert ceiling >= acc_floor


def test_pooling_encodes_each_token_then_averages_per_text():
    x = torch.tensor([[1.0, -1.0], [3.0, 1.0], [-2.0, 4.0]])
    acts = TokenActs(x, torch.tensor([0, 0, 1]), 2)
    assert torch.allclose(acts.pool(), torch.tensor([[2.0, 0.0], [-2.0, 4.0]]))
    # relu of each token, then the mean: not relu of the mean
    assert torch.allclose(acts.pool(torch.relu), torch.tensor([[2.0, 0.5], [0.0, 4.0]]))


def test_text_activations_drop_the_first_position_and_padding(tiny_lm):
    from sae_lens_lite.data.models import run_to_hooks

    hook = "blocks.1.hook_resid_post"
    texts = ["The quick brown fox jumps", "A feature"]
    acts = text_activations(tiny_lm, hook, texts, max_tokens=64, batch_size=2, drop_first=1, device="cpu")
    for i, t in enumerate(texts):
        ids = torch.tensor([tiny_lm.tokenizer(t, add_special_tokens=False).input_ids])
        alone = run_to_hooks(tiny_lm.model, ids, [hook])[hook][0, 1:]  # unpadded, first position dropped
        assert torch.allclose(acts.x[acts.text == i], alone, atol=1e-5)


def test_tasks_load_from_files_with_two_labels(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text("\n".join(json.dumps({"text": f"t{i}", "label": ["neg", "pos"][i % 2]}) for i in range(10)))
    task = load_task(str(p))
    assert task.classes == ("neg", "pos") and task.labels.tolist() == [0, 1] * 5
    csv = tmp_path / "t.csv"
    csv.write_text("sentence,y\na,1\nb,2\nc,3\n")
    with pytest.raises(UserError, match="3 distinct labels"):
        load_task(str(csv), text_column="sentence", label_column="y")
    with pytest.raises(UserError, match="no column 'text'"):
        load_task(str(csv))


@pytest.mark.parametrize(
    "name, content, reason",
    [("bad.csv", '"unterminated\n', "EOF inside string"), ("bad.jsonl", "not json\n", "Unexpected character")],
)
def test_a_malformed_task_file_is_a_user_error_naming_the_parser_s_reason(tmp_path, name, content, reason):
    p = tmp_path / name
    p.write_text(content)
    with pytest.raises(UserError, match=f"cannot read task file .*{name}: .*{reason}"):
        load_task(str(p))


def test_balanced_split_is_disjoint_and_balanced():
    y = torch.tensor([0] * 30 + [1] * 70)
    tr, te = balanced_split(y, 20, 20, seed=0)
    assert not set(tr.tolist()) & set(te.tolist())
    assert y[tr].sum() == 10 and y[te].sum() == 10


@pytest.mark.skipif(sae_probes_dir() is None, reason="sae-probes not installed (pip install --no-deps sae-probes)")
def test_sae_probes_tasks_load_offline():
    task = load_task("113_movie_sent")
    assert len(task.texts) == len(task.labels) > 1000
    assert set(task.labels.tolist()) == {0, 1}


def test_a_mistyped_task_is_refused_before_the_model_loads(tmp_path):
    from sae_lens_lite.evaluation.probe import ProbeConfig

    with pytest.raises(UserError, match="neither a sae-probes task") as e:
        ProbeConfig(sae=str(tmp_path), tasks=["first_letter", "movie_sent"])
    if sae_probes_dir() is not None:
        assert "did you mean 113_movie_sent" in str(e.value)
    else:
        assert "pip install --no-deps sae-probes" in str(e.value)
    ProbeConfig(sae=str(tmp_path), tasks=["first_letter", "owner/dataset"])  # a hub id is checked when read
