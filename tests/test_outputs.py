"""The rerun rule (outputs.py), stage by stage: same settings and inputs → nothing to do and the
result line; different → a refusal naming the difference; --overwrite → redone. And the result
lines and warnings the stages print."""

import json
import os

import pytest
import torch
from conftest import HOOK, harvest_config

import sae_lens_lite.data.harvest as harvest_mod
from sae_lens_lite.data.cache import ActivationCache
from sae_lens_lite.data.harvest import harvest
from sae_lens_lite.errors import UserError
from sae_lens_lite.evaluation.evaluate import EvalConfig, _training_dead, evaluate
from sae_lens_lite.export import ExportConfig, ImportConfig, export, import_cmd
from sae_lens_lite.interpret.analyze import AnalyzeConfig, analyze
from sae_lens_lite.outputs import RECORD, fingerprint
from sae_lens_lite.training.sae import SAE, SAEConfig
from sae_lens_lite.training.train import TrainConfig, train


def hcfg(tmp_path, corpus_file, **kw):
    return harvest_config(corpus_file, tmp_path / "acts", **{"tokens": 1024, "batch_size": 16, "drop_first": 1, **kw})


def tcfg(tmp_path, **kw):
    base = dict(
        acts=str(tmp_path / "acts"),
        out=str(tmp_path / "sae"),
        expansion=2,
        tokens=4096,
        batch_size=256,
        device="cpu",
        log_every=4,
    )
    return TrainConfig(**{**base, **kw})


def test_harvest_rerun_is_nothing_to_do_before_the_model_loads(tiny_lm, corpus_file, tmp_path, capsys, monkeypatch):
    harvest(hcfg(tmp_path, corpus_file), lm=tiny_lm)
    first = capsys.readouterr().out.strip().splitlines()[-1]
    assert first.startswith(f"harvest: {tmp_path / 'acts'}: ") and "rows x 32 (float32)" in first

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(harvest_mod, "load_model", no_load)
    mtime = (tmp_path / "acts" / "manifest.json").stat().st_mtime_ns
    harvest(hcfg(tmp_path, corpus_file))  # no lm: loading "tiny-llama" would fail
    out = capsys.readouterr().out.strip().splitlines()
    assert "complete, nothing to do" in out[-2] and out[-1] == first
    assert (tmp_path / "acts" / "manifest.json").stat().st_mtime_ns == mtime


def test_harvest_with_other_settings_is_refused_naming_them(tiny_lm, corpus_file, tmp_path):
    harvest(hcfg(tmp_path, corpus_file), lm=tiny_lm)
    with pytest.raises(
        UserError, match=r"differs in: context_length \(was 32, now 16\); tokens \(was 1024, now 512\).*--overwrite"
    ):
        harvest(hcfg(tmp_path, corpus_file, tokens=512, context_length=16), lm=tiny_lm)
    harvest(hcfg(tmp_path, corpus_file, tokens=512, overwrite=True), lm=tiny_lm)
    assert ActivationCache.open(tmp_path / "acts").manifest["n_contexts"] == 16


@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_harvest_redoes_corrupt_or_missing_shards(tiny_lm, corpus_file, tmp_path, capsys, damage):
    harvest(hcfg(tmp_path, corpus_file), lm=tiny_lm)
    acts = tmp_path / "acts"
    before = {p.name: p.read_bytes() for p in acts.glob("shard_*")}
    assert len(before) == 4
    shard = acts / "shard_00002.safetensors"
    if damage == "corrupt":
        data = bytearray(shard.read_bytes())
        data[-10] ^= 0xFF
        shard.write_bytes(bytes(data))
    else:
        shard.unlink()
    with pytest.raises(UserError, match=damage if damage == "missing" else "corrupt"):
        ActivationCache.open(acts).check_shard(2)
    capsys.readouterr()
    harvest(hcfg(tmp_path, corpus_file), lm=tiny_lm)
    assert "shard 2 was missing or corrupt" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in acts.glob("shard_*")} == before
    c = ActivationCache.open(acts)
    for i in range(c.n_shards):
        c.check_shard(i)


def test_harvest_warns_when_the_corpus_holds_fewer_tokens_than_asked(tiny_lm, corpus_file, tmp_path, capsys):
    harvest(hcfg(tmp_path, corpus_file, tokens=100_000), lm=tiny_lm)
    cap = capsys.readouterr()
    n = ActivationCache.open(tmp_path / "acts").manifest["n_contexts"] * 32
    assert f"warning: {corpus_file} holds {n:,} tokens" in cap.err and "fewer than the 100,000 asked" in cap.err
    assert f"{n:,} of the 100,000 tokens asked" in cap.out.strip().splitlines()[-1]


@pytest.fixture
def trained(tiny_lm, corpus_file, tmp_path):
    harvest(hcfg(tmp_path, corpus_file), lm=tiny_lm)
    train(tcfg(tmp_path))
    return tmp_path


