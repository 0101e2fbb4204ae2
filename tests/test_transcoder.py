"""Transcoders: pair harvest, training (every recipe, with and without the skip path), ground
truth, the spliced evaluation and the exports."""

import pytest
import torch
from conftest import FAMILIES, harvest_config, tiny_model

from sae_lens_lite.data.cache import ActivationCache
from sae_lens_lite.data.corpus import load_texts, tokenize_corpus
from sae_lens_lite.data.harvest import harvest
from sae_lens_lite.data.models import blocks, edit_hook, run_to_hooks
from sae_lens_lite.errors import UserError
from sae_lens_lite.training import recipes
from sae_lens_lite.training.sae import SAE, SAEConfig, Transcoder
from sae_lens_lite.training.synthetic import make_transcoder_pairs, mcc
from sae_lens_lite.training.train import TrainConfig, train, train_on_batches

MLP_IN, MLP_OUT = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"


def harvest_cfg(corpus, out, **kw):
    return harvest_config(corpus, out, **{"mlp_pairs": "1", **kw})


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


# ---- the module --------------------------------------------------------------------------


def random_transcoder(skip: bool, activation: str = "relu", k: int | None = None) -> Transcoder:
    torch.manual_seed(0)
    tc = SAE.build(SAEConfig(d_in=8, d_sae=24, d_out=6, skip=skip, activation=activation, k=k))
    with torch.no_grad():
        for p in tc.parameters():
            p.normal_()
        tc.input_scale.fill_(1.7)
        tc.output_scale.fill_(0.4)
    return tc


@pytest.mark.parametrize("skip", [False, True])
def test_forward_is_the_formula_and_folding_keeps_it(skip, tmp_path):
    tc = random_transcoder(skip)
    x = torch.randn(10, 8)
    f = torch.relu(x * 1.7 @ tc.W_enc + tc.b_enc)  # no centring: b_dec is in the output space
    y = f @ tc.W_dec + tc.b_dec + ((x * 1.7) @ tc.W_skip if skip else 0)
    out = tc(x)
    torch.testing.assert_close(out.x_hat, y / 0.4)
    torch.testing.assert_close(out.latents, f)
    folded = tc.folded()
    assert float(folded.input_scale) == float(folded.output_scale) == 1.0
    torch.testing.assert_close(folded(x).x_hat, out.x_hat, rtol=1e-4, atol=1e-4)
    loaded = SAE.load(tc.save(tmp_path / "tc"))
    assert isinstance(loaded, Transcoder) and loaded.cfg == tc.cfg
    torch.testing.assert_close(loaded(x).x_hat, out.x_hat)


def test_a_skip_path_needs_a_transcoder():
    with pytest.raises(UserError, match="transcoder"):
        SAEConfig(d_in=8, d_sae=16, skip=True)
    with pytest.raises(UserError, match="--transcoder"):
        TrainConfig(skip=True)
    with pytest.raises(UserError, match="resample"):
        TrainConfig(transcoder=True, resample_dead=True)


# ---- training: ground truth, every recipe, resume ----------------------------------------------

RECIPE_SETTINGS = {
    "l1": dict(l1=1.0),
    "kl": dict(kl_rho=0.05),
    "topk": dict(k=4),
    "batchtopk": dict(k=4),
    "jumprelu": dict(target_l0=4.0),
    "matryoshka": dict(k=4),
}
D_IN, D_OUT = 32, 24


def transcoder_cfg(penalty: str, d_sae: int = 256, skip: bool = False, k: int = 4) -> SAEConfig:
    opts = recipes.get(penalty, TrainConfig(penalty=penalty, k=k)).sae_options()
    return SAEConfig(d_in=D_IN, d_sae=d_sae, d_out=D_OUT, skip=skip, **opts)


def pairs_data(linear: float = 0.0):
    return make_transcoder_pairs(n_features=64, d_in=D_IN, d_out=D_OUT, linear=linear, seed=0)


