"""Do the demo SAE's features do what their logit lens says, and does attribution predict ablation?

1. Steering. Features are taken in rank order (features.json), or with --order lens by lens score
   (the next token after their top activations is one their lens promotes, above chance), keeping
   the first N whose top logit-lens token is a word (letters only, 3+ characters, not yet taken).
   Each is added (mode add) at strength TIMES x its max activation while generating greedily from
   a few neutral prompts; the table gives log p(that token), averaged over the generated
   positions, with and without steering, and how often it appears.
2. Attribution. For a few prompts, the 10 latents with the largest |attribution| (activation x
   gradient of log p(the model's top next token)) are ablated one at a time (zeroed at every
   position, error term kept); the script counts sign agreement and |attr - ablation| <= 25%.

    .venv/bin/python scripts/steer_table.py --sae /work/main/runs/demo/sae \
        --analysis /work/main/runs/demo/analysis/features.json

Prints markdown tables (docs/analysis.md holds the measured ones).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from sae_lens_lite.data.models import edit_hook, generate
from sae_lens_lite.evaluation.metrics import next_token_logprobs
from sae_lens_lite.interpret.intervene import ablation_effects, attribution, direction, encode_prompt, load, positions

STEER_PROMPTS = ["The", "In this section, we", "My favourite thing is", "Note that the"]
ATTR_PROMPTS = [
    "To open a file for reading, use the built-in function",
    "The for statement is used to iterate over the elements of a",
    "If the key is not found in the dictionary, a KeyError is",
    "Changed in version 3.",
    "The return value is a list of",
]


def pick_features(analysis: dict, n: int, order: str = "rank") -> list[tuple[int, int, str, float]]:
    """(feature, promoted token id, its text, max activation) for the first n by rank, or with
    order="lens" by lens score (how much more often than chance the token after the feature's top
    activations is one its logit lens promotes): the features whose lens the data confirms."""
    vocab, taken, out = analysis["vocab"], set(), []
    key = (lambda f: f["rank"]) if order == "rank" else (lambda f: (-f["lens_score"], f["rank"]))
    for f in sorted(analysis["features"], key=key):
        tok = f["lens"]["promoted"][0][0]
        text = vocab[str(tok)].strip()
        if text.isalpha() and len(text) >= 3 and text.lower() not in taken and f["max_act"] > 0:
            taken.add(text.lower())
            out.append((f["id"], tok, vocab[str(tok)], f["max_act"]))
        if len(out) == n:
            break
    return out


def add_edit(deltas, mask):
    """An edit_hook function adding deltas[i] [d] to row i of the activation at the positions mask [F, t]."""

    def fn(act):
        return torch.where(mask[..., None], act + deltas[:, None, :].to(act.dtype), act)

    return fn


@torch.no_grad()
def steered_batch(lm, sae, ids, deltas, new_tokens: int):
    """Greedy continuations of ids [1, T], row i with deltas[i] [d] added at the positions the SAE
    reads (sae-lite steer --mode add, batched over features, with a KV cache: the 2-core CPU is
    shared); returns the sequences [F, T + n] and the steered log-probs of each generated
    position's prediction [F, n, vocab]."""
    cur = ids.expand(len(deltas), -1)
    logps, past, step_ids, mask = [], None, cur, positions(lm, sae, cur)
    for _ in range(new_tokens):
        with edit_hook(lm.model, sae.cfg.hook, add_edit(deltas, mask)):
            out = lm.model(input_ids=step_ids, past_key_values=past, use_cache=True)
        past = out.past_key_values
        logp = out.logits[:, -1].float().log_softmax(-1)  # [F, vocab]
        logps.append(logp)
        tok = logp.argmax(-1)
        cur = torch.cat([cur, tok[:, None]], 1)
        step_ids, mask = tok[:, None], positions(lm, sae, cur)[:, -1:]
    return cur, torch.stack(logps, 1)


