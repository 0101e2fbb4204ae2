"""Faults a new user met (issue 37), each pinned: the run file's evaluation text, a stale evaluation
in `info`, baselines that worked silently for minutes, a missed --target-l0 without a warning, the
training recipe of a BatchTopK SAE, dense features leading the ranking, and the smaller ones."""

import json
import os
import signal

import pytest
import torch
from test_analyze import D, random_sae, run, write_cache
from test_cli import tiny_pipeline, tiny_run  # noqa: F401 (a fixture)
from test_outputs import hcfg, tcfg
from test_train import small_sae_cfg

from sae_lens_lite.data.corpus import load_texts
from sae_lens_lite.data.harvest import harvest
from sae_lens_lite.data.models import load_model
from sae_lens_lite.errors import UserError
from sae_lens_lite.evaluation import baselines
from sae_lens_lite.evaluation.baselines import VAE_STEPS, fit_baselines, vae_steps
from sae_lens_lite.evaluation.compare import CompareConfig, compare
from sae_lens_lite.evaluation.evaluate import EvalConfig, evaluate
from sae_lens_lite.info import describe
from sae_lens_lite.training.synthetic import make_superposition
from sae_lens_lite.training.train import TrainConfig, target_l0_missed, train, train_on_batches


def _evaluate(tmp_path, corpus_file, lm, sae="sae", **kw):
    cfg = dict(sae=str(tmp_path / sae), dataset=str(corpus_file), tokens=256, skip_tokens=0, device="cpu")
    return evaluate(EvalConfig(**{**cfg, "baselines": False, **kw}), lm=lm)


# 1. a run file whose [evaluate] names no dataset evaluates on the harvest's corpus, not on pydoc


def test_run_file_evaluate_without_a_dataset_reads_the_harvested_corpus(tiny_pipeline, corpus_file, tmp_path):  # noqa: F811
    cfg = tiny_run(tmp_path, corpus_file)
    del cfg["evaluate"]["dataset"]  # [evaluate] sets tokens and baselines only
    tiny_pipeline.run_pipeline(cfg)
    report = json.loads((tmp_path / "o" / "eval" / "report.json").read_text())
    assert report["dataset"] == str(corpus_file)


# 2. info does not show the evaluation of weights the SAE no longer holds


def test_info_flags_an_evaluation_of_other_weights(tiny_lm, corpus_file, tmp_path):
    harvest(hcfg(tmp_path, corpus_file), lm=tiny_lm)
    train(tcfg(tmp_path))
    _evaluate(tmp_path, corpus_file, tiny_lm, out=str(tmp_path / "sae" / "eval"))
    assert "STALE" not in describe(str(tmp_path / "sae"))
    train(tcfg(tmp_path, l1=3.0, overwrite=True))
    text = describe(str(tmp_path / "sae"))
    assert "evaluation" in text and "STALE, of other weights" in text and "--overwrite" in text
    assert "STALE" in describe(str(tmp_path / "sae" / "eval"))


# 3. the baselines show progress, and a small fitting set is not passed over hundreds of times


def test_baselines_show_progress_and_small_fitting_sets_take_fewer_steps(capsys, monkeypatch):
    assert vae_steps(1024) < VAE_STEPS and vae_steps(10**6) == VAE_STEPS
    x = torch.randn(300, 8)
    threads, during = torch.get_num_threads(), []
    fit_vae = baselines.fit_vae
    monkeypatch.setattr(
        baselines, "fit_vae", lambda *a, **k: during.append(torch.get_num_threads()) or fit_vae(*a, **k)
    )
    torch.set_num_threads(2)
    try:
        fitted = fit_baselines(x, [2, 4])
        assert during == [1, 1] and torch.get_num_threads() == 2  # one thread while fitting, then restored
    finally:
        torch.set_num_threads(threads)
    assert sorted(fitted) == [2, 4] and fitted[4][0].k == 4 and fitted[4][1].d_latent == 4
    err = capsys.readouterr().err
    assert "baselines: PCA, VAE (k = [2, 4])" in err and f"{2 * vae_steps(300)}/{2 * vae_steps(300)}" in err


# 4. --target-l0 missed by far gets a warning line


def test_a_missed_target_l0_is_warned(tiny_lm, corpus_file, tmp_path, capsys):
    assert target_l0_missed(TrainConfig(target_l0=20), 22.0) is None
    assert target_l0_missed(TrainConfig(target_l0=0), 62.0) is None
    assert "3.1x the target" in target_l0_missed(TrainConfig(target_l0=20), 62.2)
    harvest(hcfg(tmp_path, corpus_file), lm=tiny_lm)
    capsys.readouterr()
    train(tcfg(tmp_path, target_l0=0.05))  # 16 steps cannot bring 64 latents to L0 0.05
    err = capsys.readouterr().err
    assert "warning: --target-l0 0.05 was not reached: the saved SAE's L0 is" in err


