"""Decoder model resolution: GGUF reading and conversion (a tiny GGUF written in-process with the gguf
package), the cache and its sha256 marker, and every unreadable-GGUF case as a one-line error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgeft.errors import ModelError
from test_decoder_tiny import CHATML, TEXT, make_tiny_llama

gguf = pytest.importorskip("gguf")


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (transformers reverses it when it reads a GGUF)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, hf_folder: Path, *, broken_tokenizer: bool = True) -> Path:
    """The tiny Llama of ``hf_folder`` as an F32 GGUF the way llama.cpp writes one: byte-level BPE
    vocabulary (``gpt2``), ChatML template and, like SmolLM2's GGUF, ``<|im_start|>`` as eos."""
    from safetensors.numpy import load_file

    cfg = json.loads((hf_folder / "config.json").read_text())
    tok = json.loads((hf_folder / "tokenizer.json").read_text())
    w = load_file(str(hf_folder / "model.safetensors"))
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_rope_freq_base(cfg.get("rope_theta", 10000.0))
    writer.add_rope_dimension_count(cfg["hidden_size"] // heads)
    writer.add_vocab_size(cfg["vocab_size"])
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv_: kv_[1])
    tokens = [t for t, _ in vocab]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(1 if broken_tokenizer else 2)
    writer.add_unk_token_id(0)
    writer.add_chat_template(CHATML)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    per_layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for key, arr in w.items():
        arr = arr.astype(np.float32)
        if key in names:
            writer.add_tensor(names[key], arr)
            continue
        if key == "lm_head.weight":
            continue  # tied: llama.cpp writes no output.weight
        parts = key.split(".")
        i, sub = parts[2], ".".join(parts[3:-1])
        if sub == "self_attn.q_proj":
            arr = _permute(arr, heads)
        elif sub == "self_attn.k_proj":
            arr = _permute(arr, kv)
        writer.add_tensor(f"blk.{i}.{per_layer[sub]}.weight", arr)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("hf") / "model")


@pytest.fixture(scope="module")
def tiny_gguf(tiny_hf, tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", tiny_hf)


def test_gguf_converts_to_a_fixed_hf_folder_with_the_same_function(tiny_gguf, tiny_hf, tmp_path):
    import torch

    from edgeft.decoder.model import MARKER, check_gguf, convert_gguf, load_causal_lm, load_tokenizer

    info = check_gguf(tiny_gguf)
    assert info["architecture"] == "llama" and info["tokenizer_model"] == "gpt2" and info["tensors"] > 0
    out = convert_gguf(tiny_gguf, tmp_path / "converted")
    tok, ref_tok = load_tokenizer(out), load_tokenizer(tiny_hf)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "GPT2Tokenizer"  # not the Llama sentencepiece class the GGUF loader gives
    assert tok.eos_token == "<|im_end|>" and tok.pad_token is not None and tok.pad_token != tok.eos_token
    assert tok.chat_template == CHATML
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert tok(TEXT)["input_ids"] == ids  # no bos glued to every text
    assert ids == ref_tok(TEXT, add_special_tokens=False)["input_ids"] and tok.decode(ids) == TEXT
    model, ref = load_causal_lm(out), load_causal_lm(tiny_hf)
    assert model.config.eos_token_id == tok.eos_token_id == 2
    x = torch.tensor([ids[:40]])
    with torch.no_grad():
        assert torch.allclose(model(x).logits, ref(x).logits, atol=1e-4)  # q/k permutation undone, weights equal
    marker = json.loads((out / MARKER).read_text())
    from edgeft.artifacts import sha256_file
    assert marker["source_sha256"] == sha256_file(tiny_gguf)


def test_the_cache_converts_once_and_again_when_the_gguf_changes(tiny_gguf, tiny_hf, tmp_path, monkeypatch):
    import shutil

    import edgeft.decoder.model as dm

    src = tmp_path / "m.gguf"
    shutil.copyfile(tiny_gguf, src)
    calls = []
    real = dm.convert_gguf
    monkeypatch.setattr(dm, "convert_gguf", lambda g, o: calls.append(g) or real(g, o))
    folder = tmp_path / "cache" / "m"
    assert dm.cached_conversion(src, folder) == folder
    assert dm.cached_conversion(src, folder) == folder
    assert len(calls) == 1
    write_tiny_gguf(src, tiny_hf, broken_tokenizer=False)  # a changed source: new sha256
    dm.cached_conversion(src, folder)
    from edgeft.artifacts import sha256_file
    assert len(calls) == 2 and dm.converted_sha256(folder) == sha256_file(src)
    # resolve_decoder: a .gguf path goes into the cache under its name and hash; a folder is used as is
    got = dm.resolve_decoder(src, cache=tmp_path / "c2")
    assert got.parent == tmp_path / "c2" and got.name.startswith("m-")
    assert dm.resolve_decoder(tiny_hf) == tiny_hf


@pytest.mark.parametrize("content, needle", [
    (b"not a gguf at all, just some bytes" * 10, "is not a GGUF file"),
    (b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 40, "is not a readable GGUF file"),
    (b"GGUF", "is not a readable GGUF file"),
    (b"", "is not a GGUF file"),
])
def test_an_unreadable_gguf_is_one_line_and_writes_nothing(tmp_path, content, needle, monkeypatch):
    from edgeft.decoder.model import resolve_decoder

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content)
    cache = tmp_path / "cache"
    with pytest.raises(ModelError) as e:
        resolve_decoder(bad, cache=cache)
    line = e.value.one_line()
    assert needle in line and "\n" not in line and "(fix:" in line
    assert not cache.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]


def test_a_truncated_gguf_is_one_line_and_writes_nothing(tiny_gguf, tmp_path):
    from edgeft.decoder.model import convert_gguf

    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[: tiny_gguf.stat().st_size // 2])
    out = tmp_path / "out"
    with pytest.raises(ModelError) as e:
        convert_gguf(cut, out)
    assert "cut.gguf" in e.value.one_line() and "\n" not in e.value.one_line()
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["cut.gguf"]


def test_unknown_names_and_missing_files(tmp_path):
    from edgeft.decoder.model import builtin_gguf, resolve_decoder

    with pytest.raises(ModelError, match="not a built-in name"):
        resolve_decoder("smollm3-9000m", cache=tmp_path)
    with pytest.raises(ModelError, match="not a built-in decoder"):
        builtin_gguf("nope")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelError, match="neither a Hugging Face folder nor a GGUF"):
        resolve_decoder(tmp_path / "notes.txt", cache=tmp_path / "c")


def test_untie_lm_head_gives_the_head_its_own_weights(tiny_hf):
    import torch

    from edgeft.decoder.model import load_causal_lm, untie_lm_head

    model = load_causal_lm(tiny_hf)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert untie_lm_head(model) is True
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    assert model.config.tie_word_embeddings is False
    assert untie_lm_head(model) is False  # already untied
