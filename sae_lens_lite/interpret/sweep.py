"""Steering as a trade-off curve: how much of a feature's concept the text carries against how
much fluency it loses as the strength grows (the AxBench view, Wu et al. 2025).

For each feature and strength S = times × its max activation (from features.json), the decoder
direction is added at the hook at the positions the SAE reads (what `sae-lite steer --mode add`
does) while `new_tokens` are sampled from each prompt with a fixed seed. The clean model then
reads each text once, which gives

    activation   the feature's own activation on the generated tokens, re-encoded by the SAE (mean)
    lens log p   log Σ p(v) over the feature's LENS_TOKENS most promoted logit-lens tokens v, mean
                 over the generated positions: how much the text calls for the concept's tokens
    fluency      the clean model's mean log p of the generated tokens

each averaged over the prompts. The fluency cost at S is fluency(0) − fluency(S), in nats per
token. The **best strength** is the one where the activation peaks among the strengths before
the first whose cost exceeds `max_drop`. One prompt's rows (the clean row and every nonzero
strength of every feature) are generated as one batch (models.generate_batch); every row draws
from its own generator, seeded alike, so strength 0 is the clean text itself.
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from sae_lens_lite.config import opt
from sae_lens_lite.data.models import LoadedModel, capture, generate_batch
from sae_lens_lite.errors import UserError
from sae_lens_lite.fsutil import save_figure_atomic, write_text_atomic
from sae_lens_lite.interpret.features import FEATURES_FILE, Analysis, Feature, check_analysis_source, read_features
from sae_lens_lite.interpret.intervene import direction, load, positions
from sae_lens_lite.outputs import fingerprint, read_record
from sae_lens_lite.training.sae import SAE, WEIGHTS_FILE

DEFAULT_PROMPTS = [  # general text and Python documentation (the demo's corpus), as steer_table.py's four
    "The",
    "In this section, we",
    "My favourite thing is",
    "Note that the",
    "The function returns",
    "To open a file,",
    "For example, the",
    "This module provides",
]
LENS_TOKENS = 5  # promoted logit-lens tokens whose probability is the lens concept score
SCORE_BATCH = 16  # rows per clean scoring forward (its log-probs are [rows, tokens, vocab])


@dataclass
class SweepConfig:
    sae: str = opt("runs/sae", "SAE directory whose features steer the model")
    analysis: str = opt(
        "runs/analysis",
        "`sae-lite analyze` output for this SAE: max activations, lens tokens and the ranking come from its "
        "features.json, and the best strength per feature is written back into it (and its index.html)",
    )
    out: str | None = opt(None, "directory for the table and the plots; default: ANALYSIS/sweep")
    feature: list[int] = opt([], "features to sweep; default: the --top best-ranked")
    top: int = opt(20, "with no --feature: how many of the best-ranked features to sweep")
    times: list[float] = opt(
        [0.0, 0.5, 1.0, 2.0, 4.0, 8.0], "strengths, as multiples of each feature's max activation (0: clean text)"
    )
    prompts: list[str] = opt(DEFAULT_PROMPTS, "prompts continued at every strength")
    new_tokens: int = opt(16, "tokens sampled after each prompt")
    max_drop: float = opt(1.0, "fluency cost (nats per token) past which a strength no longer counts as usable")
    seed: int = opt(0, "sampling seed, the same for every strength, feature and prompt")
    temperature: float = opt(1.0, "sampling temperature")
    model: str | None = opt(None, "model to steer; default: the model named in the SAE's config")
    device: str = opt("auto", "cpu, cuda, or auto")


@dataclass
class Curve:
    """One feature's sweep: per strength, averaged over the prompts."""

    feature: int
    max_act: float
    times: list[float]
    activation: list[float]  # the feature's re-encoded activation on the generated text
    lens_logp: list[float]  # log Σ p(lens tokens) under the clean model
    fluency: list[float]  # the clean model's mean log p of the generated tokens
    texts: list[str]  # the first prompt's continuation at each strength
    best: int = 0  # index into times

    @property
    def drop(self) -> list[float]:
        return [self.fluency[0] - x for x in self.fluency]


def best_index(activation: list[float], drop: list[float], max_drop: float) -> int:
    """The strength where the activation peaks before the fluency cost first exceeds max_drop."""
    usable = next((i for i, d in enumerate(drop) if d > max_drop), len(drop))
    return int(np.argmax(activation[: max(usable, 1)]))


