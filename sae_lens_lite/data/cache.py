"""The on-disk activation cache: safetensors shards, a manifest, and a shuffled reader.

A cache is a directory (format spec: docs/formats.md):

    manifest.json              provenance, sizes, one entry per shard (rows, sha256), `complete`
    shard_00000.safetensors    activations [n, d_model], tokens [n], doc [n], pos [n]
    ...                        (+ targets [n, d_target] in a pair cache: a transcoder's target)

Shards hold a fixed number of contexts, so an interrupted harvest resumes after the last shard
the manifest lists and produces byte-identical shards. A shard file is written to a temporary
name and renamed, and only then entered in the manifest (itself written atomically); a cache is
complete only once its manifest says so. Writers and readers of the format both live here,
including the writer of a harvest spread over torchrun ranks (ShardedCacheWriter: each rank
writes its own shards, rank 0 keeps the manifest).
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from sae_lens_lite.errors import UserError
from sae_lens_lite.fsutil import mode_from_umask, sha256_file, write_json_atomic
from sae_lens_lite.outputs import differences
from sae_lens_lite.runtime import DTYPES, barrier, broadcast_object, is_main, world_size

FORMAT = "sae_lens_lite.activations"
VERSION = 1
MANIFEST = "manifest.json"
# What a cache was made from. A writer refuses to resume into a cache whose provenance differs.
PROVENANCE_KEYS = (
    "model",
    "weights_hash",
    "hook",
    "target_hook",  # a pair cache's second hook (a transcoder's target), read in the same pass; else None
    "corpus",
    "tokenizer",
    "dtype",
    "context_length",
    "contexts_per_shard",
    "filters",
    "max_contexts",
)
# The manifest's names where they are not the harvest flag's: a refusal names what the user typed.
FLAG_OF = {"corpus": "dataset", "max_contexts": "contexts, from --tokens"}


def shard_name(i: int) -> str:
    return f"shard_{i:05d}.safetensors"


class _ManifestState:
    """What a cache's manifest says: whether the cache is complete, and how many shards it lists
    (for ShardedCacheWriter: as opened, i.e. where this harvest resumes)."""

    manifest: dict

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    @property
    def n_shards(self) -> int:
        return len(self.manifest["shards"])


def check_cache_dir(path: Path, overwrite: bool) -> None:
    """Refuse, before anything is written, a cache path that is a file, or a directory that holds
    files but no cache (the user's own work) unless overwrite."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} exists and is not a directory: choose another --out")
    if (
        not overwrite
        and path.is_dir()
        and read_manifest(path) is None
        and any(p.name != ".lock" for p in path.iterdir())
    ):
        raise UserError(f"{path} is not empty and is not an activation cache: choose another --out or pass --overwrite")


class CacheWriter(_ManifestState):
    """Appends shards to a cache directory and keeps the manifest in step.

    Holds an exclusive lock on the directory while open, so two harvests cannot interleave."""

    def __init__(
        self, path: str | os.PathLike, provenance: dict, d_model: int, overwrite: bool = False, d_target: int = 0
    ):
        self.path = Path(path)
        check_cache_dir(self.path, overwrite)  # before the lock file lands there: a refused directory stays as it was
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.path / ".lock", "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                f"{self.path} is being written by another process; wait for it or choose another --out"
            ) from None
        self.provenance = {k: provenance.get(k) for k in PROVENANCE_KEYS}
        old = read_manifest(self.path)
        now = json.loads(json.dumps(self.provenance))
        if old is not None and _provenance(old) != now:
            if not overwrite:
                diff = differences({k: old.get(k) for k in PROVENANCE_KEYS}, now, FLAG_OF)
                finish = "" if old.get("complete") else "; to finish it instead, run the harvest it was started with"
                raise UserError(
                    f"{self.path} holds a cache made differently (differs in: {'; '.join(diff)}); "
                    f"choose another --out or pass --overwrite{finish}"
                )
            old = None
        if old is None:
            for p in self.path.iterdir():
                if p.name != ".lock" and p.is_file():
                    p.unlink()
        self.manifest = old or {
            "format": FORMAT,
            "version": VERSION,
            "complete": False,
            **self.provenance,
            "d_model": d_model,
            **({"d_target": d_target} if d_target else {}),
            "n_tokens": 0,
            "n_contexts": 0,
            "shards": [],
        }
        # Anything not in the manifest is debris from an interrupted write.
        listed = {s["file"] for s in self.manifest["shards"]}
        for p in self.path.glob("shard_*"):
            if p.name not in listed:
                p.unlink()
        if old is None:
            write_json_atomic(self.path / MANIFEST, self.manifest)

    def add_shard(
        self,
        acts: Tensor,
        tokens: Tensor,
        doc: Tensor,
        pos: Tensor,
        n_contexts: int,
        index: int | None = None,
        nonfinite_rows: int = 0,
        targets: Tensor | None = None,
    ) -> None:
        """acts [n, d_model]; tokens, doc, pos [n]; n_contexts: how many contexts it covers;
        index: the shard's number if the caller tracks it (it must be the next one); targets
        [n, d_target]: a pair cache's second hook on the same rows."""
        assert index in (None, self.n_shards), f"shard {index} written out of order"
        self.append(
            write_shard(
                self.path,
                self.n_shards,
                self.manifest["dtype"],
                acts,
                tokens,
                doc,
                pos,
                n_contexts,
                nonfinite_rows,
                targets,
            )
        )

    def append(self, entry: dict) -> None:
        """Enter a shard file already written (by `write_shard`) as the next shard of the manifest."""
        assert entry["file"] == shard_name(self.n_shards), "shards must be entered in order"
        m = self.manifest
        m["shards"].append(entry)
        m["n_tokens"] += entry["n_rows"]
        m["n_contexts"] += entry["n_contexts"]
        write_json_atomic(self.path / MANIFEST, m)

    def drop_damaged(self) -> int | None:
        """Check every listed shard; from the first one missing or corrupt on, forget the shards, so
        that the harvest writes them again (shard contents depend only on their contexts, so the
        repaired cache equals an undamaged one). Returns that shard's index, or None if all are intact."""
        bad = first_damaged(self.path, self.manifest)
        if bad is None:
            return None
        m = self.manifest
        for s in m["shards"][bad:]:
            (self.path / s["file"]).unlink(missing_ok=True)
        m["shards"] = m["shards"][:bad]
        m.update(
            complete=False,
            n_tokens=sum(s["n_rows"] for s in m["shards"]),
            n_contexts=sum(s["n_contexts"] for s in m["shards"]),
        )
        write_json_atomic(self.path / MANIFEST, m)
        return bad

    def finish(self, **extra) -> dict:
        # Summed from the shards, so rows skipped before an interruption still count.
        nonfinite = sum(s.get("nonfinite_rows", 0) for s in self.manifest["shards"])
        self.manifest.update(extra, nonfinite_rows=nonfinite, complete=True)
        write_json_atomic(self.path / MANIFEST, self.manifest)
        self.close()
        return self.manifest

    def close(self) -> None:
        if not self._lock.closed:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()