# 5 and 7a. BatchTopK is reported as trained, in info, evaluate's report and compare (from SAEs and from reports)


def test_the_training_recipe_is_reported_beside_the_inference_activation(tiny_lm, corpus_file, tmp_path, capsys):
    harvest(hcfg(tmp_path, corpus_file), lm=tiny_lm)
    for penalty in ("batchtopk", "jumprelu"):
        train(tcfg(tmp_path, penalty=penalty, k=4, out=str(tmp_path / penalty)))
        _evaluate(tmp_path, corpus_file, tiny_lm, sae=penalty)
    assert describe(str(tmp_path / "batchtopk")).startswith(
        f"SAE {tmp_path / 'batchtopk'}: jumprelu (trained as batchtopk)"
    )
    assert describe(str(tmp_path / "jumprelu")).startswith(f"SAE {tmp_path / 'jumprelu'}: jumprelu, d_in")
    report = json.loads((tmp_path / "batchtopk" / "eval" / "report.json").read_text())
    assert (report["source"], report["recipe"], report["architecture"]) == ("trained here", "batchtopk", "jumprelu")
    capsys.readouterr()
    for name, inputs in (
        ("dirs", [str(tmp_path / p) for p in ("batchtopk", "jumprelu")]),
        ("reports", [str(tmp_path / p / "eval" / "report.json") for p in ("batchtopk", "jumprelu")]),
    ):
        r = compare(
            CompareConfig(
                saes=inputs, dataset=str(corpus_file), tokens=256, skip_tokens=0, baselines=False, device="cpu",
                out=str(tmp_path / name),
            ),
            lm=tiny_lm,
        )  # fmt: skip
        assert [(s["recipe"], s["architecture"], s["source"]) for s in r["saes"]] == [
            ("batchtopk", "jumprelu", "trained here"),
            ("jumprelu", "jumprelu", "trained here"),
        ]
        table = (tmp_path / name / "compare.md").read_text()
        assert "| recipe | architecture |" in table and "| batchtopk | jumprelu |" in table
        line = capsys.readouterr().out.strip().splitlines()[-1]
        first = r["saes"][0]
        assert line.startswith(f"compare: {tmp_path / name / 'compare.md'}: 2 SAEs on ")
        assert f"L0 {first['active_dims_per_token']:.1f}, EV {first['explained_variance']:.3f}" in line


# 6. features evaluate calls dense are ranked after all others, and flagged


def test_dense_features_are_ranked_last_and_flagged(tmp_path):
    g = torch.Generator().manual_seed(0)
    n_ctx, T = 48, 32
    tokens = torch.randint(2, 90, (n_ctx, T), generator=g)
    tokens[torch.rand(n_ctx, T, generator=g) < 0.3] = 5  # token 5: 30% of positions
    tokens[torch.rand(n_ctx, T, generator=g) < 0.04] = 7  # token 7: 4%
    acts = 0.5 * torch.randn(n_ctx, T, D, generator=g)
    acts[..., 0] += 6.0 * (tokens == 5)  # feature 0: a perfect token feature, but dense
    acts[..., 1] += 6.0 * (tokens == 7)  # feature 1: a perfect token feature, sparse
    write_cache(tmp_path / "acts", tokens, acts)
    sae = random_sae(d_sae=6)
    with torch.no_grad():
        sae.W_enc[:, :2] = 0.0
        sae.W_enc[0, 0] = sae.W_enc[1, 1] = 1.0
        sae.b_enc[:2] = -3.0
        sae.b_enc[2:] = -1.0  # random directions firing on a few percent of tokens: not dense
    sae.save(tmp_path / "sae")
    _, res = run(tmp_path)
    f = {x["id"]: x for x in res["features"]}
    assert f[0]["frequency"] > 0.1 and f[0]["dense"] and not f[1]["dense"]
    assert f[0]["detection"]["score"] >= max(x["detection"]["score"] for x in res["features"]) - 0.05
    assert all(x["dense"] == (x["frequency"] > 0.1) for x in res["features"])
    sparse_ranks = [x["rank"] for x in res["features"] if not x["dense"]]
    assert len(sparse_ranks) >= 2 and f[1]["rank"] == 1
    # a perfect detector, but dense: after every feature that is not
    assert max(sparse_ranks) < min(x["rank"] for x in res["features"] if x["dense"]) and f[0]["rank"] > len(
        sparse_ranks
    )
    assert "(DENSE)" not in describe(str(tmp_path / "out")).split("rank 1:")[1].splitlines()[0]
    n_dense = sum(x["dense"] for x in res["features"])
    assert f"{n_dense} dense feature{'s' if n_dense > 1 else ''} (firing on more than 10%" in describe(
        str(tmp_path / "out")
    )


