"""Where `--target-l0` lands: the training L0 over a run's last log window (50 steps) divided by
the target, with the controller's proportional term at each --damp (0: the integral term alone).

    python scripts/bench_target_l0.py                       # every case below, damp 0 and 0.75 (~20 min on 2 cores)
    python scripts/bench_target_l0.py --cases synthetic --damp 0 0.5 0.75 1

Cases (docs/training.md has the measured table):
  - synthetic: test_train's superposition data (256 true features, d 64, 512 latents), L1,
    600k tokens, targets 8 (λ 1), 8 (λ 100) and 20 (λ 1), L0 measured as the tests do (the
    trained SAE on 8,192 fresh samples);
  - demo: the demo config's L1 run (8x, batch 1,024, lr 2e-3, 600k tokens, target 25) on a
    demo cache (`--demo-acts`, default runs/demo/acts: run `make demo` first), and the same run
    for L1 at 60, JumpReLU at 40 and KL at 30 (the cases not used to choose 0.75);
  - peer: bench_peer's ours-side L1 and JumpReLU runs (its train_ours; 8x, 200 steps) steered to the L0 SAELens
    reached (167.69, 182.51) on bench_peer's cache (`--peer-acts`, default runs/bench_peer/acts:
    run scripts/bench_peer.py first).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from sae_lens_lite.data.cache import ActivationCache
from sae_lens_lite.training import recipes
from sae_lens_lite.training import train as train_mod
from sae_lens_lite.training.sae import SAEConfig
from sae_lens_lite.training.synthetic import make_superposition
from sae_lens_lite.training.train import TrainConfig, train_on_batches

sys.path.insert(0, str(Path(__file__).parent))
from bench_peer import Setup, epoch_batches, score, train_ours  # noqa: E402

CASES = ("synthetic", "demo", "peer")


def last_window_l0(sae) -> float:
    return sae.cfg.meta["final_metrics"]["l0"]


def final_l0(sae_cfg: SAEConfig, cfg: TrainConfig, batches, x: torch.Tensor | None = None) -> float:
    """The training L0 over the run's last log window, or the trained SAE's mean L0 on x."""
    sae = train_on_batches(sae_cfg, cfg, batches, cfg.tokens, progress=False)
    return last_window_l0(sae) if x is None else score(sae, x)["l0"]


def load(path: str) -> torch.Tensor:
    if not Path(path).exists():
        raise SystemExit(f"bench_target_l0: no activation cache at {path}; see --help for how to make it")
    return ActivationCache.open(path).load(("activations",), dtype=torch.float32)["activations"]


def runs(case: str, args) -> list[tuple[str, float, callable]]:
    """(name, target, fn() -> final train L0) for a case."""
    out = []
    if case == "synthetic":
        data = make_superposition(n_features=256, d=64, true_l0=2.5, power=0.3, seed=0)
        x = data.sample(8192, torch.Generator().manual_seed(7))  # scored as test_train does
        for target, l1 in ((8.0, 1.0), (8.0, 100.0), (20.0, 1.0)):
            cfg = TrainConfig(penalty="l1", l1=l1, target_l0=target, batch_size=1024, lr=3e-3, seed=0, tokens=600_000)
            sae_cfg = SAEConfig(d_in=64, d_sae=512, activation="relu")
            out.append(
                (
                    f"synthetic l1 λ{l1:g}",
                    target,
                    lambda c=cfg, s=sae_cfg: final_l0(s, c, data.batches(1024, 1 << 18, seed=1), x),
                )
            )
    elif case == "demo":
        acts = load(args.demo_acts)
        for pen, target in (("l1", 25.0), ("l1", 60.0), ("jumprelu", 40.0), ("kl", 30.0)):
            cfg = TrainConfig(penalty=pen, expansion=8, target_l0=target, lr=2e-3, tokens=600_000, batch_size=1024)
            sae_cfg = SAEConfig(d_in=acts.shape[1], d_sae=8 * acts.shape[1], **recipes.get(pen, cfg).sae_options())
            out.append((f"demo {pen}", target, lambda c=cfg, s=sae_cfg: final_l0(s, c, epoch_batches(acts, 1024, 0))))
    else:
        acts = load(args.peer_acts)
        for pen, target in (("l1", 167.69), ("jumprelu", 182.51)):
            setup = Setup(d_sae=8 * acts.shape[1], batch=2048, lr=2e-3, tokens=409_600, penalty=pen)
            out.append(
                (f"peer {pen}", target, lambda s=setup, t=target: last_window_l0(train_ours(acts, s, "auto", t)[0]))
            )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    p.add_argument(
        "--damp", nargs="+", type=float, default=[0.0, train_mod.L0_DAMP], help="proportional terms to compare"
    )
    p.add_argument("--demo-acts", default="runs/demo/acts")
    p.add_argument("--peer-acts", default="runs/bench_peer/acts")
    args = p.parse_args()
    print("| run | target | " + " | ".join(f"damp {d:g}" for d in args.damp) + " |")
    print("|---|---|" + "---|" * len(args.damp))
    for case in args.cases:
        for name, target, fn in runs(case, args):
            got = []
            for d in args.damp:
                train_mod.L0_DAMP = d
                got.append(fn() / target)
            print(f"| {name} | {target:g} | " + " | ".join(f"{r:.2f}" for r in got) + " |", flush=True)


if __name__ == "__main__":
    main()