def write_shard(
    path: Path,
    index: int,
    dtype: str,
    acts: Tensor,
    tokens: Tensor,
    doc: Tensor,
    pos: Tensor,
    n_contexts: int,
    nonfinite_rows: int = 0,
    targets: Tensor | None = None,
) -> dict:
    """Write shard `index` of the cache at `path` (temporary name, fsync, rename) and return its
    manifest entry. Separate from CacheWriter so that ranks of a sharded harvest can each write
    their own shards while one process keeps the manifest (ShardedCacheWriter)."""
    name = shard_name(index)
    tmp = path / (name + ".tmp")
    tensors = {
        "activations": acts.to(DTYPES[dtype]).contiguous().cpu(),
        "tokens": tokens.to(torch.int32).contiguous().cpu(),
        "doc": doc.to(torch.int32).contiguous().cpu(),
        "pos": pos.to(torch.int32).contiguous().cpu(),
    }
    if targets is not None:
        tensors["targets"] = targets.to(DTYPES[dtype]).contiguous().cpu()
    try:
        save_file(tensors, str(tmp))
        mode_from_umask(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(
            f"could not write {tmp}: {e.strerror}; free some space and run the same command to resume"
        ) from None
    os.replace(tmp, path / name)
    return {
        "file": name,
        "n_rows": int(acts.shape[0]),
        "n_contexts": n_contexts,
        "nonfinite_rows": nonfinite_rows,
        "sha256": sha256_file(path / name),
    }


class ShardedCacheWriter(_ManifestState):
    """The CacheWriter of a harvest spread over ranks. Rank 0 opens the real CacheWriter: its
    lock refuses a second harvest into the directory and its manifest is the resume point. Every
    rank writes the files of its own shards (`add_shard` with the shard's index); `sync()`, which
    all ranks call after each round of N shards, hands the round's entries to rank 0, which
    enters them in shard order. So the manifest only ever lists a complete prefix of shards, and
    a crash loses at most the round in flight."""

    def __init__(
        self, path: str | os.PathLike, provenance: dict, d_model: int, overwrite: bool = False, d_target: int = 0
    ):
        self.path = Path(path)
        self.writer: CacheWriter | None = None
        err = None
        if is_main():
            try:
                self.writer = CacheWriter(path, provenance, d_model, overwrite, d_target)
            except UserError as e:
                err = str(e)
        err, opened = broadcast_object((err, self.writer.manifest if self.writer else None))
        if err is not None:
            raise UserError(err)
        self.manifest = opened  # as it was when opened, the same on every rank
        self.pending: list[dict] = []

    def add_shard(
        self,
        acts: Tensor,
        tokens: Tensor,
        doc: Tensor,
        pos: Tensor,
        n_contexts: int,
        index: int,
        nonfinite_rows: int = 0,
        targets: Tensor | None = None,
    ) -> None:
        self.pending.append(
            write_shard(
                self.path, index, self.manifest["dtype"], acts, tokens, doc, pos, n_contexts, nonfinite_rows, targets
            )
        )

    def sync(self) -> None:
        entries: list[list[dict]] = [[] for _ in range(world_size())]
        dist.all_gather_object(entries, self.pending)
        self.pending = []
        if self.writer is not None:
            for e in sorted(itertools.chain(*entries), key=lambda e: e["file"]):
                self.writer.append(e)

    def finish(self, **extra) -> None:
        if self.writer is not None:
            self.writer.finish(**extra)
        barrier()  # no rank moves on (to training, say) before the cache is complete

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def first_damaged(path: Path, manifest: dict) -> int | None:
    """Index of the first shard of the manifest whose file is missing or whose sha256 differs."""
    for i, s in enumerate(manifest["shards"]):
        f = Path(path) / s["file"]
        if not f.is_file() or sha256_file(f) != s["sha256"]:
            return i
    return None


def read_manifest(path: Path) -> dict | None:
    f = path / MANIFEST
    if not f.exists():
        return None
    try:
        m = json.loads(f.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{f} is not valid JSON; the cache is damaged, harvest it again with --overwrite") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise UserError(f"{f} is not an sae_lens_lite activation manifest")
    missing = {"complete", "shards", "d_model", "n_tokens", "dtype"} - set(m)
    if missing or not all(isinstance(e, dict) and {"file", "n_rows", "sha256"} <= set(e) for e in m["shards"]):
        raise UserError(
            f"{f} is damaged (missing or wrong {', '.join(sorted(missing)) or 'shard entries'}); harvest "
            "the cache again with --overwrite"
        )
    return m


def per_hook_caches(path: Path) -> list[str]:
    """The subdirectories of `path` that hold a cache: a harvest of several hooks writes one per hook."""
    return sorted(d.name for d in Path(path).iterdir() if (d / MANIFEST).is_file()) if Path(path).is_dir() else []


def _provenance(m: dict) -> dict:
    return {k: m.get(k) for k in PROVENANCE_KEYS}


@dataclass
class ActivationCache(_ManifestState):
    """Read side of the format. `verify` checks each shard's sha256 the first time it is read."""

    path: Path
    manifest: dict
    verify: bool = True
    _verified: set = field(default_factory=set, repr=False)

    @classmethod
    def open(cls, path: str | os.PathLike, verify: bool = True) -> "ActivationCache":
        path = Path(path)
        if not path.is_dir():
            raise UserError(f"activation cache {path} not found; create it with `sae-lite harvest --out {path}`")
        m = read_manifest(path)
        if m is None:
            hooks = per_hook_caches(path)
            if hooks:  # a harvest of several hooks writes one cache per hook, each in its own subdirectory
                raise UserError(
                    f"{path} holds one cache per hook: {', '.join(hooks)}; pass one of them, e.g. {path / hooks[0]}"
                )
            raise UserError(
                f"{path} has no {MANIFEST}; it is not an activation cache: pass a directory written by `sae-lite "
                f"harvest` (`sae-lite info {path}` says what this one holds)"
            )
        if not m["complete"]:
            raise UserError(
                f"the cache {path} is incomplete (interrupted harvest); run the same harvest command again to finish it"
            )
        return cls(path, m, verify)

    @property
    def d_model(self) -> int:
        return int(self.manifest["d_model"])

    @property
    def n_tokens(self) -> int:
        return int(self.manifest["n_tokens"])

    @property
    def d_target(self) -> int:
        """Width of a pair cache's targets (the second hook); 0 for a cache of one hook."""
        return int(self.manifest.get("d_target") or 0)

    def row_keys(self, targets: bool) -> tuple[str, ...]:
        """The tensors a batch is made of: the activations, then (targets=True) the pair cache's
        targets, side by side in one row [d_model + d_target] (Transcoder.split takes them apart)."""
        if targets and not self.d_target:
            raise UserError(
                f"{self.path} holds one hook ({self.manifest.get('hook')}), not input/target pairs; harvest "
                "pairs for a transcoder with `sae-lite harvest --mlp-pairs LAYERS`"
            )
        return ("activations", "targets") if targets else ("activations",)

    def _rows(self, i: int, keys: tuple[str, ...], dtype: torch.dtype) -> Tensor:
        """Shard i's rows of `keys` side by side [n, Σ widths] in dtype."""
        got = self.read_shard(i, keys)
        return torch.cat([got[k].to(dtype) for k in keys], 1) if len(keys) > 1 else got[keys[0]].to(dtype)

    def check_shard(self, i: int, all_on_failure: bool = False) -> None:
        """Raise a UserError if shard i is missing or its sha256 differs from the manifest. With
        all_on_failure (`sae-lite cache verify`), a failure checks the shards not yet checked too and
        the error names every damaged one; training stops at the first (hashing the rest of a large
        cache first would keep the user waiting, and the repair, a re-harvest, checks them all)."""
        bad = {i: self._damage(i)}
        if bad[i] is None:
            self._verified.add(i)
            return
        n = self.n_shards
        for j in range(n if all_on_failure else 0):
            if j != i and j not in self._verified:
                if why := self._damage(j):
                    bad[j] = why
                else:
                    self._verified.add(j)
        if len(bad) == 1:
            f = self.path / self.manifest["shards"][i]["file"]
            why = "missing" if bad[i] == "missing" else "corrupt (sha256 differs from the manifest)"
            raise UserError(f"shard {f} is {why}; run the same harvest command again, which redoes it")
        named = [f"{self.manifest['shards'][j]['file']} is {why}" for j, why in sorted(bad.items())]
        more = f", and {len(named) - 10} more" if len(named) > 10 else ""
        raise UserError(
            f"{len(bad)} of {n} shards of {self.path} fail their sha256 check: {', '.join(named[:10])}{more}; "
            "run the same harvest command again, which redoes them"
        )

    def _damage(self, i: int) -> str | None:
        """'missing' or 'corrupt' if shard i's file is absent or its sha256 differs from the manifest."""
        entry = self.manifest["shards"][i]
        f = self.path / entry["file"]
        if not f.is_file():
            return "missing"
        return "corrupt" if sha256_file(f) != entry["sha256"] else None

    def read_shard(self, i: int, keys: tuple[str, ...] = ("activations", "tokens", "doc", "pos")) -> dict[str, Tensor]:
        if self.verify and i not in self._verified:
            self.check_shard(i)
            self._verified.add(i)
        f = self.path / self.manifest["shards"][i]["file"]
        try:
            with safe_open(str(f), framework="pt") as st:
                return {k: st.get_tensor(k) for k in keys}
        except Exception as e:  # safetensors raises its own error types for damaged headers
            raise UserError(f"cannot read shard {f}: {e}") from None

    def load(
        self, keys: tuple[str, ...] = ("activations", "tokens", "doc", "pos"), dtype: torch.dtype | None = None
    ) -> dict[str, Tensor]:
        """The whole cache concatenated in order (use only when it fits in memory)."""
        parts = [self.read_shard(i, keys) for i in range(self.n_shards)]
        out = {k: torch.cat([p[k] for p in parts]) for k in keys}
        if dtype is not None and "activations" in out:
            out["activations"] = out["activations"].to(dtype)
        return out

    def iter_batches(
        self,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        shards_in_memory: int = 8,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        targets: bool = False,
    ) -> Iterator[Tensor]:
        """One pass over the cache in batches [batch_size, d_model] (the last may be smaller);
        with `targets`, a pair cache's rows [batch_size, d_model + d_target] (row_keys).

        Shuffling is two-level and deterministic for a seed: a random shard order, then rows
        permuted within a window of `shards_in_memory` shards. RAM stays bounded by the window
        whatever the cache size. On CUDA, batches are copied in the stored dtype, one ahead on a
        side stream (prefetch_to_cuda), and converted on the GPU."""
        device = torch.device(device)
        if device.type == "cuda":  # copy in the stored dtype on a side stream, convert on the GPU
            host = self.iter_batches(
                batch_size, seed, shuffle, shards_in_memory, DTYPES[self.manifest["dtype"]], "cpu", targets
            )
            yield from (x.to(dtype) for x in prefetch_to_cuda(host, device))
            return
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(self.n_shards, generator=g).tolist() if shuffle else list(range(self.n_shards))
        keys = self.row_keys(targets)
        carry = torch.empty(0, self.d_model + (self.d_target if targets else 0), dtype=dtype)
        for w in range(0, len(order), shards_in_memory):
            window = [self._rows(i, keys, dtype) for i in order[w : w + shards_in_memory]]
            rows = torch.cat([carry, *window])
            if shuffle:
                rows = rows[torch.randperm(len(rows), generator=g)]
            n_full = len(rows) // batch_size * batch_size
            last_window = w + shards_in_memory >= len(order)
            end = len(rows) if last_window else n_full
            for b in range(0, end, batch_size):
                yield rows[b : b + batch_size].to(device)
            carry = rows[n_full:] if not last_window else carry[:0]

    def resident_batches(
        self, batch_size: int, device: str | torch.device, dtype: torch.dtype = torch.float32, targets: bool = False
    ):
        """`batches(epoch, seed)` over the whole cache held on `device` (in its stored dtype):
        each epoch is a full random permutation of every row, with no disk reads. For caches
        that fit in GPU memory, where it removes the loader from the training loop entirely."""
        keys, stored = self.row_keys(targets), DTYPES[self.manifest["dtype"]]
        acts = torch.cat([self._rows(i, keys, stored) for i in range(self.n_shards)]).to(
            device
        )  # [n, d_model (+ d_target)]

        def batches(epoch: int, seed: int) -> Iterator[Tensor]:
            g = torch.Generator(device=acts.device).manual_seed(seed + epoch)
            perm = torch.randperm(len(acts), generator=g, device=acts.device)
            for i in range(0, len(perm), batch_size):
                yield acts[perm[i : i + batch_size]].to(dtype)

        return batches

    def nbytes(self) -> int:
        return self.n_tokens * (self.d_model + self.d_target) * DTYPES[self.manifest["dtype"]].itemsize


def prefetch_to_cuda(batches: Iterator[Tensor], device: torch.device) -> Iterator[Tensor]:
    """CPU batches moved to a CUDA device, each copied on a side stream one batch ahead, so the
    copy runs while the previous batch trains instead of queueing in front of the next step."""
    stream = torch.cuda.Stream(device)
    ahead = None  # (batch on the GPU, event recorded after its copy)
    for b in batches:
        with torch.cuda.stream(stream):
            x = b.pin_memory().to(device, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(stream)
        if ahead is not None:
            yield _when_copied(*ahead)
        ahead = (x, copied)
    if ahead is not None:
        yield _when_copied(*ahead)


def _when_copied(x: Tensor, copied) -> Tensor:
    current = torch.cuda.current_stream(x.device)
    current.wait_event(copied)  # the step waits for this batch's copy only
    x.record_stream(current)  # and the allocator keeps x's memory until that step is done with it
    return x
