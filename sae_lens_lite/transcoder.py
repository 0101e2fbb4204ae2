"""The transcoder: a sparse replacement of an MLP, which reads one hook and predicts another.

An SAE reconstructs its own input; a transcoder encodes the MLP's input x and decodes the MLP's
output y (Dunefsky et al. 2024), optionally with a linear skip path from x to y (Paulo et al.
2025, "Transcoders beat sparse autoencoders"):

    f     = act((x * s_in) @ W_enc + b_enc)                            # latents [n, d_sae]
    y_hat = (f @ W_dec + b_dec + (x * s_in) @ W_skip) / s_out          # prediction [n, d_out]

    W_enc [d_in, d_sae]   b_enc [d_sae]   W_dec [d_sae, d_out]   b_dec [d_out]   W_skip [d_in, d_out]

Each side has its own scale (s_in: E‖x s_in‖ = √d_in, s_out: E‖y s_out‖ = √d_out), and the
input is not centred by b_dec, which lives in the output space (SAELens and circuit-tracer
transcoders do the same). Everything else (recipes, the dense and sparse paths, checkpoints,
DDP) is the SAE's: the loop asks the module to split a batch into input and target and to add
the skip path, and an SAE answers with its input twice and nothing to add.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .sae import SAE, SAEConfig, SAEOutput


class Transcoder(SAE):
    def __init__(self, cfg: SAEConfig):
        assert cfg.d_out is not None, "a transcoder's config names d_out"
        super().__init__(cfg)

    def _make_parameters(self) -> None:
        d_in, d_sae, d_out = self.cfg.d_in, self.cfg.d_sae, self.cfg.d_out
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_out))
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        if self.cfg.skip:
            self.W_skip = nn.Parameter(torch.zeros(d_in, d_out))  # starts at 0: the latents learn first
        self.register_buffer("output_scale", torch.ones(()))
        # The encoder subtracts nothing: b_dec is an output-space bias (see b_center).
        self.register_buffer("_no_center", torch.zeros(d_in), persistent=False)

    @torch.no_grad()
    def reset_parameters(self, dec_norm: float = 1.0, generator: torch.Generator | None = None):
        # Input and output are different spaces, so the encoder cannot start as the decoder's
        # transpose: both start as random directions at the recipe's norm.
        W_dec = torch.randn(self.cfg.d_sae, self.cfg.d_out, generator=generator)
        W_enc = torch.randn(self.cfg.d_in, self.cfg.d_sae, generator=generator)
        self.W_dec.copy_(W_dec / W_dec.norm(dim=1, keepdim=True) * dec_norm)
        self.W_enc.copy_(W_enc / W_enc.norm(dim=0, keepdim=True) * dec_norm)
        self.b_enc.zero_()
        self.b_dec.zero_()
        if self.cfg.skip:
            self.W_skip.zero_()

    @property
    def b_center(self) -> Tensor:
        return self._no_center

    @property
    def target_scale(self) -> Tensor:
        return self.output_scale

    @property
    def d_out(self) -> int:
        return int(self.cfg.d_out)

    def split(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """A pair cache's rows [n, d_in + d_out] as (input [n, d_in], target [n, d_out])."""
        return rows[:, : self.d_in], rows[:, self.d_in :]

    def add_skip(self, recon: Tensor, x: Tensor) -> Tensor:
        """recon [n, d_out] (normalised units) plus the skip path of the raw input x [n, d_in]."""
        if not self.cfg.skip:
            return recon
        return recon + (x.to(self.W_skip.dtype) * self.input_scale) @ self.W_skip

    @torch.no_grad()
    def init_biases(self, x: Tensor, y: Tensor) -> None:
        """b_dec at the target's scaled mean, and b_enc so that each latent starts centred on the
        input's mean ((x − x̄)·s_in @ W_enc), as the SAE's b_dec centring would make it."""
        self.b_dec.copy_(y.mean(0) * self.output_scale)
        self.b_enc.copy_(-(x.mean(0) * self.input_scale) @ self.W_enc)

    def decode(self, f: Tensor) -> Tensor:
        return torch.addmm(self.b_dec, f, self.W_dec) / self.output_scale  # [n, d_out], without the skip path

    def forward(self, x: Tensor, fn=None) -> SAEOutput:
        if fn is not None:
            return fn(self, x)
        pre = self.pre_activation(x)
        f = self.activate(pre)
        y_hat = self.add_skip(torch.addmm(self.b_dec, f, self.W_dec), x) / self.output_scale
        return SAEOutput(y_hat, f, pre)

    @torch.no_grad()
    def folded(self) -> "Transcoder":
        """The same function with both scales folded into the weights (s_in = s_out = 1)."""
        s_in, s_out = float(self.input_scale), float(self.output_scale)
        out = Transcoder(self.cfg)
        out.W_enc.copy_(self.W_enc * s_in)
        out.b_enc.copy_(self.b_enc)
        out.W_dec.copy_(self.W_dec / s_out)
        out.b_dec.copy_(self.b_dec / s_out)
        if self.cfg.skip:
            out.W_skip.copy_(self.W_skip * (s_in / s_out))
        if self.cfg.activation == "jumprelu":
            out.threshold.copy_(self.threshold)
        return out.to(self.W_enc.device)
