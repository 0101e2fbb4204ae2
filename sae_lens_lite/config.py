"""Config plumbing shared by every stage: documented fields, dataclass → CLI flags, run files.

Each stage owns one small dataclass config. Its fields carry their --help text, so the CLI is
generated from the configs and cannot drift from them; a run file (TOML, see configs/) has one
table per stage with the same keys.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import tomllib
import typing
from pathlib import Path

from sae_lens_lite.errors import UserError


def opt(default, help: str, **kw):
    """A config field with its --help text. `flag="--x"` adds a short alias for the CLI."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return dataclasses.field(default=default, metadata={"help": help, **kw})


def _field_type(cls, f: dataclasses.Field):
    hints = typing.get_type_hints(cls)
    tp = hints[f.name]
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        return list, (args[0] if args else str)
    if args and origin is not None:  # Optional[X] / X | None
        return args[0], None
    return tp, None


def add_dataclass_args(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """One flag per field: `foo_bar` → `--foo-bar`; bools get --x/--no-x; lists take several values."""
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        help = f.metadata.get("help", "").replace("%", "%%")  # argparse formats help with %
        names = [f"--{f.name.replace('_', '-')}"]
        if "flag" in f.metadata:
            names.insert(0, f.metadata["flag"])
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        tp, item = _field_type(cls, f)
        kw: dict[str, typing.Any] = dict(
            dest=f.name, default=default, help=f"{help} (default: {str(default).replace('%', '%%')})"
        )
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        if tp is bool:
            parser.add_argument(*names, action=argparse.BooleanOptionalAction, **kw)
        elif tp is list:
            parser.add_argument(*names, nargs="+", type=item, **kw)
        elif tp in (int, float, str):
            parser.add_argument(*names, type=tp, **kw)
        else:  # dicts and other structures are set in run files only
            continue


def check_numbers(cfg, **bounds) -> None:
    """Refuse a number a user passed that cannot work, naming its flag. Each bound is "positive"
    (> 0), "non-negative" (>= 0), "fraction" (strictly between 0 and 1) or (low, high), inclusive,
    either side None for open. Also refused: NaN, infinities, text or booleans where a number
    belongs (run files are typed by hand), and fractions in whole-number fields. None passes (unset)."""
    hints = typing.get_type_hints(type(cfg))
    for name, bound in bounds.items():
        v, flag = getattr(cfg, name), f"--{name.replace('_', '-')}"
        if v is None:
            continue
        whole = int in (hints[name], *typing.get_args(hints[name]))
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise UserError(f"{flag} must be a number, got {v!r}")
        if not math.isfinite(v):
            raise UserError(f"{flag} must be a finite number, got {v}")
        if whole and not float(v).is_integer():
            raise UserError(f"{flag} must be a whole number, got {v}")
        if bound == "positive" and not v > 0:
            raise UserError(f"{flag} must be a positive {'integer' if whole else 'number'}, got {v}")
        if bound == "non-negative" and not v >= 0:
            raise UserError(f"{flag} must not be negative, got {v}")
        if bound == "fraction" and not 0 < v < 1:
            raise UserError(f"{flag} must lie strictly between 0 and 1, got {v}")
        if isinstance(bound, tuple):
            lo, hi = bound
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                span = f"at least {lo}" if hi is None else f"at most {hi}" if lo is None else f"between {lo} and {hi}"
                raise UserError(f"{flag} must be {span}, got {v}")
        if whole:
            setattr(cfg, name, int(v))


def check_memory(nbytes: float, device, what: str, fix: str) -> None:
    """Refuse settings whose tensors cannot fit on `device` (a torch.device) before allocating
    them: an absurd --expansion or --top-k should be one line, not minutes of swapping or an
    out-of-memory kill. `nbytes` is an estimate of the peak; `fix` says which flag to lower."""
    import torch

    if device.type == "cuda":
        have = torch.cuda.get_device_properties(device).total_memory
    else:
        try:
            have = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return  # no way to tell on this platform
    if nbytes > have:
        raise UserError(
            f"{what} needs about {nbytes / 2**30:.1f} GiB but the {device.type} has {have / 2**30:.1f} GiB; {fix}"
        )


def from_namespace(cls, ns: argparse.Namespace):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(ns).items() if k in names})


def build(cls, values: dict, section: str = "", extra: tuple[str, ...] = ()):
    """Make a config from a dict, naming unknown keys (typos in run files are common) and values
    of the wrong type. `extra`: keys the caller handles itself, listed among the valid ones."""
    names = {f.name for f in dataclasses.fields(cls)}
    where = f"[{section}] " if section else ""
    unknown = sorted(set(values) - names)
    if unknown:
        close = [m for u in unknown for m in difflib.get_close_matches(u, [*names, *extra], n=1)]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserError(
            f"{where}unknown setting(s) {', '.join(unknown)}{hint}; valid: {', '.join(sorted([*names, *extra]))}"
        )
    for f in dataclasses.fields(cls):
        if f.name in values:
            _check_type(cls, f, values[f.name], where)
    return cls(**values)


def _check_type(cls, f: dataclasses.Field, value, where: str) -> None:
    """A run-file value of the wrong type fails here, before any stage runs, not deep inside one."""
    tp, item = _field_type(cls, f)
    if value is None and f.default is None:
        return
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
        list: lambda v: isinstance(v, list) and all(isinstance(x, item) for x in v),
    }.get(tp)
    if ok is not None and not ok(value):
        want = {
            bool: "true or false",
            int: "an integer",
            float: "a number",
            str: "a string",
            list: f"a list of {getattr(item, '__name__', item)}",
        }[tp]
        raise UserError(f"{where}{f.name} = {value!r} should be {want}")
    if "choices" in f.metadata and value not in f.metadata["choices"]:
        raise UserError(f"{where}{f.name} = {value!r} is not one of {', '.join(f.metadata['choices'])}")


def parse_value(text: str):
    """A key=value override's value, read as TOML (numbers, booleans, lists), else a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def load_run_file(path: str | Path, overrides: list[str]) -> dict:
    """Read a TOML run file and apply `section.key=value` (or top-level `key=value`) overrides."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"run file {path} not found; see configs/ for examples")
    try:
        cfg = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path} is not valid TOML: {e}") from None
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} must look like section.key=value (e.g. train.l1=3)")
        key, value = item.split("=", 1)
        *sections, leaf = key.strip().split(".")
        node = cfg
        for s in sections:
            node = node.setdefault(s, {})
            if not isinstance(node, dict):
                raise UserError(f"override {item!r}: {s} is not a section")
        node[leaf] = parse_value(value.strip())
    return cfg
