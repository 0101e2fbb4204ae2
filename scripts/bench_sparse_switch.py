"""Where the sparse training path stops paying: one training step, dense against sparse, at a range
of shares of active latents, for the variable-count recipes (L1, KL, JumpReLU).

    python scripts/bench_sparse_switch.py                          # 576 x 4608 (SmolLM2 at 8x), L1 and JumpReLU
    python scripts/bench_sparse_switch.py --d-in 128 --d-sae 2048 --batch 4096
    python scripts/bench_sparse_switch.py --precision float32      # fp32 moves the crossover

For each share, a random SAE (initialised by train.init_from_data, as training starts)
gets its b_enc set per latent so that that share of the batch's pre-activations clears the
recipe's entry floor (0 for a ReLU, θ − ε/2 for JumpReLU), and a full step (forward, loss,
backward, clipping, fused Adam, at lr 1e-9 so the density stays put) is timed on the dense path
and on the sparse one, in alternating blocks so that the machine's drift slows both alike. The
inputs are Gaussian unless --acts names an activation cache. The last column is the path that
`loss.use_sparse` picks at that share on this machine and precision (`loss.sparse_max_density`):
it should be the faster one, or near the crossover.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch

from sae_lens_lite import runtime
from sae_lens_lite.data.cache import ActivationCache
from sae_lens_lite.training import recipes
from sae_lens_lite.training.loss import sparse_max_density, step_terms, total_loss, use_sparse
from sae_lens_lite.training.sae import SAE, SAEConfig
from sae_lens_lite.training.train import TrainConfig, autocast_dtype, init_from_data


def inputs(args) -> torch.Tensor:
    if args.acts:
        acts = ActivationCache.open(args.acts).load(("activations",), dtype=torch.float32)["activations"]
        return acts[: args.batch * 4]
    return torch.randn(args.batch * 4, args.d_in)


def make_sae(penalty: str, x: torch.Tensor, d_sae: int, share: float, cfg: TrainConfig):
    recipe = recipes.get(penalty, cfg)
    sae = SAE(SAEConfig(d_in=x.shape[1], d_sae=d_sae, **recipe.sae_options()))
    init_from_data(sae, lambda epoch: iter(x.split(cfg.batch_size)), 0, recipe.dec_norm, len(x))  # as training starts
    recipe.init(sae)
    with torch.no_grad():
        pre = sae.pre_activation(x).float()  # [n, d_sae]
        floor = recipe.entry_floor(sae)
        # each latent's (1 − share) quantile sits at the floor: that share of the tokens clears it
        q = pre.kthvalue(max(1, round((1 - share) * len(pre))), dim=0).values  # [d_sae]
        sae.b_enc.copy_(floor - q)
    return sae, recipe


def time_steps(sae, recipe, cfg, x, amp, reps: int, steps: int) -> dict[bool, float]:
    params = [p for p in sae.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-9, fused=True)
    dead = torch.zeros(sae.d_sae, dtype=torch.bool)
    lam = torch.tensor(1.0)
    batches = x.split(cfg.batch_size)

    def step(i: int, c: TrainConfig):
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            t = step_terms(sae, batches[i % len(batches)], recipe, c, dead)
        opt.zero_grad(set_to_none=True)
        total_loss(t, lam, recipe).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        return t

    ms: dict[bool, list[float]] = {True: [], False: []}
    l0, i = 0.0, 0
    for _ in range(reps):
        for sparse in (True, False):
            c = replace(cfg, sparse=sparse)
            step(i, c)  # one untimed step: the switch of path
            t0 = time.perf_counter()
            for _ in range(steps):
                t = step(i, c)
                i += 1
            ms[sparse].append((time.perf_counter() - t0) / steps * 1e3)
            l0 = float(t["l0"])
    return {k: statistics.median(v) for k, v in ms.items()} | {"l0": l0}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-in", type=int, default=576, help="input width without --acts (default 576, SmolLM2)")
    ap.add_argument("--d-sae", type=int, default=4608)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--penalties", nargs="+", default=["l1", "jumprelu"], choices=["l1", "kl", "jumprelu"])
    ap.add_argument("--shares", nargs="+", type=float, default=[0.005, 0.01, 0.02, 0.03, 0.05])
    ap.add_argument("--precision", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--acts", default="", help="an activation cache to take the inputs from (default: Gaussian)")
    ap.add_argument("--reps", type=int, default=3, help="alternating blocks per path")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per block")
    args = ap.parse_args()

    torch.manual_seed(0)
    x = inputs(args)
    amp = autocast_dtype(args.precision, torch.device("cpu"))
    with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
        limit = sparse_max_density(x)
    print(
        f"{runtime.cpu_description()}; {'bf16 autocast' if amp else 'float32'}; "
        f"d_in {x.shape[1]}, d_sae {args.d_sae}, batch {args.batch}; sparse path up to "
        f"{limit * min(1.0, x.shape[1] / 256):.1%} active"
    )
    print(
        "| recipe | share above the floor | L0 | dense ms/step | sparse ms/step | sparse / dense | use_sparse picks |"
    )
    print("|---|---|---|---|---|---|---|")
    with runtime.keep_freed_memory(torch.device("cpu")):
        for penalty in args.penalties:
            cfg = TrainConfig(penalty=penalty, batch_size=args.batch, lr=1e-9)
            for share in args.shares:
                sae, recipe = make_sae(penalty, x, args.d_sae, share, cfg)
                r = time_steps(sae, recipe, cfg, x, amp, args.reps, args.steps)
                with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
                    picks = "sparse" if use_sparse(sae, x[: args.batch], recipe, cfg) else "dense"
                print(
                    f"| {penalty} | {share:.1%} | {r['l0']:.1f} | {r[False]:.1f} | {r[True]:.1f} | "
                    f"{r[True] / r[False]:.2f} | {picks} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
