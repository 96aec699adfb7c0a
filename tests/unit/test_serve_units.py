"""Server parts in-process: the batching engine (with a slow stand-in runner to make queueing
deterministic), the real runner's padding and batch agreement, config layering, keys, the codec."""

from __future__ import annotations

import asyncio
import json
import struct
import threading
import time

import numpy as np
import pytest
from serve_helpers import LABELS, make_bundle

from edgeft.serve.auth import KeyFileError, KeyStore, RateLimiter, add_key, digest, read_keys
from edgeft.serve.batcher import BatchingEngine
from edgeft.serve.codec import CodecError, parse_infer
from edgeft.serve.config import ServeConfigError, resolve_config
from edgeft.serve.engine import DeadlineExceeded, QueueFull
from edgeft.serve.runner import Encoded


class SlowRunner:
    """Stands in for ModelRunner: one token per character, logits = row length; each run can be held."""

    def __init__(self):
        self.runs: list[list[str]] = []
        self.gate = threading.Event()
        self.gate.set()

    def encode(self, texts):
        return [Encoded([1] * max(1, len(t)), [0] * max(1, len(t))) for t in texts]

    def run_encoded(self, encs):
        self.gate.wait(10)
        self.runs.append([len(e.ids) for e in encs])
        return np.array([[float(e.tokens), 0.0] for e in encs], dtype=np.float32)

    def predict(self, texts):
        return self.run_encoded(self.encode(texts)), None


def _engine(runner, **kw):
    kw.setdefault("warmup_batches", 0)
    eng = BatchingEngine(runner, ["a", "b"], **kw)
    eng.start()
    assert eng.wait_ready(5)
    return eng


def test_engine_batches_caps_and_drops_cancelled():
    runner = SlowRunner()
    batches = []
    eng = _engine(runner, max_batch_size=4, max_batch_tokens=12, max_queue_delay_ms=50, queue_capacity=8,
                  on_batch=lambda rows, toks: batches.append((rows, toks)))

    async def main():
        far = time.monotonic() + 30
        runner.gate.clear()  # hold the worker inside its first batch
        first = asyncio.ensure_future(eng.predict(["x"], far))
        await asyncio.sleep(0.2)
        gone = asyncio.ensure_future(eng.predict(["cancelled"], far))
        keep = asyncio.ensure_future(eng.predict(["aa", "bbb", "cccc", "dd", "e"], far))
        await asyncio.sleep(0.05)
        gone.cancel()  # the client left while queued
        runner.gate.set()
        p1, p3 = await first, await keep
        with pytest.raises(asyncio.CancelledError):
            await gone
        return p1, p3

    try:
        p1, p3 = asyncio.run(main())
    finally:
        eng.stop()
    assert [p.logits[0] for p in p3] == [2, 3, 4, 2, 1]  # answers in order, whatever the batching
    assert all(9 not in run for run in runner.runs)  # the cancelled text was never computed
    for rows, toks in batches:  # caps: rows <= 4, rows x longest <= 12 tokens
        assert rows <= 4 and rows * max(toks) <= 12
    assert sum(rows for rows, _ in batches) == 6


def test_engine_waits_for_batch_mates_only_while_some_are_on_their_way():
    runner = SlowRunner()
    eng = _engine(runner, max_batch_size=8, max_queue_delay_ms=1500)
    admitted = {"n": 1}
    eng.admitted = lambda: admitted["n"]

    async def one() -> float:
        t0 = time.monotonic()
        await eng.predict(["abc"], time.monotonic() + 30)
        return time.monotonic() - t0

    async def main():
        alone = await one()  # every admitted request is in hand: no wait at all
        admitted["n"] = 2  # one more admitted, still being received: wait for it, up to the delay
        waited = await one()
        admitted["n"] = 2
        t_mate = asyncio.get_running_loop().call_later(0.3, lambda: asyncio.ensure_future(one()))
        first = asyncio.ensure_future(one())
        await asyncio.sleep(0.31)
        await first
        t_mate.cancel()
        return alone, waited

    try:
        alone, waited = asyncio.run(main())
    finally:
        eng.stop()
    assert alone < 0.75 < 1.4 < waited  # 1.5 s delay: spent in full only when a mate was announced
    assert runner.runs[-1] == [3, 3]  # the announced mate joined the batch