def check(cfg: SweepConfig) -> None:
    if cfg.new_tokens < 1:
        raise UserError(f"--new-tokens must be at least 1, got {cfg.new_tokens}")
    if not cfg.times or any(not math.isfinite(t) or t < 0 for t in cfg.times) or sorted(cfg.times) != cfg.times:
        raise UserError(f"--times must be non-negative numbers in increasing order, got {cfg.times}")
    if cfg.times[0] != 0:
        raise UserError("--times must start at 0: the clean text is the reference for the fluency cost")
    if not cfg.prompts or any(not p.strip() for p in cfg.prompts):
        raise UserError("--prompts must be non-empty texts")
    if not cfg.feature and cfg.top < 1:
        raise UserError(f"--top must be at least 1, got {cfg.top}")
    if not cfg.temperature > 0:
        raise UserError(f"--temperature must be positive, got {cfg.temperature}")


def sweep(cfg: SweepConfig, lm: LoadedModel | None = None, sae: SAE | None = None) -> dict:
    """Sweep the strengths for each feature; writes sweep.csv, sweep.md, one plot per feature and
    sweep.json to cfg.out, and the best strengths into the analysis's features.json and page."""
    t0 = time.time()
    check(cfg)
    analysis = read_features(cfg.analysis)
    feats = cfg.feature or [f["id"] for f in sorted(analysis["features"], key=lambda f: f["rank"])[: cfg.top]]
    if (Path(cfg.sae) / WEIGHTS_FILE).is_file():  # else load() says what --sae lacks
        check_analysis_source(cfg.analysis, fingerprint(cfg.sae), cfg.sae)  # the sweep writes into it
    lm, sae = load(cfg.sae, cfg.model, cfg.device, lm, feats, sae)
    if analysis["d_sae"] != sae.d_sae:
        raise UserError(
            f"{cfg.analysis} describes an SAE with {analysis['d_sae']} features, {cfg.sae} has {sae.d_sae}; pass "
            f"--analysis of this SAE (`sae-lite analyze --sae {cfg.sae}` writes one)"
        )
    info = [analysis["features"][j] for j in feats]
    if any(not f["max_act"] > 0 for f in info):
        raise UserError("some features never fired in the analysis (max activation 0): nothing to scale; drop them")
    curves = run_curves(cfg, lm, sae, info)
    out = Path(cfg.out or Path(cfg.analysis) / "sweep")
    out.mkdir(parents=True, exist_ok=True)
    plots = [plot_curve(out / f"feature_{c.feature}.png", c, cfg.max_drop) for c in curves]
    write_tables(out, curves, cfg)
    record_best(cfg, analysis, curves)
    seconds = round(time.time() - t0, 1)
    print(
        f"sweep: {out / 'sweep.md'}: {len(curves)} features x {len(cfg.times)} strengths x {len(cfg.prompts)} prompts"
    )
    for c in curves:
        b = c.best
        print(
            f"  feature {c.feature}: best {c.times[b]:g} x max act ({c.times[b] * c.max_act:.1f}), activation "
            f"{c.activation[0]:.2f} -> {c.activation[b]:.2f}, fluency cost {c.drop[b]:+.2f} nats/token"
        )
    print(f"in {seconds} s")
    return {"out": str(out), "curves": curves, "plots": [str(p) for p in plots], "seconds": seconds}


