"""Data flows one way through sae_lens_lite: a module imports from its own stage or an earlier
one, never from a later stage (STYLE.md, "Nothing downstream is imported upstream").

The stages, earliest first:

    foundations   __init__, errors, fsutil, config, outputs, runtime (device, dtype, process group)
    models        load a model, name its hook points
    corpus        read, tokenise, pack and filter text
    cache         the activation cache on disk (its writers, the sharded one included, and reader)
    harvest       run the model over a corpus into a cache
    sae           the SAE module; synthetic data with known features
    training      recipes/ (one module per method), loss, distributed (DDP, latent sharding), train
    evaluation    baselines, report, evaluate
    analysis      explain, browser/, analyze, intervene, compare
    export        export (SAELens, dictionaries), info
    entry points  pipeline, cli, __main__

Every import counts: at module level, inside a function (a lazy import is a dependency all the
same), and under `if TYPE_CHECKING:` too (a type hint naming a later stage's class ties the
module to that stage; today's such imports all stay inside the training stage, where recipes
name TrainConfig and train builds recipes). Within a stage imports may go either way.

A module that is in no stage fails the test, so a new module gets placed deliberately; so does
a stage entry naming a module that no longer exists.
"""

import ast
from pathlib import Path

import sae_lens_lite

ROOT = "sae_lens_lite"
PACKAGE = Path(sae_lens_lite.__file__).parent

STAGES = [
    ("foundations", {"__init__", "errors", "fsutil", "config", "outputs", "runtime"}),
    ("models", {"models"}),
    ("corpus", {"corpus"}),
    ("cache", {"cache"}),
    ("harvest", {"harvest"}),
    ("sae", {"sae", "synthetic"}),
    ("training", {"recipes", "loss", "distributed", "train"}),
    ("evaluation", {"baselines", "report", "evaluate"}),
    ("analysis", {"explain", "contexts", "browser", "analyze", "intervene", "sweep", "compare"}),
    ("export", {"export", "info"}),
    ("entry points", {"pipeline", "cli", "__main__"}),
]
STAGE = {unit: i for i, (_, units) in enumerate(STAGES) for unit in units}


def module_name(path: str) -> str:
    """ "recipes/kl.py" → sae_lens_lite.recipes.kl; "browser/__init__.py" → sae_lens_lite.browser."""
    parts = [ROOT, *path.removesuffix(".py").split("/")]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_of(module: str) -> str:
    """The stage entry a module belongs to: its top-level name in the package (a subpackage is one
    entry with all its modules), "__init__" for the package itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(path: str, source: str, known: set[str]) -> list[tuple[int, str]]:
    """(line, module) for each import of a module of the package in the file `path`."""
    here = module_name(path)
    package = here if path.endswith("__init__.py") else here.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == ROOT]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != ROOT:
                continue
            # `from . import runtime` imports a module; `from .sae import SAE` a name of one
            found += [(node.lineno, f"{base}.{a.name}" if f"{base}.{a.name}" in known else base) for a in node.names]
    return found


def check(sources: dict[str, str]) -> list[str]:
    """Every layering problem in `sources` ({path inside the package: source}), one line each."""
    known = {module_name(p) for p in sources}
    problems = []
    for path, source in sorted(sources.items()):
        unit = unit_of(module_name(path))
        if unit not in STAGE:
            problems.append(f"{ROOT}/{path} is in no stage: place {unit!r} in STAGES (tests/test_layering.py)")
            continue
        for line, target in imports(path, source, known):
            to = unit_of(target)
            if to in STAGE and STAGE[to] > STAGE[unit]:
                problems.append(
                    f"{ROOT}/{path}:{line} ({STAGES[STAGE[unit]][0]}) imports {target} from a later stage "
                    f"({STAGES[STAGE[to]][0]})"
                )
    return problems


def package_sources() -> dict[str, str]:
    return {p.relative_to(PACKAGE).as_posix(): p.read_text() for p in sorted(PACKAGE.rglob("*.py"))}


def test_no_module_imports_from_a_later_stage():
    problems = check(package_sources())
    assert not problems, "\n".join(problems)


def test_every_stage_entry_is_a_module():
    units = {unit_of(module_name(p)) for p in package_sources()}
    stale = sorted(set(STAGE) - units)
    assert not stale, f"STAGES names {stale}, which are not modules of {ROOT}; remove them"


def test_the_checker_reports_violations():
    bad = {
        "__init__.py": "from . import errors\n",
        "errors.py": "",
        "cache.py": "def shards():\n    from .train import TrainConfig\n",  # a lazy import, by name
        "corpus.py": "from . import harvest\n",  # a module, from the package
        "harvest.py": "import sae_lens_lite.evaluate\nfrom .cache import CacheWriter\n",  # absolute; and a legal one
        "train.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .compare import CompareConfig\n",
        "recipes/__init__.py": "from ..analyze import Analysis\nfrom .l1 import L1\nfrom .. import runtime\n",
        "recipes/l1.py": "",
        "runtime.py": "",
        "evaluate.py": "",
        "compare.py": "",
        "analyze.py": "",
        "newstage.py": "",
    }
    problems = check(bad)
    expected = [
        "cache.py:2 (cache) imports sae_lens_lite.train from a later stage (training)",
        "corpus.py:1 (corpus) imports sae_lens_lite.harvest from a later stage (harvest)",
        "harvest.py:1 (harvest) imports sae_lens_lite.evaluate from a later stage (evaluation)",
        "train.py:3 (training) imports sae_lens_lite.compare from a later stage (analysis)",
        "recipes/__init__.py:1 (training) imports sae_lens_lite.analyze from a later stage (analysis)",
        "newstage.py is in no stage",
    ]
    for e in expected:
        assert sum(e in p for p in problems) == 1, f"{e!r} not reported once in {problems}"
    assert len(problems) == len(expected), problems
