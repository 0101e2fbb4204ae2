"""Training throughput: the matmul peak, a naive SAE step, and our trainer end to end.

    python scripts/bench_train.py                      # CPU defaults: d_in 128, 2048 latents
    python scripts/bench_train.py --d-in 768 --d-sae 24576 --batch 8192   # on a GPU
    python scripts/bench_train.py --penalty topk --k 32                    # TopK: sparse vs dense path
    python scripts/bench_train.py --penalty batchtopk --d-in 576 --d-sae 4608   # any recipe

In one run, tokens/s for
  - limit:  the matmul peak (one big square product, in the dtype our trainer multiplies in)
            divided by 10·d_in·d_sae, the flops per token of an SAE step (5 matmuls: encoder and
            decoder forward, three in the backward);
  - naive:  the step as a user would write it: eager fp32, a few lines, batches from a tensor in
            memory, loss.item() every step;
  - ours:   `train()` end to end, reading activations from an on-disk ActivationCache (bf16, as
            harvest writes it) the way it does in real use, with metrics, checkpoints and all;
            once with the default precision, once forced to float32, and once with the dense
            path (`--no-sparse`), so the sparse kernels' gain is visible (TopK; L1 on the CPU).
and the ratios ours/naive and ours/limit. Each timing is the best of --repeats runs,
interleaved, so a noisy machine slows every contestant alike.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

from sae_lens_lite import runtime
from sae_lens_lite.data.cache import ActivationCache, CacheWriter
from sae_lens_lite.runtime import resolve_device
from sae_lens_lite.training.recipes import RECIPES
from sae_lens_lite.training.synthetic import make_superposition
from sae_lens_lite.training.train import TrainConfig, autocast_dtype, train


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device, dtype, n: int) -> float:
    """FLOP/s of an n×n×n product."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(3):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - t) / 3)
    return 2 * n**3 / best


def naive_tokens_per_s(acts: torch.Tensor, d_sae: int, batch: int, steps: int, device, k: int = 0) -> float:
    """The SAE step a user writes first: eager fp32, everything spelt out, a sync every step."""
    d_in = acts.shape[1]
    W_enc = torch.nn.Parameter(torch.randn(d_in, d_sae, device=device) * 0.01)
    b_enc = torch.nn.Parameter(torch.zeros(d_sae, device=device))
    W_dec = torch.nn.Parameter(torch.randn(d_sae, d_in, device=device) * 0.01)
    b_dec = torch.nn.Parameter(torch.zeros(d_in, device=device))
    opt = torch.optim.Adam([W_enc, b_enc, W_dec, b_dec], lr=1e-4)
    acts = acts.to(device)
    t = None
    for step in range(steps + 2):
        if step == 2:  # two warm-up steps
            sync(device)
            t = time.perf_counter()
        idx = torch.randint(0, len(acts), (batch,), device=device)
        x = acts[idx].float()
        pre = (x - b_dec) @ W_enc + b_enc
        if k:  # TopK: keep the k largest, as a user would write it
            vals, idx = pre.topk(k, dim=-1)
            f = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
        else:
            f = torch.relu(pre)
        x_hat = f @ W_dec + b_dec
        loss = (x - x_hat).pow(2).sum(-1).mean()
        if not k:
            loss = loss + 5.0 * (f * W_dec.norm(dim=1)).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        l0 = (f > 0).float().sum(-1).mean().item()  # noqa: F841  (what a user logs)
        loss.item()
    sync(device)
    return steps * batch / (time.perf_counter() - t)


def ours_tokens_per_s(
    cache: Path,
    out: Path,
    d_in: int,
    d_sae: int,
    batch: int,
    tokens: int,
    device,
    precision: str,
    compile: bool,
    penalty: str = "l1",
    k: int = 0,
    sparse: bool = True,
) -> float:
    shutil.rmtree(out, ignore_errors=True)
    penalty = (
        dict(penalty=penalty, k=k) if k else dict(penalty=penalty, target_l0=20.0 if penalty == "jumprelu" else 0.0)
    )
    cfg = TrainConfig(
        acts=str(cache),
        out=str(out),
        expansion=d_sae // d_in,
        batch_size=batch,
        tokens=tokens,
        device=str(device),
        precision=precision,
        compile=compile,
        sparse=sparse,
        log_every=50,
        **penalty,
    )
    sync(device)
    t = time.perf_counter()
    train(cfg)
    sync(device)
    return tokens // batch * batch / (time.perf_counter() - t)


