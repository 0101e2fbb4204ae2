"""Run the model over a corpus with hooks, stop at the layer, and write the activation cache.

Corpus → tokens → fixed-length contexts → forward (stopped after the deepest hook) → filter rows
→ shards. Several hooks are harvested in one pass, one cache per hook. With --mlp-pairs each cache
is a pair cache for a transcoder: the MLP's input (blocks.L.ln2.hook_normalized) as its
activations and the MLP's output (blocks.L.hook_mlp_out) of the same tokens as its targets, for
one layer or every layer in the same pass. Reading, packing and the
row filters are corpus.py's; the cache writers (the sharded one under torchrun too) are cache.py's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from sae_lens_lite import runtime
from sae_lens_lite.config import check_numbers, opt
from sae_lens_lite.data.cache import CacheWriter, ShardedCacheWriter, check_cache_dir, first_damaged, read_manifest
from sae_lens_lite.data.corpus import (
    DEFAULT_CORPUS,
    check_context_length,
    corpus_fingerprint,
    keep_mask,
    load_texts,
    position_filters,
    special_token_ids,
    tokenize_corpus,
)
from sae_lens_lite.data.models import LoadedModel, hook_point, load_model, run_to_hooks
from sae_lens_lite.errors import UserError
from sae_lens_lite.outputs import Output, StageRun, differences, plural, settings_of, warn
from sae_lens_lite.runtime import DTYPES, model_dtype, resolve_device


@dataclass
class HarvestConfig:
    model: str = opt("smollm2-135m", "hub id, local model directory, .gguf file, or smollm2-135m (offline default)")
    hooks: list[str] = opt(
        ["blocks.6.hook_resid_post"],
        "hook point(s), e.g. blocks.6.hook_resid_post; several give one cache each",
        flag="--hook",
    )
    mlp_pairs: str = opt(
        "",
        "harvest (MLP input, MLP output) pairs for transcoders instead of --hook: layers like '6' or "
        "'0,6,12', or 'all'; one pair cache per layer, all in one pass",
    )
    dataset: str = opt(
        DEFAULT_CORPUS,
        "corpus: a .txt/.jsonl/.parquet/.csv file, a directory of .txt, 'pydoc' (Python's docs, offline) "
        "or a hub dataset id",
    )
    split: str = opt("train", "split of a hub dataset")
    text_column: str = opt("text", "column holding the text in .jsonl/.parquet/.csv/hub corpora")
    # 80k: with every other default (pydoc, ~113k tokens of SmolLM2's tokenizer on Python 3.11),
    # evaluate's 16k held-out tokens are left after the harvested ones.
    tokens: int = opt(80_000, "tokens to run through the model (before filtering)")
    context_length: int = opt(128, "tokens per context; documents are packed, EOS between them")
    batch_size: int = opt(16, "contexts per forward pass")
    out: str = opt("runs/acts", "cache directory (with several hooks: one subdirectory per hook)")
    dtype: str = opt("bfloat16", "storage dtype of activations: bfloat16, float16 or float32")
    model_dtype: str = opt("auto", "dtype the model runs in; auto = bfloat16 on GPU, float32 on CPU")
    device: str = opt("auto", "cuda, cpu, or auto")
    contexts_per_shard: int = opt(256, "contexts per shard file (the unit of resume)")
    drop_special: bool = opt(True, "drop BOS/EOS/pad rows (separators and attention sinks)")
    drop_first: int = opt(
        1,
        "drop the first k positions of every context: position 0 is an attention sink with a norm ~10x the "
        "rest, which would dominate an SAE's loss",
    )
    outlier_factor: float = opt(0.0, "drop rows whose norm exceeds this multiple of the batch median (0 = keep all)")
    nonfinite: str = opt("error", "NaN/Inf activations: 'error' refuses the harvest, 'skip' drops those rows")
    overwrite: bool = opt(False, "replace a cache in --out made with different settings")
    trust_remote_code: bool = opt(False, "let transformers run code shipped with a hub model (off unless you trust it)")

    def __post_init__(self):
        check_numbers(
            self,
            tokens="positive",
            context_length="positive",
            batch_size="positive",
            contexts_per_shard="positive",
            drop_first="non-negative",
            outlier_factor="non-negative",
        )
        if self.drop_first >= self.context_length:
            raise UserError(
                f"--drop-first {self.drop_first} drops every position of a {self.context_length}-token "
                "context; lower it"
            )


# ---- the harvest loop -----------------------------------------------------------------------


def cache_dirs(cfg: HarvestConfig) -> dict[str, Path]:
    if len(cfg.hooks) == 1:
        return {cfg.hooks[0]: Path(cfg.out)}
    return {h: Path(cfg.out) / h for h in cfg.hooks}


MLP_IN, MLP_OUT = "ln2.hook_normalized", "hook_mlp_out"  # a transcoder's input and target kinds


def pair_layers(spec: str, n_layers: int) -> list[int]:
    """The layers of --mlp-pairs: 'all', or a comma-separated list of layer numbers."""
    if spec.strip() == "all":
        return list(range(n_layers))
    try:
        layers = sorted({int(p) for p in spec.split(",") if p.strip()})
    except ValueError:
        raise UserError(f"--mlp-pairs takes 'all' or layer numbers like 6 or 0,6,12, not {spec!r}") from None
    if not layers or not all(0 <= L < n_layers for L in layers):
        raise UserError(f"--mlp-pairs {spec!r}: layers must lie in 0..{n_layers - 1}")
    return layers


def target_hooks(cfg: HarvestConfig) -> dict[str, str]:
    """{input hook: target hook} of a pair harvest (empty for a plain one)."""
    if not cfg.mlp_pairs:
        return {}
    return {h: h.replace(MLP_IN, MLP_OUT) for h in cfg.hooks}


def harvest(cfg: HarvestConfig, lm: LoadedModel | None = None) -> dict[str, Path]:
    """Write one activation cache per hook (per layer's MLP pair with --mlp-pairs); returns
    {hook: cache directory}. Resumable."""
    cfg.__post_init__()
    if cfg.mlp_pairs:  # the layer count of 'all' needs the model, so pairs are resolved after it loads
        lm = lm or load_model(
            cfg.model,
            resolve_device(cfg.device),
            model_dtype(cfg.model_dtype, resolve_device(cfg.device)),
            cfg.trust_remote_code,
        )
        cfg.hooks = [f"blocks.{L}.{MLP_IN}" for L in pair_layers(cfg.mlp_pairs, lm.n_layers)]
    if not cfg.hooks:
        raise UserError("no hook given; pass --hook blocks.L.hook_resid_post (for example)")
    if cfg.nonfinite not in ("error", "skip"):
        raise UserError(f"--nonfinite must be 'error' or 'skip', got {cfg.nonfinite!r}")
    if cfg.dtype not in DTYPES:
        raise UserError(f"unknown --dtype {cfg.dtype!r}; use one of {', '.join(DTYPES)}")
    dirs = cache_dirs(cfg)
    run = OUTPUT.start(cfg)
    if run.done() is not None:  # the rerun rule (outputs.py), decided before the model loads
        return dirs
    run.claim()  # before the model loads
    # Under torchrun rank r harvests shards r, r+N, ... (docs/scaling.md); rank 0 loads first so
    # that downloads and the GGUF conversion happen once.
    device = runtime.init_from_env(resolve_device(cfg.device))
    rank, world = runtime.rank(), runtime.world_size()
    texts = runtime.main_first(lambda: load_texts(cfg.dataset, cfg.split, cfg.text_column))
    if lm is None:
        lm = runtime.main_first(
            lambda: load_model(cfg.model, device, model_dtype(cfg.model_dtype, device), cfg.trust_remote_code)
        )
    contexts = _contexts(cfg, lm, texts, rank)  # [n_ctx, T]
    writers: dict[str, CacheWriter | ShardedCacheWriter] = {}
    try:
        _open_writers(writers, cfg, dirs, lm, _manifest_base(cfg, lm, texts, len(contexts)), world)
        todo = [h for h, w in writers.items() if not w.complete]
        if not todo:
            print(_result_line(dirs))
            return dirs
        _write_shards(cfg, lm, contexts, {h: writers[h] for h in todo}, device)
        for h in todo:
            if world == 1 and writers[h].manifest["n_tokens"] == 0:
                raise UserError(
                    f"the filters dropped every row of {dirs[h]} (--drop-first, --drop-special, "
                    "--outlier-factor); harvest more text or filter less"
                )
            writers[h].finish(d_model=lm.d_model, harvest_config=asdict(cfg))
    finally:
        for w in writers.values():
            w.close()
    if rank == 0:
        run.finish({}, _result_line(dirs))
    return dirs


def _contexts(cfg: HarvestConfig, lm: LoadedModel, texts: list[str], rank: int) -> Tensor:
    """The corpus packed into contexts [n_ctx, T], once the hooks and the context length are known
    to fit the model (before any file is written)."""
    for h in cfg.hooks:
        hook_point(lm.model, h)  # unknown hooks fail before any file is written
    check_context_length(lm, cfg.context_length)
    contexts = tokenize_corpus(lm.tokenizer, texts, cfg.context_length, cfg.tokens)  # [n_ctx, T]
    if len(contexts) < max(1, cfg.tokens // cfg.context_length) and rank == 0:
        warn(
            f"{cfg.dataset} holds {len(contexts) * cfg.context_length:,} tokens in whole contexts of "
            f"{cfg.context_length}, "
            f"fewer than the {cfg.tokens:,} asked (--tokens); the cache will hold those"
        )
    return contexts


def _manifest_base(cfg: HarvestConfig, lm: LoadedModel, texts: list[str], n_contexts: int) -> dict:
    """What every cache of this harvest records in its manifest (each adds its hook)."""
    return {
        "model": cfg.model,
        "weights_hash": lm.weights_hash,
        "corpus": cfg.dataset,
        "corpus_sha256": corpus_fingerprint(texts),
        "tokenizer": type(lm.tokenizer).__name__ + ":" + str(getattr(lm.tokenizer, "name_or_path", "")),
        "dtype": cfg.dtype,
        "context_length": cfg.context_length,
        "contexts_per_shard": cfg.contexts_per_shard,
        "max_contexts": n_contexts,
        "filters": {
            "drop_special": cfg.drop_special,
            "special_ids": sorted(special_token_ids(lm.tokenizer)),
            "drop_first": cfg.drop_first,
            "outlier_factor": cfg.outlier_factor,
            "nonfinite": cfg.nonfinite,
        },
    }


def _open_writers(
    writers: dict, cfg: HarvestConfig, dirs: dict[str, Path], lm: LoadedModel, base: dict, world: int
) -> None:
    """Open each hook's cache writer into `writers`, one by one (so that the caller closes those
    already open if one fails); a damaged shard is dropped, with the shards after it."""
    Writer = ShardedCacheWriter if world > 1 else CacheWriter
    targets = target_hooks(cfg)
    for h, d in dirs.items():
        d_target = lm.d_model if h in targets else 0
        writers[h] = Writer(d, {**base, "hook": h, "target_hook": targets.get(h)}, lm.d_model, cfg.overwrite, d_target)
    for h, w in writers.items():
        bad = w.drop_damaged() if world == 1 else None
        if bad is not None:
            warn(f"{dirs[h]}: shard {bad} was missing or corrupt; harvesting it again, and the shards after it")


def _write_shards(
    cfg: HarvestConfig, lm: LoadedModel, contexts: Tensor, writers: dict[str, CacheWriter | ShardedCacheWriter], device
) -> None:
    """Run the model over the contexts of the shards these caches lack, and add them. Every cache
    of one harvest advances together; the pass resumes from the least advanced."""
    rank, world = runtime.rank(), runtime.world_size()
    start_shard = min(w.n_shards for w in writers.values())
    n_ctx = len(contexts)
    per = cfg.contexts_per_shard
    n_shards = (n_ctx + per - 1) // per
    bar = tqdm(
        total=n_ctx * cfg.context_length,
        initial=start_shard * per * cfg.context_length,
        unit="tok",
        desc="harvest",
        dynamic_ncols=True,
        disable=rank > 0,
    )
    # All ranks go through the same rounds of N shards, so that they sync together; a rank
    # whose shard lies past the end sits the last round out.
    rounds = -(-(n_shards - start_shard) // world)
    for s in range(start_shard + rank, start_shard + rounds * world, world):
        ctx = contexts[s * per : (s + 1) * per]  # [≤ per, T]
        shard = _run_shard(cfg, lm, ctx, s, list(writers), device, bar)
        for h, w in writers.items():
            if w.n_shards > s or len(ctx) == 0:
                continue  # the cache already had it (it was ahead of the others), or past the end
            kept = shard[h]
            tok, doc, pos = torch.cat(kept.meta, dim=1)
            w.add_shard(
                torch.cat(kept.acts),
                tok,
                doc,
                pos,
                n_contexts=len(ctx),
                index=s,
                nonfinite_rows=kept.nonfinite,
                targets=torch.cat(kept.targets) if kept.targets is not None else None,
            )
        if world > 1:
            for w in writers.values():
                assert isinstance(w, ShardedCacheWriter), "_open_writers opens sharded writers under torchrun"
                w.sync()  # rank 0 enters this round's shards in the manifest
    bar.close()


@dataclass
class ShardRows:
    """The rows of one shard that one hook's cache keeps, batch by batch."""

    acts: list[Tensor] = field(default_factory=list)  # [n, d_model] per batch
    targets: list[Tensor] | None = None  # [n, d_target] per batch; a pair cache's only
    meta: list[Tensor] = field(default_factory=list)  # [3, n] token id, context, position per batch
    nonfinite: int = 0  # NaN/Inf rows dropped


