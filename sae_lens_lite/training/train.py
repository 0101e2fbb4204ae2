"""The training loop: schedules, dead latents, metrics and resumable checkpoints. The step's
forward and loss terms are in loss.py; what differs between training methods (the activation in
training, the sparsity term, thresholds, decoder renormalisation) is in recipes/, one module
each: l1, kl, topk, batchtopk, jumprelu, matryoshka (`--penalty`).

Shared by all: Adam, the learning rate warmed up over the first 1% of steps and decayed to 0 over
the last 20% (Anthropic, April 2024), gradient-norm clipping, a penalty coefficient λ warmed up
over the first 5% (or, with --target-l0, started at 1% and steered until L0 settles there), and optional
resampling of dead latents towards badly reconstructed inputs (Anthropic, Towards
Monosemanticity) for the recipes with ReLU latents.

Everything is computed in the normalised space (x · s). The scale s is stored in the SAE as
`input_scale`; `SAE.folded()` folds it into the weights for export.

Nothing is read back to the host during a step: metrics, λ and the dead-latent counters live on
the device and are read every `log_every` steps. A run writes `metrics.jsonl`, checkpoints
(`checkpoint.json` + a safetensors file) every `checkpoint_every` tokens, and the SAE directory;
running the same command again resumes from the last checkpoint and reproduces the
uninterrupted run (same data order, optimizer state and schedule position).
"""

from __future__ import annotations

import json
import math
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import torch
from safetensors.torch import load_file
from torch import Tensor
from tqdm.auto import tqdm

from sae_lens_lite import runtime
from sae_lens_lite.config import check_memory
from sae_lens_lite.errors import UserError
from sae_lens_lite.evaluation.metrics import CHUNK, sae_pass
from sae_lens_lite.fsutil import save_safetensors_atomic, write_json_atomic, write_text_atomic
from sae_lens_lite.outputs import Output, differences, pct, resumable_folder, warn
from sae_lens_lite.runtime import resolve_device
from sae_lens_lite.training import distributed, recipes
from sae_lens_lite.training.loss import step_terms, total_loss
from sae_lens_lite.training.sae import CONFIG_FILE, SAE, WEIGHTS_FILE, SAEConfig
from sae_lens_lite.training.train_config import PRECISIONS, TrainConfig

LAMBDA_WARMUP = 0.05  # fraction of steps over which λ (or β) rises linearly from 0 (Anthropic, April 2024)
LR_WARMUP = 0.01  # fraction of steps over which the learning rate rises linearly from 0
LR_DECAY = 0.20  # the learning rate decays linearly to 0 over this last fraction (Anthropic, April 2024)
CLIP_NORM = 1.0  # gradient-norm clipping (Anthropic, April 2024)
L0_GAIN = 0.01  # --target-l0: per step, λ *= (L0 / target)^gain (the controller's integral term)
# --target-l0's proportional term: λ also moves by (L0_now / L0_last)^damp, so that it gives back
# what it gained while L0 was high as soon as L0 falls, instead of overshooting while L0 lags it
# (the runs that chose it are in docs/training.md).
L0_DAMP = 0.75
# --target-l0 for recipes whose L0 lags λ (Recipe.l0_lags): the integral term pauses while L0 is
# on course, i.e. its trend (a moving average of its change per step, rate L0_TREND: ~20 steps)
# would close L0_COURSE times the remaining gap before the run ends. Too small and the run ends
# far above its target; too large and λ winds up as if there were no pause (docs/training.md has
# the JumpReLU runs that chose 3).
L0_TREND = 0.05
L0_COURSE = 3.0
TARGET_START = 0.01  # --target-l0: λ starts at this share of its coefficient (then ×1.04 a step at most L0/target = 50)
INIT_TOKENS = 65_536  # tokens used to estimate the input scale and the data mean
RESIDENT_FRACTION = 0.25  # on a GPU, hold the whole cache in memory when it takes at most this much of what is free
CHECKPOINT = "checkpoint.json"
METRICS = "metrics.jsonl"
# What a run writes into --out besides the SAE; a run killed before its first checkpoint leaves only these.
RUN_FILES = (METRICS, "checkpoint_*.safetensors", "*.tmp")
OUTPUT = Output("train", resumable_folder(CHECKPOINT, RUN_FILES), inputs=("acts",), skip=("acts",))  # outputs.py
# Fields that change the result: a run resumes only if they are the same.
RUN_KEYS = (
    "expansion",
    "penalty",
    "l1",
    "k",
    "kl_beta",
    "kl_rho",
    "l0_coef",
    "target_l0",
    "lr",
    "batch_size",
    "tokens",
    "seed",
    "dead_window",
    "resample_dead",
    "precision",
    "sparse",
    "transcoder",
    "skip",
)


# ---- schedules (pure functions of the step, so a resumed run continues exactly) ---------------


def lr_at(step: int, total: int, lr: float) -> float:
    """lr · min(1, (step+1)/warm-up steps) · min(1, (total − step)/decay steps)."""
    warm = max(1, round(LR_WARMUP * total))
    decay = max(1, round(LR_DECAY * total))
    return lr * min(1.0, (step + 1) / warm) * min(1.0, (total - step) / decay)


