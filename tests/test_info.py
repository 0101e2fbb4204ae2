"""`sae-lite info PATH`: a cache (complete or partial), an SAE, an evaluation, an analysis, exports."""

import json

import pytest
from test_outputs import hcfg, tcfg

from sae_lens_lite.cli import main
from sae_lens_lite.data.harvest import harvest
from sae_lens_lite.errors import UserError
from sae_lens_lite.evaluation.evaluate import EvalConfig, evaluate
from sae_lens_lite.export import ExportConfig, export
from sae_lens_lite.info import describe
from sae_lens_lite.interpret.analyze import AnalyzeConfig, analyze
from sae_lens_lite.training.train import train


def test_info_on_a_complete_and_a_partial_cache(tiny_lm, corpus_file, tmp_path, capsys):
    harvest(hcfg(tmp_path, corpus_file), lm=tiny_lm)
    m = json.loads((tmp_path / "acts" / "manifest.json").read_text())
    text = describe(str(tmp_path / "acts"))
    assert text.startswith(f"activation cache {tmp_path / 'acts'}: complete")
    assert f"{m['n_tokens']:,} rows x 32 (float32), 32 contexts of 32 tokens, 4 shards" in text
    assert "tiny-llama at blocks.1.hook_resid_post" in text
    # An interrupted harvest: the manifest lists 1 of the 4 shards.
    m.update(complete=False, shards=m["shards"][:1], n_contexts=8)
    (tmp_path / "acts" / "manifest.json").write_text(json.dumps(m))
    text = describe(str(tmp_path / "acts"))
    assert "PARTIAL: 1 of 4 shards (8 of 32 contexts, 25.0%); run the same harvest command to finish it" in text
    assert main(["info", str(tmp_path / "acts" / "manifest.json")]) == 0  # a file names its directory
    assert "PARTIAL" in capsys.readouterr().out


def test_info_on_an_sae_shows_config_training_and_evaluation(tiny_lm, corpus_file, tmp_path):
    harvest(hcfg(tmp_path, corpus_file), lm=tiny_lm)
    train(tcfg(tmp_path))
    evaluate(
        EvalConfig(
            sae=str(tmp_path / "sae"),
            dataset=str(corpus_file),
            tokens=256,
            skip_tokens=0,
            device="cpu",
            baselines=False,
        ),
        lm=tiny_lm,
    )
    fe = json.loads((tmp_path / "sae" / "config.json").read_text())["meta"]["final_eval"]
    r = json.loads((tmp_path / "sae" / "eval" / "report.json").read_text())
    text = describe(str(tmp_path / "sae"))
    assert text.startswith(f"SAE {tmp_path / 'sae'}: relu (trained as l1), d_in 32 -> d_sae 64 (2x)")
    assert "training: penalty l1 (l1 1.0), lr 0.001, batch 256, seed 0, 4,096 tokens" in text
    assert f"EV {fe['explained_variance']:.3f}, L0 {fe['l0']:.1f}" in text
    assert f"evaluation ({tmp_path / 'sae' / 'eval'}): CE loss recovered {r['ce']['sae_recovered']:.3f}" in text
    assert "made by `sae-lite train`" in text
    assert describe(str(tmp_path / "sae" / "eval")).startswith(f"evaluation {tmp_path / 'sae' / 'eval'} of the SAE")


