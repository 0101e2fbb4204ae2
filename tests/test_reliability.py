"""Crash safety and safety of inputs, tested through the real command line in subprocesses."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CORPUS_TEXT, tiny_model, tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]


def cli(*args, **kw):
    return subprocess.run(
        [sys.executable, "-m", "sae_lens_lite", *args], capture_output=True, text=True, timeout=600, **kw
    )


@pytest.fixture
def tiny_model_dir(tmp_path):
    d = tmp_path / "tiny"
    tiny_model("llama", n_layers=4).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


def kill_9_when(args: list[str], progress_file: Path, ready, env=None) -> None:
    """Run `sae-lite ARGS` and SIGKILL it as soon as ready(json in progress_file) holds."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "sae_lens_lite", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if ready(json.loads(progress_file.read_text())):
                break
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


# Runs `sae-lite ARGS` with one function of ours wrapped so that the process SIGKILLs itself at an
# exact point: before or after the call where COND holds, or "during" it (a half-written temporary
# file left behind, as a kill in the middle of a write leaves one). Polling from outside cannot
# hit a window of a millisecond, such as the final write of a small run.
KILLER = """
import os, signal, sys, importlib
module, attr, cond, when, *args = sys.argv[1:]
mod = importlib.import_module(module)
orig = getattr(mod, attr)
def die():
    os.kill(os.getpid(), signal.SIGKILL)
def wrapper(*a, **kw):
    wrapper.n += 1
    n = wrapper.n
    hit = eval(cond)
    if hit and when == "before":
        die()
    if hit and when == "during":
        path = next(str(x) for x in a if isinstance(x, (str, os.PathLike)))
        with open(path if path.endswith(".tmp") else path + ".tmp", "wb") as f:
            f.write(b"half a file")
        die()
    out = orig(*a, **kw)
    if hit and when == "after":
        die()
    return out
wrapper.n = 0
setattr(mod, attr, wrapper)
from sae_lens_lite.cli import main
sys.exit(main(args))
"""


