"""Context patterns for the built-in explainer: where a token stands, not which token it is.

Many features track context (inside a code example, in a list of arguments, after an opening
quote, the second clause of a sentence) rather than a token; a token pattern cannot read them
(docs/analysis.md). Every cache row gets, once, from the token texts in context order:

- a set of **attributes**, one bit each (`ATTRIBUTES`): the start of a line, inside parentheses,
  inside quotes, in an indented line, ...;
- the **previous tokens**, `MAX_WINDOW` of them (canonical ids), for "a token within n after X".

A feature's context patterns are then read from its firing rows on the explain split:

    attribute         one attribute, or two together ("inside parentheses, in an indented line")
    window            a token within the last n (2..MAX_WINDOW) tokens ("within 3 tokens after "def"")
    token + attribute a set of tokens where an attribute holds ("self" or "x", inside parentheses)

Each needs, per split, how many rows the pattern matches, whatever the feature does; these
counts are kept once for every attribute, pair of attributes, (attribute, token) and (token,
distance), so precision, recall and F1 over every held-out token are exact, as for the token
patterns of explain.py.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MAX_WINDOW = 16  # "a token within the last n": n up to this
ATTRIBUTES = (  # (key, phrase after "a token "); the bit of attribute i is 1 << i
    ("line_start", "at the start of a line"),
    ("indented", "in an indented line"),
    ("prompt", "in a line of an interactive example (>>> or ...)"),
    ("list_item", "in a list item (a line starting with -, * or a number)"),
    ("parens", "inside parentheses"),
    ("brackets", "inside square brackets"),
    ("braces", "inside braces"),
    ("any_bracket", "inside brackets of any kind"),
    ("nested", "inside two or more levels of brackets"),
    ("later_item", "after a comma inside brackets (a later argument or list item)"),
    ("double_quotes", "inside double quotes"),
    ("single_quotes", "inside single quotes"),
    ("backticks", "inside backticks"),
    ("clause", "after a comma, colon or semicolon in its sentence (a later clause)"),
    ("top_level", "outside any brackets or quotes"),
)
BIT = {key: 1 << i for i, (key, _) in enumerate(ATTRIBUTES)}
K = len(ATTRIBUTES)
OPEN, CLOSE = {"(": "parens", "[": "brackets", "{": "braces"}, {")": "(", "]": "[", "}": "{"}
LIST_ITEM = re.compile(r"([-*\u2022]\s|\d+[.)]\s)")


# ---- per-row context, from the token texts --------------------------------------------------------


class _State:
    """What the text so far leaves open: brackets (with whether a comma came after each), quotes,
    and the current line's indent, first characters and clause."""

    def __init__(self):
        self.stack: list[list] = []  # [[opening char, comma seen], ...]
        self.new_line()

    def new_line(self):
        self.dq = self.sq = self.bt = self.clause = False
        self.indent, self.head, self.text_seen = 0, "", False

    def inside(self) -> int:
        bits = 0
        for ch, _ in self.stack:
            bits |= BIT[OPEN[ch]] | BIT["any_bracket"]
        if len(self.stack) >= 2:
            bits |= BIT["nested"]
        if self.stack and self.stack[-1][1]:
            bits |= BIT["later_item"]
        for on, key in ((self.dq, "double_quotes"), (self.sq, "single_quotes"), (self.bt, "backticks")):
            bits |= BIT[key] if on else 0
        if self.clause:
            bits |= BIT["clause"]
        return bits

    def read(self, text: str) -> None:
        last = ""
        for i, ch in enumerate(text.replace("``", "`")):
            if ch == "\n":
                self.new_line()
            elif not self.text_seen and ch in " \t":
                self.indent += 4 if ch == "\t" else 1
            else:
                self.text_seen = True
                if len(self.head) < 6:
                    self.head += ch
            if ch in OPEN:
                self.stack.append([ch, False])
            elif ch in CLOSE and self.stack and self.stack[-1][0] == CLOSE[ch]:
                self.stack.pop()
            elif ch == "," and self.stack:
                self.stack[-1][1] = True
            if ch == '"':
                self.dq = not self.dq
            elif ch == "'" and (self.sq or not last.isalnum()):  # an apostrophe (don't) opens nothing
                self.sq = not self.sq
            elif ch == "`":
                self.bt = not self.bt
            elif ch in ",;:":
                self.clause = True
            elif ch in ".!?":
                self.clause = False
            last = ch
        if len(self.stack) > 64:  # unbalanced text (a stray "(" per line) must not grow without end
            del self.stack[:-64]


