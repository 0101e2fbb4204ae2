"""The registry (stages.py) and the runner of outputs.py: a stage registered in one place is a
subcommand, a run-file table run in its place, and a folder `info` recognises; the rerun rule
holds for it without a line of its own."""

import dataclasses
import importlib
import re
from dataclasses import dataclass

import pytest

from sae_lens_lite import pipeline, stages
from sae_lens_lite.cli import build_parser, main
from sae_lens_lite.config import opt
from sae_lens_lite.errors import UserError
from sae_lens_lite.info import describe
from sae_lens_lite.outputs import Output, resumable_folder


# A stage of its own: one setting, its output folder, and what it reads from a run's SAE folder.
@dataclass
class ToyConfig:
    words: int = opt(3, "how many words to write")
    sae: str = opt("runs/sae", "the SAE it reads")
    out: str = opt("runs/toy", "directory for toy.txt")
    overwrite: bool = opt(False, "write it again")


OUTPUT = Output("toy", resumable_folder("toy.txt"), inputs=("sae",), skip=("sae",))


def toy(cfg: ToyConfig) -> dict:
    run = OUTPUT.start(cfg)
    if (done := run.done()) is not None:
        return done
    out = run.claim()
    (out / "toy.txt").write_text(" ".join(["word"] * cfg.words))
    run.finish({"words": cfg.words}, f"toy: {out}: {cfg.words} words")
    return {"words": cfg.words}


TOY = stages.Stage(
    "toy", "write a few words", f"{__name__}:ToyConfig", f"{__name__}:toy", run_dir="toy", reads=(("sae", "sae"),)
)


@pytest.fixture
def registered(monkeypatch):
    """The toy stage registered, between train and evaluate: the one place a stage is added."""
    at = [s.name for s in stages.STAGES].index("train") + 1
    monkeypatch.setattr(stages, "STAGES", [*stages.STAGES[:at], TOY, *stages.STAGES[at:]])


def test_a_registered_stage_is_a_subcommand(registered, tmp_path, capsys):
    parser = build_parser()
    assert "write a few words" in parser.format_help()
    args = parser.parse_args(["toy", "--words", "5", "--out", str(tmp_path / "t")])
    assert args.stage is TOY and args.words == 5
    with pytest.raises(SystemExit):
        main(["toy", "--help"])
    out = capsys.readouterr().out
    assert "usage: sae-lite toy" in out and "--words WORDS" in out and "how many words to write (default: 3)" in out
    assert main(["toy", "--words", "5", "--out", str(tmp_path / "t")]) == 0
    assert capsys.readouterr().out.strip() == f"toy: {tmp_path / 't'}: 5 words"
    assert (tmp_path / "t" / "toy.txt").read_text() == "word word word word word"


def test_a_registered_stage_is_a_run_file_table_run_in_its_place(registered, tmp_path, capsys):
    cfg = {"out": str(tmp_path / "r"), "toy": {"words": 2}}
    steps, paths = pipeline.plan(cfg)
    assert [name for name, _, _ in steps] == ["harvest", "train", "toy", "evaluate", "analyze", "export", "export"]
    c = next(c for name, c, _ in steps if name == "toy")
    assert (c.words, c.sae, c.out) == (2, str(tmp_path / "r" / "sae"), str(tmp_path / "r" / "toy"))
    assert paths["toy"] == tmp_path / "r" / "toy"
    with pytest.raises(UserError, match="valid: out, stages, harvest, train, toy, evaluate"):
        pipeline.plan({**cfg, "toys": {}})

    pipeline.run_pipeline({**cfg, "stages": ["toy"]})
    out = capsys.readouterr().out
    assert "== toy" in out and f"toy    done    {tmp_path / 'r' / 'toy'}  2 words" in out
    pipeline.run_pipeline({**cfg, "stages": ["toy"]})
    out = capsys.readouterr().out
    assert "run: every stage was complete already (toy)" in out and "nothing to do" in out
    with pytest.raises(UserError, match=r"^\[toy\] .*differs in: words \(was 2, now 4\).*toy.overwrite=true"):
        pipeline.run_pipeline({**cfg, "stages": ["toy"], "toy": {"words": 4}})


def test_info_recognises_a_registered_stages_folder(registered, tmp_path):
    toy(ToyConfig(out=str(tmp_path / "t")))
    text = describe(str(tmp_path / "t"))
    assert text.startswith(f"toy output {tmp_path / 't'}: 3 words")
    assert "made by `sae-lite toy`" in text


def test_info_does_not_know_an_unregistered_stages_folder(tmp_path):
    toy(ToyConfig(out=str(tmp_path / "t")))
    with pytest.raises(UserError, match="holds nothing sae-lite wrote"):
        describe(str(tmp_path / "t"))


def test_the_rerun_rule_holds_for_a_stage_that_declares_its_output(tmp_path, capsys):
    cfg = ToyConfig(out=str(tmp_path / "t"))
    assert toy(cfg) == {"words": 3}
    capsys.readouterr()
    mtime = (tmp_path / "t" / "toy.txt").stat().st_mtime_ns
    assert toy(cfg) == {"words": 3}  # the recorded result
    out = capsys.readouterr().out.strip().splitlines()
    assert out == [
        f"toy: {tmp_path / 't'} is complete, nothing to do (same settings and inputs; --overwrite redoes it)",
        f"toy: {tmp_path / 't'}: 3 words",
    ]
    assert (tmp_path / "t" / "toy.txt").stat().st_mtime_ns == mtime
    with pytest.raises(UserError, match=r"differs in: words \(was 3, now 4\)\); pass --overwrite to redo it"):
        toy(ToyConfig(words=4, out=str(tmp_path / "t")))
    sae = tmp_path / "sae"
    sae.mkdir()
    (sae / "sae.safetensors").write_bytes(b"weights")  # an input appears: its content is recorded
    with pytest.raises(UserError, match=r"input sae \(its content changed\)"):
        toy(ToyConfig(sae=str(sae), out=str(tmp_path / "t")))
    assert toy(ToyConfig(words=4, out=str(tmp_path / "t"), overwrite=True)) == {"words": 4}
    assert (tmp_path / "t" / "toy.txt").read_text() == "word word word word"


def test_the_claim_refuses_a_folder_holding_other_work(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds other work"):
        toy(ToyConfig(out=str(tmp_path / "t")))
    assert not (tmp_path / "t" / "toy.txt").exists()


def test_every_registered_stage_names_its_config_and_function():
    assert len({s.name for s in stages.STAGES}) == len(stages.STAGES)
    for s in stages.STAGES:
        assert isinstance(s.config, type) and callable(s.run), s.name
        assert dataclasses.is_dataclass(s.config), s.name


def test_every_declared_output_names_a_registered_stage():
    """The "stage" a record names is the stage's name in the registry, which `info` and the run
    table read it by."""
    names = {s.name for s in stages.STAGES}
    modules = [importlib.import_module(s.run_at.split(":")[0]) for s in stages.STAGES]
    declared = [o for m in modules for o in vars(m).values() if isinstance(o, Output)]
    assert (
        {o.stage for o in declared} == {"harvest", "train", "evaluate", "probe", "analyze", "export", "import"} <= names
    )


def test_help_lists_the_stages_in_registry_order(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    at = [re.search(rf"\n    {s.name}\s", out).start() for s in stages.STAGES]
    assert at == sorted(at)