def _run_shard(
    cfg: HarvestConfig, lm: LoadedModel, ctx: Tensor, s: int, hooks: list[str], device, bar
) -> dict[str, ShardRows]:
    """The rows each hook keeps from shard s, whose contexts are ctx [≤ per, T]."""
    targets = target_hooks(cfg)
    special, filters = special_token_ids(lm.tokenizer), position_filters(cfg)
    first = s * cfg.contexts_per_shard  # the context index of ctx[0]
    kept = {h: ShardRows(targets=[] if h in targets else None) for h in hooks}
    for b in range(0, len(ctx), cfg.batch_size):
        ids = ctx[b : b + cfg.batch_size].to(device)  # [b, T]
        acts = run_to_hooks(lm.model, ids, hooks + [targets[h] for h in hooks if h in targets])
        doc = torch.arange(first + b, first + b + len(ids), device=device)[:, None].expand_as(ids)
        pos = torch.arange(ids.shape[1], device=device)[None, :].expand_as(ids)
        for h in hooks:
            a = acts[h]  # [b, T, d]
            target = acts[targets[h]] if h in targets else None
            keep = keep_mask(ids, a, special, **filters)
            finite = torch.isfinite(a).all(dim=-1)
            if target is not None:  # a pair's row is kept or dropped as one
                finite &= torch.isfinite(target).all(dim=-1)
            bad = int((keep & ~finite).sum())
            if bad and cfg.nonfinite == "error":
                raise UserError(
                    f"{bad} activation rows at {h} are NaN or Inf (shard {s}); pass --nonfinite skip to drop them"
                )
            keep &= finite
            kept[h].nonfinite += bad
            kept[h].acts.append(a[keep].to(DTYPES[cfg.dtype]).cpu())
            if target is not None:
                kept_targets = kept[h].targets
                assert kept_targets is not None, "a pair cache's rows keep their targets"
                kept_targets.append(target[keep].to(DTYPES[cfg.dtype]).cpu())
            kept[h].meta.append(torch.stack([ids[keep], doc[keep], pos[keep]]).cpu())
        bar.update(ids.numel() * runtime.world_size())  # rank 0 stands for the group
    return kept