def row_attributes(texts: list[str], order: np.ndarray, doc: np.ndarray) -> np.ndarray:
    """[n_rows] int64 attribute bits. texts[i] is row i's token text; `order` lists the rows in
    context order (by doc, then position). A bracket or quote holds a token when it is open both
    before and after it: "(" and ")" themselves are not inside."""
    bits = np.zeros(len(texts), dtype=np.int64)
    state, cur, at_start = _State(), None, True
    for i in order.tolist():
        if doc[i] != cur:
            state, cur, at_start = _State(), doc[i], True
        before = state.inside()
        state.read(texts[i])
        b = before & state.inside()
        if at_start:
            b |= BIT["line_start"]
        if state.indent >= 4:
            b |= BIT["indented"]
        head = state.head
        if head.startswith(">>>") or head.startswith("..."):
            b |= BIT["prompt"]
        if LIST_ITEM.match(head):
            b |= BIT["list_item"]
        if not b & (BIT["any_bracket"] | BIT["double_quotes"] | BIT["single_quotes"] | BIT["backticks"]):
            b |= BIT["top_level"]
        bits[i] = b
        at_start = texts[i].endswith("\n")
    return bits


def previous_tokens(canon: np.ndarray, order: np.ndarray, doc: np.ndarray) -> np.ndarray:
    """[n_rows, MAX_WINDOW] canonical ids of the 1st, 2nd, ... previous token the cache holds in
    the same context, -1 where there is none."""
    n = len(canon)
    sorted_tok, sorted_doc = canon[order], doc[order]
    prev = np.full((n, MAX_WINDOW), -1, dtype=np.int64)
    for d in range(1, MAX_WINDOW + 1):
        same = np.zeros(n, dtype=bool)
        same[d:] = sorted_doc[d:] == sorted_doc[:-d]
        col = np.full(n, -1, dtype=np.int64)
        col[d:] = sorted_tok[:-d]
        prev[order, d - 1] = np.where(same, col, -1)
    return prev


