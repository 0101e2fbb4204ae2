"""Use features on the model: steering (add / clamp), ablation, and attribution.

A feature's top activations say when it fires; an intervention says what it does. Everything
here edits the activation at the SAE's hook with `models.edit_hook`, at the positions the SAE
reads (`evaluate.evaluated_positions`: not special tokens, not the first `drop_first` positions
its harvest dropped), and leaves the rest of the forward alone.

    add     x + S · d_j                           d_j = W_dec[j] / input_scale: raising latent j by S
    clamp   x + decode(f with f_j := S) − decode(f)     the SAE's error x − decode(f) is kept, so
                                                        clamping f_j to its own value changes nothing
    ablate  clamp to 0

Attribution is activation × gradient (as in Marks et al. 2024, "Sparse feature circuits"): the
spliced activation is x' = decode(f) + e with e = x − decode(f) held as a value, and

    attr_j(t) = f_j(t) · ∂ log p(target) / ∂f_j(t)      per latent j and position t
    attr_err(t) = e(t) · ∂ log p / ∂x'(t)            the SAE's error, its own entry
    attr_bias(t) = (b_dec / s) · ∂ log p / ∂x'(t)

which add up to x · ∂ log p / ∂x at every spliced position. A latent's attribution is summed over
the prompt's positions: it estimates log p(target) − log p(target | latent zeroed everywhere),
which `ablation_effects` measures by rerunning the model.

A transcoder reads the MLP's input and writes the MLP's output: every edit is made at the hook it
writes, with the latents encoded from the input it reads in the same forward (`reading`); its
"error" is the MLP's output that the latents do not account for (its skip path included).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from sae_lens_lite.config import opt
from sae_lens_lite.data.corpus import special_token_ids
from sae_lens_lite.data.models import LoadedModel, edit_hook, generate, hook_point, load_model
from sae_lens_lite.errors import UserError
from sae_lens_lite.evaluation.evaluate import evaluated_positions
from sae_lens_lite.runtime import resolve_device
from sae_lens_lite.training.sae import SAE

MODES = ("add", "clamp")
ABLATION_BATCH = 16  # prompt copies per forward when ablating latents one by one


@dataclass
class SteerConfig:
    sae: str = opt("runs/sae", "SAE directory whose features steer the model")
    feature: list[int] = opt([], "feature id(s) to steer with (several: each gets the same strength)")
    strength: float = opt(
        10.0,
        "add: how much to raise each latent, in its own activation units (compare the feature's max "
        "activation in the browser); clamp: the value each latent is set to",
    )
    mode: str = opt(
        "add", "add: x + S x decoder direction; clamp: set the latent to S, keeping the SAE's error term", choices=MODES
    )
    prompt: str = opt("", "text to continue")
    max_new_tokens: int = opt(30, "tokens generated after the prompt (fewer if the model ends the text)")
    sample: bool = opt(False, "sample instead of greedy decoding (the same seed for the steered and unsteered text)")
    seed: int = opt(0, "random seed for --sample")
    temperature: float = opt(1.0, "softmax temperature for --sample")
    model: str | None = opt(None, "model to steer; default: the model named in the SAE's config")
    device: str = opt("auto", "cpu, cuda, or auto")


@dataclass
class AttributeConfig:
    sae: str = opt("runs/sae", "SAE directory whose latents are attributed")
    prompt: str = opt("", "text whose next token is explained")
    target: str | None = opt(
        None, "the next token to explain (its text, e.g. ' the'; one token); default: the model's top prediction"
    )
    top: int = opt(10, "features listed each way (raising, lowering); each is checked by a real ablation")
    model: str | None = opt(None, "model to run; default: the model named in the SAE's config")
    device: str = opt("auto", "cpu, cuda, or auto")


# ---- loading and checks ---------------------------------------------------------------------


def load(
    sae_dir: str,
    model: str | None = None,
    device: str = "auto",
    lm: LoadedModel | None = None,
    features: list[int] | None = None,
    sae: SAE | None = None,
) -> tuple[LoadedModel, SAE]:
    """The model and the SAE, checked to fit each other (and `features` to exist) on one device.
    Either may be passed in already loaded (`lm`, `sae`); the other is loaded."""
    dev = resolve_device(device) if lm is None else next(lm.model.parameters()).device
    if sae is None:
        sae = SAE.load(sae_dir, dev).eval().requires_grad_(False)
    if features is not None:  # before the model loads: a typo fails in a second
        check_features(sae, features)
    if not sae.cfg.hook:
        raise UserError(f'{sae_dir}/config.json names no hook; set "hook" there to where the SAE was trained')
    if lm is None:
        name = model or sae.cfg.model
        if not name:
            raise UserError(f"{sae_dir}/config.json names no model; pass --model")
        lm = load_model(name, dev)
    check_fit(lm, sae)
    return lm, sae


def check_fit(lm: LoadedModel, sae: SAE) -> None:
    assert sae.cfg.hook is not None  # load() refuses an SAE that names no hook
    hook_point(lm.model, sae.cfg.hook)
    if lm.d_model != sae.d_in:
        raise UserError(
            f"the SAE reads {sae.d_in}-dim activations but {lm.name} has d_model {lm.d_model}; pass the "
            "model it was trained on (--model)"
        )
    if sae.W_dec.device != _device(lm):
        raise UserError(f"the SAE is on {sae.W_dec.device} but the model on {_device(lm)}; move one (sae.to(device))")


def check_features(sae: SAE, features: list[int]) -> None:
    if not features:
        raise UserError("pass at least one feature id (--feature ID)")
    bad = [j for j in features if not 0 <= j < sae.d_sae]
    if bad:
        raise UserError(f"feature id(s) {bad} out of range: this SAE has features 0..{sae.d_sae - 1}")


def encode_prompt(lm: LoadedModel, prompt: str) -> Tensor:
    """Token ids [1, T] of the prompt (with the tokenizer's usual special tokens), on the model's device."""
    if not prompt.strip():
        raise UserError("the prompt is empty; pass some text with --prompt")
    ids = lm.tokenizer(prompt, return_tensors="pt")["input_ids"]
    return ids.to(_device(lm))


def positions(lm: LoadedModel, sae: SAE, ids: Tensor) -> Tensor:
    """[b, T] True where the SAE reads the activation (as evaluate splices it)."""
    drop_first = int((sae.cfg.meta.get("filters") or {}).get("drop_first", 0))
    return evaluated_positions(ids, special_token_ids(lm.tokenizer), drop_first)


def _device(lm: LoadedModel) -> torch.device:
    return next(lm.model.parameters()).device


# ---- edits at the hook ----------------------------------------------------------------------


def written_hook(sae: SAE) -> str:
    """The hook the SAE's edits are made at: its own, or a transcoder's target (the MLP's output)."""
    hook = sae.cfg.target_hook or sae.cfg.hook
    assert hook is not None  # load() refuses an SAE that names no hook
    return hook


@contextlib.contextmanager
def reading(model, sae: SAE):
    """Yields read(act) → what the SAE reads in the forward now running, for an edit at
    written_hook: act itself for an SAE; for a transcoder, its input, recorded at its own hook."""
    if sae.cfg.target_hook is None:
        yield lambda act: act
        return
    held: dict[str, Tensor] = {}

    def record(a: Tensor) -> None:
        held["x"] = a

    assert sae.cfg.hook is not None  # load() refuses an SAE that names no hook
    with edit_hook(model, sae.cfg.hook, record):
        yield lambda act: held["x"]


def direction(sae: SAE, features: list[int]) -> Tensor:
    """Σ_j W_dec[j] / s [d_out]: what raising each latent by 1 adds to the activation it writes."""
    return sae.W_dec[features].sum(0) / sae.target_scale


def steering_edit(
    sae: SAE, features: list[int], strength: float, mode: str, mask: Tensor, read=lambda act: act
) -> Callable[[Tensor], Tensor]:
    """An edit_hook fn for act [b, T, d] that steers at the positions in mask [b, T]; `read` gives
    what the SAE reads (`reading`; a transcoder's input)."""
    if mode not in MODES:
        raise UserError(f"unknown steering mode {mode!r}; use one of {', '.join(MODES)}")

    def fn(act: Tensor) -> Tensor:
        m = mask.to(act.device)
        x = act[m]  # [n, d]
        if mode == "add":
            delta = strength * direction(sae, features).expand_as(x)
        else:  # clamp: only the change in the reconstruction is written back, the error stays
            f = sae.encode(read(act)[m])  # [n, d_sae]
            f_c = f.clone()
            f_c[:, features] = strength
            delta = sae.decode(f_c) - sae.decode(f)  # exactly 0 where f_c == f
        out = act.clone()
        out[m] = x + delta.to(act.dtype)
        return out

    return fn


def ablation_edit(sae: SAE, features: Tensor, mask: Tensor, read=lambda act: act) -> Callable[[Tensor], Tensor]:
    """Zero latent features[i] in batch row i (clamp to 0, error kept): act [b, T, d], mask [b, T]."""

    def fn(act: Tensor) -> Tensor:
        out, x = act.clone(), read(act)
        for i, j in enumerate(features.tolist()):
            row = steering_edit(sae, [j], 0.0, "clamp", mask[i : i + 1], lambda a, i=i: x[i : i + 1])
            out[i : i + 1] = row(act[i : i + 1])
        return out

    return fn


# ---- generation -----------------------------------------------------------------------------


def steer(cfg: SteerConfig, lm: LoadedModel | None = None, sae: SAE | None = None) -> dict:
    """Generate from cfg.prompt without and with the intervention; prints both and returns
    {"clean": Generation, "steered": Generation, ...}."""
    if cfg.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {cfg.max_new_tokens}")
    if cfg.sample and not cfg.temperature > 0:
        raise UserError(f"--temperature must be positive, got {cfg.temperature}")
    if not math.isfinite(cfg.strength):
        raise UserError(f"--strength must be a finite number, got {cfg.strength}")
    lm, sae = load(cfg.sae, cfg.model, cfg.device, lm, cfg.feature, sae)
    ids = encode_prompt(lm, cfg.prompt)
    limit = lm.max_context
    if limit and ids.shape[1] + cfg.max_new_tokens > limit:
        raise UserError(
            f"prompt ({ids.shape[1]} tokens) + --max-new-tokens {cfg.max_new_tokens} exceeds {lm.name}'s "
            f"context of {limit}"
        )
    kw: dict[str, Any] = dict(sample=cfg.sample, temperature=cfg.temperature, seed=cfg.seed)
    clean = generate(lm, ids, cfg.max_new_tokens, **kw)

    with reading(lm.model, sae) as read:

        def edit_for(cur: Tensor):
            return steering_edit(sae, cfg.feature, cfg.strength, cfg.mode, positions(lm, sae, cur), read)

        steered = generate(lm, ids, cfg.max_new_tokens, written_hook(sae), edit_for, **kw)
    what = (
        f"{cfg.mode} {cfg.strength:g} x feature {', '.join(map(str, cfg.feature))}"
        if cfg.mode == "add"
        else f"feature {', '.join(map(str, cfg.feature))} clamped to {cfg.strength:g}"
    )
    decoding = f"sampled (seed {cfg.seed}, temperature {cfg.temperature:g})" if cfg.sample else "greedy"
    print(f"prompt: {cfg.prompt!r}  ({decoding}, {sae.cfg.hook})")
    print(f"\n[clean]  mean log p {_mean(clean.logprobs):.3f}\n{cfg.prompt}{clean.text}")
    print(f"\n[steered: {what}]  mean log p {_mean(steered.logprobs):.3f}\n{cfg.prompt}{steered.text}")
    return {
        "prompt": cfg.prompt,
        "hook": sae.cfg.hook,
        "mode": cfg.mode,
        "features": cfg.feature,
        "strength": cfg.strength,
        "clean": clean,
        "steered": steered,
    }


def _mean(xs: list[float]) -> float:
    return sum(xs) / max(len(xs), 1)


# ---- attribution and ablation ---------------------------------------------------------------


def _wide(logits: Tensor) -> Tensor:
    """Logits in float32 at least (bf16 log-probs are too coarse to compare), float64 kept."""
    return logits if logits.dtype == torch.float64 else logits.float()


@dataclass
class Attribution:
    target: int  # token id whose log-probability is explained
    logp: float  # log p(target) at the last position, clean model
    latents: Tensor  # [T, d_sae] activation × gradient per position (0 where the SAE is not spliced)
    error: Tensor  # [T] the SAE error term's share
    bias: Tensor  # [T] the decoder bias's share
    total: Tensor = field(repr=False)  # [T] x · ∂log p/∂x; latents.sum(1) + error + bias


def attribution(lm: LoadedModel, sae: SAE, ids: Tensor, target: int | None = None) -> Attribution:
    """Activation × gradient of log p(target | ids) [1, T] for every latent at every spliced
    position; target defaults to the model's top prediction."""
    mask = positions(lm, sae, ids)  # [1, T]
    if not mask.any():
        raise UserError(
            "the prompt has no position the SAE reads (special tokens and the first positions its harvest "
            "dropped are skipped); use a longer prompt"
        )
    saved: dict[str, Tensor] = {}

    def fn(act: Tensor) -> Tensor:
        x = act[mask].to(sae.W_enc.dtype)  # [n, d]: what is replaced (a transcoder: the MLP's output)
        f = sae.encode(read(act)[mask].to(sae.W_enc.dtype)).detach().requires_grad_(True)  # [n, d_sae]
        recon = sae.decode(f)
        err = (x - recon).detach().requires_grad_(True)  # [n, d]: a value, with its own gradient
        out = act.clone()
        out[mask] = (recon + err).to(act.dtype)
        saved.update(f=f, err=err)
        return out

    with torch.enable_grad(), reading(lm.model, sae) as read, edit_hook(lm.model, written_hook(sae), fn):
        logp = _wide(lm.model(input_ids=ids, use_cache=False).logits[0, -1]).log_softmax(-1)  # [vocab]
        if target is None:
            target = int(logp.argmax())
        logp[target].backward()
    f, err = saved["f"], saved["err"]
    assert f.grad is not None and err.grad is not None  # both were leaves of the backward above
    T = ids.shape[1]
    latents = f.new_zeros(T, sae.d_sae)
    latents[mask[0]] = (f * f.grad).detach()
    g = err.grad  # [n, d] = ∂log p/∂x' at the spliced positions
    error, bias = f.new_zeros(T), f.new_zeros(T)
    error[mask[0]] = (err * g).sum(-1).detach()
    bias[mask[0]] = (g @ (sae.b_dec / sae.target_scale)).detach()
    return Attribution(target, float(logp[target].detach()), latents, error, bias, latents.sum(1) + error + bias)


@torch.no_grad()
def ablation_effects(lm: LoadedModel, sae: SAE, ids: Tensor, target: int, features: list[int]) -> Tensor:
    """log p(target) − log p(target | latent j zeroed at every spliced position, error kept),
    measured by rerunning the model, for each j in features → [len(features)]."""
    clean = _wide(lm.model(input_ids=ids, use_cache=False).logits[0, -1]).log_softmax(-1)[target]
    out = []
    for c in range(0, len(features), ABLATION_BATCH):
        feats = torch.tensor(features[c : c + ABLATION_BATCH])
        batch = ids.expand(len(feats), -1)
        mask = positions(lm, sae, batch)
        with (
            reading(lm.model, sae) as read,
            edit_hook(lm.model, written_hook(sae), ablation_edit(sae, feats, mask, read)),
        ):
            logits = lm.model(input_ids=batch, use_cache=False).logits[:, -1]
        out.append(clean - _wide(logits).log_softmax(-1)[:, target])
    return torch.cat(out).cpu() if out else torch.zeros(0)


def target_id(lm: LoadedModel, text: str) -> int:
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = [lm.tokenizer.decode([i]) for i in ids]
        raise UserError(
            f"--target {text!r} is {len(ids)} tokens {pieces}, not one; pass a single token (e.g. {pieces[0]!r})"
            if ids
            else "--target is empty; pass one token's text, or leave it out for the model's top prediction"
        )
    return ids[0]


def attribute(cfg: AttributeConfig, lm: LoadedModel | None = None, sae: SAE | None = None) -> dict:
    """Attribute log p(target next token | prompt) to the SAE's latents; check the listed ones by
    ablation. Prints a table and returns the numbers."""
    if cfg.top < 1:
        raise UserError(f"--top must be at least 1, got {cfg.top}")
    lm, sae = load(cfg.sae, cfg.model, cfg.device, lm, sae=sae)
    ids = encode_prompt(lm, cfg.prompt)
    target = target_id(lm, cfg.target) if cfg.target is not None else None
    a = attribution(lm, sae, ids, target)
    per_latent = a.latents.sum(0).cpu()  # [d_sae] summed over positions
    k = min(cfg.top, sae.d_sae)
    up = per_latent.topk(k).indices.tolist()
    down = per_latent.topk(k, largest=False).indices.tolist()
    up = [j for j in up if per_latent[j] > 0]
    down = [j for j in down if per_latent[j] < 0]
    listed = up + down
    measured = ablation_effects(lm, sae, ids, a.target, listed)
    abl = dict(zip(listed, measured.tolist()))
    toks = [lm.tokenizer.decode([t]) for t in ids[0].tolist()]

    def row(j: int) -> dict:
        pos = a.latents[:, j].cpu()
        where = int(pos.abs().argmax().item())
        return {
            "feature": j,
            "attribution": float(per_latent[j]),
            "ablation": abl[j],
            "per_position": pos.tolist(),
            "top_position": where,
            "top_token": toks[where],
        }

    rows_up, rows_down = [row(j) for j in up], [row(j) for j in down]
    result = {
        "prompt": cfg.prompt,
        "hook": sae.cfg.hook,
        "target": a.target,
        "target_text": lm.tokenizer.decode([a.target]),
        "logp": a.logp,
        "tokens": toks,
        "raising": rows_up,
        "lowering": rows_down,
        "sum_latents": float(per_latent.sum()),
        "error": float(a.error.sum()),
        "bias": float(a.bias.sum()),
        "total": float(a.total.sum()),
        "agreement": agreement(rows_up + rows_down),
    }
    _print_attribution(result)
    return result


def agreement(rows: list[dict], tolerance: float = 0.25) -> dict:
    """How often attribution and measured ablation effect agree in sign, and in size within tolerance."""
    sign = sum((r["attribution"] > 0) == (r["ablation"] > 0) for r in rows)
    size = sum(abs(r["attribution"] - r["ablation"]) <= tolerance * abs(r["ablation"]) for r in rows)
    return {"n": len(rows), "sign": sign, "size": size, "tolerance": tolerance}


def _print_attribution(r: dict) -> None:
    print(f"prompt: {r['prompt']!r}  ({r['hook']})")
    print(f"target next token: {r['target_text']!r} (id {r['target']}), log p = {r['logp']:.3f}")
    print(
        f"attribution = activation x gradient of log p, summed over {len(r['tokens'])} positions; "
        "ablation = log p - log p with the latent zeroed (error term kept), measured"
    )
    for title, rows in (("raising", r["raising"]), ("lowering", r["lowering"])):
        print(f"\n{title} log p:\n  feature  attribution   ablation  strongest at")
        for x in rows:
            print(
                f"  {x['feature']:7d}  {x['attribution']:+11.4f}  {x['ablation']:+9.4f}  "
                f"{x['top_token']!r} (pos {x['top_position']})"
            )
        if not rows:
            print("  (none)")
    g = r["agreement"]
    print(
        f"\nlatents {r['sum_latents']:+.4f} + SAE error {r['error']:+.4f} + decoder bias {r['bias']:+.4f} "
        f"= {r['total']:+.4f} (x . grad at the hook)"
    )
    print(
        f"listed features: ablation agrees in sign for {g['sign']}/{g['n']}, in size within "
        f"{g['tolerance']:.0%} for {g['size']}/{g['n']}"
    )
