import json
import math
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sae_lens_lite.data.cache import CacheWriter
from sae_lens_lite.errors import UserError
from sae_lens_lite.export import (
    ExportConfig,
    ImportConfig,
    export,
    import_cmd,
    import_sae,
    load_dictionary,
    read_analysis,
)
from sae_lens_lite.training.sae import SAE, SAEConfig

D_IN, D_SAE, K = 16, 48, 6


def make_sae(activation="relu", scale=0.37, seed=0):
    """A random SAE with non-trivial biases and an input scale != 1, so folding is exercised."""
    g = torch.Generator().manual_seed(seed)
    sae = SAE(
        SAEConfig(
            d_in=D_IN,
            d_sae=D_SAE,
            activation=activation,
            k=K if activation == "topk" else None,
            model="smollm2-135m",
            hook="blocks.3.hook_resid_post",
            context_length=64,
            meta={"corpus": "pydoc", "filters": {"drop_special": True}},
        )
    )
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D_IN, D_SAE, generator=g) * 0.3)
        sae.W_dec.copy_(torch.randn(D_SAE, D_IN, generator=g) * 0.3)
        sae.b_enc.copy_(torch.randn(D_SAE, generator=g) * 0.1)
        sae.b_dec.copy_(torch.randn(D_IN, generator=g))
        sae.input_scale.fill_(scale)
        if activation == "jumprelu":
            sae.threshold.copy_(torch.rand(D_SAE, generator=g) * 0.3)
    return sae


def inputs(n=200, seed=1):
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed)) * 3  # [n, d_in]


def saelens_reference(cfg: dict, w: dict, x: torch.Tensor):
    """SAELens's inference math for standard/topk SAEs, written from its documented formulas
    (independent of our export code): returns (latents, reconstruction)."""
    sae_in = x - w["b_dec"] * cfg["apply_b_dec_to_input"]
    pre = sae_in @ w["W_enc"] + w["b_enc"]
    if cfg["architecture"] == "topk":
        vals, idx = pre.topk(cfg["k"], dim=-1)
        f = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
    elif cfg["architecture"] == "jumprelu":
        f = pre.relu() * (pre > w["threshold"])
    else:
        f = pre.relu()
    return f, f @ w["W_dec"] + w["b_dec"]


ARCH = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu"}  # BatchTopK, Matryoshka: jumprelu


@pytest.fixture(params=["relu", "topk", "jumprelu"])
def saved_sae(request, tmp_path):
    sae = make_sae(request.param)
    sae.save(tmp_path / "sae")
    return sae, tmp_path / "sae"