def nearest_distance(prev: np.ndarray, B: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each row and each distinct token in its window, the distance back to its nearest
    occurrence → (row index, token, distance 1..MAX_WINDOW), one entry per (row, token)."""
    n = len(prev)
    rows = np.repeat(np.arange(n), MAX_WINDOW)
    tok = prev.ravel()
    dist = np.tile(np.arange(1, MAX_WINDOW + 1), n)
    ok = tok >= 0
    rows, tok, dist = rows[ok], tok[ok], dist[ok]
    _, first = np.unique(rows * B + tok, return_index=True)  # row-major, nearest first: min distance
    return rows[first], tok[first], dist[first]


def unpack(bits: np.ndarray) -> np.ndarray:
    """[n] int64 → [n, K] bool."""
    return (bits[:, None] >> np.arange(K)) & 1 == 1


# ---- counts per split ------------------------------------------------------------------------------


@dataclass
class RowContext:
    """The context of every cache row and how often each context pattern occurs per split."""

    B: int  # n_vocab + 1, as in explain.Counts
    cur: np.ndarray  # [n_rows] canonical token ids
    bits: np.ndarray  # [n_rows] attribute bits
    prev: np.ndarray  # [n_rows, MAX_WINDOW] previous canonical ids, -1 absent
    attr_occ: np.ndarray  # [2, K, K] rows with attributes a and b (a == b: a alone), per split
    attr_tok_occ: np.ndarray  # [2, K, B] rows of token t with attribute a, per split
    within_occ: np.ndarray  # [2, B, MAX_WINDOW] rows with token w within the last n = column + 1

    @classmethod
    def build(cls, texts: list[str], canon: np.ndarray, doc: np.ndarray, pos: np.ndarray, split: np.ndarray, B: int):
        """texts, canon, doc, pos, split: per cache row (split 1 = held out)."""
        order = np.lexsort((pos, doc))
        bits = row_attributes(texts, order, doc)
        prev = previous_tokens(canon, order, doc)
        flags = unpack(bits).astype(np.float32)
        attr_occ = np.stack([flags[split == s].T @ flags[split == s] for s in (0, 1)]).round().astype(np.int64)
        attr_tok_occ = np.zeros((2, K, B), dtype=np.int64)
        for s in (0, 1):
            for a in range(K):
                attr_tok_occ[s, a] = np.bincount(canon[(split == s) & flags[:, a].astype(bool)], minlength=B)
        rows, tok, dist = nearest_distance(prev, B)
        flat = (split[rows] * B + tok) * MAX_WINDOW + dist - 1
        within = np.bincount(flat, minlength=2 * B * MAX_WINDOW).reshape(2, B, MAX_WINDOW).cumsum(2)
        return cls(B, canon, bits, prev, attr_occ, attr_tok_occ, within)

    def matches(self, kind: str, items: list[list[int]], rows: np.ndarray) -> np.ndarray:
        """[len(rows)] bool: does the pattern hold at these rows."""
        if kind == "attribute":
            want = sum(1 << a for a in items[0])
            return self.bits[rows] & want == want
        if kind == "window":
            ((w, n),) = items
            return (self.prev[rows, :n] == w).any(1)
        a = items[0][0]  # token + attribute: [[a, t], ...]
        return np.isin(self.cur[rows], [t for _, t in items]) & (self.bits[rows] >> a & 1 == 1)

    def occurrences(self, split: int, kind: str, items: list[list[int]]) -> int:
        """How many tokens of a split the pattern matches."""
        if kind == "attribute":
            a, b = items[0][0], items[0][-1]
            return int(self.attr_occ[split, a, b])
        if kind == "window":
            ((w, n),) = items
            return int(self.within_occ[split, w, n - 1])
        return int(sum(self.attr_tok_occ[split, a, t] for a, t in items))


# ---- reading a feature's context patterns -----------------------------------------------------------


def best_attributes(ctx: RowContext, rows: np.ndarray, total: int) -> tuple[list[int], float]:
    """The attribute, or pair of attributes, with the best F1 at predicting these firing rows."""
    flags = unpack(ctx.bits[rows]).astype(np.float32)
    tp = flags.T @ flags  # [K, K] firing rows with a and b
    f1 = 2 * tp / (ctx.attr_occ[0] + total)
    a, b = np.unravel_index(int(f1.argmax()), f1.shape)
    return sorted({int(a), int(b)}), float(f1[a, b])


def best_window(ctx: RowContext, rows: np.ndarray, total: int) -> tuple[list[int], float]:
    """The (token w, n) with the best F1 for "w is within the last n tokens", n ≥ 2."""
    r, tok, dist = nearest_distance(ctx.prev[rows], ctx.B)
    if len(tok) == 0:
        return [], 0.0
    ids, inv = np.unique(tok, return_inverse=True)
    tp = np.bincount(inv * MAX_WINDOW + dist - 1, minlength=len(ids) * MAX_WINDOW)
    tp = tp.reshape(len(ids), MAX_WINDOW).cumsum(1)
    f1 = 2 * tp / (ctx.within_occ[0, ids] + total)
    f1[:, 0] = -1.0  # n = 1 is the "after" pattern of explain.py
    i, n = np.unravel_index(int(f1.argmax()), f1.shape)
    return [int(ids[i]), int(n) + 1], float(f1[i, n])


def best_token_in(ctx: RowContext, rows: np.ndarray, total: int, attrs: list[int], best_set) -> tuple[list, float]:
    """For each attribute in attrs, the set of tokens (greedy, explain.best_set) that best predicts
    firing where the attribute holds → ([[a, t], ...], F1) of the best."""
    best: tuple[list, float] = ([], 0.0)
    for a in attrs:
        here = rows[ctx.bits[rows] >> a & 1 == 1]
        if len(here) == 0:
            continue
        ids, fire = np.unique(ctx.cur[here], return_counts=True)
        picked, f1 = best_set(fire, ctx.attr_tok_occ[0, a, ids], total)
        if picked and f1 > best[1]:
            best = ([[a, int(t)] for t in ids[picked]], f1)
    return best


def phrase(kind: str, items: Sequence[Sequence[int]], name, alts) -> str:
    """A readable phrase; `name(id)` names a token, `alts(names)` joins alternatives with "or"."""
    if kind == "attribute":
        return "a token " + ", ".join(ATTRIBUTES[a][1] for a in items[0])
    if kind == "window":
        ((w, n),) = items
        return f"a token within {n} tokens after {name(w)}"
    return f"{alts([name(t) for _, t in items])}, {ATTRIBUTES[items[0][0]][1]}"