def kill_9_at(args: list[str], target: str, cond: str, when: str, env=None) -> None:
    """Run `sae-lite ARGS`, SIGKILLed at `when` (before/during/after) the call of `target`
    ("module:function", as looked up by its caller) for which the expression `cond` holds (it
    sees `a`, the call's arguments, and `n`, the call's number)."""
    module, attr = target.split(":")
    r = subprocess.run(
        [sys.executable, "-c", KILLER, module, attr, cond, when, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == -signal.SIGKILL, f"the kill point was never reached: {r.stderr[-2000:]}"


def shard_hashes(cache: Path) -> list[str]:
    return [s["sha256"] for s in json.loads((cache / "manifest.json").read_text())["shards"]]


def test_kill_9_during_harvest_then_rerun_gives_identical_cache(tiny_model_dir, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(CORPUS_TEXT * 30)
    args = [
        "harvest",
        "--model",
        str(tiny_model_dir),
        "--hook",
        "blocks.3.hook_resid_post",
        "--dataset",
        str(corpus),
        "--tokens",
        "8000",
        "--context-length",
        "16",
        "--contexts-per-shard",
        "8",
        "--batch-size",
        "4",
        "--dtype",
        "float32",
    ]
    assert cli(*args, "--out", str(tmp_path / "ref")).returncode == 0
    ref = shard_hashes(tmp_path / "ref")
    assert len(ref) > 20  # 63 shards

    out = tmp_path / "killed"
    kill_9_when([*args, "--out", str(out)], out / "manifest.json", lambda m: len(m["shards"]) >= 3)
    m = json.loads((out / "manifest.json").read_text())
    assert not m["complete"] and 3 <= len(m["shards"]) < len(ref), "the kill did not land mid-harvest"
    r = cli("train", "--acts", str(out), "--out", str(tmp_path / "sae"))
    assert r.returncode == 2 and "incomplete" in r.stderr
    assert cli(*args, "--out", str(out)).returncode == 0
    assert shard_hashes(out) == ref
    verify = cli("cache", "verify", str(out))
    assert verify.returncode == 0 and "all checksums match" in verify.stdout


def test_cache_verify_names_a_bit_flipped_shard(tiny_model_dir, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(CORPUS_TEXT)
    out = tmp_path / "acts"
    assert (
        cli(
            "harvest",
            "--model",
            str(tiny_model_dir),
            "--hook",
            "blocks.0.hook_resid_post",
            "--dataset",
            str(corpus),
            "--context-length",
            "16",
            "--contexts-per-shard",
            "8",
            "--out",
            str(out),
        ).returncode
        == 0
    )
    shard = out / "shard_00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    r = cli("cache", "verify", str(out))
    assert r.returncode == 2 and "shard_00001.safetensors is corrupt" in r.stderr and "Traceback" not in r.stderr


def test_no_unpickling_and_no_remote_code_by_default():
    pattern = re.compile(r"torch\.load\(|pickle\.loads?\(|trust_remote_code\s*=\s*True")
    offenders = []
    for path in (REPO / "sae_lens_lite").rglob("*.py"):
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line) and "weights_only=True" not in line:
                offenders.append(f"{path.name}:{i}: {line.strip()}")
    assert offenders == []


def test_kill_9_during_training_then_rerun_gives_the_same_weights(tiny_model_dir, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(CORPUS_TEXT * 4)
    acts = tmp_path / "acts"
    assert (
        cli(
            "harvest",
            "--model",
            str(tiny_model_dir),
            "--hook",
            "blocks.1.hook_resid_post",
            "--dataset",
            str(corpus),
            "--context-length",
            "16",
            "--out",
            str(acts),
        ).returncode
        == 0
    )
    args = [
        "train",
        "--acts",
        str(acts),
        "--expansion",
        "4",
        "--tokens",
        "300000",
        "--batch-size",
        "128",
        "--checkpoint-every",
        "20000",
        "--log-every",
        "20",
        "--device",
        "cpu",
        "--precision",
        "float32",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    assert cli(*args, "--out", str(tmp_path / "ref"), env=env).returncode == 0

    out = tmp_path / "killed"
    kill_9_when([*args, "--out", str(out)], out / "checkpoint.json", lambda c: c.get("step", 0) >= 300, env=env)
    assert not (out / "sae.safetensors").exists(), "the kill did not land mid-training"
    r = cli(*args, "--out", str(out), env=env)
    assert r.returncode == 0, r.stderr
    assert (out / "sae.safetensors").read_bytes() == (tmp_path / "ref" / "sae.safetensors").read_bytes()
    r = cli("train", "--acts", str(acts), "--expansion", "0", "--out", str(tmp_path / "bad"))
    assert r.returncode == 2 and "--expansion must be a positive integer" in r.stderr


# ---- kill -9 at every moment of a run: the same command then finishes with the same bytes -------


def metrics_without_timing(out: Path) -> list[dict]:
    return [
        {k: v for k, v in json.loads(ln).items() if k != "tokens_per_s"}
        for ln in (out / "metrics.jsonl").read_text().splitlines()
    ]


def tiny_model_dir_and_corpus(tmp: Path) -> tuple[Path, Path]:
    """A 2-layer tiny Llama saved as a model directory, and a small corpus file, under tmp."""
    d = tmp / "tiny"
    tiny_model("llama", n_layers=2).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    corpus = tmp / "c.txt"
    corpus.write_text(CORPUS_TEXT * 4)
    return d, corpus


@pytest.fixture(scope="module")
def train_setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train_kills")
    d, corpus = tiny_model_dir_and_corpus(tmp)
    acts = tmp / "acts"
    assert (
        cli(
            "harvest",
            "--model",
            str(d),
            "--hook",
            "blocks.1.hook_resid_post",
            "--dataset",
            str(corpus),
            "--context-length",
            "16",
            "--out",
            str(acts),
        ).returncode
        == 0
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = [
        "train",
        "--acts",
        str(acts),
        "--expansion",
        "4",
        "--tokens",
        "64000",
        "--batch-size",
        "128",
        "--log-every",
        "10",
        "--device",
        "cpu",
        "--precision",
        "float32",
    ]
    refs = {}
    for every in ("16000", "10000000"):  # 125 steps per checkpoint, and a run that never checkpoints
        args = [*base, "--checkpoint-every", every]
        assert cli(*args, "--out", str(tmp / f"ref{every}"), env=env).returncode == 0
        refs[every] = (args, tmp / f"ref{every}")
    return refs, env


TRAIN_KILLS = {  # name: (checkpoint every, target, cond, when)
    "before_the_first_checkpoint": ("16000", "sae_lens_lite.training.train:save_checkpoint", "n == 1", "before"),
    "between_checkpoints": ("16000", "sae_lens_lite.training.train:save_checkpoint", "n == 2", "after"),
    "during_a_checkpoint_write": ("16000", "sae_lens_lite.training.train:save_safetensors_atomic", "n == 2", "during"),
    "during_the_final_weights_write": ("16000", "sae_lens_lite.training.sae:save_safetensors_atomic", "True", "during"),
    "after_the_final_weights_before_config": (
        "16000",
        "sae_lens_lite.training.sae:write_json_atomic",
        "True",
        "before",
    ),
    "before_marking_the_run_complete": (
        "16000",
        "sae_lens_lite.training.train:write_json_atomic",
        "a[1].get('complete')",
        "before",
    ),
    "after_marking_complete_before_cleanup": (
        "16000",
        "sae_lens_lite.training.train:write_json_atomic",
        "a[1].get('complete')",
        "after",
    ),
    "no_checkpoint_run_mid_training": ("10000000", "sae_lens_lite.training.train:lr_at", "a[0] == 300", "before"),
    "no_checkpoint_run_during_final_write": (
        "10000000",
        "sae_lens_lite.training.sae:write_json_atomic",
        "True",
        "before",
    ),
}


@pytest.mark.parametrize("point", list(TRAIN_KILLS))
def test_kill_9_of_train_at_any_point_then_rerun_gives_the_same_bytes(train_setup, tmp_path, point):
    refs, env = train_setup
    every, target, cond, when = TRAIN_KILLS[point]
    args, ref = refs[every]
    out = tmp_path / "killed"
    kill_9_at([*args, "--out", str(out)], target, cond, when, env=env)
    r = cli(*args, "--out", str(out), env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "sae.safetensors").read_bytes() == (ref / "sae.safetensors").read_bytes()
    assert metrics_without_timing(out) == metrics_without_timing(ref)
    assert json.loads((out / "checkpoint.json").read_text())["complete"]
    cfgs = [json.loads((d / "config.json").read_text()) for d in (out, ref)]
    for c in cfgs:
        c["meta"]["train_config"].pop("out")  # the one setting that differs between the two runs
        c["meta"]["final_metrics"].pop("tokens_per_s")  # timing
    assert cfgs[0] == cfgs[1]  # final metrics and the end-of-training measurement included
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint.json",
        "config.json",
        "metrics.jsonl",
        "provenance.json",
        "sae.safetensors",
    ]


@pytest.fixture(scope="module")
def harvest_setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("harvest_kills")
    d, corpus = tiny_model_dir_and_corpus(tmp)
    args = [
        "harvest",
        "--model",
        str(d),
        "--hook",
        "blocks.1.hook_resid_post",
        "--dataset",
        str(corpus),
        "--tokens",
        "2000",
        "--context-length",
        "16",
        "--contexts-per-shard",
        "16",
        "--batch-size",
        "4",
        "--dtype",
        "float32",
    ]
    assert cli(*args, "--out", str(tmp / "ref")).returncode == 0
    return args, tmp / "ref"


HARVEST_KILLS = {
    "before_the_first_shard": ("sae_lens_lite.data.cache:write_shard", "n == 1", "before"),
    "during_a_shard_write": ("sae_lens_lite.data.cache:save_file", "n == 3", "during"),
    "before_marking_the_cache_complete": (
        "sae_lens_lite.data.cache:write_json_atomic",
        "a[1].get('complete')",
        "before",
    ),
    "after_marking_complete": ("sae_lens_lite.data.cache:write_json_atomic", "a[1].get('complete')", "after"),
}


@pytest.mark.parametrize("point", list(HARVEST_KILLS))
def test_kill_9_of_harvest_at_any_point_then_rerun_gives_the_same_cache(harvest_setup, tmp_path, point):
    args, ref = harvest_setup
    out = tmp_path / "killed"
    kill_9_at([*args, "--out", str(out)], *HARVEST_KILLS[point])
    r = cli(*args, "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = (json.loads((p / "manifest.json").read_text()) for p in (ref, out))
    assert a["complete"] and len(a["shards"]) == 8
    assert {k: v for k, v in a.items() if k != "harvest_config"} == {
        k: v for k, v in b.items() if k != "harvest_config"
    }
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ref.iterdir())  # no debris


# ---- what a user can hand us: bad numbers and bad files -> one line on stderr, exit 2 ------------


def _sae_dir(tmp):
    from sae_lens_lite.training.sae import SAE, SAEConfig

    return SAE(SAEConfig(d_in=32, d_sae=64, model="tiny", hook="blocks.0.hook_resid_post", context_length=16)).save(
        tmp / "sae"
    )


def _cache_dir(tmp):
    import torch

    from sae_lens_lite.data.cache import CacheWriter

    w = CacheWriter(
        tmp / "acts",
        {"model": "tiny", "hook": "blocks.0.hook_resid_post", "dtype": "float32", "context_length": 16},
        32,
    )
    w.add_shard(torch.randn(64, 32), torch.zeros(64), torch.arange(64) // 16, torch.arange(64) % 16, n_contexts=4)
    w.finish()
    return tmp / "acts"


def _break_config(tmp, text):
    sae = _sae_dir(tmp)
    (sae / "config.json").write_text(text)
    return sae


def _binary_config(tmp):
    sae = _sae_dir(tmp)
    (sae / "config.json").write_bytes(b"\xff\xfe\x00garbage" + os.urandom(64))
    return sae


def _truncate_weights(tmp):
    sae = _sae_dir(tmp)
    w = sae / "sae.safetensors"
    w.write_bytes(w.read_bytes()[:200])
    return sae


def _nan_weights(tmp):
    from sae_lens_lite.training.sae import SAE

    sae = SAE.load(_sae_dir(tmp))
    sae.W_dec.data[3, 5] = float("nan")
    return sae.save(tmp / "sae")


def _mismatched(tmp):
    sae = _sae_dir(tmp)
    cfg = json.loads((sae / "config.json").read_text())
    (sae / "config.json").write_text(json.dumps({**cfg, "d_sae": 128}))
    return sae


def _binary(tmp, name="c.txt"):
    (tmp / name).write_bytes(os.urandom(20000))
    return tmp / name


def _damaged_manifest(tmp):
    acts = _cache_dir(tmp)
    (acts / "manifest.json").write_text(json.dumps({"format": "sae_lens_lite.activations", "complete": True}))
    return acts


def _features_json(tmp, data: bytes):
    (tmp / "an").mkdir()
    (tmp / "an" / "features.json").write_bytes(data)
    return tmp / "an"


def _run_file(tmp, text):
    (tmp / "run.toml").write_text(text)
    return tmp / "run.toml"


def _broken_model(tmp):
    d = tmp / "model"
    d.mkdir()
    (d / "config.json").write_text("{ not json")
    (d / "model.safetensors").write_bytes(b"\0" * 10)
    return d


BAD_INPUTS = {  # name: (argv made from tmp_path, what the error line says)
    "analyze_config_not_json": (
        lambda t: ["analyze", "--sae", str(_break_config(t, "{oops")), "--acts", str(_cache_dir(t))],
        "config.json is not valid JSON",
    ),
    "evaluate_config_a_list": (
        lambda t: ["evaluate", "--sae", str(_break_config(t, "[1, 2]"))],
        "is not an SAE config",
    ),
    "export_config_binary": (lambda t: ["export", "--sae", str(_binary_config(t))], "config.json is not valid JSON"),
    "analyze_truncated_weights": (
        lambda t: ["analyze", "--sae", str(_truncate_weights(t)), "--acts", str(_cache_dir(t))],
        "sae.safetensors",
    ),
    "export_weights_of_another_shape": (
        lambda t: ["export", "--sae", str(_mismatched(t)), "--out", str(t / "x")],
        "do not belong together",
    ),
    "export_nan_weights": (
        lambda t: ["export", "--sae", str(_nan_weights(t)), "--out", str(t / "x")],
        "NaN or infinite",
    ),
    "export_analysis_binary": (
        lambda t: [
            "export",
            "--sae",
            str(_sae_dir(t)),
            "--analysis",
            str(_features_json(t, os.urandom(300))),
            "--out",
            str(t / "x"),
            "--format",
            "dictionary",
        ],
        "features.json",
    ),
    "harvest_binary_corpus": (
        lambda t: ["harvest", "--dataset", str(_binary(t)), "--out", str(t / "acts")],
        "is not UTF-8 text",
    ),
    "harvest_binary_corpus_dir": (
        lambda t: ["harvest", "--dataset", str(_binary(t, "d.txt").parent), "--out", str(t / "acts")],
        "is not UTF-8 text",
    ),
    "harvest_tokens_0": (
        lambda t: ["harvest", "--tokens", "0", "--out", str(t / "acts")],
        "--tokens must be a positive integer, got 0",
    ),
    "harvest_tokens_negative": (
        lambda t: ["harvest", "--tokens", "-5", "--out", str(t / "acts")],
        "--tokens must be a positive integer, got -5",
    ),
    "harvest_drop_every_position": (
        lambda t: ["harvest", "--context-length", "4", "--drop-first", "4"],
        "drops every position",
    ),
    "harvest_contexts_per_shard_0": (
        lambda t: ["harvest", "--contexts-per-shard", "0"],
        "--contexts-per-shard must be a positive integer",
    ),
    "harvest_broken_model_dir": (
        lambda t: ["harvest", "--model", str(_broken_model(t)), "--out", str(t / "acts")],
        "cannot load model from",
    ),
    "train_lr_nan": (lambda t: ["train", "--lr", "nan"], "--lr must be a finite number"),
    "train_l1_inf": (lambda t: ["train", "--l1", "inf"], "--l1 must be a finite number"),
    "train_batch_negative": (lambda t: ["train", "--batch-size", "-1"], "--batch-size must be a positive integer"),
    "train_kl_rho_1": (lambda t: ["train", "--kl-rho", "1"], "--kl-rho must lie strictly between 0 and 1"),
    "train_damaged_manifest": (
        lambda t: ["train", "--acts", str(_damaged_manifest(t)), "--out", str(t / "s")],
        "manifest.json is damaged",
    ),
    "analyze_batch_0": (lambda t: ["analyze", "--batch-size", "0"], "--batch-size must be a positive integer"),
    "analyze_max_features_negative": (
        lambda t: ["analyze", "--max-features", "-3"],
        "--max-features must be a positive integer",
    ),
    "evaluate_context_length_1": (
        lambda t: ["evaluate", "--context-length", "1"],
        "--context-length must be at least 2",
    ),
    "evaluate_tokens_0": (lambda t: ["evaluate", "--tokens", "0"], "--tokens must be a positive integer"),
    "train_absurd_expansion": (
        lambda t: [
            "train",
            "--acts",
            str(_cache_dir(t)),
            "--expansion",
            "100000000",
            "--batch-size",
            "32",
            "--out",
            str(t / "s"),
            "--device",
            "cpu",
        ],
        "lower --expansion",
    ),
    "analyze_absurd_top_k": (
        lambda t: [
            "analyze",
            "--sae",
            str(_sae_dir(t)),
            "--acts",
            str(_cache_dir(t)),
            "--top-k",
            "100000000",
            "--out",
            str(t / "a"),
        ],
        "lower --top-k",
    ),
    "run_file_text_for_a_number": (
        lambda t: ["run", str(_run_file(t, '[train]\ntokens = "many"\n'))],
        "[train] tokens = 'many' should be an integer",
    ),
    "run_file_fraction_for_a_count": (
        lambda t: ["run", str(_run_file(t, "[harvest]\ntokens = 1.5\n"))],
        "[harvest] tokens = 1.5 should be an integer",
    ),
    "import_cfg_a_list": (
        lambda t: ["import", "--src", str(_sparsify_list_cfg(t)), "--out", str(t / "o")],
        "holds a JSON list",
    ),
}


def _sparsify_list_cfg(tmp):
    d = tmp / "layers.1"
    d.mkdir()
    (d / "cfg.json").write_text("[]")
    (d / "sae.safetensors").write_bytes(b"")
    return d


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_and_exit_2(tmp_path, case, capsys, monkeypatch):
    from sae_lens_lite.cli import main

    monkeypatch.chdir(tmp_path)  # default --out paths land here
    make_argv, says = BAD_INPUTS[case]
    argv = make_argv(tmp_path)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"sae-lite {argv[0]}: error: ") and says in err, err
