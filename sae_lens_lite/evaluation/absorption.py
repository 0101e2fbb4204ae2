"""Feature absorption and feature splitting on the first-letter task (Chanin et al. 2024; SAEBench).

    vocabulary words (alphabetic tokens), each in an in-context prompt
        "\\n cat has the first letter: C\\n ... \\n{word} has the first letter:"
    → the model's activation x at the word's token → a linear probe for each first letter (the
      ground truth) and the SAE's latents f = encode(x)
    → each letter's main latents: the k-sparse probe (latents most above the rest for the letter)
      grown while its F1 rises by more than 0.03 per added latent; their number is the split count
    → for each word the probe gets right, the share of the probe's projection that latents other
      than the main ones carry while the main ones fall short: the absorption fraction

Definitions in docs/metrics.md. Everything past the prompts works on tensors, so tests can plant
an absorbing dictionary and read the planted rate back.
"""

from __future__ import annotations

import inspect
import random
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from sae_lens_lite.data.models import LoadedModel, StopForward, capture
from sae_lens_lite.evaluation.probing import Encode, fit_logistic, predict, top_mean_diff

LETTERS = "abcdefghijklmnopqrstuvwxyz"
TEMPLATE = "{word} has the first letter:"
# SAEBench's thresholds (evals/absorption): a letter counts when its probe's F1 >= 0.6, and absorption
# is measured only when at least 20 letters count.
MIN_PROBE_F1 = 0.6
MIN_LETTERS = 20
F1_JUMP = 0.03  # a latent joins the main set while it raises the k-sparse probe's F1 by more than this
MAX_SPLIT = 10
ABSORBER_COS = 0.1  # a latent may absorb only if its decoder row's cosine with the probe is at least this
FULL_COS = 0.025  # full absorption: the top projecting latent's cosine with the probe
PROJ_SHARE = 0.4  # absorbers must carry at least this share of the activation's projection on the probe
MAX_ABSORBERS = 3
WORDS_PER_DRAW = 16  # words that share one draw of in-context examples (word_activations)


# ---- prompts ------------------------------------------------------------------------------


def vocabulary_words(tokenizer, per_letter: int, seed: int = 0) -> list[tuple[int, str]]:
    """(token id, text) of up to per_letter alphabetic tokens per first letter (an optional leading
    space allowed), sampled with `seed`."""
    by_letter: dict[str, list[tuple[int, str]]] = {c: [] for c in LETTERS}
    for i in range(len(tokenizer)):
        text = tokenizer.decode([i])
        word = text[1:] if text.startswith(" ") else text
        if word and word.isascii() and word.isalpha():
            by_letter[word[0].lower()].append((i, text))
    rng = random.Random(seed)
    out = []
    for c in LETTERS:
        words = sorted(by_letter[c])
        out += rng.sample(words, min(per_letter, len(words)))
    return out


def icl_prefix(tokenizer, examples: list[str]) -> list[int]:
    """The in-context examples as token ids, ending where the word goes (SAEBench's template, its
    separator also before the first example)."""
    shots = "".join(f"\n{w} has the first letter: {w.strip()[0].upper()}" for w in examples) + "\n"
    return tokenizer(shots, add_special_tokens=False).input_ids


@torch.inference_mode()
def word_activations(
    lm: LoadedModel, hook: str, words: list[tuple[int, str]], n_examples: int, batch_size: int, seed: int, device
) -> Tensor:
    """The activation at `hook` on each word's token, the word placed after n_examples in-context
    examples and followed by " has the first letter:" → [n_words, d_in].

    The words of one batch share one random draw of examples (none of them among it; SAEBench
    draws per word): the examples run once, their keys and values are reused for every word, and
    a word then costs its few tokens instead of the whole prompt. The word enters as its own token
    id, so its position needs no re-tokenising."""
    from transformers import DynamicCache

    rng = random.Random(seed)
    texts = [w for _, w in words]
    tail = lm.tokenizer(TEMPLATE.format(word=""), add_special_tokens=False).input_ids  # " has the first letter:"
    out = torch.zeros(len(words), lm.d_model)
    for s in tqdm(range(0, len(words), batch_size), desc="first_letter: words", unit="batch", leave=False):
        batch = words[s : s + batch_size]
        mine = {w for _, w in batch}
        prefix = icl_prefix(lm.tokenizer, rng.sample([t for t in texts if t not in mine], n_examples))
        cache = DynamicCache()
        _forward(lm, hook, torch.tensor([prefix], device=device), cache)
        cache.batch_repeat_interleave(len(batch))
        rows = torch.tensor([[wid, *tail] for wid, _ in batch], device=device)  # [b, 1 + len(tail)]
        out[s : s + len(batch)] = _forward(lm, hook, rows, cache)[:, 0].float().cpu()
    return out