@torch.no_grad()
def test_saelens_export_matches_saelens_math_and_declares_the_mapping(saved_sae, tmp_path):
    sae, path = saved_sae
    out = export(ExportConfig(sae=str(path), format="saelens", out=str(tmp_path / "sl")))
    cfg = json.loads((out / "cfg.json").read_text())
    w = load_file(out / "sae_weights.safetensors")
    assert w["W_enc"].shape == (D_IN, D_SAE) and w["W_dec"].shape == (D_SAE, D_IN)
    assert cfg["architecture"] == ARCH[sae.cfg.activation]
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"]) == (D_IN, D_SAE, "float32")
    assert cfg["apply_b_dec_to_input"] is True and cfg["normalize_activations"] == "none"
    assert cfg.get("k") == (K if sae.cfg.activation == "topk" else None)
    m = cfg["metadata"]
    assert m["hook_name"] == "blocks.3.hook_resid_post" and m["context_size"] == 64
    assert m["model_name"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and m["prepend_bos"] is False
    assert m["sae_lens_version"].startswith("6.")  # else SAELens reads it through its pre-6 legacy path
    assert m["sae_lens_lite"]["input_scale_folded"] == pytest.approx(0.37)
    assert len(m["sae_lens_lite"]["source_sae_sha256"]) == 64
    assert not (out / "sparsity.safetensors").exists()  # no analysis, no cache: nothing to write
    x = inputs()
    f, x_hat = saelens_reference(cfg, w, x)
    out_ours = sae(x)
    assert (f - out_ours.latents).abs().max() <= 1e-5
    assert (x_hat - out_ours.x_hat).abs().max() <= 1e-5


@torch.no_grad()
def test_round_trip_ours_saelens_ours_is_exact(saved_sae, tmp_path):
    sae, path = saved_sae
    out = export(ExportConfig(sae=str(path), format="saelens", out=str(tmp_path / "sl")))
    back = import_sae(out)
    folded = sae.folded()
    for name, _ in folded.named_parameters():
        assert torch.equal(getattr(back, name), getattr(folded, name)), name
    assert float(back.input_scale) == 1.0
    assert (back.cfg.activation, back.cfg.k) == (sae.cfg.activation, sae.cfg.k)
    assert (back.cfg.model, back.cfg.hook, back.cfg.context_length) == ("smollm2-135m", sae.cfg.hook, 64)
    assert back.cfg.meta["corpus"] == "pydoc" and back.cfg.meta["imported_from"]["format"] == "saelens"
    x = inputs()
    assert (back.encode(x) - sae.encode(x)).abs().max() <= 1e-5
    assert (back(x).x_hat - sae(x).x_hat).abs().max() <= 1e-5
    # And once more through SAELens: the second export is the first one, byte for byte in the weights.
    back.save(tmp_path / "back")
    again = export(ExportConfig(sae=str(tmp_path / "back"), format="saelens", out=str(tmp_path / "sl2")))
    assert (again / "sae_weights.safetensors").read_bytes() == (out / "sae_weights.safetensors").read_bytes()


def _import_saelens_or_skip():
    try:
        import sae_lens
    except Exception as e:  # absent, or broken against this torch/transformers
        pytest.skip(f"sae-lens not importable ({type(e).__name__}); pip install -e '.[saelens]'")
    return sae_lens


@torch.no_grad()
def test_real_saelens_loads_our_export_and_computes_the_same(saved_sae, tmp_path):
    sae_lens = _import_saelens_or_skip()
    sae, path = saved_sae
    cache = _write_cache(tmp_path / "acts", inputs(300, seed=5))
    out = export(ExportConfig(sae=str(path), format="saelens", out=str(tmp_path / "sl"), acts=str(cache)))
    theirs = sae_lens.SAE.load_from_disk(str(out), device="cpu")
    assert (
        type(theirs).__name__
        == {"relu": "StandardSAE", "topk": "TopKSAE", "jumprelu": "JumpReLUSAE"}[sae.cfg.activation]
    )
    assert theirs.cfg.metadata.hook_name == sae.cfg.hook and theirs.cfg.metadata.context_size == 64
    x = inputs()
    f = sae.encode(x)
    assert (theirs.encode(x) - f).abs().max() <= 1e-5
    assert (theirs.decode(f) - sae.decode(f)).abs().max() <= 1e-5
    assert (theirs(x) - sae(x).x_hat).abs().max() <= 1e-5
    # A directory SAELens itself writes imports back to the same function.
    theirs.save_model(tmp_path / "resaved")
    back = import_sae(tmp_path / "resaved")
    assert (back.encode(x) - f).abs().max() <= 1e-5 and (back(x).x_hat - sae(x).x_hat).abs().max() <= 1e-5


@torch.no_grad()
def test_real_saelens_variants_import_to_the_same_function(tmp_path):
    """SAELens SAEs we did not write: b_dec not applied to the input, decoder-norm-rescaled topk."""
    sae_lens = _import_saelens_or_skip()
    from sae_lens import StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig

    torch.manual_seed(0)
    x = inputs()
    for theirs in (
        StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=False)),
        TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=K, rescale_acts_by_decoder_norm=True)),
    ):
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.2)
        d = tmp_path / theirs.cfg.architecture()
        theirs.save_model(d)
        ours = import_sae(d)
        assert (ours.encode(x) - theirs.encode(x)).abs().max() <= 1e-5
        assert (ours(x).x_hat - theirs(x)).abs().max() <= 1e-5
    assert sae_lens.__version__.startswith("6.")


