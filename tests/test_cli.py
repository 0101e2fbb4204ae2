"""The command line: every subcommand explains itself, bad input is one line and exit 2."""

import subprocess
import sys

import pytest

from conftest import needs_smollm2
from sae_lens_lite.cli import build_parser, main
from sae_lens_lite.config import load_run_file, parse_value
from sae_lens_lite.errors import UserError

COMMANDS = ["harvest", "train", "evaluate", "analyze", "export", "import", "steer", "attribute", "run", "hooks"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert "usage: sae-lite " + command in capsys.readouterr().out


def test_flags_map_onto_the_stage_config():
    args = build_parser().parse_args(["harvest", "--hook", "blocks.1.hook_mlp_out", "blocks.2.hook_resid_pre", "--tokens", "10", "--no-drop-special"])
    assert args.hooks == ["blocks.1.hook_mlp_out", "blocks.2.hook_resid_pre"] and args.tokens == 10 and args.drop_special is False


def test_run_file_overrides(tmp_path):
    f = tmp_path / "r.toml"
    f.write_text('out = "x"\n[train]\nl1 = 5.0\n')
    cfg = load_run_file(f, ["train.l1=3", "harvest.hooks=['blocks.1.hook_resid_post']", "out=y", "train.penalty=topk"])
    assert cfg == {"out": "y", "train": {"l1": 3, "penalty": "topk"}, "harvest": {"hooks": ["blocks.1.hook_resid_post"]}}
    assert parse_value("true") is True and parse_value("abc") == "abc"
    with pytest.raises(UserError, match="section.key=value"):
        load_run_file(f, ["oops"])


def test_unknown_run_file_setting_is_named(tmp_path, capsys):
    f = tmp_path / "r.toml"
    f.write_text('[train]\nlll = 5\n')
    assert main(["run", str(f), f"out={tmp_path / 'o'}", "stages=['train']"]) == 2
    err = capsys.readouterr().err
    assert "unknown setting(s) lll" in err and err.count("\n") == 1


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "sae_lens_lite", *args], capture_output=True, text=True, cwd=cwd, timeout=600)


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
    lines = [l for l in r.stderr.splitlines() if l.startswith("sae-lite")]
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "acts" / "manifest.json").exists()


def test_run_twice_skips_finished_stages(tiny_lm, corpus_file, tmp_path, monkeypatch):
    """`sae-lite run` again after it finished (or was interrupted) continues instead of failing."""
    import sae_lens_lite.harvest as harvest_mod
    import sae_lens_lite.pipeline as pipeline

    real_harvest = harvest_mod.harvest
    monkeypatch.setattr(pipeline, "harvest", lambda cfg: real_harvest(cfg, lm=tiny_lm))
    calls = []
    monkeypatch.setattr(pipeline, "evaluate", lambda cfg: (calls.append(cfg), (tmp_path / "o" / "eval").mkdir(parents=True, exist_ok=True),
                                                          (tmp_path / "o" / "eval" / "report.json").write_text("{}")))  # fmt: skip
    cfg = {"out": str(tmp_path / "o"), "stages": ["harvest", "train", "evaluate"],
           "harvest": {"hooks": ["blocks.1.hook_resid_post"], "dataset": str(corpus_file), "context_length": 32, "dtype": "float32"},
           "train": {"expansion": 2, "tokens": 4096, "batch_size": 256, "device": "cpu"}}  # fmt: skip
    pipeline.run_pipeline(cfg)
    weights = (tmp_path / "o" / "sae" / "sae.safetensors").read_bytes()
    pipeline.run_pipeline(cfg)
    assert len(calls) == 1 and calls[0].overwrite
    assert (tmp_path / "o" / "sae" / "sae.safetensors").read_bytes() == weights
