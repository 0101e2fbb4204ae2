"""Data flows one way through sae_lens_lite: a module imports from its own stage or an earlier
one, never from a later stage (STYLE.md, "Nothing downstream is imported upstream").

The stages, earliest first (the modules of data/, training/, evaluation/ and interpret/ are
stages of their own, in the order below; the folders show the same flow):

    foundations   __init__, errors, fsutil, config, outputs, runtime (device, dtype, process group)
    models        load a model, name its hook points
    corpus        read, tokenise, pack and filter text
    cache         the activation cache on disk (its writers, the sharded one included, and reader)
    harvest       run the model over a corpus into a cache
    sae           the activations, the SAE module; synthetic data with known features; evaluation's
                  metrics (below training, whose end-of-run figures use them)
    training      train_config, latents, recipes/ (one per method), loss, distributed (DDP, sharding), train
    evaluation    baselines, report, evaluate, compare; probing, absorption and probe
    analysis      features (the features.json schema), explain, contexts, browser/, analyze, intervene, sweep
    export        export (SAELens, dictionaries), transcoder_set
    registry      stages: one line per stage, naming the module that holds it
    entry points  info, pipeline, cli, __main__ (each reads the registry)

Every import counts: at module level, inside a function (a lazy import is a dependency all the
same), a module named by a string ("sae_lens_lite.data.harvest", alone or as "module:name", as
stages.py names what it imports when a stage is used), and under `if TYPE_CHECKING:` too (a type
hint naming a later stage's class ties the module to that stage; today's such imports all stay
inside the training stage, where recipes name TrainConfig and train builds recipes). Within a
stage imports may go either way.

A module that is in no stage fails the test, so a new module gets placed deliberately; so does
a stage entry naming a module that no longer exists.
"""

import ast
from pathlib import Path

import sae_lens_lite

ROOT = "sae_lens_lite"
PACKAGE = Path(sae_lens_lite.__file__).parent

SUBPACKAGES = {"data", "training", "evaluation", "interpret"}  # folders whose modules are stage entries
STAGES = [
    ("foundations", {"__init__", "errors", "fsutil", "config", "outputs", "runtime", *SUBPACKAGES}),
    ("models", {"data.models"}),
    ("corpus", {"data.corpus"}),
    ("cache", {"data.cache"}),
    ("harvest", {"data.harvest"}),
    # evaluation.metrics (the SAE's figures on activations, once) sits here, below training, because
    # training's end-of-run figures (train.measure_saved) are measured with it
    ("sae", {"training.activations", "training.sae", "training.synthetic", "evaluation.metrics"}),
    (
        "training",
        {"training.train_config", "training.latents", "training.recipes", "training.loss", "training.distributed"}
        | {"training.sparse_backward", "training.train"},
    ),
    (
        "evaluation",
        {"evaluation.baselines", "evaluation.report", "evaluation.evaluate", "evaluation.probing"}
        | {"evaluation.absorption", "evaluation.probe", "evaluation.compare"},
    ),
    (
        "analysis",
        {"interpret.features", "interpret.explain", "interpret.contexts", "interpret.browser"}
        | {"interpret.analyze", "interpret.intervene", "interpret.sweep"},
    ),
    ("export", {"export", "transcoder_set"}),
    ("registry", {"stages"}),
    ("entry points", {"info", "pipeline", "cli", "__main__"}),
]
STAGE = {unit: i for i, (_, units) in enumerate(STAGES) for unit in units}


def module_name(path: str) -> str:
    """ "recipes/kl.py" → sae_lens_lite.training.recipes.kl; "browser/__init__.py" → sae_lens_lite.interpret.browser."""
    parts = [ROOT, *path.removesuffix(".py").split("/")]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_of(module: str) -> str:
    """The stage entry a module belongs to: its name in the package, "folder.name" inside one of
    SUBPACKAGES (a subpackage below that, such as training/recipes/, is one entry with all its
    modules), "__init__" for the package itself."""
    parts = module.split(".")[1:]
    if not parts:
        return "__init__"
    return ".".join(parts[:2]) if parts[0] in SUBPACKAGES else parts[0]


def imported_base(path: str, node: ast.ImportFrom) -> str:
    """The module a `from X import ...` in the file `path` reads from, relative imports resolved."""
    if not node.level:
        return node.module or ""
    here = module_name(path)
    parts = (here if path.endswith("__init__.py") else here.rpartition(".")[0]).split(".")
    return ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))


def imports(path: str, source: str, known: set[str]) -> list[tuple[int, str]]:
    """(line, module) for each import of a module of the package in the file `path`, and each
    string naming one, alone or as "module:name" (imported by name, as the registry's are)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.split(":")[0] in known:
            found.append((node.lineno, node.value.split(":")[0]))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == ROOT]
        elif isinstance(node, ast.ImportFrom):
            base = imported_base(path, node)
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


def private_imports(sources: dict[str, str]) -> list[str]:
    """Every name with a leading underscore imported from another module of the package: a private
    name is its module's own business, and one another module needs is public."""
    problems = []
    for path, source in sorted(sources.items()):
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, ast.ImportFrom):
                continue
            base = imported_base(path, node)
            if base.split(".")[0] != ROOT or base == module_name(path):
                continue
            for a in node.names:
                if a.name.startswith("_") and not a.name.startswith("__"):
                    problems.append(f"{ROOT}/{path}:{node.lineno} imports the private name {a.name} from {base}")
    return problems


