"""k-sparse probing: can a handful of an SAE's latents tell the two classes of a labelled text task apart?

The SAEBench protocol (Karvonen et al. 2025; Gao et al. 2024), defined in docs/metrics.md:

    texts → the model's activations at the SAE's hook, every token → mean over each text's tokens
          (special tokens and the first position left out, as the harvest leaves them out)
    ceiling: a logistic probe on the pooled activations [n, d_in]
    SAE:     each token encoded, then pooled → latents [n, d_sae]; the k latents whose class means
             differ most on the training split; a logistic probe on those k; test accuracy
    floor:   the same on a dictionary of d_sae random directions

Tasks come from the PyPI package `sae-probes` (Kantamneni et al. 2025: 113 binary tasks shipped as
.csv.zst inside its wheel), from a local .csv/.jsonl/.json/.parquet file, or from a hub dataset.
"""

from __future__ import annotations

import difflib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from sae_lens_lite.data.corpus import keep_mask, special_token_ids
from sae_lens_lite.data.models import LoadedModel, run_to_hooks
from sae_lens_lite.errors import UserError

KS = (1, 2, 5, 20)  # SAEBench reports k = 1, 2, 5; 20 shows where the curve flattens
# Eight sae-probes tasks with short texts across kinds (entities, headlines, sentiment, grammar, style):
# the default, small enough for a 2-core CPU.
DEFAULT_TASKS = (
    "5_hist_fig_ismale",
    "21_headline_istrump",
    "92_glue_sst2",
    "105_click_bait",
    "113_movie_sent",
    "126_art_type_book",
    "149_twt_emotion_happiness",
    "87_glue_cola",
)
Encode = Callable[[Tensor], Tensor]  # activations [n, d_in] → latents [n, d_sae]


# ---- the probe ------------------------------------------------------------------------------


def fit_logistic(x: Tensor, y: Tensor, c: float = 1.0, balanced: bool = False, max_iter: int = 200):
    """Logistic regression by L-BFGS, one independent probe per column of y.

    x [n, d], y [n] or [n, m] in {0, 1} → (w [d, m], b [m]). The objective is sklearn's with an L2
    penalty (SAEBench's probe, C = 1), divided by n: mean BCE + ‖w‖² / (2·C·n). `balanced` weighs
    each class by n / (2·n_class), sklearn's class_weight="balanced"."""
    with torch.inference_mode(False), torch.enable_grad():  # callable from under inference_mode
        return _fit_logistic(x.double().clone(), y.double().clone(), c, balanced, max_iter)


def _fit_logistic(x: Tensor, y: Tensor, c: float, balanced: bool, max_iter: int):
    y = y[:, None] if y.ndim == 1 else y  # [n, m]
    n, m = y.shape
    weight = torch.ones_like(y)
    if balanced:
        pos = y.sum(0).clamp(min=1)  # [m]
        weight = torch.where(y > 0, n / (2 * pos), n / (2 * (n - pos).clamp(min=1)))
    w = torch.zeros(x.shape[1], m, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(m, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-9)

    def loss():
        opt.zero_grad()
        logits = x @ w + b  # [n, m]
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, weight=weight, reduction="sum")
        out = (bce + w.pow(2).sum() / (2 * c)) / n
        out.backward()
        return out

    opt.step(loss)
    return w.detach(), b.detach()


