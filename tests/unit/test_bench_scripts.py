"""The scripts behind the README's LayerNorm-kernel and thread-spin figures, on tiny sizes: they return the
fields their result files publish, the rewrite matches ORT's kernels, and the files carry their provenance.
No timing assertions (figures are measured in bench/, not asserted here)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

TINY_PLAN = dict(min_samples=5, target_samples=10, budget_s=0.3, block_ms=2.0, switch_idle_ms=1.0,
                 warmup_min_iters=10, warmup_min_s=0.0, warmup_max_s=0.1)


def test_layernorm_kernel_measures_the_rewrite_against_both_kernels():
    import layernorm_kernel as lk

    from edgeft.bench.timing import TimingPlan

    r = lk.measure((1, 8, 32), threads=1, repeats=2, plan=TimingPlan(**TINY_PLAN), with_torch=False)
    assert r["rewritten_nodes"] == {"layernorm": 1, "skiplayernorm": 1}
    assert "InstanceNormalization" in r["ops"]["skiplayernorm-as-instancenorm"]
    assert "SkipLayerNormalization" not in r["ops"]["skiplayernorm-as-instancenorm"]
    for name in ("layernorm", "skiplayernorm"):
        d = r["max_abs_diff"][name]
        assert d["kernel_vs_rewrite"] < 1e-4 and d["kernel_vs_float64"] < 1e-4 and d["rewrite_vs_float64"] < 1e-4
        assert set(r["ratios"][f"{name}_kernel_over_rewrite"]) == {"median", "per_repeat_min", "per_repeat_max"}
    assert set(r["variants"]) == {"ort-layernorm", "ort-layernorm-as-instancenorm", "ort-skiplayernorm",
                                  "ort-skiplayernorm-as-instancenorm", "ort-identity"}
    for v in r["variants"].values():
        assert v["median_us"] > 0 and v["samples"] >= 10 and len(v["median_us_per_repeat"]) == 2
        assert abs(v["ns_per_element"] - v["median_us"] * 1000 / 256) < 1e-9


def test_thread_spin_reports_every_condition_and_the_ratio():
    import thread_spin as ts

    r = ts.measure(threads=1, repeats=2, gaps=(0, 5), first=3, block_ms=2.0, rows=4, hidden=8, ffn=16)
    assert r["gaps_ms"] == [0, 5, 50]  # 0 and 50 are always there
    assert set(r["conditions"]) == {"after A, gap 0 ms", "after A, gap 5 ms", "after A, gap 50 ms",
                                    "after A (spinning off), gap 0 ms", "after B itself, gap 0 ms"}
    for c in r["conditions"].values():
        assert c["trials"] == 2 and len(c["per_call_ms_median"]) == 3 and c["first_n_mean_ms_median"] > 0
    assert r["ratio_no_gap_over_gap_50"] > 0 and r["ratio_no_gap_spinning_off_over_gap_50"] > 0


def test_result_files_record_command_commit_cpu_and_versions(tmp_path, monkeypatch):
    import thread_spin as ts

    real = ts.measure
    monkeypatch.setattr(ts, "measure", lambda *a, **k: real(threads=1, repeats=1, gaps=(0,), first=2, block_ms=1.0,
                                                           rows=4, hidden=8, ffn=16))
    assert ts.main(["--out", str(tmp_path)]) == 0
    (js,) = tmp_path.glob("*-thread-spin.json")
    doc = json.loads(js.read_text())
    assert doc["command"].startswith("python bench/thread_spin.py --out")
    assert "git_commit" in doc and isinstance(doc["git_dirty"], bool)
    assert {"model", "flags", "has_vnni"} <= set(doc["cpu"]) and doc["versions"]["onnxruntime"]
    md = js.with_suffix(".md").read_text()
    assert "git commit" in md and "no gap / 50 ms gap" in md


def test_compress_report_entry_has_path_and_sha256(tmp_path):
    import hashlib

    import provenance

    p = tmp_path / "compress" / "report.json"
    p.parent.mkdir()
    p.write_text(json.dumps({"goal_met": True, "verdict": "goal met"}))
    e = provenance.compress_report(p)
    assert e["path"] == str(p) and e["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest()
    assert e["goal_met"] is True and e["verdict"] == "goal met"
    assert provenance.compress_report(tmp_path / "missing.json")["sha256"] is None


def test_suite_records_the_compress_reports_it_measured(tmp_path):
    import suite

    compressed = {}
    for name in ("int8", "pruned-int8"):
        p = tmp_path / name / "compress" / "report.json"
        p.parent.mkdir(parents=True)
        p.write_text(json.dumps({"goal_met": True, "verdict": name}))
        compressed[name] = tmp_path / name
    made = suite.measured_with(["--run", "r"], compressed)
    assert made["command"] == "python bench/suite.py --run r" and "git_commit" in made
    by_variant = {v: r for r in made["compress_reports"] for v in r["variants"]}
    assert set(by_variant) == {"ort-fp32", "edgeft-int8", "edgeft-pruned-int8"}
    assert by_variant["edgeft-pruned-int8"]["path"].endswith("pruned-int8/compress/report.json")
    assert all(len(r["sha256"]) == 64 for r in made["compress_reports"])
    assert any("compress report:" in line for line in suite.provenance_lines(made))