def train_pairs(data, penalty="topk", skip=False, tokens=200_000, **kw):
    settings = {**RECIPE_SETTINGS[penalty], **kw}
    cfg = TrainConfig(penalty=penalty, batch_size=512, lr=3e-3, seed=0, transcoder=True, skip=skip, **settings)
    return train_on_batches(
        transcoder_cfg(penalty, skip=skip), cfg, data.batches(512, 1 << 17, seed=1), tokens, progress=False
    )


@pytest.mark.parametrize("penalty", ["topk", "l1"])
@pytest.mark.parametrize("skip", [False, True])
def test_transcoder_recovers_known_latents(skip, penalty):
    """y = s D (+ x A with the skip path), x = s E, s sparse. Without a linear part the decoder
    rows are D. With one, the split between skip and latents is not unique (synthetic.
    TranscoderPairs): given the learned skip map A', the latents' rows are D + E (A − A')."""
    data = pairs_data(linear=0.5 if skip else 0.0)
    tc = train_pairs(data, penalty, skip=skip).folded()
    assert isinstance(tc, Transcoder) and tc.W_dec.shape == (256, D_OUT)
    truth = data.features_out
    if skip:
        A = tc.W_skip.detach()
        assert A.norm() > 0.3 * data.linear.norm()  # the skip path carries a real share of y
        truth = truth + data.latents.features @ (data.linear - A)
    score = mcc(tc.W_dec, truth)
    assert score >= 0.95, score


