"""The command line: every subcommand explains itself, bad input is one line and exit 2."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import needs_smollm2

from sae_lens_lite.cli import build_parser, main
from sae_lens_lite.config import load_run_file, parse_value
from sae_lens_lite.errors import UserError

COMMANDS = [
    "harvest",
    "train",
    "evaluate",
    "analyze",
    "export",
    "import",
    "steer",
    "attribute",
    "sweep",
    "run",
    "hooks",
    "info",
]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert "usage: sae-lite " + command in capsys.readouterr().out


def test_flags_map_onto_the_stage_config():
    args = build_parser().parse_args(
        ["harvest", "--hook", "blocks.1.hook_mlp_out", "blocks.2.hook_resid_pre", "--tokens", "10", "--no-drop-special"]
    )
    assert (
        args.hooks == ["blocks.1.hook_mlp_out", "blocks.2.hook_resid_pre"]
        and args.tokens == 10
        and args.drop_special is False
    )


def test_run_file_overrides(tmp_path):
    f = tmp_path / "r.toml"
    f.write_text('out = "x"\n[train]\nl1 = 5.0\n')
    cfg = load_run_file(f, ["train.l1=3", "harvest.hooks=['blocks.1.hook_resid_post']", "out=y", "train.penalty=topk"])
    assert cfg == {
        "out": "y",
        "train": {"l1": 3, "penalty": "topk"},
        "harvest": {"hooks": ["blocks.1.hook_resid_post"]},
    }
    assert parse_value("true") is True and parse_value("abc") == "abc"
    with pytest.raises(UserError, match="section.key=value"):
        load_run_file(f, ["oops"])


def test_unknown_run_file_setting_is_named(tmp_path, capsys):
    f = tmp_path / "r.toml"
    f.write_text("[train]\nlll = 5\n")
    assert main(["run", str(f), f"out={tmp_path / 'o'}", "stages=['train']"]) == 2
    err = capsys.readouterr().err
    assert "unknown setting(s) lll" in err and err.count("\n") == 1


def cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "sae_lens_lite", *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )


@needs_smollm2
@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["--hook", "blocks.6.resid_post"], "unknown hook"),
        (["--hook", "blocks.30.hook_resid_post"], "beyond the model's depth (30 blocks"),
        (["--dataset", "no_such_corpus.txt"], "corpus file no_such_corpus.txt not found"),
        (["--context-length", "100000"], "longer than the model allows"),
    ],
)
def test_bad_harvest_input_is_one_line_and_exit_2(tmp_path, args, message):
    r = cli("harvest", "--model", "smollm2-135m", "--out", str(tmp_path / "acts"), "--tokens", "256", *args)
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("sae-lite")]
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "acts" / "manifest.json").exists()


def tiny_run(tmp_path, corpus_file, **sections):
    cfg = {
        "out": str(tmp_path / "o"),
        "stages": ["harvest", "train", "evaluate"],
        "harvest": {
            "hooks": ["blocks.1.hook_resid_post"],
            "dataset": str(corpus_file),
            "context_length": 32,
            "dtype": "float32",
            "tokens": 1024,
        },
        "train": {"expansion": 2, "tokens": 4096, "batch_size": 256, "device": "cpu"},
        "evaluate": {"dataset": str(corpus_file), "tokens": 256, "skip_tokens": 0, "baselines": False, "device": "cpu"},
    }
    for k, v in sections.items():
        cfg[k].update(v)
    return cfg


@pytest.fixture
def tiny_pipeline(tiny_lm, monkeypatch):
    import sae_lens_lite.pipeline as pipeline
    from sae_lens_lite.data.harvest import harvest
    from sae_lens_lite.evaluation.evaluate import evaluate

    monkeypatch.setitem(pipeline.FUNCS, "harvest", lambda cfg: harvest(cfg, lm=tiny_lm))
    monkeypatch.setitem(pipeline.FUNCS, "evaluate", lambda cfg: evaluate(cfg, lm=tiny_lm))
    return pipeline


def test_run_again_compares_each_stages_settings(tiny_pipeline, corpus_file, tmp_path, capsys):
    """A second run with the same file does nothing and says so in its table; a changed setting of
    one stage is refused with run-file advice; overwriting a stage redoes the stages after it."""
    pipeline = tiny_pipeline
    cfg = tiny_run(tmp_path, corpus_file)
    pipeline.run_pipeline(cfg)
    table = capsys.readouterr().out.split("\nrun: ")[-1].splitlines()
    assert [r.split()[:2] for r in table[2:]] == [["harvest", "done"], ["train", "done"], ["evaluate", "done"]]
    weights = (tmp_path / "o" / "sae" / "sae.safetensors").read_bytes()
    report = (tmp_path / "o" / "eval" / "report.json").stat().st_mtime_ns
    pipeline.run_pipeline(cfg)
    out = capsys.readouterr().out
    assert "run: every stage was complete already" in out and out.count("nothing to do  ") == 3
    assert (tmp_path / "o" / "sae" / "sae.safetensors").read_bytes() == weights

    other = tmp_path / "other.txt"
    other.write_text(corpus_file.read_text().lower())
    with pytest.raises(
        UserError, match=r"^\[evaluate\] .*differs in: dataset .*pass evaluate.overwrite=true to redo it"
    ):
        pipeline.run_pipeline(tiny_run(tmp_path, corpus_file, evaluate={"dataset": str(other)}))
    assert (tmp_path / "o" / "eval" / "report.json").stat().st_mtime_ns == report

    pipeline.run_pipeline(tiny_run(tmp_path, corpus_file, train={"l1": 3.0, "overwrite": True}))
    table = capsys.readouterr().out.split("\nrun: ")[-1].splitlines()
    assert [r.split()[:2] for r in table[2:]] == [["harvest", "nothing"], ["train", "done"], ["evaluate", "done"]]
    assert (tmp_path / "o" / "eval" / "report.json").stat().st_mtime_ns != report  # its SAE changed: redone


def test_run_file_is_checked_whole_before_any_stage(tmp_path, capsys):
    f = tmp_path / "r.toml"
    f.write_text('[harvest]\nmodel = "no-such-model"\n[export]\nformats = ["saelens"]\nformatz = 1\n')
    assert main(["run", str(f), f"out={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err
    assert (
        "[export] unknown setting(s) formatz (did you mean format?)" in err
        and "valid: acts, analysis, format, formats, out" in err
    )
    assert not (tmp_path / "o").exists()  # nothing ran
    f.write_text('[train]\nl1 = "strong"\n')
    assert main(["run", str(f), f"out={tmp_path / 'o'}"]) == 2
    assert "[train] l1 = 'strong' should be a number" in capsys.readouterr().err
    f.write_text('[train]\npenalty = "l2"\n')
    assert main(["run", str(f), f"out={tmp_path / 'o'}"]) == 2
    assert "[train] unknown train.penalty 'l2'" in capsys.readouterr().err and not (tmp_path / "o").exists()
    # A value out of range is named as the run file names it, not by its command-line flag.
    for text, said in [
        ("[harvest]\ntokens = -5\n", "[harvest] harvest.tokens must be a positive integer, got -5"),
        ('[train]\npenalty = "topk"\ntarget_l0 = 5.0\n', "topk has none, set the L0 with train.k"),
    ]:
        f.write_text(text)
        assert main(["run", str(f), f"out={tmp_path / 'o'}"]) == 2
        err = capsys.readouterr().err
        assert said in err and "--" not in err, err


def _no_stage_runs(monkeypatch):
    import sae_lens_lite.pipeline as pipeline
    from sae_lens_lite import stages

    def refuse(cfg):
        raise AssertionError("a stage ran")

    for stage in stages.run_file_stages():
        monkeypatch.setitem(pipeline.FUNCS, stage.name, refuse)


def test_run_refuses_a_harvest_that_leaves_evaluate_no_text_before_any_stage(
    tiny_pipeline, corpus_file, tmp_path, monkeypatch
):
    """evaluate skips the harvested tokens of its corpus; a harvest asking for more than the corpus
    holds leaves nothing. That is refused up front (it used to fail after harvest and training),
    and the harvest.tokens the message offers does leave evaluate its text."""
    from conftest import tiny_tokenizer

    tiny_tokenizer().save_pretrained(tmp_path / "tok")  # the model's tokenizer, all the check loads
    cfg = tiny_run(tmp_path, corpus_file, harvest={"model": str(tmp_path / "tok"), "tokens": 10**6})
    del cfg["evaluate"]["skip_tokens"]  # the default: skip what the harvest took
    with monkeypatch.context() as m:
        _no_stage_runs(m)
        with pytest.raises(UserError) as e:
            tiny_pipeline.run_pipeline(cfg)
    msg = str(e.value)
    assert msg.startswith(f"[evaluate] {corpus_file} holds ") and "leaving nothing to evaluate on" in msg, msg
    assert "evaluate.dataset" in msg and not (tmp_path / "o").exists()
    fit = int(re.search(r"set harvest.tokens to at most ([\d,]+\d)", msg).group(1).replace(",", ""))
    cfg["harvest"]["tokens"] = fit
    tiny_pipeline.run_pipeline(cfg)  # harvest and evaluate use the tiny model: same tokenizer, same count
    report = json.loads((tmp_path / "o" / "eval" / "report.json").read_text())
    assert report["sparsity"]["n_tokens"] > 0


@needs_smollm2
def test_an_empty_run_file_plans_and_a_harvest_of_all_of_pydoc_is_refused_before_any_stage(
    tmp_path, capsys, monkeypatch
):
    """Every default together is a run that works: harvest's 80k tokens of pydoc (about 113k)
    leave evaluate its held-out text. Asking for 200,000 is refused in seconds with what to set,
    not after harvesting and two minutes of training."""
    import sae_lens_lite.pipeline as pipeline

    pipeline.plan(load_run_file(_write(tmp_path / "empty.toml", ""), [f"out={tmp_path / 'e'}"]))
    _no_stage_runs(monkeypatch)
    f = _write(tmp_path / "all.toml", "[harvest]\ntokens = 200000\n")
    assert main(["run", str(f), f"out={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sae-lite run: error: [evaluate] pydoc holds ") and err.count("\n") == 1, err
    assert "set harvest.tokens to at most " in err and "evaluate.dataset" in err
    assert not (tmp_path / "o").exists()
    # the demo's settings pass the check (it stops counting once there is enough)
    pipeline.plan(load_run_file(Path(__file__).parents[1] / "configs" / "demo.toml", [f"out={tmp_path / 'd'}"]))


def _write(path, text):
    path.write_text(text)
    return path


def test_run_file_evaluate_reads_the_harvest_corpus_column(tmp_path):
    from sae_lens_lite.pipeline import plan

    c = tmp_path / "c.jsonl"
    c.write_text(json.dumps({"content": "some text"}))
    run = {"out": str(tmp_path / "o"), "stages": ["evaluate"], "harvest": {"dataset": str(c), "text_column": "content"}}
    # [evaluate] without a dataset reads the harvest's corpus, the way the harvest read it
    for evaluate, column in [({"dataset": str(c)}, "content"), ({}, "content"), ({"text_column": "body"}, "body")]:
        steps, _ = plan({**run, "evaluate": {"skip_tokens": 0, **evaluate}})
        assert steps[0][1].text_column == column and steps[0][1].dataset == str(c)
    steps, _ = plan({**run, "evaluate": {"skip_tokens": 0, "dataset": "pydoc"}})
    assert steps[0][1].dataset == "pydoc" and steps[0][1].text_column == "text"


SCRIPT = Path(__file__).parents[1] / "scripts" / "train_sae.py"


def test_train_sae_script_help_prints_usage_and_does_no_work(tmp_path):
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert r.returncode == 0 and r.stdout.startswith("usage: train_sae.py"), r.stderr
    assert list(tmp_path.iterdir()) == []  # no runs/ directory: nothing was harvested


@needs_smollm2
def test_train_sae_script_harvest_fits_the_default_corpus(tmp_path):
    """The script to copy asks for no more of pydoc than it holds (no shortfall warning), and
    leaves evaluate's default tokens held out after it."""
    import ast

    from sae_lens_lite.data.corpus import corpus_tokens
    from sae_lens_lite.pipeline import plan

    consts = {
        t.id: n.value.value
        for n in ast.parse(SCRIPT.read_text()).body
        if isinstance(n, ast.Assign) and isinstance(n.value, ast.Constant)
        for t in n.targets
    }
    assert consts["CORPUS"] == "pydoc" and consts["MODEL"] == "smollm2-135m"
    assert corpus_tokens("smollm2-135m", "pydoc", "train", "text", consts["TOKENS"]) == consts["TOKENS"]
    plan({"out": str(tmp_path / "o"), "harvest": {"tokens": consts["TOKENS"]}})  # refuses if evaluate has no room


