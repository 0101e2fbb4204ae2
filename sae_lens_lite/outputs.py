"""One rule for existing outputs, applied by every stage, and the line each stage ends with.

A stage records what it made its output from in `provenance.json` in its output directory:
its settings (the config fields that change the result) and a fingerprint (sha256) of each input
it read. Run again on the same directory, it compares:

- same settings and inputs      → "complete, nothing to do", and the recorded result line;
- different settings or inputs  → a refusal naming each difference;
- `--overwrite`                 → the stage is done again (the record is removed first, so an
                                  interrupted redo never looks finished).

The activation cache keeps the same rule with its manifest as the record (harvest.py), since a
cache directory must hold nothing else. The record is written last, after every other file of
the stage, so its presence means the output is complete.

A stage declares once, as an `Output`, what the rule reads: which config fields name its inputs,
which do not change its result, how its folder is claimed and how its result is recorded
(provenance.json, or the cache's manifests). `Output.start` then gives the stage a `StageRun`
that applies the rule (`done`), claims the folder (`claim`) and records the result (`finish`);
the stage only says when, after its own checks of what it was given.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from sae_lens_lite import __version__
from sae_lens_lite.errors import UserError
from sae_lens_lite.fsutil import claim_out_dir, prepare_out_dir, sha256_file, write_json_atomic

RECORD = "provenance.json"
# Config fields that say where to write or how fast, not what to compute.
NOT_SETTINGS = ("out", "overwrite", "device", "compile", "log_every", "checkpoint_every", "wandb", "trust_remote_code")


def settings_of(cfg, skip: tuple[str, ...] = ()) -> dict:
    """The fields of a stage config that decide its result, as plain JSON values."""
    d = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_SETTINGS and k not in skip}
    return json.loads(json.dumps(d))


def fingerprint(path: str | os.PathLike | None) -> str | None:
    """A sha256 naming the content of an input: an activation cache (its shards' hashes, from the
    manifest), an SAE directory (its weights), an analysis (features.json), a file's bytes.
    None for what is not on disk (pydoc, a hub id)."""
    if not path:
        return None
    p = Path(path)
    if p.is_file():
        return sha256_file(p)
    if not p.is_dir():
        return None
    if (p / "manifest.json").exists():
        m = json.loads((p / "manifest.json").read_text())
        h = hashlib.sha256()
        for s in m.get("shards", []):
            h.update(s["sha256"].encode())
        return h.hexdigest()
    for name in ("sae.safetensors", "features.json", "sae_weights.safetensors", "dictionary.safetensors"):
        if (p / name).exists():
            return sha256_file(p / name)
    files = sorted(p.glob("*.safetensors")) or sorted(p.glob("*.txt"))
    h = hashlib.sha256()
    for f in files:
        h.update(sha256_file(f).encode())
    return h.hexdigest() if files else None


def read_record(out: str | os.PathLike) -> dict | None:
    f = Path(out) / RECORD
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError:
        return None  # a damaged record proves nothing: the stage runs (or refuses) as if absent


def differences(recorded: dict, now: dict, names: dict[str, str] | None = None) -> list[str]:
    """'key (was A, now B)' for every setting that differs; a setting that is a dict on both sides
    by each entry inside it ('filters.drop_first (was 0, now 2)'). `names` gives a key the name the
    user knows it by (its flag), where that is not the key."""
    out = []
    for k in sorted(set(recorded) | set(now)):
        a, b = recorded.get(k), now.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{k}.{d}" for d in differences(a, b)]
        elif a != b:
            out.append(f"{(names or {}).get(k, k)} (was {a!r}, now {b!r})")
    return out


def existing(out: str | os.PathLike, stage: str, settings: dict, inputs: dict, overwrite: bool) -> dict | None:
    """The rerun rule. Returns the recorded result when `out` already holds this stage's finished
    output made from the same settings and inputs (the caller then returns it at once); None when
    the stage must run; raises UserError naming the differences otherwise."""
    rec = read_record(out)
    if rec is None:
        return None
    if overwrite:
        (Path(out) / RECORD).unlink(missing_ok=True)
        return None
    if rec.get("stage") != stage:
        raise UserError(f"{out} holds the output of `{rec.get('stage')}`, not of `{stage}`: choose another --out")
    diff = differences(rec.get("settings", {}), settings)
    diff += [
        f"input {k} (its content changed)"
        for k in sorted(set(inputs) | set(rec.get("inputs", {})))
        if rec.get("inputs", {}).get(k) != inputs.get(k)
    ]
    if diff:
        raise UserError(
            f"{out} holds the output of `sae-lite {stage}`, made differently (differs in: {'; '.join(diff)}); "
            "pass --overwrite to redo it, or choose another --out"
        )
    print(f"{stage}: {out} is complete, nothing to do (same settings and inputs; --overwrite redoes it)")
    print(rec["line"])
    return rec.get("result", {})


def finish(out: str | os.PathLike, stage: str, settings: dict, inputs: dict, result: dict, line: str) -> None:
    """Record a finished stage (last, after its other files) and print its result line."""
    write_json_atomic(
        Path(out) / RECORD,
        {
            "stage": stage,
            "settings": settings,
            "inputs": inputs,
            "result": result,
            "line": line,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "sae_lens_lite_version": __version__,
        },
    )
    print(line)


def resumable_folder(marker: str, debris: tuple[str, ...] = ()) -> Callable[[Path, Any], Path]:
    """The claim of a stage that writes into a folder it may resume: fsutil.prepare_out_dir."""
    return lambda out, cfg: prepare_out_dir(out, cfg.overwrite, marker, debris)


def report_folder(report: str, ours: tuple[str, ...], what: str) -> Callable[[Path, Any], Path]:
    """The claim of a stage that writes a report: fsutil.claim_out_dir."""
    return lambda out, cfg: claim_out_dir(out, cfg.overwrite, report, ours, what)


class Record(Protocol):
    """How a stage records its finished output, and finds it finished when run again."""

    def done(self, run: StageRun) -> dict | None: ...  # the recorded result, or None: run the stage

    def finish(self, run: StageRun, result: dict, line: str) -> None: ...  # record it, print its line


class Provenance:
    """The record of most stages: provenance.json, written last; the rule is `existing`'s."""

    def done(self, run: StageRun) -> dict | None:
        return existing(run.out, run.output.stage, run.settings, run.inputs, run.cfg.overwrite)

    def finish(self, run: StageRun, result: dict, line: str) -> None:
        finish(run.out, run.output.stage, run.settings, run.inputs, result, line)