def write_cache(path: Path, d_in: int, n_tokens: int) -> None:
    data = make_superposition(n_features=4 * d_in, d=d_in, true_l0=10.0)
    w = CacheWriter(path, {"model": "synthetic", "hook": "none", "dtype": "bfloat16", "context_length": 128}, d_in)
    g = torch.Generator().manual_seed(0)
    per = 32768
    for i in range(0, n_tokens, per):
        rows = torch.arange(per)
        w.add_shard(data.sample(per, g), rows % 1000, rows // 128, rows % 128, n_contexts=per // 128)
    w.finish()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-in", type=int, default=128)
    ap.add_argument("--d-sae", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument(
        "--penalty",
        choices=list(RECIPES),
        default="l1",
        help="our recipe; naive trains TopK for the top-k family, else L1",
    )
    ap.add_argument(
        "--k", type=int, default=32, help="latents kept per token for the top-k family (topk, batchtopk, matryoshka)"
    )
    ap.add_argument("--tokens", type=int, default=0, help="tokens per trainer run (default: 1M on CPU, 50M on GPU)")
    ap.add_argument("--naive-steps", type=int, default=0, help="default: 30 on CPU, 300 on GPU")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--compile", action="store_true", help="also time the trainer with --compile")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    k = args.k if RECIPES[args.penalty].fixed_count else 0
    gpu = device.type == "cuda"
    tokens = args.tokens or (50_000_000 if gpu else 1_000_000)
    naive_steps = args.naive_steps or (300 if gpu else 30)
    amp = autocast_dtype("auto", device)
    peak_dtype = amp or torch.float32
    n = 8192 if gpu else 2048
    name = torch.cuda.get_device_name(device) if gpu else runtime.cpu_description()
    print(f"device: {name}; torch {torch.__version__}; trainer precision: {peak_dtype}")

    peak = matmul_peak(device, peak_dtype, n)
    peak32 = matmul_peak(device, torch.float32, n) if peak_dtype != torch.float32 else peak
    limit = peak / (10 * args.d_in * args.d_sae)
    print(
        f"matmul peak {n}³: {peak / 1e9:.0f} GFLOP/s ({peak_dtype}), {peak32 / 1e9:.0f} GFLOP/s (float32) "
        f"-> limit {limit:,.0f} tok/s"
    )

    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "acts"
        n_cache = min(tokens, 2_000_000)
        write_cache(cache, args.d_in, n_cache)
        acts = ActivationCache.open(cache).load(("activations",))["activations"]  # [n, d_in] bf16, in memory
        runs = {"naive": [], "ours": [], "ours_fp32": [], "ours_dense": []}
        if args.compile:
            runs["ours_compiled"] = []
        for _ in range(args.repeats):
            runs["naive"].append(naive_tokens_per_s(acts, args.d_sae, args.batch, naive_steps, device, k))
            ours = partial(
                ours_tokens_per_s,
                cache,
                Path(tmp) / "sae",
                args.d_in,
                args.d_sae,
                args.batch,
                tokens,
                device,
                penalty=args.penalty,
                k=k,
            )
            runs["ours"].append(ours("auto", False))
            if amp is not None:
                runs["ours_fp32"].append(ours("float32", False))
            runs["ours_dense"].append(ours("auto", False, sparse=False))
            if args.compile:
                runs["ours_compiled"].append(ours("auto", True))
    best = {k: max(v) for k, v in runs.items() if v}
    print(
        f"{args.penalty}{f' k={k}' if k else ''}, d_in {args.d_in}, d_sae {args.d_sae}, batch "
        f"{args.batch}, trainer tokens {tokens:,}"
    )
    print(f"{'':14s} {'tok/s':>10s} {'/naive':>7s} {'/limit':>7s}")
    print(f"{'limit':14s} {limit:10,.0f}")
    for k, v in best.items():
        print(f"{k:14s} {v:10,.0f} {v / best['naive']:7.2f} {v / limit:7.2f}")


if __name__ == "__main__":
    main()
