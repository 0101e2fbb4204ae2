"""Export and import: feature dictionaries, the SAELens directory format out and in, sparsify in.

Every format mapping lives here, writer next to reader (formats: docs/formats.md):

    ours      f = act((x*s - b_dec) @ W_enc + b_enc)          x_hat = (f @ W_dec + b_dec) / s
    SAELens   f = act((x - b_dec) @ W_enc + b_enc)            x_hat = f @ W_dec + b_dec
              (apply_b_dec_to_input=True, normalize_activations="none", s folded into the weights)
    SAELens transcoder (architecture transcoder, skip_transcoder, jumprelu_[skip_]transcoder)
              f = act(x @ W_enc + b_enc)   y_hat = f @ W_dec + b_dec (+ x @ W_skip.T, W_skip [d_out, d_in])
              (apply_b_dec_to_input=False: b_dec lives in the output space; both scales folded)
    sparsify  f = topk(relu(encoder(x - b_dec)))              x_hat = f @ W_dec + b_dec
              (encoder is an nn.Linear: its weight is W_enc transposed, [d_sae, d_in])

Converters go wrong on orientation, on b_dec and on input normalisation, so each is explicit
below and tests/test_export.py checks the round trips and, when `sae-lens` is installed, that
SAELens's own loader computes the same encode/decode as we do.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from sae_lens_lite import __version__
from sae_lens_lite.config import opt
from sae_lens_lite.errors import UserError
from sae_lens_lite.fsutil import prepare_out_dir, save_safetensors_atomic, sha256_file, write_json_atomic
from sae_lens_lite.outputs import Output, resumable_folder
from sae_lens_lite.training import activations
from sae_lens_lite.training.sae import CONFIG_FILE as OUR_CONFIG
from sae_lens_lite.training.sae import SAE, SAEConfig, Transcoder
from sae_lens_lite.training.sae import WEIGHTS_FILE as OUR_WEIGHTS
from sae_lens_lite.transcoder_set import CONFIG as TRANSCODER_SET_CONFIG
from sae_lens_lite.transcoder_set import find_layers, save_transcoder_set

SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_SPARSITY = "sparsity.safetensors"
# SAELens reads configs whose metadata.sae_lens_version is below 6.0 through a legacy path that
# renames keys; we write the 6.x layout, so we declare the 6.0 format.
SAELENS_FORMAT_VERSION = "6.0.0"
SPARSIFY_CFG, SPARSIFY_WEIGHTS = "cfg.json", "sae.safetensors"
DICT_HEADER, DICT_FEATURES, DICT_WEIGHTS = "dictionary.json", "features.jsonl", "dictionary.safetensors"
DICT_FORMAT, DICT_VERSION = "sae_lens_lite.dictionary", 1
# Our built-in model names, as the hub ids SAELens users and Neuronpedia know them by.
HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}  # ours is its Q4_1 GGUF, dequantised


def _claim_export(out: Path, cfg: ExportConfig) -> Path:
    return prepare_out_dir(out, cfg.overwrite, SAELENS_CFG if cfg.format == "saelens" else DICT_HEADER)


# How export and import keep their folders (outputs.py); a circuit-tracer set is written as it is.
OUTPUT = Output("export", _claim_export, inputs=("sae", "analysis", "acts"), skip=("sae", "analysis", "acts"))
IMPORT_OUTPUT = Output("import", resumable_folder(OUR_CONFIG), inputs=("src",))


@dataclass
class ExportConfig:
    sae: str = opt(
        "runs/sae",
        "SAE directory to export (from `sae-lite train` or `sae-lite import`); for circuit-tracer, a directory "
        "of per-layer MLP transcoders",
    )
    format: str = opt(
        "saelens",
        "saelens: a directory SAELens's SAE.load_from_disk reads; dictionary: features.jsonl + dictionary.safetensors; "
        "circuit-tracer: a transcoder set (config.yaml + layer_L.safetensors)",
        choices=["saelens", "dictionary", "circuit-tracer"],
    )
    out: str = opt("runs/export", "output directory")
    analysis: str | None = opt(
        None, "analysis directory whose features.json gives per-feature scores, top tokens and frequencies"
    )
    acts: str | None = opt(
        None,
        "activation cache to measure firing frequencies on when no analysis gives them (for SAELens's sparsity file)",
    )
    overwrite: bool = opt(False, "replace the contents of a non-empty --out")


@dataclass
class ImportConfig:
    src: str = opt("", "SAELens directory, sparsify directory, or a SAELens release name (online, needs sae-lens)")
    sae_id: str | None = opt(None, "SAE id inside a SAELens release (hub imports only)")
    out: str = opt("runs/imported", "directory to write our SAE to")
    model: str | None = opt(None, "model name to record when the source does not say (sparsify directories do not)")
    hook: str | None = opt(
        None, "hook name to record, e.g. blocks.6.hook_resid_post, when the source's cannot be mapped"
    )
    overwrite: bool = opt(False, "replace the contents of a non-empty --out")


def _read_tensors(path: Path) -> dict[str, Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as e:  # safetensors raises its own error types for damaged headers
        raise UserError(f"cannot read {path}: {e}") from None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_bytes())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg}, line {e.lineno})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not text (not UTF-8); is it the right file?") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} holds a JSON {type(data).__name__}, not the object of settings expected")
    return data


def export(cfg: ExportConfig) -> Path:
    """Write the SAE at cfg.sae in cfg.format to cfg.out; returns the output directory."""
    if cfg.format == "circuit-tracer":
        return export_transcoder_set(cfg)
    if cfg.format not in ("saelens", "dictionary"):
        raise UserError(f"unknown export --format {cfg.format!r}: use saelens, dictionary or circuit-tracer")
    sae = SAE.load(cfg.sae)
    run = OUTPUT.start(cfg)
    if run.done() is not None:  # the rerun rule (outputs.py)
        return Path(cfg.out)
    features = read_analysis(cfg.analysis, sae.d_sae) if cfg.analysis else {}  # a damaged file fails here, first
    if cfg.analysis:
        from sae_lens_lite.interpret.features import check_analysis_source

        check_analysis_source(cfg.analysis, run.inputs["sae"], cfg.sae)
    freq = firing_frequency(sae, features, cfg.acts)
    out = run.claim()
    removed = freq is None and cfg.format == "saelens" and (out / SAELENS_SPARSITY).exists()
    if cfg.format == "saelens":
        save_saelens(sae, out, freq, source=Path(cfg.sae))
        files = [SAELENS_CFG, SAELENS_WEIGHTS] + ([SAELENS_SPARSITY] if freq is not None else [])
    else:
        save_dictionary(sae, out, features, freq, source=Path(cfg.sae))
        files = [DICT_HEADER, DICT_FEATURES, DICT_WEIGHTS]
    what = "SAELens directory" if cfg.format == "saelens" else "feature dictionary"
    freq_from = (
        "no firing frequencies"
        if freq is None
        else f"frequencies from {'the analysis' if features and cfg.analysis else cfg.acts}"
    )
    extra = f"; removed the stale {SAELENS_SPARSITY}" if removed else ""
    run.finish(
        {"format": cfg.format, "files": files, "d_sae": sae.d_sae},
        f"export: wrote {what} {out} ({', '.join(files)}): {sae.d_sae:,} features, {freq_from}"
        f"{', scores and top tokens from ' + str(cfg.analysis) if features else ''}{extra}",
    )
    return out


def export_transcoder_set(cfg: ExportConfig) -> Path:
    """circuit-tracer's transcoder set from the per-layer transcoders under cfg.sae (transcoder_set.py)."""
    layers = {L: SAE.load(d) for L, d in find_layers(Path(cfg.sae)).items()}
    model = next(iter(layers.values())).cfg.model
    if model is None:
        raise UserError(f"{cfg.sae}: its transcoders record no model, which circuit-tracer's config.yaml must name")
    out = prepare_out_dir(cfg.out, cfg.overwrite, TRANSCODER_SET_CONFIG)
    save_transcoder_set(layers, out, HUB_IDS.get(model, model), scan=f"sae_lens_lite:{Path(cfg.sae).name}")
    print(f"export: wrote circuit-tracer transcoder set {out} ({len(layers)} layers, {out / TRANSCODER_SET_CONFIG})")
    return out