@torch.no_grad()
def test_import_saelens_variants_without_the_package(tmp_path):
    g = torch.Generator().manual_seed(3)
    w = {
        "W_enc": torch.randn(D_IN, D_SAE, generator=g),
        "W_dec": torch.randn(D_SAE, D_IN, generator=g),
        "b_enc": torch.randn(D_SAE, generator=g),
        "b_dec": torch.randn(D_IN, generator=g),
    }
    x = inputs()
    cases = {
        "no_b_dec_in": {"architecture": "standard", "apply_b_dec_to_input": False},
        # A pre-6 SAELens config: keys at the top level, topk spelled as an activation function.
        "legacy_topk": {
            "activation_fn_str": "topk",
            "activation_fn_kwargs": {"k": K},
            "hook_point": "blocks.1.hook_resid_pre",
            "model_name": "gpt2",
            "context_size": 128,
            "apply_b_dec_to_input": True,
        },
    }
    for name, extra in cases.items():
        cfg = {"d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "normalize_activations": "none", **extra}
        (tmp_path / name).mkdir()
        (tmp_path / name / "cfg.json").write_text(json.dumps(cfg))
        save_file(w, str(tmp_path / name / "sae_weights.safetensors"))
        ours = import_sae(tmp_path / name)
        ref = {"architecture": "topk" if "topk" in name else "standard", "k": K, **cfg}
        f, x_hat = saelens_reference(ref, w, x)
        assert (ours.encode(x) - f).abs().max() <= 1e-4, name
        assert (ours(x).x_hat - x_hat).abs().max() <= 1e-4, name
    assert (ours.cfg.hook, ours.cfg.model, ours.cfg.context_length) == ("blocks.1.hook_resid_pre", "gpt2", 128)

    # jumprelu, some thresholds below 0: SAELens's relu(pre)·(pre > θ) treats those as 0.
    cfg = {
        "architecture": "jumprelu",
        "d_in": D_IN,
        "d_sae": D_SAE,
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
    }
    wj = {**w, "threshold": torch.rand(D_SAE, generator=g) - 0.5}
    (tmp_path / "jump").mkdir()
    (tmp_path / "jump" / "cfg.json").write_text(json.dumps(cfg))
    save_file(wj, str(tmp_path / "jump" / "sae_weights.safetensors"))
    ours = import_sae(tmp_path / "jump")
    f, x_hat = saelens_reference(cfg, wj, x)
    assert ours.cfg.activation == "jumprelu" and bool((wj["threshold"] < 0).any())
    assert (ours.encode(x) - f).abs().max() <= 1e-4 and (ours(x).x_hat - x_hat).abs().max() <= 1e-4

    for bad, msg in (
        ({"architecture": "jumprelu"}, "jumprelu"),
        ({"architecture": "standard", "normalize_activations": "layer_norm"}, "layer_norm"),
    ):
        (tmp_path / "bad").mkdir(exist_ok=True)
        (tmp_path / "bad" / "cfg.json").write_text(json.dumps({"d_in": D_IN, "d_sae": D_SAE, **bad}))
        save_file(w, str(tmp_path / "bad" / "sae_weights.safetensors"))
        with pytest.raises(UserError, match=msg):
            import_sae(tmp_path / "bad")


def _write_sparsify(path, g, **cfg_extra):
    path.mkdir(parents=True)
    # nn.Linear orientation: encoder.weight is [d_sae, d_in], the transpose of our W_enc.
    w = {
        "encoder.weight": torch.randn(D_SAE, D_IN, generator=g),
        "encoder.bias": torch.randn(D_SAE, generator=g) * 0.1,
        "W_dec": torch.randn(D_SAE, D_IN, generator=g),
        "b_dec": torch.randn(D_IN, generator=g),
    }
    save_file(w, str(path / "sae.safetensors"))
    cfg = {
        "activation": "topk",
        "expansion_factor": 32,
        "normalize_decoder": True,
        "num_latents": D_SAE,
        "k": K,
        "multi_topk": False,
        "skip_connection": False,
        "transcode": False,
        "d_in": D_IN,
        **cfg_extra,
    }
    (path / "cfg.json").write_text(json.dumps(cfg))
    return w


@torch.no_grad()
def test_import_sparsify_matches_its_forward(tmp_path):
    g = torch.Generator().manual_seed(4)
    w = _write_sparsify(tmp_path / "run" / "layers.5", g)
    _write_sparsify(tmp_path / "run" / "layers.6.mlp", g)
    x = inputs()
    # sparsify: top-k of relu(encoder(x - b_dec)), decoded as a sum of W_dec rows plus b_dec.
    pre = torch.relu((x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"])
    vals, idx = pre.topk(K, dim=-1)
    x_hat = (vals[..., None] * w["W_dec"][idx]).sum(-2) + w["b_dec"]
    ours = import_sae(tmp_path / "run" / "layers.5")
    assert (ours.cfg.activation, ours.cfg.k, ours.cfg.hook) == ("topk", K, "blocks.5.hook_resid_post")
    assert (ours.encode(x) - torch.zeros(len(x), D_SAE).scatter(-1, idx, vals)).abs().max() <= 1e-5
    assert (ours(x).x_hat - x_hat).abs().max() <= 1e-4
    assert import_sae(tmp_path / "run" / "layers.6.mlp").cfg.hook == "blocks.6.hook_mlp_out"
    with pytest.raises(UserError, match="layers.5"):  # a whole sparsify run: say which to pick
        import_sae(tmp_path / "run")
    _write_sparsify(tmp_path / "tc", g, transcode=True)
    with pytest.raises(UserError, match="transcoder"):
        import_sae(tmp_path / "tc")


def test_import_cmd_writes_our_sae_with_overrides(tmp_path):
    _write_sparsify(tmp_path / "layers.2", torch.Generator().manual_seed(0))
    out = import_cmd(ImportConfig(src=str(tmp_path / "layers.2"), out=str(tmp_path / "ours"), model="gpt2"))
    sae = SAE.load(out)
    assert (sae.cfg.model, sae.cfg.hook, sae.cfg.meta["imported_from"]["format"]) == (
        "gpt2",
        "blocks.2.hook_resid_post",
        "sparsify",
    )
    with pytest.raises(UserError, match="not empty"):
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "notes.txt").write_text("mine")
        import_cmd(ImportConfig(src=str(tmp_path / "layers.2"), out=str(tmp_path / "other")))
    with pytest.raises(UserError, match="neither a SAELens"):
        import_sae(tmp_path / "other")


def test_importing_one_of_our_own_saes_says_so_in_words(tmp_path, capsys):
    SAE(SAEConfig(d_in=8, d_sae=16, hook="blocks.0.hook_resid_post")).save(tmp_path / "ours")
    import_cmd(ImportConfig(src=str(tmp_path / "ours"), out=str(tmp_path / "copy")))
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert f"from the sae_lens_lite SAE {tmp_path / 'ours'}:" in line, line


def test_hub_import_without_sae_lens_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sae_lens", None)  # makes `import sae_lens` fail
    with pytest.raises(UserError, match=r"pip install"):
        import_sae("gpt2-small-res-jb", sae_id="blocks.8.hook_resid_pre")
    with pytest.raises(UserError, match="--sae-id"):
        import_sae("gpt2-small-res-jb")


def _write_cache(path, acts):
    n = len(acts)
    w = CacheWriter(
        path,
        {"model": "smollm2-135m", "hook": "blocks.3.hook_resid_post", "dtype": "float32", "context_length": 64},
        D_IN,
    )
    w.add_shard(
        acts,
        torch.zeros(n, dtype=torch.int32),
        torch.arange(n) // 64,
        torch.arange(n) % 64,
        n_contexts=math.ceil(n / 64),
    )
    w.finish()
    return path


@torch.no_grad()
def test_sparsity_file_holds_log10_firing_frequency_from_the_cache(tmp_path):
    sae = make_sae("relu")
    sae.save(tmp_path / "sae")
    acts = inputs(300, seed=7)
    _write_cache(tmp_path / "acts", acts)
    out = export(
        ExportConfig(sae=str(tmp_path / "sae"), format="saelens", out=str(tmp_path / "sl"), acts=str(tmp_path / "acts"))
    )
    freq = (sae.encode(acts) > 0).float().mean(0)  # [d_sae]
    assert (freq == 0).any() or (freq > 0).all()
    with safe_open(str(out / "sparsity.safetensors"), "pt") as f:
        assert torch.allclose(f.get_tensor("sparsity"), torch.log10(freq + 1e-10))
    # Re-exporting without frequencies (a different request: --overwrite) must not leave the old sparsity file behind.
    export(ExportConfig(sae=str(tmp_path / "sae"), format="saelens", out=str(tmp_path / "sl"), overwrite=True))
    assert not (out / "sparsity.safetensors").exists()
    sae.cfg.hook = "blocks.9.hook_resid_post"
    sae.save(tmp_path / "sae9")
    with pytest.raises(UserError, match="blocks.9"):
        export(
            ExportConfig(
                sae=str(tmp_path / "sae9"), format="saelens", out=str(tmp_path / "x"), acts=str(tmp_path / "acts")
            )
        )


def test_dictionary_export_carries_a_real_analysis_logit_lens_included(tmp_path):
    """The analysis here is `sae-lite analyze`'s own output on a tiny model, not a hand-written file."""
    from test_analyze import run, synthetic

    synthetic(tmp_path)  # writes tmp_path/sae and tmp_path/acts
    run(tmp_path)  # writes tmp_path/out/features.json
    res = json.loads((tmp_path / "out" / "features.json").read_text())
    vocab = res["vocab"]
    out = export(
        ExportConfig(
            sae=str(tmp_path / "sae"), format="dictionary", out=str(tmp_path / "dict"), analysis=str(tmp_path / "out")
        )
    )
    header, lines, w = load_dictionary(out)
    assert header["has_analysis"] and header["has_frequency"]
    assert [line["id"] for line in lines] == list(range(8))  # line i is feature i
    for line, f in zip(lines, res["features"]):
        assert set(line) == {"id", "rank", "score", "frequency", "top_tokens", "top_contexts", "logit_lens", "label"}
        assert (line["rank"], line["score"], line["label"]) == (f["rank"], f["score"], "")
        assert line["frequency"] == pytest.approx(f["frequency"], rel=1e-6)  # through float32, as SAELens stores it
        lens = line["logit_lens"]
        assert lens is not None, "the analysis's logit lens was dropped"
        for side in ("promoted", "suppressed"):
            assert [(e["id"], e["token"], e["logit"]) for e in lens[side]] == [
                (t, vocab[str(t)], v) for t, v in f["lens"][side]
            ]
            assert len(lens[side]) == 10
        assert [(e["id"], e["token"], e["share"]) for e in line["top_tokens"]] == [
            (t, vocab[str(t)], s) for t, s in f["top_tokens"]
        ]
        assert len(line["top_contexts"]) == len(f["examples"])
        for c, e in zip(line["top_contexts"], f["examples"]):
            assert (
                c["tokens"] == [vocab[str(t)] for t in e["tokens"]]
                and c["act"] == e["act"]
                and c["center"] == e["center"]
            )
    from test_analyze import TOKEN_ID

    assert lines[0]["top_tokens"][0]["id"] == TOKEN_ID and lines[0]["top_tokens"][0]["share"] == 1.0
    # SAELens's sparsity file takes the analysis's frequencies.
    sl = export(
        ExportConfig(
            sae=str(tmp_path / "sae"), format="saelens", out=str(tmp_path / "sl"), analysis=str(tmp_path / "out")
        )
    )
    with safe_open(str(sl / "sparsity.safetensors"), "pt") as fh:
        freq = torch.tensor([f["frequency"] for f in res["features"]])
        assert torch.allclose(fh.get_tensor("sparsity"), torch.log10(freq + 1e-10))
    sae = SAE.load(tmp_path / "sae")
    folded = sae.folded()
    for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert torch.equal(w[name], getattr(folded, name)), name


def test_dictionary_without_analysis_and_its_provenance(tmp_path):
    sae = make_sae("topk")
    sae.save(tmp_path / "sae")
    out = export(ExportConfig(sae=str(tmp_path / "sae"), format="dictionary", out=str(tmp_path / "dict")))
    header, lines, w = load_dictionary(out)
    assert lines[0] == {
        "id": 0,
        "rank": None,
        "score": None,
        "frequency": None,
        "top_tokens": [],
        "top_contexts": [],
        "logit_lens": None,
        "label": "",
    }
    assert len(lines) == D_SAE and not header["has_analysis"]
    with safe_open(str(out / "dictionary.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "sae_lens_lite.dictionary" and json.loads(meta["hook"]) == "blocks.3.hook_resid_post"
    assert json.loads(meta["input_scale_folded"]) == pytest.approx(0.37) and json.loads(meta["k"]) == K
    assert header["source_sae_sha256"] == json.loads(meta["source_sae_sha256"])


def test_analysis_that_is_not_ours_or_does_not_fit_the_sae_is_refused(tmp_path):
    f = tmp_path / "features.json"
    for data, msg in (
        ([{"id": 0, "logit_lens": {}}], "not a features.json written by"),
        ({"d_sae": 5, "features": []}, "not a features.json"),
        ({"format": "sae_lens_lite.features", "version": 1}, "lacks"),
    ):
        f.write_text(json.dumps(data))
        with pytest.raises(UserError, match=msg):
            read_analysis(tmp_path, D_SAE)
    with pytest.raises(UserError, match="sae-lite analyze"):
        read_analysis(tmp_path / "nowhere", D_SAE)


def test_the_features_format_name_is_the_one_on_disk_not_the_module_path():
    """features.json files name their format "sae_lens_lite.features" since the first release; the
    module moving to interpret/ must not make every earlier analysis unreadable."""
    from sae_lens_lite.interpret.features import FORMAT

    assert FORMAT == "sae_lens_lite.features"
