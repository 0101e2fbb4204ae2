"""Dictionary quality on synthetic superposition with known ground truth, every recipe side by side.

    python scripts/bench_quality.py                       # both regimes, every recipe (~40 min on 2 CPU cores)
    python scripts/bench_quality.py --regime hard --recipes batchtopk topk
    python scripts/bench_quality.py --regime saelens     # SAELens's generator and evaluation (needs sae-lens)

Regimes (each SAE trained in memory with `train_on_batches`, scored on fresh samples):
  spare  512 features in 100 dims, p_i ∝ i^-0.5, true L0 = 5, 800 latents, 3M samples, lr 3e-3
         (l1/kl: λ 1, --target-l0 1.5 × true L0; top-k family: k = true L0)
  hard   as many latents as true features: 512 features in 128 dims, d_sae 512 (no spare latents),
         Zipf-Mandelbrot firing probabilities from 0.2 down to 0.002 (true L0 5.4), magnitudes
         1 ± 0.2, 4M samples, batch 1024, and otherwise the defaults: a user's only choice is a
         target L0 (l1, kl, jumprelu: --target-l0 5) or k (top-k family: --k 5).
  saelens  the hard regime's shape drawn by SAELens's own benchmark (sae_lens.synthetic):
         FeatureDictionary(512, 128) (orthogonalised features), zipfian_firing_probabilities(512,
         exponent 0.5, 0.2 to 0.002) (true L0 5.41), magnitudes N(1, 0.2); --target-l0 1.5 × true
         L0 or k = 5, else the defaults. Every SAE, ours after our SAELens export, is scored by
         SAELens's eval_sae_on_synthetic_data on 100k fresh samples, and SAELens's own trainer
         (train_toy_sae's settings) trains on the same samples as the anchor rows.
Scores:
  MCC   mean |cosine| after a one-to-one Hungarian matching of true features to decoder rows
  MMC   mean over true features of the best |cosine| with any decoder row
  L0    active latents per token; EV  explained variance; dead  latents that never fire
Goal (hard, saelens): MCC ≥ 0.95 at L0 ≤ 2 × true L0 for the best recipe, no recipe below 0.90,
and (saelens) no recipe with more than 5% of its latents dead.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from sae_lens_lite.export import save_saelens
from sae_lens_lite.training import recipes
from sae_lens_lite.training.recipes import matryoshka
from sae_lens_lite.training.sae import SAEConfig
from sae_lens_lite.training.synthetic import Superposition, make_superposition, mcc, mean_max_cosine, zipf_probs
from sae_lens_lite.training.train import TrainConfig, train_on_batches

EVAL_SAMPLES = 100_000  # the saelens regime's evaluation (eval_sae_on_synthetic_data's default)
SAELENS_L1 = 0.3  # l1_coefficient of SAELens's L1 anchor: lands near our target L0 on this data


class SAELensData(Superposition):
    """SAELens's synthetic data (FeatureDictionary, ActivationGenerator) behind Superposition's
    interface. SAELens draws from torch's global generator, so each call seeds a fork of it from
    `generator`: the samples stay a function of the seed, and nothing else's randomness moves."""

    def __init__(self, seed: int, n_features: int = 512, d: int = 128):
        try:
            from sae_lens.synthetic import ActivationGenerator, FeatureDictionary, zipfian_firing_probabilities
        except ImportError:
            raise SystemExit("--regime saelens needs sae-lens: pip install 'sae_lens_lite[saelens]'") from None
        probs = zipfian_firing_probabilities(n_features, exponent=0.5, max_prob=0.2, min_prob=0.002)
        self.gen = ActivationGenerator(n_features, probs, std_firing_magnitudes=0.2, mean_firing_magnitudes=1.0)
        self.fd = FeatureDictionary(n_features, d, seed=seed)
        super().__init__(self.fd.feature_vectors.detach(), probs)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        with torch.random.fork_rng(), torch.no_grad():
            torch.manual_seed(int(torch.randint(1 << 62, (), generator=generator)))
            return self.fd(self.gen.sample(n))

    def evaluate(self, saelens_sae) -> dict:
        """SAELens's eval_sae_on_synthetic_data on EVAL_SAMPLES fresh samples (a fixed seed)."""
        from sae_lens.synthetic import eval_sae_on_synthetic_data

        with torch.random.fork_rng(), torch.no_grad():
            torch.manual_seed(12345)
            r = eval_sae_on_synthetic_data(saelens_sae, self.fd, self.gen, EVAL_SAMPLES, batch_size=10_000)
        return dict(mcc=r.mcc, l0=r.sae_l0, ev=r.explained_variance, dead=r.dead_latents / saelens_sae.cfg.d_sae)


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
    if name == "saelens":
        data = SAELensData(seed)
        target = round(1.5 * data.true_l0, 2)
    else:
        g = torch.Generator().manual_seed(seed)
        features = torch.randn(512, 128, generator=g)
        data = Superposition(
            features / features.norm(dim=1, keepdim=True), zipf_probs(512, 0.2, 0.002, 5.4), mag_low=0.8, mag_high=1.2
        )
        target = 5.0
    top = dict(k=5)
    return (
        data,
        512,
        4_000_000,
        {r: (top if recipes.RECIPES[r].fixed_count else dict(target_l0=target)) for r in recipes.RECIPES},
    )