def test_train_result_is_measured_on_the_saved_weights(trained, capsys):
    """EV, L0 and dead in the result line are the saved SAE's on the cache (here all of it), not
    the trainer's running averages."""
    rec = json.loads((trained / "sae" / RECORD).read_text())
    sae = SAE.load(trained / "sae")
    x = ActivationCache.open(trained / "acts").load(("activations",))["activations"].float()  # [n, d]
    with torch.no_grad():
        o = sae(x)
    ev = 1 - float((x - o.x_hat).double().pow(2).sum() / (x - x.mean(0)).double().pow(2).sum())
    on = o.latents > 0
    r = rec["result"]
    assert r["n_tokens"] == len(x)
    assert r["explained_variance"] == pytest.approx(ev, abs=1e-5)
    assert r["l0"] == pytest.approx(float(on.sum()) / len(x), abs=1e-4)
    assert r["dead_frac"] == pytest.approx(float((~on.any(0)).float().mean()))
    assert sae.cfg.meta["final_eval"] == r
    line = rec["line"]
    assert line.startswith(f"train: {trained / 'sae'}: EV {ev:.3f}, L0 {r['l0']:.1f}, dead ")


def test_train_rerun_rule(trained, capsys, tiny_lm, corpus_file):
    capsys.readouterr()
    weights = (trained / "sae" / "sae.safetensors").read_bytes()
    train(tcfg(trained))
    out = capsys.readouterr().out.strip().splitlines()
    assert "complete, nothing to do" in out[-2] and out[-1].startswith("train: ")
    with pytest.raises(UserError, match=r"differs in: l1 \(was 1.0, now 3.0\)"):
        train(tcfg(trained, l1=3.0))
    # Another cache under the same path: the input's content differs.
    harvest(hcfg(trained, corpus_file, tokens=512, overwrite=True), lm=tiny_lm)
    with pytest.raises(UserError, match="input acts"):
        train(tcfg(trained))
    train(tcfg(trained, overwrite=True))
    assert (trained / "sae" / "sae.safetensors").read_bytes() != weights


def test_train_refuses_a_cache_smaller_than_one_batch(tiny_lm, corpus_file, tmp_path):
    harvest(hcfg(tmp_path, corpus_file, tokens=256), lm=tiny_lm)
    with pytest.raises(UserError, match="fewer than one batch of 4,096; pass a --batch-size of at most"):
        train(tcfg(tmp_path, batch_size=4096))
    assert not (tmp_path / "sae").exists()


def ecfg(root, corpus_file, **kw):
    return EvalConfig(
        **{
            **dict(
                sae=str(root / "sae"),
                dataset=str(corpus_file),
                tokens=256,
                skip_tokens=0,
                device="cpu",
                baselines=False,
            ),
            **kw,
        }
    )


def test_evaluate_rerun_rule(trained, tiny_lm, corpus_file, tmp_path, capsys):
    r1 = evaluate(ecfg(trained, corpus_file), lm=tiny_lm)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert (
        line.startswith(f"evaluate: {trained / 'sae' / 'eval' / 'report.md'}: CE loss recovered ")
        and "EV" in line
        and "L0" in line
    )
    assert evaluate(ecfg(trained, corpus_file), lm=tiny_lm) == r1
    out = capsys.readouterr().out.strip().splitlines()
    assert "complete, nothing to do" in out[-2] and out[-1] == line
    other = tmp_path / "other.txt"
    other.write_text(corpus_file.read_text().upper())
    with pytest.raises(UserError, match=r"differs in: dataset \(was .*corpus.txt', now .*other.txt'\)"):
        evaluate(ecfg(trained, other), lm=tiny_lm)
    # The same path with other text in it is another input.
    corpus_file.write_text(corpus_file.read_text() + " more")
    with pytest.raises(UserError, match="input dataset"):
        evaluate(ecfg(trained, corpus_file), lm=tiny_lm)
    assert evaluate(ecfg(trained, other, overwrite=True), lm=tiny_lm)["dataset"] == str(other)


