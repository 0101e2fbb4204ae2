"""Transcoders: pair harvest, training (every recipe, with and without the skip path), ground
truth, the spliced evaluation and the exports."""

import pytest
import torch

from sae_lens_lite.cache import ActivationCache
from sae_lens_lite.corpus import load_texts, tokenize_corpus
from sae_lens_lite.errors import UserError
from sae_lens_lite.harvest import HarvestConfig, harvest
from sae_lens_lite.models import blocks, edit_hook, run_to_hooks
from tests.conftest import FAMILIES, tiny_model

MLP_IN, MLP_OUT = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"


def harvest_cfg(corpus, out, **kw):
    base = dict(
        dataset=str(corpus),
        tokens=2000,
        context_length=32,
        batch_size=4,
        out=str(out),
        dtype="float32",
        contexts_per_shard=8,
        drop_first=0,
        mlp_pairs="1",
    )
    return HarvestConfig(**{**base, **kw})


# ---- hooks and the pair harvest -------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_mlp_input_hook_is_what_the_mlp_reads(family):
    model = tiny_model(family)
    ids = torch.randint(0, 96, (2, 7))
    acts = run_to_hooks(model, ids, ["blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"])
    mlp = blocks(model)[1].mlp
    with torch.no_grad():
        torch.testing.assert_close(mlp(acts["blocks.1.ln2.hook_normalized"]), acts["blocks.1.hook_mlp_out"])


def test_replacing_the_mlp_input_changes_its_output():
    model = tiny_model("llama")
    ids = torch.randint(0, 96, (2, 7))
    clean = run_to_hooks(model, ids, [MLP_OUT])[MLP_OUT]
    with edit_hook(model, MLP_IN, torch.zeros_like):
        zeroed = run_to_hooks(model, ids, [MLP_OUT])[MLP_OUT]
    with torch.no_grad():
        expect = model.model.layers[1].mlp(torch.zeros(2, 7, 32))
    torch.testing.assert_close(zeroed, expect)
    assert not torch.allclose(zeroed, clean)


def test_pair_harvest_holds_mlp_inputs_and_outputs_of_the_same_tokens(tiny_lm, corpus_file, tmp_path):
    out = harvest(harvest_cfg(corpus_file, tmp_path / "pairs", drop_first=2), lm=tiny_lm)[MLP_IN]
    cache = ActivationCache.open(out)
    m = cache.manifest
    assert m["hook"] == MLP_IN and m["target_hook"] == MLP_OUT and m["d_target"] == 32 == cache.d_target
    contexts = tokenize_corpus(tiny_lm.tokenizer, load_texts(str(corpus_file)), 32, 2000)
    want = run_to_hooks(tiny_lm.model, contexts, [MLP_IN, MLP_OUT])
    data = cache.load(("activations", "targets", "doc", "pos"))
    doc, pos = data["doc"].long(), data["pos"].long()
    assert int(pos.min()) == 2
    torch.testing.assert_close(data["activations"], want[MLP_IN][doc, pos])
    torch.testing.assert_close(data["targets"], want[MLP_OUT][doc, pos])
    rows = next(cache.iter_batches(64, shuffle=False, targets=True))  # [64, d_in + d_out]
    torch.testing.assert_close(rows, torch.cat([data["activations"][:64], data["targets"][:64]], 1))
    assert next(cache.iter_batches(64, shuffle=False)).shape == (64, 32)  # the input alone, as for an SAE


def test_all_layers_pairs_in_one_pass(tiny_lm, corpus_file, tmp_path):
    dirs = harvest(harvest_cfg(corpus_file, tmp_path / "all", mlp_pairs="all"), lm=tiny_lm)
    assert sorted(dirs) == [f"blocks.{L}.ln2.hook_normalized" for L in range(3)]
    one = ActivationCache.open(harvest(harvest_cfg(corpus_file, tmp_path / "one"), lm=tiny_lm)[MLP_IN])
    same = ActivationCache.open(dirs[MLP_IN])
    assert [s["sha256"] for s in same.manifest["shards"]] == [s["sha256"] for s in one.manifest["shards"]]
    assert ActivationCache.open(dirs["blocks.2.ln2.hook_normalized"]).manifest["target_hook"] == "blocks.2.hook_mlp_out"


def test_pair_harvest_refuses_bad_layers_and_a_plain_cache_has_no_targets(tiny_lm, corpus_file, tmp_path):
    with pytest.raises(UserError, match="0..2"):
        harvest(harvest_cfg(corpus_file, tmp_path / "bad", mlp_pairs="7"), lm=tiny_lm)
    with pytest.raises(UserError, match="layer numbers"):
        harvest(harvest_cfg(corpus_file, tmp_path / "bad2", mlp_pairs="six"), lm=tiny_lm)
    plain = harvest(harvest_cfg(corpus_file, tmp_path / "plain", mlp_pairs="", hooks=[MLP_OUT]), lm=tiny_lm)
    with pytest.raises(UserError, match="--mlp-pairs"):
        next(ActivationCache.open(plain[MLP_OUT]).iter_batches(8, targets=True))