def test_engine_queue_full_and_deadline():
    runner = SlowRunner()
    eng = _engine(runner, max_batch_size=1, queue_capacity=1, max_queue_delay_ms=0)

    async def main():
        runner.gate.clear()
        busy = asyncio.ensure_future(eng.predict(["x"], time.monotonic() + 30))
        await asyncio.sleep(0.2)  # the worker holds it
        late = asyncio.ensure_future(eng.predict(["y"], time.monotonic() + 0.1))
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFull):
            await eng.predict(["z"], time.monotonic() + 30)
        await asyncio.sleep(0.2)
        runner.gate.set()
        await busy
        with pytest.raises(DeadlineExceeded):
            await late

    try:
        asyncio.run(main())
    finally:
        eng.stop()
    assert runner.runs == [[1]]  # the expired request was never computed


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    from edgeft.bundle import open_bundle
    from edgeft.serve.runner import ModelRunner

    b = open_bundle(make_bundle(tmp_path_factory.mktemp("b") / "tiny"))
    return ModelRunner(b.model_dir, b.onnx_path, max_length=b.max_length, threads=1)


def test_runner_pads_to_longest_and_truncates(runner):
    texts = ["good", "the plot was very dull and the actor was poor " * 3]
    logits, stats = runner.predict(texts)
    assert logits.shape == (2, len(LABELS)) and stats.padded_length == runner.encode(texts[1:])[0].tokens
    alone = runner.predict(texts[:1])[0]
    np.testing.assert_allclose(alone[0], logits[0], atol=1e-5)  # padding does not change the answer
    assert runner.encode(["movie " * 500])[0].tokens == runner.max_length


def test_batch_agreement_report(runner):
    rep = runner.batch_agreement(["good movie", "bad", "the film is fine", "dull plot", "great"] * 3, batch_size=4)
    assert rep["texts"] == 15 and rep["agreement"] == 1.0 and rep["max_abs_logit_diff"] < 1e-4


def test_config_layers_and_errors(tmp_path):
    cfg_file = tmp_path / "serve.yaml"
    cfg_file.write_text("max_batch_size: 8\nport: 9000\n")
    cfg = resolve_config({"max_batch_size": 16, "queue_capacity": 10, "future_field": 1}, cfg_file,
                         ["port=9100"], {"port": 9200, "threads": None})
    assert (cfg.max_batch_size, cfg.queue_capacity, cfg.port) == (8, 10, 9200)
    with pytest.raises(ServeConfigError, match="max_batch_sise: unknown field"):
        resolve_config(overrides=["max_batch_sise=2"])
    with pytest.raises(ServeConfigError, match="max_items"):
        resolve_config(overrides=["max_items=0"])
    with pytest.raises(ServeConfigError, match="not found"):
        resolve_config(config_file=tmp_path / "missing.yaml")


def test_print_config_cli(tmp_path):
    import yaml
    from click.testing import CliRunner

    from edgeft.cli import cli

    b = tmp_path / "b"
    b.mkdir()
    (b / "manifest.json").write_text(json.dumps({"schema": "edgeft.bundle/1", "name": "n", "version": "1",
                                                 "tokenizer": {"max_length": 8}, "serving": {"max_batch_size": 4}}))
    r = CliRunner().invoke(cli, ["serve", str(b), "--print-config", "--set", "max_queue_delay_ms=7", "--port", "1234"])
    assert r.exit_code == 0, r.output
    out = yaml.safe_load(r.output)
    assert out["max_batch_size"] == 4 and out["max_queue_delay_ms"] == 7 and out["port"] == 1234


def test_keys_file_digests_only_and_constant_time_check(tmp_path):
    path = tmp_path / "k" / "keys.txt"
    kid, key = add_key(path, "svc-a")
    _, key2 = add_key(path)
    text = path.read_text()
    assert key not in text and digest(key) in text and oct(path.stat().st_mode & 0o777) == "0o600"
    assert list(read_keys(path)) == ["svc-a", "key2"]
    store = KeyStore(path)
    assert store.check(f"Bearer {key}").key_id == "svc-a" and store.check(f"bearer {key2}").key_id == "key2"
    assert store.check(None).error == "missing" and store.check("Bearer nope").error == "invalid"
    assert store.check(f"Basic {key}").error == "malformed" and store.check("Bearer a\x00b").error == "malformed"
    with pytest.raises(KeyFileError, match="already exists"):
        add_key(path, "svc-a")
    with pytest.raises(KeyFileError, match="not allowed"):
        add_key(path, "bad id\n")
    path.write_text(text + "garbage\n")
    with pytest.raises(KeyFileError, match="line 3"):
        store.reload()
    assert store.check(f"Bearer {key}").key_id == "svc-a"  # a failed reload keeps the old keys


def test_rate_limiter_token_bucket():
    rl = RateLimiter(rate=10, burst=3)
    assert [rl.allow("a") for _ in range(3)] == [0, 0, 0]
    wait = rl.allow("a")
    assert 0 < wait <= 0.1 and rl.allow("b") == 0  # per key
    time.sleep(0.12)
    assert rl.allow("a") == 0
    assert RateLimiter(0, 1).allow("a") == 0


