"""Ours against SAELens on the same activations: speed and quality, for each training recipe both
have (TopK, ReLU + L1, BatchTopK, JumpReLU, Matryoshka BatchTopK), one run.

    python scripts/bench_peer.py          # CPU defaults: SmolLM2 layer 6, 8x, 409,600 tokens per SAE, TopK and L1
    python scripts/bench_peer.py --ce     # + CE loss recovered and KL on held-out WikiText-2 (~12 minutes more)
    python scripts/bench_peer.py --penalties batchtopk jumprelu matryoshka   # the other recipes
    python scripts/bench_peer.py --acts runs/frontier/acts --expansion 16 --tokens 5000000 \\
        --penalties topk --k 32 48 64 --ce                        # the 16x frontier against SAELens (hours on a CPU)
    python scripts/bench_peer.py --device cuda --expansion 64 --tokens 50000000   # on a GPU

One activation cache (SmolLM2-135M `blocks.6.hook_resid_post`, harvested with our harvest from
every shared corpus except wikitext2-test.txt, or `--acts DIR`) is loaded into memory once; both
trainers read the same fp32 batches in the same order from it:
  - SAELens: its own `SAETrainer` with its `TopKTrainingSAE` / `StandardTrainingSAE` /
    `BatchTopKTrainingSAE` / `JumpReLUTrainingSAE` / `MatryoshkaBatchTopKTrainingSAE` (sae-lens 6.x,
    the `saelens` extra), fed through its DataProvider interface (an iterator of batches), no
    TransformerLens model. Its defaults for the device: float32 weights, no autocast, plain Adam.
  - ours: `train_on_batches` with its defaults for the device (bf16 autocast on CPUs with
    AVX512-BF16/AMX and on GPUs, sparse kernels), and the same again forced to float32; the SAE's
    activation is the recipe's (recipes.get(penalty).sae_options()).
Same SAE size, batch, peak learning rate and token budget; both with the Anthropic (April 2024)
recipe as far as SAELens has it: inputs scaled so E‖x‖ = √d_in (SAELens:
normalize_activations="expected_average_only_in", folded into the weights at the end), MSE summed
over d_in, L1 = λ Σ f_i ‖W_dec,i‖ (the same λ then means the same in both), λ warmed up over the
first 5% of steps, the lr warmed up over 1% and decayed to 0 over the last 20% (SAELens: its
lr_warm_up_steps, lr_decay_steps, l1_warm_up_steps / l0_warm_up_steps), gradient clipping at 1.
What stays each trainer's own: initialisation (SAELens: b_dec = 0 and, for L1, decoder rows of
norm 0.1; ours: b_dec at the data mean, unit rows for every recipe), SAELens's TopK scoring
pre-activations by decoder norm and its AuxK weight 1 (ours: unit-norm decoder, AuxK 1/32). Per recipe:
  - BatchTopK: both keep the k·n largest activations of a batch of n and estimate one threshold as
    a running mean (rate 0.01) of the smallest kept one, which the saved SAE (a JumpReLU) uses.
    SAELens's TopK differences above apply.
  - Matryoshka: BatchTopK with the same nested prefixes (matryoshka_widths = our
    recipes.matryoshka.prefixes(d_sae): d_sae/16, ..., d_sae). Stays its own: SAELens adds the
    prefix losses to the full MSE (ours averages them: the same directions, another weight
    against AuxK); its AuxK covers the whole dictionary (use_matryoshka_aux_loss off), like ours.
  - JumpReLU: both with DeepMind's L0 term λ·mean Σ_j H(z_j − θ_j) (jumprelu_sparsity_loss_mode
    "step", the straight-through gradient to θ only), our kernel width ε and initial θ
    (jumprelu.BANDWIDTH, INIT_THRESHOLD) and so our initial decoder norm 1 (decoder_init_norm;
    W_enc = W_dec.T in both, so θ and ε start in the same units). Stays its own: SAELens's
    decoder rows are free after the start (ours: renormalised to unit norm after every step), and
    ours adds AuxK on dead latents (SAELens's JumpReLU has none).

L0: TopK sets it (k). BatchTopK and Matryoshka train at a mean L0 of k (the same k for both); the
saved SAE runs on the one estimated threshold, so its L0 is only near k. For L1 (--l1) and JumpReLU
(--l0-coef) our λ is adapted (`target_l0`) to the L0 SAELens reaches with the same λ, starting from
that λ, measured on the first 16,384 training activations. The same L0 there is not the same L0 on
the held-out text where EV and KL are scored (the two SAEs generalise differently), so up to three more
runs of ours ("ours, held-out L0") move the target until the held-out L0 is SAELens's within 3%
(proportionally first, then along the secant through the last two runs), unless the first run is
already there: that row (the closest run) compares quality at one L0. JumpReLU's thresholds move by about lr
per step, so in short runs ours may settle below its target: read the L0 column.

Scored the same way for both, after SAELens's SAE is saved by SAELens and read back through our
import (export.import_sae; BatchTopK and Matryoshka are saved as JumpReLU SAEs): explained
variance, L0 and latents that never fire, on activations of held-out WikiText-2 test; with --ce,
CE loss recovered and KL(clean ‖ spliced) by our evaluate on held-out WikiText-2 text, the KL of
ours against SAELens's as a paired difference over the same contexts with its standard error (a
difference of a few % needs ~16k tokens to resolve, and may still change with the text). tokens/s is
end to end per trainer call (initialisation included), and only ratios within one run mean
anything on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import Tensor

from sae_lens_lite import runtime
from sae_lens_lite.data.cache import ActivationCache
from sae_lens_lite.evaluation.metrics import paired_difference, sae_pass
from sae_lens_lite.export import import_sae
from sae_lens_lite.runtime import resolve_device
from sae_lens_lite.training import recipes
from sae_lens_lite.training.recipes import jumprelu, matryoshka
from sae_lens_lite.training.sae import SAE, SAEConfig
from sae_lens_lite.training.train import (
    INIT_TOKENS,
    LAMBDA_WARMUP,
    LR_DECAY,
    LR_WARMUP,
    TARGET_START,
    TrainConfig,
    autocast_dtype,
    train_on_batches,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HELDOUT = "wikitext2-test.txt"
PENALTIES = ["topk", "l1", "batchtopk", "jumprelu", "matryoshka"]  # the recipes SAELens also trains
K_SET = ("topk", "batchtopk", "matryoshka")  # k sets the (mean) L0
STEERED = {"l1": "l1", "jumprelu": "l0_coef"}  # ours's λ is steered to SAELens's L0; the Setup field of the λ
HELD_L0 = "ours, held-out L0"  # the run of ours steered to SAELens's L0 on the held-out text
HELD_L0_TOLERANCE = 0.03  # ... made when the first run's held-out L0 is further than this from SAELens's
HELD_L0_RUNS = 3  # at most this many tries at it: the last one is the row


@dataclass
class Setup:
    """What both trainers get."""

    d_sae: int
    batch: int
    lr: float
    tokens: int
    penalty: str  # one of PENALTIES
    k: int = 32  # topk: per token; batchtopk, matryoshka: the batch's mean
    l1: float = 1.0
    l0_coef: float = 1.0  # jumprelu's λ
    seed: int = 0
    device: str = "cpu"


def epoch_batches(acts: Tensor, batch: int, seed: int) -> Callable[[int], Iterator[Tensor]]:
    """batches(epoch): full fp32 batches [batch, d_in] of a fresh permutation of acts [n, d_in]."""

    def batches(epoch: int) -> Iterator[Tensor]:
        perm = torch.randperm(len(acts), generator=torch.Generator().manual_seed(seed + epoch))
        for i in range(0, len(perm) - batch + 1, batch):
            yield acts[perm[i : i + batch].to(acts.device)].float()

    return batches


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ---- the two trainers ----------------------------------------------------------------------


def train_saelens(acts: Tensor, s: Setup):
    """SAELens's SAETrainer on acts [n, d_in]; returns (its trained SAE, seconds, settings)."""
    try:
        from sae_lens import SAETrainer
        from sae_lens.config import SAETrainerConfig
        from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
        from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
        from sae_lens.saes.matryoshka_batchtopk_sae import (
            MatryoshkaBatchTopKTrainingSAE,
            MatryoshkaBatchTopKTrainingSAEConfig,
        )
        from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
        from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    except ImportError:
        raise SystemExit(
            "this benchmark needs sae-lens: pip install 'sae_lens_lite[saelens]' (or make dev-venv)"
        ) from None

    steps = s.tokens // s.batch
    d_in = acts.shape[1]
    common = dict(d_in=d_in, d_sae=s.d_sae, device=s.device, normalize_activations="expected_average_only_in")
    warm = round(LAMBDA_WARMUP * steps)
    # Its options for each recipe; what is not named keeps SAELens's default.
    options = {
        "topk": dict(k=s.k),
        "l1": dict(l1_coefficient=s.l1, l1_warm_up_steps=warm),
        "batchtopk": dict(k=s.k),
        "matryoshka": dict(k=s.k, matryoshka_widths=matryoshka.prefixes(s.d_sae)),
        # Ours's threshold start and kernel width, in the units of pre-activations of unit-norm
        # decoder rows (W_enc = W_dec.T at the start in both): so the decoder starts at norm 1 too.
        "jumprelu": dict(
            l0_coefficient=s.l0_coef,
            l0_warm_up_steps=warm,
            jumprelu_bandwidth=jumprelu.BANDWIDTH,
            jumprelu_init_threshold=jumprelu.INIT_THRESHOLD,
            decoder_init_norm=recipes.RECIPES["jumprelu"].dec_norm,
        ),
    }[s.penalty]
    make, make_cfg = {
        "topk": (TopKTrainingSAE, TopKTrainingSAEConfig),
        "l1": (StandardTrainingSAE, StandardTrainingSAEConfig),
        "batchtopk": (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig),
        "matryoshka": (MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig),
        "jumprelu": (JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig),
    }[s.penalty]
    torch.manual_seed(s.seed)  # SAELens initialises from the global generator
    sae = make(make_cfg(**options, **common))
    cfg = SAETrainerConfig(
        total_training_samples=steps * s.batch,
        train_batch_size_samples=s.batch,
        lr=s.lr,
        device=s.device,
        lr_end=s.lr / 10,  # what its runner config sets; the "constant" schedule ignores it
        lr_warm_up_steps=max(1, round(LR_WARMUP * steps)),
        lr_decay_steps=max(1, round(LR_DECAY * steps)),
        n_batches_for_norm_estimate=math.ceil(INIT_TOKENS / s.batch),  # the same sample as our input scale
    )
    batches = epoch_batches(acts, s.batch, s.seed)

    def provider() -> Iterator[Tensor]:  # SAELens's DataProvider: an endless iterator of batches
        epoch = 0
        while True:
            yield from batches(epoch)
            epoch += 1

    sync(s.device)
    t = time.perf_counter()
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=provider())
    sae = trainer.fit()
    sync(s.device)
    seconds = time.perf_counter() - t
    settings = {
        "dtype": sae.cfg.dtype,
        "autocast": cfg.autocast,
        "optimizer": "torch.optim.Adam (not fused)",
        "normalize_activations": "expected_average_only_in (folded into the weights after training)",
        "init": f"b_dec = 0, W_dec rows at norm {sae.cfg.decoder_init_norm}, W_enc = W_dec.T",
        **options,
    }
    if s.penalty in K_SET:
        settings.update(
            rescale_acts_by_decoder_norm=sae.cfg.rescale_acts_by_decoder_norm,
            aux_loss_coefficient=sae.cfg.aux_loss_coefficient,
            dead_feature_window_steps=cfg.dead_feature_window,
        )
    if s.penalty in ("batchtopk", "matryoshka"):
        settings.update(topk_threshold_lr=sae.cfg.topk_threshold_lr)
    if s.penalty == "matryoshka":
        settings.update(use_matryoshka_aux_loss=sae.cfg.use_matryoshka_aux_loss)
    if s.penalty == "jumprelu":
        settings.update(
            jumprelu_sparsity_loss_mode=sae.cfg.jumprelu_sparsity_loss_mode,
            jumprelu_ste_to_input=sae.cfg.jumprelu_ste_to_input,
        )
    return sae, seconds, settings


