"""Decoder export (KV cache, lm_head untied, validated), the ORT generate loop, perplexity and
weight-only quantization with its checks, on a tiny in-process Llama."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from edgeft.errors import DataError, EdgeftError, ModelError


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    return tiny_llama


@pytest.fixture(scope="module")
def tok(tiny_llama_tok):
    return tiny_llama_tok


@pytest.fixture(scope="module")
def blocks(tiny_llama_blocks):
    return tiny_llama_blocks


@pytest.fixture(scope="module")
def exported(tiny, blocks, tmp_path_factory):
    from edgeft.decoder.export import export_decoder

    return export_decoder(tiny, tmp_path_factory.mktemp("export") / "onnx", blocks=blocks, exporter="optimum")


def _one_line(e: EdgeftError) -> str:
    text = e.one_line()
    assert "\n" not in text
    return text


def test_export_matches_torch_and_unties_the_lm_head(exported, tiny):
    import onnx

    path, report = exported
    assert report.ok and report.greedy_equal == report.prompts == 4 and report.new_tokens == 32
    assert report.perplexity_rel_diff <= 1e-3
    folder = path.parent
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "edgeft-export.json"):
        assert (folder / name).is_file(), name
    record = json.loads((folder / "edgeft-export.json").read_text())
    assert record["lm_head_untied"] is True and record["validation"]["ok"] is True
    assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is False
    model = onnx.load(str(path))
    names = [i.name for i in model.graph.input]
    assert "past_key_values.0.key" in names and "position_ids" in names
    inits = {i.name: list(i.dims) for i in model.graph.initializer}
    weights = {n.input[1] for n in model.graph.node if n.op_type == "MatMul"}
    cfg = json.loads((tiny / "config.json").read_text())
    # the lm_head is a MatMul weight [hidden, vocab] of its own (a quantizer can reach it)
    assert [cfg["hidden_size"], cfg["vocab_size"]] in [inits[w] for w in weights if w in inits]


def test_failed_validation_raises_and_writes_nothing(tiny, blocks, tmp_path):
    from edgeft.decoder.export import export_decoder

    out = tmp_path / "onnx"
    with pytest.raises(ModelError) as e:
        export_decoder(tiny, out, blocks=blocks, ppl_rtol=-1.0, exporter="optimum")  # no perplexity passes
    assert "does not match torch" in _one_line(e.value)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no partial folder either


def test_ort_generate_equals_torch_and_times_its_phases(exported, tiny, tok):
    from edgeft.decoder.generate import OrtDecoder, torch_greedy
    from edgeft.decoder.model import load_causal_lm

    model = load_causal_lm(tiny)
    dec = OrtDecoder(exported[0], threads=1)
    for text in ("The capital of France is", "def fibonacci(n):", "x"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        ref = torch_greedy(model, ids, 40)
        got = dec.generate(ids, 40)
        assert got.tokens == ref.tokens
        assert got.prompt_tokens == len(ids) and got.ttft_s > 0 and got.decode_s > 0
        s = got.summary()
        assert s["new_tokens"] == 40 and s["decode_tok_s"] > 0 and s["prompt_tok_s"] > 0
    # stopping at eos: the loop stops right after the first eos torch would produce
    ids = tok("To be, or not", add_special_tokens=False)["input_ids"]
    full = dec.generate(ids, 60).tokens
    eos = full[5]
    stopped = dec.generate(ids, 60, eos_token_id=eos)
    assert stopped.stopped_at_eos and stopped.tokens == full[:full.index(eos) + 1]
    assert torch_greedy(model, ids, 60, eos_token_id=eos).tokens == stopped.tokens


def test_prompt_longer_than_the_context_is_one_line(exported, tiny):
    from edgeft.decoder.generate import OrtDecoder, torch_greedy
    from edgeft.decoder.model import load_causal_lm

    dec = OrtDecoder(exported[0])
    context = json.loads((tiny / "config.json").read_text())["max_position_embeddings"]
    for run in (lambda ids, n: dec.generate(ids, n), lambda ids, n: torch_greedy(load_causal_lm(tiny), ids, n)):
        with pytest.raises(DataError) as e:
            run([5] * context, 1)
        assert f"context of {context} tokens" in _one_line(e.value)
        with pytest.raises(DataError) as e:
            run([5] * (context - 4), 8)  # prompt fits, prompt + new tokens does not
        assert "exceeds" in _one_line(e.value)
        with pytest.raises(DataError):
            run([], 4)
    assert len(dec.generate([5] * (context - 4), 4).tokens) == 4  # exactly fills the context


def test_perplexity_torch_and_ort_agree(exported, tiny, blocks):
    from edgeft.decoder.evaluate import ort_perplexity, torch_perplexity, top1_agreement
    from edgeft.decoder.model import load_causal_lm

    model = load_causal_lm(tiny)
    pt = torch_perplexity(model, blocks, batch_size=3)  # batching does not change the figure
    po = ort_perplexity(exported[0], blocks, batch_size=2)
    assert pt.tokens == po.tokens == blocks.shape[0] * (blocks.shape[1] - 1)
    assert abs(po.perplexity - pt.perplexity) / pt.perplexity < 1e-4
    assert top1_agreement(pt, po) == 1.0
    # an untrained model is about as good as uniform over the vocabulary, a real check of the maths
    import torch
    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(blocks)).logits[:, :-1]
        ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.as_tensor(blocks[:, 1:]).reshape(-1))
    assert math.isclose(pt.perplexity, math.exp(float(ref)), rel_tol=1e-5)
    with pytest.raises(DataError):
        torch_perplexity(model, np.zeros((0, 8), dtype=np.int64))


# ---------------------------------------------------------------- quantization

@pytest.fixture(scope="module")
def parent(exported, tok, blocks):
    from edgeft.decoder.export import prompt_ids
    from edgeft.decoder.quantize import parent_reference

    return parent_reference(exported[0], blocks, prompt_ids(tok), new_tokens=16, threads=1)


@pytest.mark.parametrize("scheme_kw, op", [
    (dict(bits=8, block_size=32, symmetric=True), "MatMulNBits"),
    (dict(bits=4, block_size=32, symmetric=False), "MatMulNBits"),
    (dict(bits=4, block_size=16, symmetric=True, embedding=True), "GatherBlockQuantized"),
    (dict(bits=4, block_size=32, symmetric=False, algorithm="hqq", embedding=True, accuracy_level=4),
     "GatherBlockQuantized"),
    (dict(bits=8, block_size=32, accuracy_level=4), "MatMulNBits"),
])
def test_weight_only_candidates_are_quantized_and_checked(exported, parent, blocks, tmp_path, scheme_kw, op):
    from edgeft.decoder.quantize import WeightOnlyScheme, check_candidate, quantize_weight_only
    from edgeft.export import op_counts

    scheme = WeightOnlyScheme(**scheme_kw)
    path = quantize_weight_only(exported[0], tmp_path / scheme.name, scheme)
    counts = op_counts(path)
    assert counts.get(op, 0) >= 1
    assert counts.get("MatMul", 0) < op_counts(exported[0])["MatMul"]  # the weight MatMuls are gone
    assert (path.parent / "tokenizer.json").is_file() and (path.parent / "config.json").is_file()
    if scheme.accuracy_level is not None:  # set on every MatMulNBits, whichever algorithm wrote it
        import onnx
        from onnx import helper
        nodes = [n for n in onnx.load(str(path)).graph.node if n.op_type == "MatMulNBits"]
        assert all({a.name: helper.get_attribute_value(a) for a in n.attribute}.get("accuracy_level") == 4
                   for n in nodes)
    check = check_candidate(path, parent, blocks, scheme=scheme, threads=1)
    assert not check.rejected, check.problems
    assert math.isfinite(check.perplexity) and check.top1_agreement >= 0.5
    assert check.size_mb < sum(p.stat().st_size for p in exported[0].parent.glob("*.onnx")) / 1e6
    assert check.decode_tok_s and check.decode_tok_s > 0
    if scheme.bits == 8:
        assert abs(check.perplexity_increase) < 0.02 and check.top1_agreement > 0.95


def test_gptq_with_train_calibration(exported, parent, blocks, tmp_path):
    from edgeft.decoder.quantize import WeightOnlyScheme, check_candidate, quantize_weight_only
    from edgeft.export import op_counts

    scheme = WeightOnlyScheme(bits=4, block_size=32, symmetric=False, algorithm="gptq")
    with pytest.raises(DataError) as e:
        quantize_weight_only(exported[0], tmp_path / "no-calibration", scheme)
    assert "calibration" in _one_line(e.value) and not (tmp_path / "no-calibration").exists()
    path = quantize_weight_only(exported[0], tmp_path / scheme.name, scheme, calibration=blocks[:3])
    assert op_counts(path).get("MatMulNBits", 0) >= 1
    assert not check_candidate(path, parent, blocks, threads=1).rejected


def _break_lm_head(src: Path, dst: Path) -> Path:
    """A copy of the ONNX decoder with its lm_head weight's columns shuffled: a 'quantization' that
    runs and produces finite logits, but garbage (like quantize_dynamic per-channel on SmolLM2)."""
    import shutil

    import onnx
    from onnx import numpy_helper

    shutil.copytree(src.parent, dst)
    model = onnx.load(str(dst / "model.onnx"))
    vocab = json.loads((src.parent / "config.json").read_text())["vocab_size"]
    for i, init in enumerate(model.graph.initializer):
        w = numpy_helper.to_array(init)
        if w.ndim == 2 and w.shape[1] == vocab:
            perm = np.random.default_rng(0).permutation(vocab)
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(w[:, perm].copy(), init.name))
    onnx.save(model, str(dst / "model.onnx"))
    return dst / "model.onnx"


def test_a_garbage_quantization_is_rejected_and_never_chosen(exported, parent, blocks, tmp_path):
    from edgeft.decoder.quantize import WeightOnlyScheme, check_candidate, choose, quantize_weight_only

    broken = check_candidate(_break_lm_head(exported[0], tmp_path / "broken"), parent, blocks, name="broken")
    assert broken.rejected and any("agreement" in p for p in broken.problems)
    good = check_candidate(quantize_weight_only(exported[0], tmp_path / "int8", WeightOnlyScheme(8)), parent, blocks,
                           name="int8")
    # even when the garbage one is "faster and smaller", and even on a miss, it is not kept
    broken.size_mb, broken.decode_tok_s = 0.001, 1e9
    assert choose([broken, good]).chosen.name == "int8"
    assert choose([broken, good], max_perplexity_increase=-1).chosen.name == "int8"
    with pytest.raises(ModelError) as e:
        choose([broken])
    assert "every quantized candidate failed" in _one_line(e.value)


def _cand(name, inc, size, speed, rejected=False):
    from edgeft.decoder.quantize import CandidateCheck

    return CandidateCheck(name, f"{name}/model.onnx", size, 10 * (1 + inc), 10.0, inc, 0.9, 0.5, speed, rejected)


def test_choose_fastest_within_goal_smallest_without_speed_best_on_miss():
    from edgeft.decoder.quantize import choose

    a, b, c = _cand("int8", 0.005, 260, 30.0), _cand("int4", 0.015, 200, 40.0), _cand("int4-emb", 0.3, 100, 50.0)
    got = choose([a, b, c])
    assert got.goal_met and got.chosen.name == "int4"  # c is faster but misses 2%
    assert choose([a, b, c], max_perplexity_increase=0.5).chosen.name == "int4-emb"
    assert choose([a, b], by="size").chosen.name == "int4"
    b.decode_tok_s = None
    assert choose([a, b]).chosen.name == "int4"  # a speed is missing: the smallest
    miss = choose([a, b, c], max_perplexity_increase=0.001)
    assert not miss.goal_met and miss.chosen.name == "int8" and "kept" in miss.reason
    assert miss.summary()["candidates"][0]["name"] == "int8"


@pytest.mark.parametrize("kw, needle", [
    (dict(bits=3), "bits"),
    (dict(algorithm="awq"), "not known"),
    (dict(bits=8, algorithm="hqq"), "4 bits only"),
    (dict(bits=4, block_size=24), "power of two"),
    (dict(bits=8, embedding=True), "embedding"),
    (dict(bits=4, algorithm="hqq", symmetric=True), "asymmetric"),
])
def test_bad_schemes_are_one_line_errors(kw, needle):
    from edgeft.decoder.quantize import WeightOnlyScheme

    with pytest.raises(ModelError) as e:
        WeightOnlyScheme(**kw)
    assert needle in _one_line(e.value)


def test_quantize_and_choose_end_to_end(exported, tok, blocks, tmp_path):
    from edgeft.decoder.export import prompt_ids
    from edgeft.decoder.quantize import WeightOnlyScheme, quantize_and_choose

    schemes = [WeightOnlyScheme(8, 32), WeightOnlyScheme(4, 32, symmetric=False, algorithm="hqq")]
    choice = quantize_and_choose(exported[0], tmp_path / "work", schemes, blocks, prompt_ids(tok)[:2], new_tokens=8,
                                 threads=1)
    assert {c.name for c in choice.candidates} == {s.name for s in schemes}
    assert choice.chosen is not None and Path(choice.chosen.path).is_file()
    assert choice.goal_met == any(c.perplexity_increase <= 0.02 for c in choice.candidates)
