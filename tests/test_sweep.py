"""The steering sweep on a tiny model: strength 0 is the clean text, the scores are what they say,
and the best strength lands in features.json, the table, the plots and the page."""

import csv
import json

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer
from test_analyze import run, synthetic
from test_browser import browser  # noqa: F401  (the Chromium fixture)

from sae_lens_lite.cli import main
from sae_lens_lite.data.models import LoadedModel, generate, run_to_hooks
from sae_lens_lite.errors import UserError
from sae_lens_lite.evaluation.metrics import next_token_logprobs
from sae_lens_lite.interpret.intervene import positions
from sae_lens_lite.interpret.sweep import SweepConfig, best_index, score, sweep
from sae_lens_lite.training.sae import SAE

PROMPTS = ["The quick brown", "Sparse autoencoders"]


@pytest.fixture
def analysed(tmp_path):
    synthetic(tmp_path)
    run(tmp_path)
    lm = LoadedModel(tiny_model("llama"), tiny_tokenizer(), "tiny-llama", "memory", "0" * 16)
    return lm, SAE.load(tmp_path / "sae").eval().requires_grad_(False)


def test_best_strength_is_the_peak_before_fluency_drops():
    act, drop = [0.0, 1.0, 3.0, 2.0, 5.0], [0.0, 0.1, 0.5, 2.0, 3.0]
    assert best_index(act, drop, 1.0) == 2  # 5.0 comes after the cost passed 1.0
    assert best_index(act, drop, 5.0) == 4
    assert best_index(act, [0.0, 2.0, 0.0, 0.0, 0.0], 1.0) == 0  # past the cost at once: the clean text


def test_sweep_starts_from_the_clean_text_and_records_the_best(tmp_path, analysed):
    lm, sae = analysed
    cfg = SweepConfig(
        sae=str(tmp_path / "sae"),
        analysis=str(tmp_path / "out"),
        top=2,
        times=[0.0, 1.0, 4.0],
        prompts=PROMPTS,
        new_tokens=6,
    )
    res = sweep(cfg, lm=lm, sae=sae)
    curves = res["curves"]
    assert len(curves) == 2
    ids = lm.tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    clean = generate(lm, ids, 6, sample=True, seed=0)
    for c in curves:
        assert c.texts[0] == clean.text  # strength 0: the clean text, token for token
        assert c.drop[0] == 0.0 and 0 <= c.best < 3
    assert any(c.texts[-1] != clean.text for c in curves), "a strength of 4x max activation should change the text"
    # fluency at 0 is the clean model's mean log p of the clean texts, averaged over the prompts
    want = []
    for p in PROMPTS:
        ids = lm.tokenizer(p, return_tensors="pt")["input_ids"]
        g = generate(lm, ids, 6, sample=True, seed=0)
        full = torch.cat([ids, torch.tensor([g.token_ids])], 1)
        lp = next_token_logprobs(lm.model, full)[0, ids.shape[1] - 1 :].gather(1, torch.tensor(g.token_ids)[:, None])
        want.append(float(lp.mean()))
    assert curves[0].fluency[0] == pytest.approx(sum(want) / 2, abs=1e-3)
    # outputs: the table has every strength, the plots exist, features.json and the page carry the best
    out = tmp_path / "out" / "sweep"
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert len(rows) == 6 and sum(int(r["best"]) for r in rows) == 2
    assert all((out / f"feature_{c.feature}.png").stat().st_size > 1000 for c in curves)
    feats = json.loads((tmp_path / "out" / "features.json").read_text())
    for c in curves:
        s = feats["features"][c.feature]["sweep"]
        assert s["best_times"] == c.times[c.best] and s["activation"] == c.activation
    assert feats["sweep"]["times"] == [0.0, 1.0, 4.0]
    page = (tmp_path / "out" / "index.html").read_text()
    assert '"best_strength":' in page and '"max_drop":1.0' in page


def test_scores_read_the_text_with_the_clean_model(analysed):
    """The activation score is the SAE's re-encoding of the clean model's activation on the
    generated tokens, averaged over the positions the SAE reads."""
    lm, sae = analysed
    prompt = lm.tokenizer("The quick brown", return_tensors="pt")["input_ids"]
    gen = [[5, 9, 11], [7, 7]]
    act, lens_lp, flu = score(lm, sae, prompt, gen, [0, 3], torch.tensor([[4, 5], [6, 7]]))
    for r, g in enumerate(gen):
        full = torch.cat([prompt, torch.tensor([g])], 1)
        x = run_to_hooks(lm.model, full, [sae.cfg.hook])[sae.cfg.hook][0]
        read = positions(lm, sae, full)[0]
        read[: prompt.shape[1]] = False
        f = sae.encode(x[read])[:, [0, 3]].mean(0)
        torch.testing.assert_close(torch.from_numpy(act[r]), f, atol=1e-5, rtol=1e-4)
        lp = next_token_logprobs(lm.model, full)[0, prompt.shape[1] - 1 :]
        assert flu[r] == pytest.approx(float(lp.gather(1, torch.tensor(g)[:, None]).mean()), abs=1e-4)
        assert lens_lp[r, 1] == pytest.approx(float(lp[:, [6, 7]].logsumexp(-1).mean()), abs=1e-4)