def train_ours(acts: Tensor, s: Setup, precision: str, target_l0: float = 0.0) -> tuple[SAE, float]:
    """train_on_batches on acts [n, d_in]; returns (the SAE, seconds)."""
    d_in = acts.shape[1]
    # Steered to SAELens's L0, our λ starts at TARGET_START × its coefficient: scaled so that it
    # starts at SAELens's λ, which reached that L0 (from 1% of it, a short run would not get there).
    start = 1 / TARGET_START if target_l0 else 1.0
    cfg = TrainConfig(
        penalty=s.penalty,
        expansion=s.d_sae // d_in,
        k=s.k,
        l1=s.l1 * start,
        l0_coef=s.l0_coef * start,
        target_l0=target_l0,
        lr=s.lr,
        batch_size=s.batch,
        tokens=s.tokens,
        seed=s.seed,
        device=s.device,
        precision=precision,
    )
    sae_cfg = SAEConfig(d_in=d_in, d_sae=s.d_sae, **recipes.get(s.penalty, cfg).sae_options())
    sync(s.device)
    t = time.perf_counter()
    sae = train_on_batches(sae_cfg, cfg, epoch_batches(acts, s.batch, s.seed), s.tokens, progress=False)
    sync(s.device)
    return sae, time.perf_counter() - t


