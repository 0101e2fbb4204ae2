"""TopK (Gao et al. 2024): keep each token's k largest pre-activations, unit-norm decoder rows,
and the AuxK loss, in which dead latents learn to reconstruct what the live ones missed."""

import torch

from sae_lens_lite.training import activations
from sae_lens_lite.training.recipes.base import Recipe


class TopK(Recipe):
    name, term = "topk", "aux"
    fixed_count = aux = unit_decoder = True

    def sae_activation(self):
        return activations.TopK(self.cfg.k)

    def mask(self, sae, pre):
        return torch.zeros_like(pre, dtype=torch.bool).scatter_(-1, pre.topk(self.cfg.k, dim=-1).indices, True)

    def entries(self, sae, pre):
        return sae.entries(pre)  # straight from topk: fixed shapes, no host sync
