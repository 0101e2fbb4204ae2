"""Device resolution: every --device a user can mistype is one line naming the choices."""

import os
import subprocess
import sys

import pytest
import torch

from sae_lens_lite.errors import UserError
from sae_lens_lite.runtime import resolve_device


@pytest.mark.parametrize("device", ["gpu", "tpu", "CPU", "cuda:x", "cuda:-1", "", "meta", "xla"])
def test_unknown_device_is_a_user_error(device):
    with pytest.raises(UserError, match=r"unknown --device .*use auto, cpu, cuda or cuda:N"):
        resolve_device(device)


def test_known_devices_resolve():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")


def test_cuda_without_a_gpu_and_a_gpu_beyond_the_count(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="no CUDA GPU is available"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(UserError, match=r"has 2 GPU\(s\), cuda:0..cuda:1"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("command", [["harvest"], ["train"], ["evaluate"], ["analyze"], ["steer", "--feature", "1"]])
def test_bad_device_on_the_command_line_is_one_line_and_exit_2(command, capsys, tmp_path, monkeypatch):
    from sae_lens_lite.cli import main

    monkeypatch.chdir(tmp_path)  # the default --out and --acts paths are relative
    assert main([*command, "--device", "gpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: unknown --device 'gpu': use auto, cpu, cuda or cuda:N" in err


def test_a_finished_rank_leaves_its_group_and_skips_the_interpreter_teardown(tmp_path):
    # gloo's threads aborted finished torchrun ranks in the interpreter's teardown; the CLI ends a
    # rank with exit_if_distributed: exit handlers run (they leave the group), the teardown does not.
    script = """
import atexit, os, sys
import torch.distributed as dist
from sae_lens_lite import runtime

class Teardown:
    def __del__(self):
        print("teardown ran", flush=True)

keep = Teardown()  # a module global: collected only in the interpreter's teardown
runtime.exit_if_distributed(5)  # no group yet: returns
dist.init_process_group("gloo", init_method=f"file://{sys.argv[1]}", rank=0, world_size=1)
atexit.register(lambda: print("exit handler ran, group joined:", dist.is_initialized(), flush=True))
atexit.register(runtime._leave)
print("done", end=" ")  # unflushed: exit_if_distributed flushes it
runtime.exit_if_distributed(3)
print("not reached")
"""
    res = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "store")], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 3, res.stderr
    assert res.stdout.split("\n")[0] == "done exit handler ran, group joined: False"  # _leave ran first (LIFO)
    assert "teardown ran" not in res.stdout and "not reached" not in res.stdout


def test_cpu_description_names_the_model_and_the_matmul_features():
    from sae_lens_lite.runtime import cpu_description

    amd = "model name\t: AMD EPYC 9R14\nflags\t\t: fpu avx2 avx512f avx512_bf16\n"
    intel = "model name\t: Intel(R) Xeon(R) Platinum 8488C\nflags\t\t: fpu avx512_bf16 amx_bf16 amx_tile\n"
    threads = torch.get_num_threads()
    assert cpu_description(amd) == f"AMD EPYC 9R14, {threads} threads, AVX512-BF16 yes, AMX no"
    assert cpu_description(intel).endswith("AVX512-BF16 yes, AMX yes")
    assert cpu_description("flags : fpu sse2\n").endswith("AVX512-BF16 no, AMX no")


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script runs its checks")
def test_the_gpu_check_script_skips_cleanly_without_cuda(tmp_path):
    from pathlib import Path

    script = Path(__file__).parents[1] / "scripts" / "gpu_check.sh"
    r = subprocess.run(
        ["bash", str(script)], capture_output=True, text=True, timeout=120, env={**os.environ, "OUT": str(tmp_path)}
    )
    assert r.returncode == 0 and r.stdout.strip() == "gpu_check: no CUDA device here; nothing to do", r.stderr
    assert list(tmp_path.iterdir()) == []