@dataclasses.dataclass(frozen=True)
class Output:
    """How a stage keeps its output folder, declared once beside its config."""

    stage: str  # the stage's name, as in stages.py: its command and the "stage" of its record
    claim: Callable[[Path, Any], Path]  # (folder, config) → the folder made, other work refused
    inputs: tuple[str, ...] = ()  # config fields naming what it reads: recorded by content (fingerprint)
    skip: tuple[str, ...] = ()  # config fields that are not settings (beyond NOT_SETTINGS), often its inputs
    record: Record = Provenance()  # how its finished output is recorded, and found finished again

    def start(self, cfg, out: str | os.PathLike | None = None, skip: tuple[str, ...] = ()) -> StageRun:
        """A run of the stage with `cfg` into `out` (default cfg.out); `skip`: more fields that are
        not settings for this run."""
        inputs = {k: fingerprint(getattr(cfg, k)) for k in self.inputs if getattr(cfg, k)}
        settings = settings_of(cfg, (*self.skip, *skip))
        return StageRun(self, cfg, Path(cfg.out if out is None else out), settings, inputs)


@dataclasses.dataclass
class StageRun:
    """One run of a stage into its folder: the rerun rule, the claim of the folder and the record."""

    output: Output
    cfg: Any  # the stage's config dataclass
    out: Path
    settings: dict
    inputs: dict

    def done(self) -> dict | None:
        """The recorded result when the folder holds this stage's output made the same way (said, with
        the result line: the stage returns at once); None when it must run; a UserError otherwise."""
        return self.output.record.done(self)

    def claim(self) -> Path:
        """The output folder, made; refused while it holds other work (unless --overwrite)."""
        return self.output.claim(self.out, self.cfg)

    def finish(self, result: dict, line: str) -> None:
        """The record of the finished stage (its last file) and its result line, printed."""
        self.output.record.finish(self, result, line)


def warn(message: str) -> None:
    """A request that cannot be met as asked: said on stderr, and the stage goes on."""
    print(f"warning: {message}", file=sys.stderr)


def plural(n: int, word: str) -> str:
    """'1 shard', '2 shards', '1,024 shards': a count and its noun, in the right number."""
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"
