import json
import math
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae_lens_lite import runtime
from sae_lens_lite.data.cache import CacheWriter
from sae_lens_lite.errors import UserError
from sae_lens_lite.training import recipes
from sae_lens_lite.training import train as train_mod
from sae_lens_lite.training.sae import SAE, SAEConfig
from sae_lens_lite.training.synthetic import make_superposition, mean_max_cosine
from sae_lens_lite.training.train import (
    LAMBDA_WARMUP,
    LR_DECAY,
    LogSums,
    TrainConfig,
    lr_at,
    penalty_warmup_at,
    resample_dead_latents,
    train,
    train_on_batches,
)


def small_sae_cfg(penalty: str, d_in: int = 64, d_sae: int = 512, k: int = 4) -> SAEConfig:
    return SAEConfig(d_in=d_in, d_sae=d_sae, **recipes.get(penalty, TrainConfig(penalty=penalty, k=k)).sae_options())


def sample_l0(sae: SAE, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((sae(x).latents > 0).float().sum(-1).mean())


# ---- schedules ------------------------------------------------------------------------------


def test_lr_schedule_follows_its_formula():
    total, lr = 1000, 1e-3
    warm, decay = round(0.01 * total), round(LR_DECAY * total)
    assert lr_at(0, total, lr) == pytest.approx(lr / warm)
    assert lr_at(warm - 1, total, lr) == pytest.approx(lr)
    assert lr_at(500, total, lr) == lr
    assert lr_at(total - decay, total, lr) == pytest.approx(lr)  # decay starts at 80%
    assert lr_at(900, total, lr) == pytest.approx(lr * 100 / decay)
    assert lr_at(total - 1, total, lr) == pytest.approx(lr / decay)  # last step: nearly 0
    for s in range(total):
        expected = lr * min(1, (s + 1) / warm) * min(1, (total - s) / decay)
        assert lr_at(s, total, lr) == pytest.approx(expected)


def test_penalty_warmup_is_linear_over_the_first_5_percent():
    total = 2000
    warm = round(LAMBDA_WARMUP * total)
    assert penalty_warmup_at(0, total) == 0.0
    assert penalty_warmup_at(warm // 2, total) == pytest.approx(0.5)
    assert penalty_warmup_at(warm, total) == 1.0
    assert penalty_warmup_at(total - 1, total) == 1.0


def stepped_sae() -> tuple[SAE, torch.optim.Adam]:
    """A d_in 8, d_sae 16 SAE after one Adam step, so every latent has optimiser state to reset."""
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=8, d_sae=16))
    opt = torch.optim.Adam(sae.parameters())
    sae(torch.randn(4, 8)).x_hat.pow(2).sum().backward()
    opt.step()
    return sae, opt


def test_resampling_points_dead_latents_at_inputs_and_resets_adam():
    sae, opt = stepped_sae()
    since = torch.zeros(16)
    since[[3, 7]] = 1e9
    cfg = TrainConfig(dead_window=100)
    x = torch.randn(64, 8)
    resample_dead_latents(sae, opt, x, since, cfg, step=5)
    dirs = sae.W_dec[[3, 7]] / sae.W_dec[[3, 7]].norm(dim=1, keepdim=True)
    best = (dirs @ (x - sae.b_dec).T / (x - sae.b_dec).norm(dim=1)).max(dim=1).values
    assert torch.allclose(best, torch.ones(2), atol=1e-5)  # each row is one input's direction
    assert (opt.state[sae.W_dec]["exp_avg"][[3, 7]] == 0).all() and (since == 0).all()
    assert (opt.state[sae.W_dec]["exp_avg"][0] != 0).any()


def test_resampling_with_every_latent_dead_gives_unit_rows_like_the_init():
    sae, opt = stepped_sae()
    since = torch.full((16,), 1e9)  # nothing alive to copy a norm from
    resample_dead_latents(sae, opt, torch.randn(64, 8), since, TrainConfig(dead_window=100), step=5)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(16), atol=1e-5)


