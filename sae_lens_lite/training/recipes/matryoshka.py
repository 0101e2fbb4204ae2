"""Matryoshka BatchTopK (Bussmann et al. 2025; Nabeshima 2024): BatchTopK in which each nested
prefix of the dictionary, the first d_sae/16, d_sae/8, ..., d_sae latents, must reconstruct the
input by itself. The early latents then learn general features and the later ones refine them,
instead of the later ones absorbing parts of the earlier ones (feature absorption)."""

import torch

from sae_lens_lite.training.recipes.batchtopk import BatchTopK

LEVELS = 5  # prefixes d_sae / 2^j for j = 4 .. 0


def prefixes(d_sae: int) -> list[int]:
    """The nested prefix sizes, smallest first, ending at d_sae."""
    return sorted({max(1, d_sae >> j) for j in range(LEVELS)})


class Matryoshka(BatchTopK):
    name = "matryoshka"

    def mse(self, sae, lat, err):
        # The mean over prefixes m of ‖x − x̂_m‖². Dropping latents ≥ m from x̂ adds their part to the
        # error: the bands between consecutive prefixes are decoded once each and added from the top.
        sizes = prefixes(sae.d_sae)
        terms = [err]
        for lo, hi in reversed(list(zip(sizes[:-1], sizes[1:]))):
            terms.append(terms[-1] + lat.decode_band(sae.W_dec, lo, hi).float())
        return torch.stack([e.pow(2).sum(-1).mean() for e in terms]).mean()
