"""`sae-lite`: argument parsing only. Every stage of the registry (stages.py) is a subcommand that
maps its flags onto the stage's config dataclass and calls the stage's function; errors a user
can fix print as one line, exit 2."""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys

from sae_lens_lite import __version__, stages
from sae_lens_lite.config import add_dataclass_args, from_namespace, load_run_file
from sae_lens_lite.errors import UserError
from sae_lens_lite.outputs import plural

EPILOG = """\
typical session:
  sae-lite harvest --model smollm2-135m --hook blocks.6.hook_resid_post --dataset pydoc --tokens 100000 --out runs/acts
  sae-lite train --acts runs/acts --expansion 8 --out runs/sae
  sae-lite evaluate --sae runs/sae --dataset held_out.txt
  sae-lite probe --sae runs/sae
  sae-lite compare runs/sae runs/sae_topk runs/imported --dataset held_out.txt --out runs/compare
  sae-lite analyze --sae runs/sae --acts runs/acts --out runs/analysis
  sae-lite export --sae runs/sae --format saelens --out runs/saelens
  sae-lite info runs/sae
  sae-lite steer --sae runs/sae --feature 123 --strength 20 --prompt "The function"
  sae-lite attribute --sae runs/sae --prompt "import numpy as"
  sae-lite sweep --sae runs/sae --analysis runs/analysis --top 20
or all of it from one file:
  sae-lite run configs/demo.toml train.l1=3
Interrupted work resumes when the same command is run again; finished work with the same
settings is left as it is; --overwrite redoes it."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sae-lite",
        description="Train, evaluate, inspect and export sparse autoencoders on language-model activations.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"sae-lite {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for stage in stages.STAGES:
        add_stage(sub, stage)
    add_tools(sub)
    return p


def add_stage(sub, stage: stages.Stage) -> None:
    """A stage's subcommand: one flag per field of its config (config.py), its list field given
    as positional arguments where it has one."""
    sp = sub.add_parser(stage.name, help=stage.help, description=stage.help)
    if stage.positional:
        field, metavar, help = stage.positional
        sp.add_argument(field, nargs="+", metavar=metavar, help=help)
    add_dataclass_args(sp, stage.config, skip=stage.positional[:1])
    sp.set_defaults(stage=stage)


def add_tools(sub) -> None:
    """The commands that are not stages: run files, a model's hooks, a cache's checks, info."""
    run = sub.add_parser(
        "run",
        help="every stage from a run file (configs/*.toml) with key=value overrides",
        description="Run harvest, train, evaluate, analyze and export from one TOML file. "
        "Overrides look like train.l1=3 or harvest.tokens=50000.",
    )
    run.add_argument("config", help="TOML run file, e.g. configs/demo.toml")
    run.add_argument("overrides", nargs="*", help="section.key=value settings that replace the file's")

    hooks = sub.add_parser("hooks", help="list a model's hook points", description="List the hook points of a model.")
    hooks.add_argument("--model", default="smollm2-135m", help="hub id, local directory, .gguf file or smollm2-135m")

    cache = sub.add_parser("cache", help="inspect or verify an activation cache")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    verify = cache_sub.add_parser("verify", help="check every shard's sha256 against the manifest")
    verify.add_argument("dir", help="activation cache directory")
    info = cache_sub.add_parser("info", help="print the manifest summary")
    info.add_argument("dir", help="activation cache directory")

    what = (
        "what a directory holds: a cache (complete or partial), an SAE (config, training, evaluation), "
        "an analysis, an evaluation or an export"
    )
    info = sub.add_parser("info", help=what, description=what[0].upper() + what[1:] + ".")
    info.add_argument("path", help="a directory written by sae-lite (or a file in one)")


def dispatch(args: argparse.Namespace) -> int:
    if "stage" in args:
        args.stage.run(from_namespace(args.stage.config, args))  # each stage ends by printing its result line
        return 0
    cmd = args.command
    if cmd == "run":
        from sae_lens_lite.pipeline import run_pipeline

        run_pipeline(load_run_file(args.config, args.overrides))
        return 0
    if cmd == "info":
        from sae_lens_lite.info import describe

        print(describe(args.path))
        return 0
    if cmd == "hooks":
        from sae_lens_lite.data.models import hook_names, load_model

        print("\n".join(hook_names(load_model(args.model).model)))
        return 0
    from sae_lens_lite.data.cache import ActivationCache  # cmd == "cache"

    c = ActivationCache.open(args.dir)
    if args.cache_command == "verify":
        from tqdm.auto import tqdm

        with tqdm(range(c.n_shards), desc="verify", unit="shard") as shards:  # closed before an error line
            for i in shards:
                c.check_shard(i, all_on_failure=True)
        print(f"{args.dir}: {plural(c.n_shards, 'shard')}, {c.n_tokens:,} rows, all checksums match")
    else:
        print(json.dumps({k: v for k, v in c.manifest.items() if k not in ("shards", "harvest_config")}, indent=2))
    return 0


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """parse_args, but an unknown flag is reported by its subcommand (its usage, not the
    top-level one) with the closest valid flag."""
    args, extra = parser.parse_known_args(argv)
    if not extra:
        return args
    sub: argparse.ArgumentParser = next(
        a for a in parser._actions if isinstance(a, argparse._SubParsersAction)
    ).choices[args.command]
    if args.command == "cache":
        sub = next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction)).choices[args.cache_command]
    flags = [o for a in sub._actions for o in a.option_strings]
    hints = []
    for e in extra:
        close = difflib.get_close_matches(e.split("=")[0], flags, n=1, cutoff=0.6) if e.startswith("-") else []
        if close:
            hints.append(f"{e}: did you mean {close[0]}?")
    sub.error(f"unrecognized arguments: {' '.join(extra)}" + "".join(f"; {h}" for h in hints))


def main(argv: list[str] | None = None) -> int:
    rc = _main(argv)
    runtime = sys.modules.get(f"{__package__}.runtime")  # not imported: no group was joined
    if runtime is not None:
        runtime.exit_if_distributed(rc)  # under torchrun: leave the group, skip the teardown
    return rc


# Commands whose rerun picks up where an interrupted run stopped (shards, checkpoints, finished
# stages, finished probing tasks); the others start over.
RESUMES = ("harvest", "train", "run", "probe", "compare")


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parse(parser, argv)
    try:
        rc = dispatch(args)
        sys.stdout.flush()  # inside the try: a closed pipe shows up here, not at exit
        return rc
    except BrokenPipeError:
        # The reader went away (`sae-lite hooks | head`): stop quietly, as `yes | head` does, and
        # point stdout at /dev/null so that Python's own flush at exit does not complain again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, the shell's status for a process ended by a closed pipe
    except UserError as e:
        print(f"sae-lite {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        again = "resume" if args.command in RESUMES else "start it over (nothing was marked finished)"
        print(f"sae-lite {args.command}: interrupted; run the same command again to {again}", file=sys.stderr)
        return 130
    except OSError as e:  # a full disk or unreadable file deep inside a library
        print(
            f"sae-lite {args.command}: error: {e.strerror or e} ({getattr(e, 'filename', '') or ''})", file=sys.stderr
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