def through_our_import(saelens_sae, out: Path) -> SAE:
    """SAELens's trained SAE saved by SAELens (its inference format), read back by export.import_sae."""
    shutil.rmtree(out, ignore_errors=True)
    saelens_sae.save_inference_model(str(out))
    return import_sae(out)


def saelens_reference(saelens_sae, penalty: str, out: Path):
    """What SAELens itself computes with its trained SAE at inference: the SAE, or for batchtopk and
    matryoshka (whose training forward keeps the batch's k·n largest) the JumpReLU with one
    threshold it saved to `out`, read back by SAELens."""
    if penalty not in ("batchtopk", "matryoshka"):
        return saelens_sae
    from sae_lens import SAE as SAELensSAE

    return SAELensSAE.load_from_disk(str(out), device=str(saelens_sae.W_enc.device))


@torch.no_grad()
def check_import(saelens_sae, ours: SAE, x: Tensor) -> float:
    """Largest relative difference between SAELens's own reconstruction and the imported SAE's."""
    ref = saelens_sae.to(x.device).eval()(x.to(saelens_sae.W_enc.dtype)).float()
    got = ours.to(x.device)(x).x_hat.float()
    return float((ref - got).norm(dim=1).max() / ref.norm(dim=1).mean())


def score(sae: SAE, x: Tensor) -> dict:
    """Explained variance, L0 and never-firing fraction of sae on x [n, d_in] (metrics.sae_pass, as evaluate)."""
    scored = sae_pass(sae.to(x.device).eval(), x)
    r, sp = scored.reconstruction, scored.sparsity
    return {"ev": r["explained_variance"], "l0": sp["l0"], "dead": sp["dead_fraction"]}


