import pytest
import torch

from sae_lens_lite.data.cache import ActivationCache, CacheWriter
from sae_lens_lite.errors import UserError

PROV = {"model": "m", "hook": "h", "dtype": "float32", "context_length": 4, "contexts_per_shard": 5}


def make_cache(path, n_shards=4, rows=20, d=3):
    w = CacheWriter(path, PROV, d_model=d)
    for s in range(n_shards):
        ids = torch.arange(s * rows, (s + 1) * rows)
        acts = ids[:, None].float().repeat(1, d)  # row i holds the value i: easy to track
        w.add_shard(acts, ids, ids // 4, ids % 4, n_contexts=5)
    w.finish()
    return ActivationCache.open(path)


def test_shuffled_reader_visits_every_row_once_deterministically(tmp_path):
    c = make_cache(tmp_path / "c")

    def ids(seed, **kw):
        return torch.cat([b[:, 0] for b in c.iter_batches(7, seed=seed, **kw)]).long().tolist()

    a, b, other = ids(1, shards_in_memory=2), ids(1, shards_in_memory=2), ids(2, shards_in_memory=2)
    assert sorted(a) == list(range(80)) and a == b and a != other
    assert a != list(range(80))
    assert ids(0, shuffle=False) == list(range(80))
    sizes = [len(x) for x in c.iter_batches(7, seed=0, shards_in_memory=1)]
    assert sizes[:-1] == [7] * 11 and sizes[-1] == 3


def test_corrupt_or_truncated_shard_is_named(tmp_path):
    c = make_cache(tmp_path / "c")
    f = tmp_path / "c" / "shard_00002.safetensors"
    data = bytearray(f.read_bytes())
    data[-5] ^= 0x10
    f.write_bytes(bytes(data))
    c.check_shard(1)
    with pytest.raises(UserError, match="shard_00002.*corrupt"):
        c.check_shard(2)
    with pytest.raises(UserError, match="shard_00002"):
        list(ActivationCache.open(tmp_path / "c").iter_batches(8, shuffle=False))
    f.write_bytes(bytes(data[:100]))
    with pytest.raises(UserError, match="shard_00002"):
        ActivationCache.open(tmp_path / "c").load()


def test_incomplete_cache_and_second_writer_are_refused(tmp_path):
    w = CacheWriter(tmp_path / "c", PROV, d_model=3)
    w.add_shard(torch.zeros(4, 3), torch.zeros(4), torch.zeros(4), torch.zeros(4), n_contexts=1)
    with pytest.raises(UserError, match="another process"):
        CacheWriter(tmp_path / "c", PROV, d_model=3)
    with pytest.raises(UserError, match="incomplete"):
        ActivationCache.open(tmp_path / "c")
    w.close()
    # A stray temporary file from a killed write is removed on resume; listed shards stay.
    (tmp_path / "c" / "shard_00001.safetensors.tmp").write_bytes(b"junk")
    w2 = CacheWriter(tmp_path / "c", PROV, d_model=3)
    assert w2.n_shards == 1 and not (tmp_path / "c" / "shard_00001.safetensors.tmp").exists()
    w2.close()
    with pytest.raises(UserError, match="not found"):
        ActivationCache.open(tmp_path / "nothing")


def test_full_disk_leaves_no_shard_that_looks_complete(tmp_path, monkeypatch):
    import sae_lens_lite.data.cache as cache_mod

    w = CacheWriter(tmp_path / "c", PROV, d_model=3)

    def full(tensors, filename, **kw):
        open(filename, "wb").write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache_mod, "save_file", full)
    with pytest.raises(UserError, match="No space left.*resume"):
        w.add_shard(torch.zeros(4, 3), torch.zeros(4), torch.zeros(4), torch.zeros(4), n_contexts=1)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [".lock", "manifest.json"]
    assert w.n_shards == 0


def test_resident_batches_permute_every_row_each_epoch(tmp_path):
    c = make_cache(tmp_path / "c")
    batches = c.resident_batches(16, "cpu")
    e0 = torch.cat([b[:, 0] for b in batches(0, seed=3)]).long().tolist()
    assert sorted(e0) == list(range(80)) and e0 != list(range(80))
    assert e0 == torch.cat([b[:, 0] for b in batches(0, seed=3)]).long().tolist()
    assert e0 != torch.cat([b[:, 0] for b in batches(1, seed=3)]).long().tolist()
    assert c.nbytes() == 80 * 3 * 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_prefetch_yields_the_cpu_batches_in_order(tmp_path):
    c = make_cache(tmp_path / "c")
    cpu = list(c.iter_batches(7, seed=3, shards_in_memory=2))
    gpu = list(c.iter_batches(7, seed=3, shards_in_memory=2, device="cuda"))
    assert len(gpu) == len(cpu) and all(g.is_cuda and g.dtype == torch.float32 for g in gpu)
    for a, b in zip(cpu, gpu):
        assert torch.equal(a, b.cpu())


def test_every_damaged_shard_is_named_in_one_message(tmp_path, capsys):
    """`sae-lite cache verify` checks shard after shard: its first failure must name every bad one."""
    c = make_cache(tmp_path / "c", n_shards=6)
    for i in (1, 3):
        f = tmp_path / "c" / f"shard_{i:05d}.safetensors"
        data = bytearray(f.read_bytes())
        data[-5] ^= 0x10
        f.write_bytes(bytes(data))
    (tmp_path / "c" / "shard_00004.safetensors").unlink()
    c.check_shard(0)
    with pytest.raises(UserError, match=r"^shard \S+shard_00001\.safetensors is corrupt"):
        c.check_shard(1)  # training stops at the first bad shard, without hashing the rest
    with pytest.raises(UserError) as e:
        c.check_shard(1, all_on_failure=True)
    msg = str(e.value)
    assert msg.startswith("3 of 6 shards of ")
    named = ["shard_00001.safetensors is corrupt", "shard_00003.safetensors is corrupt"]
    assert ", ".join([*named, "shard_00004.safetensors is missing"]) in msg
    assert "run the same harvest command again" in msg and "\n" not in msg
    from sae_lens_lite.cli import main

    capsys.readouterr()
    assert main(["cache", "verify", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.rstrip("\n").split("\n")[-1]  # on a line of its own, not after the bar's "\r"
    assert err.startswith("sae-lite cache: error: 3 of 6 shards") and "shard_00004.safetensors is missing" in err


def test_a_directory_of_per_hook_caches_names_them(tmp_path):
    """harvest with several hooks writes one cache per hook in subdirectories of --out."""
    for h in ("blocks.4.hook_resid_post", "blocks.2.hook_resid_post"):
        make_cache(tmp_path / "multi" / h)
    with pytest.raises(
        UserError,
        match=r"multi holds one cache per hook: blocks\.2\.hook_resid_post, blocks\.4\.hook_resid_post; pass one",
    ):
        ActivationCache.open(tmp_path / "multi")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty has no manifest.json; it is not an activation cache"):
        ActivationCache.open(tmp_path / "empty")
    # e.g. an SAE directory given as --acts: say what to pass, and how to see what this one is
    with pytest.raises(UserError, match=r"written by `sae-lite harvest` \(`sae-lite info .*empty` says what"):
        ActivationCache.open(tmp_path / "empty")