# ---- learning: ground-truth recovery --------------------------------------------------------

RECOVERY = {  # penalty -> (settings, tokens); 256 features in 64 dims, each firing with p <= 5%
    "l1": (dict(l1=1.0), 300_000),
    "kl": (dict(kl_rho=0.005), 600_000),
    "topk": (dict(k=4), 300_000),
    "batchtopk": (dict(k=4), 300_000),
    "jumprelu": (dict(target_l0=4.0), 300_000),
    "matryoshka": (dict(k=4), 300_000),
}


@pytest.mark.parametrize("penalty", list(RECOVERY))
def test_recovers_a_known_dictionary(penalty):
    data = make_superposition(n_features=256, d=64, true_l0=2.5, power=0.3, seed=0)
    assert float(data.probs.max()) <= 0.05
    settings, tokens = RECOVERY[penalty]
    cfg = TrainConfig(penalty=penalty, batch_size=1024, lr=3e-3, seed=0, **settings)
    sae = train_on_batches(small_sae_cfg(penalty), cfg, data.batches(1024, 1 << 18, seed=1), tokens, progress=False)
    assert mean_max_cosine(sae.W_dec, data.features) >= 0.9


@pytest.mark.parametrize("target", [8.0, 20.0])
def test_target_l0_lands_within_20_percent(target):
    """20: without the controller's proportional term λ overshot while L0 lagged and the run ended
    at 0.76 × the target."""
    data = make_superposition(n_features=256, d=64, true_l0=2.5, power=0.3, seed=0)
    cfg = TrainConfig(penalty="l1", l1=1.0, target_l0=target, batch_size=1024, lr=3e-3, seed=0)
    sae = train_on_batches(small_sae_cfg("l1"), cfg, data.batches(1024, 1 << 18, seed=1), 600_000, progress=False)
    l0 = sample_l0(sae, data.sample(8192, torch.Generator().manual_seed(7)))
    assert abs(l0 - target) <= 0.2 * target, l0


