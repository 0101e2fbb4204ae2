"""The SAE's activation at inference: which latents of a pre-activation are active.

    relu      f_j = pre_j where pre_j > 0                    (the L1 and KL recipes)
    topk      the k largest pre-activations of each token     (Gao et al. 2024)
    jumprelu  f_j = pre_j where pre_j > θ_j, a threshold per latent (Rajamanoharan et al. 2024;
              also what BatchTopK and Matryoshka SAEs become after training, with one θ)

One object per activation owns what varies with it: the nonlinearity (`activate`) and its sparse
form (`entries`), whether the SAE holds a learned threshold θ [d_sae] (`thresholded`: then θ is
saved, folded and exported with the weights), how it is shown to people (`label`) and how the
SAE's config spells it (`config_fields`). The SAE, the exporters and `info` ask the object; none
compares the activation's name. Names of foreign formats (SAELens's "architecture", circuit-tracer's
layer files) stay with their converters, in tables keyed on these types.

On disk the activation stays the string it always was: SAEConfig keeps the fields `activation`
("relu", "topk", "jumprelu") and `k`, and `SAEConfig.act` returns the object they spell. Why a
string field and a property rather than an object field: the config is the on-disk format's one
source of truth, written with `asdict` and read with `SAEConfig(**json)`; with plain fields that
stays an exact round trip, for every SAE already on disk and for every caller that writes
`SAEConfig(activation="topk", k=32)`. `parse` checks the string once, when the config is made,
and `act` parses it again on each use (a dict lookup), so a config changed afterwards never
holds a stale object.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar

import torch
from torch import Tensor, nn

from sae_lens_lite.errors import UserError


def gate(pre: Tensor, floor: Tensor | float) -> Tensor:
    """pre where it exceeds floor (0: a ReLU; θ: a JumpReLU), else 0."""
    return pre * (pre > floor)


def token_rows(n: int, m: int, device) -> Tensor:
    """[n·m] the token of each entry of a row-major [n, m] selection."""
    return torch.arange(n, device=device).unsqueeze(1).expand(n, m).reshape(-1)


@dataclass(frozen=True)
class Activation:
    """The interface; `sae` below is the SAE module (sae.SAE) whose pre-activations these are."""

    name: ClassVar[str]  # config.json's "activation"
    thresholded: ClassVar[bool] = False  # the SAE holds a learned threshold θ [d_sae] (SAE.threshold)

    @classmethod
    def from_fields(cls, k: int | None) -> Activation:
        """The activation of this type an SAEConfig's fields spell (k is topk's alone)."""
        return cls()

    def config_fields(self) -> dict:
        """The SAEConfig fields that spell this activation (config.json's activation, and k for topk)."""
        return {"activation": self.name, **{f.name: getattr(self, f.name) for f in fields(self)}}

    def _parts(self) -> list[str]:
        return [self.name, *(f"{f.name}={getattr(self, f.name)}" for f in fields(self))]

    @property
    def label(self) -> str:
        """As shown to people, in reports, tables and `info`: relu, jumprelu, topk k=K."""
        return " ".join(self._parts())

    def __str__(self) -> str:
        """As a module's repr shows it, keyword style: relu, topk, k=K."""
        return ", ".join(self._parts())

    def check(self, d_sae: int) -> None:
        """Raise UserError where this activation cannot apply to d_sae latents."""

    def floor(self, sae: nn.Module) -> Tensor | float:
        """What a pre-activation must exceed to be active: 0, or θ [d_sae]."""
        return 0.0

    def activate(self, sae: nn.Module, pre: Tensor) -> Tensor:
        """The latents f [n, d_sae] from the pre-activations pre [n, d_sae]."""
        raise NotImplementedError

    def entries(self, sae: nn.Module, pre: Tensor) -> tuple[Tensor, Tensor]:
        """The active latents of pre [n, d_sae] as entries (rows, idx) [nnz], in token order: the
        sparse form of activate()."""
        raise NotImplementedError


@dataclass(frozen=True)
class ReLU(Activation):
    name: ClassVar[str] = "relu"

    def activate(self, sae: nn.Module, pre: Tensor) -> Tensor:
        return gate(pre, self.floor(sae))

    def entries(self, sae: nn.Module, pre: Tensor) -> tuple[Tensor, Tensor]:
        rows, idx = (pre > self.floor(sae)).nonzero(as_tuple=True)  # pre is [n, d_sae]: two index tensors
        return rows, idx


@dataclass(frozen=True)
class JumpReLU(ReLU):
    """A ReLU whose floor is a learned threshold per latent."""

    name: ClassVar[str] = "jumprelu"
    thresholded: ClassVar[bool] = True

    def floor(self, sae: nn.Module) -> Tensor | float:
        return sae.threshold  # type: ignore[return-value]


@dataclass(frozen=True)
class TopK(Activation):
    k: int
    name: ClassVar[str] = "topk"

    @classmethod
    def from_fields(cls, k: int | None) -> Activation:
        return cls(k)  # type: ignore[arg-type]  # None is refused by check()

    def check(self, d_sae: int) -> None:
        if not (self.k and 0 < self.k <= d_sae):
            raise UserError(f"a topk SAE needs 0 < k <= d_sae = {d_sae:,}, got k={self.k}")

    def activate(self, sae: nn.Module, pre: Tensor) -> Tensor:
        vals, idx = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, idx, vals.relu())

    def entries(self, sae: nn.Module, pre: Tensor) -> tuple[Tensor, Tensor]:
        idx = pre.topk(self.k, dim=-1).indices  # [n, k]: fixed shapes, no host sync
        n, k = idx.shape
        return token_rows(n, k, pre.device), idx.reshape(-1)


ACTIVATIONS: dict[str, type[Activation]] = {a.name: a for a in (ReLU, TopK, JumpReLU)}  # config.json's spelling


def parse(name: str, k: int | None = None) -> Activation:
    """The activation an SAE config's fields spell (k only counts for topk); UserError if none."""
    if name not in ACTIVATIONS:
        raise UserError(f"unknown SAE activation {name!r}: use one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name].from_fields(k)
