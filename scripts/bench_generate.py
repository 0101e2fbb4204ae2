"""Greedy steered generation: the full recompute per token (the old models.generate) against the
KV-cached models.generate, same tokens checked. Prints seconds and their ratio.

    python scripts/bench_generate.py runs/demo/sae --feature 2387 --strength 45
"""

import argparse
import time

import torch

from sae_lens_lite.data.models import edit_hook, generate
from sae_lens_lite.interpret.intervene import load, positions, steering_edit


def recompute(lm, ids, n, hook, edit_for):
    """The old way: a full forward over the whole text for every new token."""
    out = []
    for _ in range(n):
        with torch.no_grad(), edit_hook(lm.model, hook, edit_for(ids)):
            tok = int(lm.model(input_ids=ids, use_cache=False).logits[0, -1].argmax())
        out.append(tok)
        ids = torch.cat([ids, torch.tensor([[tok]])], 1)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sae")
    p.add_argument("--feature", type=int, default=0)
    p.add_argument("--strength", type=float, default=10.0)
    p.add_argument("--prompt", default="The")
    p.add_argument("--tokens", type=int, nargs="+", default=[20, 64])
    a = p.parse_args()
    lm, sae = load(a.sae, None, "cpu")
    ids = lm.tokenizer(a.prompt, return_tensors="pt")["input_ids"]

    def edit_for(cur):
        return steering_edit(sae, [a.feature], a.strength, "add", positions(lm, sae, cur))

    for n in a.tokens:
        t = time.perf_counter()
        old = recompute(lm, ids, n, sae.cfg.hook, edit_for)
        t_old = time.perf_counter() - t
        t = time.perf_counter()
        new = generate(lm, ids, n, sae.cfg.hook, edit_for).token_ids
        t_new = time.perf_counter() - t
        print(
            f"{n} tokens: recompute {t_old:.2f} s, KV cache {t_new:.2f} s, {t_old / t_new:.1f}x, "
            f"same tokens: {old[: len(new)] == new}"
        )


if __name__ == "__main__":
    main()
