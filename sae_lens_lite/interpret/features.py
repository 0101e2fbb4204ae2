"""features.json, the analysis's one file: its schema (TypedDicts) and its checked reader.

Written by analyze.py; read by browser/ (the page), export.py (the dictionary) and info.py. The
schema lives here, apart from its writer, so that readers need not import the analysis stage.
Every key is described in docs/analysis.md.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TypedDict, cast

from sae_lens_lite.errors import UserError
from sae_lens_lite.outputs import read_record, warn

FORMAT = "sae_lens_lite.features"  # on disk: stays as written by earlier releases, wherever this module lives
VERSION = 1
FEATURES_FILE = "features.json"


class FeatureExtras(TypedDict, total=False):
    """Keys of a feature that older features.json files lack (optional for readers)."""

    # The built-in explanation and its held-out detection score (explain.py; docs/analysis.md).
    # Feature.score is detection["score"], the ranking key; monosemanticity is the top-examples score.
    explanation: str | None
    family: int  # id of the features sharing this explanation ("families")
    pattern: dict | None
    explain_f1: float
    detection: dict  # {"precision", "recall", "f1", "score", ...} on held-out tokens
    monosemanticity: float
    quantiles: list  # examples per activation quantile, same shape as examples
    nearest: list  # [[feature id, decoder cosine]]
    model_explanation: dict  # only with --explain-top
    steer: dict  # only with --steer
    dense: bool  # fires on more than evaluate's DENSE_FREQ of tokens: ranked after every other feature
    sweep: dict  # only after `sae-lite sweep`: {"best_times", "best_strength", the curve, "text"}


class Feature(FeatureExtras):
    """One entry of features.json's "features" (docs/analysis.md). Readers take the keys from
    here; a key added later, which old files lack, belongs in FeatureExtras."""

    id: int
    rank: int  # 1 = best score
    score: float
    token_score: float
    context_score: float
    lens_score: float
    frequency: float  # share of tokens on which the feature is > 0
    mean_act: float  # over the tokens where it fires
    max_act: float
    hist: dict  # {"bin_width": float, "counts": [int]}: bin i covers [i, i+1) × bin_width
    top_tokens: list  # [[token id, share of the top examples' activation]]
    lens: dict  # logit lens: {"promoted": [[token id, logit]], "suppressed": [[token id, logit]]}
    examples: list  # [{"row", "doc", "pos", "act", "center", "tokens": [ids], "acts": [...]}]


class AnalysisExtras(TypedDict, total=False):
    """Top-level keys that older features.json files lack."""

    heldout: dict  # {"share", "tokens"}: the contexts explanations are scored on
    cost: dict  # seconds (wall and CPU) of each pass
    families: list  # [{"id", "explanation", "members": [feature ids, best first]}]
    steer: dict  # --steer: {"prompt", "clean", "times_max", "new_tokens", "hook"}
    sweep: dict  # `sae-lite sweep`'s settings: {"times", "prompts", "new_tokens", "max_drop", "seed", "temperature"}


class Analysis(AnalysisExtras):
    """The whole of features.json."""

    format: str  # FORMAT
    version: int
    sae: str
    acts: str
    model: str
    hook: str | None
    n_tokens: int
    d_sae: int
    top_k: int
    ctx_before: int
    ctx_after: int
    chance: dict  # {"same_token", "context_jaccard"}: the chance levels the score uses
    vocab: dict  # token id (as a string) → its text, for every id used in the features
    features: list[Feature]  # in id order


def read_features(path: str | os.PathLike, d_sae: int | None = None) -> Analysis:
    """features.json (or the analysis directory holding it), checked against the schema."""
    path = Path(path)
    f = path / FEATURES_FILE if path.is_dir() or not path.suffix else path
    if not f.is_file():
        raise UserError(f"{f} not found; run `sae-lite analyze --out {path}` first")
    try:
        data = json.loads(f.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{f} is not valid JSON ({e}); run `sae-lite analyze` again") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(f'{f} is not a features.json written by `sae-lite analyze` (no "format": "{FORMAT}")')
    if not isinstance(data.get("version"), int) or data["version"] > VERSION:
        raise UserError(
            f"{f} has format version {data.get('version')!r}; this sae_lens_lite reads up to {VERSION}: upgrade it"
        )
    missing = sorted(set(Analysis.__required_keys__) - set(data))
    if missing:
        raise UserError(f"{f} lacks {', '.join(missing)}; it is damaged, run `sae-lite analyze` again")
    feats = data["features"]
    if not isinstance(feats, list) or len(feats) != data["d_sae"]:
        raise UserError(f"{f} should list {data['d_sae']} features; it is damaged, run `sae-lite analyze` again")
    for i, feat in enumerate(feats):
        if not isinstance(feat, dict) or feat.get("id") != i or not Feature.__required_keys__ <= set(feat):
            raise UserError(
                f"{f}: feature entry {i} does not fit the schema (docs/analysis.md); run `sae-lite analyze` again"
            )
    if d_sae is not None and data["d_sae"] != d_sae:
        raise UserError(
            f"{f} describes an SAE with {data['d_sae']} features, this one has {d_sae}; pass the matching analysis"
        )
    return cast(Analysis, data)  # its keys checked above


def check_analysis_source(analysis: str, sae_sha256: str | None, sae_path: str) -> None:
    """Refuse the analysis of another SAE: its record names the weights it read, by sha256 (two
    SAEs of one width look alike by shape). An analysis without a record is used with a warning."""
    rec = read_record(Path(analysis) if Path(analysis).is_dir() else Path(analysis).parent)
    made_from = (rec or {}).get("inputs", {}).get("sae") if (rec or {}).get("stage") == "analyze" else None
    if made_from is None:
        warn(f"{analysis} does not record which SAE it analysed; cannot check that it is the analysis of {sae_path}")
    elif made_from != sae_sha256:
        raise UserError(
            f"{analysis} is the analysis of another SAE (its weights' sha256 differs from {sae_path}'s); "
            f"run `sae-lite analyze --sae {sae_path}` and pass that analysis"
        )