@pytest.mark.parametrize("penalty", list(RECIPE_SETTINGS))
def test_every_recipe_trains_a_skip_transcoder(penalty, tmp_path):
    data = pairs_data(linear=0.5)
    tc = train_pairs(data, penalty, skip=True, tokens=60_000)
    x, y = tc.split(data.sample(4096, torch.Generator().manual_seed(3)))
    with torch.no_grad():
        out = tc(x)
    ev = 1 - float((y - out.x_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
    assert ev > 0.5, ev  # the mean alone explains 0
    assert float((out.latents > 0).float().sum(-1).mean()) < 100  # sparse: of 256 latents
    loaded = SAE.load(tc.save(tmp_path / penalty))
    torch.testing.assert_close(loaded(x).x_hat, out.x_hat)


class Interrupted(Exception):
    pass


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    data = pairs_data(linear=0.5)
    factory = data.batches(256, 16 * 256, seed=1)
    cfg = TrainConfig(
        penalty="topk", k=3, batch_size=256, checkpoint_every=10 * 256, precision="float32", transcoder=True, skip=True
    )
    sae_cfg = transcoder_cfg("topk", d_sae=64, skip=True, k=3)
    ref = train_on_batches(sae_cfg, cfg, factory, 40 * 256, out=tmp_path / "a", progress=False)
    count = [0]

    def killed(epoch):  # the same batches, killed after 16 (init) + 25 steps
        for x in factory(epoch):
            if count[0] == 16 + 25:
                raise Interrupted
            count[0] += 1
            yield x

    with pytest.raises(Interrupted):
        train_on_batches(sae_cfg, cfg, killed, 40 * 256, out=tmp_path / "b", progress=False)
    resumed = train_on_batches(sae_cfg, cfg, factory, 40 * 256, out=tmp_path / "b", progress=False)
    assert isinstance(resumed, Transcoder)
    for k, v in ref.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k


def test_train_from_a_pair_cache(tiny_lm, corpus_file, tmp_path):
    acts = harvest(harvest_cfg(corpus_file, tmp_path / "pairs"), lm=tiny_lm)[MLP_IN]
    run = dict(acts=str(acts), penalty="topk", k=4, expansion=4, batch_size=128, tokens=128 * 20, log_every=5)
    tc = train(TrainConfig(out=str(tmp_path / "tc"), transcoder=True, skip=True, **run))
    assert isinstance(tc, Transcoder) and tc.cfg.hook == MLP_IN and tc.cfg.target_hook == MLP_OUT
    loaded = SAE.load(tmp_path / "tc")
    assert isinstance(loaded, Transcoder) and loaded.cfg.skip and loaded.W_skip.shape == (32, 32)
    ev = loaded.cfg.meta["final_eval"]["explained_variance"]  # of the MLP's output, from its input
    assert ev is not None and -1.0 < ev < 1.0
    sae = train(TrainConfig(out=str(tmp_path / "sae"), **run))  # the same cache trains an SAE on the input
    assert type(sae) is SAE and sae.cfg.d_out is None
    plain = harvest(harvest_cfg(corpus_file, tmp_path / "plain", mlp_pairs="", hooks=[MLP_OUT]), lm=tiny_lm)
    with pytest.raises(UserError, match="--mlp-pairs"):
        train(TrainConfig(out=str(tmp_path / "bad"), transcoder=True, **{**run, "acts": str(plain[MLP_OUT])}))


# ---- evaluation with the MLP replaced -------------------------------------------------------------


def model_ce(model, ids, mlp_out=None) -> float:
    """Mean next-token CE of model on ids, with layer 1's MLP output replaced by mlp_out(input)."""
    handle = None
    if mlp_out is not None:
        handle = blocks(model)[1].mlp.register_forward_hook(lambda mod, args, out: mlp_out(args[0]))
    try:
        with torch.no_grad():
            logp = model(input_ids=ids).logits[:, :-1].float().log_softmax(-1)
    finally:
        if handle is not None:
            handle.remove()
    return float(-logp.gather(-1, ids[:, 1:, None]).mean())


def test_evaluate_splices_the_transcoder_in_place_of_the_mlp(tiny_lm, corpus_file, tmp_path):
    from sae_lens_lite.evaluation.evaluate import EvalConfig, eval_contexts, evaluate

    tc = SAE.build(
        SAEConfig(d_in=32, d_sae=64, d_out=32, skip=True, hook=MLP_IN, target_hook=MLP_OUT, context_length=16)
    )
    with torch.no_grad():
        tc.W_skip.normal_(0, 0.1)
        tc.b_dec.normal_(0, 0.1)
    tc.save(tmp_path / "tc")
    cfg = EvalConfig(
        sae=str(tmp_path / "tc"), dataset=str(corpus_file), tokens=128, batch_size=3, drop_first=0, drop_special=False
    )
    r = evaluate(cfg, lm=tiny_lm)
    ids = eval_contexts(tiny_lm.tokenizer, str(corpus_file), 16, 128, 0)  # every position is spliced
    ce = r["ce"]
    assert ce["clean"] == pytest.approx(model_ce(tiny_lm.model, ids), rel=1e-5)
    assert ce["sae"] == pytest.approx(
        model_ce(tiny_lm.model, ids, lambda x: tc(x.reshape(-1, 32)).x_hat.reshape(x.shape)), rel=1e-5
    )
    assert ce["zero_ablation"] == pytest.approx(model_ce(tiny_lm.model, ids, torch.zeros_like), rel=1e-5)
    acts = run_to_hooks(tiny_lm.model, ids, [MLP_IN, MLP_OUT])
    x, y = acts[MLP_IN].reshape(-1, 32), acts[MLP_OUT].reshape(-1, 32)
    with torch.no_grad():
        ev = 1 - float((y - tc(x).x_hat).double().pow(2).sum() / (y - y.mean(0)).double().pow(2).sum())
    assert r["reconstruction"]["explained_variance"] == pytest.approx(ev, rel=1e-4)
    assert r["target_hook"] == MLP_OUT and r["footing"]["hook"] == MLP_OUT
    rows = {row["method"]: row for row in r["baselines"]["rows"]}
    assert rows["sae"]["ce_loss"] > r["baselines"]["ce_clean"] and {"pca_32", "vae_32"} <= set(rows)


# ---- export -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("activation", "skip"), [("relu", False), ("relu", True), ("jumprelu", True)])
def test_saelens_loads_the_exported_transcoder_and_computes_the_same(activation, skip, tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    from sae_lens_lite.export import save_saelens

    tc = random_transcoder(skip, activation)
    tc.cfg.hook, tc.cfg.target_hook = MLP_IN, MLP_OUT
    if activation == "jumprelu":
        with torch.no_grad():
            tc.threshold.uniform_(0.0, 1.0)
    theirs = sae_lens.SAE.load_from_disk(str(save_saelens(tc, tmp_path / "sl")), device="cpu")
    want = {
        ("relu", False): "Transcoder",
        ("relu", True): "SkipTranscoder",
        ("jumprelu", True): "JumpReLUSkipTranscoder",
    }
    assert type(theirs).__name__ == want[(activation, skip)]
    assert theirs.cfg.metadata.hook_name == MLP_IN and theirs.cfg.metadata.hook_name_out == MLP_OUT
    x = torch.randn(20, 8) * 3
    ours = tc(x)
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), ours.latents, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs(x), ours.x_hat, rtol=1e-5, atol=1e-5)


def test_saelens_has_no_topk_transcoder(tmp_path):
    from sae_lens_lite.export import save_saelens

    with pytest.raises(UserError, match="no topk transcoder"):
        save_saelens(random_transcoder(False, "topk", k=3), tmp_path / "sl")


def test_circuit_tracer_set_holds_every_layer_in_its_orientation(tmp_path):
    """The files computed by circuit-tracer's formulas (SingleLayerTranscoder.encode/decode:
    F.linear(x, W_enc, b_enc), acts @ W_dec + b_dec + x @ W_skip.T) give our outputs."""
    yaml = pytest.importorskip("yaml")
    from safetensors.torch import load_file

    from sae_lens_lite.export import ExportConfig, export

    ours = {}
    for layer in range(3):
        tc = random_transcoder(True, "jumprelu")
        with torch.no_grad():
            tc.threshold.uniform_(0.0, 1.0)
        tc.cfg.hook, tc.cfg.target_hook = f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_mlp_out"
        tc.cfg.model = "smollm2-135m"
        ours[layer] = tc
        tc.save(tmp_path / "set" / f"L{layer}")
    out = export(ExportConfig(sae=str(tmp_path / "set"), format="circuit-tracer", out=str(tmp_path / "ct")))
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["model_kind"] == "transcoder_set" and config["model_name"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (config["feature_input_hook"], config["feature_output_hook"]) == ("mlp.hook_in", "mlp.hook_out")
    x = torch.randn(12, 8) * 3
    for layer, path in enumerate(config["transcoders"]):
        w = load_file(path)
        pre = torch.nn.functional.linear(x, w["W_enc"], w["b_enc"])
        acts = pre * (pre > w["activation_function.threshold"])
        y = acts @ w["W_dec"] + w["b_dec"] + x @ w["W_skip"].T
        with torch.no_grad():
            torch.testing.assert_close(acts, ours[layer](x).latents, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(y, ours[layer](x).x_hat, rtol=1e-5, atol=1e-5)
    (tmp_path / "set" / "L1" / "config.json").unlink()
    with pytest.raises(UserError, match=r"lacks layers \[1\]"):
        export(ExportConfig(sae=str(tmp_path / "set"), format="circuit-tracer", out=str(tmp_path / "ct2")))


# ---- steering and attribution ---------------------------------------------------------------------


def layer1_transcoder() -> Transcoder:
    tc = SAE.build(SAEConfig(d_in=32, d_sae=48, d_out=32, skip=True, hook=MLP_IN, target_hook=MLP_OUT))
    torch.manual_seed(1)
    with torch.no_grad():
        tc.W_enc.normal_(0, 0.5)
        tc.W_dec.normal_(0, 0.2)
        tc.W_skip.normal_(0, 0.1)
        tc.output_scale.fill_(2.0)
    return tc.requires_grad_(False)


def test_attribution_adds_up_to_the_mlp_output_times_its_gradient(tiny_lm):
    from sae_lens_lite.interpret.intervene import attribution

    tc = layer1_transcoder()
    ids = torch.randint(2, 96, (1, 9))
    r = attribution(tiny_lm, tc, ids)
    saved = {}

    def keep_grad(mod, args, out):
        out.retain_grad()
        saved["y"] = out

    handle = blocks(tiny_lm.model)[1].mlp.register_forward_hook(keep_grad)
    try:
        with torch.enable_grad():
            logp = tiny_lm.model(input_ids=ids).logits[0, -1].float().log_softmax(-1)
            logp[r.target].backward()
    finally:
        handle.remove()
    y = saved["y"]
    want = (y * y.grad).sum(-1)[0].detach()  # [T]: the MLP output · ∂log p/∂(MLP output)
    torch.testing.assert_close(r.total, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(r.latents.sum(1) + r.error + r.bias, r.total, rtol=1e-4, atol=1e-5)
    assert r.latents.abs().sum() > 0


def test_ablating_a_transcoder_latent_removes_its_share_of_the_mlp_output(tiny_lm):
    from sae_lens_lite.interpret.intervene import ablation_effects

    tc = layer1_transcoder()
    ids = torch.randint(2, 96, (1, 9))
    acts = run_to_hooks(tiny_lm.model, ids, [MLP_IN])[MLP_IN][0]  # [T, d]
    with torch.no_grad():
        f = tc.encode(acts)
    j = int(f.sum(0).argmax())
    target = 5
    got = ablation_effects(tiny_lm, tc, ids, target, [j])
    share = f[:, j : j + 1] * tc.W_dec[j] / 2.0  # [T, d]: latent j's part of the prediction, in output units
    handle = blocks(tiny_lm.model)[1].mlp.register_forward_hook(lambda mod, args, out: out - share[None])
    try:
        with torch.no_grad():
            ablated = tiny_lm.model(input_ids=ids).logits[0, -1].float().log_softmax(-1)[target]
    finally:
        handle.remove()
    with torch.no_grad():
        plain = tiny_lm.model(input_ids=ids).logits[0, -1].float().log_softmax(-1)[target]
    torch.testing.assert_close(got[0], (plain - ablated).float(), rtol=1e-4, atol=1e-5)
    assert abs(float(got[0])) > 0


def test_measure_saved_scores_the_target_over_every_sampled_row(tmp_path):
    from sae_lens_lite.data.cache import CacheWriter
    from sae_lens_lite.training.train import measure_saved

    g = torch.Generator().manual_seed(0)
    w = CacheWriter(tmp_path / "big", {"hook": MLP_IN, "target_hook": MLP_OUT, "dtype": "float32"}, 32, d_target=32)
    for _ in range(2):  # 2 x 5,000 rows: more than one of measure_saved's batches of 4,096
        n = 5000
        x = torch.randn(n, 32, generator=g)
        ids = torch.zeros(n, dtype=torch.int32)
        w.add_shard(
            x, ids, ids.clone(), ids.clone(), n_contexts=1, targets=torch.tanh(x) @ torch.randn(32, 32, generator=g)
        )
    w.finish()
    cache = ActivationCache.open(tmp_path / "big")
    tc = SAE.build(SAEConfig(d_in=32, d_sae=64, d_out=32, activation="topk", k=4))
    with torch.no_grad():
        tc.b_enc.fill_(1.0)  # every pre-activation of the top 4 positive: L0 exactly 4
    m = measure_saved(tc, cache, torch.device("cpu"), n_tokens=cache.n_tokens)
    data = cache.load(("activations", "targets"))
    x, y = data["activations"].float(), data["targets"].float()
    with torch.no_grad():
        ev = 1 - float((y - tc(x).x_hat).double().pow(2).sum() / (y - y.mean(0)).double().pow(2).sum())
    assert m["n_tokens"] == cache.n_tokens and m["l0"] == pytest.approx(4.0)
    assert m["explained_variance"] == pytest.approx(ev, rel=1e-4)