def test_target_l0_raises_lambda_only_as_fast_as_l0_follows(tmp_path):
    """--l1 100× what the target needs: with --target-l0, λ starts at 1% of it and is steered from
    the first step, so the oversized λ is never applied (warmed up linearly instead, λ reached 100
    while L0 still lagged; on SmolLM2 that left 60% of the latents dead, training.md)."""
    data = make_superposition(n_features=256, d=64, true_l0=2.5, power=0.3, seed=0)
    cfg = TrainConfig(penalty="l1", l1=100.0, target_l0=8.0, batch_size=1024, lr=3e-3, seed=0, log_every=5)
    sae = train_on_batches(
        small_sae_cfg("l1"), cfg, data.batches(1024, 1 << 18, seed=1), 600_000, out=tmp_path, progress=False
    )
    lams = [json.loads(line)["lam"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert max(lams) <= 20.0, max(lams)  # 8 measured; linearly warmed up: 283
    x = data.sample(8192, torch.Generator().manual_seed(7))
    assert abs(sample_l0(sae, x) - 8.0) <= 0.2 * 8.0  # 7.7 measured; 5.5 without the proportional term
    with torch.no_grad():
        fires = (sae.encode(x) > 0).any(0)
    assert float(fires.float().mean()) >= 0.5  # 256 true features for 512 latents


# ---- resume ---------------------------------------------------------------------------------


class Interrupted(Exception):
    pass


def interrupting(factory, after: int):
    """The same batches, but raise after `after` batches in all (a killed run)."""
    count = [0]

    def wrapped(epoch):
        for x in factory(epoch):
            if count[0] == after:
                raise Interrupted
            count[0] += 1
            yield x

    return wrapped


RESUME = {  # each with the state a resume must restore: λ, resampling, dead counters, thresholds
    "l1": dict(resample_dead=True, target_l0=3.0),
    "topk": dict(k=3),
    "batchtopk": dict(k=3),
    "jumprelu": dict(target_l0=3.0),
    "matryoshka": dict(k=3),
}


def run_interrupted_and_resumed(sae_cfg, cfg, factory, steps, interrupt_after, ckpt_step, tmp_path):
    """Train `steps` steps uninterrupted in tmp_path/a; in tmp_path/b, interrupt after
    `interrupt_after` batches are read, check the checkpoint is at `ckpt_step`, resume to the end.
    Asserts the two SAEs are identical; returns (uninterrupted, resumed)."""
    tokens = steps * cfg.batch_size
    ref = train_on_batches(sae_cfg, cfg, factory, tokens, out=tmp_path / "a", progress=False)
    with pytest.raises(Interrupted):
        train_on_batches(
            sae_cfg, cfg, interrupting(factory, interrupt_after), tokens, out=tmp_path / "b", progress=False
        )
    assert json.loads((tmp_path / "b" / "checkpoint.json").read_text())["step"] == ckpt_step
    resumed = train_on_batches(sae_cfg, cfg, factory, tokens, out=tmp_path / "b", progress=False)
    for k, v in ref.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k
    return ref, resumed


@pytest.mark.parametrize("penalty", list(RESUME))
def test_resume_reproduces_the_uninterrupted_run(tmp_path, penalty):
    data = make_superposition(n_features=64, d=16, true_l0=2.0, seed=0)
    factory = data.batches(256, 16 * 256, seed=1)  # 16 batches per epoch; 60 steps = ~4 epochs
    extra = RESUME[penalty]
    cfg = TrainConfig(
        penalty=penalty,
        batch_size=256,
        checkpoint_every=10 * 256,
        dead_window=5 * 256,
        log_every=7,
        precision="float32",
        **extra,
    )
    sae_cfg = small_sae_cfg(penalty, d_in=16, d_sae=64, k=3)
    # init reads the 16 batches of epoch 0, then 37 steps; the checkpoint before them is step 30
    run_interrupted_and_resumed(sae_cfg, cfg, factory, 60, 16 + 37, 30, tmp_path)

    def metrics(run):  # everything but the timing
        return [
            {k: v for k, v in json.loads(ln).items() if k != "tokens_per_s"}
            for ln in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        ]

    assert metrics("a") == metrics("b") and metrics("a")[-1]["step"] == 60
    assert not list((tmp_path / "b").glob("checkpoint_*.safetensors"))  # cleaned up when complete


def test_log_sums_name_the_slots_of_the_packed_tensor_a_checkpoint_keeps(tmp_path):
    sums = LogSums(*(torch.tensor(float(i)) for i in range(8)))
    assert sums.packed().tolist() == [float(i) for i in range(8)]
    assert LogSums.read(sums.packed()) == LogSums(0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0)
    assert LogSums._fields == ("steps", "mse", "sse", "sst", "l0", "penalty", "lam", "dead_frac")

    # A run killed after its checkpoint at step 10, with a log line every 7 steps: the checkpoint's
    # sums are those of steps 8-10, and each slot holds what its name says.
    data = make_superposition(n_features=64, d=16, true_l0=2.0, seed=0)
    cfg = TrainConfig(penalty="l1", batch_size=256, checkpoint_every=10 * 256, log_every=7, precision="float32")
    with pytest.raises(Interrupted):
        train_on_batches(
            small_sae_cfg("l1", d_in=16, d_sae=64),
            cfg,
            interrupting(data.batches(256, 16 * 256, seed=1), 16 + 12),
            30 * 256,
            out=tmp_path,
            progress=False,
        )
    ckpt = json.loads((tmp_path / "checkpoint.json").read_text())
    a = LogSums.read(load_file(tmp_path / ckpt["file"])["acc"])
    assert ckpt["step"] == 10 and a.steps == 3.0
    assert a.lam == pytest.approx(3 * cfg.l1)  # past the warm-up (5% of 30 steps): λ itself, 3 times
    assert a.sse == pytest.approx(a.mse * 256, rel=1e-4)  # summed over the batch's tokens, not averaged
    assert a.sst > 0 and 0 < a.l0 / a.steps <= 64 and a.penalty > 0
    assert 0 <= a.dead_frac <= a.steps


def test_resume_restores_the_l0_trend_of_a_paused_controller(tmp_path):
    """JumpReLU's --target-l0 pauses its integral term on L0's smoothed trend (train.steer_lambda).
    Here the pause acts in steps 2-22 and the run resumes from step 10: a trend not restored from
    the checkpoint would restart from one step's change and change λ (checked: the test then fails)."""
    data = make_superposition(n_features=64, d=16, true_l0=2.0, seed=0)
    factory = data.batches(256, 16 * 256, seed=1)
    cfg = TrainConfig(
        penalty="jumprelu", batch_size=256, checkpoint_every=10 * 256, lr=0.1, target_l0=15.0, precision="float32"
    )
    sae_cfg = small_sae_cfg("jumprelu", d_in=16, d_sae=64, k=3)
    # init reads the 16 batches of epoch 0, then 17 steps; the checkpoint before them is step 10
    ref, resumed = run_interrupted_and_resumed(sae_cfg, cfg, factory, 30, 16 + 17, 10, tmp_path)
    assert ref.cfg.meta["final_metrics"]["lam"] == resumed.cfg.meta["final_metrics"]["lam"]


# ---- the entry point on an on-disk cache ----------------------------------------------------


def write_cache(path, d=16, n=4096, seed=0):
    data = make_superposition(n_features=48, d=d, true_l0=2.0, seed=seed)
    acts = data.sample(n, torch.Generator().manual_seed(seed))
    w = CacheWriter(
        path, {"model": "toy", "hook": "blocks.0.hook_resid_post", "dtype": "float32", "context_length": 32}, d
    )
    for i in range(0, n, 1024):
        rows = torch.arange(i, i + 1024)
        w.add_shard(acts[i : i + 1024], rows % 100, rows // 32, rows % 32, n_contexts=32)
    w.finish()
    return path


def test_train_from_a_cache_writes_a_resumable_run(tmp_path):
    acts = write_cache(tmp_path / "acts")
    cfg = TrainConfig(
        acts=str(acts), out=str(tmp_path / "sae"), expansion=4, tokens=20_000, batch_size=512, log_every=5
    )
    sae = train(cfg)
    out = tmp_path / "sae"
    loaded = SAE.load(out)
    assert (loaded.cfg.model, loaded.cfg.hook, loaded.cfg.context_length) == ("toy", "blocks.0.hook_resid_post", 32)
    assert loaded.d_sae == 64 and torch.equal(loaded.W_dec, sae.W_dec.cpu())
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 20_000 // 512
    assert {"mse", "explained_variance", "l0", "dead_frac", "l1", "lam", "lr"} <= set(lines[-1])
    assert train(cfg) is not None  # the same command again: already finished, nothing to do
    with pytest.raises(UserError, match=r"differs in: lr \(was 0.001, now 0.01\)"):
        train(TrainConfig(**{**vars(cfg), "lr": 1e-2}))
    other = write_cache(tmp_path / "acts32", d=32)
    with pytest.raises(UserError, match="input acts"):
        train(TrainConfig(**{**vars(cfg), "acts": str(other)}))
    train(TrainConfig(**{**vars(cfg), "acts": str(other), "overwrite": True}))
    assert SAE.load(out).d_in == 32


def test_user_errors(tmp_path):
    acts = write_cache(tmp_path / "acts")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        train(TrainConfig(acts=str(acts), out=str(busy), tokens=2048, batch_size=512))
    for bad in (dict(expansion=0), dict(penalty="l2"), dict(penalty="topk", target_l0=5.0), dict(kl_rho=1.5)):
        with pytest.raises(UserError):
            train(TrainConfig(acts=str(acts), out=str(tmp_path / "x"), tokens=2048, batch_size=512, **bad))
    with pytest.raises(UserError, match="--precision"):  # refused before --out is made
        train(TrainConfig(acts=str(acts), out=str(tmp_path / "p"), tokens=2048, batch_size=512, precision="fp16"))
    assert not (tmp_path / "p").exists()
    with pytest.raises(UserError, match="less than one batch"):
        train(TrainConfig(acts=str(acts), out=str(tmp_path / "y"), tokens=100, batch_size=512))


def test_wandb_missing_is_a_user_error(tmp_path):
    try:
        import wandb  # noqa: F401

        pytest.skip("wandb is installed")
    except ImportError:
        pass
    data = make_superposition(n_features=16, d=8, true_l0=1.0)
    cfg = TrainConfig(batch_size=64, wandb="proj")
    with pytest.raises(UserError, match="pip install wandb"):
        train_on_batches(small_sae_cfg("l1", 8, 16), cfg, data.batches(64, 640), 640, progress=False)


def test_wandb_that_cannot_start_is_one_line_naming_its_reason(tmp_path, monkeypatch, capsys):
    """wandb installed but not logged in (or offline): its error in one line, exit 2, no traceback."""
    import sys
    import types

    from sae_lens_lite.cli import main

    def init(**kw):
        raise RuntimeError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    acts = write_cache(tmp_path / "acts")
    argv = ["train", "--acts", str(acts), "--out", str(tmp_path / "sae"), "--tokens", "1024", "--batch-size", "512"]
    assert main([*argv, "--wandb", "proj"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No API key configured" in err and "--wandb" in err, err


@pytest.mark.slow
@pytest.mark.parametrize("penalty", ["l1", "topk"])  # topk: the sparse path, AuxK on (dead_window)
def test_compiled_loss_trains_like_eager(penalty):
    pytest.importorskip("torch._inductor")
    data = make_superposition(n_features=64, d=16, true_l0=2.0, seed=0)
    runs = []
    for compile in (False, True):
        cfg = TrainConfig(
            batch_size=256, compile=compile, precision="float32", log_every=10, penalty=penalty, k=4, dead_window=2560
        )
        runs.append(
            train_on_batches(
                small_sae_cfg(penalty, 16, 64), cfg, data.batches(256, 16 * 256, seed=1), 40 * 256, progress=False
            )
        )
    for k, v in runs[0].state_dict().items():
        assert torch.allclose(runs[1].state_dict()[k], v, atol=1e-5), k


def test_bf16_autocast_keeps_explained_variance_within_0_005_of_fp32():
    """Mixed precision must not cost quality: same data, seed and schedule, fp32 vs bf16 matmuls."""
    data = make_superposition(n_features=128, d=32, true_l0=3.0, seed=1)
    x = data.sample(8192, torch.Generator().manual_seed(9))  # held-out evaluation rows

    def ev(precision):
        cfg = TrainConfig(batch_size=256, lr=3e-3, l1=1.0, precision=precision, device="cpu")
        sae = train_on_batches(
            small_sae_cfg("l1", d_in=32, d_sae=256), cfg, data.batches(256, 65536), 200_000, progress=False
        )
        with torch.no_grad():
            return float(1 - ((sae(x).x_hat - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())

    fp32, bf16 = ev("float32"), ev("bfloat16")
    assert fp32 > 0.5
    assert abs(bf16 - fp32) <= 0.005, (fp32, bf16)


# ---- no host synchronisation per step -------------------------------------------------------


class HostWaits(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the ops that, on a GPU, make the host wait for the device: reading a value
    (.item(), bool(t)), an output whose shape depends on the data (nonzero, boolean masks,
    unique), and coalescing a sparse tensor (a sort whose length is read back). The CPU runs
    the same ops, so the count can be checked here."""

    aten = torch.ops.aten
    WAITS = {
        aten._local_scalar_dense,
        aten.nonzero,
        aten.masked_select,
        aten._unique2,
        aten.unique_dim,
        aten.unique_consecutive,
        aten._coalesce,
        aten.repeat_interleave,
    }

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        bool_index = func.overloadpacket in (self.aten.index, self.aten.index_put, self.aten.index_put_) and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in leaves[1:]
        )
        uncoalesced = any(isinstance(a, torch.Tensor) and a.is_sparse and not a.is_coalesced() for a in leaves)
        if func.overloadpacket in self.WAITS or bool_index or uncoalesced:
            self.seen.append(str(func))
        return func(*args, **kwargs)


# l1/kl run dense, as on CUDA: their sparse path reads the number of active latents (CPU only)
@pytest.mark.parametrize(
    "penalty,extra",
    [("l1", dict(sparse=False)), ("kl", dict(sparse=False)), ("topk", dict(sparse=False)), ("topk", {})],
)
def test_a_training_step_never_waits_for_the_device(penalty, extra, monkeypatch):
    """The issue asks for no host synchronisation per step: metrics stay on the device until a log
    line. Count the waiting ops of runs of 3 and 9 steps (one log line each, at the end): any op
    that waits once per step makes the longer run's count larger. The sparse TopK path is run the
    way it runs on CUDA (fixed-shape AuxK selection), with latents dead from the first step."""
    from sae_lens_lite.training import latents

    monkeypatch.setattr(latents, "sync_free", lambda t: True)
    data = make_superposition(n_features=64, d=16, true_l0=2.0, seed=0)
    counts = []
    for steps in (3, 9):
        cfg = TrainConfig(
            penalty=penalty, k=4, batch_size=128, log_every=100, dead_window=128, precision="float32", **extra
        )
        with HostWaits() as mode:
            train_on_batches(
                small_sae_cfg(penalty, 16, 64), cfg, data.batches(128, 16 * 128, seed=1), steps * 128, progress=False
            )
        counts.append(mode.seen)
    assert len(counts[1]) == len(counts[0]), sorted(set(counts[1]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("penalty", ["l1", "topk"])
def test_on_cuda_a_training_step_never_synchronises(penalty, tmp_path, monkeypatch):
    """The same property asked of CUDA itself: in sync debug mode every synchronising call warns
    (backward included, which runs on another thread). Training from an on-disk cache through the
    side-stream prefetch, runs of 3 and 9 steps must warn equally often."""
    import warnings

    from sae_lens_lite.training import train as train_mod

    monkeypatch.setattr(train_mod, "RESIDENT_FRACTION", 0.0)  # stream from disk: the prefetch path
    write_cache(tmp_path / "acts")
    counts = []
    for steps in (3, 9):
        cfg = TrainConfig(
            acts=str(tmp_path / "acts"),
            out=str(tmp_path / f"sae{steps}"),
            penalty=penalty,
            k=4,
            expansion=4,
            batch_size=128,
            tokens=steps * 128,
            log_every=100,
            device="cuda",
        )
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                train(cfg)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        counts.append([str(w.message) for w in seen if "synchroniz" in str(w.message)])
    assert len(counts[1]) == len(counts[0]), counts[1]


def _rss() -> int:
    """This process's resident memory in bytes (Linux)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(runtime._glibc() is None, reason="glibc's malloc only")
def test_cpu_training_keeps_freed_memory_for_reuse_and_returns_it_at_the_end():
    """Inside keep_freed_memory a freed large tensor stays in the process (glibc would otherwise
    unmap it, and the next step fault its pages in again); leaving returns it to the system."""
    size = 256 * 2**20
    base = _rss()
    with runtime.keep_freed_memory(torch.device("cpu")):
        x = torch.ones(size // 4)
        del x
        kept = _rss() - base
    after = _rss() - base
    assert kept > 0.8 * size
    assert after < 0.2 * size
    x = torch.ones(size // 4)  # glibc's defaults again: freed at once
    del x
    assert _rss() - base < 0.2 * size


def test_target_l0_pauses_the_integral_while_a_lagging_l0_is_on_course():
    """For a recipe whose L0 lags λ (JumpReLU) the integral term pauses while L0's trend would close
    3x the gap before the run ends, so λ does not wind up while L0 catches up; it still climbs
    when L0 stalls, and recipes whose L0 follows λ quickly keep the plain integral."""
    lam, err, last = torch.tensor(1.0), torch.tensor(2.0), torch.tensor(2.02)  # L0 7.4x the target, falling 2% a step
    falling = torch.tensor(-0.02)
    damp_only = math.exp(train_mod.L0_DAMP * -0.02)
    on_course, _ = train_mod.steer_lambda(lam, err, last, falling, lags=True, steps_left=1000)  # closes 20 >= 3 x 2
    assert float(on_course) == pytest.approx(damp_only)
    too_slow, _ = train_mod.steer_lambda(lam, err, last, falling, lags=True, steps_left=200)  # closes 4 < 6
    assert float(too_slow) == pytest.approx(damp_only * math.exp(train_mod.L0_GAIN * 2.0))
    stalled, trend = train_mod.steer_lambda(lam, err, err, torch.tensor(0.0), lags=True, steps_left=1000)
    assert float(stalled) > 1.0 and float(trend) == 0.0
    plain, trend = train_mod.steer_lambda(lam, err, last, None, lags=False, steps_left=1000)
    assert float(plain) == pytest.approx(damp_only * math.exp(train_mod.L0_GAIN * 2.0)) and trend is None


def test_an_interrupted_train_says_how_to_resume_on_a_line_of_its_own(tmp_path, monkeypatch, capsys):
    """Ctrl-C mid-training: the CLI's "interrupted; run the same command again to resume" must not
    be glued to the end of the progress bar's line (where a terminal user does not see it)."""
    from sae_lens_lite.cli import main

    acts = write_cache(tmp_path / "acts")
    calls = [0]
    real = train_mod.total_loss

    def ctrl_c_at_step_3(*a, **k):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(train_mod, "total_loss", ctrl_c_at_step_3)
    args = ["train", "--acts", str(acts), "--out", str(tmp_path / "sae"), "--expansion", "2", "--tokens", "20000"]
    assert main([*args, "--batch-size", "512", "--log-every", "1", "--device", "cpu"]) == 130
    err = capsys.readouterr().err
    lines = err.replace("\r", "\n").splitlines()
    said = "sae-lite train: interrupted; run the same command again to resume"
    assert said in lines and lines[-1] == said  # a line of its own, and the bar is not redrawn after it
    assert (tmp_path / "sae" / "checkpoint.json").exists()


def test_resuming_with_other_settings_names_each_old_and_new_value(tmp_path):
    data = make_superposition(n_features=64, d=16, true_l0=2.0, seed=0)
    factory = data.batches(256, 16 * 256, seed=1)
    cfg = TrainConfig(penalty="l1", batch_size=256, checkpoint_every=5 * 256, precision="float32")
    sae_cfg = small_sae_cfg("l1", d_in=16, d_sae=64, k=3)
    with pytest.raises(Interrupted):
        train_on_batches(sae_cfg, cfg, interrupting(factory, 16 + 7), 30 * 256, out=tmp_path, progress=False)
    with pytest.raises(UserError, match=rf"different settings \(l1 \(was {cfg.l1}, now 2.0\)\); use the same flags"):
        train_on_batches(sae_cfg, replace(cfg, l1=2.0), factory, 30 * 256, out=tmp_path, progress=False)


def test_batches_of_another_size_than_batch_size_are_named_not_trained_on():
    cfg = TrainConfig(penalty="l1", expansion=1, batch_size=256)  # a user who left batch_size alone but yields 64
    sae_cfg = SAEConfig(d_in=8, d_sae=16)

    def batches(epoch):
        g = torch.Generator().manual_seed(epoch)
        for _ in range(8):
            yield torch.randn(64, 8, generator=g)

    with pytest.raises(UserError, match=r"no batch of exactly 256 rows \(batch_size 256\)"):
        train_on_batches(sae_cfg, cfg, batches, 1024, progress=False)
