"""A walk through README.md and docs/guide.md: every `sae-lite` command they show is run, in
order, at tiny size (a tiny model saved to a local directory stands in for SmolLM2, a small text
file for the corpora), and each must succeed and end with its result line."""

import re
import shlex
from pathlib import Path

import pytest
from conftest import CORPUS_TEXT, tiny_model, tiny_tokenizer

from sae_lens_lite.cli import main

REPO = Path(__file__).resolve().parents[1]
HOOK = "blocks.1.hook_resid_post"
# Tiny sizes appended to each stage's documented flags (later flags win).
TINY = {
    "harvest": ["--tokens", "1024", "--context-length", "32", "--dtype", "float32", "--device", "cpu"],
    "train": ["--tokens", "4096", "--batch-size", "256", "--device", "cpu", "--expansion", "2"],
    "evaluate": ["--tokens", "256", "--no-baselines", "--device", "cpu"],
    "analyze": ["--top-k", "4", "--device", "cpu"],
    "steer": ["--max-new-tokens", "4", "--device", "cpu"],
    "attribute": ["--top", "3", "--device", "cpu"],
}
TINY_RUN = [
    "harvest.model=tiny",
    f"harvest.hooks=['{HOOK}']",
    "harvest.dataset=my_corpus.txt",
    "harvest.tokens=1024",
    "harvest.context_length=32",
    "harvest.dtype='float32'",
    "train.tokens=4096",
    "train.batch_size=256",
    "train.expansion=2",
    "evaluate.dataset=held_out.txt",
    "evaluate.tokens=256",
    "evaluate.baselines=false",
    "analyze.top_k=4",
]
STAGES = ("harvest", "train", "evaluate", "analyze", "export", "import")


def documented_commands(doc: Path) -> list[str]:
    """`sae-lite ...` lines of the bash blocks and inline code of a markdown file, in order,
    without comments; placeholders in capitals (COMMAND, DIR, N) are left out."""
    cmds, fence, in_block = [], None, False  # fence: the language of the code block we are in
    for line in doc.read_text().splitlines():
        if line.startswith("```"):
            fence = line.strip()[3:] if fence is None else None
            in_block = fence in ("bash", "")
            continue
        if fence is not None and not in_block:
            continue  # a transcript or another language
        found = [line] if in_block else re.findall(r"`(sae-lite [^`]+)`", line)
        for c in found:
            c = re.sub(r"\s+#.*$", "", c).split("|")[0].strip()  # `sae-lite hooks | head` runs `sae-lite hooks`
            if not in_block and len(c.split()) < 3 and not c.startswith("sae-lite -"):
                continue  # a command named in prose (`sae-lite run`), not one to run
            if c.startswith("sae-lite ") and not re.search(r"\b[A-Z]{3,}\b|(?<![\w-])[A-Z](?![\w])", c):
                cmds.append(c)
    return cmds


def tiny(cmd: str) -> list[str]:
    """The documented command at tiny size: our model, hook and corpora, and small sizes."""
    args = shlex.split(cmd)[1:]
    out = []
    for i, a in enumerate(args):
        prev = args[i - 1] if i else ""
        if prev == "--model":
            a = "tiny"
        elif prev == "--hook":
            a = HOOK
        elif prev == "--feature":
            a = "1"  # the tiny SAE has 64 features
        elif prev == "--dataset" and a == "pydoc":
            a = "my_corpus.txt"
        elif a.startswith("configs/"):
            a = str(REPO / a)
        out.append(a)
    if out[0] == "hooks" and "--model" not in out:
        out += ["--model", "tiny"]
    if out[0] in TINY:
        out += TINY[out[0]]
    if out[0] == "run":
        out += TINY_RUN
    return out


@pytest.fixture
def world(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny_model("llama").save_pretrained(tmp_path / "tiny")
    tiny_tokenizer().save_pretrained(tmp_path / "tiny")
    (tmp_path / "my_corpus.txt").write_text(CORPUS_TEXT)
    (tmp_path / "held_out.txt").write_text(CORPUS_TEXT.replace("fox", "cat"))
    return tmp_path


def check_result(argv: list[str], rc: int, out: str) -> None:
    lines = [line for line in out.splitlines() if line.strip()]
    assert rc == 0 and lines, f"sae-lite {' '.join(argv)} failed or printed nothing:\n{out}"
    cmd = argv[0]
    if cmd in STAGES:
        assert lines[-1].startswith(f"{cmd}: "), f"sae-lite {' '.join(argv)} did not end with its result line:\n{out}"
    elif cmd == "run":
        assert any(line.startswith("run: ") for line in lines) and lines[-1].split()[0] in (
            "export",
            "analyze",
            "evaluate",
            "train",
            "harvest",
        )
    elif cmd == "info":
        assert re.match(
            r"(activation cache|SAE|analysis|evaluation|feature dictionary|SAELens directory) ", lines[0]
        ), out


@pytest.mark.slow
@pytest.mark.parametrize(
    "doc, must_run",
    [
        ("README.md", {"harvest", "train", "evaluate", "analyze", "export", "run", "info", "steer", "attribute"}),
        ("docs/guide.md", {"run", "info", "cache", "import", "hooks", "--version"}),
    ],
)
def test_every_documented_command_runs_and_prints_its_result(world, doc, must_run, capsys):
    cmds = documented_commands(REPO / doc)
    assert len(cmds) >= 6, cmds
    ran = set()
    for cmd in cmds:
        argv = tiny(cmd)
        capsys.readouterr()
        try:
            rc = main(argv)
        except SystemExit as e:  # --version, --help
            rc = e.code
        check_result(argv, rc, capsys.readouterr().out)
        ran.add(argv[0])
    assert must_run <= ran, f"{doc} no longer shows {must_run - ran}"
