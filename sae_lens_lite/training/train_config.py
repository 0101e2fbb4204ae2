"""TrainConfig: every setting of a training run, with its help text (the CLI's flags and the run
file's [train] table are generated from it). Apart from the loop (train.py), so that the recipes
and the loss, which read it, need not import the loop that imports them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sae_lens_lite.config import check_numbers
from sae_lens_lite.errors import UserError

PRECISIONS = ("auto", "float32", "bfloat16")


@dataclass
class TrainConfig:
    acts: str = field(default="runs/acts", metadata={"help": "activation cache directory (from `sae-lite harvest`)"})
    out: str = field(default="runs/sae", metadata={"help": "output directory: the SAE, metrics.jsonl and checkpoints"})
    expansion: int = field(default=8, metadata={"help": "d_sae = expansion × d_in"})
    penalty: str = field(
        default="l1",
        metadata={
            "help": (
                "training recipe: l1 (Anthropic 2024), kl (target firing rate), topk (Gao 2024), "
                "batchtopk (Bussmann 2024), jumprelu (Rajamanoharan 2024) or matryoshka (Matryoshka "
                "BatchTopK, Bussmann 2025)"
            )
        },
    )
    # 1, not Anthropic's 5: on SmolLM2-135M layer 6 (8x, 2M tokens of the default 80k-token pydoc
    # cache) λ = 1, 2, 3, 5 gave L0 29.8, 10.8, 6.4, 3.7 and 0%, 2%, 19%, 67% dead latents.
    l1: float = field(default=1.0, metadata={"help": "λ of the L1 penalty (or its start with --target-l0)"})
    kl_beta: float = field(default=1.0, metadata={"help": "β of the KL penalty"})
    kl_rho: float = field(default=0.005, metadata={"help": "target firing rate ρ of every latent for the KL penalty"})
    l0_coef: float = field(default=1.0, metadata={"help": "λ of jumprelu's L0 penalty"})
    k: int = field(
        default=32,
        metadata={"help": "latents kept per token for topk (on average over the batch for batchtopk and matryoshka)"},
    )
    sparse: bool = field(
        default=True,
        metadata={
            "help": (
                "decoder and encoder backward on the active latents only (gathers and a sparse "
                "product, not dense matmuls): topk everywhere, l1/kl on the CPU once at most 5% of "
                "latents fire (less below d_in 256); --no-sparse for the dense path"
            )
        },
    )
    target_l0: float = field(
        default=0.0,
        metadata={
            "help": (
                "adapt λ (or β) during training until L0 settles here (0: off; l1, kl, jumprelu); λ then starts "
                "at 1% of --l1 (--kl-beta, --l0-coef) and rises as L0 follows, instead of the warm-up"
            )
        },
    )
    lr: float = field(
        default=1e-3,
        metadata={"help": "Adam learning rate (warm-up over the first 1% of steps, linear decay over the last 20%)"},
    )
    batch_size: int = field(default=4096, metadata={"help": "tokens per step"})
    tokens: int = field(
        default=0,
        metadata={"help": "training tokens (0: the cache size, at least 2M, i.e. several passes over a small cache)"},
    )
    seed: int = field(default=0, metadata={"help": "initialisation and data order"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:1, ..."})
    precision: str = field(
        default="auto",
        metadata={
            "help": "matmul precision: auto (bf16 where the hardware has it), float32 or bfloat16; weights stay fp32"
        },
    )
    compile: bool = field(
        default=False, metadata={"help": "torch.compile the loss (faster on long GPU runs, slow to start)"}
    )
    dead_window: int = field(
        default=1_000_000, metadata={"help": "a latent that has not fired for this many tokens counts as dead"}
    )
    resample_dead: bool = field(
        default=False,
        metadata={"help": "l1/kl: every dead_window tokens, point dead latents at badly reconstructed inputs"},
    )
    checkpoint_every: int = field(
        default=5_000_000, metadata={"help": "write a resumable checkpoint every this many tokens"}
    )
    log_every: int = field(default=50, metadata={"help": "steps between metric reads (metrics.jsonl, progress bar)"})
    wandb: str = field(
        default="", metadata={"help": "also log to this Weights & Biases project (needs `pip install wandb`)"}
    )
    overwrite: bool = field(default=False, metadata={"help": "replace an earlier run in --out instead of resuming it"})
    transcoder: bool = field(
        default=False,
        metadata={
            "help": "train a transcoder: encode the pair cache's input hook, predict its target hook "
            "(harvest --mlp-pairs); every recipe applies"
        },
    )
    skip: bool = field(
        default=False,
        metadata={"help": "with --transcoder: add a linear skip path W_skip [d_in, d_out] (off by default)"},
    )

    def __post_init__(self):
        check_numbers(
            self,
            expansion="positive",
            l1="non-negative",
            kl_beta="non-negative",
            kl_rho="fraction",
            k="positive",
            l0_coef="non-negative",
            target_l0="non-negative",
            lr="positive",
            batch_size="positive",
            tokens="non-negative",
            dead_window="positive",
            checkpoint_every="positive",
            log_every="positive",
        )
        if self.precision not in PRECISIONS:  # here, not at the first step: a refused run leaves no --out behind
            raise UserError(f"unknown --precision {self.precision!r}: use {', '.join(PRECISIONS)}")
        if self.skip and not self.transcoder:
            raise UserError("--skip adds a transcoder's skip path; pass --transcoder too")
        if self.resample_dead and self.transcoder:
            raise UserError(
                "--resample-dead points latents at badly reconstructed inputs, which a transcoder does not "
                "reconstruct; leave it off (AuxK recipes revive dead latents instead)"
            )