def _provenance(sae: SAE, source: Path | None) -> dict:
    return {
        "model": sae.cfg.model,
        "hook": sae.cfg.hook,
        "context_length": sae.cfg.context_length,
        "activation": sae.cfg.activation,
        "k": sae.cfg.k,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "input_scale_folded": float(sae.input_scale),
        "source_sae": str(source) if source else None,
        "source_sae_sha256": sha256_file(source / OUR_WEIGHTS) if source and (source / OUR_WEIGHTS).exists() else None,
        "sae_lens_lite_version": __version__,
    }


# ---- firing frequencies ---------------------------------------------------------------------


@torch.no_grad()
def firing_frequency(sae: SAE, features: dict[int, dict], acts: str | None, batch_size: int = 4096) -> Tensor | None:
    """Fraction of tokens on which each latent is > 0 [d_sae]: from the analysis when it has them
    for every feature, else measured on the activation cache `acts`, else None."""
    if features and all(features.get(i, {}).get("frequency") is not None for i in range(sae.d_sae)):
        return torch.tensor([float(features[i]["frequency"]) for i in range(sae.d_sae)])
    if not acts:
        return None
    from sae_lens_lite.data.cache import ActivationCache

    cache = ActivationCache.open(acts)
    hook = cache.manifest.get("hook")
    if sae.cfg.hook and hook and hook != sae.cfg.hook:
        raise UserError(
            f"--acts {acts} holds {hook} but the SAE was trained on {sae.cfg.hook}; pass the matching cache"
        )
    if cache.d_model != sae.d_in:
        raise UserError(f"--acts {acts} has d_model {cache.d_model}, the SAE expects d_in {sae.d_in}")
    counts = torch.zeros(sae.d_sae, dtype=torch.long)
    for x in cache.iter_batches(batch_size, shuffle=False):  # [batch, d_in]
        counts += (sae.encode(x) > 0).sum(0)
    return counts.double().div(max(cache.n_tokens, 1)).float()