def compare(
    acts: Tensor, heldout: Tensor, s: Setup, work: Path, fp32: bool = True
) -> tuple[list[dict], dict[str, SAE]]:
    """Train SAELens and ours (default precision, and float32 if fp32) on acts [n, d_in] under setup s;
    score each on heldout [m, d_in]. Returns (rows, {name: our-format SAE})."""
    label = f"{s.penalty} k={s.k}" if s.penalty in K_SET else s.penalty
    print(f"--- {label}: SAELens", flush=True)
    lens, seconds, settings = train_saelens(acts, s)
    saved = work / f"{s.penalty}_{s.k}_saelens_dir"
    imported = through_our_import(lens, saved)
    err = check_import(saelens_reference(lens, s.penalty, saved), imported, heldout[:512])
    if err > 1e-3:
        raise RuntimeError(
            f"SAELens's SAE read back through our import reconstructs differently (relative error {err:.2g})"
        )
    steps = s.tokens // s.batch
    rows = [
        {
            "penalty": label,
            "trainer": "SAELens",
            "precision": "float32" if settings["autocast"] is False else "bf16 autocast",
            "tok_s": steps * s.batch / seconds,
            "settings": settings,
            **score(imported, heldout),
        }
    ]
    saes = {"SAELens": imported}
    # L1, JumpReLU: our λ is steered to the L0 SAELens reached on the training activations, so EV and KL
    # compare at one L0.
    sample = acts[:16384].float()  # the training activations' L0 is measured on these
    target = score(imported, sample)["l0"] if s.penalty in STEERED else 0.0
    amp = autocast_dtype("auto", torch.device(s.device))
    runs = [("ours", "auto", 1.0)] + ([("ours fp32", "float32", 1.0)] if fp32 and amp is not None else [])
    if target:
        # Matching L0 on the training sample need not match it on the held-out text, where EV and KL
        # are measured: more runs of ours, their targets moved until the held-out L0 is SAELens's.
        runs.insert(1, (HELD_L0, "auto", None))
    for name, precision, scale in runs:
        if scale is not None:
            print(f"--- {label}: {name}", flush=True)
            sae, seconds = train_ours(acts, s, precision, target * scale)
        else:
            found = held_out_l0_run(acts, heldout, s, target, rows[1]["l0"], rows[0]["l0"], label)
            if found is None:
                continue
            sae, seconds, scale = found
        settings = {"precision": precision, "sparse": True}
        if target:
            coef = STEERED[s.penalty]
            settings.update(
                {
                    f"{coef}_start": getattr(s, coef),
                    "target_l0": round(target * scale, 2),
                    f"{coef}_final": round(sae.cfg.meta["final_metrics"]["lam"], 4),
                    "train_l0": round(score(sae, sample)["l0"], 2),
                }
            )
        prec = "float32" if precision == "float32" or amp is None else "bf16 autocast"
        rows.append(
            {
                "penalty": label,
                "trainer": name,
                "precision": prec,
                "tok_s": steps * s.batch / seconds,
                "settings": settings,
                **score(sae, heldout),
            }
        )
        saes[name] = sae
    return rows, saes