def test_analyze_and_export_rerun_rule(trained, tiny_lm, capsys):
    a = AnalyzeConfig(
        sae=str(trained / "sae"), acts=str(trained / "acts"), out=str(trained / "an"), device="cpu", top_k=4
    )
    s1 = analyze(a, lm=tiny_lm)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"analyze: {trained / 'an' / 'index.html'}: 64 features on ")
    assert analyze(a, lm=tiny_lm) == json.loads(json.dumps(s1))
    assert capsys.readouterr().out.strip().splitlines()[-1] == line
    with pytest.raises(UserError, match=r"top_k \(was 4, now 5\)"):
        analyze(AnalyzeConfig(**{**vars(a), "top_k": 5}), lm=tiny_lm)

    e = ExportConfig(
        sae=str(trained / "sae"), format="dictionary", out=str(trained / "dict"), analysis=str(trained / "an")
    )
    export(e)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(
        f"export: wrote feature dictionary {trained / 'dict'} (dictionary.json, features.jsonl, "
        "dictionary.safetensors): 64 features"
    )
    mtime = (trained / "dict" / "features.jsonl").stat().st_mtime_ns
    export(e)
    assert (
        "nothing to do" in capsys.readouterr().out and (trained / "dict" / "features.jsonl").stat().st_mtime_ns == mtime
    )
    with pytest.raises(UserError, match=r"format \(was 'dictionary', now 'saelens'\)"):
        export(ExportConfig(**{**vars(e), "format": "saelens"}))

    sl = ExportConfig(sae=str(trained / "sae"), format="saelens", out=str(trained / "sl"), acts=str(trained / "acts"))
    export(sl)
    assert (
        capsys.readouterr()
        .out.strip()
        .endswith(
            "(cfg.json, sae_weights.safetensors, sparsity.safetensors): 64 features, frequencies from "
            f"{trained / 'acts'}"
        )
    )
    export(ExportConfig(**{**vars(sl), "acts": None, "overwrite": True}))
    assert (
        capsys.readouterr()
        .out.strip()
        .endswith(
            "(cfg.json, sae_weights.safetensors): 64 features, no firing frequencies; removed the stale "
            "sparsity.safetensors"
        )
    )
    assert not (trained / "sl" / "sparsity.safetensors").exists()

    i = ImportConfig(src=str(trained / "sae"), out=str(trained / "imported"))
    import_cmd(i)
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(f"import: wrote SAE {trained / 'imported'}")
    import_cmd(i)
    assert "nothing to do" in capsys.readouterr().out


def test_export_refuses_the_analysis_of_another_sae_of_the_same_width(trained, tiny_lm, capsys):
    analyze(
        AnalyzeConfig(
            sae=str(trained / "sae"), acts=str(trained / "acts"), out=str(trained / "an"), device="cpu", top_k=4
        ),
        lm=tiny_lm,
    )
    train(tcfg(trained, out=str(trained / "sae2"), seed=1))  # same width, other weights
    with pytest.raises(UserError, match="is the analysis of another SAE"):
        export(
            ExportConfig(
                sae=str(trained / "sae2"), format="dictionary", out=str(trained / "d2"), analysis=str(trained / "an")
            )
        )
    # An analysis that records nothing (made elsewhere) is used, with a warning.
    (trained / "an" / RECORD).unlink()
    capsys.readouterr()
    export(
        ExportConfig(
            sae=str(trained / "sae2"), format="dictionary", out=str(trained / "d2"), analysis=str(trained / "an")
        )
    )
    assert "does not record which SAE it analysed" in capsys.readouterr().err


def test_a_stage_refuses_a_directory_holding_another_stages_output(trained, tiny_lm):
    with pytest.raises(UserError, match="holds the output of `train`, not of `analyze`"):
        analyze(
            AnalyzeConfig(
                sae=str(trained / "sae"), acts=str(trained / "acts"), out=str(trained / "sae"), device="cpu", top_k=4
            ),
            lm=tiny_lm,
        )


def test_overwrite_removes_the_record_before_redoing(trained, monkeypatch):
    """An interrupted redo must not leave the old record saying the output is complete."""
    import sae_lens_lite.training.train as train_mod

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "train_on_batches", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(tcfg(trained, overwrite=True))
    assert not (trained / "sae" / RECORD).exists()


def test_fingerprint_names_content_not_paths(trained, tmp_path):
    import shutil

    shutil.copytree(trained / "sae", tmp_path / "copy")
    assert fingerprint(tmp_path / "copy") == fingerprint(trained / "sae") is not None
    assert fingerprint("pydoc") is None


def test_eval_report_claims_no_dead_window_longer_than_the_run():
    sae = SAE(SAEConfig(d_in=4, d_sae=8))
    sae.cfg.meta.update(final_metrics={"dead_frac": 0.0, "tokens": 99_000}, train_config={"dead_window": 1_000_000})
    assert _training_dead(sae) == {}  # no latent can be silent for 1M tokens in a 99k-token run
    sae.cfg.meta.update(final_metrics={"dead_frac": 0.25, "tokens": 2_000_000})
    assert _training_dead(sae) == {"dead_fraction_in_training": 0.25, "training_dead_window": 1_000_000}
    sae.cfg.meta["final_eval"] = {"dead_frac": 0.125, "n_tokens": 32768}
    assert _training_dead(sae) == {"dead_fraction_end_of_training": 0.125, "end_of_training_tokens": 32768}


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_weights_get_the_same_mode_as_json(tmp_path, umask):
    old = os.umask(umask)
    try:
        SAE(SAEConfig(d_in=4, d_sae=8)).save(tmp_path)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"sae.safetensors": 0o666 & ~umask, "config.json": 0o666 & ~umask}


def test_sae_repr_says_what_it_is():
    sae = SAE(SAEConfig(d_in=4, d_sae=8, activation="topk", k=2, hook=HOOK, model="m"))
    assert repr(sae) == f"SAE(d_in=4, d_sae=8, topk, k=2, hook={HOOK}, model=m, input_scale=1)"
