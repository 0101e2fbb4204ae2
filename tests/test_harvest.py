import pytest
import torch
from conftest import HOOK, harvest_config

from sae_lens_lite.data.cache import ActivationCache, CacheWriter
from sae_lens_lite.data.corpus import load_texts, tokenize_corpus
from sae_lens_lite.data.harvest import harvest
from sae_lens_lite.data.models import run_to_hooks
from sae_lens_lite.errors import UserError


def cfg(corpus, out, **kw):
    return harvest_config(corpus, out, **kw)


def test_cache_holds_the_models_activations_and_tokens(tiny_lm, corpus_file, tmp_path):
    out = harvest(cfg(corpus_file, tmp_path / "acts"), lm=tiny_lm)[HOOK]
    cache = ActivationCache.open(out)
    m = cache.manifest
    assert m["complete"] and m["hook"] == HOOK and m["d_model"] == 32 and m["context_length"] == 32
    contexts = tokenize_corpus(tiny_lm.tokenizer, load_texts(str(corpus_file)), 32, 2000)  # [n_ctx, 32]
    expected = run_to_hooks(tiny_lm.model, contexts, [HOOK])[HOOK]  # [n_ctx, 32, d]
    eos = tiny_lm.tokenizer.eos_token_id
    keep = contexts != eos
    data = cache.load()
    assert m["n_tokens"] == int(keep.sum()) == len(data["tokens"])
    torch.testing.assert_close(data["activations"], expected[keep], rtol=1e-5, atol=1e-5)
    assert torch.equal(data["tokens"].long(), contexts[keep])
    assert torch.equal(contexts[data["doc"].long(), data["pos"].long()], data["tokens"].long())
    assert sum(s["n_rows"] for s in m["shards"]) == m["n_tokens"] and len(m["shards"]) == -(-len(contexts) // 8)


def test_several_hooks_in_one_pass_give_one_cache_each(tiny_lm, corpus_file, tmp_path):
    hooks = ["blocks.0.hook_resid_post", "blocks.2.hook_mlp_out", HOOK]
    dirs = harvest(cfg(corpus_file, tmp_path / "multi", hooks=hooks), lm=tiny_lm)
    assert set(dirs) == set(hooks)
    single = ActivationCache.open(
        harvest(cfg(corpus_file, tmp_path / "one", hooks=["blocks.2.hook_mlp_out"]), lm=tiny_lm)[
            "blocks.2.hook_mlp_out"
        ]
    )
    multi = ActivationCache.open(dirs["blocks.2.hook_mlp_out"])
    assert [s["sha256"] for s in multi.manifest["shards"]] == [s["sha256"] for s in single.manifest["shards"]]


def test_filters_drop_first_positions_and_outliers(tiny_lm, corpus_file, tmp_path):
    c = ActivationCache.open(harvest(cfg(corpus_file, tmp_path / "f", drop_first=3), lm=tiny_lm)[HOOK])
    assert int(c.load(("pos",))["pos"].min()) == 3
    assert c.manifest["filters"]["drop_first"] == 3
    full = ActivationCache.open(harvest(cfg(corpus_file, tmp_path / "g", drop_special=False), lm=tiny_lm)[HOOK])
    assert full.n_tokens == full.manifest["n_contexts"] * 32
    o = ActivationCache.open(
        harvest(cfg(corpus_file, tmp_path / "o", drop_special=False, outlier_factor=1.05), lm=tiny_lm)[HOOK]
    )
    norms = full.load()["activations"].norm(dim=-1)
    assert 0 < o.n_tokens < full.n_tokens
    assert o.load()["activations"].norm(dim=-1).max() <= norms.max()


def test_interrupted_harvest_resumes_to_an_identical_cache(tiny_lm, corpus_file, tmp_path, monkeypatch):
    ref = ActivationCache.open(harvest(cfg(corpus_file, tmp_path / "ref"), lm=tiny_lm)[HOOK]).manifest
    real_add = CacheWriter.add_shard
    calls = {"n": 0}

    def dying_add(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # killed while writing the second shard
        return real_add(self, *a, **kw)

    monkeypatch.setattr(CacheWriter, "add_shard", dying_add)
    with pytest.raises(KeyboardInterrupt):
        harvest(cfg(corpus_file, tmp_path / "resumed"), lm=tiny_lm)
    with pytest.raises(UserError, match="incomplete"):
        ActivationCache.open(tmp_path / "resumed")
    monkeypatch.setattr(CacheWriter, "add_shard", real_add)
    m = ActivationCache.open(harvest(cfg(corpus_file, tmp_path / "resumed"), lm=tiny_lm)[HOOK]).manifest
    assert [s["sha256"] for s in m["shards"]] == [s["sha256"] for s in ref["shards"]]
    assert m["n_tokens"] == ref["n_tokens"]


def test_resuming_with_other_settings_names_the_flags_and_both_values(tiny_lm, corpus_file, tmp_path, monkeypatch):
    """An interrupted cache resumed with another --tokens (or filter) names what the user typed,
    with the old and new values, and says how to finish it instead."""
    real_add = CacheWriter.add_shard

    def dying_add(self, *a, **kw):
        if self.n_shards == 1:
            raise KeyboardInterrupt
        return real_add(self, *a, **kw)

    monkeypatch.setattr(CacheWriter, "add_shard", dying_add)
    with pytest.raises(KeyboardInterrupt):
        harvest(cfg(corpus_file, tmp_path / "acts"), lm=tiny_lm)
    monkeypatch.setattr(CacheWriter, "add_shard", real_add)
    with pytest.raises(UserError, match=r"contexts, from --tokens \(was 47, now 31\).*run the harvest it was started"):
        harvest(cfg(corpus_file, tmp_path / "acts", tokens=1000), lm=tiny_lm)
    with pytest.raises(UserError, match=r"differs in: filters\.drop_first \(was 0, now 2\)\)"):
        harvest(cfg(corpus_file, tmp_path / "acts", drop_first=2), lm=tiny_lm)


def test_bad_input_is_refused_before_anything_is_written(tiny_lm, corpus_file, tmp_path):
    with pytest.raises(UserError, match="unknown hook"):
        harvest(cfg(corpus_file, tmp_path / "a", hooks=["blocks.1.resid_post"]), lm=tiny_lm)
    assert not (tmp_path / "a").exists()
    with pytest.raises(UserError, match="beyond the model's depth"):
        harvest(cfg(corpus_file, tmp_path / "b", hooks=["blocks.9.hook_resid_post"]), lm=tiny_lm)
    with pytest.raises(UserError, match="longer than the model allows"):
        harvest(cfg(corpus_file, tmp_path / "c", context_length=4096), lm=tiny_lm)
    blank = tmp_path / "blank.txt"
    blank.write_text("  \n\t\n")
    with pytest.raises(UserError, match="empty"):
        harvest(cfg(blank, tmp_path / "d"), lm=tiny_lm)
    with pytest.raises(UserError, match="not found"):
        harvest(cfg(tmp_path / "missing.txt", tmp_path / "e"), lm=tiny_lm)
    assert not any((tmp_path / x).exists() for x in "bcde")


def test_a_cache_made_differently_is_refused_unless_overwrite(tiny_lm, corpus_file, tmp_path):
    harvest(cfg(corpus_file, tmp_path / "acts"), lm=tiny_lm)
    with pytest.raises(UserError, match="made differently.*context_length"):
        harvest(cfg(corpus_file, tmp_path / "acts", context_length=16), lm=tiny_lm)
    harvest(cfg(corpus_file, tmp_path / "acts", context_length=16, overwrite=True), lm=tiny_lm)
    assert ActivationCache.open(tmp_path / "acts").manifest["context_length"] == 16
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        harvest(cfg(corpus_file, tmp_path / "other"), lm=tiny_lm)


def test_nonfinite_activations_are_refused_or_skipped(tiny_lm, corpus_file, tmp_path):
    def poison(module, args, out):
        out = out.clone()
        out[:, 5] = float("nan")  # position 5 of every context
        return out

    tiny_lm.model.model.layers[1].register_forward_hook(poison)  # the hooked layer
    with pytest.raises(UserError, match="NaN or Inf.*--nonfinite skip"):
        harvest(cfg(corpus_file, tmp_path / "n"), lm=tiny_lm)
    c = ActivationCache.open(
        harvest(cfg(corpus_file, tmp_path / "s", nonfinite="skip", drop_special=False), lm=tiny_lm)[HOOK]
    )
    assert c.manifest["nonfinite_rows"] == c.manifest["n_contexts"]
    assert all(s["nonfinite_rows"] == s["n_contexts"] for s in c.manifest["shards"])
    assert 5 not in c.load(("pos",))["pos"].tolist()
    assert torch.isfinite(c.load()["activations"]).all()


def test_a_directory_of_other_work_is_refused_and_left_as_it_was(tiny_lm, corpus_file, tmp_path, capsys):
    from sae_lens_lite.cli import main

    mine = tmp_path / "junk"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty and is not an activation cache"):
        harvest(cfg(corpus_file, mine), lm=tiny_lm)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]  # no .lock left behind
    # from the command line: one line, exit 2, refused before the model loads
    assert main(["harvest", "--out", str(mine), "--hook", HOOK, "--dataset", str(corpus_file)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not an activation cache" in err
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    afile = tmp_path / "afile"
    afile.write_text("mine")
    with pytest.raises(UserError, match="is not a directory"):
        harvest(cfg(corpus_file, afile), lm=tiny_lm)
    assert afile.read_text() == "mine"
    # several hooks write one subdirectory each into --out: a directory of the user's files is refused too
    hooks = ["blocks.0.hook_resid_post", HOOK]
    with pytest.raises(UserError, match=r"junk holds other files \(notes.txt\); a harvest of several hooks"):
        harvest(cfg(corpus_file, mine, hooks=hooks), lm=tiny_lm)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    both = tmp_path / "both"  # and a finished harvest of several hooks is not "other files" to itself
    harvest(cfg(corpus_file, both, hooks=hooks), lm=tiny_lm)
    assert sorted(p.name for p in both.iterdir()) == sorted(hooks)
    harvest(cfg(corpus_file, both, hooks=hooks), lm=tiny_lm)  # the rerun finds it complete: not refused
