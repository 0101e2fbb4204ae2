"""The sparse autoencoder: encode, decode, forward, and its on-disk format.

One SAE class covers every architecture we train, because at inference they differ only in
the activation, i.e. in which latents are active: relu, topk or jumprelu, one object each
(activations.py), which the SAE asks (`cfg.act`).

How a latent is chosen *during training* (a batch-wide top-k, a straight-through threshold) is
the business of the training recipe (recipes/). Weights are plain parameters in the orientation
used everywhere in this project and in SAELens:

    W_enc [d_in, d_sae]   b_enc [d_sae]   W_dec [d_sae, d_in]   b_dec [d_in]

    f     = act((x * s - b_dec) @ W_enc + b_enc)      # latents [n, d_sae]
    x_hat = (f @ W_dec + b_dec) / s                    # reconstruction [n, d_in]

`s` is the input scale (Anthropic, April 2024 update: scale inputs so E||x|| = sqrt(d_in), which
makes one L1 coefficient work across layers and models). It is a buffer, not a parameter, and
`folded()` returns the equivalent SAE with s = 1 for export.

On disk an SAE is a directory: `sae.safetensors` (the four weights plus `input_scale`) and
`config.json` (an `SAEConfig`). A config with `d_out` describes a transcoder (Transcoder, below),
which `SAE.build` and `SAE.load` return in its place.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from sae_lens_lite.errors import UserError
from sae_lens_lite.fsutil import save_safetensors_atomic, write_json_atomic
from sae_lens_lite.training.activations import Activation, parse

WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "config.json"


@dataclass
class SAEConfig:
    d_in: int
    d_sae: int
    # The activation as config.json spells it: "relu", "topk" or "jumprelu"; `act` is the object
    # (activations.py says why the field stays a string).
    activation: str = "relu"
    k: int | None = None  # only for topk
    # Provenance, copied from the activation cache so that evaluate/analyze/export need no flags.
    model: str | None = None
    hook: str | None = None
    context_length: int | None = None
    dtype: str = "float32"
    meta: dict = field(default_factory=dict)
    # A transcoder (Transcoder, below): reads `hook`, predicts `target_hook` ([d_out]); `skip` adds
    # the linear skip path W_skip [d_in, d_out].
    d_out: int | None = None
    target_hook: str | None = None
    skip: bool = False

    def __post_init__(self):
        if self.d_in <= 0 or self.d_sae <= 0:
            raise UserError(f"SAE sizes must be positive, got d_in={self.d_in}, d_sae={self.d_sae}")
        self.act.check(self.d_sae)  # an unknown name is refused by parse
        if self.d_out is not None and self.d_out <= 0:
            raise UserError(f"a transcoder's d_out must be positive, got {self.d_out}")
        if self.skip and self.d_out is None:
            raise UserError("a skip path belongs to a transcoder: set d_out (train with --transcoder)")

    @property
    def act(self) -> Activation:
        """The activation the fields `activation` and `k` spell."""
        return parse(self.activation, self.k)

    @property
    def architecture(self) -> str:
        """The activation the SAE applies at inference, as shown to people: relu, jumprelu, topk k=K."""
        return self.act.label

    def provenance(self) -> dict:
        """Where the weights come from, for reports and tables: source (trained here, imported
        (<format>) or unknown), recipe (train's --penalty, None if not trained here: BatchTopK and
        Matryoshka infer with jumprelu thresholds, so the architecture alone does not say) and
        architecture (the inference activation)."""
        origin = self.meta.get("imported_from") or {}
        recipe = (self.meta.get("train_config") or {}).get("penalty")
        source = f"imported ({origin.get('format')})" if origin else "trained here" if recipe else "unknown"
        return {"source": source, "recipe": recipe, "architecture": self.architecture}


class SAEOutput(NamedTuple):
    x_hat: Tensor  # [n, d_in] reconstruction, in the input's units
    latents: Tensor  # [n, d_sae] feature activations f
    pre_acts: Tensor  # [n, d_sae] before the activation (the TopK aux loss needs them)


class SAE(nn.Module):
    input_scale: Tensor  # a buffer (register_buffer)
    threshold: nn.Parameter  # θ [d_sae], only where cfg.act.thresholded

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        self._make_parameters()
        if cfg.act.thresholded:
            self.threshold = nn.Parameter(torch.zeros(cfg.d_sae))  # θ [d_sae]
        self.register_buffer("input_scale", torch.ones(()))
        self.reset_parameters()

    def _make_parameters(self) -> None:
        d_in, d_sae = self.cfg.d_in, self.cfg.d_sae
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    @staticmethod
    def build(cfg: SAEConfig) -> "SAE":
        """The module a config describes: an SAE, or a transcoder where it names d_out."""
        return SAE(cfg) if cfg.d_out is None else Transcoder(cfg)

    # What the training loop and evaluation ask of an SAE, which a transcoder answers differently.
    @property
    def b_center(self) -> Tensor:
        """What the encoder subtracts from the scaled input: b_dec (Anthropic, April 2024)."""
        return self.b_dec

    @property
    def target_scale(self) -> Tensor:
        """The scale of what is reconstructed: the input's own."""
        return self.input_scale

    @property
    def d_out(self) -> int:
        return self.cfg.d_in

    def split(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """A batch as (input, target): an SAE's target is its input."""
        return rows, rows

    def add_skip(self, recon: Tensor, x: Tensor) -> Tensor:
        """An SAE has no skip path (Transcoder.add_skip)."""
        return recon

    @torch.no_grad()
    def init_biases(self, x: Tensor, y: Tensor) -> None:
        """b_dec at the (scaled) data mean (Anthropic, April 2024); x is y for an SAE."""
        self.b_dec.copy_(y.mean(0) * self.input_scale)

    @torch.no_grad()
    def reset_parameters(self, dec_norm: float = 1.0, generator: torch.Generator | None = None):
        # Anthropic, April 2024: decoder rows in random directions (at the recipe's norm; see
        # recipes/base.py), encoder initialised as the decoder's transpose, so every latent starts
        # as a matched filter.
        W = torch.randn(self.cfg.d_sae, self.cfg.d_in, generator=generator)
        W = W / W.norm(dim=1, keepdim=True) * dec_norm
        self.W_dec.copy_(W)
        self.W_enc.copy_(W.T)
        self.b_enc.zero_()
        self.b_dec.zero_()

    def extra_repr(self) -> str:
        c = self.cfg
        return (
            f"d_in={c.d_in}, d_sae={c.d_sae}, {c.act}, hook={c.hook}, model={c.model}, "
            f"input_scale={float(self.input_scale):.4g}"
        )

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    def pre_activation(self, x: Tensor) -> Tensor:
        x = x.to(self.W_enc.dtype) * self.input_scale  # [n, d_in]
        return torch.addmm(self.b_enc, x - self.b_center, self.W_enc)  # [n, d_sae]; addmm fuses the bias add

    def activate(self, pre: Tensor) -> Tensor:
        return self.cfg.act.activate(self, pre)  # [n, d_sae]

    def entries(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        """The active latents of pre [n, d_sae] as entries (rows, idx) [nnz], in token order: the
        sparse form of activate(). TopK's come straight from topk (fixed shapes, no host sync)."""
        return self.cfg.act.entries(self, pre)

    def encode(self, x: Tensor) -> Tensor:
        return self.activate(self.pre_activation(x))  # [n, d_sae]

    def decode(self, f: Tensor) -> Tensor:
        return torch.addmm(self.b_dec, f, self.W_dec) / self.input_scale  # [n, d_in]

    def forward(self, x: Tensor, fn=None) -> SAEOutput:
        if fn is not None:  # training: loss.step_terms runs its work here, inside DDP's forward
            return fn(self, x)
        pre = self.pre_activation(x)
        f = self.activate(pre)
        return SAEOutput(self.decode(f), f, pre)

    @torch.no_grad()
    def folded(self) -> "SAE":
        """The same function with input_scale folded into the weights (s = 1)."""
        s = float(self.input_scale)
        out = SAE(self.cfg)
        out.W_enc.copy_(self.W_enc * s)
        out.b_enc.copy_(self.b_enc)
        out.W_dec.copy_(self.W_dec / s)
        out.b_dec.copy_(self.b_dec / s)
        if self.cfg.act.thresholded:
            out.threshold.copy_(self.threshold)  # pre-activations are unchanged by the fold
        return out.to(self.W_enc.device)

    # ---- on-disk format ---------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write the SAE directory atomically: files go to temporary names, then are renamed."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.float() for k, v in self.state_dict().items()}
        save_safetensors_atomic(tensors, path / WEIGHTS_FILE, metadata={"format": "sae_lens_lite"})
        write_json_atomic(path / CONFIG_FILE, asdict(self.cfg))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "SAE":
        path = Path(path)
        if not (path / WEIGHTS_FILE).exists() or not (path / CONFIG_FILE).exists():
            if _unfinished_run(path):
                raise UserError(
                    f"{path} holds a training run that has not finished; run the same sae-lite train command "
                    "to resume it"
                )
            raise UserError(
                f"{path} is not an SAE directory (expected {WEIGHTS_FILE} and {CONFIG_FILE}); "
                "train one with `sae-lite train` or import one with `sae-lite import`"
            )
        try:
            raw = json.loads((path / CONFIG_FILE).read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(
                f"{path / CONFIG_FILE} is not valid JSON ({e}); restore it or train the SAE again"
            ) from None
        known = {f.name for f in fields(SAEConfig)}
        if not isinstance(raw, dict) or not {"d_in", "d_sae"} <= set(raw) or set(raw) - known:
            raise UserError(f"{path / CONFIG_FILE} is not an SAE config (expected the keys {', '.join(sorted(known))})")
        try:
            sae = SAE.build(SAEConfig(**raw))
        except TypeError:  # a size that is not a number
            raise UserError(
                f"{path / CONFIG_FILE} holds sizes that are not integers: d_in={raw['d_in']!r}, d_sae={raw['d_sae']!r}"
            ) from None
        try:
            state = load_file(str(path / WEIGHTS_FILE))
        except Exception as e:  # truncated or not safetensors: the library raises its own error types
            raise UserError(
                f"cannot read {path / WEIGHTS_FILE} ({e}); it is damaged, train or import the SAE again"
            ) from None
        want = {k: tuple(v.shape) for k, v in sae.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in state.items()}
        if got != want:
            raise UserError(
                f"{path / WEIGHTS_FILE} holds {got}, but config.json describes {want}; the two files do "
                "not belong together"
            )
        if not all(torch.isfinite(v).all() for v in state.values()) or not float(state["input_scale"]) > 0:
            raise UserError(
                f"{path / WEIGHTS_FILE} holds NaN or infinite weights (a diverged run?); train it again, "
                "e.g. with a lower --lr"
            )
        sae.load_state_dict(state)
        return sae.to(device)


def _unfinished_run(path: Path) -> bool:
    """Whether `path` holds a training run not yet finished: train writes checkpoint.json (train.CHECKPOINT)
    from a run's first moment and marks it complete once the SAE is saved."""
    try:
        ckpt = json.loads((path / "checkpoint.json").read_bytes())
    except FileNotFoundError:
        return False
    except (OSError, ValueError):  # damaged: train itself says what to do about it
        return True
    return not (isinstance(ckpt, dict) and ckpt.get("complete"))


# ---- the transcoder: the same module, reading one hook and predicting another --------------


class Transcoder(SAE):
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

    # Buffers (register_buffer); W_skip exists only where cfg.skip.
    output_scale: Tensor
    _no_center: Tensor
    W_skip: nn.Parameter

    def __init__(self, cfg: SAEConfig):
        assert cfg.d_out is not None, "a transcoder's config names d_out"
        super().__init__(cfg)

    def _make_parameters(self) -> None:
        d_in, d_sae, d_out = self.cfg.d_in, self.cfg.d_sae, self.cfg.d_out
        assert d_out is not None, "a transcoder's config names d_out"
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
        assert self.cfg.d_out is not None, "a transcoder's config names d_out"
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
        assert self.cfg.d_out is not None, "a transcoder's config names d_out"
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
        if self.cfg.act.thresholded:
            out.threshold.copy_(self.threshold)
        return out.to(self.W_enc.device)
