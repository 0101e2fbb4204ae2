import re
import struct

import pytest
import torch
from conftest import FAMILIES, tiny_model, tiny_tokenizer

from sae_lens_lite.data.models import blocks, edit_hook, hook_names, hook_point, load_model, run_to_hooks
from sae_lens_lite.errors import UserError


@pytest.mark.parametrize("family", FAMILIES)
def test_hooks_equal_hidden_states_and_stopping_changes_nothing(family):
    model = tiny_model(family)
    ids = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states  # [n_layers + 1] x [b, T, d]
    names = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"]
    stopped = run_to_hooks(model, ids, names, stop=True)
    full = run_to_hooks(model, ids, names, stop=False)
    torch.testing.assert_close(stopped["blocks.0.hook_resid_pre"], hs[0], rtol=0, atol=0)
    torch.testing.assert_close(stopped["blocks.1.hook_resid_pre"], hs[1], rtol=0, atol=0)
    torch.testing.assert_close(stopped["blocks.1.hook_resid_post"], hs[2], rtol=0, atol=0)
    for n in names:
        torch.testing.assert_close(stopped[n], full[n], rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_attn_and_mlp_outputs_sum_to_the_residual_update(family):
    model = tiny_model(family)
    ids = torch.randint(0, 96, (2, 7))
    L = 1
    acts = run_to_hooks(
        model, ids, [f"blocks.{L}.{k}" for k in ("hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post")]
    )
    pre, attn, mlp, post = (
        acts[f"blocks.{L}.{k}"] for k in ("hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post")
    )
    torch.testing.assert_close(pre + attn + mlp, post, rtol=1e-5, atol=1e-5)
    assert attn.abs().sum() > 0 and mlp.abs().sum() > 0


def test_forward_stops_after_the_hooked_layer():
    model = tiny_model("llama", n_layers=4)
    calls = {}
    for i, block in enumerate(blocks(model)):
        block.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls.get(i, 0) + 1))
    model.lm_head.register_forward_hook(lambda m, a, o: calls.__setitem__("lm_head", 1))
    run_to_hooks(model, torch.randint(0, 96, (1, 5)), ["blocks.1.hook_mlp_out"])
    assert calls == {0: 1}  # block 1 raised inside its MLP hook, before its own output
    calls.clear()
    run_to_hooks(model, torch.randint(0, 96, (1, 5)), ["blocks.2.hook_resid_post", "blocks.0.hook_resid_post"])
    assert calls == {0: 1, 1: 1, 2: 1}


def test_unknown_hook_lists_the_valid_ones():
    model = tiny_model("gpt2")
    with pytest.raises(UserError, match="hook_resid_post"):
        hook_point(model, "blocks.0.resid")
    with pytest.raises(UserError, match="beyond the model's depth"):
        hook_point(model, "blocks.7.hook_resid_post")
    assert len(hook_names(model)) == 3 * 5


def test_edit_hook_identity_keeps_logits_and_zeroing_changes_them():
    model = tiny_model("llama")
    ids = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        clean = model(ids).logits
        with edit_hook(model, "blocks.1.hook_resid_post", lambda a: a.clone()):
            same = model(ids).logits
        with edit_hook(model, "blocks.1.hook_resid_pre", lambda a: torch.zeros_like(a)):
            zeroed = model(ids).logits
    torch.testing.assert_close(same, clean, rtol=0, atol=0)
    assert (zeroed - clean).abs().max() > 1e-3


def test_load_model_from_local_directory(tmp_path, capfd):
    from transformers.utils import logging as hf_logging

    model = tiny_model("qwen2")
    model.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    capfd.readouterr()
    lm = load_model(str(tmp_path))
    assert lm.n_layers == 3 and lm.d_model == 32 and lm.weights_hash != "unknown"
    # No "Loading weights" bar from transformers for a local load, and its setting is restored.
    assert "Loading weights" not in capfd.readouterr().err and hf_logging.is_progress_bar_enabled()
    ids = torch.randint(0, 96, (1, 5))
    torch.testing.assert_close(lm.model(ids).logits, model(ids).logits)


def test_unknown_model_offline_is_a_user_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="cannot load model"):
        load_model("no-such-org/no-such-model-xyz")
    with pytest.raises(UserError, match="not found"):
        load_model(str(tmp_path / "missing.gguf"))


@pytest.mark.parametrize("name", ["/nonexistent/model", "./models/foo", "../foo", "~/no-such-model", "some org/bad"])
def test_missing_local_path_is_named_not_sent_to_the_hub(name):
    # These cannot be hub ids; huggingface_hub used to reject them with an HFValidationError traceback.
    with pytest.raises(UserError, match=f"model directory {re.escape(name)} not found"):
        load_model(name)


def test_invalid_hub_id_is_a_user_error():
    with pytest.raises(UserError, match="'a--b' is not a Hugging Face model id"):
        load_model("a--b")


def test_existing_file_that_is_not_a_model_is_a_user_error(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    with pytest.raises(UserError, match="neither a directory nor a .gguf file"):
        load_model(str(f))


def test_corrupt_gguf_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv("SAE_LITE_CACHE", str(tmp_path / "cache"))
    fake = tmp_path / "fake.gguf"
    fake.write_text("hello\n")
    with pytest.raises(UserError, match="fake.gguf is not a GGUF file .*valid .gguf"):
        load_model(str(fake))
    # right magic, then cut short: the gguf reader's struct.error becomes one line
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 1) + b"\x05")
    with pytest.raises(UserError, match="cannot read .*cut.gguf .*is the file complete"):
        load_model(str(cut))


def test_bad_model_path_on_the_command_line_is_one_line_and_exit_2(capsys, tmp_path):
    from sae_lens_lite.cli import main

    assert main(["hooks", "--model", "/nonexistent/model"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error: model directory /nonexistent/model not found" in err
    fake = tmp_path / "fake.gguf"
    fake.write_text("hello\n")
    assert main(["hooks", "--model", str(fake)]) == 2
    assert "is not a GGUF file" in capsys.readouterr().err


def test_a_model_directory_with_only_pickled_weights_is_refused(tmp_path):
    """Weights load from safetensors only: a pytorch_model.bin is a pickle, which can run code."""
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(UserError, match=r"holds no \.safetensors weights.*pickle"):
        load_model(str(tmp_path))


def test_an_empty_model_name_is_refused():
    with pytest.raises(UserError, match="--model is empty"):
        load_model("")