def test_sweep_refuses_bad_settings(tmp_path, analysed):
    lm, sae = analysed
    base = dict(sae=str(tmp_path / "sae"), analysis=str(tmp_path / "out"))
    for bad in (dict(times=[1.0, 2.0]), dict(times=[0.0, 2.0, 1.0]), dict(new_tokens=0), dict(prompts=[" "])):
        with pytest.raises(UserError):
            sweep(SweepConfig(**base, **bad), lm=lm, sae=sae)
    with pytest.raises(UserError, match="out of range"):
        sweep(SweepConfig(**base, feature=[99]), lm=lm, sae=sae)
    assert main(["sweep", "--analysis", str(tmp_path / "nowhere")]) == 2


def test_sweep_refuses_the_analysis_of_another_sae_of_the_same_width(tmp_path, analysed):
    """The sweep writes its best strengths into the analysis: the analysis of another SAE of the
    same width must be refused, its features.json left as it was."""
    lm, sae = analysed
    other = SAE(sae.cfg)  # same width, other weights
    other.save(tmp_path / "sae2")
    before = (tmp_path / "out" / "features.json").read_bytes()
    cfg = SweepConfig(sae=str(tmp_path / "sae2"), analysis=str(tmp_path / "out"), top=1, prompts=["The"], new_tokens=2)
    with pytest.raises(UserError, match="is the analysis of another SAE"):
        sweep(cfg, lm=lm)
    assert (tmp_path / "out" / "features.json").read_bytes() == before


def test_an_analysis_of_another_width_says_what_to_pass(tmp_path, analysed):
    """An analysis without a record of its SAE (copied, say) and an SAE of another width: one line
    that names both widths and the analysis to pass."""
    from dataclasses import replace

    lm, sae = analysed
    (tmp_path / "out" / "provenance.json").unlink()
    wide = SAE(replace(sae.cfg, d_sae=2 * sae.d_sae))
    wide.save(tmp_path / "wide")
    cfg = SweepConfig(sae=str(tmp_path / "wide"), analysis=str(tmp_path / "out"), top=1, prompts=["The"], new_tokens=2)
    with pytest.raises(UserError, match=rf"with {sae.d_sae} features, .*wide has {2 * sae.d_sae}; pass --analysis of"):
        sweep(cfg, lm=lm)


def test_the_card_shows_the_sweep_in_chromium(tmp_path, browser):  # noqa: F811
    """A swept feature's card shows its best strength and its curve as a table, the best row marked."""
    from selenium.webdriver.common.by import By
    from test_browser import synthetic_analysis, wait

    from sae_lens_lite.interpret.browser import write_page

    a = synthetic_analysis(20)
    a["sweep"] = {"times": [0.0, 1.0, 4.0], "prompts": ["The"], "new_tokens": 4, "max_drop": 1.0}
    a["sweep"].update(seed=0, temperature=1.0)
    best = min(a["features"], key=lambda f: f["rank"])
    best["sweep"] = {
        "best_times": 1.0,
        "best_strength": 2.5,
        "times": [0.0, 1.0, 4.0],
        "activation": [0.0, 0.8, 2.0],
        "lens_logp": [-9.0, -8.0, -7.0],
        "fluency_cost": [0.0, 0.4, 3.1],
        "text": " steered words",
    }
    browser.get(write_page(a, tmp_path / "index.html").as_uri() + f"#f{best['id']}")  # opens its card
    wait(browser, lambda: browser.execute_script("return document.body.dataset.ready") == "1")
    card = browser.find_element(By.ID, "card")
    wait(browser, lambda: card.get_attribute("data-feature") == str(best["id"]))
    assert "Steering sweep: best strength 2.50 (1 \u00d7 max activation)" in card.text
    assert "at the best strength: The steered words" in card.text
    cells = [r.text for r in card.find_elements(By.CSS_SELECTOR, "table.sweep tr")]
    assert len(cells) == 4 and cells[2].split() == ["1.00", "0.80", "-8.00", "0.40"]
    assert len(card.find_elements(By.CSS_SELECTOR, "table.sweep tr.best")) == 1
