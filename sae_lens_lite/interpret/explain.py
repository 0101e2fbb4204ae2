"""Feature explanations, scored on held-out tokens (definitions and reasoning: docs/analysis.md).

The cache's contexts are split in two: explanations are read from the *explain* part and scored
on the *held-out* part only, so a score never reuses the examples that produced its explanation.

Built-in explainer (deterministic, every feature): a pattern over (previous token, token) pairs,
tokens compared up to case and spacing. Three kinds are tried on the explain part: a set of
tokens ("the tokens "(" or "[""), a set of previous tokens ("the token after "def""), and a set of
(previous, token) pairs (""the" after "of""); the kind and the set with the best F1 win, a
context kind only when it beats the token kind clearly. Because every pattern is a union of
(previous, token) pairs, its precision, recall and F1 over *every* held-out token follow exactly
from sparse counts: how often each pair occurs, and how often the feature fires on it. Given the
rows' context (contexts.py), three context kinds follow: an attribute such as "inside
parentheses", a token within the last n, a set of tokens where an attribute holds; each replaces
the best so far only when its explain-split F1 is higher by CONTEXT_MARGIN, and is counted exactly
on the held-out rows from the rows each feature fires on.

Model explainer (opt-in, `--explain-top N`): a local instruct model reads activating contexts
drawn across activation quantiles of the explain part, the activating tokens marked, and writes a
phrase; it is then asked yes/no whether the feature fires in held-out contexts (activating ones
from every quantile and as many random ones where it never fires), scored by balanced accuracy
(OpenAI, "Language models can explain neurons in language models", 2023; EleutherAI delphi's
detection score). Results are cached per feature in a file rewritten atomically, so an interrupted
run resumes.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from sae_lens_lite.fsutil import write_text_atomic
from sae_lens_lite.interpret import contexts
from sae_lens_lite.interpret.contexts import RowContext

MAX_ITEMS = 5  # a pattern lists at most this many tokens or pairs: longer is not a readable phrase
MIN_GAIN = 0.02  # an item must raise F1 by this much: rare tokens that happen to fit stay out of the phrase
CONTEXT_MARGIN = 0.05  # a context pattern must beat the token pattern's F1 by this much (simpler wins)
N_QUANTILES = 4  # activation quantiles of the examples shown and given to the model
SAMPLE = 32  # firings sampled uniformly per feature and split, for the quantile examples
KINDS = ("token", "after", "pair")
CONTEXT_KINDS = ("attribute", "window", "token_in")  # contexts.py
TOKEN_IN_ATTRIBUTES = 3  # attributes tried for "tokens where an attribute holds"
PROMPT_VERSION = 1


def heldout_rows(doc: Tensor, share: float) -> Tensor:
    """[n_rows] bool: the rows of the held-out contexts, a fixed pseudo-random `share` of them."""
    u = torch.rand(int(doc.max()) + 1, generator=torch.Generator().manual_seed(0))
    return u[doc.long()] < share


# ---- counts, gathered while pass 1 streams the cache ---------------------------------------------


class PatternCounts:
    """Sparse counts per split (0 explain, 1 held-out) of the (feature, previous token, token)
    triples where the feature fires, and a uniform sample of each feature's firings per split.

    cur, prev [n_rows] canonical token ids; prev is n_vocab where there is no previous token
    (the context's first kept row). The triple (j, p, t) is stored as j·B² + p·B + t, B = n_vocab + 1."""

    def __init__(self, cur: Tensor, prev: Tensor, heldout: Tensor, n_vocab: int, d_sae: int, sample: int = SAMPLE):
        self.B = n_vocab + 1
        self.pair = prev.long() * self.B + cur.long()  # [n_rows]
        self.split = heldout.long()
        self.d_sae = d_sae
        self.parts: list[list[tuple[Tensor, Tensor]]] = [[], []]
        self.sample_pri = torch.full((2, d_sae, sample), -1.0)  # random priorities; the top ones are a uniform sample
        self.sample_rows = torch.full((2, d_sae, sample), -1, dtype=torch.long)
        self.sample_vals = torch.zeros(2, d_sae, sample)
        self.fired: list[tuple[Tensor, Tensor]] = []  # (feature, row) of every firing, for context patterns
        self.gen = torch.Generator().manual_seed(0)
        self.seconds = self.cpu_seconds = 0.0  # time spent here (wall, CPU), to report the cost apart from pass 1

    @torch.no_grad()
    def update(self, start: int, f: Tensor) -> None:
        """f [b, d_sae]: the latents of rows start .. start + b."""
        t0, c0 = time.perf_counter(), time.process_time()
        f = f.cpu()
        fired = f > 0
        r, c = fired.nonzero(as_tuple=True)
        rows = r + start
        key = c * self.B**2 + self.pair[rows]
        self.fired.append((c.int(), rows.int()))
        split = self.split[rows]
        pri = torch.rand(len(r), generator=self.gen)  # a random priority per firing
        for s in (0, 1):
            here = split == s
            k, n = key[here].unique(return_counts=True)
            self.parts[s].append((k, n))
            if len(self.parts[s]) >= 32:
                self.parts[s] = [_merge(self.parts[s])]
            self._sample(s, c[here], rows[here], f[r[here], c[here]], pri[here])
        self.seconds += time.perf_counter() - t0
        self.cpu_seconds += time.process_time() - c0

    def _sample(self, s: int, feat: Tensor, rows: Tensor, vals: Tensor, pri: Tensor) -> None:
        """Keep, per feature, the sampled firings with the largest priorities among the kept ones
        and these new ones (firings of `feat` at `rows`): a uniform sample without replacement."""
        P, R, V = self.sample_pri[s], self.sample_rows[s], self.sample_vals[s]  # [d_sae, m]
        d, m = P.shape
        feat = torch.cat([torch.arange(d).repeat_interleave(m), feat])
        p, r, v = torch.cat([P.flatten(), pri]), torch.cat([R.flatten(), rows]), torch.cat([V.flatten(), vals])
        order = (feat.double() * 4 - p.double()).argsort()  # by feature, then priority descending
        feat = feat[order]
        rank = torch.arange(len(order)) - torch.searchsorted(feat, torch.arange(d))[feat]
        keep = order[rank < m]  # every feature has m kept entries (absent ones at -1), so m survive
        P.copy_(p[keep].view(d, m))
        R.copy_(r[keep].view(d, m))
        V.copy_(v[keep].view(d, m))

    def finish(self) -> "Counts":
        t0, c0 = time.perf_counter(), time.process_time()
        triples = [
            _merge(p) if p else (torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)) for p in self.parts
        ]
        pairs = [_merge([self.pair[self.split == s].unique(return_counts=True)]) for s in (0, 1)]
        absent = self.sample_pri < 0
        self.sample_rows[absent], self.sample_vals[absent] = -1, 0.0
        feat = torch.cat([c for c, _ in self.fired]) if self.fired else torch.zeros(0, dtype=torch.int)
        rows = torch.cat([r for _, r in self.fired]) if self.fired else torch.zeros(0, dtype=torch.int)
        order = feat.argsort(stable=True)
        ptr = torch.cat([torch.zeros(1, dtype=torch.long), torch.bincount(feat.long(), minlength=self.d_sae).cumsum(0)])
        self.fired = []
        out = Counts(self.B, self.d_sae, triples, pairs, self.sample_rows, self.sample_vals)
        out.fire_ptr, out.fire_rows, out.split = ptr.numpy(), rows[order].numpy(), self.split.numpy()
        self.seconds += time.perf_counter() - t0
        self.cpu_seconds += time.process_time() - c0
        return out


