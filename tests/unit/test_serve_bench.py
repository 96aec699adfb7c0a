"""The load generator `make serve-bench` publishes figures with: wrk + bench/wrk_predict.lua against a
real tiny server (counts by status, pacing, key header), and the offline-engine helper."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

pytestmark = pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk not installed (apt-get install wrk)")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    import serve_bench as sb
    from serve_helpers import make_bundle

    from edgeft.serve.auth import add_key

    d = tmp_path_factory.mktemp("sb")
    bundle = make_bundle(d / "bundle")
    _, key = add_key(d / "keys.txt", "t")
    bodies = d / "bodies.jsonl"
    bodies.write_text("".join(json.dumps({"inputs": t}) + "\n" for t in ["good movie", "bad plot", "very dull film"]))
    p = sb.Proc("tiny", [sys.executable, "-m", "edgeft.cli", "serve", str(bundle), "--port", str(sb.free_port()),
                         "--keys", str(d / "keys.txt")], "/v2/health/ready", d).wait_ready()
    yield sb, p, bodies, key
    assert p.stop() == 0


def test_closed_loop_counts_every_answer_by_status(served):
    sb, p, bodies, key = served
    b0 = sb.batch_counter(p.url)
    r = sb.run_wrk(p.url, 4, 1, bodies, key=key, server=p)
    b1 = sb.batch_counter(p.url)
    assert r["status"].get("200", 0) == r["requests"] > 0
    # rows computed == answers counted, give or take the requests in flight when wrk stopped (one per connection)
    assert r["requests"] <= b1[1] - b0[1] <= r["requests"] + 4
    assert r["p50_ms"] <= r["p99_ms"]
    assert r["server_cpu_s"] > 0 and r["generator_cpu_s"] >= 0


def test_requests_without_the_key_are_401_and_never_computed(served):
    sb, p, bodies, _ = served
    b0 = sb.batch_counter(p.url)
    r = sb.run_wrk(p.url, 2, 1, bodies, server=p)
    assert set(r["status"]) == {"401"} and r["status"]["401"] == r["requests"] > 0
    assert sb.batch_counter(p.url) == b0


def test_paced_mode_holds_the_offered_rate(served):
    sb, p, bodies, key = served
    r = sb.run_wrk(p.url, 8, 2, bodies, rate=25, key=key, server=p)
    # 25 req/s for ~2 s: Poisson counts, so a wide band; closed loop would send hundreds.
    assert 20 <= r["requests"] <= 90, r
    assert r["status"].get("200") == r["requests"]


def test_offline_engine_counts_texts():
    import serve_bench as sb

    class Runner:
        calls = 0

        def predict(self, texts):
            Runner.calls += 1
            return None, None

    r = sb.offline(Runner(), ["a", "b", "c"], 4, 0.05)
    assert r["texts"] == 4 * (Runner.calls - 1) and r["throughput_rps"] > 0
