"""Scale-out with PyTorch's own distributed engine: torchrun and torch.distributed.

    torchrun --nproc-per-node 8 -m sae_lens_lite harvest --out runs/acts ...
    torchrun --nproc-per-node 8 -m sae_lens_lite train --acts runs/acts --out runs/sae ...

The process group itself (joining it, rank, world size, the generic collectives) is in
runtime.py; under a single process every helper here is the identity, so a single process runs
exactly the code it always ran.

Two ways to spread the work (docs/scaling.md: recipes, what is exact, memory arithmetic):

- Data-parallel training (here). The SAE is replicated and wrapped in DistributedDataParallel.
  Each rank reads its own shards of the cache (its rows of each batch when there are fewer shards
  than ranks) and contributes batch_size / N rows to every step; DDP
  averages the gradients, so a step is the single-process step on the union of the ranks' rows.
  Metrics, dead-latent counters and the adaptive λ are all-reduced, so every rank holds the same
  state, and rank 0 alone writes.
- Sharded harvest (cache.ShardedCacheWriter, used by harvest.py). Rank r runs the model on
  shards r, r+N, r+2N, ... and writes those files; after each round of N shards rank 0, which
  holds the cache's lock, enters them in the manifest in order. The result is the
  single-process cache, file for file.

The SAE itself is never split: every rank holds all of it (docs/scaling.md says why latent
sharding was removed and what it would take).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import replace
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from sae_lens_lite.data.cache import ActivationCache
from sae_lens_lite.errors import UserError
from sae_lens_lite.runtime import comm_device, rank, world_size
from sae_lens_lite.training.sae import SAE


def local_batch_size(batch_size: int) -> int:
    """Rows this rank contributes to a step of `batch_size` rows (the global batch)."""
    n = world_size()
    if batch_size % n:
        raise UserError(f"--batch-size {batch_size} does not split evenly over {n} processes; use a multiple of {n}")
    return batch_size // n


def rank_batches(
    cache: ActivationCache, batch_size: int, seed: int, device: torch.device, targets: bool = False
) -> Callable[[int], Iterator[Tensor]]:
    """`batches(epoch)` for train_on_batches: this rank's share of each epoch, in batches of
    batch_size / N rows. The shard order is shuffled with the epoch's seed (the same on every
    rank), and rank r takes shards r, r+N, r+2N, ... of it: ranks read disjoint shards, and a new
    split each epoch. Every rank stops after as many batches as the rank with the fewest rows can
    fill, so no rank waits on a collective that another, out of data, never joins. `targets`: a
    pair cache's rows [input | target] (a transcoder's)."""
    n, r = world_size(), rank()
    local = local_batch_size(batch_size)
    if cache.n_shards < n:
        # Too few shards to hand out (a small cache): every rank reads the epoch in the order a
        # single process reads it and keeps its own rows of each global batch, so the steps are
        # the single process's steps (partial batches dropped, as train_on_batches drops them).
        def split_rows(epoch: int) -> Iterator[Tensor]:
            for x in cache.iter_batches(batch_size, seed=seed + epoch, device=device, targets=targets):
                if len(x) == batch_size:
                    yield x[r * local : (r + 1) * local]

        return split_rows
    shards = cache.manifest["shards"]
    checked: set[int] = set()

    def batches(epoch: int) -> Iterator[Tensor]:
        order = torch.randperm(cache.n_shards, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        steps = min(sum(shards[i]["n_rows"] for i in order[q::n]) // local for q in range(n))
        mine = order[r::n]
        for i in mine:  # verify each shard once, as a single process does
            if cache.verify and i not in checked:
                cache.check_shard(i)
                checked.add(i)
        view = replace(
            cache, manifest={**cache.manifest, "shards": [shards[i] for i in mine]}, verify=False, _verified=set()
        )
        return itertools.islice(view.iter_batches(local, seed=seed + epoch, device=device, targets=targets), steps)

    return batches


@torch.no_grad()
def average_input_stats(sae: SAE) -> None:
    """Make train.init_from_data global: each rank measured E‖x‖, E‖y‖ (the target's: x's own
    for an SAE) and the target's mean on its own rows (equally many), so the average of the
    ranks' figures is the figure over all their rows. A transcoder's b_enc, which centres its
    input, is averaged too."""
    if world_size() == 1:
        return
    s, t = sae.input_scale, sae.target_scale
    stats = torch.cat(
        [(math.sqrt(sae.d_in) / s).reshape(1), (math.sqrt(sae.d_out) / t).reshape(1), sae.b_dec / t, sae.b_enc]
    ).to(comm_device())  # [2 + d_out + d_sae]: E‖x‖, E‖y‖, mean y, b_enc
    dist.all_reduce(stats)
    stats = stats.to(s.device) / world_size()
    sae.input_scale.fill_(math.sqrt(sae.d_in) / float(stats[0]))
    sae.target_scale.fill_(math.sqrt(sae.d_out) / float(stats[1]))
    sae.b_dec.copy_(stats[2 : 2 + sae.d_out] * sae.target_scale)
    sae.b_enc.copy_(stats[2 + sae.d_out :])


class _DDP(DistributedDataParallel):
    """DDP that lends the wrapped SAE's attributes (W_dec, input_scale, d_in, ...), so the loss
    code takes it wherever it takes an SAE; calling it runs DDP's forward, which arms the
    gradient all-reduce of the backward pass."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def data_parallel(sae: SAE, device: torch.device) -> nn.Module:
    """The SAE wrapped in DistributedDataParallel (the SAE itself in a single process)."""
    if world_size() == 1:
        return sae
    # input_scale is made equal on every rank by average_input_stats; no need to re-send it each step.
    return _DDP(sae, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)


