"""A corpus, read, tokenised, packed into contexts, and filtered to the rows an SAE learns from.

Every stage that runs the model over text (harvest, streaming training, evaluate, compare) reads
and packs it here, so the same settings give the same tokens everywhere; and `keep_mask` is the
one definition of which positions count (harvest's row filters, evaluate's scored positions).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import Tensor

from sae_lens_lite.data.models import LoadedModel, local_tokenizer
from sae_lens_lite.errors import UserError

DEFAULT_CORPUS = "pydoc"  # Python's own documentation, shipped with every CPython install

# ---- reading and packing --------------------------------------------------------------------


def load_texts(dataset: str, split: str = "train", text_column: str = "text") -> list[str]:
    """Documents of a corpus: a local .txt (one document), .jsonl/.json/.parquet/.csv file (one
    per row), a directory of .txt files, "pydoc", or a hub dataset id (online only)."""
    if dataset == DEFAULT_CORPUS:
        import pydoc_data.topics

        return [t for t in pydoc_data.topics.topics.values() if t.strip()]
    path = Path(dataset)
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise UserError(f"corpus directory {dataset} holds no .txt files")
        return [read_text_file(f) for f in files]
    if path.suffix == ".txt":
        if not path.is_file():
            raise UserError(f"corpus file {dataset} not found")
        return [read_text_file(path)]
    import datasets

    datasets.disable_progress_bars()
    builders = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
    try:
        if path.suffix in builders:
            if not path.is_file():
                raise UserError(f"corpus file {dataset} not found")
            # quiet while it reads: its logged error would repeat, on a line of its own, the one we raise below
            verbosity = datasets.logging.get_verbosity()
            datasets.logging.set_verbosity(datasets.logging.CRITICAL)
            try:
                ds = datasets.load_dataset(builders[path.suffix], data_files=str(path), split="train")
            finally:
                datasets.logging.set_verbosity(verbosity)
        elif path.is_file():
            raise UserError(
                f"corpus file {dataset} is a {path.suffix or 'extensionless'} file, which sae-lite does not read: "
                "give a .txt (plain text: rename it if that is what it holds), .jsonl, .json, .parquet or .csv file"
            )
        elif path.suffix or dataset.startswith(("/", ".", "~")) or dataset.count("/") > 1:
            raise UserError(
                f"corpus {dataset} not found (expected a .txt/.jsonl/.parquet/.csv file, a directory, "
                f"'{DEFAULT_CORPUS}' or a hub id)"
            )
        else:
            ds = datasets.load_dataset(dataset, split=split)
    except UserError:
        raise
    except Exception as e:
        from datasets.exceptions import DatasetGenerationError

        # its message is only "An error occurred while generating the dataset": the cause says what
        while isinstance(e, DatasetGenerationError) and (e.__cause__ or e.__context__):
            e = e.__cause__ or e.__context__
        raise UserError(
            f"cannot load corpus {dataset!r}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None
    if text_column not in ds.column_names:
        raise UserError(
            f"corpus {dataset} has no column {text_column!r} (columns: {', '.join(ds.column_names)}); pass "
            "--text-column"
        )
    return [t for t in ds[text_column] if isinstance(t, str)]


BAD_BYTES = 0.01  # a text file may hold a few invalid UTF-8 bytes (they become U+FFFD), not more


def read_text_file(path: Path) -> str:
    """A .txt corpus file as text; binary data (NUL bytes, or more than 1% of it not UTF-8) is
    refused: tokenised, it would make a complete-looking cache of noise."""
    data = path.read_bytes()
    text = data.decode("utf-8", errors="replace")
    if b"\0" in data or text.count("\ufffd") > BAD_BYTES * max(len(text), 1):
        raise UserError(f"corpus file {path} is not UTF-8 text (binary data?); point --dataset at a text file")
    return text


def corpus_fingerprint(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8", errors="replace"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def tokenize_corpus(tokenizer, texts: list[str], context_length: int, max_tokens: int | None = None) -> Tensor:
    """Tokenize documents, join them with EOS between, and pack into contexts [n_ctx, context_length].

    Packing (rather than padding) wastes no compute; the separator tells the model where one
    document ends. The final partial context is dropped."""
    if not any(t.strip() for t in texts):
        raise UserError("the corpus is empty (no non-whitespace text); point --dataset at real text")
    ids = token_ids(tokenizer, texts, None if max_tokens is None else max_tokens + context_length)
    n_ctx = len(ids) // context_length
    if max_tokens is not None:
        n_ctx = min(n_ctx, max(1, max_tokens // context_length))
    if n_ctx == 0:
        raise UserError(
            f"the corpus has {len(ids)} tokens, fewer than one context of {context_length}; use a smaller "
            "--context-length"
        )
    return torch.tensor(ids[: n_ctx * context_length], dtype=torch.long).view(n_ctx, context_length)


def token_ids(tokenizer, texts: list[str], limit: int | None = None) -> list[int]:
    """The documents' tokens, EOS after each, as tokenize_corpus packs them; stops once `limit` are
    read. With a limit, a long document is tokenised only as far as it is needed (`_head_ids`): the
    first `limit` ids are those of tokenising everything."""
    sep = tokenizer.eos_token_id
    ids: list[int] = []
    for t in texts:
        if not t.strip():
            continue
        if limit is None:
            ids.extend(_ids(tokenizer, t))
        else:
            head, whole = _head_ids(tokenizer, t, limit - len(ids))
            ids.extend(head)
            if not whole:
                break  # the document goes on past the limit: no EOS, nothing after it is read
        if sep is not None:
            ids.append(sep)
        if limit is not None and len(ids) >= limit:
            break
    return ids


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


CUT_SLACK = 32  # tokens dropped before a cut: a cut can change how the last word or space run splits


def _head_ids(tokenizer, text: str, need: int) -> tuple[list[int], bool]:
    """At least `need` leading ids of `text`, equal to those of tokenising it whole, and whether
    they are all of it. Harvesting 32k tokens from a 3 MB book tokenised the whole book first
    (3 s, a seventh of the harvest: docs/benchmarks.md); this reads a head of the text, cut at a
    line break, drops the ids near the cut, and doubles the head until enough are left."""
    n = 5 * need + 4096  # characters: tokenizers average 3-5 a token on prose, fewer on code
    while n < len(text):
        cut = text.rfind("\n", 0, n)  # never inside a word; a space run at the cut falls in the slack
        if cut > 0:
            ids = _ids(tokenizer, text[: cut + 1])
            if len(ids) - CUT_SLACK >= need:
                return ids[: len(ids) - CUT_SLACK], False
        n *= 2
    return _ids(tokenizer, text), True


MAX_CHARS_PER_TOKEN = 32  # far above any tokenizer's average on text (3-5): more characters means enough tokens


def corpus_tokens(
    model: str, dataset: str, split: str, text_column: str, limit: int, trust_remote_code: bool = False
) -> int | None:
    """How many tokens `dataset` holds for `model`'s tokenizer, counted up to `limit`, when that is
    cheap to know: the corpus is local (a file, a directory or pydoc) and the model's tokenizer is
    on this machine. None otherwise (a hub corpus or model): the stage that reads it finds out."""
    if dataset != DEFAULT_CORPUS and not Path(dataset).exists():
        return None
    try:
        tokenizer = local_tokenizer(model, trust_remote_code)  # a .gguf is converted once; harvest would next
    except (UserError, OSError, ValueError):
        return None  # a model that does not load: harvest says why, in its own words
    if tokenizer is None:
        return None
    texts = load_texts(dataset, split, text_column)
    if sum(map(len, texts)) >= MAX_CHARS_PER_TOKEN * limit:
        return limit  # plainly enough text: tokenising it all to be sure would not be cheap
    return min(len(token_ids(tokenizer, texts, limit)), limit)


def check_context_length(lm: LoadedModel, context_length: int) -> None:
    if context_length <= 0:
        raise UserError(f"--context-length must be positive, got {context_length}")
    if lm.max_context is not None and context_length > lm.max_context:
        raise UserError(f"--context-length {context_length} is longer than the model allows ({lm.max_context})")


# ---- filtering ------------------------------------------------------------------------------


def keep_mask(
    tokens: Tensor,
    acts: Tensor | None,
    special_ids: set[int],
    *,
    drop_special: bool,
    drop_first: int,
    outlier_factor: float,
) -> Tensor:
    """Which rows of a batch to keep (harvest's --drop-special, --drop-first, --outlier-factor).
    tokens [b, T], acts [b, T, d] (needed only for the outlier filter) → bool [b, T]."""
    keep = torch.ones_like(tokens, dtype=torch.bool)
    if drop_special and special_ids:
        keep &= ~torch.isin(tokens, torch.tensor(sorted(special_ids), device=tokens.device))
    if drop_first:
        keep[:, :drop_first] = False
    if outlier_factor > 0:
        assert acts is not None, "the outlier filter needs the activations"
        norms = acts.float().norm(dim=-1)  # [b, T]
        keep &= norms <= outlier_factor * norms.median()
    return keep


def position_filters(cfg) -> dict:
    """The row filters of a config that has them (HarvestConfig, EvalConfig, CompareConfig), as
    `keep_mask` takes them (`keep_mask(..., **filters)`) and caches and reports record them."""
    if cfg.drop_first < 0 or cfg.outlier_factor < 0:
        raise UserError("--drop-first and --outlier-factor must be non-negative")
    return {"drop_special": cfg.drop_special, "drop_first": cfg.drop_first, "outlier_factor": cfg.outlier_factor}


def special_token_ids(tokenizer) -> set[int]:
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    return {i for i in ids if i is not None}
