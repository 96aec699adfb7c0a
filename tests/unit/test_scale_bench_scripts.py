"""The pure parts of bench/ray_bench.py and bench/decoder_finetune.py: reading the server's replica log,
the scale-event times, and the verdicts their result files publish (no timing assertions)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))


def _line(ts: float, counts: dict) -> str:
    return json.dumps({"ts": ts, "level": "info", "logger": "edgeft.serve", "msg": "replicas " + json.dumps(counts)})


def test_ray_bench_reads_replica_events_and_scale_times(tmp_path):
    from ray_bench import first_time, replica_log

    log = tmp_path / "srv.log"
    log.write_text("\n".join(["INFO ray noise", _line(10.0, {"RUNNING": 1}), _line(13.0, {"RUNNING": 1, "STARTING": 1}),
                              _line(15.5, {"RUNNING": 2}), _line(30.0, {"RUNNING": 1, "STOPPING": 1}),
                              _line(32.0, {"RUNNING": 1})]) + "\n")
    events = replica_log(log)
    assert [t for t, _ in events] == [10.0, 13.0, 15.5, 30.0, 32.0]
    assert first_time(events, 11.0, 2) == 15.5           # 2 RUNNING and nothing else
    assert first_time(events, 20.0, 1) == 32.0           # not 30.0: one replica was still STOPPING
    assert first_time(events, 40.0, 1) is None


def _result(before: float, after: float, wall_s: float) -> dict:
    return {"created": "now", "command": "python bench/decoder_finetune.py", "git_commit": "abc", "git_dirty": False,
            "git_changed": [], "cpu": {"model": "cpu", "usable_cores": 2, "flags": [], "has_vnni": False,
                                       "has_amx_int8": False},
            "versions": {"torch": "x"}, "loadavg_start": [0.1, 0.1, 0.1], "recipe": "r.yaml", "overrides": [],
            "wall_s": wall_s, "metrics": {"method": "lora", "params": 10, "trainable_params": 1,
                                          "validation": {"before": {"perplexity": before},
                                                         "after": {"perplexity": after}}}}


def test_decoder_finetune_verdict_needs_both_the_drop_and_the_time():
    from decoder_finetune import render_md

    assert "**met**" in render_md(_result(100.0, 70.0, 600))
    assert "**missed**" in render_md(_result(100.0, 85.0, 600))    # only -15%
    assert "**missed**" in render_md(_result(100.0, 50.0, 1000))   # 16.7 min
    assert "(-30.0%)" in render_md(_result(100.0, 70.0, 600))
