import io
import json
import random
import re
import shutil
import time
from pathlib import Path

import pytest

from sae_lens_lite.interpret.browser import page_data, render, write_page

XSS = ["<script>window.__xss=1</script>", "<img src=x onerror=window.__xss=2>", "</script><b>x"]
CHROMIUM, DRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


def synthetic_analysis(n_features=300, k=8, before=16, after=4, vocab_size=2000, seed=0):
    """An analysis dict shaped like features.json; feature 3's top token and explanation are XSS
    attempts (ids below 100 are never drawn at random); features 7, 57, 107, ... share the
    explanation "shared", a family; feature 0 fires on 0.2 % of tokens."""
    rnd = random.Random(seed)
    vocab = {str(i): f" tok{i}" for i in range(vocab_size)}
    for i, s in enumerate(XSS):
        vocab[str(i)] = s
    vocab["10"] = "line\nbreak"
    feats, pool = [], range(100, vocab_size)
    for j in range(n_features):
        mx = round(rnd.uniform(1, 10), 4)
        center = 0 if j == 3 else rnd.randrange(100, vocab_size)
        examples = []
        for e in range(k):
            toks = rnd.choices(pool, k=before + 1 + after)
            toks[before] = center if e < k // 2 else toks[before]
            if j == 3:
                toks[before - 2 : before] = [10, 1]  # a newline token and more markup around the centre
                toks[before + 1] = 2
            acts = [0.0] * len(toks)
            acts[before] = round(mx * (1 - e / (2 * k)), 4)
            acts[before - 1] = round(acts[before] / 3, 4)
            examples.append(
                {
                    "row": j * k + e,
                    "doc": e,
                    "pos": 40,
                    "act": acts[before],
                    "center": before,
                    "tokens": toks,
                    "acts": acts,
                }
            )
        quantiles = [
            [dict(examples[e], act=round(examples[e]["act"] * (1 - q / 4), 4)) for e in (0, 1)] for q in range(4)
        ]
        f1 = round(rnd.random(), 4)
        feats.append(
            {
                "id": j,
                "rank": 0,
                "score": f1,
                "token_score": 0.5,
                "context_score": 0.1,
                "lens_score": 0.0,
                "monosemanticity": 0.5,
                "explanation": XSS[1] if j == 3 else '"shared"' if j % 50 == 7 else f'"tok{center}"',
                "detection": {
                    "precision": 0.9,
                    "recall": 0.8,
                    "f1": f1,
                    "score": f1,
                    "fires": 40,
                    "predicted": 36,
                    "hits": 32,
                },
                "quantiles": quantiles,
                "nearest": [[(j + 1) % n_features, 0.91], [(j + 2) % n_features, 0.5]],
                "model_explanation": {
                    "explanation": "closing brackets",
                    "balanced_accuracy": 0.75,
                    "auroc": 0.8,
                    "n_scored": 24,
                }
                if j == 5
                else None,
                "frequency": 0.002 if j == 0 else rnd.random() * 0.01,
                "mean_act": mx / 2,
                "max_act": mx,
                "hist": {
                    "bin_width": 2.0 ** (int(mx).bit_length() - 6),
                    "counts": [rnd.randrange(50) for _ in range(40)],
                },
                "top_tokens": [[center, 0.5], [examples[-1]["tokens"][before], 0.1]],
                "lens": {
                    "promoted": [[rnd.randrange(100, vocab_size), 1.5] for _ in range(10)],
                    "suppressed": [[rnd.randrange(100, vocab_size), -1.5] for _ in range(10)],
                },
                "examples": examples,
            }
        )
    ranked = sorted(feats, key=lambda f: -f["score"])
    for r, f in enumerate(ranked, 1):
        f["rank"] = r
        if not f["model_explanation"]:
            del f["model_explanation"]
    fams: dict[str, list[int]] = {}
    for f in ranked:
        fams.setdefault(f["explanation"], []).append(f["id"])
    families = [{"id": i, "explanation": e, "members": m} for i, (e, m) in enumerate(fams.items())]
    for fam in families:
        for i in fam["members"]:
            feats[i]["family"] = fam["id"]
    return {
        "model": "synthetic",
        "hook": "blocks.0.hook_resid_post",
        "sae": "none",
        "n_tokens": 10**6,
        "d_sae": n_features,
        "top_k": k,
        "ctx_before": before,
        "ctx_after": after,
        "heldout": {"share": 0.25, "tokens": 250000},
        "vocab": vocab,
        "features": feats,
        "families": families,
    }


def embedded(html: str):
    m = re.search(r'<script type="application/json" id="data">(.*?)</script>', html, re.S)
    return json.loads(m.group(1))


def test_page_is_self_contained_and_tokens_cannot_break_out():
    a = synthetic_analysis(50)
    html = render(page_data(a))
    assert html.lower().count("</script") == 2  # the data block's and the app's own closing tags
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)  # nothing fetched: no CDN
    assert "default-src 'none'" in html
    data = embedded(html)
    assert data == json.loads(json.dumps(page_data(a)))
    assert set(XSS) <= set(data["vocab"].values())
    f = data["features"][0]
    assert f[0] == min(a["features"], key=lambda f: f["rank"])["id"]  # best-ranked first
    assert max(max(ex[3]) for ex in f[12]) == 99


