"""Export per-layer transcoders as a circuit-tracer transcoder set (the `circuit-tracer` package).

circuit-tracer builds attribution graphs from a set of per-layer transcoders, one for every
layer's MLP, 0..n−1. It reads a config (what `load_transcoders` takes, as `config.yaml` on the
hub) and one safetensors file per layer:

    config.yaml      model_kind: transcoder_set, model_name, scan, feature_input_hook,
                     feature_output_hook, transcoders: [the layer files, layer 0 first]
    layer_L.safetensors
                     W_enc [d_sae, d_model]   (ours transposed: it applies F.linear(x, W_enc, b_enc))
                     b_enc [d_sae]   W_dec [d_sae, d_model]   b_dec [d_model]
                     W_skip [d_model, d_model] (ours transposed: it adds x @ W_skip.T), with --skip
                     activation_function.threshold [d_sae], for JumpReLU transcoders

    f = act(x @ W_enc.T + b_enc)    y_hat = f @ W_dec + b_dec (+ x @ W_skip.T)

with both our scales folded in. Its loader knows ReLU and JumpReLU transcoders; TopK ones are
refused here. The hooks are its names for the MLP's input and output ("mlp.hook_in",
"mlp.hook_out"), our blocks.L.ln2.hook_normalized and blocks.L.hook_mlp_out.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from sae_lens_lite.errors import UserError
from sae_lens_lite.fsutil import save_safetensors_atomic, write_text_atomic
from sae_lens_lite.training import activations
from sae_lens_lite.training.sae import CONFIG_FILE, SAE, Transcoder

CONFIG = "config.yaml"
INPUT_HOOK, OUTPUT_HOOK = "mlp.hook_in", "mlp.hook_out"  # circuit-tracer's names for the MLP's input and output
_LAYER = re.compile(r"^blocks\.(\d+)\.ln2\.hook_normalized$")


def find_layers(root: Path) -> dict[int, Path]:
    """{layer: transcoder directory} of the MLP transcoders under root (one per subdirectory)."""
    found: dict[int, Path] = {}
    for cfg in sorted(Path(root).glob(f"*/{CONFIG_FILE}")):
        raw = json.loads(cfg.read_text())
        m = _LAYER.match(raw.get("hook") or "")
        if raw.get("d_out") is None or m is None:
            continue
        layer = int(m.group(1))
        if layer in found:
            raise UserError(f"{found[layer]} and {cfg.parent} both hold a transcoder of layer {layer}; keep one")
        found[layer] = cfg.parent
    if not found:
        raise UserError(
            f"{root} holds no MLP transcoders (subdirectories trained with `sae-lite train --transcoder` on "
            "`harvest --mlp-pairs` caches)"
        )
    missing = sorted(set(range(max(found) + 1)) - set(found))
    if missing:
        raise UserError(
            f"circuit-tracer needs a transcoder for every layer from 0; {root} lacks layers {missing}: harvest "
            "them with --mlp-pairs all and train one per layer"
        )
    return found


def layer_tensors(tc: SAE) -> dict:
    """One layer's file in circuit-tracer's orientation, from our transcoder (scales folded)."""
    if type(tc.cfg.act) not in (activations.ReLU, activations.JumpReLU):
        raise UserError(
            f"circuit-tracer loads ReLU and JumpReLU transcoders, not {tc.cfg.act.name}; train with --penalty "
            "l1, jumprelu or batchtopk (a JumpReLU after training)"
        )
    f = tc.folded()
    out = {
        "W_enc": f.W_enc.T.contiguous(),
        "b_enc": f.b_enc,
        "W_dec": f.W_dec,
        "b_dec": f.b_dec,
    }
    if tc.cfg.skip:
        assert isinstance(f, Transcoder), "a skip path belongs to a transcoder (SAEConfig checks it)"
        out["W_skip"] = f.W_skip.T.contiguous()
    if tc.cfg.act.thresholded:
        out["activation_function.threshold"] = f.threshold
    return {k: v.detach().float().cpu() for k, v in out.items()}


def save_transcoder_set(layers: dict[int, SAE], out: Path, model_name: str, scan: str) -> Path:
    """Write the set (layer files, then config.yaml, which makes it complete)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    skips = {tc.cfg.skip for tc in layers.values()}
    if len(skips) > 1 or len({tc.d_sae for tc in layers.values()}) > 1:
        raise UserError("circuit-tracer needs every layer's transcoder with the same width and the same skip setting")
    paths = []
    for layer in sorted(layers):
        f = out / f"layer_{layer}.safetensors"
        save_safetensors_atomic(layer_tensors(layers[layer]), f)
        paths.append(str(f.resolve()))  # circuit-tracer opens the paths as given
    lines = [
        "model_kind: transcoder_set",
        f"model_name: {json.dumps(model_name)}",
        f"scan: {json.dumps(scan)}",
        f"feature_input_hook: {INPUT_HOOK}",
        f"feature_output_hook: {OUTPUT_HOOK}",
        "transcoders:",
        *(f"  - {json.dumps(p)}" for p in paths),
    ]
    write_text_atomic(out / CONFIG, "\n".join(lines) + "\n")  # JSON strings are valid YAML scalars
    return out
