import json

import pytest
import torch
from conftest import needs_smollm2, tiny_tokenizer

from sae_lens_lite.data import corpus
from sae_lens_lite.data.corpus import keep_mask, load_texts, token_ids, tokenize_corpus
from sae_lens_lite.errors import UserError


def test_jsonl_corpus_is_read_with_datasets(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text("\n".join(json.dumps({"text": f"document {i}"}) for i in range(3)))
    assert load_texts(str(p)) == ["document 0", "document 1", "document 2"]
    with pytest.raises(UserError, match="no column 'body'"):
        load_texts(str(p), text_column="body")
    assert len(load_texts("pydoc")) > 50


@pytest.mark.parametrize(
    "name, content, reason",
    [("bad.jsonl", "not json\n", "JSON parse error"), ("bad.csv", '"unterminated\n', "EOF inside string")],
)
def test_a_malformed_corpus_file_is_named_with_the_parser_s_reason_only(tmp_path, capfd, name, content, reason):
    """datasets wraps the parser's error in "An error occurred while generating the dataset" and
    logs it on a line of its own: the user gets the reason, once."""
    p = tmp_path / name
    p.write_text(content)
    with pytest.raises(UserError, match=reason):
        load_texts(str(p))
    assert capfd.readouterr().err == ""


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


# ---- token_ids with a limit reads a long document only as far as it needs, and gives the same ids
# as tokenising the whole of it: harvest and evaluate pack exactly the tokens they packed before.


class Spy:
    """A tokenizer that records how many characters it was asked to read."""

    def __init__(self, tok):
        self.tok, self.read = tok, 0
        self.eos_token_id = tok.eos_token_id

    def __call__(self, text, **kw):
        self.read += len(text)
        return self.tok(text, **kw)


def awkward_text(n_lines: int) -> str:
    """Blank-line runs, indents, trailing spaces and long space runs at every line break: where a
    cut at a line break splits what tokenising the whole text keeps together."""
    lines = []
    for i in range(n_lines):
        lines.append(("    " * (i % 3)) + f"def f{i}(x):  return x * {i}   " + " " * (i % 17))
        lines.append("\n" * (i % 4))
    return "\n".join(lines)


def whole(tok, texts):
    ids = []
    for t in texts:
        ids += tok(t, add_special_tokens=False).input_ids + [tok.eos_token_id]
    return ids


def check_heads(tok, texts, limits):
    full = whole(tok, texts)
    total = sum(map(len, texts))
    for limit in limits:
        spy = Spy(tok)
        ids = token_ids(spy, texts, limit)
        assert len(ids) >= min(limit, len(full))
        assert ids == full[: len(ids)], limit  # a head of the whole tokenisation, up to its last id
        if limit * 20 < total:
            assert spy.read < total / 2, (limit, spy.read, total)  # a head, not the whole text


@needs_smollm2
def test_smollm2_heads_equal_the_whole_tokenisation():
    from sae_lens_lite.data.models import local_tokenizer

    tok = local_tokenizer("smollm2-135m")
    check_heads(tok, [awkward_text(3000)], [1, 100, 1000, 5000])
    check_heads(tok, ["short one", awkward_text(2000), "tail"], [50, 3000, 10**9])
    pydoc = load_texts("pydoc")
    check_heads(tok, pydoc, [2000, 40000])


def test_tiny_tokenizer_heads_and_a_text_without_line_breaks():
    tok = tiny_tokenizer()
    check_heads(tok, [awkward_text(2000)], [10, 500, 4000])
    one_line = " ".join(["the cat sat on the mat"] * 3000)
    spy = Spy(tok)
    assert token_ids(spy, [one_line], 100) == whole(tok, [one_line])  # nowhere to cut: read it all
    assert spy.read == len(one_line)


def test_packed_contexts_do_not_depend_on_the_cut(monkeypatch):
    tok = tiny_tokenizer()
    text = awkward_text(2000)
    a = tokenize_corpus(tok, [text], 16, 3000)
    monkeypatch.setattr(corpus, "_head_ids", lambda tokenizer, t, need: (corpus._ids(tokenizer, t), True))
    b = tokenize_corpus(tok, [text], 16, 3000)
    assert a.shape == b.shape == (187, 16)
    assert (a == b).all()


@pytest.mark.parametrize("limit", [0, 1])
def test_tiny_limits(limit):
    tok = tiny_tokenizer()
    assert token_ids(tok, [awkward_text(50)], limit)[:limit] == whole(tok, [awkward_text(50)])[:limit]