def test_run_file_advice_names_run_file_keys():
    from sae_lens_lite.pipeline import run_file_advice
    from sae_lens_lite.training.train import TrainConfig

    msg = (
        "runs/sae holds a run with different settings (l1); use the same flags to resume, another "
        "--out, or --overwrite; try --batch-size 256"
    )
    assert run_file_advice(msg, "train", TrainConfig) == (
        "runs/sae holds a run with different settings (l1); use the same flags to resume, another top-level out, "
        "or train.overwrite=true; try train.batch_size 256"
    )


def test_version(capsys):
    from sae_lens_lite import __version__

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"sae-lite {__version__}"


def test_a_mistyped_flag_gets_its_subcommands_usage_and_a_suggestion(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--acts", "x", "--expansoin", "4"])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert (
        err.startswith("usage: sae-lite train")
        and "unrecognized arguments: --expansoin 4; --expansoin: did you mean --expansion?" in err
    )
    with pytest.raises(SystemExit):
        main(["cache", "verify", "d", "--quiet"])
    assert capsys.readouterr().err.startswith("usage: sae-lite cache verify")


def test_a_closed_pipe_ends_quietly(tmp_path):
    """`sae-lite hooks | head` must not end in "error: Broken pipe": here the reader is gone before
    anything is written."""
    from conftest import tiny_model, tiny_tokenizer

    tiny_model("llama").save_pretrained(tmp_path / "tiny")
    tiny_tokenizer().save_pretrained(tmp_path / "tiny")
    r, w = os.pipe()
    os.close(r)
    p = subprocess.run(
        [sys.executable, "-m", "sae_lens_lite", "hooks", "--model", str(tmp_path / "tiny")],
        stdout=w,
        stderr=subprocess.PIPE,
        text=True,
        timeout=600,
    )
    os.close(w)
    assert p.returncode == 141, p.stderr
    assert "Broken pipe" not in p.stderr and "BrokenPipeError" not in p.stderr and "error" not in p.stderr.lower(), (
        p.stderr
    )


@pytest.mark.parametrize("command, says", [("train", "to resume"), ("evaluate", "to start it over")])
def test_ctrl_c_says_whether_the_rerun_resumes(command, says, monkeypatch, capsys):
    import sae_lens_lite.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "dispatch", interrupted)
    assert main([command]) == 130
    err = capsys.readouterr().err
    assert f"sae-lite {command}: interrupted; run the same command again {says}" in err
