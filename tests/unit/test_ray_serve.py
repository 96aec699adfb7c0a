"""`edgeft serve --engine ray`: the bundle's Ray Serve config (checked with Ray's own schema), the
one-line error without Ray, and a real Ray Serve deployment of a tiny bundle on a real port answering
exactly like the embedded server (same routes, codec, auth, answers), replicas that follow the load,
and a clean SIGTERM. The scale-up/down timings against the issue's targets are measured by
bench/ray_bench.py (`make ray-bench`); here only their direction is asserted."""

from __future__ import annotations

import asyncio
import shutil
import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from edgeft.cli import cli
from edgeft.serve.config import resolve_config

sys.path.insert(0, str(Path(__file__).parent))
from serve_helpers import Server, env, free_port, make_bundle  # noqa: E402

TEXTS = ["a great movie", "awful plot and a dull actor", "the film", "x " * 300]


def _ray_config_text(tmp_path: Path, serving: dict | None = None) -> Path:
    from edgeft.scale.ray_serve import ray_part

    ctx = SimpleNamespace(stage=tmp_path, name="tiny", manifest={"serving": serving or {"max_batch_size": 8}})
    ray_part(ctx)
    assert ctx.manifest["ray"]["config"] == "ray/serve_config.yaml"
    return tmp_path / "ray" / "serve_config.yaml"


def test_bundle_ray_config_follows_the_serving_defaults_and_validates(tmp_path):
    from edgeft.scale.ray_serve import check_ray_config

    path = _ray_config_text(tmp_path, {"max_batch_size": 8, "request_timeout_s": 7})
    data = yaml.safe_load(path.read_text())
    app = data["applications"][0]
    assert app["import_path"] == "edgeft.scale.ray_app:app_builder" and app["args"]["bundle"] == "."
    dep = app["deployments"][0]
    assert dep["name"] == "edgeft" and dep["num_replicas"] == 1 and dep["max_queued_requests"] == 256
    assert data["http_options"]["request_timeout_s"] == 7
    assert check_ray_config(tmp_path) == []
    pytest.importorskip("ray.serve")
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(data)  # Ray's own schema for `serve run` / `serve deploy`


@pytest.mark.parametrize("edit, named", [
    (lambda d: d["applications"][0].update(import_path="other:app"), "import_path"),
    (lambda d: d["applications"][0]["deployments"][0].update(max_ongoing_requests=0), "max_ongoing_requests"),
    (lambda d: d["applications"][0]["args"].update(set=["max_batch_size=0"]), "args.set"),
    (lambda d: d["applications"][0].update(deployments=[]), "one deployment"),
])
def test_broken_ray_config_is_named(tmp_path, edit, named):
    from edgeft.scale.ray_serve import check_ray_config

    path = _ray_config_text(tmp_path)
    data = yaml.safe_load(path.read_text())
    edit(data)
    path.write_text(yaml.safe_dump(data))
    problems = check_ray_config(tmp_path)
    assert problems and any(named in p for p in problems), problems
    assert all("ray/serve_config.yaml" in p for p in problems)


def test_autoscaling_options_come_from_ray_settings():
    from edgeft.scale.ray_serve import deployment_options

    cfg = resolve_config({}, None, ["ray.min_replicas=1", "ray.max_replicas=4", "ray.replica_cpus=0.5",
                                    "ray.upscale_delay_s=2", "shutdown_timeout_s=12"])
    opts = deployment_options(cfg)
    assert opts["ray_actor_options"] == {"num_cpus": 0.5} and "num_replicas" not in opts
    assert opts["autoscaling_config"]["max_replicas"] == 4 and opts["autoscaling_config"]["upscale_delay_s"] == 2
    assert opts["graceful_shutdown_timeout_s"] == 12


def test_ray_settings_are_validated_one_line():
    from edgeft.serve.config import ServeConfigError

    with pytest.raises(ServeConfigError, match="ray.min_replicas 3 is above ray.max_replicas 2"):
        resolve_config({}, None, ["ray.min_replicas=3", "ray.max_replicas=2"])
    with pytest.raises(ServeConfigError, match="ray.replicas: unknown field"):
        resolve_config({}, None, ["ray.replicas=3"])


def test_engine_ray_without_ray_names_the_extra(tmp_path, monkeypatch):
    bundle = make_bundle(tmp_path / "b")
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    result = CliRunner().invoke(cli, ["serve", str(bundle), "--engine", "ray"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "pip install 'edgeft[ray]'" in lines[0] and "Traceback" not in result.output


# --- a real Ray Serve deployment -------------------------------------------------------------------

def _infer(url: str, texts: list[str], headers: dict | None = None) -> httpx.Response:
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}]}
    return httpx.post(f"{url}/v2/models/tiny/infer", json=body, headers=headers, timeout=30)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("raybundle") / "b")


