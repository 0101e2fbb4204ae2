"""Check that training is bit-identical across a refactor: train small SAEs on synthetic data
(every recipe, the sparse and bf16 paths, --target-l0, resampling, a transcoder, a run resumed
from a checkpoint, and `train` on an on-disk cache) and print the sha256 of each run's
sae.safetensors, of its metrics.jsonl (the timing field dropped) and of its checkpoints.

    # on the code before the change (a checkout of the old commit first on the path)
    PYTHONPATH=/tmp/old .venv/bin/python scripts/check_train_identity.py --write before.json
    # on the code after it
    .venv/bin/python scripts/check_train_identity.py --compare before.json

--compare exits 1 if any hash differs. Hashes depend on the CPU and the torch build, so compare
only runs made on the same machine with the same environment; nothing here is stored in the repo.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch

import sae_lens_lite
from sae_lens_lite.data.cache import CacheWriter
from sae_lens_lite.training import recipes
from sae_lens_lite.training.sae import SAEConfig
from sae_lens_lite.training.synthetic import make_superposition
from sae_lens_lite.training.train import train, train_on_batches
from sae_lens_lite.training.train_config import TrainConfig

BATCH = 256
STEPS = 60
BASE = dict(batch_size=BATCH, checkpoint_every=10 * BATCH, dead_window=5 * BATCH, log_every=7, precision="float32")
# name: (d_in, d_sae, TrainConfig fields beyond BASE, transcoder d_out)
CASES = {
    "l1": (16, 64, dict(penalty="l1"), None),
    "l1_sparse_target_resample": (32, 1024, dict(penalty="l1", target_l0=3.0, resample_dead=True), None),
    "kl": (16, 64, dict(penalty="kl"), None),
    "kl_target": (16, 64, dict(penalty="kl", target_l0=4.0, sparse=False), None),
    "topk": (16, 64, dict(penalty="topk", k=3), None),
    "topk_dense": (16, 64, dict(penalty="topk", k=3, sparse=False), None),
    "batchtopk": (16, 64, dict(penalty="batchtopk", k=3), None),
    "jumprelu": (16, 64, dict(penalty="jumprelu"), None),
    "jumprelu_target": (16, 64, dict(penalty="jumprelu", target_l0=3.0), None),
    "matryoshka": (16, 64, dict(penalty="matryoshka", k=3), None),
    "l1_bf16": (16, 64, dict(penalty="l1", precision="bfloat16"), None),
    "topk_bf16": (16, 64, dict(penalty="topk", k=3, precision="bfloat16"), None),
    "transcoder_skip": (16, 64, dict(penalty="l1", transcoder=True, skip=True), 8),
}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def json_sha(path: Path) -> str:
    """sha256 of a JSON file without its timing fields (tokens_per_s, at any depth)."""

    def drop(v):
        if isinstance(v, dict):
            return {k: drop(x) for k, x in v.items() if k != "tokens_per_s"}
        return [drop(x) for x in v] if isinstance(v, list) else v

    return hashlib.sha256(json.dumps(drop(json.loads(path.read_text())), sort_keys=True).encode()).hexdigest()


def metrics_sha(path: Path) -> str:
    lines = [{k: v for k, v in json.loads(ln).items() if k != "tokens_per_s"} for ln in path.read_text().splitlines()]
    return hashlib.sha256(json.dumps(lines, sort_keys=True).encode()).hexdigest()


def run_case(name: str, d_in: int, d_sae: int, extra: dict, d_out: int | None, out: Path) -> dict:
    cfg = TrainConfig(**{**BASE, **extra})
    data = make_superposition(n_features=4 * (d_in + (d_out or 0)), d=d_in + (d_out or 0), true_l0=2.0, seed=0)
    factory = data.batches(BATCH, 16 * BATCH, seed=1)
    options = recipes.get(cfg.penalty, cfg).sae_options()
    sae_cfg = SAEConfig(d_in=d_in, d_sae=d_sae, **options, d_out=d_out, skip=cfg.skip)
    train_on_batches(sae_cfg, cfg, factory, STEPS * BATCH, out=out, progress=False)
    return {
        "weights": sha(out / "sae.safetensors"),
        "metrics": metrics_sha(out / "metrics.jsonl"),
        "checkpoint_json": json_sha(out / "checkpoint.json"),  # the final one: complete, and where the data stood
    }


class Interrupted(Exception):
    pass


def run_resumed(penalty: str, extra: dict, out: Path) -> dict:
    """Killed after 16 init batches and 37 steps (the checkpoint is at step 30), then resumed."""
    cfg = TrainConfig(**BASE, penalty=penalty, **extra)
    data = make_superposition(n_features=64, d=16, true_l0=2.0, seed=0)
    factory = data.batches(BATCH, 16 * BATCH, seed=1)
    sae_cfg = SAEConfig(d_in=16, d_sae=64, **recipes.get(penalty, cfg).sae_options())
    count = [0]

    def interrupting(epoch):
        for x in factory(epoch):
            if count[0] == 16 + 37:
                raise Interrupted
            count[0] += 1
            yield x

    try:
        train_on_batches(sae_cfg, cfg, interrupting, STEPS * BATCH, out=out, progress=False)
    except Interrupted:
        pass
    ckpt = json.loads((out / "checkpoint.json").read_text())
    assert ckpt["step"] == 30, ckpt["step"]
    mid = {"checkpoint": sha(out / ckpt["file"])}
    train_on_batches(sae_cfg, cfg, factory, STEPS * BATCH, out=out, progress=False)
    return {**mid, "weights": sha(out / "sae.safetensors"), "metrics": metrics_sha(out / "metrics.jsonl")}


def run_cache(out: Path) -> dict:
    """The `sae-lite train` entry point on an on-disk cache."""
    data = make_superposition(n_features=48, d=16, true_l0=2.0, seed=0)
    acts = data.sample(4096, torch.Generator().manual_seed(0))
    meta = {"model": "toy", "hook": "blocks.0.hook_resid_post", "dtype": "float32", "context_length": 32}
    w = CacheWriter(out / "acts", meta, 16)
    for i in range(0, 4096, 1024):
        rows = torch.arange(i, i + 1024)
        w.add_shard(acts[i : i + 1024], rows % 100, rows // 32, rows % 32, n_contexts=32)
    w.finish()
    cfg = TrainConfig(
        acts=str(out / "acts"), out=str(out / "sae"), expansion=4, tokens=20_000, batch_size=512, log_every=5
    )
    train(cfg)
    return {"weights": sha(out / "sae" / "sae.safetensors"), "metrics": metrics_sha(out / "sae" / "metrics.jsonl")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", help="write the hashes to this JSON file")
    ap.add_argument("--compare", help="compare with the hashes in this JSON file; exit 1 on any difference")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"sae_lens_lite from {Path(sae_lens_lite.__file__).parent}", file=sys.stderr)
    got: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (d_in, d_sae, extra, d_out) in CASES.items():
            got[name] = run_case(name, d_in, d_sae, extra, d_out, Path(tmp) / name)
            print(name, got[name]["weights"][:16], file=sys.stderr)
        for penalty, extra in (("l1", dict(resample_dead=True, target_l0=3.0)), ("jumprelu", dict(target_l0=3.0))):
            name = f"resume_{penalty}"
            got[name] = run_resumed(penalty, extra, Path(tmp) / name)
            print(name, got[name]["weights"][:16], file=sys.stderr)
        for penalty in ("topk", "batchtopk", "matryoshka"):
            name = f"resume_{penalty}"
            got[name] = run_resumed(penalty, dict(k=3), Path(tmp) / name)
            print(name, got[name]["weights"][:16], file=sys.stderr)
        got["train_from_cache"] = run_cache(Path(tmp) / "cache")
    if args.write:
        Path(args.write).write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    if args.compare:
        want = json.loads(Path(args.compare).read_text())
        bad = [
            f"{case}.{k}"
            for case in sorted(set(want) | set(got))
            for k in ("weights", "metrics", "checkpoint", "checkpoint_json")
            if (want.get(case) or {}).get(k) != (got.get(case) or {}).get(k)
        ]
        for b in bad:
            print(f"DIFFERS: {b}")
        print(f"{len(got)} runs compared: {'all identical' if not bad else f'{len(bad)} differences'}")
        return 1 if bad else 0
    print(json.dumps(got, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