def _refuse_other_work(cfg: HarvestConfig, dirs: dict[str, Path]) -> None:
    """The writers' own refusal of an --out that is a file or holds the user's own work
    (cache.check_cache_dir), made before the model loads."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a directory: choose another --out")
    if len(dirs) > 1 and out.is_dir() and not cfg.overwrite:  # --out holds the per-hook caches
        others = sorted(p.name for p in out.iterdir() if p not in dirs.values() and p.name != ".lock")
        if others:
            shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
            raise UserError(
                f"{out} holds other files ({shown}); a harvest of several hooks writes one subdirectory "
                "per hook there: choose another --out or pass --overwrite"
            )
    for d in dirs.values():
        check_cache_dir(d, cfg.overwrite)


# Not settings of one cache: `hooks` (with several, each cache holds one, named in its manifest)
# and `batch_size` (contexts per forward pass).
HARVEST_NOT_SETTINGS = ("hooks", "batch_size")


class CacheManifests:
    """harvest's record (outputs.py): each cache's manifest, which the cache writer finishes last,
    since a cache directory holds nothing else."""

    def done(self, run: StageRun) -> dict | None:
        dirs = cache_dirs(run.cfg)
        if not _finished(run.cfg, dirs, run.settings):
            return None
        print(
            f"harvest: {run.cfg.out} is complete, nothing to do (same settings, every shard intact; "
            "--overwrite redoes it)"
        )
        print(_result_line(dirs))
        return {}

    def finish(self, run: StageRun, result: dict, line: str) -> None:
        print(line)  # the manifests were written as the caches finished


def _claim(out: Path, cfg: HarvestConfig) -> Path:
    _refuse_other_work(cfg, cache_dirs(cfg))  # the writers make the directories
    return out


OUTPUT = Output("harvest", _claim, skip=HARVEST_NOT_SETTINGS, record=CacheManifests())


def _finished(cfg: HarvestConfig, dirs: dict[str, Path], now: dict) -> bool:
    """True when every cache is complete, made with these settings (`now`), and every shard
    matches its sha256; a UserError names the settings that differ."""
    if cfg.overwrite:
        return False
    known = {f.name for f in fields(HarvestConfig)}
    manifests: list[tuple[Path, dict]] = []
    for d in dirs.values():
        m = read_manifest(d) if d.is_dir() else None
        if m is None or not m.get("complete") or "harvest_config" not in m:
            return False
        then = HarvestConfig(**{k: v for k, v in m["harvest_config"].items() if k in known})
        diff = differences(settings_of(then, HARVEST_NOT_SETTINGS), now)
        if diff:
            raise UserError(
                f"{d} holds a cache made differently (differs in: {'; '.join(diff)}); pass --overwrite to "
                "redo it, or choose another --out"
            )
        manifests.append((d, m))
    return all(first_damaged(d, m) is None for d, m in manifests)


def _result_line(dirs: dict[str, Path]) -> str:
    """harvest's result: rows, width and source of each cache (and a shortfall against --tokens)."""
    parts = []
    for h, d in dirs.items():
        m = read_manifest(d)
        assert m is not None, "every cache is complete here"
        asked = (m.get("harvest_config") or {}).get("tokens")
        got = m["n_contexts"] * m["context_length"]
        short = (
            f", {got:,} of the {asked:,} tokens asked"
            if asked and m["n_contexts"] < max(1, asked // m["context_length"])
            else ""
        )
        parts.append(
            f"{d}: {m['n_tokens']:,} rows x {m['d_model']} ({m['dtype']}) at {h}, from {m['n_contexts']:,} contexts of "
            f"{m['model']} on {m['corpus']} in {plural(len(m['shards']), 'shard')}{short}"
        )
    return "harvest: " + "; ".join(parts)
