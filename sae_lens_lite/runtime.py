"""Where the code runs: the device, the model's dtype, and the process group under torchrun.

Every stage asks here, so none of them imports another stage to learn its device or its rank.

torchrun starts one process per GPU and describes the group in the environment (WORLD_SIZE,
RANK, LOCAL_RANK, MASTER_ADDR/PORT); `init_from_env` joins it, with NCCL on GPUs and gloo on
CPUs. Without torchrun (WORLD_SIZE unset or 1) nothing is initialised and every helper here is
the identity, so a single process runs exactly the code it always ran. What the stages do with
the group (data-parallel training, a latent-sharded SAE) is in distributed.py; the sharded
harvest's writer is in cache.py.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import os
import platform
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from sae_lens_lite.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The CPU features the fast training paths depend on (loss.py), named in every CPU benchmark figure.
CPU_FEATURES = (("AVX512-BF16", "avx512_bf16"), ("AMX", "amx_bf16"))


@functools.cache
def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""  # not Linux


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere): avx512_bf16, amx_bf16, ..."""
    lines = _cpuinfo().splitlines()
    return frozenset(w for line in lines if line.startswith("flags") for w in line.split(":", 1)[1].split())


def cpu_description(cpuinfo: str | None = None) -> str:
    """The CPU as a benchmark figure must name it: model, torch's threads, and the matmul features
    the fast paths depend on, e.g. "AMD EPYC, 2 threads, AVX512-BF16 yes, AMX no"."""
    text = _cpuinfo() if cpuinfo is None else cpuinfo
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "")
    flags = {w for ln in text.splitlines() if ln.startswith("flags") for w in ln.split(":", 1)[1].split()}
    features = ", ".join(f"{name} {'yes' if flag in flags else 'no'}" for name, flag in CPU_FEATURES)
    return f"{model or platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {features}"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:  # torch's message lists twenty device types we do not run on
        dev = None
    # mps is kept for Apple machines; the other types torch knows (meta, xla, ...) would only fail later
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"unknown --device {device!r}: use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {device!r} asked for, but no CUDA GPU is available; use --device cpu")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise UserError(f"device {device!r} asked for, but this machine has {n} GPU(s), cuda:0..cuda:{n - 1}")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {device!r} asked for, but MPS is not available here; use --device cpu")
    return dev


def model_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


# ---- the process group ----------------------------------------------------------------------


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: torch.device) -> torch.device:
    """Join the process group that torchrun describes in the environment (once) and return this
    rank's device: cuda:LOCAL_RANK on GPUs. A single process gets `device` back untouched."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if device.index not in (None, local):
            raise UserError(
                "under torchrun each process uses the GPU numbered by its LOCAL_RANK; pass --device cuda "
                f"(or auto), not {device}"
            )
        if local >= torch.cuda.device_count():
            raise UserError(
                f"LOCAL_RANK is {local} but this node has {torch.cuda.device_count()} GPUs; start at most "
                "one process per GPU"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        cuda = device.type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
        atexit.register(_leave)
    return device


def _leave() -> None:
    if dist.is_initialized():
        # Leave together: a rank that tears gloo down while a peer is still talking to it can
        # abort the peer ("terminate called without an active exception").
        dist.barrier()
        dist.destroy_process_group()


def exit_if_distributed(rc: int) -> None:
    """End a torchrun rank whose command is done: leave the group with its peers, then exit
    without the interpreter's teardown, where gloo's threads can abort a finished rank
    ("terminate called without an active exception", seen in CI after a clean run). Exit
    handlers still run first. A single process returns and exits normally."""
    if not dist.is_initialized():
        return
    atexit._run_exitfuncs()  # _leave among them: barrier, then destroy
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def comm_device() -> torch.device:
    # NCCL moves GPU tensors only, gloo CPU tensors only.
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (picklable objects)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def main_first(fn: Callable):
    """fn() on rank 0, then on the other ranks: rank 0 fills shared caches (a converted model, a
    download) before the others read them. A UserError on rank 0 is raised on every rank."""
    if world_size() == 1:
        return fn()
    result, err = None, None
    if is_main():
        try:
            result = fn()
        except UserError as e:
            err = str(e)
    err = broadcast_object(err)
    if err is not None:
        raise UserError(err)
    return result if is_main() else fn()


def gather_rows(x: Tensor) -> Tensor:
    """The global batch [N·n, d]: every rank's rows, in rank order (x itself in a single process)."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x, device=comm_device()) for _ in range(world_size())]
    dist.all_gather(parts, x.to(comm_device()))
    return torch.cat(parts).to(x.device)


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_GLIBC_DEFAULTS = {_M_TRIM_THRESHOLD: 128 * 1024, _M_MMAP_MAX: 65536}


@contextmanager
def keep_freed_memory(device: torch.device):
    """While training on the CPU, keep the memory PyTorch frees for its next tensors (glibc only).
    glibc hands every large block (> 32 MiB, and smaller ones until its threshold adapts) back to
    the system when freed, so each step's fresh [batch, d_sae] temporaries fault their pages in
    again, and in a VM a fault is dear: a dense L1 step at 8x ran ~13% faster with reuse
    (docs/training.md). Like CUDA's caching allocator this holds the peak; at the end the settings
    go back to glibc's defaults and the spare memory is returned (malloc_trim)."""
    libc = _glibc() if device.type == "cpu" else None
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_MAX, 0)  # no block of its own for large requests: they come from the heap
    libc.mallopt(_M_TRIM_THRESHOLD, 2**30 - 1)  # and the heap is not shrunk after each free
    try:
        yield
    finally:
        for param, value in _GLIBC_DEFAULTS.items():
            libc.mallopt(param, value)
        libc.malloc_trim(0)


def _glibc():
    """The process's C library if it is glibc (mallopt, malloc_trim), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None
