"""The recipe interface, with the defaults most recipes keep (a ReLU activation, no penalty,
nothing at the end of a step). A recipe is made from the run's TrainConfig."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.nn import functional as F

from sae_lens_lite.errors import UserError
from sae_lens_lite.training import activations
from sae_lens_lite.training.sae import SAE

if TYPE_CHECKING:
    from sae_lens_lite.training.latents import Latents
    from sae_lens_lite.training.train_config import TrainConfig


class Recipe:
    name = ""
    term = ""  # the loss term logged as the penalty; weighted by λ unless it is "aux"
    fixed_count = False  # a known number of active latents per batch: the sparse path always pays
    aux = False  # AuxK on dead latents (Gao et al. 2024)
    unit_decoder = False  # decoder rows renormalised to unit norm after every step
    resamples = False  # --resample-dead applies
    # activate() is the base ReLU and mask() None: the dense path then applies the ReLU inside the
    # encoder's node, in the product's own output, and keeps no pre-activations (Latents.pre None)
    plain_relu = False
    # L0 follows λ only with a long lag, so --target-l0's integral term pauses while L0 is on course
    # for the target (train.steer_lambda; else λ winds up while L0 catches up, by orders of magnitude)
    l0_lags = False
    # Initial decoder row norm (W_enc = W_dec.T at the start). 1, not Anthropic's 0.1: every penalty
    # here is blind to the decoder's scale, so the encoder must grow by 1/dec_norm to reach it, and
    # at Adam's ~lr per step a short run never got there (0.1: L1 MCC 0.69 and 192 of 512 latents
    # dead in bench_quality's hard regime; 1: 0.996, 13 dead).
    dec_norm = 1.0

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    def coefficient(self) -> float | None:
        """The base coefficient λ of the penalty (None: none), which λ warm-up and --target-l0 act on."""
        return None

    def check(self) -> None:
        """Raise UserError for settings the recipe cannot honour."""
        if self.cfg.target_l0 and self.coefficient() is None:
            raise UserError(f"--target-l0 adapts a penalty coefficient; {self.name} has none, set the L0 with --k")

    def sae_activation(self) -> activations.Activation:
        """The trained SAE's inference activation, which also fixes the format it exports to."""
        return activations.ReLU()

    def sae_options(self) -> dict:
        """SAEConfig fields of the trained SAE (activation, k)."""
        return self.sae_activation().config_fields()

    @torch.no_grad()
    def init(self, sae: SAE) -> None:
        """Recipe-specific initial state (thresholds), after the weights are initialised."""

    # ---- choosing the latents (training) -----------------------------------------------------

    def entry_floor(self, sae: SAE) -> Tensor | float:
        """Pre-activations above this enter the computation (and the sparse path's density probe)."""
        return 0.0

    def mask(self, sae: SAE, pre: Tensor) -> Tensor | None:
        """Which latents of pre [n, d_sae] enter the computation in training (dense path): bool
        [n, d_sae], or None where activate() alone zeroes the rest (a ReLU, a JumpReLU: a mask
        would only cost passes over [n, d_sae])."""
        return None

    def entries(self, sae: SAE, pre: Tensor) -> tuple[Tensor, Tensor]:
        """The latents above entry_floor as entries (rows, idx) [nnz] in token order (sparse path)."""
        rows, idx = (pre > self.entry_floor(sae)).nonzero(as_tuple=True)  # pre is [n, d_sae]: two index tensors
        return rows, idx

    def activate(self, sae: SAE, pre: Tensor, idx: Tensor | None) -> Tensor:
        """The activation of what entered: pre [nnz] at latents idx, or dense [n, d_sae] (idx None).
        A ReLU that writes +0 below 0 (relu keeps a −0.0), so that latents.count_positive can count
        the activations' nonzero bits without first clamping away negative zeros."""
        return F.threshold(pre, 0.0, 0.0)

    # ---- the loss ----------------------------------------------------------------------------

    def mse(self, sae: SAE, lat: Latents, err: Tensor) -> Tensor:
        """The reconstruction term from err = (x − x̂)·s [n, d_in]: ‖x − x̂‖² per token, averaged."""
        return err.pow(2).sum(-1).mean()

    def penalty(self, sae: SAE, lat: Latents) -> dict[str, Tensor]:
        """The sparsity term, named `term`; also "l0" (no gradient) where the term counts it anyway,
        "fired" [d_sae] bool where it sums each latent's activations anyway."""
        return {}

    def decode(self, sae: SAE, lat: Latents) -> tuple[Tensor, dict[str, Tensor]]:
        """(x̂·s − b_dec [n, d_in], the penalty's terms): a recipe may compute both in one go."""
        return lat.decode(sae.W_dec), self.penalty(sae, lat)

    @torch.no_grad()
    def step_end(self, sae: SAE, step: int) -> None:
        """After optimizer step `step` (0 first): renormalise the decoder, update estimates."""
        if self.unit_decoder:
            sae.W_dec.div_(sae.W_dec.norm(dim=1, keepdim=True))
