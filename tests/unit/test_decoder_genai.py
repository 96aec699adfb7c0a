"""The fused export (onnxruntime-genai's model builder) and its quantized candidates, on a tiny
in-process Llama: validated against torch like the optimum export, quantized by the builder, and
the genai runtime's greedy tokens equal edgeft's loop."""

from __future__ import annotations

import json

import pytest

from edgeft.errors import EdgeftError, ModelError

pytest.importorskip("onnxruntime_genai")


def _one_line(e: EdgeftError) -> str:
    text = e.one_line()
    assert "\n" not in text
    return text


@pytest.fixture(scope="module")
def blocks(tiny_llama_blocks):
    return tiny_llama_blocks


@pytest.fixture(scope="module")
def fused(tiny_llama, blocks, tmp_path_factory):
    from edgeft.decoder.export import export_decoder

    return export_decoder(tiny_llama, tmp_path_factory.mktemp("fused") / "onnx", blocks=blocks)  # genai: the default


@pytest.fixture(scope="module")
def parent(fused, tiny_llama_tok, blocks):
    from edgeft.decoder.export import prompt_ids
    from edgeft.decoder.quantize import parent_reference

    return parent_reference(fused[0], blocks, prompt_ids(tiny_llama_tok), new_tokens=16, threads=1)


def test_fused_export_matches_torch_with_a_fused_graph(fused, tiny_llama):
    from edgeft.export import op_counts

    path, report = fused
    assert report.ok and report.greedy_equal == report.prompts == 4 and report.perplexity_rel_diff <= 1e-3
    record = json.loads((path.parent / "edgeft-export.json").read_text())
    assert record["exporter"] == "genai" and record["lm_head_untied"] is False
    counts = op_counts(path)
    layers = json.loads((tiny_llama / "config.json").read_text())["num_hidden_layers"]
    assert counts["GroupQueryAttention"] == layers and counts["SkipSimplifiedLayerNormalization"] == 2 * layers
    assert sum(counts.values()) < 15 * layers + 20  # ~11 nodes a layer (optimum: ~250)
    for name in ("genai_config.json", "config.json", "tokenizer.json", "chat_template.jinja"):
        assert (path.parent / name).is_file(), name
    # the folder's own tokenizer files, not the builder's copies
    assert (path.parent / "tokenizer_config.json").read_bytes() == (tiny_llama / "tokenizer_config.json").read_bytes()


def test_genai_runtime_greedy_equals_edgefts_loop(fused, tiny_llama_tok):
    from edgeft.decoder.genai import GenaiGenerator
    from edgeft.decoder.generate import OrtDecoder

    ids = tiny_llama_tok("The capital of France is", add_special_tokens=False)["input_ids"]
    ours = OrtDecoder(fused[0], threads=1).generate(ids, 24)
    theirs = GenaiGenerator(fused[0].parent, threads=1).generate(ids, 24)
    assert theirs.tokens == ours.tokens and theirs.runtime == "onnxruntime-genai"
    assert theirs.ttft_s > 0 and theirs.decode_s > 0 and theirs.prompt_tokens == len(ids)


@pytest.mark.parametrize("kw, ops", [
    (dict(bits=8), {"MatMulNBits"}),
    (dict(bits=4, algorithm="k_quant", embedding=True, int8_groups=("last_matmul", "mixed_layers")),
     {"MatMulNBits", "GatherBlockQuantized"}),
    (dict(bits=4, symmetric=False, algorithm="hqq"), {"MatMulNBits"}),
])
def test_fused_candidates_are_quantized_and_checked(fused, parent, blocks, tiny_llama, tmp_path, kw, ops):
    from edgeft.decoder.quantize import WeightOnlyScheme, check_candidate, quantize_weight_only
    from edgeft.export import op_counts

    scheme = WeightOnlyScheme(**kw)
    path = quantize_weight_only(fused[0], tmp_path / scheme.name, scheme, source_model=tiny_llama)
    counts = op_counts(path)
    assert ops <= set(counts) and counts.get("MatMul", 0) == 0 and counts["GroupQueryAttention"] >= 1
    assert (path.parent / "genai_config.json").is_file() and (path.parent / "config.json").is_file()
    check = check_candidate(path, parent, blocks, scheme=scheme, threads=1)
    assert not check.rejected, check.problems
    if scheme.bits == 8:
        assert abs(check.perplexity_increase) < 0.02 and check.top1_agreement > 0.95
    if scheme.int8_groups:  # the lm_head kept at 8 bits, its matrix shared with the embedding
        import onnx
        from onnx import helper

        g = onnx.load(str(path), load_external_data=False).graph
        bits = {n.name: {a.name: helper.get_attribute_value(a) for a in n.attribute}.get("bits") for n in g.node
                if n.op_type in ("MatMulNBits", "GatherBlockQuantized")}
        assert bits["/lm_head/MatMul_Q8"] == 8 and 4 in bits.values()


def test_builder_options_follow_the_scheme():
    from edgeft.decoder.quantize import WeightOnlyScheme, builder_options

    precision, opts = builder_options(WeightOnlyScheme(bits=4, block_size=64, symmetric=False, algorithm="k_quant",
                                                       embedding=True, int8_groups=("last_matmul",)))
    assert precision == "int4"
    assert opts == {"block_size": "64", "is_symmetric": "false", "algo_config": "k_quant", "accuracy_level": "4",
                    "op_types_to_quantize": "MatMul/Gather", "matmul_mixed_precision": "last_matmul:int8"}
    _, opts = builder_options(WeightOnlyScheme(bits=8, accuracy_level=None))
    assert opts["shared_embeddings"] == "false" and "accuracy_level" not in opts


def test_scheme_and_graph_mismatches_are_one_line(fused, tmp_path):
    from edgeft.decoder.quantize import WeightOnlyScheme, check_scheme_for_exporter, quantize_weight_only

    with pytest.raises(ModelError) as e:
        check_scheme_for_exporter(WeightOnlyScheme(bits=4, symmetric=False, algorithm="gptq"), "genai")
    assert "gptq is for optimum exports" in _one_line(e.value)
    with pytest.raises(ModelError) as e:
        check_scheme_for_exporter(WeightOnlyScheme(bits=4, int8_groups=("last_matmul",)), "optimum")
    assert "needs the fused export" in _one_line(e.value)
    with pytest.raises(ModelError) as e:
        WeightOnlyScheme(bits=8, int8_groups=("last_matmul",))
    assert "4-bit model" in _one_line(e.value)
    with pytest.raises(ModelError) as e:
        WeightOnlyScheme(bits=4, int8_groups=("attention",))
    assert "not known" in _one_line(e.value)
    with pytest.raises(ModelError) as e:  # the builder needs the Hugging Face folder
        quantize_weight_only(fused[0], tmp_path / "q", WeightOnlyScheme(bits=8))
    assert "source_model" in _one_line(e.value) and not (tmp_path / "q").exists()


def test_a_failed_build_is_one_line_and_writes_nothing(tmp_path):
    from conftest import make_tiny_classifier

    from edgeft.decoder import genai

    bert = make_tiny_classifier(tmp_path / "bert", num_labels=2)  # not a causal LM the builder knows
    with pytest.raises(ModelError) as e:
        genai.build(bert, tmp_path / "out")
    assert "builder failed" in _one_line(e.value) and not (tmp_path / "out" / "model.onnx").exists()
