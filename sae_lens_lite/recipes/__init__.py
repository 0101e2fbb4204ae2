"""Training recipes: one module each, one line each in RECIPES.

A recipe owns what differs between methods (base.Recipe): how latents are chosen in training,
the sparsity term, its coefficient and schedule, the work at the end of a step (decoder
renormalisation, threshold estimates) and the inference activation the trained SAE keeps, which
also fixes the SAELens architecture it exports to. The loop (train.py), the dense and sparse
paths (loss.py), DDP, checkpoints and metrics know recipes only through that interface.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import UserError
from .base import Recipe
from .batchtopk import BatchTopK
from .jumprelu import JumpReLU
from .kl import KL
from .l1 import L1
from .matryoshka import Matryoshka
from .topk import TopK

if TYPE_CHECKING:
    from ..train_config import TrainConfig

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