def steer_lambda(
    lam: Tensor, err: Tensor, last_err: Tensor, trend: Tensor | None, lags: bool, steps_left: int
) -> tuple[Tensor, Tensor | None]:
    """One step of --target-l0's controller on λ, err = log(L0 / target) now and a step before:
    λ·exp(L0_GAIN·err + L0_DAMP·(err − last_err)). Where L0 lags λ (Recipe.l0_lags), the integral
    term pauses while L0's trend (its smoothed change per step) closes L0_COURSE × the gap within
    steps_left. Returns (λ, trend); no host sync."""
    moved = err - last_err
    i_term = L0_GAIN * err
    if lags:
        trend = moved if trend is None else trend + L0_TREND * (moved - trend)
        on_course = (err * trend < 0) & (trend.abs() * steps_left >= L0_COURSE * err.abs())
        i_term = torch.where(on_course, 0.0, i_term)
    return lam * torch.exp(i_term + L0_DAMP * moved), trend


def penalty_warmup_at(step: int, total: int) -> float:
    """Multiplier of λ (or β): rises linearly from 0 at step 0 to 1 after 5% of the steps."""
    return min(1.0, step / max(1, round(LAMBDA_WARMUP * total)))


# ---- setup helpers --------------------------------------------------------------------------


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX); then bf16 matmuls are several
    times faster than fp32 (measured in scripts/bench_train.py). Elsewhere bf16 is emulated and slower."""
    return bool({"avx512_bf16", "amx_bf16"} & runtime.cpu_flags())


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for matmuls (None: plain fp32). Master weights and Adam stay fp32."""
    if precision == "float32":
        return None
    if precision == "bfloat16":
        return torch.bfloat16
    if precision != "auto":
        raise UserError(f"unknown --precision {precision!r}: use {', '.join(PRECISIONS)}")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if device.type == "cpu" and cpu_has_bf16() else None


def check_config(cfg: TrainConfig) -> recipes.Recipe:
    """The run's recipe, once the settings are known to be usable."""
    recipe = recipes.get(cfg.penalty, cfg)
    cfg.__post_init__()  # the numbers again: a config's fields may have been set after it was made
    recipe.check()
    return recipe


def check_width(cfg: TrainConfig, recipe: recipes.Recipe, d_in: int) -> None:
    """Refuse a top-k family run asking for more latents per token than the SAE will have."""
    d_sae = cfg.expansion * d_in
    if recipe.fixed_count and cfg.k > d_sae:
        raise UserError(
            f"--k {cfg.k:,} is more than the SAE's {d_sae:,} latents (--expansion {cfg.expansion} x d_in {d_in}); "
            "lower --k or raise --expansion"
        )


@torch.no_grad()
def init_from_data(
    sae: SAE, batches: Callable[[int], Iterator[Tensor]], seed: int, dec_norm: float, tokens: int = INIT_TOKENS
) -> None:
    """Anthropic, April 2024: scale inputs so E‖x‖ = √d_in; decoder rows in random directions at
    norm dec_norm, encoder = decoder transpose; b_dec at the (scaled) data mean, measured on `tokens` rows.
    A transcoder scales its input and its target each to its own width (sae.init_biases)."""
    rows, n = [], 0
    for x in batches(0):
        rows.append(x.float().cpu())
        n += len(x)
        if n >= tokens:
            break
    if not rows:
        raise UserError("no training data: the activation source yielded no batch")
    x, y = sae.split(torch.cat(rows))  # [n, d_in], [n, d_out]: the same for an SAE
    norms = torch.stack([x.norm(dim=1).mean(), y.norm(dim=1).mean()])
    if not torch.isfinite(norms).all() or (norms == 0).any():
        raise UserError("the activations are all zero or not finite; check the cache")
    g = torch.Generator().manual_seed(seed)
    sae.reset_parameters(dec_norm=dec_norm, generator=g)
    sae.input_scale.fill_(math.sqrt(sae.d_in) / float(norms[0]))
    sae.target_scale.fill_(math.sqrt(sae.d_out) / float(norms[1]))  # the input scale again for an SAE
    sae.init_biases(x, y)


# ---- checkpoints ----------------------------------------------------------------------------


def save_checkpoint(out: Path, step: int, state: dict[str, Tensor], info: dict) -> None:
    """A safetensors file per checkpoint, then checkpoint.json pointing at it (written atomically),
    then the older file removed: a crash at any point leaves a complete checkpoint."""
    name = f"checkpoint_{step:09d}.safetensors"
    save_safetensors_atomic(state, out / name)
    write_json_atomic(out / CHECKPOINT, {**info, "file": name})
    for p in out.glob("checkpoint_*.safetensors"):
        if p.name != name:
            p.unlink()