def test_page_data_keeps_the_best_ranked_and_quantises():
    a = synthetic_analysis(40)
    d = page_data(a, max_features=5)
    assert [f[1] for f in d["features"]] == [1, 2, 3, 4, 5]
    src = {f["id"]: f for f in a["features"]}
    for f in d["features"]:
        ex, ref = f[12][0], src[f[0]]["examples"][0]
        assert [d["vocab"][str(v)] for v in ex[2]] == [a["vocab"][str(t)] for t in ref["tokens"]]
        assert ex[3] == [min(99, round(99 * x / src[f[0]]["max_act"])) for x in ref["acts"]]
    used = {str(t) for f in d["features"] for ex in f[12] for t in ex[2]}
    assert used <= set(d["vocab"]) and len(d["vocab"]) < len(a["vocab"])  # only the tokens it shows


def test_write_page_is_atomic(tmp_path):
    p = write_page(synthetic_analysis(5), tmp_path / "index.html")
    assert p.read_text().startswith("<!doctype html>") and not list(tmp_path.glob("*.tmp"))


# ---- in a real browser -----------------------------------------------------------------------------


@pytest.fixture
def browser(tmp_path, monkeypatch):
    if not (CHROMIUM.exists() and DRIVER.exists()):
        pytest.skip("needs Debian packages chromium and chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must not try the network
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1280,900",
    ):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(DRIVER)), options=opts)
    driver.set_page_load_timeout(120)
    yield driver
    driver.quit()
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)


def wait(driver, cond, timeout=30.0):
    from selenium.common.exceptions import StaleElementReferenceException

    end = time.time() + timeout
    while time.time() < end:
        try:
            if cond():
                return
        except StaleElementReferenceException:
            pass  # the list re-rendered between finding a row and reading it: look again
        time.sleep(0.05)
    raise AssertionError("timed out waiting for the page")


def rows(driver):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, "#list .row")


def test_search_open_and_screenshot_in_chromium(browser, tmp_path):
    from matplotlib.image import imread
    from selenium.webdriver.common.by import By

    a = synthetic_analysis(300)
    page = write_page(a, tmp_path / "index.html")
    browser.get(page.as_uri())
    wait(browser, lambda: browser.execute_script("return document.body.dataset.ready") == "1")
    assert len(rows(browser)) == 100  # lazy: 300 features, the first 100 rendered
    assert browser.find_element(By.ID, "more").is_displayed()

    browser.find_element(By.ID, "search").send_keys("<script>")
    wait(browser, lambda: len(rows(browser)) == 1)
    assert rows(browser)[0].find_element(By.CLASS_NAME, "fid").text == "#3"
    rows(browser)[0].click()
    card = browser.find_element(By.ID, "card")
    wait(browser, lambda: card.get_attribute("data-feature") == "3")
    assert card.find_element(By.TAG_NAME, "h2").text.startswith("Feature #3")
    assert XSS[0] in card.text  # shown as text ...
    assert browser.execute_script("return window.__xss") is None  # ... and never run
    assert not card.find_elements(By.CSS_SELECTOR, "script, img, b")
    spans = card.find_elements(By.CSS_SELECTOR, ".ctx .tok.center")
    assert len(spans) == 8 + 8 and all(
        "rgba" in s.get_attribute("style") for s in spans
    )  # top and quantile examples, shaded
    assert len(card.find_elements(By.CSS_SELECTOR, "svg.hist rect")) == sum(
        c > 0 for c in a["features"][3]["hist"]["counts"]
    )
    assert len(card.find_elements(By.CSS_SELECTOR, ".lens tr")) == 20
    png = browser.get_screenshot_as_png()
    (tmp_path / "card.png").write_bytes(png)
    img = imread(io.BytesIO(png))
    assert img.shape[0] > 100 and img.shape[1] > 100 and img.std() > 0.01  # not blank

    search = browser.find_element(By.ID, "search")
    search.clear()
    search.send_keys("#17")
    wait(browser, lambda: len(rows(browser)) == 1 and "#17" in rows(browser)[0].text)
    search.clear()
    search.send_keys(" ")  # clear() sends no input event; a blank query shows everything
    wait(browser, lambda: len(rows(browser)) == 100)
    browser.find_element(By.ID, "group").click()  # one row per feature, then sort by a column
    browser.find_element(By.CSS_SELECTOR, '#head .col[data-key="frequency"]').click()
    top = max(a["features"], key=lambda f: f["frequency"])["id"]
    wait(browser, lambda: rows(browser)[0].find_element(By.CLASS_NAME, "fid").text == f"#{top}")
    browser.find_element(By.CSS_SELECTOR, '#head .col[data-key="frequency"]').click()  # again: ascending
    low = min(a["features"], key=lambda f: f["frequency"])["id"]
    wait(browser, lambda: rows(browser)[0].find_element(By.CLASS_NAME, "fid").text == f"#{low}")