def held_out_l0_run(
    acts: Tensor, heldout: Tensor, s: Setup, target: float, got: float, want: float, label: str
) -> tuple[SAE, float, float] | None:
    """Up to HELD_L0_RUNS runs of ours whose targets move until the held-out L0 is `want`
    (SAELens's) within HELD_L0_TOLERANCE, after a first run that steered to `target` and reached
    `got` there; None if that one already did. The first move is proportional; later ones follow
    the secant through the last two runs in log L0 (the held-out L0 does not move in proportion to
    the target). Returns the (SAE, seconds, target scale) of the run that came closest."""
    tried = [(1.0, got, None, None)]  # (target scale, held-out L0, SAE, seconds)
    while abs(tried[-1][1] / want - 1) > HELD_L0_TOLERANCE and len(tried) <= HELD_L0_RUNS:
        s0, l0 = tried[-1][:2]
        power = 1.0  # held-out L0 ∝ target^power, proportional until two runs say otherwise
        if len(tried) > 1:
            s1, l1 = tried[-2][:2]
            if s1 != s0 and l1 != l0 and math.log(l0 / l1) / math.log(s0 / s1) > 0.1:
                power = math.log(l0 / l1) / math.log(s0 / s1)
        scale = s0 * (want / l0) ** (1 / power)
        print(f"--- {label}: {HELD_L0} (target {target * scale:.1f})", flush=True)
        sae, seconds = train_ours(acts, s, "auto", target * scale)
        tried.append((scale, score(sae, heldout)["l0"], sae, seconds))
    if len(tried) == 1:
        return None
    scale, _, sae, seconds = min(tried[1:], key=lambda t: abs(math.log(t[1] / want)))
    return sae, seconds, scale


# ---- CE / KL through our evaluate -----------------------------------------------------------


def add_ce(
    rows: list[dict],
    saes: dict[str, SAE],
    manifest: dict,
    acts_dir: Path,
    work: Path,
    eval_tokens: int,
    lm,
    device: str,
) -> None:
    """CE loss recovered and KL by our evaluate on held-out WikiText-2, for each SAE of one setting."""
    from sae_lens_lite.evaluation.evaluate import EvalConfig, evaluate

    for row in rows:
        sae = saes[row["trainer"]]
        sae.cfg = replace(
            sae.cfg,
            model=manifest["model"],
            hook=manifest["hook"],
            context_length=manifest["context_length"],
            meta={**sae.cfg.meta, "acts": str(acts_dir), "filters": manifest.get("filters")},
        )
        d = work / f"{row['penalty'].replace(' ', '_').replace('=', '')}_{row['trainer'].replace(' ', '_')}"
        shutil.rmtree(d, ignore_errors=True)
        sae.save(d)
        r = evaluate(
            EvalConfig(
                sae=str(d),
                dataset=str(DATA / HELDOUT),
                tokens=eval_tokens,
                skip_tokens=0,
                baselines=False,
                device=device,
                overwrite=True,
            ),
            lm=lm,
        )
        row.update(
            ce_rec=r["ce"]["sae_recovered"],
            kl=r["ce"]["kl_sae"],
            kl_contexts=r["per_context"]["kl_sae"],  # the same contexts for every SAE: paired
            ce_l0=r["sparsity"]["l0"],
        )