def read_checkpoint(out: Path) -> dict | None:
    """The run's checkpoint.json; None where nothing was saved yet (a run's first act is to write
    one with "file": null, so that --out is known to be this run's from its first moment)."""
    f = out / CHECKPOINT
    if not f.exists():
        return None
    try:
        ckpt = json.loads(f.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{f} is damaged; pass --overwrite to start the run again") from None
    if not isinstance(ckpt, dict) or not {"step", "complete", "train_config", "sae_config"} <= set(ckpt):
        raise UserError(f"{f} is not a training checkpoint; pass --overwrite to start the run again")
    return ckpt if ckpt.get("file") or ckpt.get("complete") else None


def clear_run(out: Path, keep: tuple[str, ...] = ()) -> None:
    """Remove what an earlier, interrupted run left in `out` (metrics, checkpoint files, temporary
    files) except the files named in `keep`; the run that follows writes them again."""
    for pattern in RUN_FILES:
        for p in out.glob(pattern):
            if p.name not in keep and p.is_file():
                p.unlink()


def optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, Tensor]:
    return {f"opt.{i}.{k}": v for i, st in opt.state_dict()["state"].items() for k, v in st.items()}


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, Tensor]) -> None:
    sd = opt.state_dict()
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, i, k = key.split(".", 2)
            state.setdefault(int(i), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": sd["param_groups"]})


# ---- the loop -------------------------------------------------------------------------------


def train_on_batches(
    sae_cfg: SAEConfig,
    cfg: TrainConfig,
    batches: Callable[[int], Iterator[Tensor]],
    total_tokens: int,
    out: Path | None = None,
    progress: bool = True,
) -> SAE:
    """Train an SAE on batches [batch_size, d_in] from `batches(epoch)` (a fresh, deterministic
    iterator per epoch; partial batches are skipped). With `out`, write metrics and checkpoints
    there and resume from the last checkpoint; without, train in memory (tests, benchmarks)."""
    with runtime.keep_freed_memory(resolve_device(cfg.device)):
        return _train_on_batches(sae_cfg, cfg, batches, total_tokens, out, progress)


class LogSums(NamedTuple):
    """What the loop adds up between two log lines. A step adds its figures as one stacked
    tensor (`packed`, [8] in this field order, kept on the device and saved in a checkpoint as
    "acc"), and a log line reads the sums back in one host sync (`read`): 0-d tensors in a
    step, floats once read."""

    steps: Tensor | float  # 1 a step: the sums' divisor
    mse: Tensor | float  # the reconstruction term
    sse: Tensor | float  # Σ‖y − ŷ‖² over the global batch (normalised units), for explained variance
    sst: Tensor | float  # Σ‖y − ȳ‖² around the batch mean
    l0: Tensor | float  # active latents per token
    penalty: Tensor | float  # the recipe's logged term (Recipe.term); 0 where it has none
    lam: Tensor | float  # λ (or β) as applied, after its warm-up
    dead_frac: Tensor | float  # fraction of latents that have not fired for dead_window tokens

    def packed(self) -> Tensor:
        return torch.stack(list(self))  # type: ignore[arg-type]  # [8]

    @classmethod
    def read(cls, acc: Tensor) -> LogSums:
        return cls(*acc.tolist())


@dataclass
class TrainState:
    """What the steps change besides the weights and Adam's moments, and a checkpoint saves with
    them: all on the device, so that no step waits for it."""

    lam: Tensor  # base λ (or β); --target-l0 steers it
    since_fired: Tensor  # [d_sae] tokens since each latent last fired
    acc: Tensor  # [8] LogSums since the last log line, packed
    l0_err: Tensor | None = None  # --target-l0: the last step's log(L0 / target)
    l0_trend: Tensor | None = None  # --target-l0, recipes whose L0 lags: its change per step, smoothed
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # the next batch of `epoch` to read

    @classmethod
    def fresh(cls, cfg: TrainConfig, recipe: recipes.Recipe, d_sae: int, device: torch.device) -> TrainState:
        # With --target-l0 the controller replaces the warm-up: λ starts at TARGET_START × the
        # coefficient and is steered from the first step, so it rises only as fast as L0 follows.
        lam = torch.tensor((recipe.coefficient() or 0.0) * (TARGET_START if cfg.target_l0 else 1.0), device=device)
        return cls(lam, torch.zeros(d_sae, device=device), torch.zeros(len(LogSums._fields), device=device))

    def tensors(self) -> dict[str, Tensor]:
        """The checkpoint's entries for this state (the SAE's and Adam's are added beside them)."""
        return {
            "lam": self.lam,
            **({"l0_err": self.l0_err} if self.l0_err is not None else {}),
            **({"l0_trend": self.l0_trend} if self.l0_trend is not None else {}),
            "since_fired": self.since_fired,
            "acc": self.acc,
        }

    def restore(self, tensors: dict[str, Tensor], ckpt: dict) -> None:
        self.lam, self.since_fired, self.acc = tensors["lam"], tensors["since_fired"], tensors["acc"]
        self.l0_err = tensors.get("l0_err")  # absent in checkpoints of runs without --target-l0
        self.l0_trend = tensors.get("l0_trend")
        self.step, self.epoch, self.batch_in_epoch = ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]


