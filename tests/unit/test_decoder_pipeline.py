"""`edgeft run` on a text-generation recipe, end to end on a tiny Llama and a toy corpus: the recipe
schema and its dispatch, compress (export, weight-only candidates, the choice, the report), bench
(every variant at every thread count, interleaved), the run folder, bad input writing nothing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeft.cli import cli

sys.path.insert(0, str(Path(__file__).parent))
from test_decoder_tiny import TEXT, make_tiny_llama  # noqa: E402


def _run(args: list) -> tuple[int, str]:
    res = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return res.exit_code, res.output


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("dec")
    model = make_tiny_llama(base / "llama", context=256)
    corpus = base / "corpus.txt"
    corpus.write_text("\n\n".join(TEXT.replace("sea", f"sea {i}") for i in range(30)))
    return model, corpus


def _recipe(tmp_path: Path, model: Path, corpus: Path, **extra) -> Path:
    import yaml

    data = {"task": "text-generation", "name": "tiny-dec", "model": {"name": str(model)},
            "data": {"corpus": str(corpus), "block_size": 32, "eval_blocks": 2},
            "compress": {"max_perplexity_increase": 1.0, "schemes": [{"bits": 8, "block_size": 16},
                                                                      {"bits": 4, "block_size": 16}]},
            "bench": {"threads": [1], "prompt_tokens": 8, "new_tokens": 8, "repeats": 2},
            "stages": ["compress", "bench"]}
    for k, v in extra.items():
        data[k] = {**data.get(k, {}), **v} if isinstance(v, dict) else v
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_text_generation_recipe_schema_and_dispatch(tiny, tmp_path):
    from edgeft.decoder.recipe import DecoderRecipe
    from edgeft.recipe import load_recipe

    r = load_recipe(_recipe(tmp_path, *tiny))
    assert isinstance(r, DecoderRecipe) and r.compress.schemes[1].bits == 4 and r.bench.threads == [1]
    assert load_recipe(None).task == "text-classification"
    code, text = _run(["recipe", _recipe(tmp_path, *tiny)])
    assert code == 0 and "task: text-generation" in text
    from edgeft.errors import RecipeError

    with pytest.raises(RecipeError, match="compress.max_perplexity_increase"):
        load_recipe(_recipe(tmp_path, *tiny), ["compress.max_perplexity_increase=0"])
    with pytest.raises(RecipeError, match="stages"):
        load_recipe(_recipe(tmp_path, *tiny), ["stages=[bench]"])
    code, text = _run(["finetune", _recipe(tmp_path, *tiny)])
    assert code == 2 and "edgeft run" in text


def test_run_compresses_and_benches_a_tiny_decoder(tiny, tmp_path):
    out = tmp_path / "run"
    code, text = _run(["run", _recipe(tmp_path, *tiny), "--out", out, "--quiet"])
    assert code == 0, text
    assert text.strip().splitlines()[-1] == str(out)
    rep = json.loads((out / "compress" / "report.json").read_text())
    names = [c["name"] for c in rep["quantize"]["candidates"]]
    assert names == ["int8-rtn-b16-sym-acc4", "int4-rtn-b16-sym-acc4"] and rep["goal_met"]
    assert rep["export"]["greedy_equal"] if "greedy_equal" in rep["export"] else True
    assert rep["final"] in names and (out / "compress" / rep["final_path"]).is_file()
    assert all(not Path(c["path"]).is_absolute() for c in rep["quantize"]["candidates"])
    assert set(rep["test_perplexity"]) == {"onnx_fp32", rep["final"]}
    bench = json.loads((out / "bench.json").read_text())
    variants = {r["variant"] for r in bench["rows"]}
    assert variants == {"torch_fp32", "onnx_fp32", *names}
    for r in bench["rows"]:
        assert r["rounds"] == 2 and r["decode_tok_s"] > 0 and r["test_perplexity"] > 1 and r["size_mb"] > 0
    assert "decode tok/s" in (out / "bench.md").read_text()
    m = json.loads((out / "manifest.json").read_text())
    assert m["stages"] == ["compress", "bench"] and m["status"] == "complete" and m["task"] == "text-generation"


def test_goal_missed_keeps_the_best_and_exits_1(tiny, tmp_path):
    out = tmp_path / "run"
    path = _recipe(tmp_path, *tiny, stages=["compress"],
                   compress={"max_perplexity_increase": 1e-9, "schemes": [{"bits": 4, "block_size": 16}]})
    code, text = _run(["run", path, "--out", out, "--quiet"])
    assert code == 1 and "no weight-only candidate within" in text
    rep = json.loads((out / "compress" / "report.json").read_text())
    assert rep["goal_met"] is False and rep["final"] == "int4-rtn-b16-sym-acc4"


@pytest.mark.parametrize("edit, message", [
    ({"data": {"corpus": "no-such-corpus"}}, "is not a built-in corpus"),
    ({"bench": {"prompt_tokens": 250, "new_tokens": 64}}, "context"),
    ({"compress": {"schemes": [{"bits": 8, "algorithm": "hqq"}]}}, "hqq quantizes to 4 bits only"),
])
def test_bad_input_is_one_line_and_writes_nothing(tiny, tmp_path, edit, message):
    out = tmp_path / "run"
    code, text = _run(["run", _recipe(tmp_path, *tiny, **edit), "--out", out, "--quiet"])
    assert code == 2 and message in text and "Traceback" not in text, text
    assert not out.exists()


def test_finetune_then_compress_takes_the_fine_tuned_model(tiny, tmp_path):
    out = tmp_path / "run"
    path = _recipe(tmp_path, *tiny, stages=["finetune", "compress"],
                   finetune={"method": "lora", "max_steps": 3, "block_size": 32, "batch_size": 4, "max_eval_blocks": 2,
                             "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}},
                   compress={"schemes": [{"bits": 8, "block_size": 16}]})
    code, text = _run(["run", path, "--out", out, "--quiet"])
    assert code == 0, text
    metrics = json.loads((out / "finetuned" / "metrics.json").read_text())
    assert metrics["method"] == "lora"
    rep = json.loads((out / "compress" / "report.json").read_text())
    assert Path(rep["source_model"]) == (out / "finetuned").resolve()
    assert json.loads((out / "manifest.json").read_text())["stages"] == ["finetune", "compress"]


def test_prefix_tuning_cannot_feed_compress(tiny, tmp_path):
    from edgeft.errors import RecipeError
    from edgeft.recipe import load_recipe

    with pytest.raises(RecipeError, match="prefix tuning cannot be merged"):
        load_recipe(_recipe(tmp_path, *tiny, stages=["finetune", "compress"], finetune={"method": "prefix"}))