def run_curves(cfg: SweepConfig, lm: LoadedModel, sae: SAE, info: list[Feature]) -> list[Curve]:
    """Generate and score every (feature, strength) row for every prompt; average over prompts."""
    n_f, n_t = len(info), len(cfg.times)
    lens = torch.tensor([[t for t, _ in f["lens"]["promoted"][:LENS_TOKENS]] for f in info])  # [n_f, L]
    sums = np.zeros((3, n_f, n_t))  # activation, lens log p, fluency
    texts: list[list[str]] = [[""] * n_t for _ in range(n_f)]
    # Row 0 is the clean text, shared by every feature; then each feature's nonzero strengths.
    rows = [(-1, 0.0)] + [(i, t) for i in range(n_f) for t in cfg.times[1:]]
    dirs = torch.stack([direction(sae, [f["id"]]) for f in info])  # [n_f, d]
    delta = torch.stack([torch.zeros_like(dirs[0]) if i < 0 else t * info[i]["max_act"] * dirs[i] for i, t in rows])
    for k, prompt in enumerate(tqdm(cfg.prompts, desc=f"sweep: {len(rows)} rows per prompt", unit="prompt")):
        ids = lm.tokenizer(prompt, return_tensors="pt")["input_ids"].to(delta.device)  # [1, T]
        gens = generate_batch(
            lm,
            ids.expand(len(rows), -1),
            cfg.new_tokens,
            sae.cfg.hook,
            lambda cur: add_rows(lm, sae, cur, delta),
            sample=True,
            temperature=cfg.temperature,
            seed=cfg.seed,
        )
        act, lens_lp, flu = score(lm, sae, ids, [g.token_ids for g in gens], [f["id"] for f in info], lens)
        for r, (i, t) in enumerate(rows):
            for x in range(n_f) if i < 0 else [i]:
                c = 0 if i < 0 else cfg.times.index(t)
                sums[:, x, c] += (act[r, x], lens_lp[r, x], flu[r])
                if k == 0:
                    texts[x][c] = gens[r].text
    mean = sums / len(cfg.prompts)
    curves: list[Curve] = []
    for x, f in enumerate(info):
        activation, lens_logp, fluency = (mean[m, x].round(4).tolist() for m in range(3))
        curve = Curve(f["id"], f["max_act"], list(cfg.times), activation, lens_logp, fluency, texts[x])
        curve.best = best_index(curve.activation, curve.drop, cfg.max_drop)
        curves.append(curve)
    return curves


def add_rows(lm: LoadedModel, sae: SAE, cur: Tensor, delta: Tensor):
    """An edit adding delta[r] [d] to row r of act [b, T, d] where the SAE reads."""
    mask = positions(lm, sae, cur)[..., None]  # [b, T, 1]

    def fn(act: Tensor) -> Tensor:
        return torch.where(mask, act + delta[:, None].to(act.dtype), act)

    return fn


@torch.no_grad()
def score(lm: LoadedModel, sae: SAE, prompt: Tensor, gen: list[list[int]], feats: list[int], lens: Tensor):
    """The clean model reads prompt + each row's generated tokens → (activation [b, n_f] of each
    feature, lens log p [b, n_f], fluency [b]), each a mean over the generated tokens."""
    T, b = prompt.shape[1], len(gen)
    L = T + max(len(g) for g in gen)
    ids = torch.zeros(b, L, dtype=torch.long)
    ids[:, :T] = prompt.cpu()
    new = torch.zeros(b, L, dtype=torch.bool)  # [b, L] the generated positions (right-padded rows)
    for r, g in enumerate(gen):
        ids[r, T : T + len(g)] = torch.tensor(g, dtype=torch.long)
        new[r, T : T + len(g)] = True
    dev = sae.W_dec.device
    hook = sae.cfg.hook
    assert hook is not None  # load() refuses an SAE that names no hook
    act, lens_lp, flu = [], [], []
    for c in range(0, b, SCORE_BATCH):
        x, m = ids[c : c + SCORE_BATCH].to(dev), new[c : c + SCORE_BATCH].to(dev)
        with capture(lm.model, [hook], stop=False) as got:
            logits = lm.model(input_ids=x, use_cache=False).logits
        logp = logits[:, :-1].float().log_softmax(-1)  # [r, L-1, V]: position t predicts token t + 1
        pm = m[:, 1:]  # [r, L-1] predictions of generated tokens
        n = pm.sum(1).clamp(min=1)
        flu.append((logp.gather(-1, x[:, 1:, None])[..., 0] * pm).sum(1) / n)
        lse = logp[:, :, lens.to(dev)].logsumexp(-1)  # [r, L-1, n_f]
        lens_lp.append((lse * pm[..., None]).sum(1) / n[:, None])
        read = m & positions(lm, sae, x)
        h = got[hook]  # [r, L, d]
        f = sae.encode(h.flatten(0, 1).to(sae.W_enc.dtype))[:, feats].view(*h.shape[:2], -1)  # [r, L, n_f]
        act.append((f * read[..., None]).sum(1) / read.sum(1, keepdim=True).clamp(min=1))
    return torch.cat(act).cpu().numpy(), torch.cat(lens_lp).cpu().numpy(), torch.cat(flu).cpu().numpy()