# ---- SAELens directory ----------------------------------------------------------------------


# Our inference activation -> SAELens's architecture computing the same function (and back).
# BatchTopK and Matryoshka SAEs are saved as jumprelu SAEs with one threshold, as SAELens saves them.
SAELENS_ARCH: dict[type[activations.Activation], str] = {
    activations.ReLU: "standard",
    activations.TopK: "topk",
    activations.JumpReLU: "jumprelu",
}
OUR_ACTIVATION = {v: k for k, v in SAELENS_ARCH.items()}


def saelens_cfg(sae: SAE, source: Path | None = None) -> dict:
    """The cfg.json SAELens 6.x expects for our SAE (after input_scale has been folded)."""
    meta = dict(sae.cfg.meta.get("saelens_metadata") or {})  # kept from an import, if any
    filters = sae.cfg.meta.get("filters") or {}
    model = sae.cfg.model
    ours = {
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "sae_lens_training_version": None,  # not trained by SAELens
        "model_name": model if model is None else HUB_IDS.get(model, model),
        "hook_name": sae.cfg.hook,
        "hook_head_index": None,
        "context_size": sae.cfg.context_length,
        # Our harvest packs documents with EOS between them and prepends no BOS.
        "prepend_bos": False,
        "exclude_special_tokens": filters.get("drop_special"),
        "dataset_path": sae.cfg.meta.get("corpus"),
        # Ours, so that importing the directory back restores our model name and metadata.
        "sae_lens_lite": {
            **_provenance(sae, source),
            "meta": {k: v for k, v in sae.cfg.meta.items() if k not in ("saelens_metadata", "imported_from")},
        },
    }
    meta.update({k: v for k, v in ours.items() if v is not None or k not in meta})
    if sae.cfg.d_out is not None:
        return _saelens_transcoder_cfg(sae, meta)
    act = sae.cfg.act
    cfg = {
        "architecture": SAELENS_ARCH[type(act)],
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,  # we subtract b_dec before encoding
        "normalize_activations": "none",  # the input scale is folded into the weights instead
        "reshape_activations": "none",
        "metadata": meta,
    }
    if isinstance(act, activations.TopK):
        cfg.update(k=act.k, rescale_acts_by_decoder_norm=False)
    return cfg


# SAELens's transcoder architectures, by (our activation, skip path). It has no TopK transcoder.
SAELENS_TRANSCODERS: dict[tuple[type[activations.Activation], bool], str] = {
    (activations.ReLU, False): "transcoder",
    (activations.ReLU, True): "skip_transcoder",
    (activations.JumpReLU, False): "jumprelu_transcoder",
    (activations.JumpReLU, True): "jumprelu_skip_transcoder",
}