# 7. the smaller ones


def test_a_corpus_of_an_unsupported_kind_is_named_as_such(tmp_path):
    for name in ("notes.md", "binary.bin"):
        (tmp_path / name).write_text("text")
        with pytest.raises(UserError, match=rf"{name} is a \.\w+ file, which sae-lite does not read: give a \.txt"):
            load_texts(str(tmp_path / name))
    with pytest.raises(UserError, match="not found"):
        load_texts(str(tmp_path / "missing.md"))


def test_a_k_above_the_sae_width_is_refused_with_the_width_and_leaves_no_directory(tiny_lm, corpus_file, tmp_path):
    harvest(hcfg(tmp_path, corpus_file), lm=tiny_lm)
    with pytest.raises(UserError, match=r"--k 5,000 is more than the SAE's 64 latents \(--expansion 2 x d_in 32\)"):
        train(tcfg(tmp_path, penalty="topk", k=5000))
    assert not (tmp_path / "sae").exists()


def _sigint_after(factory, after: int):
    """The same batches, with a Ctrl-C (SIGINT to this process) once `after` batches were read."""
    count = [0]

    def wrapped(epoch):
        for x in factory(epoch):
            count[0] += 1
            if count[0] == after:
                os.kill(os.getpid(), signal.SIGINT)
            yield x

    return wrapped


def test_ctrl_c_saves_the_step_it_stopped_at_and_the_rerun_resumes_from_it(tmp_path, capsys):
    data = make_superposition(n_features=64, d=16, true_l0=2.0, seed=0)
    factory = data.batches(256, 16 * 256, seed=1)
    cfg = TrainConfig(penalty="l1", batch_size=256, checkpoint_every=100 * 256, log_every=5, precision="float32")
    sae_cfg = small_sae_cfg("l1", d_in=16, d_sae=64)
    tokens = 40 * 256
    ref = train_on_batches(sae_cfg, cfg, factory, tokens, out=tmp_path / "a", progress=False)
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN, not Python's handler, in a job started with `&`
    with pytest.raises(KeyboardInterrupt):  # init reads 16 batches, then step 23's batch is the 39th
        train_on_batches(sae_cfg, cfg, _sigint_after(factory, 16 + 23), tokens, out=tmp_path / "b", progress=False)
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back
    # no periodic checkpoint before step 100: this one was saved at the interrupt
    assert json.loads((tmp_path / "b" / "checkpoint.json").read_text())["step"] == 23
    capsys.readouterr()
    resumed = train_on_batches(sae_cfg, cfg, factory, tokens, out=tmp_path / "b", progress=False)
    assert f"train: resuming {tmp_path / 'b'} from its checkpoint at step 23 (5,888 tokens)" in capsys.readouterr().out
    for k, v in ref.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k


def test_a_cache_or_an_sae_given_as_the_model_is_named(tiny_lm, corpus_file, tmp_path):
    harvest(hcfg(tmp_path, corpus_file), lm=tiny_lm)
    with pytest.raises(UserError, match=r"acts is an activation cache, not a model \(harvested from tiny-llama"):
        load_model(str(tmp_path / "acts"))
    train(tcfg(tmp_path))
    with pytest.raises(UserError, match=r"sae is an SAE directory, not a model"):
        load_model(str(tmp_path / "sae"))


def test_a_model_name_typo_gets_a_suggestion(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match=r"Did you mean 'smollm2-135m'\?"):
        load_model("smollm2-135")
    with pytest.raises(UserError) as e:
        load_model("gpt2-unknown-model")
    assert "Did you mean" not in str(e.value)


def test_a_run_file_without_out_says_where_it_writes_and_counts_read_right(
    tiny_pipeline,  # noqa: F811
    corpus_file,
    tmp_path,
    monkeypatch,
    capsys,
):
    monkeypatch.chdir(tmp_path)
    cfg = tiny_run(tmp_path, corpus_file, harvest={"tokens": 256, "contexts_per_shard": 8})
    del cfg["out"]
    cfg["stages"] = ["harvest"]
    tiny_pipeline.run_pipeline(cfg)
    out = capsys.readouterr().out
    assert "run: the run file sets no `out`; writing under runs/run" in out
    assert "in 1 shard" in out and "in 1 shards" not in out
    assert "\nrun: 1 stage (harvest)" in out
    assert (tmp_path / "runs" / "run" / "acts" / "manifest.json").exists()
