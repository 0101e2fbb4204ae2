"""Scale-out on the CPU: 2 processes on the gloo backend, started as torchrun starts them (the
environment variables), by torch.multiprocessing, and once by torchrun itself."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import CORPUS_TEXT, HOOK, tiny_model, tiny_tokenizer
from conftest import harvest_config as shared_config

from sae_lens_lite import runtime
from sae_lens_lite.data.cache import ActivationCache, CacheWriter
from sae_lens_lite.data.harvest import harvest
from sae_lens_lite.data.models import LoadedModel
from sae_lens_lite.errors import UserError
from sae_lens_lite.training import distributed, recipes
from sae_lens_lite.training.sae import SAE, SAEConfig
from sae_lens_lite.training.synthetic import make_superposition
from sae_lens_lite.training.train import TrainConfig, train, train_on_batches

WORLD = 2
D, N_ROWS, B = 16, 2048, 64


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, fn, args):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    runtime.init_from_env(torch.device("cpu"))
    try:
        fn(*args)
    finally:
        runtime._leave()  # barrier, then destroy: a rank leaving alone can abort its peer
    # Exit without the interpreter's teardown: gloo's threads have aborted a worker there, after
    # its work was done ("terminate called without an active exception", 1 clean-clone run in 4).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(fn, *args):
    """Run fn(*args) in WORLD processes joined in a gloo group; a failure in any is raised here."""
    mp.spawn(_worker, args=(_free_port(), fn, args), nprocs=WORLD)


def test_a_single_process_initialises_nothing(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert runtime.init_from_env(torch.device("cpu")) == torch.device("cpu")
    assert not dist.is_initialized() and runtime.world_size() == 1 and runtime.is_main()
    x = torch.randn(4, 3)
    assert runtime.gather_rows(x) is x and distributed.batch_mean(x) is x


# ---- data-parallel training -----------------------------------------------------------------


def synthetic_rows(n=N_ROWS, seed=0):
    return make_superposition(n_features=48, d=D, true_l0=2.0, seed=seed).sample(n, torch.Generator().manual_seed(seed))


def global_batches(acts, epoch):
    perm = torch.randperm(len(acts), generator=torch.Generator().manual_seed(epoch))
    for b in range(0, len(acts) - B + 1, B):
        yield acts[perm[b : b + B]]


CASES = {  # each exercises the state that must stay equal across ranks
    "l1": dict(penalty="l1", target_l0=3.0, resample_dead=True, dead_window=640),  # λ adaptation, resampling
    "kl": dict(penalty="kl"),  # a penalty of the batch's mean firing rate
    "topk": dict(penalty="topk", k=4, dead_window=640),  # AuxK on dead latents
    "batchtopk": dict(penalty="batchtopk", k=4, dead_window=640),  # the batch's top k·n over every rank, θ's estimate
    "jumprelu": dict(penalty="jumprelu", target_l0=3.0),  # learned thresholds, λ adaptation
    "matryoshka": dict(penalty="matryoshka", k=4, dead_window=640),  # nested prefixes
}


def case_config(name, out):
    return TrainConfig(
        out=str(out),
        expansion=4,
        batch_size=B,
        tokens=B * 60,
        log_every=10,
        device="cpu",
        precision="float32",
        **CASES[name],
    )


def _ddp_train(tmp):
    r = runtime.rank()
    acts = synthetic_rows()
    for name in CASES:
        cfg = case_config(name, tmp / f"ddp_{name}")
        # Rank r's share of each global batch: rows [r·B/N, (r+1)·B/N).
        mine = lambda e: (x[r * B // WORLD : (r + 1) * B // WORLD] for x in global_batches(acts, e))  # noqa: E731
        sae = train_on_batches(
            SAEConfig(D, 4 * D, **recipes.get(name, cfg).sae_options()),
            cfg,
            mine,
            cfg.tokens,
            out=tmp / f"ddp_{name}",
            progress=False,
        )
        torch.save(sae.state_dict(), tmp / f"{name}_rank{r}.pt")


def test_ddp_training_matches_a_single_process_on_the_same_global_batches(tmp_path):
    spawn(_ddp_train, tmp_path)
    acts = synthetic_rows()
    for name in CASES:
        cfg = case_config(name, tmp_path / f"single_{name}")
        single = train_on_batches(
            SAEConfig(D, 4 * D, **recipes.get(name, cfg).sae_options()),
            cfg,
            lambda e: global_batches(acts, e),
            cfg.tokens,
            out=tmp_path / f"single_{name}",
            progress=False,
        )
        ranks = [torch.load(tmp_path / f"{name}_rank{r}.pt", weights_only=True) for r in range(WORLD)]
        for k, v in ranks[0].items():
            assert torch.equal(v, ranks[1][k]), f"{name}: ranks disagree on {k}"  # DDP keeps replicas identical
            # Matryoshka sums five reconstruction terms per step, in another order on each split;
            # Adam's normalised steps carry that rounding into the small b_enc (measured: 3e-5).
            atol = 1e-4 if name == "matryoshka" else 1e-5
            torch.testing.assert_close(
                v, single.state_dict()[k], rtol=1e-4, atol=atol, msg=f"{name}: {k} differs from one process"
            )
        saved = SAE.load(tmp_path / f"ddp_{name}")  # rank 0 wrote the SAE
        assert torch.equal(saved.W_dec, ranks[0]["W_dec"])
        lines = [json.loads(ln) for ln in (tmp_path / f"ddp_{name}" / "metrics.jsonl").read_text().splitlines()]
        ref = [json.loads(ln) for ln in (tmp_path / f"single_{name}" / "metrics.jsonl").read_text().splitlines()]
        assert len(lines) == len(ref) == 6  # written once, by rank 0
        for a, b in zip(lines, ref):
            for k in ("mse", "explained_variance", "l0", "dead_frac") + (("lam",) if "lam" in b else ()):
                assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), f"{name}: {k} at step {a['step']}"


def write_cache(path, n=4096, per_shard=512):
    acts = synthetic_rows(n, seed=1) + 1e-3 * torch.randn(
        n, D, generator=torch.Generator().manual_seed(1)
    )  # noise: no two rows alike
    w = CacheWriter(
        path, {"model": "toy", "hook": "blocks.0.hook_resid_post", "dtype": "float32", "context_length": 32}, D
    )
    for i in range(0, n, per_shard):
        rows = torch.arange(i, i + per_shard)
        w.add_shard(acts[i : i + per_shard], rows % 100, rows // 32, rows % 32, n_contexts=per_shard // 32)
    w.finish()
    return path


def _rank_reads(cache_dir, tmp):
    cache = ActivationCache.open(cache_dir)
    batches = distributed.rank_batches(cache, 256, seed=0, device=torch.device("cpu"))
    for epoch in (0, 1):
        rows = torch.cat(list(batches(epoch)))  # [steps · 128, D]
        assert rows.shape == (4096 // WORLD // 128 * 128, D)
        torch.save(rows, tmp / f"reads_e{epoch}_r{runtime.rank()}.pt")
    with pytest.raises(UserError, match="does not split evenly"):
        distributed.rank_batches(cache, 255, seed=0, device=torch.device("cpu"))


def test_each_rank_reads_its_own_shards_and_the_split_changes_each_epoch(tmp_path):
    cache_dir = write_cache(tmp_path / "acts")
    spawn(_rank_reads, cache_dir, tmp_path)
    cache = ActivationCache.open(cache_dir)
    shard_of = {}
    for i in range(cache.n_shards):
        for row in cache.read_shard(i, ("activations",))["activations"]:
            shard_of[row.numpy().tobytes()] = i
    splits = []
    for epoch in (0, 1):
        shards = []
        for r in range(WORLD):
            keys = [
                row.numpy().tobytes() for row in torch.load(tmp_path / f"reads_e{epoch}_r{r}.pt", weights_only=True)
            ]
            assert len(set(keys)) == len(keys)  # no row twice
            shards.append({shard_of[k] for k in keys})
        assert not shards[0] & shards[1] and len(shards[0] | shards[1]) == cache.n_shards  # disjoint, all read
        splits.append(shards[0])
    assert splits[0] != splits[1]


def _train_one_shard(cache_dir, tmp):
    train(one_shard_config(cache_dir, tmp / "ddp"))


def one_shard_config(cache_dir, out):
    return TrainConfig(
        acts=str(cache_dir),
        out=str(out),
        expansion=4,
        batch_size=256,
        tokens=2048 * 6,
        log_every=8,
        device="cpu",
        precision="float32",
        lr=3e-3,
        l1=1.0,
    )


def test_more_processes_than_shards_split_the_rows_and_train_as_one_process(tmp_path):
    cache_dir = write_cache(
        tmp_path / "acts", n=2048 + 100, per_shard=2048 + 100
    )  # one shard; 100 rows past the last full batch
    cache = ActivationCache.open(cache_dir)
    assert cache.n_shards == 1 < WORLD
    spawn(_train_one_shard, cache_dir, tmp_path)
    ddp = SAE.load(tmp_path / "ddp")
    # One process on the same global batches (train_on_batches, as `train` calls it, full batches only).
    cfg = one_shard_config(cache_dir, tmp_path / "one")
    m = cache.manifest
    sae_cfg = SAEConfig(D, 4 * D, model=m["model"], hook=m["hook"], context_length=m["context_length"])
    full = lambda e: (x for x in cache.iter_batches(256, seed=e) if len(x) == 256)  # noqa: E731
    single = train_on_batches(sae_cfg, cfg, full, cfg.tokens, out=tmp_path / "one", progress=False)
    for k, v in single.state_dict().items():
        torch.testing.assert_close(ddp.state_dict()[k], v, rtol=1e-4, atol=1e-5, msg=f"{k} differs from one process")
    assert ddp.cfg.meta["final_metrics"]["explained_variance"] > 0.5  # it learned (rows were not lost or repeated)
    lines = (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len((tmp_path / "one" / "metrics.jsonl").read_text().splitlines()) == 6


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun test written for Linux")
def test_torchrun_cli_trains_like_a_single_process(tmp_path):
    acts = write_cache(tmp_path / "acts")
    flags = [
        "--acts",
        str(acts),
        "--expansion",
        "4",
        "--tokens",
        str(4096 * 12),
        "--batch-size",
        "256",
        "--device",
        "cpu",
        "--log-every",
        "8",
        "--l1",
        "1",
        "--lr",
        "3e-3",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(WORLD),
        "-m",
        "sae_lens_lite",
        "train",
        *flags,
        "--out",
        str(tmp_path / "ddp"),
    ]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    single = train(
        TrainConfig(
            acts=str(acts),
            expansion=4,
            tokens=4096 * 12,
            batch_size=256,
            device="cpu",
            log_every=8,
            l1=1.0,
            lr=3e-3,
            out=str(tmp_path / "one"),
        )
    )
    ddp = SAE.load(tmp_path / "ddp")
    m_ddp, m_one = ddp.cfg.meta["final_metrics"], single.cfg.meta["final_metrics"]
    # Different rows meet in each step (each rank reads its own shards), so not equal, but close:
    assert m_one["explained_variance"] > 0.8  # (it learned something worth comparing)
    assert m_ddp["explained_variance"] == pytest.approx(m_one["explained_variance"], abs=0.03)
    assert m_ddp["l0"] == pytest.approx(m_one["l0"], rel=0.15)
    assert ddp.cfg.meta["input_scale"] == pytest.approx(single.cfg.meta["input_scale"], rel=0.02)
    assert len((tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()) == 24  # one writer


# ---- sharded harvest ------------------------------------------------------------------------


def tiny_lm():
    return LoadedModel(tiny_model("llama"), tiny_tokenizer(), "tiny-llama", "memory", "0" * 16)


def harvest_config(corpus, out):
    # The corpus packs into 47 contexts of 32 tokens; at 10 per shard, 5 shards: rank 1 sits out the
    # last round, and the last shard is short.
    return shared_config(corpus, out, hooks=[HOOK, "blocks.0.hook_mlp_out"], contexts_per_shard=10, drop_first=1)


def _sharded_harvest(corpus, out, locked):
    torch.manual_seed(0)
    lm = tiny_lm()
    with pytest.raises(UserError, match="being written by another process"):  # the lock still holds, on every rank
        harvest(harvest_config(corpus, locked), lm=lm)
    harvest(harvest_config(corpus, out), lm=lm)


def test_sharded_harvest_equals_a_single_process_harvest(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS_TEXT)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' setting, so the model's sums are rounded alike
    try:
        single = harvest(harvest_config(corpus, tmp_path / "one"), lm=tiny_lm())
    finally:
        torch.set_num_threads(threads)
    holder = CacheWriter(tmp_path / "locked" / HOOK, {"model": "x"}, 32)  # another harvest, still running
    spawn(_sharded_harvest, corpus, tmp_path / "two", tmp_path / "locked")
    holder.close()
    sharded = harvest_config(corpus, tmp_path / "two")
    for hook, one in single.items():
        a = ActivationCache.open(one).manifest
        b = ActivationCache.open(tmp_path / "two" / hook).manifest
        assert len(a["shards"]) == 5 and a["shards"][-1]["n_contexts"] == 7
        assert a["shards"] == b["shards"]  # same files, rows and sha256s
        assert {k: v for k, v in a.items() if k != "harvest_config"} == {
            k: v for k, v in b.items() if k != "harvest_config"
        }
        assert b["harvest_config"]["out"] == sharded.out