def plot_curve(path: Path, c: Curve, max_drop: float) -> Path:
    """Concept (activation, lens log p) and fluency against strength, the best strength marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [t * c.max_act for t in c.times]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
    ax[0].plot(x, c.activation, "o-", color="C0", label="feature activation (re-encoded)")
    ax[0].set_ylabel("activation on generated text")
    twin = ax[0].twinx()
    twin.plot(x, c.lens_logp, "s--", color="C2", label="log p(lens tokens)")
    twin.set_ylabel("log p(lens tokens)", color="C2")
    ax[1].plot(x, c.drop, "o-", color="C3")
    ax[1].axhline(max_drop, color="grey", ls=":", label=f"max cost {max_drop:g}")
    ax[1].set_ylabel("fluency cost (nats/token)")
    for a in ax:
        a.axvline(x[c.best], color="k", lw=0.8, alpha=0.5)
        a.set_xlabel("strength (activation units)")
    ax[0].set_title(f"feature {c.feature}: concept (best {c.times[c.best]:g} x max act)", fontsize=9)
    ax[1].set_title("fluency cost = clean mean log p - steered", fontsize=9)
    ax[1].legend(fontsize=7)
    save_figure_atomic(fig, path, dpi=90)
    return path


def write_tables(out: Path, curves: list[Curve], cfg: SweepConfig) -> None:
    """sweep.csv (every strength), sweep.md (the best strength per feature), sweep.json (all)."""
    with open(out / "sweep.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["feature", "times_max", "strength", "activation", "lens_logp", "fluency", "fluency_cost", "best"])
        for c in curves:
            for i, t in enumerate(c.times):
                row = [c.activation[i], c.lens_logp[i], c.fluency[i], c.drop[i]]
                w.writerow([c.feature, t, round(t * c.max_act, 4), *(round(v, 4) for v in row), int(i == c.best)])
    lines = [
        f"Steering sweep: {len(cfg.prompts)} prompts, {cfg.new_tokens} tokens sampled (seed {cfg.seed}, "
        f"temperature {cfg.temperature:g}); best = the activation's peak before the fluency cost exceeds "
        f"{cfg.max_drop:g} nats/token.\n",
        "| feature | best (x max act) | strength | activation clean → best | log p lens clean → best "
        "| fluency cost at best | first strength past the cost | sample at best |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in curves:
        b = c.best
        past = next((f"{t:g}" for t, d in zip(c.times, c.drop) if d > cfg.max_drop), "none")
        text = c.texts[b].replace("\n", "↵").replace("|", "\\|")[:80]
        lines.append(
            f"| {c.feature} | {c.times[b]:g} | {c.times[b] * c.max_act:.1f} | {c.activation[0]:.2f} → "
            f"{c.activation[b]:.2f} | {c.lens_logp[0]:.2f} → {c.lens_logp[b]:.2f} | {c.drop[b]:+.2f} | {past} "
            f"| {cfg.prompts[0]}{text} |"
        )
    write_text_atomic(out / "sweep.md", "\n".join(lines) + "\n")
    data = {"settings": settings(cfg), "curves": [dict(vars(c), drop=c.drop) for c in curves]}
    write_text_atomic(out / "sweep.json", json.dumps(data, ensure_ascii=False, indent=1))


def settings(cfg: SweepConfig) -> dict:
    keys = ("times", "prompts", "new_tokens", "max_drop", "seed", "temperature")
    return {k: getattr(cfg, k) for k in keys}


def record_best(cfg: SweepConfig, analysis: Analysis, curves: list[Curve]) -> None:
    """The best strength and its curve into each swept feature of features.json ("sweep"), the
    settings at the top level, and the page rebuilt with them."""
    from sae_lens_lite.interpret.browser import write_page

    for c in curves:
        b = c.best
        analysis["features"][c.feature]["sweep"] = {
            "best_times": c.times[b],
            "best_strength": round(c.times[b] * c.max_act, 4),
            "times": c.times,
            "activation": c.activation,
            "lens_logp": c.lens_logp,
            "fluency_cost": [round(d, 4) for d in c.drop],
            "text": c.texts[b],
        }
    analysis["sweep"] = settings(cfg)
    path = Path(cfg.analysis)
    path = path if path.suffix else path / FEATURES_FILE
    write_text_atomic(path, json.dumps(analysis, separators=(",", ":"), ensure_ascii=False, allow_nan=False))
    page = path.with_name("index.html")
    if page.exists():  # rebuilt with the features it showed (analyze --max-features)
        rec = read_record(path.parent) or {}
        write_page(analysis, page, rec.get("settings", {}).get("max_features"))
