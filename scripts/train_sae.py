"""Train an SAE on one layer of a model: copy this file and edit the settings below.

    python scripts/train_sae.py

Harvests an activation cache for the layer if there is none yet, then trains on it. Both steps
resume if interrupted: run the script again.
"""

from pathlib import Path

from sae_lens_lite.harvest import HarvestConfig, harvest
from sae_lens_lite.sae import SAE
from sae_lens_lite.train import TrainConfig, train

MODEL = "smollm2-135m"
HOOK = "blocks.6.hook_resid_post"
CORPUS = "pydoc"  # or a .txt / .jsonl / .parquet file
RUN = Path("runs") / MODEL / HOOK
ACTS = RUN / "acts"
OUT = RUN / "sae-l1"

# 1. Activations: run the model over the corpus once and keep what the hook saw.
if not (ACTS / "manifest.json").exists() or '"complete": true' not in (ACTS / "manifest.json").read_text():
    harvest(HarvestConfig(model=MODEL, hooks=[HOOK], dataset=CORPUS, tokens=500_000, out=str(ACTS)))

# 2. The SAE. penalty="topk" with k=32, or "kl", are the alternatives; target_l0 adapts λ.
cfg = TrainConfig(
    acts=str(ACTS),
    out=str(OUT),
    expansion=8,
    penalty="l1",
    l1=5.0,
    target_l0=40,
    tokens=4_000_000,
)
sae = train(cfg)

# 3. What came out: the SAE directory holds sae.safetensors, config.json and metrics.jsonl.
m = sae.cfg.meta["final_metrics"]
print(f"{OUT}: d_sae {sae.d_sae}, L0 {m['l0']:.1f}, explained variance {m['explained_variance']:.3f}, dead {m['dead_frac']:.1%}")
same = SAE.load(OUT)  # how any later stage opens it