@dataclass
class _Run:
    """What stays fixed while a run's steps go by."""

    cfg: TrainConfig
    sae_cfg: SAEConfig
    recipe: recipes.Recipe
    sae: SAE
    model: torch.nn.Module  # the SAE, or the SAE in DistributedDataParallel under torchrun
    opt: torch.optim.Optimizer
    params: list[torch.nn.Parameter]
    loss_fn: Callable
    amp: torch.dtype | None
    device: torch.device
    total: int  # steps
    local_batch: int  # rows this rank contributes to a step
    out: Path | None
    main: bool  # rank 0, the only one that writes

    def info(self, st: TrainState, complete: bool = False) -> dict:
        """checkpoint.json's fields for the state st."""
        return {
            "step": st.step,
            "epoch": st.epoch,
            "batch_in_epoch": st.batch_in_epoch,
            "tokens": st.step * self.cfg.batch_size,
            "complete": complete,
            "train_config": asdict(self.cfg),
            "sae_config": asdict(self.sae_cfg),
        }

    def checkpoint(self, st: TrainState) -> None:
        """Save the SAE, Adam and st as the run's checkpoint (rank 0 only)."""
        assert self.out is not None
        state = {**{f"sae.{k}": v for k, v in self.sae.state_dict().items()}, **optimizer_tensors(self.opt)}
        save_checkpoint(self.out, st.step, {**state, **st.tensors()}, self.info(st))


def _train_on_batches(sae_cfg, cfg, batches, total_tokens, out, progress) -> SAE:
    """The run in outline: the SAE and Adam, the checkpoint to resume (or a fresh --out), the
    steps, the SAE saved."""
    recipe = check_config(cfg)
    device = runtime.init_from_env(resolve_device(cfg.device))  # under torchrun: this rank's GPU
    amp = autocast_dtype(cfg.precision, device)
    total = total_tokens // cfg.batch_size  # steps
    if total < 1:
        raise UserError(
            f"{total_tokens} training tokens is less than one batch of {cfg.batch_size}; train on more "
            "tokens or use a smaller --batch-size"
        )
    # Under torchrun each step takes batch_size / N rows from each of the N ranks (docs/scaling.md).
    local_batch, main = distributed.local_batch_size(cfg.batch_size), runtime.is_main()  # only rank 0 writes
    sae = _build_sae(sae_cfg, cfg, recipe, batches, device, local_batch)
    params = [p for p in sae.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr, betas=(0.9, 0.999), fused=device.type in ("cpu", "cuda"))
    st = TrainState.fresh(cfg, recipe, sae.d_sae, device)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        ckpt = read_checkpoint(out)
        if ckpt is not None:
            _check_resumable(out, ckpt, sae_cfg, cfg)
            if ckpt.get("complete"):
                return _already_complete(out, device, main)
            _resume(out, ckpt, sae, opt, st, device, main)
        elif main:
            _start(out, sae_cfg, cfg)

    model = distributed.data_parallel(sae, device)  # DistributedDataParallel under torchrun, else the SAE
    loss_fn = torch.compile(step_terms) if cfg.compile else step_terms
    run = _Run(cfg, sae_cfg, recipe, sae, model, opt, params, loss_fn, amp, device, total, local_batch, out, main)
    log = _Logger(cfg, recipe, out if main else None, total, st.step, progress and main)
    _run_steps(run, st, batches, log)
    if st.step < total:
        raise UserError(
            f"the activation source ran dry after {st.step} of {total} steps: an epoch yielded no batch of "
            f"exactly {local_batch} rows (batch_size {cfg.batch_size}); yield batches of that size or set it"
        )
    _finish(run, st, log.last)
    return sae