def predict(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """Probe scores (logits) [n, m]; a score above 0 predicts class 1."""
    return x.double() @ w + b


def accuracy(x: Tensor, y: Tensor, w: Tensor, b: Tensor) -> float:
    return float(((predict(x, w, b)[:, 0] > 0).long() == y.long()).double().mean())


def top_mean_diff(f: Tensor, y: Tensor, k: int, signed: bool = False) -> Tensor:
    """The k latents of f [n, d_sae] whose class means differ most (SAEBench's selection: |mean
    over class 1 − mean over class 0|; `signed`: the k most above, latents that fire *for* class 1),
    largest first → indices [k]."""
    diff = f[y == 1].double().mean(0) - f[y == 0].double().mean(0)  # [d_sae]
    return (diff if signed else diff.abs()).topk(min(k, f.shape[1])).indices


def k_sparse_probe(f_train: Tensor, y_train: Tensor, f_test: Tensor, y_test: Tensor, ks=KS) -> dict:
    """Test accuracy of a logistic probe on the top-k latents (top_mean_diff on the training split)
    for each k: {"accuracy": {k: acc}, "latents": {k: [index, ...]}}."""
    acc, chosen = {}, {}
    for k in ks:
        idx = top_mean_diff(f_train, y_train, k)
        w, b = fit_logistic(f_train[:, idx], y_train)
        acc[k] = accuracy(f_test[:, idx], y_test, w, b)
        chosen[k] = idx.tolist()
    return {"accuracy": acc, "latents": chosen}


def dense_probe(x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor) -> float:
    """Test accuracy of a logistic probe on every dimension (the ceiling on the model's activations)."""
    return accuracy(x_test, y_test, *fit_logistic(x_train, y_train))


def random_dictionary(d_in: int, d_sae: int, center: Tensor, seed: int = 0) -> Encode:
    """The floor: d_sae random unit directions, each read as ReLU(⟨x − center, direction⟩). What a
    dictionary of the SAE's size finds with no learning; the probe picks its best k all the same."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_in, d_sae, generator=g)  # [d_in, d_sae]
    W = (W / W.norm(dim=0, keepdim=True)).to(center.device)
    c = center.float()
    return lambda x: ((x.float() - c) @ W).relu()


# ---- tasks ----------------------------------------------------------------------------------


@dataclass
class Task:
    name: str
    texts: list[str]
    labels: Tensor  # [n] in {0, 1}
    classes: tuple[str, str]  # what 0 and 1 stand for


def sae_probes_dir() -> Path | None:
    """Where the `sae-probes` wheel keeps its task files, or None when it is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("sae_probes")  # found without importing it (its imports need sklearn)
    if spec is None or not spec.submodule_search_locations:
        return None
    data = Path(next(iter(spec.submodule_search_locations))) / "data" / "cleaned_data"
    return data if data.is_dir() else None


def sae_probes_tasks() -> list[str]:
    """The binary tasks of sae-probes by name (e.g. 113_movie_sent), in their numbering's order."""
    data = sae_probes_dir()
    if data is None:
        return []
    names = [p.name.removesuffix(".csv.zst") for p in data.glob("*.csv.zst")]
    return sorted(names, key=lambda s: int(s.split("_")[0]) if s.split("_")[0].isdigit() else 10**9)


def is_hub_id(spec: str) -> bool:
    return not Path(spec).suffix and spec.count("/") == 1


def check_task(spec: str) -> None:
    """Refuse, before any model is loaded, a task that is neither a sae-probes task, a file, nor
    a hub dataset id ("owner/name"), naming the sae-probes tasks it is closest to."""
    data = sae_probes_dir()
    if (data is not None and (data / f"{spec}.csv.zst").exists()) or Path(spec).is_file() or is_hub_id(spec):
        return
    if data is None:
        hint = "; `pip install --no-deps sae-probes` for its 113 tasks"
    else:
        tasks = sae_probes_tasks()
        near = [t for t in tasks if spec and spec in t][:3]  # "movie_sent" → 113_movie_sent
        near += [t for t in difflib.get_close_matches(spec, tasks, n=3, cutoff=0.6) if t not in near]
        hint = f"; did you mean {', '.join(near)}?" if near else ""
    raise UserError(f"task {spec!r} is neither a sae-probes task, a file, nor a hub dataset id{hint}")


def load_task(spec: str, text_column: str = "text", label_column: str = "label", split: str = "train") -> Task:
    """A binary task: a sae-probes name, a local .csv/.csv.zst/.jsonl/.json/.parquet file, or a hub dataset id."""
    import pandas as pd

    check_task(spec)  # a sae-probes task, a file or an owner/name hub id, or a UserError
    path = Path(spec)
    data = sae_probes_dir()
    if data is not None and (data / f"{spec}.csv.zst").exists():
        df, text_column, label_column = _read_zst_csv(data / f"{spec}.csv.zst"), "prompt", "target"
    elif path.is_file():
        readers = {".csv": pd.read_csv, ".parquet": pd.read_parquet, ".json": pd.read_json}
        if not path.name.endswith(".csv.zst") and path.suffix not in (*readers, ".jsonl"):
            raise UserError(f"task file {spec}: expected .csv, .csv.zst, .jsonl, .json or .parquet")
        try:
            if path.name.endswith(".csv.zst"):
                df = _read_zst_csv(path)
            elif path.suffix == ".jsonl":
                df = pd.read_json(path, lines=True)
            else:
                df = readers[path.suffix](path)
        except ValueError as e:  # pandas' parser errors, bad JSON, binary data, a damaged parquet file
            raise UserError(f"cannot read task file {spec}: {(str(e).splitlines() or [type(e).__name__])[0]}") from None
    else:
        df = _hub_frame(spec, split)
    return _binary_task(path.name.split(".")[0] if path.is_file() else spec, df, text_column, label_column)


def _read_zst_csv(path: Path):
    import pandas as pd

    try:
        import zstandard
    except ImportError:
        raise UserError("reading .csv.zst tasks needs zstandard: pip install zstandard") from None
    with open(path, "rb") as fh:
        return pd.read_csv(io.BytesIO(zstandard.ZstdDecompressor().stream_reader(fh).read()))


def _hub_frame(spec: str, split: str):
    import datasets

    try:
        return datasets.load_dataset(spec, split=split).to_pandas()
    except Exception as e:
        raise UserError(f"cannot load task {spec!r} from the hub: {str(e).splitlines()[0] if str(e) else e}") from None


def _binary_task(name: str, df, text_column: str, label_column: str) -> Task:
    missing = [c for c in (text_column, label_column) if c not in df.columns]
    if missing:
        raise UserError(
            f"task {name} has no column {missing[0]!r} (columns: {', '.join(map(str, df.columns))}); pass "
            "--text-column and --label-column"
        )
    df = df[[text_column, label_column]].dropna()
    df = df[df[text_column].map(lambda t: isinstance(t, str) and bool(t.strip()))]
    values = sorted(df[label_column].unique(), key=str)
    if len(values) != 2:
        raise UserError(f"task {name}: column {label_column!r} holds {len(values)} distinct labels; a task needs 2")
    labels = torch.tensor((df[label_column] == values[1]).to_numpy(), dtype=torch.long)
    return Task(name, df[text_column].tolist(), labels, (str(values[0]), str(values[1])))


def balanced_split(labels: Tensor, n_train: int, n_test: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Disjoint train and test indices, each half class 0 and half class 1 (fewer if a class runs short)."""
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in (0, 1):
        idx = (labels == c).nonzero()[:, 0]
        idx = idx[torch.randperm(len(idx), generator=g)]
        a = min(n_train // 2, len(idx) // 2)
        b = min(n_test // 2, len(idx) - a)
        train.append(idx[:a])
        test.append(idx[a : a + b])
    return torch.cat(train), torch.cat(test)


# ---- the model's activations over texts ---------------------------------------------------


@dataclass
class TokenActs:
    """Activations at the hook of the kept tokens of several texts."""

    x: Tensor  # [n_tokens, d_in]
    text: Tensor  # [n_tokens], which text each row belongs to
    n_texts: int

    def pool(self, encode: Encode | None = None, chunk: int = 4096) -> Tensor:
        """Each text's mean over its tokens of encode(x) (or of x) → [n_texts, d]. Encoding comes
        before the mean (SAEBench's order): the latents of a mean are not the mean of latents."""
        out = None
        for i in range(0, len(self.x), chunk):
            v = self.x[i : i + chunk] if encode is None else encode(self.x[i : i + chunk])
            if out is None:
                out = torch.zeros(self.n_texts, v.shape[1], dtype=torch.float64, device=v.device)
            out.index_add_(0, self.text[i : i + chunk].to(v.device), v.double())
        assert out is not None, "no token to pool"  # every task keeps at least one token per text
        counts = torch.bincount(self.text, minlength=self.n_texts).clamp(min=1).to(out.device)
        return (out / counts[:, None]).float()


@torch.inference_mode()
def text_activations(
    lm: LoadedModel, hook: str, texts: list[str], max_tokens: int, batch_size: int, drop_first: int, device
) -> TokenActs:
    """The activations at `hook` of every token of every text (its first max_tokens), less special
    tokens and the first drop_first positions. Texts run in length order, right-padded: a causal
    model's real tokens never see the padding after them."""
    tok = lm.tokenizer
    ids = [tok(t, add_special_tokens=False).input_ids[:max_tokens] for t in texts]
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    special = special_token_ids(tok)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    xs, owners = [], []
    for s in tqdm(range(0, len(order), batch_size), desc="probe: texts", unit="batch", leave=False):
        batch = order[s : s + batch_size]
        T = max(1, max(len(ids[i]) for i in batch))
        tokens = torch.full((len(batch), T), pad, dtype=torch.long)
        real = torch.zeros(len(batch), T, dtype=torch.bool)
        for r, i in enumerate(batch):
            tokens[r, : len(ids[i])] = torch.tensor(ids[i], dtype=torch.long)
            real[r, : len(ids[i])] = True
        act = run_to_hooks(lm.model, tokens.to(device), [hook])[hook].float()  # [b, T, d]
        keep = real.to(device) & keep_mask(
            tokens.to(device), None, special, drop_special=True, drop_first=drop_first, outlier_factor=0.0
        )
        xs.append(act[keep])
        owners.append(torch.tensor(batch, device=device)[:, None].expand_as(keep)[keep])
    return TokenActs(torch.cat(xs), torch.cat(owners).cpu(), len(texts))