def test_info_on_an_analysis_and_exports(tiny_lm, corpus_file, tmp_path):
    harvest(hcfg(tmp_path, corpus_file), lm=tiny_lm)
    train(tcfg(tmp_path))
    analyze(
        AnalyzeConfig(
            sae=str(tmp_path / "sae"), acts=str(tmp_path / "acts"), out=str(tmp_path / "an"), device="cpu", top_k=4
        ),
        lm=tiny_lm,
    )
    feats = json.loads((tmp_path / "an" / "features.json").read_text())["features"]
    best = min(feats, key=lambda f: f["rank"])
    text = describe(str(tmp_path / "an"))
    assert "64 features" in text and f"rank 1: feature {best['id']}, score {best['score']:.3f}" in text
    for fmt in ("dictionary", "saelens"):
        export(
            ExportConfig(sae=str(tmp_path / "sae"), format=fmt, out=str(tmp_path / fmt), analysis=str(tmp_path / "an"))
        )
    assert describe(str(tmp_path / "dictionary")).startswith(
        f"feature dictionary {tmp_path / 'dictionary'}: 64 features (64 lines), relu, d_in 32"
    )
    text = describe(str(tmp_path / "saelens"))
    assert text.startswith(f"SAELens directory {tmp_path / 'saelens'}: architecture standard, d_in 32 -> d_sae 64")
    assert "sparsity file: yes" in text


def test_info_on_something_else_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match="holds nothing sae-lite wrote"):
        describe(str(tmp_path))
    with pytest.raises(UserError, match="not found"):
        describe(str(tmp_path / "nope"))


def test_info_on_a_training_run_in_progress(tmp_path):
    (tmp_path / "checkpoint.json").write_text(json.dumps({"step": 30, "tokens": 7680, "complete": False}))
    assert (
        describe(str(tmp_path))
        == f"SAE training in progress {tmp_path}: checkpoint at step 30 (7,680 tokens); run the same train "
        "command to resume"
    )


def test_info_on_a_run_stopped_before_its_first_checkpoint(tmp_path, capsys):
    """train writes checkpoint.json with step 0 and file null before anything else; no tokens yet."""
    ck = {"step": 0, "complete": False, "file": None, "train_config": {"checkpoint_every": 5_000_000}, "sae_config": {}}
    (tmp_path / "checkpoint.json").write_text(json.dumps(ck))
    assert main(["info", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == (
        f"SAE training in progress {tmp_path}: no checkpoint yet (one is saved every 5,000,000 tokens); run the "
        "same train command to resume (it starts from the beginning)"
    )
    # and the stages that need a finished SAE say what the directory holds
    from sae_lens_lite.training.sae import SAE

    with pytest.raises(UserError, match="holds a training run that has not finished; run the same sae-lite train"):
        SAE.load(tmp_path)
    (tmp_path / "checkpoint.json").unlink()
    with pytest.raises(UserError, match="is not an SAE directory"):
        SAE.load(tmp_path)


def test_info_on_a_cache_does_not_claim_its_shards_are_sound(tmp_path):
    from test_cache import make_cache

    make_cache(tmp_path / "c")
    first = describe(str(tmp_path / "c")).splitlines()[0]
    note = "(shards not verified; `sae-lite cache verify` checks them)"
    assert first == f"activation cache {tmp_path / 'c'}: complete {note}"
    (tmp_path / "c" / "shard_00002.safetensors").unlink()  # a missing file costs nothing to notice
    first = describe(str(tmp_path / "c")).splitlines()[0]
    assert first == (
        f"activation cache {tmp_path / 'c'}: DAMAGED: 1 of 4 shards missing (shard_00002.safetensors); run the "
        "same harvest command again to repair it"
    )


def test_info_on_a_harvest_of_several_hooks_names_its_caches(tmp_path):
    from test_cache import make_cache

    for h in ("blocks.2.hook_resid_post", "blocks.4.hook_resid_post"):
        make_cache(tmp_path / "multi" / h)
    lines = describe(str(tmp_path / "multi")).splitlines()
    assert lines[0] == (
        f"activation caches {tmp_path / 'multi'}, one per hook (2); "
        f"pass one of them to train or analyze, e.g. --acts {tmp_path / 'multi' / 'blocks.2.hook_resid_post'}"
    )
    assert lines[1].startswith("  blocks.2.hook_resid_post: complete") and "80 rows x 3 (float32)" in lines[1]
    assert len(lines) == 3