def _forward(lm: LoadedModel, hook: str, ids: Tensor, cache) -> Tensor:
    """The activation at `hook` [b, T, d] of ids [b, T] after what `cache` holds; the forward stops there."""
    # transformers 5 renames past_key_values to cache
    name = "cache" if "cache" in inspect.signature(lm.model.forward).parameters else "past_key_values"
    with capture(lm.model, [hook]) as acts:
        try:
            lm.model(input_ids=ids, use_cache=True, **{name: cache})
        except StopForward:
            pass
    return acts[hook]


def letter_labels(words: list[tuple[int, str]]) -> Tensor:
    """Each word's first letter as 0..25 → [n_words]."""
    return torch.tensor([LETTERS.index(w.strip()[0].lower()) for _, w in words])


# ---- metrics on tensors -------------------------------------------------------------------


def f1(pred: Tensor, truth: Tensor) -> float:
    """F1 of boolean predictions [n] against boolean truth [n] (0 when nothing is predicted or true)."""
    tp = float((pred & truth).sum())
    denom = float(pred.sum() + truth.sum())
    return 2 * tp / denom if denom else 0.0


def split_latents(f_train: Tensor, y_train: Tensor, f_test: Tensor, y_test: Tensor) -> tuple[list[int], list[float]]:
    """A letter's main latents: for k = 1, 2, ... the k latents most above the rest for the letter
    (train split) under a k-sparse probe; k grows while the test F1 rises by more than F1_JUMP
    (SAEBench's rule). → (main latents, the F1 at each k tried)."""
    best, main, f1s = -1.0, [], []
    for k in range(1, MAX_SPLIT + 1):
        idx = top_mean_diff(f_train, y_train, k, signed=True)
        w, b = fit_logistic(f_train[:, idx], y_train, balanced=True)
        score = f1(predict(f_test[:, idx], w, b)[:, 0] > 0, y_test.bool())
        f1s.append(score)
        if score <= best + F1_JUMP:
            break
        best, main = score, idx.tolist()
    return main, f1s


def absorption_fractions(x: Tensor, f: Tensor, decoder: Tensor, probe: Tensor, main: list[int]):
    """SAEBench's absorption fraction and full-absorption flag of each token.

    x [n, d_in] activations, f [n, d_sae] latents, decoder [d_sae, d_in] each latent's direction in
    the model's units (its contribution is f_i · decoder_i), probe [d_in] the letter's probe
    direction, main the letter's main latents. With p = probe/‖probe‖:
        a = ⟨x, p⟩, m = Σ_main f_i⟨decoder_i, p⟩, A = the sum of the 3 largest positive f_i⟨decoder_i, p⟩
        over other latents whose decoder has cosine ≥ 0.1 with p;
        fraction = 0 if m ≥ a or A < 0.4·a (or a ≤ 0), 1 if m ≤ 0, else min(A, a − m) / (min(A, a − m) + m).
    Full absorption: no main latent fires, and the latent projecting most on p has cosine ≥ 0.025
    with it and carries ≥ 0.4·a. → (fraction [n], full [n] bool)."""
    p = probe.float() / probe.float().norm()
    along = decoder.float() @ p  # [d_sae], each latent's unit contribution along p
    cos = along / decoder.float().norm(dim=1).clamp(min=1e-12)
    contrib = f.float() * along  # [n, d_sae]
    a = x.float() @ p  # [n]
    m = contrib[:, main].sum(1) if main else torch.zeros_like(a)
    allowed = (cos >= ABSORBER_COS).expand_as(contrib).clone()
    allowed[:, main] = False
    cand = torch.where(allowed & (contrib > 0), contrib, torch.zeros_like(contrib))
    A = cand.topk(min(MAX_ABSORBERS, cand.shape[1]), dim=1).values.sum(1)  # [n]
    absorbed = torch.minimum(A, a - m)
    partial = (absorbed / (absorbed + m)).clamp(0, 1)
    frac = torch.where(m <= 0, torch.ones_like(a), partial)
    frac = torch.where((m >= a) | (A < PROJ_SHARE * a) | (a <= 0), torch.zeros_like(a), frac)
    top = contrib.argmax(1)  # [n]
    silent = (f[:, main] <= 1e-8).all(1) if main else torch.ones_like(a, dtype=torch.bool)
    full = silent & (cos[top] >= FULL_COS) & (a > 0) & (contrib.gather(1, top[:, None])[:, 0] >= PROJ_SHARE * a)
    return frac, full