def _build_sae(
    sae_cfg: SAEConfig,
    cfg: TrainConfig,
    recipe: recipes.Recipe,
    batches: Callable[[int], Iterator[Tensor]],
    device: torch.device,
    local_batch: int,
) -> SAE:
    """The SAE initialised from the data (the same on every rank), on the device."""
    # fp32 weights, gradients and two Adam moments (16 bytes a weight), and a few [batch, d_sae] tensors per step
    need = 16 * 2 * sae_cfg.d_in * sae_cfg.d_sae + 4 * 4 * local_batch * sae_cfg.d_sae
    check_memory(
        need,
        device,
        f"an SAE of {sae_cfg.d_sae} latents on {sae_cfg.d_in}-dim inputs at --batch-size {cfg.batch_size}",
        "lower --expansion or --batch-size",
    )
    sae = SAE.build(sae_cfg)  # a Transcoder where sae_cfg names d_out
    init_from_data(sae, batches, cfg.seed, recipe.dec_norm, INIT_TOKENS // runtime.world_size())
    recipe.init(sae)
    sae.to(device)
    distributed.average_input_stats(sae)
    return sae


def _finish(run: _Run, st: TrainState, final_metrics: dict) -> None:
    """Record the run in the SAE's config and save it; the checkpoint is marked complete and its
    files removed."""
    sae, out = run.sae, run.out
    sae.cfg.meta.update(input_scale=float(sae.input_scale), train_config=asdict(run.cfg), final_metrics=final_metrics)
    if out is not None and run.main:
        sae.save(out)
        write_json_atomic(out / CHECKPOINT, run.info(st, complete=True))
        for p in out.glob("checkpoint_*.safetensors"):
            p.unlink()
    runtime.barrier()  # the SAE is on disk before any rank returns


# ---- starting and resuming ------------------------------------------------------------------


def _start(out: Path, sae_cfg: SAEConfig, cfg: TrainConfig) -> None:
    """Nothing saved yet (a fresh --out, or a run killed before its first checkpoint): start over,
    and mark --out as this run's before anything else is written."""
    clear_run(out)
    write_json_atomic(
        out / CHECKPOINT,
        {"step": 0, "complete": False, "file": None, "train_config": asdict(cfg), "sae_config": asdict(sae_cfg)},
    )


def _check_resumable(out: Path, ckpt: dict, sae_cfg: SAEConfig, cfg: TrainConfig) -> None:
    """Refuse to resume a run in `out` made on other activations or with other settings."""
    if ckpt["sae_config"]["d_in"] != sae_cfg.d_in:
        raise UserError(
            f"{out} holds a run with d_in={ckpt['sae_config']['d_in']} but the activations have "
            f"d_in={sae_cfg.d_in}; "
            "choose another --out or pass --overwrite"
        )
    now = asdict(cfg)
    diff = differences({k: ckpt["train_config"].get(k) for k in RUN_KEYS}, {k: now[k] for k in RUN_KEYS})
    if diff:
        raise UserError(
            f"{out} holds a run with different settings ({'; '.join(diff)}); use the same flags to "
            "resume, another --out, or --overwrite"
        )


def _already_complete(out: Path, device: torch.device, main: bool) -> SAE:
    if main:  # a run killed while removing its checkpoint files left some behind
        for p in out.glob("checkpoint_*.safetensors"):
            p.unlink()
    print(f"train: {out} is complete, nothing to do (same settings; --overwrite redoes it)")
    return SAE.load(out, device)


def _resume(
    out: Path, ckpt: dict, sae: SAE, opt: torch.optim.Optimizer, st: TrainState, device: torch.device, main: bool
) -> None:
    """Load the checkpoint into the SAE, Adam and the state; the run then reproduces the
    uninterrupted one (same data order, optimizer state and schedule position)."""
    try:
        tensors = load_file(str(out / ckpt["file"]), device=str(device))
    except Exception as e:  # missing or damaged: safetensors raises its own error types
        raise UserError(
            f"cannot read the checkpoint {out / ckpt['file']} ({e}); pass --overwrite to start the run again"
        ) from None
    sae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("sae.")})
    load_optimizer(opt, tensors)
    st.restore(tensors, ckpt)
    if main:
        print(f"train: resuming {out} from its checkpoint at step {st.step:,} ({ckpt['tokens']:,} tokens)")
        _truncate_metrics(out / METRICS, st.step)
        clear_run(out, keep=(ckpt["file"], METRICS))  # temporary files of the write the kill interrupted


# ---- the steps ------------------------------------------------------------------------------


def _run_steps(run: _Run, st: TrainState, batches: Callable[[int], Iterator[Tensor]], log: _Logger) -> None:
    """Steps until run.total or the data runs dry, each followed by its bookkeeping."""
    # Ctrl-C stops at the end of the step and saves it, so the rerun resumes there (one process only:
    # under torchrun the ranks could stop at different steps and wait on each other forever).
    stop = StopAtStepEnd() if run.out is not None and run.main and runtime.world_size() == 1 else None
    try:
        for epoch, batch_in_epoch, x in _batch_stream(batches, run.local_batch, st.epoch, st.batch_in_epoch):
            st.epoch, st.batch_in_epoch = epoch, batch_in_epoch  # (checkpoint.json's position once complete)
            if st.step >= run.total:
                break
            x = x.to(run.device, non_blocking=True)
            _step(run, st, x)
            st.step += 1
            st.batch_in_epoch += 1
            _after_step(run, st, x, log)
            if stop is not None and stop.requested and st.step < run.total:
                run.checkpoint(st)
                raise KeyboardInterrupt
    except BaseException:
        # End the bar's line first, so that what the CLI prints next ("interrupted; run the same
        # command again to resume", or an error) stands on a line of its own, not glued to the bar.
        log.bar.close()
        raise
    finally:
        if stop is not None:
            stop.restore()
    log.close()