def import_circles(sources: dict[str, str]) -> list[str]:
    """Every circle of modules importing each other (lazy and TYPE_CHECKING imports included: a
    circle is one tangle however its imports are deferred), each as 'a -> b -> a'."""
    known = {module_name(p) for p in sources}
    graph: dict[str, set[str]] = {}
    for path, source in sources.items():
        here = module_name(path)
        for _, target in imports(path, source, known):
            while target not in known and "." in target:  # `from .sae import SAE` → the module sae
                target = target.rpartition(".")[0]
            if target != here and target in known:
                graph.setdefault(here, set()).add(target)
    circles, done = [], set()

    def visit(node: str, trail: list[str]) -> None:
        if node in trail:
            loop = trail[trail.index(node) :]
            start = loop.index(min(loop))  # one spelling per circle, from its smallest module
            circles.append(" -> ".join(loop[start:] + loop[:start] + [min(loop)]))
            return
        if node in done:
            return
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, trail + [node])
        done.add(node)

    for node in sorted(graph):
        visit(node, [])
    return sorted(set(circles))


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
        "data/__init__.py": "",
        "data/cache.py": "def shards():\n    from ..training.train import TrainConfig\n",  # a lazy import, by name
        "data/corpus.py": "from . import harvest\n",  # a module, from the package
        "data/models.py": 'STAGE = "sae_lens_lite.training.train:train"\n',  # named, to import later
        "data/harvest.py": "import sae_lens_lite.evaluation.evaluate\nfrom .cache import Writer\n",  # abs; legal
        "training/train.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
        "    from sae_lens_lite.evaluation.compare import CompareConfig\n",
        "training/recipes/__init__.py": "from ...interpret.analyze import Analysis\nfrom .l1 import L1\n"
        "from sae_lens_lite import runtime\n",
        "training/recipes/l1.py": "",
        "runtime.py": "",
        "evaluation/evaluate.py": "",
        "evaluation/compare.py": "",
        "interpret/analyze.py": "",
        "newstage.py": "",
        "data/newstage.py": "",
    }
    problems = check(bad)
    expected = [
        "data/cache.py:2 (cache) imports sae_lens_lite.training.train from a later stage (training)",
        "data/corpus.py:1 (corpus) imports sae_lens_lite.data.harvest from a later stage (harvest)",
        "data/models.py:1 (models) imports sae_lens_lite.training.train from a later stage (training)",
        "data/harvest.py:1 (harvest) imports sae_lens_lite.evaluation.evaluate from a later stage (evaluation)",
        "training/train.py:3 (training) imports sae_lens_lite.evaluation.compare from a later stage (evaluation)",
        "training/recipes/__init__.py:1 (training) imports sae_lens_lite.interpret.analyze from a later stage "
        "(analysis)",
        "sae_lens_lite/newstage.py is in no stage",
        "sae_lens_lite/data/newstage.py is in no stage",
    ]
    for e in expected:
        assert sum(e in p for p in problems) == 1, f"{e!r} not reported once in {problems}"
    assert len(problems) == len(expected), problems


def test_no_private_name_is_imported_from_another_module():
    problems = private_imports(package_sources())
    assert not problems, "\n".join(problems)


def test_the_private_import_checker_reports_violations():
    bad = {
        "evaluation/evaluate.py": "def _same_corpus(): ...\ndef _own(): ...\nx = _own()\n",
        "evaluation/compare.py": "from .evaluate import EvalConfig, _same_corpus\n",
        "training/recipes/l1.py": "from ..sae import _GatheredPre\nfrom .base import __all__\n",
        "training/recipes/base.py": "",
        "training/sae.py": "",
    }
    assert private_imports(bad) == [
        "sae_lens_lite/evaluation/compare.py:1 imports the private name _same_corpus from "
        "sae_lens_lite.evaluation.evaluate",
        "sae_lens_lite/training/recipes/l1.py:1 imports the private name _GatheredPre from sae_lens_lite.training.sae",
    ]


def test_no_import_circles():
    circles = import_circles(package_sources())
    assert not circles, "\n".join(circles)


def test_the_circle_checker_reports_circles():
    bad = {
        "training/train.py": "from .recipes import get\n",
        "training/recipes/__init__.py": "from .l1 import L1\n",
        "training/recipes/l1.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
        "    from ..train import TrainConfig\n",
        "interpret/analyze.py": "def page():\n    from sae_lens_lite.interpret.browser import write_page\n",
        "interpret/browser/__init__.py": "from ..analyze import Analysis\n",
        "training/sae.py": "",
        "training/loss.py": "from .sae import SAE\n",
    }
    assert import_circles(bad) == [
        "sae_lens_lite.interpret.analyze -> sae_lens_lite.interpret.browser -> sae_lens_lite.interpret.analyze",
        "sae_lens_lite.training.recipes -> sae_lens_lite.training.recipes.l1 -> sae_lens_lite.training.train"
        " -> sae_lens_lite.training.recipes",
    ]
