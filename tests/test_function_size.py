"""Functions fit on a screen (STYLE.md, habit 15): none in the package over MAX_LINES.

OVER lists exceptions, each held at its length: the test fails when one of them grows, when
another function passes MAX_LINES, and when a listed one has been split (so that the list only
shrinks). It is empty since issue 34 split the last of them (analyze, the training loop,
evaluate, harvest, compare, the parser) into named steps."""

import ast
from pathlib import Path

import sae_lens_lite

PACKAGE = Path(sae_lens_lite.__file__).parent
MAX_LINES = 80
OVER: dict[tuple[str, str], int] = {}  # (module, function): a ceiling until it is split into named steps


def function_lengths(sources: dict[str, str]) -> dict[tuple[str, str], int]:
    """(module path, function name) → lines from its `def` to its last line, for every function."""
    out = {}
    for path, source in sources.items():
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                key = (path, node.name)
                out[key] = max(out.get(key, 0), node.end_lineno - node.lineno + 1)
    return out


def size_problems(lengths: dict[tuple[str, str], int], over: dict[tuple[str, str], int]) -> list[str]:
    problems = []
    for (path, name), n in sorted(lengths.items()):
        limit = over.get((path, name), MAX_LINES)
        if n > limit:
            problems.append(f"{path}: {name} is {n} lines (at most {limit}); split it into named steps")
    for (path, name), n in sorted(over.items()):
        if lengths.get((path, name), 0) <= MAX_LINES:
            problems.append(f"{path}: {name} is no longer over {MAX_LINES} lines; remove it from OVER")
    return problems


def test_no_function_is_longer_than_a_screen():
    sources = {p.relative_to(PACKAGE).as_posix(): p.read_text() for p in sorted(PACKAGE.rglob("*.py"))}
    problems = size_problems(function_lengths(sources), OVER)
    assert not problems, "\n".join(problems)


def test_the_size_checker_reports_growth_new_long_functions_and_stale_entries():
    body = "".join(f"    x{i} = {i}\n" for i in range(90))
    sources = {"a.py": f"def long():\n{body}\ndef short():\n    pass\n", "b.py": f"def listed():\n{body}"}
    lengths = function_lengths(sources)
    assert lengths[("a.py", "long")] == 91 and lengths[("a.py", "short")] == 2
    assert size_problems(lengths, {("b.py", "listed"): 91}) == [
        "a.py: long is 91 lines (at most 80); split it into named steps"
    ]
    assert size_problems(lengths, {("b.py", "listed"): 90, ("a.py", "long"): 91, ("a.py", "short"): 50}) == [
        "b.py: listed is 91 lines (at most 90); split it into named steps",
        "a.py: short is no longer over 80 lines; remove it from OVER",
    ]
