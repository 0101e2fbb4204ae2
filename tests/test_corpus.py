import json

import pytest
import torch

from sae_lens_lite.data.corpus import keep_mask, load_texts
from sae_lens_lite.errors import UserError


def test_jsonl_corpus_is_read_with_datasets(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text("\n".join(json.dumps({"text": f"document {i}"}) for i in range(3)))
    assert load_texts(str(p)) == ["document 0", "document 1", "document 2"]
    with pytest.raises(UserError, match="no column 'body'"):
        load_texts(str(p), text_column="body")
    assert len(load_texts("pydoc")) > 50


def test_keep_mask_applies_each_filter_it_is_given():
    tokens = torch.tensor([[0, 5, 6, 0, 7, 8]])  # [1, 6]; 0 is the special token
    acts = torch.ones(1, 6, 4)  # [1, 6, 4]
    acts[0, 4] *= 100  # an outlier row

    def mask(**filters) -> list[bool]:
        return keep_mask(
            tokens, acts, {0}, **{"drop_special": False, "drop_first": 0, "outlier_factor": 0.0, **filters}
        )[0].tolist()

    assert mask() == [True] * 6
    assert mask(drop_special=True) == [False, True, True, False, True, True]
    assert mask(drop_first=2) == [False, False, True, True, True, True]
    assert mask(outlier_factor=3.0) == [True, True, True, True, False, True]
    # without the outlier filter the activations are not needed (evaluate.evaluated_positions)
    assert keep_mask(tokens, None, {0}, drop_special=True, drop_first=1, outlier_factor=0.0)[0].tolist() == [
        False,
        True,
        True,
        False,
        True,
        True,
    ]
