"""Device resolution: every --device a user can mistype is one line naming the choices."""

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
