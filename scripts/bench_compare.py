"""`sae-lite compare` on N SAEs against `sae-lite evaluate` run on each of them, same tokens.

Both sides run as the CLI a user would type (a fresh process each, so the model load counts
too), without baselines, on the same text, tokens and positions. Prints the wall-clock time of
each and the ratio (one-by-one / compare), and checks that the numbers agree.

    .venv/bin/python scripts/bench_compare.py runs/sae_a runs/sae_b ... \\
        --dataset ../shared/data/wikitext2-test.txt --tokens 2048
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CLI = [sys.executable, "-m", "sae_lens_lite"]


def timed(args: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(CLI + args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("saes", nargs="+")
    p.add_argument("--dataset", default="../shared/data/wikitext2-test.txt")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--out", default="runs/bench_compare")
    a = p.parse_args()
    out = Path(a.out)
    common = ["--dataset", a.dataset, "--tokens", str(a.tokens), "--no-baselines", "--overwrite"]
    t_cmp = timed(["compare", *a.saes, "--out", str(out / "compare"), *common])
    t_each = [timed(["evaluate", "--sae", s, "--out", str(out / f"eval_{i}"), *common]) for i, s in enumerate(a.saes)]
    rows = json.loads((out / "compare" / "compare.json").read_text())["saes"]
    worst = 0.0
    for i, row in enumerate(rows):
        r = json.loads((out / f"eval_{i}" / "report.json").read_text())
        for ours, theirs in (
            (row["kl"], r["ce"]["kl_sae"]),
            (row["ce_loss"], r["ce"]["sae"]),
            (row["explained_variance"], r["reconstruction"]["explained_variance"]),
        ):
            worst = max(worst, abs(ours - theirs) / max(abs(theirs), 1e-12))
    print(f"{len(a.saes)} SAEs, {a.tokens} tokens of {a.dataset}")
    print(f"evaluate one by one: {sum(t_each):.1f} s ({', '.join(f'{t:.1f}' for t in t_each)})")
    print(f"compare, one run:    {t_cmp:.1f} s")
    print(
        f"ratio (one by one / compare): {sum(t_each) / t_cmp:.2f}x; largest relative difference in KL, CE, "
        f"EV: {worst:.1e}"
    )


if __name__ == "__main__":
    main()
