"""Training recipes: one module each, one line each in RECIPES.

A recipe owns what differs between methods (base.Recipe): how latents are chosen in training,
the sparsity term, its coefficient and schedule, the work at the end of a step (decoder
renormalisation, threshold estimates) and the inference activation the trained SAE keeps, which
also fixes the SAELens architecture it exports to. The loop (train.py), the dense and sparse
paths (loss.py), DDP, checkpoints and metrics know recipes only through that interface.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sae_lens_lite.errors import UserError
from sae_lens_lite.training.recipes.base import Recipe
from sae_lens_lite.training.recipes.batchtopk import BatchTopK
from sae_lens_lite.training.recipes.jumprelu import JumpReLU
from sae_lens_lite.training.recipes.kl import KL
from sae_lens_lite.training.recipes.l1 import L1
from sae_lens_lite.training.recipes.matryoshka import Matryoshka
from sae_lens_lite.training.recipes.topk import TopK

if TYPE_CHECKING:
    from sae_lens_lite.training.train_config import TrainConfig

RECIPES: dict[str, type[Recipe]] = {
    "l1": L1,
    "kl": KL,
    "topk": TopK,
    "batchtopk": BatchTopK,
    "jumprelu": JumpReLU,
    "matryoshka": Matryoshka,
}


def get(name: str, cfg: TrainConfig) -> Recipe:
    """The recipe called `name`, for a run with these settings."""
    if name not in RECIPES:
        raise UserError(f"unknown --penalty {name!r}: use one of {', '.join(RECIPES)}")
    return RECIPES[name](cfg)


__all__ = ["RECIPES", "Recipe", "get"]
