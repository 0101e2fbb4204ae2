"""Dictionary quality on synthetic superposition with known ground truth, every recipe side by side.

    python scripts/bench_quality.py                       # both regimes, every recipe (~40 min on 2 CPU cores)
    python scripts/bench_quality.py --regime hard --recipes batchtopk topk

Regimes (each SAE trained in memory with `train_on_batches`, scored on fresh samples):
  spare  512 features in 100 dims, p_i ∝ i^-0.5, true L0 = 5, 800 latents, 3M samples, lr 3e-3
         (l1/kl: λ 1, --target-l0 1.5 × true L0; top-k family: k = true L0)
  hard   as many latents as true features: 512 features in 128 dims, d_sae 512 (no spare latents),
         Zipf-Mandelbrot firing probabilities from 0.2 down to 0.002 (true L0 5.4), magnitudes
         1 ± 0.2, 4M samples, batch 1024, and otherwise the defaults: a user's only choice is a
         target L0 (l1, kl, jumprelu: --target-l0 5) or k (top-k family: --k 5).
Scores:
  MCC   mean |cosine| after a one-to-one Hungarian matching of true features to decoder rows
  MMC   mean over true features of the best |cosine| with any decoder row
  L0    active latents per token; EV  explained variance; dead  latents that never fire
Goal (hard): MCC ≥ 0.95 at L0 ≤ 2 × true L0 for the best recipe, no recipe below 0.90.
"""

from __future__ import annotations

import argparse
import time

import torch

from sae_lens_lite import recipes
from sae_lens_lite.sae import SAEConfig
from sae_lens_lite.synthetic import Superposition, make_superposition, mcc, mean_max_cosine, zipf_probs
from sae_lens_lite.train import TrainConfig, train_on_batches


def regime(name: str, seed: int):
    """(data, d_sae, tokens, settings per recipe: the TrainConfig fields that differ from the defaults)."""
    if name == "spare":
        data = make_superposition(n_features=512, d=100, true_l0=5.0, power=0.5, seed=seed)
        l0 = data.true_l0
        common = dict(lr=3e-3)
        relu = dict(l1=1.0, target_l0=1.5 * l0)
        settings = {
            "l1": relu,
            "kl": dict(kl_beta=1.0, kl_rho=l0 / 800, target_l0=1.5 * l0),
            "jumprelu": dict(target_l0=1.5 * l0),
        }
        return data, 800, 3_000_000, {r: {**common, **settings.get(r, dict(k=round(l0)))} for r in recipes.RECIPES}
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(512, 128, generator=g)
    data = Superposition(
        features / features.norm(dim=1, keepdim=True), zipf_probs(512, 0.2, 0.002, 5.4), mag_low=0.8, mag_high=1.2
    )
    top = dict(k=5)
    return (
        data,
        512,
        4_000_000,
        {r: (top if recipes.RECIPES[r].fixed_count else dict(target_l0=5.0)) for r in recipes.RECIPES},
    )


def pooled(batches):
    """batches(epoch), each epoch's batches drawn once and kept: every recipe trains on the same
    samples, and drawing them (two [1024, n_features] random tensors a batch) is paid once."""
    kept = {}

    def factory(epoch):
        if epoch not in kept:
            kept[epoch] = list(batches(epoch))
        return iter(kept[epoch])

    return factory


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--regime", choices=["spare", "hard", "both"], default="both")
    ap.add_argument("--recipes", nargs="+", default=list(recipes.RECIPES), choices=list(recipes.RECIPES))
    ap.add_argument("--tokens", type=int, default=0, help="training samples (0: the regime's)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    for name in ("spare", "hard") if args.regime == "both" else (args.regime,):
        data, d_sae, tokens, settings = regime(name, args.seed)
        tokens = args.tokens or tokens
        d = data.features.shape[1]
        x_test = data.sample(20_000, torch.Generator().manual_seed(12345))  # [n, d]
        epochs = pooled(data.batches(1024, 1 << 20, seed=args.seed + 1))  # the same samples for every recipe
        rows = []
        for rec in args.recipes:
            cfg = TrainConfig(penalty=rec, expansion=1, batch_size=1024, seed=args.seed, **settings[rec])
            sae_cfg = SAEConfig(d_in=d, d_sae=d_sae, **recipes.get(rec, cfg).sae_options())
            t = time.perf_counter()
            sae = train_on_batches(sae_cfg, cfg, epochs, tokens, progress=False)
            with torch.no_grad():
                out = sae(x_test)
            f = out.latents
            ev = 1 - float((x_test - out.x_hat).pow(2).sum() / (x_test - x_test.mean(0)).pow(2).sum())
            rows.append(
                (
                    rec,
                    mcc(sae.W_dec, data.features),
                    mean_max_cosine(sae.W_dec, data.features),
                    float((f > 0).float().sum(-1).mean()),
                    ev,
                    float(((f > 0).sum(0) == 0).float().mean()),
                    time.perf_counter() - t,
                    settings[rec],
                )
            )
            print(f"{name} {rec}: MCC {rows[-1][1]:.3f}, done in {rows[-1][6]:.0f} s", flush=True)

        print(
            f"\n{name}: {len(data.probs)} features in {d} dims, true L0 {data.true_l0:.2f}, {d_sae} "
            f"latents, {tokens:,} samples, batch 1024\n"
        )
        print("| recipe | MCC | MMC | L0 | L0 / true | EV | dead | settings (else defaults) |")
        print("|---|---|---|---|---|---|---|---|")
        for rec, m, mm, l0, ev, dead, _, s in rows:
            print(f"| {rec} | {m:.3f} | {mm:.3f} | {l0:.2f} | {l0 / data.true_l0:.2f} | {ev:.3f} | {dead:.3f} | {s} |")
        print(flush=True)


if __name__ == "__main__":
    main()
