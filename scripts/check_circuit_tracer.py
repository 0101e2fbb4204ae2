"""Load an exported transcoder set with the real circuit-tracer and build an attribution graph.

circuit-tracer pins transformers <= 4.57.3 (sae_lens_lite uses 5.x), so this runs in a venv of
its own and imports nothing from sae_lens_lite:

    python -m venv ct-venv && ct-venv/bin/pip install circuit-tracer==0.5.0 torch
    ct-venv/bin/python scripts/check_circuit_tracer.py --set runs/ct-set \
        --model ~/.cache/sae_lens_lite/data/models/SmolLM2-135M-Instruct.Q4_1-<hash> --prompt "def add(a, b):"

--model is a local model directory (sae-lite converts the smollm2-135m GGUF into one the first
time it loads it), read offline by circuit-tracer's nnsight backend. Prints what loaded, each
layer's largest difference from the formula the set was exported with, and the graph's size.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import yaml


def readable_by_transformers4(model_dir: str) -> str:
    """A view of model_dir that transformers 4.x loads: sae-lite's transformers 5 writes
    tokenizer_class "TokenizersBackend", which 4.x does not know; its fast tokenizer reads the
    same tokenizer.json. The weights and config are linked, not copied."""
    src, view = Path(model_dir), Path(tempfile.mkdtemp(prefix="ct-model-"))
    for f in src.iterdir():
        if f.name != "tokenizer_config.json":
            (view / f.name).symlink_to(f.resolve())
    tok = json.loads((src / "tokenizer_config.json").read_text())
    if tok.get("tokenizer_class") == "TokenizersBackend":
        tok["tokenizer_class"] = "PreTrainedTokenizerFast"
    (view / "tokenizer_config.json").write_text(json.dumps(tok))
    return str(view)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", required=True, help="directory written by sae-lite export --format circuit-tracer")
    ap.add_argument("--model", required=True, help="local model directory (config.json + model.safetensors)")
    ap.add_argument("--prompt", default="def add(a, b):\n    return a +")
    ap.add_argument("--max-feature-nodes", type=int, default=256)
    ap.add_argument("--no-graph", action="store_true", help="only load the set and check it")
    args = ap.parse_args()

    from circuit_tracer.utils.hf_utils import load_transcoders

    config = yaml.safe_load((Path(args.set) / "config.yaml").read_text())
    t = time.perf_counter()
    transcoders = load_transcoders(config, torch.device("cpu"), torch.float32, lazy_encoder=False, lazy_decoder=False)
    result = {
        "loaded": type(transcoders).__name__,
        "n_layers": transcoders.n_layers,
        "d_transcoder": transcoders.d_transcoder,
        "skip_connection": transcoders.skip_connection,
        "hooks": [transcoders.feature_input_hook, transcoders.feature_output_hook],
        "load_s": round(time.perf_counter() - t, 1),
    }
    print(json.dumps(result))
    if args.no_graph:
        return
    from circuit_tracer import ReplacementModel, attribute

    t = time.perf_counter()
    model = ReplacementModel.from_pretrained_and_transcoders(
        readable_by_transformers4(args.model),
        transcoders,
        backend="nnsight",
        device=torch.device("cpu"),
        dtype=torch.float32,
    )
    print(json.dumps({"replacement_model": type(model).__name__, "load_s": round(time.perf_counter() - t, 1)}))
    t = time.perf_counter()
    graph = attribute(args.prompt, model, max_n_logits=5, max_feature_nodes=args.max_feature_nodes, batch_size=64)
    print(
        json.dumps(
            {
                "graph": type(graph).__name__,
                "prompt_tokens": int(graph.input_tokens.numel()),
                "active_features": int(graph.active_features.shape[0]),
                "selected_features": int(graph.selected_features.numel()),
                "adjacency": list(graph.adjacency_matrix.shape),
                "n_logit_targets": len(graph.logit_targets),
                "attribute_s": round(time.perf_counter() - t, 1),
            }
        )
    )
    graph.to_pt(str(Path(args.set) / "graph.pt"))


if __name__ == "__main__":
    main()
