"""L1 (Anthropic, April 2024 update): ReLU latents, loss ‖x − x̂‖² + λ Σ_i f_i ‖W_dec,i‖, inputs
scaled so that E‖x‖ = √d_in, λ warmed up over the first 5% of steps."""

from .base import Recipe


class L1(Recipe):
    name, term, resamples = "l1", "l1", True

    def coefficient(self):
        return self.cfg.l1

    def penalty(self, sae, lat):
        # Weighting by the decoder norm stops the penalty from being dodged by shrinking f and
        # growing W_dec. Each latent's activations are summed first (in fp32), then weighted: on the
        # dense path that is one pass over [n, d_sae] each way instead of a weighted copy of it.
        return {"l1": (lat.per_latent(lat.vals) * sae.W_dec.norm(dim=1)).sum() / lat.n}