def _saelens_transcoder_cfg(sae: SAE, meta: dict) -> dict:
    """cfg.json of a SAELens transcoder: it reads metadata.hook_name, writes hook_name_out."""
    arch = SAELENS_TRANSCODERS.get((type(sae.cfg.act), sae.cfg.skip))
    if arch is None:
        raise UserError(
            f"SAELens has no {sae.cfg.act.name} transcoder (only ReLU and JumpReLU ones); train with --penalty "
            "l1, jumprelu or batchtopk (a JumpReLU after training) to export to SAELens"
        )
    return {
        "architecture": arch,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "d_out": sae.d_out,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": False,  # SAELens refuses it for transcoders; ours does not centre either
        "normalize_activations": "none",  # both scales are folded into the weights
        "reshape_activations": "none",
        "metadata": {**meta, "hook_name_out": sae.cfg.target_hook},
    }


def save_saelens(sae: SAE, out: Path, freq: Tensor | None = None, source: Path | None = None) -> Path:
    """Write a SAELens directory. cfg.json goes last: it is what makes the directory loadable."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = saelens_cfg(sae, source)
    f = sae.folded()
    weights: dict[str, Tensor] = {"W_enc": f.W_enc, "W_dec": f.W_dec, "b_enc": f.b_enc, "b_dec": f.b_dec}
    if sae.cfg.act.thresholded:
        weights["threshold"] = f.threshold  # SAELens: f = relu(pre) · (pre > threshold)
    if sae.cfg.skip:
        assert isinstance(f, Transcoder)  # a skip path belongs to a transcoder (SAEConfig refuses it otherwise)
        weights["W_skip"] = f.W_skip.T.contiguous()  # SAELens's [d_out, d_in], applied as x @ W_skip.T
    save_safetensors_atomic(weights, out / SAELENS_WEIGHTS)
    if freq is not None:
        # SAELens stores log10 of the firing frequency, with the same 1e-10 floor for dead latents.
        save_safetensors_atomic({"sparsity": torch.log10(freq.float() + 1e-10)}, out / SAELENS_SPARSITY)
    else:
        (out / SAELENS_SPARSITY).unlink(missing_ok=True)  # never leave a stale one from an earlier export
    write_json_atomic(out / SAELENS_CFG, cfg)
    return out


def from_saelens(cfg: dict, state: dict[str, Tensor], origin: dict) -> SAE:
    """Our SAE computing what SAELens computes for this config and state dict (standard, topk)."""
    meta = dict(cfg.get("metadata") or {})
    for old, new in (
        ("hook_point", "hook_name"),
        ("hook_name", "hook_name"),
        ("model_name", "model_name"),
        ("context_size", "context_size"),
    ):
        if meta.get(new) is None and cfg.get(old) is not None:  # configs before SAELens 6 keep these at top level
            meta[new] = cfg[old]
    ours = meta.pop("sae_lens_lite", None) or {}  # present when we wrote the directory
    arch = cfg.get("architecture", "standard")
    act_fn = cfg.get("activation_fn", cfg.get("activation_fn_str", "relu"))
    k: Any = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")  # from JSON
    if arch == "standard" and act_fn == "topk" and k:  # pre-6 topk configs
        arch = "topk"
    if arch not in SAELENS_ARCH.values() or (arch == "standard" and act_fn not in ("relu", None)):
        raise UserError(
            f"SAELens architecture {arch!r} (activation {act_fn!r}) cannot be imported; we support "
            "standard (ReLU), topk and jumprelu"
        )
    norm = cfg.get("normalize_activations", "none")
    # "expected_average_only_in" is a training-time scale that SAELens's inference SAE does not
    # apply either (it is folded into the weights at the end of training), so it maps to nothing.
    if norm not in ("none", "expected_average_only_in", None):
        raise UserError(
            f"SAELens normalize_activations={norm!r} is a per-input normalisation we cannot represent; "
            "only 'none' imports"
        )
    if cfg.get("reshape_activations", "none") != "none":
        raise UserError(
            f"SAELens reshape_activations={cfg['reshape_activations']!r} (attention hook_z SAEs) cannot be imported"
        )
    ours_act = OUR_ACTIVATION[arch]  # the type; its k, if any, is read below
    missing = {"W_enc", "W_dec", "b_enc", "b_dec", *(["threshold"] if ours_act.thresholded else [])} - set(state)
    if missing:
        raise UserError(f"the SAELens weights lack {', '.join(sorted(missing))}; is this a {arch} SAE?")
    scale = state.get("scaling_factor", state.get("finetuning_scaling_factor"))
    if scale is not None and not torch.allclose(scale.float(), torch.ones_like(scale.float())):
        raise UserError("the SAELens SAE has a finetuning scaling factor, which we cannot import")
    W_enc, W_dec = state["W_enc"].double(), state["W_dec"].double()  # [d_in, d_sae], [d_sae, d_in]
    b_enc, b_dec = state["b_enc"].double(), state["b_dec"].double()
    d_in, d_sae = W_enc.shape
    if W_dec.shape != (d_sae, d_in) or b_enc.shape != (d_sae,) or b_dec.shape != (d_in,):
        raise UserError(
            f"SAELens weight shapes do not fit together: W_enc {tuple(W_enc.shape)}, W_dec {tuple(W_dec.shape)}"
        )
    if not cfg.get("apply_b_dec_to_input", True):
        # SAELens encodes x, not x - b_dec: (x - b_dec) @ W_enc + (b_enc + b_dec @ W_enc) is the same.
        b_enc = b_enc + b_dec @ W_enc
    if arch == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
        # SAELens selects on pre * |W_dec| and decodes f / |W_dec|: fold both into the weights.
        n = W_dec.norm(dim=-1)  # [d_sae]
        W_enc, b_enc, W_dec = W_enc * n, b_enc * n, W_dec / n[:, None]
    sae = SAE(
        SAEConfig(
            d_in=d_in,
            d_sae=d_sae,
            activation=ours_act.name,
            k=int(k) if arch == "topk" else None,
            model=ours.get("model", meta.get("model_name")),
            hook=meta.get("hook_name"),
            context_length=meta.get("context_size"),
            meta={**(ours.get("meta") or {}), "imported_from": origin, "saelens_metadata": meta},
        )
    )
    with torch.no_grad():
        for name, t in (("W_enc", W_enc), ("W_dec", W_dec), ("b_enc", b_enc), ("b_dec", b_dec)):
            getattr(sae, name).copy_(t.float())
        if ours_act.thresholded:  # the pre-activations are unchanged by the b_dec fold above
            # SAELens computes relu(pre)·(pre > θ): a θ below 0 acts as 0 (ours: pre·(pre > θ)).
            sae.threshold.copy_(state["threshold"].float().clamp_min(0))
    return sae


# ---- sparsify directory ---------------------------------------------------------------------

# sparsify names its hook points by HF module; a decoder layer's output is the residual stream after it.
_SPARSIFY_HOOKS = [
    (r"(?:model\.|transformer\.|gpt_neox\.)?(?:layers|h)\.(\d+)", "hook_resid_post"),
    (r"(?:model\.|transformer\.|gpt_neox\.)?(?:layers|h)\.(\d+)\.mlp", "hook_mlp_out"),
    (r"(?:model\.|transformer\.|gpt_neox\.)?(?:layers|h)\.(\d+)\.(?:self_attn|attn|attention)", "hook_attn_out"),
]


def sparsify_hook(name: str) -> str | None:
    for pattern, kind in _SPARSIFY_HOOKS:
        if m := re.fullmatch(pattern, name):
            return f"blocks.{m.group(1)}.{kind}"
    return None


def from_sparsify(path: Path) -> SAE:
    """Our SAE computing what sparsify's SparseCoder computes: topk(relu(encoder(x - b_dec)))."""
    cfg = _read_json(path / SPARSIFY_CFG)
    state = _read_tensors(path / SPARSIFY_WEIGHTS)
    if cfg.get("transcode"):
        raise UserError(
            f"{path} is a sparsify transcoder (it predicts another layer's output), not an SAE; it cannot be imported"
        )
    if cfg.get("activation", "topk") != "topk":
        raise UserError(f"{path} uses sparsify activation {cfg['activation']!r}; only topk imports")
    if cfg.get("skip_connection") or "W_skip" in state:
        raise UserError(f"{path} has a skip connection, which our SAE has no place for")
    missing = {"encoder.weight", "encoder.bias", "W_dec", "b_dec"} - set(state)
    if missing:
        raise UserError(f"{path / SPARSIFY_WEIGHTS} lacks {', '.join(sorted(missing))}; it is not a sparsify SAE")
    enc = state["encoder.weight"].float()  # [d_sae, d_in], nn.Linear's orientation
    d_sae, d_in = enc.shape
    k = int(cfg.get("k", 32))
    if state["W_dec"].shape != (d_sae, d_in):
        raise UserError(f"sparsify W_dec has shape {tuple(state['W_dec'].shape)}, expected {(d_sae, d_in)}")
    # Selecting the top k of relu(pre) and of pre then relu-ing give the same latents.
    sae = SAE(
        SAEConfig(
            d_in=d_in,
            d_sae=d_sae,
            **activations.TopK(k).config_fields(),
            hook=sparsify_hook(path.name),
            meta={"sparsify_cfg": cfg},
        )
    )
    with torch.no_grad():
        sae.W_enc.copy_(enc.T)
        sae.b_enc.copy_(state["encoder.bias"].float())
        sae.W_dec.copy_(state["W_dec"].float())
        sae.b_dec.copy_(state["b_dec"].float())
    return sae


