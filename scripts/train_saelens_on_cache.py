"""Train an SAE with SAELens's own trainer (SAETrainer, sae-lens 6.x) on one of our activation caches.

Used for docs/metrics.md: an SAE trained by another project's code on the same cache as ours, then
imported (`sae-lite import`) and scored next to ours with `sae-lite compare`. SAELens trains from any
iterator of activation batches; ours feeds it the cache's shuffled batches, epoch after epoch.

    .venv/bin/python scripts/train_saelens_on_cache.py --acts runs/acts --k 48 --expansion 8 \
        --tokens 400000 --out runs/saelens_topk48
    .venv/bin/sae-lite import --src runs/saelens_topk48 --out runs/sae_saelens --model smollm2-135m
"""

from __future__ import annotations

import argparse
import itertools

import torch

from sae_lens_lite.data.cache import ActivationCache


def batches(cache: ActivationCache, batch_size: int):
    """Shuffled [batch_size, d_model] batches, a new order each pass; short tail batches dropped."""
    for epoch in itertools.count():
        for x in cache.iter_batches(batch_size, seed=epoch):
            if len(x) == batch_size:
                yield x


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--acts", required=True, help="our activation cache")
    p.add_argument("--out", required=True, help="SAELens directory to write (cfg.json, sae_weights.safetensors)")
    p.add_argument("--k", type=int, default=48, help="latents kept per token (SAELens TopK)")
    p.add_argument("--expansion", type=int, default=8, help="d_sae = expansion x d_in")
    p.add_argument("--tokens", type=int, default=400_000, help="training tokens")
    p.add_argument("--batch-size", type=int, default=1024, help="tokens per step")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (SAELens's constant schedule)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(args.seed)
    cache = ActivationCache.open(args.acts)
    m = cache.manifest
    d_in = cache.d_model
    sae_cfg = TopKTrainingSAEConfig(
        d_in=d_in,
        d_sae=args.expansion * d_in,
        k=args.k,
        dtype="float32",
        device="cpu",
        # SAELens's recipe: scale inputs to E||x|| = sqrt(d_in) while training, folded into the weights at the end
        normalize_activations="expected_average_only_in",
        metadata=SAEMetadata(
            model_name=m["model"],
            hook_name=m["hook"],
            context_size=m["context_length"],
            dataset_path=m.get("corpus"),
            exclude_special_tokens=m["filters"]["drop_special"],
            prepend_bos=False,
        ),
    )
    trainer_cfg = SAETrainerConfig(
        total_training_samples=args.tokens,
        train_batch_size_samples=args.batch_size,
        lr=args.lr,
        lr_end=args.lr / 10,
        device="cpu",
        lr_warm_up_steps=max(1, args.tokens // args.batch_size // 100),
        n_batches_for_norm_estimate=20,
    )
    sae = SAETrainer(trainer_cfg, TopKTrainingSAE(sae_cfg), batches(cache, args.batch_size)).fit()
    sae.save_inference_model(args.out)  # the inference SAE's cfg.json, which SAE.load_from_disk and our import read
    print(f"SAELens TopK k={args.k} on {args.tokens} tokens of {args.acts}: {args.out}")


if __name__ == "__main__":
    main()
