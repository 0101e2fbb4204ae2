"""Check that two runs of the same run file wrote the same results: a refactor's guard.

    sae-lite run configs/demo.toml out=/tmp/before      # on the old commit
    sae-lite run configs/demo.toml out=/tmp/after       # on the new one, same threads
    python scripts/check_same_run.py /tmp/before /tmp/after

Tensors in safetensors files must be byte-identical (their header metadata is compared as JSON,
the order of its keys aside), and so must every other binary file. JSON, JSONL and CSV files are
compared value by value, Markdown as text, after dropping what differs between any two runs
(wall-clock times, the run's own paths, when it finished); a number must be equal, not close.
Images and pages are skipped (matplotlib stamps them). Prints one line per difference and exits 1
if there is any.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import re
import sys
from pathlib import Path

SKIP_SUFFIXES = {".png", ".html"}  # rendered from the compared data, and stamped
VOLATILE = {"seconds", "timing_s", "created", "finished", "time", "elapsed_s", "cpu_seconds", "date", "version"}


def volatile(key: str) -> bool:
    return key in VOLATILE or key.endswith(("_seconds", "_s", "_time", "tok_per_s"))


def scrub(value, roots: tuple[str, str]):
    """The value with volatile keys removed and each run's own directory replaced by RUN."""
    if isinstance(value, dict):
        return {k: scrub(v, roots) for k, v in value.items() if not volatile(k)}
    if isinstance(value, list):
        return [scrub(v, roots) for v in value]
    if isinstance(value, str):
        for root in roots:
            value = value.replace(root, "RUN")
        value = re.sub(r"\bin [0-9.,]+ s\b", "in N s", value)  # a result line's duration
    return value


def first_difference(a, b, where: str = "") -> str | None:
    if type(a) is not type(b):
        return f"{where}: {a!r} vs {b!r}"
    if isinstance(a, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                return f"{where}.{k}: only in {'before' if k in a else 'after'}"
            found = first_difference(a[k], b[k], f"{where}.{k}")
            if found:
                return found
        return None
    if isinstance(a, list):
        if len(a) != len(b):
            return f"{where}: {len(a)} vs {len(b)} items"
        for i, (x, y) in enumerate(zip(a, b)):
            found = first_difference(x, y, f"{where}[{i}]")
            if found:
                return found
        return None
    return None if a == b else f"{where}: {a!r} vs {b!r}"


def safetensors_parts(path: Path, roots: tuple[str, str]) -> tuple[dict, bytes]:
    """(its header, metadata scrubbed, the tensors' bytes) of a safetensors file."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    meta = {k: scrub(v, roots) for k, v in header.pop("__metadata__", {}).items()}
    return {"metadata": meta, "tensors": header}, data[8 + n :]


def load(path: Path, roots: tuple[str, str]):
    text = path.read_text()
    if path.suffix == ".md":
        return scrub(text, roots)
    if path.suffix == ".json":
        return scrub(json.loads(text), roots)
    if path.suffix == ".jsonl":
        return [scrub(json.loads(line), roots) for line in text.splitlines() if line.strip()]
    rows = list(csv.DictReader(text.splitlines()))
    return [scrub(dict(r), roots) for r in rows]


def compare(before: Path, after: Path) -> list[str]:
    roots = (str(before.resolve()), str(after.resolve()))
    names = {p.relative_to(before) for p in before.rglob("*") if p.is_file()}
    names |= {p.relative_to(after) for p in after.rglob("*") if p.is_file()}
    problems = []
    for name in sorted(names):
        a, b = before / name, after / name
        if not a.exists() or not b.exists():
            problems.append(f"{name}: only in {'before' if a.exists() else 'after'}")
        elif name.suffix in SKIP_SUFFIXES:
            continue
        elif name.suffix in (".json", ".jsonl", ".csv", ".md"):
            found = first_difference(load(a, roots), load(b, roots))
            if found:
                problems.append(f"{name}{found}")
        elif name.suffix == ".safetensors":
            (head_a, tensors_a), (head_b, tensors_b) = safetensors_parts(a, roots), safetensors_parts(b, roots)
            found = first_difference(head_a, head_b, ":header")
            if found or tensors_a != tensors_b:
                problems.append(f"{name}{found or ': tensor bytes differ'}")
        elif hashlib.sha256(a.read_bytes()).digest() != hashlib.sha256(b.read_bytes()).digest():
            problems.append(f"{name}: bytes differ")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    args = parser.parse_args()
    for d in (args.before, args.after):
        if not d.is_dir():
            sys.exit(f"{d} is not a directory; pass two run output directories")
    problems = compare(args.before, args.after)
    for p in problems:
        print(p)
    n = sum(1 for p in args.before.rglob("*") if p.is_file())
    print(f"{'DIFFERENT' if problems else 'same'}: {len(problems)} difference(s) over {n} files")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