# ---- import ---------------------------------------------------------------------------------


def import_sae(src: str | os.PathLike, sae_id: str | None = None) -> SAE:
    """Our SAE from a SAELens directory, a sparsify directory, one of our own, or a SAELens
    release on the hub (`src` = release name, with `sae_id`; needs sae-lens and a connection)."""
    path = Path(src)
    if path.is_dir():
        files = {p.name for p in path.iterdir()}
        origin = {"path": str(path)}
        if {SAELENS_CFG, SAELENS_WEIGHTS} <= files:
            origin.update(format="saelens", sha256=sha256_file(path / SAELENS_WEIGHTS))
            return from_saelens(_read_json(path / SAELENS_CFG), _read_tensors(path / SAELENS_WEIGHTS), origin)
        if {SPARSIFY_CFG, SPARSIFY_WEIGHTS} <= files:
            sae = from_sparsify(path)
            sae.cfg.meta["imported_from"] = {
                **origin,
                "format": "sparsify",
                "sha256": sha256_file(path / SPARSIFY_WEIGHTS),
            }
            return sae
        if {OUR_CONFIG, OUR_WEIGHTS} <= files:
            return SAE.load(path)
        subs = sorted(p.name for p in path.iterdir() if (p / SPARSIFY_CFG).exists())
        if subs:
            raise UserError(
                f"{path} holds one SAE per hook point; import one of them, e.g. {path / subs[0]} (all: "
                f"{', '.join(subs)})"
            )
        raise UserError(
            f"{path} is neither a SAELens ({SAELENS_CFG} + {SAELENS_WEIGHTS}) nor a sparsify "
            f"({SPARSIFY_CFG} + {SPARSIFY_WEIGHTS}) directory"
        )
    if sae_id is None:
        raise UserError(f"{src} is not a directory; to load a SAELens release from the hub also pass --sae-id")
    return _from_saelens_hub(str(src), sae_id)