def train_saelens(rec: str, d: int, d_sae: int, epochs, tokens: int, seed: int):
    """SAELens's SAETrainer with train_toy_sae's settings (lr 3e-4 constant, batch 1024) on our
    batches; its L1 at SAELENS_L1, its top-k family at k = 5. Returns its inference SAE."""
    from sae_lens import SAE as SAELensSAE
    from sae_lens import SAETrainer
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.matryoshka_batchtopk_sae import (
        MatryoshkaBatchTopKTrainingSAE,
        MatryoshkaBatchTopKTrainingSAEConfig,
    )
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    make, make_cfg, options = {
        "l1": (StandardTrainingSAE, StandardTrainingSAEConfig, dict(l1_coefficient=SAELENS_L1)),
        "topk": (TopKTrainingSAE, TopKTrainingSAEConfig, dict(k=5)),
        "batchtopk": (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, dict(k=5)),
        "matryoshka": (
            MatryoshkaBatchTopKTrainingSAE,
            MatryoshkaBatchTopKTrainingSAEConfig,
            dict(k=5, matryoshka_widths=matryoshka.prefixes(d_sae)),
        ),
    }[rec]
    torch.manual_seed(seed)  # SAELens initialises from the global generator
    sae = make(make_cfg(d_in=d, d_sae=d_sae, **options))
    cfg = SAETrainerConfig(
        total_training_samples=tokens,
        train_batch_size_samples=1024,
        lr=3e-4,
        lr_end=3e-4,  # train_toy_sae's constant schedule
        dead_feature_window=1000,
        feature_sampling_window=2000,
        logger=LoggingConfig(log_to_wandb=False, eval_every_n_wandb_logs=2**31 - 1),
    )

    def provider():  # SAELens's DataProvider: an endless iterator of batches
        epoch = 0
        while True:
            yield from epochs(epoch)
            epoch += 1

    sae = SAETrainer(cfg=cfg, sae=sae, data_provider=provider()).fit()
    with tempfile.TemporaryDirectory() as tmp:
        sae.save_inference_model(tmp)  # BatchTopK becomes its inference JumpReLU here
        return SAELensSAE.load_from_disk(tmp), options


def score(sae, data, x_test) -> dict:
    """Our scores on x_test [n, d]; for the saelens regime, SAELens's on the exported SAE instead."""
    if isinstance(data, SAELensData):
        from sae_lens import SAE as SAELensSAE

        with tempfile.TemporaryDirectory() as tmp:
            save_saelens(sae, tmp)
            return {**data.evaluate(SAELensSAE.load_from_disk(tmp)), "mmc": mean_max_cosine(sae.W_dec, data.features)}
    with torch.no_grad():
        out = sae(x_test)
    f = out.latents
    return dict(
        mcc=mcc(sae.W_dec, data.features),
        mmc=mean_max_cosine(sae.W_dec, data.features),
        l0=float((f > 0).float().sum(-1).mean()),
        ev=1 - float((x_test - out.x_hat).pow(2).sum() / (x_test - x_test.mean(0)).pow(2).sum()),
        dead=float(((f > 0).sum(0) == 0).float().mean()),
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
    ap.add_argument("--regime", choices=["spare", "hard", "saelens", "both"], default="both")
    ap.add_argument("--recipes", nargs="*", default=list(recipes.RECIPES), choices=list(recipes.RECIPES))
    ap.add_argument(
        "--saelens-recipes",
        nargs="*",
        default=["l1", "topk", "batchtopk"],
        choices=["l1", "topk", "batchtopk", "matryoshka"],
        help="--regime saelens: SAELens's trainer on the same samples, the anchor rows",
    )
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
            rows.append((rec, score(sae, data, x_test), time.perf_counter() - t, settings[rec]))
            print(f"{name} {rec}: MCC {rows[-1][1]['mcc']:.3f}, done in {rows[-1][2]:.0f} s", flush=True)
        if name == "saelens":
            for rec in args.saelens_recipes:
                t = time.perf_counter()
                lens, options = train_saelens(rec, d, d_sae, epochs, tokens, args.seed)
                scores = {**data.evaluate(lens), "mmc": mean_max_cosine(lens.W_dec.detach(), data.features)}
                rows.append((f"SAELens {rec}", scores, time.perf_counter() - t, options))
                print(f"{name} SAELens {rec}: MCC {scores['mcc']:.3f}, done in {rows[-1][2]:.0f} s", flush=True)

        print(
            f"\n{name}: {len(data.probs)} features in {d} dims, true L0 {data.true_l0:.2f}, {d_sae} "
            f"latents, {tokens:,} samples, batch 1024\n"
        )
        print("| recipe | MCC | MMC | L0 | L0 / true | EV | dead | settings (else defaults) |")
        print("|---|---|---|---|---|---|---|---|")
        for rec, r, _, s in rows:
            print(
                f"| {rec} | {r['mcc']:.3f} | {r['mmc']:.3f} | {r['l0']:.2f} | {r['l0'] / data.true_l0:.2f} | "
                f"{r['ev']:.3f} | {r['dead']:.3f} | {s} |"
            )
        print(flush=True)


if __name__ == "__main__":
    main()