def _merge(parts: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    keys, counts = torch.cat([k for k, _ in parts]), torch.cat([n for _, n in parts])
    u, inv = keys.unique(return_inverse=True)
    return u, torch.zeros(len(u), dtype=torch.long).index_add_(0, inv, counts)


@dataclass
class Counts:
    B: int  # n_vocab + 1; id n_vocab is "no previous token"
    d_sae: int
    triples: list[tuple[Tensor, Tensor]]  # per split: sorted keys j·B² + p·B + t, firing counts
    pairs: list[tuple[Tensor, Tensor]]  # per split: sorted keys p·B + t, occurrence counts
    sample_rows: Tensor  # [2, d_sae, SAMPLE] cache rows of sampled firings, -1 where absent
    sample_vals: Tensor  # [2, d_sae, SAMPLE] their activations
    unigram: list[tuple[Tensor, Tensor]] = field(
        default_factory=list
    )  # per split: occurrences of each token, of each previous token [B]
    fire_ptr: np.ndarray | None = None  # [d_sae + 1]: feature j fired at rows fire_rows[ptr[j]:ptr[j + 1]]
    fire_rows: np.ndarray | None = None  # [n_firings] cache rows, grouped by feature
    split: np.ndarray | None = None  # [n_rows] 0 explain, 1 held out

    def __post_init__(self):
        for keys, n in self.pairs:
            tok, prev = torch.zeros(self.B, dtype=torch.long), torch.zeros(self.B, dtype=torch.long)
            self.unigram.append((tok.index_add_(0, keys % self.B, n), prev.index_add_(0, keys // self.B, n)))

    def feature(self, split: int, j: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Feature j's firings in a split: previous ids, token ids, counts."""
        keys, n = self.triples[split]
        lo, hi = torch.searchsorted(keys, torch.tensor([j * self.B**2, (j + 1) * self.B**2])).tolist()
        pair = keys[lo:hi] % self.B**2
        return (pair // self.B).numpy(), (pair % self.B).numpy(), n[lo:hi].numpy()

    def fired_rows(self, split: int, j: int) -> np.ndarray:
        """The cache rows of a split where feature j fires."""
        assert self.fire_ptr is not None and self.fire_rows is not None and self.split is not None  # set by finish()
        rows = self.fire_rows[self.fire_ptr[j] : self.fire_ptr[j + 1]]
        return rows[self.split[rows] == split]

    def occurrences(self, split: int, kind: str, items: list[tuple[int, int]]) -> int:
        """How many tokens of a split the pattern matches (whether the feature fires or not)."""
        if kind == "token":
            return int(self.unigram[split][0][[t for _, t in items]].sum())
        if kind == "after":
            return int(self.unigram[split][1][[p for p, _ in items]].sum())
        keys, n = self.pairs[split]
        want = torch.tensor([p * self.B + t for p, t in items], dtype=torch.long)
        i = torch.searchsorted(keys, want).clamp(max=max(len(keys) - 1, 0))
        return int(torch.where(keys[i] == want, n[i], 0).sum()) if len(keys) else 0


# ---- the built-in explainer and its detection score ------------------------------------------------


def best_set(fire: np.ndarray, occur: np.ndarray, total: int) -> tuple[list[int], float]:
    """Greedy: add the item that raises F1 the most, up to MAX_ITEMS items, while F1 rises by
    at least MIN_GAIN →
    (indices of the chosen items, F1). An item raises F1 exactly when its precision is above F1/2;
    among those the greedy step takes the largest gain, so a sparse feature gets its few precise
    tokens and a dense one its frequent tokens (sorting by precision alone would cap a dense
    feature at five rare tokens)."""
    chosen: list[int] = []
    tp = pp = 0
    f1 = 0.0
    free = np.ones(len(fire), dtype=bool)
    while len(chosen) < MAX_ITEMS and free.any():
        gain = np.where(free, 2 * (tp + fire) / (pp + occur + total), -1.0)
        i = int(gain.argmax())
        if gain[i] < f1 + MIN_GAIN:
            break
        chosen.append(i)
        free[i] = False
        tp, pp, f1 = tp + fire[i], pp + occur[i], float(gain[i])
    return chosen, f1


NO_PATTERN = "no pattern: fires on tokens none of which it marks out"  # fires, but no item raises F1 enough


def find_pattern(counts: Counts, j: int, ctx: RowContext | None = None) -> tuple[str, list, float] | None:
    """Feature j's best pattern on the explain split: (kind, items, F1), or None when it never
    fires there. Items in a token pattern are (-1, t); in an after pattern (p, -1); in a pair
    pattern (p, t); context kinds (with `ctx`) are described in contexts.py. A feature no item
    explains (each would add less than MIN_GAIN to F1) gets ("", [], 0.0).

    Kinds are tried simplest first; a later kind replaces the best so far only when its F1 is
    higher by CONTEXT_MARGIN (after and pair only need to beat a token pattern by it): the
    simpler explanation wins a near tie, and the choice never looks at the held-out split."""
    prev, cur, n = counts.feature(0, j)
    total = int(n.sum())
    if total == 0:
        return None
    best = None
    for kind in KINDS:
        if kind == "pair":
            ids, fire = prev * counts.B + cur, n
            keys, occ = counts.pairs[0]
            occur = occ[torch.searchsorted(keys, torch.from_numpy(ids))].numpy()
        else:
            ids, inv = np.unique(cur if kind == "token" else prev, return_inverse=True)
            fire = np.bincount(inv, weights=n).astype(np.int64)
            occur = counts.unigram[0][0 if kind == "token" else 1][torch.from_numpy(ids)].numpy()
        picked, f1 = best_set(fire, occur, total)
        if not picked:
            continue
        chosen = ids[picked].tolist()
        if kind == "pair":
            items = [(int(k) // counts.B, int(k) % counts.B) for k in chosen]
        else:
            items = [(-1, int(t)) if kind == "token" else (int(t), -1) for t in chosen]
        margin = 0.0 if best is None or best[0] != "token" else CONTEXT_MARGIN
        if best is None or f1 > best[2] + margin:
            best = (kind, items, f1)
    if ctx is not None:
        for kind, items, f1 in context_patterns(counts, ctx, j, total):
            if items and f1 >= MIN_GAIN and (best is None or f1 > best[2] + CONTEXT_MARGIN):
                best = (kind, items, f1)
    return best or ("", [], 0.0)


def context_patterns(counts: Counts, ctx: RowContext, j: int, total: int) -> list[tuple[str, list, float]]:
    """Feature j's best pattern of each context kind on the explain split, simplest first:
    attribute(s), a token within the last n, a set of tokens where an attribute holds (tried for
    the TOKEN_IN_ATTRIBUTES attributes with the best F1 alone)."""
    rows = counts.fired_rows(0, j)
    attrs, f1_attr = contexts.best_attributes(ctx, rows, total)
    window, f1_win = contexts.best_window(ctx, rows, total)
    alone = 2 * np.bincount(np.nonzero(contexts.unpack(ctx.bits[rows]))[1], minlength=contexts.K)
    alone = alone / (ctx.attr_occ[0].diagonal() + total)
    tried = [int(a) for a in np.argsort(-alone)[:TOKEN_IN_ATTRIBUTES]]
    token_in, f1_in = contexts.best_token_in(ctx, rows, total, tried, best_set)
    return [
        ("attribute", [attrs], f1_attr),
        ("window", [window] if window else [], f1_win),
        ("token_in", token_in, f1_in),
    ]


def token_matches(kind: str, items: list, prev: np.ndarray, cur: np.ndarray, B: int) -> np.ndarray:
    """Where a token kind of pattern (items [[previous, token], ...]) holds, for tokens `cur`
    after `prev` (canonical ids; B - 1: no previous token)."""
    if kind == "token":
        return np.isin(cur, [t for _, t in items])
    if kind == "after":
        return np.isin(prev, [p for p, _ in items])
    return np.isin(prev * B + cur, [p * B + t for p, t in items])


def detection(counts: Counts, j: int, kind: str, items: list, split: int = 1, ctx: RowContext | None = None) -> dict:
    """Precision, recall and F1 of a pattern as a predictor of 'feature j fires here', over every
    token of a split; `score` is F1 with one imaginary miss each way, 2TP / (2TP + FP + FN + 2),
    so that a handful of held-out firings cannot rank above hundreds."""
    prev, cur, n = counts.feature(split, j)
    fires = int(n.sum())
    if kind in CONTEXT_KINDS:
        assert ctx is not None, "a context kind is only chosen with a RowContext"
        tp = int(ctx.matches(kind, items, counts.fired_rows(split, j)).sum())
        predicted = ctx.occurrences(split, kind, items)
    else:
        tp = int(n[token_matches(kind, items, prev, cur, counts.B)].sum())
        predicted = counts.occurrences(split, kind, items) if items else 0
    return {
        "precision": round(tp / predicted, 4) if predicted else None,
        "recall": round(tp / fires, 4) if fires else None,
        "f1": round(2 * tp / (predicted + fires), 4) if predicted + fires else None,
        "score": round(2 * tp / (predicted + fires + 2), 4),
        "fires": fires,
        "predicted": predicted,
        "hits": tp,
    }


def token_name(text: str) -> str:
    """A token's text for a phrase: stripped and quoted, whitespace named ("newline", "4 spaces")."""
    if text.strip():
        return json.dumps(text.strip(), ensure_ascii=False)
    if not text:
        return "an empty token"
    names = {"\n": "newline", " ": "space", "\t": "tab", "\r": "carriage return"}
    runs = [m.group() for m in re.finditer(r"(.)\1*", text, re.S)]  # "\n\n    " → "2 newlines + 4 spaces"
    if any(r[0] not in names for r in runs):
        return json.dumps(text)
    return " + ".join(names[r[0]] if len(r) == 1 else f"{len(r)} {names[r[0]]}s" for r in runs)


def phrase(kind: str, items: Sequence[Sequence[int]], name) -> str:
    """A readable phrase for a pattern; `name(id)` names a canonical token (the context start included)."""

    def alts(xs):
        xs = [name(x) for x in xs]
        return _or(xs)

    if kind in CONTEXT_KINDS:
        return contexts.phrase(kind, items, name, _or)
    if kind == "token":
        return alts([t for _, t in items])
    if kind == "after":
        return "the token after " + alts([p for p, _ in items])
    after: dict[int, list[int]] = {}  # token → the previous tokens it is listed after, in pattern order
    for p, t in items:
        after.setdefault(t, []).append(p)
    if len(after) > 1 and len({p for p, _ in items}) == 1:
        return f"{alts(list(after))} after {name(items[0][0])}"
    return ", or ".join(f"{name(t)} after {alts(ps)}" for t, ps in after.items())


def _or(xs: list[str]) -> str:
    return xs[0] if len(xs) == 1 else ", ".join(xs[:-1]) + " or " + xs[-1]


def explain_all(counts: Counts, name, ctx: RowContext | None = None) -> list[dict]:
    """The built-in explanation of every feature and its held-out detection scores; context
    patterns too when `ctx` is given."""
    out = []
    for j in range(counts.d_sae):
        found = find_pattern(counts, j, ctx)
        if found is None or not found[1]:  # never fires in the explain split, or no pattern found
            out.append(
                {
                    "explanation": "" if found is None else NO_PATTERN,
                    "pattern": None,
                    "explain_f1": None if found is None else 0.0,
                    "detection": detection(counts, j, "token", []),
                }
            )
            continue
        kind, items, f1 = found
        out.append(
            {
                "explanation": phrase(kind, items, name),
                "pattern": {"kind": kind, "items": [list(i) for i in items]},
                "explain_f1": round(f1, 4),
                "detection": detection(counts, j, kind, items, ctx=ctx),
            }
        )
    return out


def families(explanations: list[str], order: list[int]) -> list[dict]:
    """Features with the same explanation form a family; families in the order of their best
    member (`order`: feature ids best first), members in the same order."""
    fam: dict[str, list[int]] = {}
    for j in order:
        fam.setdefault(explanations[j], []).append(j)
    return [{"id": i, "explanation": e, "members": m} for i, (e, m) in enumerate(fam.items())]


@torch.no_grad()
def nearest(W_dec: Tensor, n: int = 5, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """The n features whose decoder directions are closest in cosine to each one's (itself
    excluded): W_dec [d_sae, d_in] → (cosines [d_sae, n], ids [d_sae, n])."""
    d = torch.nn.functional.normalize(W_dec.float(), dim=1)
    vals, ids = [], []
    for c in range(0, len(d), chunk):
        cos = d[c : c + chunk] @ d.T  # [c, d_sae]
        cos[torch.arange(len(cos)), torch.arange(c, c + len(cos))] = -2.0
        v, i = cos.topk(min(n, len(d) - 1), dim=1)
        vals.append(v.cpu())
        ids.append(i.cpu())
    return torch.cat(vals), torch.cat(ids)


def quantile_picks(vals: Tensor, per: int) -> list[list[int]]:
    """Indices into a feature's sampled firings [SAMPLE] (0 = absent): `per` from each of
    N_QUANTILES activation quantiles, the highest quantile first."""
    idx = (vals > 0).nonzero().squeeze(1)
    idx = idx[vals[idx].argsort(descending=True)]
    bins: list = np.array_split(np.arange(len(idx)), N_QUANTILES) if len(idx) else [[] for _ in range(N_QUANTILES)]
    # The middle of each bin: representative of the quantile, not its edge.
    return [
        [int(idx[b[i]]) for i in np.linspace(0, len(b) - 1, min(per, len(b))).round().astype(int)] if len(b) else []
        for b in bins
    ]


# ---- the model explainer -----------------------------------------------------------------------------


EXPLAIN_PROMPT = (
    "Below are texts from a document. In each, the words where one hidden feature of a language model is active are "
    "marked like <<this>>.\n\n{texts}\n\nWhat do the marked words have in common? Answer with a short phrase only."
)
SCORE_PROMPT = (
    "A hidden feature of a language model is active on: {explanation}.\n\nText: {text}\n\n"
    "Is the feature active somewhere in this text? Answer Yes or No."
)


class ModelExplainer:
    """A local instruct model that writes explanations and answers yes/no (greedy, deterministic)."""

    def __init__(self, lm, max_new_tokens: int = 24):
        self.lm, self.max_new_tokens = lm, max_new_tokens
        tok = lm.tokenizer
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        tok.padding_side = "left"  # generation and the next-token read-out both look at the last position
        self.yes, self.no = (tok.encode(w, add_special_tokens=False)[0] for w in ("Yes", "No"))

    def _chat(self, text: str) -> str:
        msgs = [{"role": "user", "content": text}]
        tok = self.lm.tokenizer
        if getattr(tok, "chat_template", None):
            return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return text + "\nAnswer:"

    @torch.no_grad()
    def explain(self, texts: list[str]) -> str:
        prompt = self._chat(EXPLAIN_PROMPT.format(texts="\n".join(f"Text {i + 1}: {t}" for i, t in enumerate(texts))))
        tok, model = self.lm.tokenizer, self.lm.model
        enc = tok(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
        out = model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        text = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        return text.strip().split("\n")[0].strip().rstrip(".")[:200]

    @torch.no_grad()
    def yes_margin(self, explanation: str, texts: list[str]) -> Tensor:
        """logit(Yes) − logit(No) of the first answer token for each text [n]: > 0 means yes."""
        tok, model = self.lm.tokenizer, self.lm.model
        prompts = [self._chat(SCORE_PROMPT.format(explanation=explanation, text=t)) for t in texts]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        logits = model(**enc, logits_to_keep=1).logits[:, -1].float()  # [n, V]: the head only where it is read
        return (logits[:, self.yes] - logits[:, self.no]).cpu()


def balanced_accuracy(margin: Tensor, label: Tensor) -> float:
    """Mean of the true-positive and true-negative rates of the yes/no answers (margin > 0)."""
    yes = margin > 0
    return 0.5 * (float(yes[label].float().mean()) + float((~yes[~label]).float().mean()))


def auroc(margin: Tensor, label: Tensor) -> float:
    """Probability that a random activating context gets a larger yes-margin than a random
    non-activating one (ties count half): the answer's ranking quality, free of its yes bias."""
    pos, neg = margin[label], margin[~label]
    diff = pos[:, None] - neg[None, :]
    return float((diff > 0).float().mean() + 0.5 * (diff == 0).float().mean())


def marked(tokens: list[str], acts: list[float]) -> str:
    """Context text with every token where the feature is active wrapped in << >>."""
    return "".join(f"<<{t}>>" if a > 0 and t.strip() else t for t, a in zip(tokens, acts)).replace("\n", " ")


class ResultCache:
    """Per-feature results in one JSON file, rewritten atomically after each feature; entries are
    reused only when the header (explainer, SAE, prompt version) matches."""

    def __init__(self, path: Path, header: dict):
        self.path, self.header = path, header
        self.entries: dict[str, dict] = {}
        if path.exists():
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("header") == header:
                self.entries = data["features"]

    def get(self, j: int) -> dict | None:
        return self.entries.get(str(j))

    def put(self, j: int, entry: dict) -> None:
        self.entries[str(j)] = entry
        write_text_atomic(self.path, json.dumps({"header": self.header, "features": self.entries}, ensure_ascii=False))