def _step(run: _Run, st: TrainState, x: Tensor) -> None:
    """One optimizer step on x [local_batch, d_in] ([local_batch, d_in + d_out] for a transcoder),
    then, on the device, the recipe's step end, the dead-latent counters, --target-l0's λ and
    the log sums."""
    cfg, recipe, opt, sae = run.cfg, run.recipe, run.opt, run.sae
    for g in opt.param_groups:
        g["lr"] = lr_at(st.step, run.total, cfg.lr)
    dead = st.since_fired >= cfg.dead_window
    with torch.autocast(run.device.type, dtype=run.amp or torch.float32, enabled=run.amp is not None):
        t = run.loss_fn(run.model, x, recipe, cfg, dead)
    lam_now = st.lam if cfg.target_l0 else st.lam * penalty_warmup_at(st.step, run.total)
    loss = total_loss(t, lam_now, recipe)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(run.params, CLIP_NORM, foreach=True)
    opt.step()
    t = distributed.reduce_metrics(t, sae.split(x)[1], sae.target_scale)  # under torchrun: the global batch's figures
    with torch.no_grad():
        recipe.step_end(sae, st.step)
        st.since_fired = torch.where(t["fired"], 0.0, st.since_fired + cfg.batch_size)
        if cfg.target_l0:
            err = (t["l0"].clamp_min(1e-3) / cfg.target_l0).log()  # log(L0 / target)
            last = err if st.l0_err is None else st.l0_err
            st.lam, st.l0_trend = steer_lambda(st.lam, err, last, st.l0_trend, recipe.l0_lags, run.total - st.step)
            st.l0_err = err
        zero = torch.zeros((), device=run.device)
        st.acc += LogSums(
            steps=torch.ones((), device=run.device),
            mse=t["mse"].detach(),
            sse=t["sse"],
            sst=t["sst"],
            l0=t["l0"],
            penalty=t.get(recipe.term, zero).detach(),
            lam=lam_now.detach(),
            dead_frac=(st.since_fired >= cfg.dead_window).float().mean(),
        ).packed()


