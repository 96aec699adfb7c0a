"""bench/decoder_bench.py's pure parts: llama-bench / llama-perplexity parsing, summaries, paired ratios, the
targets' verdicts and the markdown. Fast: no model, no llama.cpp (the script must import without it)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import decoder_bench as db  # noqa: E402

LLAMA_BENCH_JSON = """ggml_cpu: some log line
[
  {"build_commit": "0c1e570", "build_number": 1, "cpu_info": "AMD EPYC", "model_type": "llama ?B Q8_0",
   "model_size": 144000000, "n_threads": 2, "n_prompt": 32, "n_gen": 0, "n_depth": 0,
   "avg_ns": 100000000, "stddev_ns": 1, "avg_ts": 320.0, "stddev_ts": 3.0, "samples_ns": [1], "samples_ts": [320.0]},
  {"build_commit": "0c1e570", "build_number": 1, "cpu_info": "AMD EPYC", "model_type": "llama ?B Q8_0",
   "model_size": 144000000, "n_threads": 2, "n_prompt": 256, "n_gen": 0, "n_depth": 0,
   "avg_ns": 500000000, "stddev_ns": 1, "avg_ts": 512.0, "stddev_ts": 5.0, "samples_ns": [1], "samples_ts": [512.0]},
  {"build_commit": "0c1e570", "build_number": 1, "cpu_info": "AMD EPYC", "model_type": "llama ?B Q8_0",
   "model_size": 144000000, "n_threads": 2, "n_prompt": 0, "n_gen": 64, "n_depth": 0,
   "avg_ns": 800000000, "stddev_ns": 1, "avg_ts": 80.0, "stddev_ts": 1.0, "samples_ns": [1],
   "samples_ts": [79.0, 81.0]}
]
"""


def test_parse_llama_bench_and_its_figures():
    rows = db.parse_llama_bench(LLAMA_BENCH_JSON)
    assert [(r["n_prompt"], r["n_gen"]) for r in rows] == [(32, 0), (256, 0), (0, 64)]
    assert rows[2]["samples_ts"] == [79.0, 81.0] and rows[0]["build_commit"] == "0c1e570"
    f = db.llama_bench_figures(rows, 32, 256, 64)
    assert f["decode_tok_s"] == 80.0 and f["prompt_tok_s"] == 512.0
    assert f["ttft_s"] == pytest.approx(32 / 320.0)
    assert db.llama_bench_figures(rows, 32, 256, 128)["decode_tok_s"] is None
    with pytest.raises(ValueError):
        db.parse_llama_bench("error: no model")


def test_parse_llama_perplexity():
    out = ("perplexity: calculating perplexity over 4 chunks, n_ctx=256, batch_size=256, n_seq=1\n"
           "[1]30.1,[2]35.2,[3]38.0,[4]39.3,\nFinal estimate: PPL = 39.2800 +/- 2.12345\n")
    assert db.parse_llama_perplexity(out) == {"perplexity": 39.28, "stderr": 2.12345, "chunks": 4, "n_ctx": 256}
    assert db.parse_llama_perplexity("failed to load model") is None


def test_nll_perplexities_second_half_matches_llama_perplexity_rule():
    nll = np.zeros((2, 7))  # n_ctx 8: 7 predictions per block
    nll[:, 4:] = math.log(4.0)  # positions j >= 4 predict tokens 5..7: llama-perplexity's scored tokens
    p = db.nll_perplexities(nll, 8)
    assert p["second_half"] == pytest.approx(4.0) and p["second_half_tokens"] == 2 * (8 - 1 - 4)
    assert p["all_positions"] == pytest.approx(math.exp(3 / 7 * math.log(4.0))) and p["all_tokens"] == 14


def test_summarize_and_rotation():
    s = db.summarize([10.0, 12.0, 11.0, float("nan"), None])
    assert s == {"median": 11.0, "min": 10.0, "max": 12.0, "n": 3, "spread": pytest.approx(2 / 11)}
    assert db.summarize([])["median"] is None
    assert db.rotated(["a", "b", "c"], 1) == ["b", "c", "a"] and db.rotated(["a", "b", "c"], 3) == ["a", "b", "c"]
    assert db.rotated([], 2) == []


def _cell(decode, ttft=0.05, prompt=500.0, rss=300.0):
    return {"decode_tok_s": decode, "ttft_s": ttft, "prompt_tok_s": prompt, "peak_rss_mb": rss}


def _fixture(int4_decode=(60.0, 70.0), int4_ppl=42.0, int4_size=90.0):
    # two repeats where the machine drifts by 2x: the paired ratios stay put
    names = {db.TORCH: (15.0, 14.0), db.ORT_FP32: (20.0, 19.0), db.INT8: (45.0, 60.0), db.INT4: int4_decode,
             db.LLAMA_Q8: (50.0, 80.0)}
    rounds = [{v: {"t1": _cell(d1 * k), "t2": _cell(d2 * k)} for v, (d1, d2) in names.items()} for k in (1.0, 0.5)]
    static = {db.TORCH: {"perplexity": 40.0, "size_mb": 540.0, "bits": 32, "runtime": "torch"},
              db.ORT_FP32: {"perplexity": 40.0, "size_mb": 650.0, "bits": 32, "runtime": "ort"},
              db.INT8: {"perplexity": 40.2, "size_mb": 190.0, "bits": 8, "runtime": "ort"},
              db.INT4: {"perplexity": int4_ppl, "size_mb": int4_size, "bits": 4, "runtime": "ort"},
              db.LLAMA_Q8: {"perplexity": None, "size_mb": 145.0, "bits": None, "runtime": "llama.cpp"}}
    return rounds, static


def test_table_ratios_are_paired_within_each_repeat():
    rounds, static = _fixture()
    table = db.build_table(rounds, static, ["t1", "t2"])
    c = table[db.INT8]["threads"]["t1"]
    assert c["decode_tok_s"]["median"] == pytest.approx((45.0 + 22.5) / 2)
    assert c["vs_torch"]["median"] == pytest.approx(3.0) and c["vs_torch"]["spread"] == pytest.approx(0.0)
    assert c["vs_llama_q8"]["median"] == pytest.approx(0.9)
    assert table[db.INT8]["static"]["ppl_increase"] == pytest.approx(0.005)
    assert table[db.LLAMA_Q8]["static"]["ppl_increase"] is None


def test_verdicts_met_and_missed():
    rounds, static = _fixture()
    v = db.verdicts(db.build_table(rounds, static, ["t1", "t2"]), ["t1", "t2"])
    assert v["best_within_2pct"] == db.INT8  # fp32 is within 2% too but slower
    checks = {c["target"]: c for c in v["checks"]}
    q8 = [c for t, c in checks.items() if "Q8_0" in t]
    assert [c["met"] for c in q8] == [True, False]  # 0.9x at 1 thread, 0.75x at 2
    torch_checks = [c for t, c in checks.items() if "torch fp32" in t]
    assert all(c["met"] for c in torch_checks)
    four = next(c for t, c in checks.items() if t.startswith("a 4-bit"))
    assert four["met"] is True and four["value"] == db.INT4
    lora = next(c for t, c in checks.items() if t.startswith("LoRA"))
    assert lora["met"] is None
    # a 4-bit variant that is slower than 8-bit at 2 threads, or too big, or too inaccurate: missed
    for kw in ({"int4_decode": (60.0, 55.0)}, {"int4_size": 120.0}, {"int4_ppl": 45.0}):
        rounds, static = _fixture(**kw)
        v = db.verdicts(db.build_table(rounds, static, ["t1", "t2"]), ["t1", "t2"])
        assert next(c for c in v["checks"] if c["target"].startswith("a 4-bit"))["met"] is False, kw


def test_verdicts_without_llama_cpp_are_not_measured():
    rounds, static = _fixture()
    for r in rounds:
        r.pop(db.LLAMA_Q8)
    static.pop(db.LLAMA_Q8)
    v = db.verdicts(db.build_table(rounds, static, ["t1", "t2"]), ["t1", "t2"])
    q8 = [c for c in v["checks"] if "Q8_0" in c["target"]]
    assert len(q8) == 2 and all(c["met"] is None for c in q8)


def test_render_md_has_every_variant_the_targets_and_the_provenance():
    rounds, static = _fixture()
    table = db.build_table(rounds, static, ["t1", "t2"])
    doc = {"created": "2026-12-01T22:00:00", "command": "python bench/decoder_bench.py", "git_commit": "abc",
           "git_dirty": False, "git_changed": [], "cpu": {"model": "EPYC", "usable_cores": 2, "flags": ["avx2"],
                                                          "has_vnni": False, "has_amx_int8": False},
           "versions": {"onnxruntime": "1.32.0"}, "loadavg_start": [0.1, 0.2, 0.3], "model": db.MODEL,
           "llama_cpp": {"summary": "built from llama-cpp-python 0.3.36"}, "threads": ["t1", "t2"], "repeats": 2,
           "inner_runs": 3, "new_tokens": 64, "prompts": {"short_tokens": 32, "long_tokens": 256},
           "perplexity": {"tokens": 1024, "blocks": 4, "n_ctx": 256, "note": "Perplexity: note."},
           "table": table, "verdicts": db.verdicts(table, ["t1", "t2"]), "notes": ["a note"],
           "skipped": ["llama.cpp Q4_K_M: failed"],
           "explore": [{"name": "rtn b32 sym", "size_mb": 92.0, "perplexity": 48.0, "ppl_increase": 0.2,
                        "decode_tok_s": 50.0, "quantize_s": 10.0}]}
    md = db.render_md(doc)
    for v in static:
        assert f"| {v} |" in md
    assert "## 1 thread(s)" in md and "## 2 thread(s)" in md and "**met**" in md and "not measured" in md
    assert "- command: `python bench/decoder_bench.py`" in md and "EPYC" in md and "a note" in md
    assert "rtn b32 sym" in md and "Q4_K_M: failed" in md
    json.dumps(doc)  # the result file is plain JSON


def test_the_script_imports_and_parses_without_llama_cpp(tmp_path):
    info = db.ensure_llama_cpp.__doc__
    assert info and db.LLAMA_TOOLS == ("llama-bench", "llama-quantize", "llama-perplexity")
    assert db.llama_cpp_commit(tmp_path) is None
    (tmp_path / "CHANGELOG.md").write_text("- feat: update llama.cpp to ggml-org/llama.cpp@0c1e57098\n")
    assert db.llama_cpp_commit(tmp_path) == "0c1e57098"