def batch_mean(v: Tensor) -> Tensor:
    """Mean over the global batch of a per-rank batch mean v (equal rank batches), with gradient.
    For loss terms that are not means over tokens, like the KL penalty of the mean firing rate.

    The backward all-reduce sums the ranks' identical upstream gradients (N times g/N = g); DDP
    then averages the ranks' parameter gradients, which gives the gradient of the global term."""
    if world_size() == 1:
        return v
    import torch.distributed.nn.functional as dnn

    return dnn.all_reduce(v) / world_size()


@torch.no_grad()
def reduce_metrics(t: dict[str, Tensor], x: Tensor, scale: Tensor) -> dict[str, Tensor]:
    """The step's metric terms (loss.loss_terms) over the global batch, identical on every rank
    (one all-reduce): means of the ranks' means, sums of sums, `fired` if any rank saw the latent
    fire, and `sst` around the global mean (Chan et al. 1979: the ranks' own sums of squares plus
    the spread of the rank means). x [n, d_in]: this rank's rows; scale: the input scale."""
    if world_size() == 1:
        return t
    n, N = x.shape[0], world_size()
    means = sorted(k for k in t if k not in ("sse", "sst", "fired"))  # the loss terms and L0: per-rank means
    m = (x.double() * scale.double()).mean(0)  # [d_in] this rank's mean of the normalised rows
    vec = torch.cat(
        [
            torch.stack([t[k].detach().double() for k in means]) / N,
            torch.stack([t["sse"].double(), t["sst"].double(), n * m.pow(2).sum()]),
            n * m,
            t["fired"].double(),
        ]
    ).to(comm_device())
    dist.all_reduce(vec)
    vec = vec.to(x.device)
    k = len(means)
    out = dict(t)
    for i, key in enumerate(means):
        out[key] = vec[i].float()
    sse, within, between, nm = vec[k], vec[k + 1], vec[k + 2], vec[k + 3 : k + 3 + len(m)]
    out["sse"] = sse.float()
    out["sst"] = (within + between - nm.pow(2).sum() / (n * N)).float()
    out["fired"] = vec[k + 3 + len(m) :] > 0
    return out