def _after_step(run: _Run, st: TrainState, x: Tensor, log: _Logger) -> None:
    """After step st.step (counted from 1): resampling, the log line, the periodic checkpoint."""
    cfg, total = run.cfg, run.total
    dead_steps = max(1, cfg.dead_window // cfg.batch_size)
    if cfg.resample_dead and run.recipe.resamples and st.step % dead_steps == 0 and st.step < total * (1 - LR_DECAY):
        resample_dead_latents(run.sae, run.opt, runtime.gather_rows(x), st.since_fired, cfg, st.step)
    if st.step % cfg.log_every == 0 or st.step == total:
        log.write(st.step, st.acc, run.opt.param_groups[0]["lr"])
        st.acc.zero_()
    if (
        run.out is not None
        and run.main
        and st.step % max(1, cfg.checkpoint_every // cfg.batch_size) == 0
        and st.step < total
    ):
        run.checkpoint(st)


class StopAtStepEnd:
    """While training, the first Ctrl-C (SIGINT) only sets `requested`: the loop finishes its step,
    saves it and stops, so the rerun resumes from there. A second Ctrl-C stops at once. Outside the
    main thread (where signals cannot be caught) it does nothing and Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def restore(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def _batch_stream(batches, batch_size: int, epoch: int, skip: int):
    """(epoch, index in epoch, batch) forever, starting at batch `skip` of `epoch`. Each epoch is a
    fresh pass with its own seed; partial batches are dropped so every step has the same shape."""
    while True:
        i, any_full = 0, False
        for x in batches(epoch):
            if len(x) != batch_size:
                continue
            any_full = True
            if i >= skip:
                yield epoch, i, x
            i += 1
        if not any_full:
            return
        epoch, skip = epoch + 1, 0


@torch.no_grad()
def resample_dead_latents(
    sae: SAE, opt: torch.optim.Optimizer, x: Tensor, since_fired: Tensor, cfg: TrainConfig, step: int
) -> None:
    """Anthropic (Towards Monosemanticity, 2023): point each dead latent at an input sampled with
    probability ∝ its squared reconstruction error, with a small encoder norm, and reset its Adam
    state so old moments do not pull it back."""
    dead = (since_fired >= cfg.dead_window).nonzero().squeeze(1)  # [n_dead]
    if len(dead) == 0:
        return
    xs = x.float() * sae.input_scale
    err2 = (xs - sae(x).x_hat.float() * sae.input_scale).pow(2).sum(-1)  # [n]
    g = torch.Generator(device=x.device).manual_seed(cfg.seed * 1_000_003 + step)  # no RNG state to checkpoint
    pick = torch.multinomial(err2 + 1e-12, len(dead), replacement=True, generator=g)
    dirs = xs[pick] - sae.b_dec
    dirs = dirs / dirs.norm(dim=1, keepdim=True).clamp_min(1e-8)  # [n_dead, d_in]
    alive = since_fired < cfg.dead_window
    enc_norm = sae.W_enc[:, alive].norm(dim=0).mean() if alive.any() else torch.tensor(1.0)
    dec_norm = sae.W_dec[alive].norm(dim=1).mean() if alive.any() else torch.tensor(1.0)  # the init's unit rows
    sae.W_dec[dead] = dirs * dec_norm
    sae.W_enc[:, dead] = dirs.T * enc_norm * 0.2
    sae.b_enc[dead] = 0.0
    for p, sl in ((sae.W_enc, (slice(None), dead)), (sae.b_enc, (dead,)), (sae.W_dec, (dead,))):
        for k in ("exp_avg", "exp_avg_sq"):
            opt.state[p][k][sl] = 0.0
    since_fired[dead] = 0.0


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop lines logged after the checkpoint we resume from, so the log has no duplicates."""
    if not path.exists():
        return
    keep = []
    for ln in path.read_text(errors="replace").splitlines():
        try:
            if json.loads(ln)["step"] <= step:
                keep.append(ln)
        except (json.JSONDecodeError, KeyError, TypeError):
            pass  # the line a kill cut short
    write_text_atomic(path, "".join(ln + "\n" for ln in keep))


class _Logger:
    """metrics.jsonl, the tqdm bar and optionally wandb, fed every log_every steps."""

    last: dict[str, Any]  # the last interval's metrics (empty before the first)

    def __init__(
        self, cfg: TrainConfig, recipe: recipes.Recipe, out: Path | None, total: int, step: int, progress: bool
    ):
        self.cfg, self.recipe, self.out, self.last = cfg, recipe, out, {}
        self.run = None  # wandb first: a refusal is then one line, not one inside the bar
        if cfg.wandb and runtime.is_main():
            try:
                import wandb
            except ImportError:
                raise UserError("--wandb needs the wandb package: pip install wandb") from None
            try:
                self.run = wandb.init(project=cfg.wandb, config=asdict(cfg), dir=str(out) if out else None)
            except Exception as e:  # not logged in, offline, a bad project name: wandb's own message says which
                first = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise UserError(
                    f"--wandb {cfg.wandb}: Weights & Biases could not start ({first}); "
                    "fix that (e.g. `wandb login`) or leave out --wandb"
                ) from None
        self.bar = tqdm(
            total=total,
            initial=step,
            unit="step",
            desc=f"train {cfg.penalty}",
            dynamic_ncols=True,
            disable=not progress,
        )
        self.t0, self.step0 = time.perf_counter(), step

    def write(self, step: int, acc: Tensor, lr: float) -> None:
        a = LogSums.read(acc)  # the one host sync per log interval
        n = max(a.steps, 1.0)
        now = time.perf_counter()
        m = {
            "step": step,
            "tokens": step * self.cfg.batch_size,
            "mse": a.mse / n,
            "explained_variance": 1 - a.sse / max(a.sst, 1e-12),
            "l0": a.l0 / n,
            "dead_frac": a.dead_frac / n,
            self.recipe.term: a.penalty / n,
            "lam": a.lam / n,
            "lr": lr,
            "tokens_per_s": (step - self.step0) * self.cfg.batch_size / max(now - self.t0, 1e-9),
        }
        if self.recipe.coefficient() is None:
            del m["lam"]  # no penalty coefficient (the top-k family)
        self.last = m
        if self.out is not None:
            with open(self.out / METRICS, "a") as f:
                f.write(json.dumps(m) + "\n")
        if self.run is not None:
            self.run.log(m, step=step)
        self.bar.set_postfix(
            mse=f"{m['mse']:.3g}",
            ev=f"{m['explained_variance']:.3f}",
            l0=f"{m['l0']:.1f}",
            dead=f"{m['dead_frac']:.3f}",
            lr=f"{lr:.2g}",
            **({"lam": f"{m['lam']:.3g}"} if "lam" in m else {}),
        )
        self.bar.update(step - self.bar.n)

    def close(self) -> None:
        self.bar.close()
        if self.run is not None:
            self.run.finish()


# ---- the entry point: from an activation cache ----------------------------------------------


def sae_config_for(
    cfg: TrainConfig,
    d_in: int,
    model: str,
    hook: str,
    context_length: int,
    meta: dict,
    d_out: int | None = None,
    target_hook: str | None = None,
) -> SAEConfig:
    return SAEConfig(
        d_in=d_in,
        d_sae=cfg.expansion * d_in,
        **recipes.get(cfg.penalty, cfg).sae_options(),
        model=model,
        hook=hook,
        context_length=context_length,
        meta=meta,
        d_out=d_out,
        target_hook=target_hook,
        skip=cfg.skip,
    )


def train(cfg: TrainConfig) -> SAE:
    """Train an SAE on the activation cache at cfg.acts and write it to cfg.out (resumable)."""
    from sae_lens_lite.data.cache import ActivationCache

    recipe = check_config(cfg)
    device = runtime.init_from_env(resolve_device(cfg.device))  # joins the group under torchrun
    cache = ActivationCache.open(cfg.acts)
    cache.row_keys(cfg.transcoder)  # a transcoder needs a pair cache: refused here, with how to make one
    check_width(cfg, recipe, cache.d_model)  # before --out is made: a refused run leaves nothing behind
    if cache.n_tokens < cfg.batch_size:
        raise UserError(
            f"the cache {cfg.acts} holds {cache.n_tokens:,} rows, fewer than one batch of {cfg.batch_size:,}; "
            f"pass a --batch-size of at most {cache.n_tokens:,} or harvest more tokens"
        )
    run = OUTPUT.start(cfg)
    out = run.claim()
    if run.done() is not None:  # the rerun rule (outputs.py)
        return SAE.load(out, device)
    if cfg.overwrite and runtime.is_main():
        for p in [
            out / CHECKPOINT,
            out / METRICS,
            out / WEIGHTS_FILE,
            out / CONFIG_FILE,
            *out.glob("checkpoint_*.safetensors"),
        ]:
            p.unlink(missing_ok=True)
    runtime.barrier()  # rank 0 has cleared --out before any rank reads it
    m = cache.manifest
    sae_cfg = sae_config_for(
        cfg,
        cache.d_model,
        m["model"],
        m["hook"],
        m["context_length"],
        {
            "acts": str(cfg.acts),
            "acts_n_tokens": cache.n_tokens,
            "corpus": m.get("corpus"),
            "filters": m.get("filters"),
        },
        d_out=cache.d_target if cfg.transcoder else None,  # the pair cache's targets (see _cache_batches)
        target_hook=m.get("target_hook") if cfg.transcoder else None,
    )
    tokens = cfg.tokens or max(cache.n_tokens, 2_000_000)
    sae = train_on_batches(sae_cfg, cfg, _cache_batches(cache, cfg, device), tokens, out)
    if runtime.is_main():
        m = sae.cfg.meta["final_eval"] = measure_saved(sae, cache, device)
        write_json_atomic(out / CONFIG_FILE, asdict(sae.cfg))
        ev = (
            "n/a" if m["explained_variance"] is None else f"{m['explained_variance']:.3f}"
        )  # None: constant activations
        if missed := target_l0_missed(cfg, m["l0"]):
            warn(missed)
        run.finish(
            m,
            f"train: {out}: EV {ev}, L0 {m['l0']:.1f}, "
            f"dead {pct(m['dead_frac'])} of {sae.d_sae:,} latents (no firing on {m['n_tokens']:,} cache rows); "
            f"measured on the saved weights after {tokens // cfg.batch_size * cfg.batch_size:,} training tokens",
        )
    return sae


FINAL_TOKENS = 32_768  # cache rows the saved SAE is measured on at the end of training
TARGET_L0_TOLERANCE = 1.25  # --target-l0 counts as met within this factor either way


def target_l0_missed(cfg: TrainConfig, l0: float) -> str | None:
    """The warning for a --target-l0 the saved SAE missed by more than TARGET_L0_TOLERANCE, else None."""
    if not cfg.target_l0 or 1 / TARGET_L0_TOLERANCE <= l0 / cfg.target_l0 <= TARGET_L0_TOLERANCE:
        return None
    return (
        f"--target-l0 {cfg.target_l0:g} was not reached: the saved SAE's L0 is {l0:.1f} "
        f"({l0 / cfg.target_l0:.2g}x the target); λ is steered gradually, so train on more --tokens, or start "
        f"from a coefficient nearer the one this L0 needs"
    )


def measure_saved(sae: SAE, cache, device: torch.device, n_tokens: int = FINAL_TOKENS) -> dict:
    """Explained variance, L0 and dead fraction (metrics.sae_pass) of the SAE as saved, on a random
    sample of up to n_tokens rows of its cache. The trainer's logged figures are averages over its
    last log interval, taken while the weights still moved (and its dead count needs dead_window tokens)."""
    rows, n = [], 0
    for x in cache.iter_batches(CHUNK, seed=1, device=device, targets=sae.cfg.d_out is not None):
        rows.append(x)
        n += len(x)
        if n >= n_tokens:
            break
    scored = sae_pass(sae, torch.cat(rows)[:n_tokens])  # rows [n, d_in] ([n, d_in + d_out] for a transcoder)
    return {
        "explained_variance": scored.reconstruction["explained_variance"],
        "l0": scored.sparsity["l0"],
        "dead_frac": scored.sparsity["dead_fraction"],
        "n_tokens": scored.sparsity["n_tokens"],
    }


def _cache_batches(cache, cfg: TrainConfig, device: torch.device) -> Callable[[int], Iterator[Tensor]]:
    """batches(epoch) from an activation cache: under torchrun each rank reads only its own shards;
    on a GPU the whole cache is held in its memory when it fits (no disk reads at all); otherwise
    shards are streamed (on CUDA, copied one batch ahead on a side stream)."""
    pairs = cfg.transcoder  # rows [input | target]; refused here for a cache of one hook
    cache.row_keys(pairs)
    if runtime.world_size() > 1:
        return distributed.rank_batches(cache, cfg.batch_size, cfg.seed, device, pairs)
    if device.type == "cuda" and cache.nbytes() < RESIDENT_FRACTION * torch.cuda.mem_get_info(device)[0]:
        resident = cache.resident_batches(cfg.batch_size, device, targets=pairs)
        return lambda epoch: resident(epoch, cfg.seed)
    return lambda epoch: cache.iter_batches(cfg.batch_size, seed=cfg.seed + epoch, device=device, targets=pairs)