@pytest.fixture(scope="module")
def keyfile(tmp_path_factory) -> tuple[Path, str]:
    from edgeft.serve.auth import add_key

    path = tmp_path_factory.mktemp("raykeys") / "keys.json"
    _, key = add_key(path, "ci")
    return path, key


@pytest.fixture(scope="module")
def ray_server(bundle, keyfile, tmp_path_factory):
    pytest.importorskip("ray.serve")
    log = tmp_path_factory.mktemp("raylog") / "ray.log"
    server = Server(bundle, log, "--engine", "ray", "--keys", str(keyfile[0]), "--set", "ray.num_cpus=2",
                    "--set", "ray.replica_cpus=1", "--set", "threads=1").wait_ready(timeout=180)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def embedded(bundle, keyfile, tmp_path_factory):
    log = tmp_path_factory.mktemp("emblog") / "emb.log"
    server = Server(bundle, log, "--keys", str(keyfile[0]), "--threads", "1").wait_ready()
    yield server
    server.stop()


def test_ray_answers_like_the_embedded_server(ray_server, embedded, keyfile):
    auth = {"Authorization": f"Bearer {keyfile[1]}"}
    a, b = _infer(ray_server.url, TEXTS, auth), _infer(embedded.url, TEXTS, auth)
    assert a.status_code == b.status_code == 200, (a.text, b.text)
    ja, jb = a.json(), b.json()
    assert [o["name"] for o in ja["outputs"]] == [o["name"] for o in jb["outputs"]]
    np.testing.assert_allclose(ja["outputs"][0]["data"], jb["outputs"][0]["data"], atol=1e-5)
    assert ja["outputs"][1]["data"] == jb["outputs"][1]["data"]
    assert ja["parameters"] == jb["parameters"]
    for path in ("/v2/models/tiny", "/v2/models/tiny/versions/1", "/v2", "/info"):
        ra, rb = httpx.get(ray_server.url + path, headers=auth), httpx.get(embedded.url + path, headers=auth)
        assert ra.status_code == rb.status_code == 200 and ra.json() == rb.json(), path
    tei = httpx.post(ray_server.url + "/predict", json={"inputs": TEXTS[:2]}, headers=auth)
    assert tei.status_code == 200 and tei.json() == httpx.post(embedded.url + "/predict", json={"inputs": TEXTS[:2]},
                                                               headers=auth).json()


def test_ray_binary_protocol_with_tritonclient(ray_server, keyfile):
    tc = pytest.importorskip("tritonclient.http")
    client = tc.InferenceServerClient(ray_server.url.removeprefix("http://"))
    inp = tc.InferInput("text", [2], "BYTES")
    inp.set_data_from_numpy(np.array([t.encode() for t in TEXTS[:2]], dtype=object))
    res = client.infer("tiny", [inp], headers={"Authorization": f"Bearer {keyfile[1]}"})
    assert res.as_numpy("logits").shape == (2, 3) and len(res.as_numpy("label")) == 2


@pytest.mark.parametrize("case, status", [("no_key", 401), ("bad_json", 400), ("unknown_model", 404),
                                          ("too_many", 413)])
def test_ray_bad_input_gets_the_same_statuses(ray_server, embedded, keyfile, case, status):
    auth = {"Authorization": f"Bearer {keyfile[1]}"}
    for server in (ray_server, embedded):
        if case == "no_key":
            r = _infer(server.url, ["x"])
        elif case == "bad_json":
            r = httpx.post(f"{server.url}/v2/models/tiny/infer", content=b"{not json", headers=auth)
        elif case == "unknown_model":
            r = httpx.post(f"{server.url}/v2/models/other/infer", json={"inputs": []}, headers=auth)
        else:
            r = _infer(server.url, ["x"] * 300, auth)
        assert r.status_code == status, (server.url, r.text)
        assert "error" in r.json()
    assert _infer(ray_server.url, ["still serving"], auth).status_code == 200


def test_ray_back_pressure_is_503_and_sigterm_exits_0(bundle, tmp_path):
    """max_ongoing_requests 1 + max_queued_requests 1: a burst of 24 gets 200s and 503s, nothing else;
    the server answers afterwards, and SIGTERM drains and exits 0."""
    pytest.importorskip("ray.serve")
    server = Server(bundle, tmp_path / "ray.log", "--engine", "ray", "--set", "ray.num_cpus=1",
                    "--set", "ray.replica_cpus=1", "--set", "threads=1", "--set", "ray.max_ongoing_requests=1",
                    "--set", "ray.max_queued_requests=1").wait_ready(timeout=180)
    texts = ["a long and winding review of a film " * 8] * 256

    async def burst():
        async with httpx.AsyncClient(timeout=60) as client:
            body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}]}
            rs = await asyncio.gather(*(client.post(f"{server.url}/v2/models/tiny/infer", json=body) for _ in range(24)))
        return [r.status_code for r in rs]

    try:
        codes = asyncio.run(burst())
        assert set(codes) <= {200, 503} and 200 in codes and 503 in codes, codes
        assert _infer(server.url, ["hello"]).status_code == 200
    finally:
        assert server.stop(timeout=60) == 0
    assert '"stopped"' in server.log()