@dataclass
class FirstLetterData:
    """The first-letter task on tensors: activations, the SAE's latents and labels, per split."""

    x_train: Tensor  # [n, d_in]
    f_train: Tensor  # [n, d_sae]
    y_train: Tensor  # [n] class index
    x_test: Tensor
    f_test: Tensor
    y_test: Tensor
    n_classes: int = len(LETTERS)


def absorption_scores(data: FirstLetterData, decoder: Tensor, min_letters: int = MIN_LETTERS) -> dict:
    """Per letter: the probe's F1, the main latents, the mean absorption fraction and full-absorption
    rate over the test words the probe gets right; and their means over letters whose probe F1 ≥ 0.6.
    When fewer than min_letters letters have such a probe, the means are None and `reason` says why."""
    onehot = torch.nn.functional.one_hot(data.y_train, data.n_classes)  # [n, n_classes]
    w, b = fit_logistic(data.x_train, onehot, balanced=True)  # the ground-truth probes, w [d_in, n_classes]
    scores = predict(data.x_test, w, b)  # [n_test, n_classes]
    letters = []
    for c in range(data.n_classes):
        truth = data.y_test == c
        row: dict[str, Any] = {
            "letter": LETTERS[c] if data.n_classes == len(LETTERS) else str(c),
            "n_test": int(truth.sum()),
        }
        row["probe_f1"] = f1(scores[:, c] > 0, truth)
        row["main_latents"], row["k_sparse_f1"] = split_latents(
            data.f_train, (data.y_train == c).long(), data.f_test, (data.y_test == c).long()
        )
        hit = truth & (scores[:, c] > 0)  # the probe's true positives
        row["n_probe_true_positives"] = int(hit.sum())
        if hit.any():
            frac, full = absorption_fractions(data.x_test[hit], data.f_test[hit], decoder, w[:, c], row["main_latents"])
            row["absorption_fraction"], row["full_absorption_rate"] = float(frac.mean()), float(full.double().mean())
        letters.append(row)
    counted = [r for r in letters if r["probe_f1"] >= MIN_PROBE_F1 and "absorption_fraction" in r]
    out = {"letters": letters, "n_letters_counted": len(counted), "min_letters": min_letters}
    if len(counted) < min_letters:
        out |= {"absorption_fraction": None, "full_absorption_rate": None, "split_latents": None}
        out["reason"] = (
            f"the model's first-letter probe reaches F1 >= {MIN_PROBE_F1} on only {len(counted)} of "
            f"{data.n_classes} letters (SAEBench asks {min_letters}): too small a model for absorption to mean anything"
        )
        return out
    for key in ("absorption_fraction", "full_absorption_rate"):
        out[key] = sum(r[key] for r in counted) / len(counted)
    out["split_latents"] = sum(len(r["main_latents"]) for r in counted) / len(counted)
    return out


def first_letter_data(x: Tensor, y: Tensor, encode: Encode, test_fraction: float = 0.25, seed: int = 0):
    """FirstLetterData from word activations x [n, d_in] and letters y [n]: a random split by word."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    n_test = int(len(x) * test_fraction)
    te, tr = perm[:n_test], perm[n_test:]
    with torch.inference_mode():
        f = encode(x)
    return FirstLetterData(x[tr], f[tr], y[tr], x[te], f[te], y[te])
