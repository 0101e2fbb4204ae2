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
    return subprocess.run([sys.executable, "-m", "sae_lens_lite", *args], capture_output=True, text=True, timeout=600, **kw)


@pytest.fixture
def tiny_model_dir(tmp_path):
    d = tmp_path / "tiny"
    tiny_model("llama", n_layers=4).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


def kill_9_when(args: list[str], progress_file: Path, ready, env=None) -> None:
    """Run `sae-lite ARGS` and SIGKILL it as soon as ready(json in progress_file) holds."""
    proc = subprocess.Popen([sys.executable, "-m", "sae_lens_lite", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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


def shard_hashes(cache: Path) -> list[str]:
    return [s["sha256"] for s in json.loads((cache / "manifest.json").read_text())["shards"]]


def test_kill_9_during_harvest_then_rerun_gives_identical_cache(tiny_model_dir, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(CORPUS_TEXT * 30)
    args = ["harvest", "--model", str(tiny_model_dir), "--hook", "blocks.3.hook_resid_post", "--dataset", str(corpus),
            "--tokens", "8000", "--context-length", "16", "--contexts-per-shard", "8", "--batch-size", "4", "--dtype", "float32"]  # fmt: skip
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
    assert cli("harvest", "--model", str(tiny_model_dir), "--hook", "blocks.0.hook_resid_post", "--dataset", str(corpus),
               "--context-length", "16", "--contexts-per-shard", "8", "--out", str(out)).returncode == 0  # fmt: skip
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
    assert cli("harvest", "--model", str(tiny_model_dir), "--hook", "blocks.1.hook_resid_post", "--dataset", str(corpus),
               "--context-length", "16", "--out", str(acts)).returncode == 0  # fmt: skip
    args = ["train", "--acts", str(acts), "--expansion", "4", "--tokens", "300000", "--batch-size", "128",
            "--checkpoint-every", "20000", "--log-every", "20", "--device", "cpu", "--precision", "float32"]  # fmt: skip
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