def steer_rows(lm, sae, feats, times: float, new_tokens: int) -> list[dict]:
    toks = torch.tensor([t for _, t, _, _ in feats])
    deltas = torch.stack([times * max_act * direction(sae, [j]) for j, _, _, max_act in feats])  # [F, d]
    lp_clean, lp_steer, lp_forced = [], [], []
    n_clean, n_steer = torch.zeros(len(feats), dtype=torch.long), torch.zeros(len(feats), dtype=torch.long)
    samples = {}

    def at_tokens(logp):  # [F, n, vocab] -> [F, n]: row i's log p of feature i's lens token
        return logp.gather(2, toks[:, None, None].expand(-1, logp.shape[1], 1))[..., 0]

    for p in STEER_PROMPTS:
        ids = encode_prompt(lm, p)
        T = ids.shape[1]
        g = generate(lm, ids, new_tokens)
        full = torch.cat([ids, torch.tensor([g.token_ids], device=ids.device)], 1)
        with torch.no_grad():
            lc = next_token_logprobs(lm.model, full)[0, T - 1 :]  # [n, vocab]
        lp_clean.append(lc[:, toks].T)  # [F, n]
        # The same (unsteered) text read with the direction added: the direction's effect on the
        # token, without the steered text drifting elsewhere.
        fb = full.expand(len(feats), -1)
        lf = next_token_logprobs(lm.model, fb, sae.cfg.hook, add_edit(deltas, positions(lm, sae, fb)))[
            :, T - 1 :
        ]  # [F, n, vocab]
        lp_forced.append(at_tokens(lf))
        n_clean += (full[0, T:, None] == toks).sum(0)
        seq, logp = steered_batch(lm, sae, ids, deltas, new_tokens)
        lp_steer.append(at_tokens(logp))
        n_steer += (seq[:, T:] == toks[:, None]).sum(1)
        for i in range(len(feats)):
            samples.setdefault(i, (p, lm.tokenizer.decode(seq[i, T:].tolist()), g.text))
        print(f"prompt {p!r} done", flush=True)
    mc, ms, mf = torch.cat(lp_clean, 1).mean(1), torch.cat(lp_steer, 1).mean(1), torch.cat(lp_forced, 1).mean(1)
    rows = []
    for i, (j, tok, text, max_act) in enumerate(feats):
        rows.append(
            dict(
                feature=j,
                token=text,
                max_act=max_act,
                strength=times * max_act,
                logp_clean=float(mc[i]),
                logp_steered=float(ms[i]),
                delta=float(ms[i] - mc[i]),
                logp_forced=float(mf[i]),
                delta_forced=float(mf[i] - mc[i]),
                count_clean=int(n_clean[i]),
                count_steered=int(n_steer[i]),
                sample=samples[i],
            )
        )
    return rows


def attr_rows(lm, sae, top: int) -> list[dict]:
    rows = []
    for p in ATTR_PROMPTS:
        ids = encode_prompt(lm, p)
        a = attribution(lm, sae, ids)
        per = a.latents.sum(0).cpu()
        feats = per.abs().topk(top).indices.tolist()
        abl = ablation_effects(lm, sae, ids, a.target, feats).tolist()
        sign = sum((per[j] > 0) == (m > 0) for j, m in zip(feats, abl))
        size = sum(abs(float(per[j]) - m) <= 0.25 * abs(m) for j, m in zip(feats, abl))
        pairs = [(j, float(per[j]), m) for j, m in zip(feats, abl)]
        rows.append(
            dict(
                prompt=p,
                target=lm.tokenizer.decode([a.target]),
                logp=a.logp,
                sign=sign,
                size=size,
                n=len(feats),
                pairs=pairs,
            )
        )
        print(
            f"{p!r} -> {rows[-1]['target']!r}: sign {sign}/{len(feats)}, size within 25% {size}/{len(feats)}",
            flush=True,
        )
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sae", default="runs/demo/sae")
    ap.add_argument("--analysis", default="runs/demo/analysis/features.json")
    ap.add_argument("--features", type=int, default=10)
    ap.add_argument(
        "--times", type=float, default=4.0, help="steering strength as a multiple of the feature's max activation"
    )
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument(
        "--order",
        choices=["rank", "lens"],
        default="rank",
        help="which features to steer: the first by monosemanticity rank, or by lens score (lens confirmed by data)",
    )
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--skip-steer", action="store_true")
    ap.add_argument("--skip-attr", action="store_true")
    args = ap.parse_args()
    t0 = time.time()
    lm, sae = load(args.sae, device="cpu")
    if not args.skip_steer:
        feats = pick_features(json.load(open(args.analysis)), args.features, args.order)
        rows = steer_rows(lm, sae, feats, args.times, args.new_tokens)
        print(
            f"\nsteering: add {args.times:g} x max activation, greedy, {args.new_tokens} new tokens from "
            f"each of {len(STEER_PROMPTS)} prompts {STEER_PROMPTS}\n"
        )
        print(
            "| feature | lens token | strength | log p clean | log p steered | Δ | log p, clean text steered | Δ | "
            "count clean → steered | steered sample |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in rows:
            s = (r["sample"][0] + r["sample"][1]).replace("\n", "↵").replace("|", "\\|")
            print(
                f"| {r['feature']} | `{r['token']!r}` | {r['strength']:.1f} | {r['logp_clean']:.2f} | "
                f"{r['logp_steered']:.2f} | "
                f"{r['delta']:+.2f} | {r['logp_forced']:.2f} | {r['delta_forced']:+.2f} | "
                f"{r['count_clean']} → {r['count_steered']} | {s} |"
            )
        print(
            f"\nraised in the steered text: {sum(r['delta'] > 0 for r in rows)}/{len(rows)}; "
            f"in the clean text with the direction added: {sum(r['delta_forced'] > 0 for r in rows)}/{len(rows)}"
        )
    if args.skip_attr:
        return
    arows = attr_rows(lm, sae, args.top)
    print("\n| prompt | target | log p | sign agrees | within 25% |\n| --- | --- | --- | --- | --- |")
    for r in arows:
        print(f"| {r['prompt']} | `{r['target']!r}` | {r['logp']:.2f} | {r['sign']}/{r['n']} | {r['size']}/{r['n']} |")
    print("\nper prompt (feature: attribution / ablation):")
    for r in arows:
        print(f"{r['prompt']!r}: " + ", ".join(f"{j}: {a:+.3f}/{m:+.3f}" for j, a, m in r["pairs"]))
    print(f"\n{time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