def _serve_run(bundle: Path, tmp_path: Path, host: str, port: int, extra_set: list[str]):
    """`serve run ray/serve_config.yaml` from the bundle folder, as the file's header says."""
    import subprocess

    from edgeft.bundle import sums_text
    from edgeft.scale.ray_serve import ray_part

    b = Path(shutil.copytree(bundle, tmp_path / "b"))
    ray_part(SimpleNamespace(stage=b, name="tiny", manifest={"serving": {}}))
    (b / "SHA256SUMS").write_text(sums_text(b))
    cfg = yaml.safe_load((b / "ray" / "serve_config.yaml").read_text())
    cfg["http_options"].update(host=host, port=port)
    cfg["applications"][0]["args"]["set"] = extra_set
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(cfg))
    serve_bin = Path(sys.executable).with_name("serve")
    log = open(tmp_path / "serve-run.log", "wb")
    return subprocess.Popen([str(serve_bin), "run", str(tmp_path / "serve.yaml")], cwd=b, env=env(),
                            stdout=log, stderr=subprocess.STDOUT), tmp_path / "serve-run.log"


def test_serve_run_with_the_bundles_config(bundle, embedded, keyfile, tmp_path):
    pytest.importorskip("ray.serve")
    port = free_port()
    proc, log = _serve_run(bundle, tmp_path, "127.0.0.1", port, ["threads=1", f"keys={keyfile[0]}"])
    url = f"http://127.0.0.1:{port}"
    try:
        t_end = time.monotonic() + 180
        while time.monotonic() < t_end and proc.poll() is None:
            try:
                if httpx.get(url + "/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        auth = {"Authorization": f"Bearer {keyfile[1]}"}
        a, b = _infer(url, TEXTS, auth), _infer(embedded.url, TEXTS, auth)
        assert a.status_code == 200, log.read_text(errors="replace")[-2000:]
        np.testing.assert_allclose(a.json()["outputs"][0]["data"], b.json()["outputs"][0]["data"], atol=1e-5)
        assert _infer(url, TEXTS).status_code == 401  # the keys given in args.set are enforced
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)


def test_serve_run_refuses_a_public_host_without_keys(bundle, tmp_path):
    pytest.importorskip("ray.serve")
    proc, log = _serve_run(bundle, tmp_path, "0.0.0.0", free_port(), ["threads=1"])
    try:
        t_end = time.monotonic() + 120
        while time.monotonic() < t_end and "refusing to listen on 0.0.0.0" not in log.read_text(errors="replace"):
            time.sleep(0.5)
        assert "refusing to listen on 0.0.0.0 without API keys" in log.read_text(errors="replace")
        assert "args.set" in log.read_text(errors="replace")
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)


@pytest.mark.slow
def test_ray_replicas_follow_the_load(bundle, tmp_path):
    """Concurrency-8 load: 1 -> 2 replicas; idle: back to 1; every answer 200 (or 503 when the queue is full)."""
    pytest.importorskip("ray.serve")
    server = Server(bundle, tmp_path / "ray.log", "--engine", "ray", "--set", "ray.num_cpus=2",
                    "--set", "ray.replica_cpus=0.5", "--set", "threads=1", "--set", "ray.min_replicas=1",
                    "--set", "ray.max_replicas=2", "--set", "ray.target_ongoing_requests=2",
                    "--set", "ray.upscale_delay_s=1", "--set", "ray.downscale_delay_s=3",
                    "--set", "ray.look_back_period_s=2", "--set", "ray.metrics_interval_s=1").wait_ready(timeout=180)
    statuses: dict[int, int] = {}

    from edgeft.scale.ray_serve import replica_events

    def running() -> int:
        events = replica_events(server.log())
        return events[-1][1].get("RUNNING", 0) if events else 0

    async def load(until: float):
        async with httpx.AsyncClient(timeout=30) as client:
            async def worker():
                while time.monotonic() < until and running() < 2:
                    r = await client.post(f"{server.url}/v2/models/tiny/infer", json={"inputs": [
                        {"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a great movie " * 8]}]})
                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            await asyncio.gather(*(worker() for _ in range(8)))

    try:
        t0 = time.monotonic()
        asyncio.run(load(t0 + 60))
        up_s = time.monotonic() - t0
        assert running() == 2, f"no second replica after {up_s:.0f} s of load: {server.log()[-1500:]}"
        t1 = time.monotonic()
        while running() != 1 and time.monotonic() - t1 < 90:
            time.sleep(0.5)
        assert running() == 1, "still 2 replicas after 90 s idle"
        assert set(statuses) <= {200, 503} and statuses.get(200, 0) > 0, statuses
        assert _infer(server.url, ["after the scale events"]).status_code == 200
    finally:
        assert server.stop(timeout=60) == 0