def test_explanations_families_quantiles_and_nearest_in_chromium(browser, tmp_path):
    from selenium.webdriver.common.by import By

    a = synthetic_analysis(300)
    src = {f["id"]: f for f in a["features"]}
    browser.get(write_page(a, tmp_path / "index.html").as_uri())
    wait(browser, lambda: browser.execute_script("return document.body.dataset.ready") == "1")
    head = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#head .col")]
    assert head == ["feature", "explanation", "score", "F1", "precision", "recall", "frequency", "max act", "family"]
    assert f"{len(a['families'])} families, 300 of 300 features" in browser.find_element(By.ID, "count").text
    # Rows are families, best first; the family of 6 "shared" features is one row that opens.
    fids = [r.find_element(By.CLASS_NAME, "fid").text for r in rows(browser)]
    assert fids[0] == "#" + str(min(a["features"], key=lambda f: f["rank"])["id"])
    shared = next(f for f in a["families"] if f["explanation"] == '"shared"')
    browser.find_element(By.ID, "search").send_keys('"shared"')
    wait(browser, lambda: "1 families" in browser.find_element(By.ID, "count").text)
    row = rows(browser)[0]
    assert row.text.endswith("\u25b8 6") and row.find_element(By.CLASS_NAME, "expl").text == '"shared"'
    row.click()
    wait(browser, lambda: len(rows(browser)) == 6)
    assert [r.find_element(By.CLASS_NAME, "fid").text for r in rows(browser)] == [f"#{i}" for i in shared["members"]]
    card = browser.find_element(By.ID, "card")
    assert card.get_attribute("data-feature") == str(shared["members"][0])
    assert "Family: 6 features with this explanation" in card.text
    rows(browser)[0].click()  # closes again
    wait(browser, lambda: len(rows(browser)) == 1)

    # A card: explanations, held-out scores, quantile examples, nearest features as links.
    search = browser.find_element(By.ID, "search")

    def only(fid):  # search a feature id and wait until the list shows just that feature
        search.clear()
        search.send_keys(f"#{fid}")
        ids = "return [...document.querySelectorAll('#list .row .fid')].map((e) => e.textContent)"
        wait(browser, lambda: browser.execute_script(ids) == [f"#{fid}"])
        return rows(browser)[0]

    only(5).click()
    wait(browser, lambda: card.get_attribute("data-feature") == "5")
    text = card.text
    assert "Explanation (built in): " + src[5]["explanation"] in text
    assert "precision 0.90, recall 0.80, F1 " + f"{src[5]['detection']['f1']:.2f}" in text
    assert "Explanation (model): closing brackets" in text and "balanced accuracy 0.75" in text
    heads = [h.text for h in card.find_elements(By.CSS_SELECTOR, "h3.quantile")]
    assert heads == [
        f"Examples from the {q} quarter of its activations" for q in ("highest", "second", "third", "lowest")
    ]
    assert len(card.find_elements(By.CSS_SELECTOR, ".ctx")) == 8 + 4 * 2  # top examples, then 2 per quantile
    links = card.find_elements(By.CSS_SELECTOR, "table.nearest a.flink")
    assert [x.text for x in links] == ["#6", "#7"] and "0.91" in card.find_element(
        By.CSS_SELECTOR, "table.nearest"
    ).text
    links[0].click()
    wait(browser, lambda: card.get_attribute("data-feature") == "6")
    # Frequencies for people; XSS in an explanation stays text.
    assert "0.20 %" in only(0).text
    only(3).click()
    wait(browser, lambda: card.get_attribute("data-feature") == "3")
    assert XSS[1] in card.text and browser.execute_script("return window.__xss") is None


@pytest.mark.slow
def test_forty_thousand_features_load_lazily(browser, tmp_path):
    from selenium.webdriver.common.by import By

    a = synthetic_analysis(40_000, k=16, vocab_size=49_152)
    page = write_page(a, tmp_path / "index.html")
    t0 = time.time()
    browser.get(page.as_uri())
    wait(browser, lambda: browser.execute_script("return document.body.dataset.ready") == "1", timeout=120)
    loaded = time.time() - t0
    assert len(rows(browser)) == 100
    t1 = time.time()
    browser.find_element(By.ID, "search").send_keys("tok12345")
    wait(browser, lambda: "of 40000" in browser.find_element(By.ID, "count").text and len(rows(browser)) < 100)
    rows(browser)[0].click()
    wait(browser, lambda: browser.find_element(By.ID, "card").get_attribute("data-feature") is not None)
    print(
        f"\n40k-feature page: {page.stat().st_size / 2**20:.1f} MiB, ready in {loaded:.1f} s, search+open "
        f"{time.time() - t1:.1f} s"
    )


def test_the_synthetic_analysis_fits_the_schema_of_features_json():
    """The page is built from features.json; the hand-made analysis above must keep its schema."""
    from sae_lens_lite.interpret.features import Analysis, Feature

    a = synthetic_analysis(n_features=5)
    assert set(Analysis.__required_keys__) - set(a) <= {
        "format",
        "version",
        "sae",
        "acts",
        "chance",
    }  # not read by the page
    assert all(set(Feature.__required_keys__) <= set(f) for f in a["features"])
