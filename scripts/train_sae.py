"""Train an SAE on one layer of a model: copy this file and edit the settings below.

    python scripts/train_sae.py

Harvests an activation cache for the layer if there is none yet, then trains on it. Both steps
resume if interrupted: run the script again. Takes no options: the settings are in the file.
"""

import argparse
from pathlib import Path

from sae_lens_lite.data.harvest import HarvestConfig, harvest
from sae_lens_lite.training.sae import SAE
from sae_lens_lite.training.train import TrainConfig, train

MODEL = "smollm2-135m"
HOOK = "blocks.6.hook_resid_post"
CORPUS = "pydoc"  # or a .txt file, a .jsonl / .json / .parquet / .csv file with a "text" column, a directory
TOKENS = 96_000  # pydoc holds about 113k tokens: this leaves the rest held out for `sae-lite evaluate`
RUN = Path("runs") / MODEL / HOOK
ACTS = RUN / "acts"
OUT = RUN / "sae-l1"

argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()

# 1. Activations: run the model over the corpus once and keep what the hook saw. Run again, a
#    finished harvest with the same settings is left as it is ("complete, nothing to do").
harvest(HarvestConfig(model=MODEL, hooks=[HOOK], dataset=CORPUS, tokens=TOKENS, out=str(ACTS)))

# 2. The SAE. penalty="topk" with k=32, or "kl", are the alternatives; target_l0 adapts λ.
cfg = TrainConfig(
    acts=str(ACTS),
    out=str(OUT),
    expansion=8,
    penalty="l1",
    l1=1.0,
    target_l0=40,
    tokens=4_000_000,
)
sae = train(cfg)

# 3. What came out: the SAE directory holds sae.safetensors, config.json and metrics.jsonl.
#    final_eval is the saved SAE measured on a sample of its cache (metrics.jsonl holds the
#    trainer's running figures, averaged over each log interval while the weights still moved).
m = sae.cfg.meta["final_eval"]
print(
    f"{OUT}: d_sae {sae.d_sae}, L0 {m['l0']:.1f}, explained variance {m['explained_variance']:.3f}, "
    f"dead {m['dead_frac']:.1%} (no firing on {m['n_tokens']:,} cache rows)"
)
same = SAE.load(OUT)  # how any later stage opens it
print(same)  # SAE(d_in=576, d_sae=4608, relu, hook=..., model=..., input_scale=...)