# ---- output ---------------------------------------------------------------------------------


def table(rows: list[dict]) -> str:
    """Markdown: one row per (setting, trainer), then ours/SAELens for each of our rows."""
    ce = any("kl" in r for r in rows)
    head = ["setting", "trainer", "precision", "tok/s", "EV", "L0", "never fire"] + (
        ["CE loss recovered", "KL"] if ce else []
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["penalty"],
            r["trainer"],
            r["precision"],
            f"{r['tok_s']:,.0f}",
            f"{r['ev']:.4f}",
            f"{r['l0']:.1f}",
            f"{r['dead']:.2%}",
        ]
        if ce:
            cells += [f"{r['ce_rec']:.4f}", f"{r['kl']:.4f}"] if "kl" in r else ["", ""]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "| setting | ours / SAELens | tok/s | EV | L0 | never fire |" + (" KL |" if ce else ""),
        "|" + "---|" * (6 + ce),
    ]
    for r in rows:
        if r["trainer"] == "SAELens":
            base = r
            continue
        cells = [
            r["penalty"],
            r["trainer"],
            f"**{r['tok_s'] / base['tok_s']:.2f}x**",
            f"{r['ev']:.4f} vs {base['ev']:.4f}",
            f"{r['l0']:.1f} vs {base['l0']:.1f}",
            f"{r['dead']:.2%} vs {base['dead']:.2%}",
        ]
        if ce:
            cells.append(
                f"{r['kl']:.4f} vs {base['kl']:.4f}{kl_difference(r, base)}" if "kl" in r and "kl" in base else ""
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def kl_difference(r: dict, base: dict) -> str:
    """' (±x% ± y%)': r's KL over base's − 1, with the standard error of the mean per-context
    difference (paired: both SAEs were scored on the same contexts) over base's KL."""
    d = paired_difference(r.get("kl_contexts", []), base.get("kl_contexts", []))
    if d is None:
        return ""
    return f" ({d['mean'] / base['kl']:+.1%} ± {d['se'] / base['kl']:.1%})"


def harvest_caches(
    out: Path, hook: str, tokens: int, heldout_tokens: int, device: str, acts: str | None
) -> tuple[Path, Path]:
    """The training cache (`acts`, or harvested from every shared corpus but WikiText-2 test) and a
    held-out one (WikiText-2 test) at its hook; harvests are reused when complete."""
    from sae_lens_lite.data.harvest import HarvestConfig, harvest

    if acts:
        hook = ActivationCache.open(acts).manifest["hook"]
    else:
        corpus = out / "corpus"  # a directory of .txt files = one document each
        corpus.mkdir(parents=True, exist_ok=True)
        for f in sorted(DATA.glob("*.txt")):
            if f.name != HELDOUT and not (corpus / f.name).exists():
                (corpus / f.name).symlink_to(f)
        acts = harvest(
            HarvestConfig(hooks=[hook], dataset=str(corpus), tokens=tokens, out=str(out / "acts"), device=device)
        )[hook]
    held = harvest(
        HarvestConfig(
            hooks=[hook],
            dataset=str(DATA / HELDOUT),
            tokens=heldout_tokens,
            out=str(out / "heldout_acts"),
            device=device,
        )
    )[hook]
    return Path(acts), held


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench_peer", help="working directory: caches, SAEs, evaluation reports")
    p.add_argument("--acts", default=None, help="train on this activation cache instead of harvesting one")
    p.add_argument("--hook", default="blocks.6.hook_resid_post")
    p.add_argument(
        "--harvest-tokens", type=int, default=131_072, help="tokens harvested for the training cache (without --acts)"
    )
    p.add_argument(
        "--heldout-tokens",
        type=int,
        default=32_768,
        help="WikiText-2 test tokens harvested to score EV, L0 and never-firing latents",
    )
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--tokens", type=int, default=409_600, help="training tokens per SAE, the same for both trainers")
    p.add_argument("--penalties", nargs="+", default=["topk", "l1"], choices=PENALTIES)
    p.add_argument(
        "--k",
        type=int,
        nargs="+",
        default=[32],
        help="TopK: latents per token; BatchTopK, Matryoshka: their mean; several give one comparison each "
        "(the frontier)",
    )
    p.add_argument(
        "--l1", type=float, default=1.0, help="L1: λ for SAELens, and ours's starting λ (then steered to SAELens's L0)"
    )
    p.add_argument(
        "--l0-coef",
        type=float,
        default=1.0,
        help="JumpReLU: λ of the L0 penalty for SAELens (1: its default and ours), and ours's starting λ "
        "(then steered to SAELens's L0)",
    )
    p.add_argument("--no-fp32", action="store_true", help="skip the run of ours forced to float32")
    p.add_argument(
        "--ce", action="store_true", help="also CE loss recovered and KL by our evaluate on held-out WikiText-2"
    )
    p.add_argument(
        "--eval-tokens",
        type=int,
        default=16384,
        help="WikiText-2 test tokens for --ce (at 4,096 TopK's KL difference of a few %% changed sign with the text)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (0: torch's default); 1 on a machine shared with other jobs",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = str(resolve_device(args.device))
    out = Path(args.out)
    t0 = time.perf_counter()
    acts_dir, held_dir = harvest_caches(out, args.hook, args.harvest_tokens, args.heldout_tokens, device, args.acts)
    t_harvest = time.perf_counter() - t0
    cache = ActivationCache.open(acts_dir)
    acts = cache.load(("activations",))["activations"].to(device)  # [n, d_in], as stored (bf16)
    heldout = ActivationCache.open(held_dir).load(("activations",))["activations"].float().to(device)  # [m, d_in]
    d_in = cache.d_model

    import sae_lens

    lm = None
    if args.ce:
        from sae_lens_lite.data.models import load_model

        lm = load_model(cache.manifest["model"], device)
    rows = []
    for penalty in args.penalties:
        for k in args.k if penalty in K_SET else [args.k[0]]:
            s = Setup(
                d_sae=args.expansion * d_in,
                batch=args.batch,
                lr=args.lr,
                tokens=args.tokens,
                penalty=penalty,
                k=k,
                l1=args.l1,
                l0_coef=args.l0_coef,
                device=device,
            )
            r, saes = compare(acts, heldout, s, out / "saes", fp32=not args.no_fp32)
            if args.ce:
                add_ce(r, saes, cache.manifest, acts_dir, out / "saes", args.eval_tokens, lm, device)
            rows += r

    name = torch.cuda.get_device_name() if device.startswith("cuda") else runtime.cpu_description()
    print(
        f"\n{cache.manifest['model']} {cache.manifest['hook']}: {cache.n_tokens:,} cached tokens "
        f"({acts_dir}); d_in {d_in}, "
        f"{args.expansion}x = {args.expansion * d_in} latents, batch {args.batch}, lr {args.lr}, "
        f"{args.tokens // args.batch * args.batch:,} tokens per SAE"
    )
    print(
        f"device: {name}; torch {torch.__version__}; sae-lens {sae_lens.__version__}; harvest "
        f"{t_harvest:.0f} s, total {time.perf_counter() - t0:.0f} s"
    )
    print(
        f"scored on {len(heldout):,} held-out activations of {HELDOUT}"
        + (f"; CE/KL on {args.eval_tokens} tokens of it" if args.ce else "")
    )
    for r in rows:
        print(f"  {r['penalty']}, {r['trainer']}: {r['settings']}")
    print()
    print(table(rows))
    if args.json:
        Path(args.json).write_text(
            json.dumps({"args": vars(args), "device": name, "sae_lens": sae_lens.__version__, "rows": rows}, indent=2)
        )


if __name__ == "__main__":
    main()