def _from_saelens_hub(release: str, sae_id: str) -> SAE:
    try:
        from sae_lens import SAE as SAELensSAE
    except ImportError:
        raise UserError(
            "importing a SAELens release from the hub needs sae-lens: pip install 'sae_lens_lite[saelens]'"
        ) from None
    try:
        loaded = SAELensSAE.from_pretrained(release, sae_id, device="cpu", dtype="float32")
    except Exception as e:  # unknown release, no connection, ...: the library's message says which
        raise UserError(
            f"SAELens could not load release {release!r}, SAE {sae_id!r}: "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None
    loaded = loaded[0] if isinstance(loaded, tuple) else loaded  # sae-lens < 6 returned (sae, cfg, sparsity)
    state = {k: v.detach() for k, v in loaded.state_dict().items()}
    return from_saelens(loaded.cfg.to_dict(), state, {"format": "saelens-hub", "release": release, "sae_id": sae_id})


def import_cmd(cfg: ImportConfig) -> Path:
    """`sae-lite import`: convert cfg.src into our SAE directory cfg.out."""
    if not cfg.src:
        raise UserError(
            "nothing to import: pass --src (a SAELens or sparsify directory, or a SAELens release with --sae-id)"
        )
    run = IMPORT_OUTPUT.start(cfg)
    if run.done() is not None:  # the rerun rule (outputs.py)
        return Path(cfg.out)
    sae = import_sae(cfg.src, cfg.sae_id)
    if cfg.model:
        sae.cfg.model = cfg.model
    if cfg.hook:
        sae.cfg.hook = cfg.hook
    out = run.claim()
    sae.save(out)
    origin = sae.cfg.meta.get("imported_from", {}).get("format", "sae_lens_lite")
    run.finish(
        {"d_in": sae.d_in, "d_sae": sae.d_sae, "activation": sae.cfg.activation},
        f"import: wrote SAE {out} ({OUR_WEIGHTS}, {OUR_CONFIG}) from the {origin} SAE {cfg.src}: {sae.cfg.act.label}"
        f", d_in {sae.d_in}, d_sae {sae.d_sae:,}, hook "
        f"{sae.cfg.hook}, model {sae.cfg.model}",
    )
    return out


# ---- feature dictionary ---------------------------------------------------------------------


def read_analysis(analysis: str | os.PathLike, d_sae: int) -> dict[int, dict]:
    """{feature id: {rank, score, frequency, top_tokens, top_contexts, logit_lens}} from the
    features.json of `sae-lite analyze` (its schema: features.Feature), token ids turned into text."""
    from sae_lens_lite.interpret.features import read_features

    data = read_features(analysis, d_sae)
    vocab = data["vocab"]
    text = lambda t: vocab.get(str(t), f"<{t}>")  # noqa: E731
    out: dict[int, dict] = {}
    for f in data["features"]:
        score = f["score"]
        out[f["id"]] = {
            "rank": f["rank"],
            "score": score if isinstance(score, (int, float)) and math.isfinite(score) else None,
            "frequency": f["frequency"],
            "top_tokens": [{"id": t, "token": text(t), "share": s} for t, s in f["top_tokens"]],
            "top_contexts": [
                {"act": e["act"], "center": e["center"], "tokens": [text(t) for t in e["tokens"]], "acts": e["acts"]}
                for e in f["examples"]
            ],
            "logit_lens": {
                side: [{"id": t, "token": text(t), "logit": v} for t, v in f["lens"][side]]
                for side in ("promoted", "suppressed")
            },
        }
    return out


def save_dictionary(
    sae: SAE, out: Path, features: dict[int, dict], freq: Tensor | None, source: Path | None = None
) -> Path:
    """dictionary.safetensors (folded weights + provenance), features.jsonl (one line per feature,
    in id order), and dictionary.json last (header with provenance; marks the export complete)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prov = _provenance(sae, source)
    f = sae.folded()
    # safetensors metadata must be str → str.
    st_meta = {"format": DICT_FORMAT, "version": str(DICT_VERSION), **{k: json.dumps(v) for k, v in prov.items()}}
    save_safetensors_atomic(
        {"W_dec": f.W_dec, "W_enc": f.W_enc, "b_enc": f.b_enc, "b_dec": f.b_dec}, out / DICT_WEIGHTS, st_meta
    )
    tmp = out / (DICT_FEATURES + ".tmp")
    with open(tmp, "w") as fh:
        for i in range(sae.d_sae):
            a = features.get(i, {})
            line = {
                "id": i,
                "rank": a.get("rank"),
                "score": a.get("score"),
                "frequency": float(freq[i]) if freq is not None else a.get("frequency"),
                "top_tokens": a.get("top_tokens") or [],
                "top_contexts": a.get("top_contexts") or [],
                "logit_lens": a.get("logit_lens"),
                "label": "",
            }
            fh.write(json.dumps(_jsonable(line), allow_nan=False) + "\n")
    os.replace(tmp, out / DICT_FEATURES)
    header = {
        "format": DICT_FORMAT,
        "version": DICT_VERSION,
        **prov,
        "files": {"weights": DICT_WEIGHTS, "features": DICT_FEATURES},
        "has_analysis": bool(features),
        "has_frequency": freq is not None,
    }
    write_json_atomic(out / DICT_HEADER, header)
    return out


def _jsonable(o):
    """Plain JSON: tensors to lists, NaN/Inf to null (JSON has no NaN; readers choke on it)."""
    if isinstance(o, Tensor):
        o = o.tolist()
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


def load_dictionary(path: str | os.PathLike) -> tuple[dict, list[dict], dict[str, Tensor]]:
    """(header, feature lines, weights) of a dictionary export."""
    path = Path(path)
    if not (path / DICT_HEADER).exists():
        raise UserError(f"{path} is not a complete feature dictionary (no {DICT_HEADER}); export it again")
    header = _read_json(path / DICT_HEADER)
    lines = [json.loads(line) for line in (path / DICT_FEATURES).read_text().splitlines() if line.strip()]
    return header, lines, _read_tensors(path / DICT_WEIGHTS)