def test_codec_binary_roundtrip_and_json_shapes():
    texts = ["a", "", "ünï 😀"]
    blob = b"".join(struct.pack("<I", len(t.encode())) + t.encode() for t in texts)
    head = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [3, 1],
                                   "parameters": {"binary_data_size": len(blob)}}],
                       "outputs": [{"name": "label", "parameters": {"binary_data": True}}]}).encode()
    req = parse_infer(head + blob, str(len(head)), max_items=8)
    assert req.texts == texts and req.outputs[0].binary
    req = parse_infer(json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2, 1],
                                              "data": [["x"], ["y"]]}]}).encode(), None, max_items=8)
    assert req.texts == ["x", "y"] and {o.name for o in req.outputs} == {"logits", "label"}
    with pytest.raises(CodecError, match="Inference-Header-Content-Length"):
        parse_infer(head + blob, "abc", max_items=8)


def test_readme_has_the_current_serve_config_table():
    from pathlib import Path

    from edgeft.serve.config import config_reference

    assert config_reference() in (Path(__file__).parents[2] / "README.md").read_text()


class FakeEngine:
    """Any object with labels / is_ready / async predict can sit behind the routes (e.g. a Ray Serve batch)."""

    labels = ["neg", "pos"]

    def __init__(self, fail=False):
        self.calls, self.fail = 0, fail

    def is_ready(self):
        return True

    async def predict(self, texts, deadline):
        from edgeft.serve.engine import Prediction

        self.calls += 1
        if self.fail:
            raise RuntimeError("boom")
        return [Prediction(np.array([0.0, float(len(t))], dtype=np.float32), len(t)) for t in texts]


def _asgi(engine, **cfg):
    import httpx

    from edgeft.serve.app import ModelInfo, build_app
    from edgeft.serve.config import ServeConfig

    app = build_app(ModelInfo("m", "1", FakeEngine.labels, "d" * 64, 16), ServeConfig(**cfg), engine)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


def test_routes_with_another_engine_rate_limit_and_internal_errors(tmp_path):
    path = tmp_path / "keys"
    _, key = add_key(path, "k1")
    engine = FakeEngine()
    h = {"Authorization": f"Bearer {key}"}

    async def with_keys():
        import httpx

        from edgeft.serve.app import ModelInfo, build_app
        from edgeft.serve.config import ServeConfig

        app = build_app(ModelInfo("m", "1", FakeEngine.labels, "d" * 64, 16),
                        ServeConfig(keys=path, rate_limit_rps=0.5, rate_limit_burst=2), engine)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            rs = [await c.post("/predict", json={"inputs": "abc"}, headers=h) for _ in range(3)]
            metrics = (await c.get("/metrics")).text
        return rs, metrics

    rs, metrics = asyncio.run(with_keys())
    assert [r.status_code for r in rs] == [200, 200, 429]
    assert rs[0].json()[0] == {"label": "pos", "score": pytest.approx(1 / (1 + np.exp(-3)))}
    assert int(rs[2].headers["retry-after"]) >= 1 and "rate limit" in rs[2].json()["error"]
    assert 'edgeft_rejections_total{reason="rate_limited"} 1.0' in metrics and engine.calls == 2

    async def failing():
        async with _asgi(FakeEngine(fail=True)) as c:
            return await c.post("/v2/models/m/infer", json={"inputs": [{"name": "text", "datatype": "BYTES",
                                                                        "shape": [1], "data": ["x"]}]})

    r = asyncio.run(failing())
    assert r.status_code == 500 and r.json() == {"error": "internal server error"}


def test_engine_survives_a_failing_batch():
    class Flaky(SlowRunner):
        def encode(self, texts):
            if "boom" in texts:
                raise ValueError("tokenizer failed")
            return super().encode(texts)

    eng = _engine(Flaky(), max_queue_delay_ms=0)

    async def main():
        with pytest.raises(RuntimeError, match="inference failed"):
            await eng.predict(["boom"], time.monotonic() + 5)
        return await eng.predict(["ok"], time.monotonic() + 5)

    try:
        assert asyncio.run(main())[0].logits[0] == 2
    finally:
        eng.stop()


def test_request_deadline_answers_503_and_cancels_the_engine_call():
    class Stuck(FakeEngine):
        cancelled = False

        async def predict(self, texts, deadline):
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                Stuck.cancelled = True
                raise

    async def main():
        async with _asgi(Stuck(), request_timeout_s=0.3) as c:
            t0 = time.monotonic()
            r = await c.post("/predict", json={"inputs": "x"})
            return r, time.monotonic() - t0, (await c.get("/metrics")).text

    r, took, metrics = asyncio.run(main())
    assert r.status_code == 503 and r.headers["retry-after"] == "1" and "deadline" in r.json()["error"]
    assert took < 5 and Stuck.cancelled
    assert 'edgeft_rejections_total{reason="timeout"} 1.0' in metrics
