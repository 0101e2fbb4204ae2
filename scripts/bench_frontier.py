"""Sparsity vs reconstruction frontier on real activations (issue: SAE quality on SmolLM2).

Harvests `--hook` on the shared training corpora (everything in ../shared/data except
wikitext2-test.txt), trains one SAE per sparsity setting, evaluates each on held-out WikiText-2
test, and prints L0, explained variance, CE loss recovered, KL and dead fraction per setting
(no PCA/VAE baselines: `sae-lite evaluate` adds them). Finished stages (the harvests, trained
SAEs, evaluation reports) are reused when the script is run again.

"dead" is reported three ways: never firing on the --eval-tokens evaluation tokens (rare latents
look dead on a small sample), never firing on --heldout-tokens of WikiText-2 test, and the
trainer's own count (no firing in its last --dead-window = 1M training tokens).

    python scripts/bench_frontier.py  # the TopK table of docs/benchmarks.md (~75 min on 2 CPU cores)
    python scripts/bench_frontier.py --settings l1_l0_48 --train-tokens 2500000           # its L1 row
    python scripts/bench_frontier.py --settings batchtopk_k48 jumprelu_l0_48 matryoshka_k48  # the recipe rows
    python scripts/bench_frontier.py --tokens 40000 --expansion 4 --train-tokens 300000   # a quick look
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sae_lens_lite.data.cache import ActivationCache
from sae_lens_lite.data.harvest import HarvestConfig, harvest
from sae_lens_lite.evaluation.evaluate import EvalConfig, evaluate
from sae_lens_lite.evaluation.metrics import CHUNK, ReconStats
from sae_lens_lite.training.recipes.matryoshka import prefixes
from sae_lens_lite.training.sae import SAE
from sae_lens_lite.training.train import TrainConfig, train

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SETTINGS = {  # name: TrainConfig overrides
    "topk_k16": {"penalty": "topk", "k": 16},
    "topk_k32": {"penalty": "topk", "k": 32},
    "topk_k48": {"penalty": "topk", "k": 48},
    "topk_k64": {"penalty": "topk", "k": 64},
    "l1_lam1": {"penalty": "l1", "l1": 1.0},
    "l1_lam2": {"penalty": "l1", "l1": 2.0},
    "l1_lam4": {"penalty": "l1", "l1": 4.0},
    "l1_l0_48": {"penalty": "l1", "l1": 2.0, "target_l0": 48},  # λ adapted until L0 ≈ 48, to meet topk_k48
    "batchtopk_k48": {"penalty": "batchtopk", "k": 48},
    "jumprelu_l0_48": {"penalty": "jumprelu", "target_l0": 48},
    "matryoshka_k48": {"penalty": "matryoshka", "k": 48},
}
PREFIX_TOKENS = 65_536  # held-out tokens on which each Matryoshka prefix's explained variance is measured


@torch.no_grad()
def prefix_ev(sae: SAE, acts: Path, tokens: int = PREFIX_TOKENS) -> dict[int, float]:
    """Explained variance of each nested prefix of a Matryoshka SAE (latents < m kept, the rest zeroed)
    on the first `tokens` held-out activations."""
    x = ActivationCache.open(acts).load(("activations",), dtype=torch.float32)["activations"][:tokens]
    stats = {m: ReconStats(x.double().mean(0)) for m in prefixes(sae.d_sae)}
    latent = torch.arange(sae.d_sae)
    for xb in x.split(CHUNK):  # metrics.sae_pass's loop, with one encode shared by every prefix's decode
        f = sae.encode(xb)  # [n, d_sae]
        for m, st in stats.items():
            st.add(xb, sae.decode(f * (latent < m)))
    return {m: st.result()["explained_variance"] for m, st in stats.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/frontier")
    p.add_argument("--hook", default="blocks.6.hook_resid_post")
    p.add_argument("--tokens", type=int, default=1_400_000, help="harvested training tokens")
    p.add_argument("--expansion", type=int, default=16)
    p.add_argument("--train-tokens", type=int, default=5_000_000)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument(
        "--heldout-tokens",
        type=int,
        default=262_144,
        help="WikiText-2 test tokens harvested to count latents that never fire",
    )
    p.add_argument(
        "--settings", nargs="+", default=["topk_k16", "topk_k32", "topk_k48", "topk_k64"], choices=list(SETTINGS)
    )
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    out = Path(args.out)

    train_dir = out / "corpus"  # a directory of .txt files = one document each
    train_dir.mkdir(parents=True, exist_ok=True)
    for f in sorted(DATA.glob("*.txt")):
        if f.name != "wikitext2-test.txt" and not (train_dir / f.name).exists():
            (train_dir / f.name).symlink_to(f)
    acts = harvest(
        HarvestConfig(
            hooks=[args.hook], dataset=str(train_dir), tokens=args.tokens, out=str(out / "acts"), device=args.device
        )
    )[args.hook]

    heldout = harvest(
        HarvestConfig(
            hooks=[args.hook],
            dataset=str(DATA / "wikitext2-test.txt"),
            tokens=args.heldout_tokens,
            out=str(out / "heldout_acts"),
            device=args.device,
        )
    )[args.hook]
    rows = []
    for name in args.settings:
        sae_dir = out / name
        sae = train(
            TrainConfig(
                acts=str(acts),
                out=str(sae_dir),
                expansion=args.expansion,
                tokens=args.train_tokens,
                batch_size=args.batch_size,
                lr=args.lr,
                device=args.device,
                **SETTINGS[name],
            )
        )
        report = sae_dir / "eval" / "report.json"
        r = json.loads(report.read_text()) if report.exists() else None
        if r is None or r["config"]["tokens"] != args.eval_tokens or r["config"].get("sparsity_acts") != str(heldout):
            r = evaluate(
                EvalConfig(
                    sae=str(sae_dir),
                    dataset=str(DATA / "wikitext2-test.txt"),
                    tokens=args.eval_tokens,
                    skip_tokens=0,
                    baselines=False,
                    sparsity_acts=str(heldout),
                    device=args.device,
                    overwrite=True,
                )
            )
        rows.append(
            {
                "setting": name,
                "l0": r["sparsity"]["l0"],
                "ev": r["reconstruction"]["explained_variance"],
                "ce_rec": r["ce"]["sae_recovered"],
                "kl": r["ce"]["kl_sae"],
                "dead": r["sparsity"]["dead_fraction"],
                "dead_train": sae.cfg.meta["final_metrics"]["dead_frac"],
                "dead_heldout": r["sparsity_on_acts"]["dead_fraction"],
                "prefix_ev": prefix_ev(sae.cpu().float(), heldout)
                if SETTINGS[name]["penalty"] == "matryoshka"
                else None,
            }
        )
    print(
        f"\n{args.hook}, {args.expansion}x, {args.tokens} harvested tokens, {args.train_tokens} training "
        f"tokens; eval: wikitext2-test, {args.eval_tokens} tokens"
    )
    # dead (eval): never fired on the evaluation tokens; dead (train): no firing in the trainer's
    # last --dead-window (1M) tokens, the usual definition.
    n_held = ActivationCache.open(heldout).n_tokens
    print(
        "| setting | L0 | explained variance | CE loss recovered | KL (nats/token) | dead: eval tokens | "
        f"dead: {n_held} held-out | dead: trainer |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in sorted(rows, key=lambda r: r["l0"]):
        print(
            f"| {r['setting']} | {r['l0']:.1f} | {r['ev']:.3f} | {r['ce_rec']:.3f} | {r['kl']:.3f} | "
            f"{r['dead']:.3f} | {r['dead_heldout']:.4f} | {r['dead_train']:.4f} |"
        )
    for r in rows:
        if r["prefix_ev"]:
            evs = ", ".join(f"{m} latents {ev:.3f}" for m, ev in r["prefix_ev"].items())
            print(f"{r['setting']}: explained variance of each prefix on {PREFIX_TOKENS} held-out tokens: {evs}")
    (out / "frontier.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
