"""`edgeft serve` against a REAL server process on a free port (one per module), with real clients:
httpx, raw sockets, http.client and the stock tritonclient.http (binary and JSON modes)."""

from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import struct
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from serve_helpers import LABELS, Server, env, make_bundle, serve_cmd

LIMITS = ["--set", "max_items=16", "--set", "max_chars=500", "--set", "max_body_bytes=65536",
          "--set", "queue_capacity=4", "--set", "receive_timeout_s=1.5", "--set", "warmup_batches=2",
          "--set", "max_connections=64"]
TEXTS = ["good movie", "the plot was very dull and the actor was poor", "not a great film", "superb scene"]
INFER = "/v2/models/tiny/infer"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("bundle") / "tiny")


@pytest.fixture(scope="module")
def keyfile(tmp_path_factory):
    from edgeft.serve.auth import add_key

    path = tmp_path_factory.mktemp("keys") / "keys.txt"
    _, key = add_key(path, "alice")
    return path, key


@pytest.fixture(scope="module")
def server(bundle, keyfile, tmp_path_factory):
    srv = Server(bundle, tmp_path_factory.mktemp("log") / "serve.log", "--keys", str(keyfile[0]), *LIMITS)
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def reference(bundle):
    """Logits from ONNX Runtime fed by transformers' tokenizer padded to max_length (not the server's code)."""
    import onnxruntime as ort
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bundle / "model")
    sess = ort.InferenceSession(str(bundle / "model" / "model.onnx"), providers=["CPUExecutionProvider"])
    enc = tok(TEXTS, padding="max_length", truncation=True, max_length=64, return_tensors="np")
    feeds = {i.name: enc[i.name].astype(np.int64) for i in sess.get_inputs()}
    return sess.run(None, feeds)[0]


@pytest.fixture(scope="module")
def client(server, keyfile):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {keyfile[1]}"}, timeout=10) as c:
        yield c


def v2(texts, shape=None, **extra):
    return {"inputs": [{"name": "text", "datatype": "BYTES", "shape": shape or [len(texts)], "data": texts}], **extra}


def logits_of(resp):
    out = {o["name"]: o for o in resp.json()["outputs"]}["logits"]
    return np.array(out["data"], dtype=np.float32).reshape(out["shape"])


def assert_good(client, reference):
    """The server still answers a good request correctly."""
    r = client.post(INFER, json=v2(TEXTS))
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(logits_of(r), reference, atol=1e-4)


def metric(client, name, labels=""):
    text = client.get("/metrics").text
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def raw(server, data: bytes, timeout=5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        try:
            while True:
                b = s.recv(65536)
                if not b:
                    break
                chunks.append(b)
        except socket.timeout:
            pass
        return b"".join(chunks)


# --- the standard API ----------------------------------------------------------------------------

def test_v2_matches_reference_and_pads_to_longest(client, reference, server):
    r = client.post(INFER, json=v2(TEXTS, shape=[4, 1]))
    assert r.status_code == 200, r.text
    body = r.json()
    np.testing.assert_allclose(logits_of(r), reference, atol=1e-4)  # longest-padding == max_length padding
    labels = {o["name"]: o for o in body["outputs"]}["label"]["data"]
    assert labels == [LABELS[i] for i in reference.argmax(-1)]
    assert body["parameters"]["truncated"] is False
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])
    assert re.fullmatch(r"queue;dur=[\d.]+, tokenize;dur=[\d.]+, compute;dur=[\d.]+", r.headers["server-timing"])
    # the versioned route and the classification extension
    r = client.post("/v2/models/tiny/versions/1/infer",
                    json=v2(TEXTS[:1], outputs=[{"name": "logits", "parameters": {"classification": 2}}]))
    assert r.status_code == 200
    top = r.json()["outputs"][0]
    assert top["datatype"] == "BYTES" and top["shape"] == [1, 2]
    score, idx, label = top["data"][0].split(":")
    assert int(idx) == int(reference[0].argmax()) and label == LABELS[int(idx)]
    # one JSON access-log line per request, with the key id and never the key or the text
    time.sleep(0.2)
    log = server.log()
    assert "superb scene" not in log and client.headers["authorization"].split()[1] not in log
    lines = [json.loads(x) for x in log.splitlines() if '"request_id"' in x]
    assert any(x["key_id"] == "alice" and x["route"] == INFER and x["items"] == 4 and x["tokens"] for x in lines)


def test_metadata_health_and_tei(client, server):
    assert httpx.get(server.url + "/v2/health/live").status_code == 200  # health needs no key
    assert httpx.get(server.url + "/v2/health/ready").json() == {"ready": True}
    assert httpx.get(server.url + "/health").status_code == 200
    meta = client.get("/v2").json()
    assert set(meta["extensions"]) >= {"classification", "binary_tensor_data"}
    m = client.get("/v2/models/tiny").json()
    assert m["inputs"][0] == {"name": "text", "datatype": "BYTES", "shape": [-1]}
    assert m["outputs"][0]["shape"] == [-1, 3] and client.get("/v2/models/tiny/versions/1/ready").status_code == 200
    one = client.post("/predict", json={"inputs": "good movie"}).json()
    assert [x["label"] for x in one] and abs(sum(x["score"] for x in one) - 1) < 1e-5
    many = client.post("/predict", json={"inputs": ["good", "bad"]}).json()
    assert len(many) == 2 and all(len(x) == 3 for x in many)
    info = client.get("/info").json()
    assert info["model_id"] == "tiny" and info["max_client_batch_size"] == 16


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient(server, keyfile, reference, binary):
    import tritonclient.http as th

    c = th.InferenceServerClient(f"127.0.0.1:{server.port}")
    hdr = {"Authorization": f"Bearer {keyfile[1]}"}
    assert c.is_server_live() and c.is_model_ready("tiny", headers=hdr)
    inp = th.InferInput("text", [len(TEXTS), 1], "BYTES")
    inp.set_data_from_numpy(np.array([[t] for t in TEXTS], dtype=object), binary_data=binary)
    outs = [th.InferRequestedOutput("logits", binary_data=binary), th.InferRequestedOutput("label", binary_data=binary)]
    r = c.infer("tiny", [inp], outputs=outs, headers=hdr)
    np.testing.assert_allclose(r.as_numpy("logits"), reference, atol=1e-4)
    got = [x.decode() if isinstance(x, bytes) else x for x in r.as_numpy("label")]
    assert got == [LABELS[i] for i in reference.argmax(-1)]
    r = c.infer("tiny", [inp], outputs=[th.InferRequestedOutput("logits", binary_data=binary, class_count=1)],
                headers=hdr)
    top = [(x.decode() if isinstance(x, bytes) else x).split(":")[2] for x in r.as_numpy("logits").ravel()]
    assert top == got
    with pytest.raises(th.InferenceServerException, match="401|API key"):
        c.infer("tiny", [inp])


def test_metric_names(client):
    text = client.get("/metrics").text
    for name in ["edgeft_requests_total", "edgeft_rejections_total", "edgeft_request_duration_seconds_bucket",
                 "edgeft_queue_duration_seconds_bucket", "edgeft_tokenize_duration_seconds_bucket",
                 "edgeft_compute_duration_seconds_bucket", "edgeft_batch_size_bucket", "edgeft_input_tokens_bucket",
                 "edgeft_pending_requests", "edgeft_queue_capacity", "edgeft_model_ready", "edgeft_build_info",
                 "edgeft_auth_failures_total"]:
        assert re.search(rf"^{name}[{{ ]", text, re.M), name
    assert 'le="0.1"' in text  # a bucket edge at the 100 ms latency budget
    assert metric(client, "edgeft_model_ready") == 1 and metric(client, "edgeft_queue_capacity") == 4
    for reason in ["queue_full", "rate_limited", "auth", "too_large", "invalid", "timeout"]:
        assert f'edgeft_rejections_total{{reason="{reason}"}}' in text


# --- access control ------------------------------------------------------------------------------

@pytest.mark.parametrize("auth", [None, "Bearer wrong-key", "Basic YWxpY2U6cHc=", "Bearer", "Bearer a b", "Token abcdef",
                                  "Bearer \u00e9t\u00e9"])
def test_bad_keys_get_401_and_no_inference(server, client, reference, auth):
    batches = metric(client, "edgeft_batch_size_count")
    failures = metric(client, "edgeft_auth_failures_total")
    headers = {"Authorization": auth.encode("utf-8")} if auth is not None else {}
    r = httpx.post(server.url + INFER, json=v2(TEXTS), headers=headers)
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    assert "error" in r.json() and "wrong-key" not in r.text
    assert metric(client, "edgeft_batch_size_count") == batches  # no inference ran
    assert metric(client, "edgeft_auth_failures_total") == failures + 1
    assert httpx.post(server.url + "/predict", json={"inputs": "x"}, headers=headers).status_code == 401
    assert_good(client, reference)


def test_keys_add_cli_and_sighup_reload(server, keyfile, client, reference):
    path = keyfile[0]
    r = subprocess.run(serve_cmd(path)[:3] + ["keys", "add", str(path), "--id", "bob"], env=env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    key = r.stdout.strip()
    assert key and key not in path.read_text() and "bob:" in path.read_text()
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    h = {"Authorization": f"Bearer {key}"}
    assert httpx.post(server.url + INFER, json=v2(TEXTS), headers=h).status_code == 401  # not loaded yet
    server.signal(signal.SIGHUP)
    t_end = time.monotonic() + 5
    while httpx.post(server.url + INFER, json=v2(TEXTS), headers=h).status_code != 200:
        assert time.monotonic() < t_end, "SIGHUP did not reload the key file"
        time.sleep(0.1)
    assert key not in server.log()
    dup = subprocess.run(serve_cmd(path)[:3] + ["keys", "add", str(path), "--id", "bob"], env=env(),
                         capture_output=True, text=True, timeout=60)
    assert dup.returncode == 2 and "already exists" in dup.stderr
    assert_good(client, reference)


# --- bad input -----------------------------------------------------------------------------------

def _bin_request(texts, *, frame=None, declared=None, header_extra=0):
    blob = frame if frame is not None else b"".join(struct.pack("<I", len(t.encode())) + t.encode() for t in texts)
    head = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)],
                                   "parameters": {"binary_data_size": len(blob) if declared is None else declared}}]}).encode()
    return head + blob, {"Inference-Header-Content-Length": str(len(head) + header_extra)}


@pytest.mark.parametrize("case,status,needle", [
    ("malformed_json", 400, "not valid JSON"),
    ("not_object", 400, "JSON object"),
    ("wrong_datatype", 400, "datatype BYTES"),
    ("wrong_shape", 400, "[N] or [N, 1]"),
    ("shape_mismatch", 400, "data has 1"),
    ("non_string_item", 400, "not a string"),
    ("unknown_input", 400, "unknown input"),
    ("unknown_output", 400, "unknown output"),
    ("lone_surrogate", 400, "lone surrogate"),
    ("binary_overrun", 400, "claims"),
    ("binary_size_mismatch", 400, "binary_data_size"),
    ("binary_trailing", 400, "bytes after"),
    ("binary_header_too_long", 400, "does not fit"),
    ("binary_bad_utf8", 400, "not UTF-8"),
    ("too_many_items", 413, "max_items"),
    ("empty_inputs", 400, "at least one"),
    ("tei_bad", 400, "inputs"),
    ("tei_too_many", 413, "max_items"),
])
def test_bad_requests_get_clear_errors(client, reference, case, status, needle):
    url, content, headers = INFER, None, {}
    body = {
        "malformed_json": b'{"inputs": [',
        "not_object": b"[1, 2]",
        "wrong_datatype": json.dumps({"inputs": [{"name": "text", "datatype": "FP32", "shape": [1], "data": [1.0]}]}),
        "wrong_shape": json.dumps(v2(["a", "b", "c", "d"], shape=[2, 2])),
        "shape_mismatch": json.dumps(v2(["a"], shape=[2])),
        "non_string_item": json.dumps(v2([1, 2])),
        "unknown_input": json.dumps({"inputs": [{"name": "input_ids", "datatype": "BYTES", "shape": [1], "data": ["a"]}]}),
        "unknown_output": json.dumps(v2(["a"], outputs=[{"name": "hidden"}])),
        "lone_surrogate": b'{"inputs":[{"name":"text","datatype":"BYTES","shape":[1],"data":["ok \\ud800 no"]}]}',
        "too_many_items": json.dumps(v2(["a"] * 17)),
        "empty_inputs": json.dumps(v2([], shape=[0])),
        "tei_bad": json.dumps({"inputs": 5}),
        "tei_too_many": json.dumps({"inputs": ["a"] * 17}),
    }.get(case)
    if case.startswith("binary"):
        content, headers = {
            "binary_overrun": _bin_request(["a"], frame=struct.pack("<I", 99) + b"abc"),
            "binary_size_mismatch": _bin_request(["abc"], declared=3),
            "binary_trailing": _bin_request(["a"], frame=struct.pack("<I", 1) + b"a" + b"junk"),
            "binary_header_too_long": _bin_request(["a"], header_extra=10_000),
            "binary_bad_utf8": _bin_request(["a"], frame=struct.pack("<I", 2) + b"\xff\xfe"),
        }[case]
    else:
        content = body if isinstance(body, bytes) else body.encode()
    if case.startswith("tei"):
        url = "/predict"
    r = client.post(url, content=content, headers=headers)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"], r.json()
    assert_good(client, reference)


def test_long_empty_and_odd_unicode_texts(client, reference):
    odd = ["", "مرحبا بالعالم", "zero\u200bwidth\u200d", "emoji 😀🎬👍🏽", "\u202eRTL override", "x" * 10_000]
    r = client.post(INFER, json=v2(odd))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["parameters"]["truncated"] is True and body["parameters"]["truncated_items"] == "5"
    assert len({o["name"]: o for o in body["outputs"]}["label"]["data"]) == len(odd)
    r = client.post("/predict", json={"inputs": "x" * 10_000})
    assert r.status_code == 200 and r.headers["x-truncated-items"] == "0"
    assert_good(client, reference)


@pytest.mark.parametrize("path,status", [
    ("/v2/models/other/infer", 404), ("/v2/models/tiny/versions/2/infer", 404),
    ("/v2/models/../tiny/infer", 404), ("/v2/models/tiny%2F..%2Fx/infer", 404), ("/v2/models/%2e%2e/infer", 404),
    ("/v2/models//infer", 404), ("/v2/models/tiny/infer/../../x", 404), ("/etc/passwd", 404),
    ("/v2/health/live", 405),
])
def test_unknown_models_and_path_tricks(server, keyfile, client, reference, path, status):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)  # sends the path as written
    conn.request("POST", path, body=json.dumps(v2(["a"])), headers={"Authorization": f"Bearer {keyfile[1]}",
                                                                     "Content-Type": "application/json"})
    r = conn.getresponse()
    body = json.loads(r.read())
    conn.close()
    assert r.status == status and "error" in body
    assert_good(client, reference)


def test_body_size_limits(server, client, reference):
    big = json.dumps(v2(["word " * 20_000])).encode()
    r = client.post(INFER, content=big)  # Content-Length over the limit: refused before reading
    assert r.status_code == 413 and "max_body_bytes" in r.json()["error"]

    def chunks():  # no Content-Length: cut while streaming
        for _ in range(100):
            yield b"x" * 4096
    r = client.post(INFER, content=chunks())
    assert r.status_code == 413
    assert_good(client, reference)


def test_body_shorter_than_content_length_gets_408(server, keyfile, client, reference):
    body = json.dumps(v2(["a"])).encode()
    head = (f"POST {INFER} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {keyfile[1]}\r\n"
            f"Content-Length: {len(body) + 50}\r\n\r\n").encode()
    t0 = time.monotonic()
    out = raw(server, head + body, timeout=6)
    assert out.startswith(b"HTTP/1.1 408") and b"receive_timeout_s" in out
    assert time.monotonic() - t0 < 4
    assert_good(client, reference)


def test_body_longer_than_content_length(server, keyfile, client, reference):
    body = json.dumps(v2(["good movie"])).encode()
    head = (f"POST {INFER} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {keyfile[1]}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    out = raw(server, head + body + b"GARBAGE AFTER THE BODY\r\n\r\n", timeout=3)
    # The bytes after the declared body are a malformed next request on the same connection. httptools
    # (the default parser) rejects the connection's stream with 400 and closes it; h11 answers the
    # declared body first, then 400. Either way: never a 5xx, and the server keeps serving.
    first_ok = out.startswith(b"HTTP/1.1 200") and b"HTTP/1.1 400" in out[20:]
    assert first_ok or (out.startswith(b"HTTP/1.1 400") and b"connection: close" in out.lower()), out[:200]
    assert_good(client, reference)


def test_slowloris_headers_are_cut_off(server, client, reference):
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=6) as s:
        s.sendall(b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\n")
        closed = False
        for i in range(40):
            try:
                s.sendall(b"X-Slow-%d: y\r\n" % i)
                s.settimeout(0.25)
                if s.recv(1024) == b"":
                    closed = True
                    break
            except socket.timeout:
                continue
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
    assert closed and time.monotonic() - t0 < 1.5 + 2.5
    # an idle connection that never sends a byte is closed too
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        assert s.recv(10) == b""
    assert_good(client, reference)


def test_request_id_header_injection(client, reference):
    r = client.post(INFER, json=v2(["a"]), headers={"X-Request-Id": "client-42.a_b"})
    assert r.headers["x-request-id"] == "client-42.a_b"
    for bad in ["evil value; with=spaces", "a" * 200, "x\tX-Injected: 1", "<script>"]:
        r = client.post(INFER, json=v2(["a"]), headers={"X-Request-Id": bad})
        assert r.status_code == 200 and re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])
        assert "x-injected" not in r.headers
    assert_good(client, reference)


def test_flood_beyond_the_queue_gets_503_and_others_are_served(server, keyfile, client, reference):
    # Hold all 4 admission slots with clients whose bodies never come (admission precedes the body).
    head = (f"POST {INFER} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {keyfile[1]}\r\n"
            f"Content-Length: 100\r\n\r\n").encode()
    holders = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(4)]
    try:
        for s in holders:
            s.sendall(head)
        time.sleep(0.3)
        assert metric(client, "edgeft_pending_requests") == 4
        t0 = time.monotonic()
        r = client.post(INFER, json=v2(["a"]))
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and "queue_capacity" in r.json()["error"]
        assert time.monotonic() - t0 < 1.0  # answered at once
        assert httpx.get(server.url + "/v2/health/live").status_code == 200
    finally:
        for s in holders:
            s.close()
    # a real concurrent flood: only 200 or 503, and the server keeps answering
    with ThreadPoolExecutor(24) as ex:
        codes = list(ex.map(lambda _: httpx.post(server.url + INFER, json=v2(TEXTS * 4), timeout=10,
                                                 headers=client.headers).status_code, range(96)))
    assert set(codes) <= {200, 503} and codes.count(200) > 0
    assert metric(client, "edgeft_rejections_total", '{reason="queue_full"}') >= 1
    time.sleep(1.7)  # the held bodies time out (408) and free their slots
    assert metric(client, "edgeft_pending_requests") == 0
    assert_good(client, reference)


def test_connection_cap_answers_503(server, client, reference):
    socks = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(64)]  # max_connections=64
    try:
        time.sleep(0.2)
        r = httpx.get(server.url + "/v2/health/live", timeout=5)
        assert r.status_code == 503
    finally:
        for s in socks:
            s.close()
    time.sleep(0.2)
    assert_good(client, reference)


def test_client_disconnecting_while_queued_does_not_hurt(server, keyfile, client, reference):
    body = json.dumps(v2(TEXTS * 4)).encode()
    head = (f"POST {INFER} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {keyfile[1]}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    for _ in range(10):
        s = socket.create_connection(("127.0.0.1", server.port))
        s.sendall(head + body)
        s.close()
    time.sleep(0.3)
    assert metric(client, "edgeft_pending_requests") == 0
    assert_good(client, reference)


# --- process level: refusals and signals ---------------------------------------------------------

def _run_serve(bundle, *args):
    return subprocess.run(serve_cmd(bundle, "--port", "0", *args), env=env(), capture_output=True, text=True,
                          timeout=60)


def test_tampered_and_newer_bundles_refuse_to_start(bundle, tmp_path):
    import shutil

    from edgeft.bundle import sums_text

    bad = tmp_path / "tampered"
    shutil.copytree(bundle, bad)
    (bad / "model" / "labels.txt").write_text("neg\nneu\nPWNED\n")
    r = _run_serve(bad)
    assert r.returncode == 2 and "changed: model/labels.txt" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    newer = tmp_path / "newer"
    shutil.copytree(bundle, newer)
    m = json.loads((newer / "manifest.json").read_text())
    m["schema"] = "edgeft.bundle/2"
    (newer / "manifest.json").write_text(json.dumps(m))
    (newer / "SHA256SUMS").write_text(sums_text(newer))
    r = _run_serve(newer)
    assert r.returncode == 2 and "newer" in r.stderr and "Traceback" not in r.stderr


def test_refuses_public_bind_without_keys(bundle):
    r = _run_serve(bundle, "--host", "0.0.0.0")
    assert r.returncode == 2 and "refusing to listen on 0.0.0.0" in r.stderr and "--insecure-no-auth-public" in r.stderr
    r = _run_serve(bundle, "--set", "max_batch_size=0")
    assert r.returncode == 2 and "max_batch_size" in r.stderr
    r = _run_serve(bundle, "--set", "no_such_field=1")
    assert r.returncode == 2 and "unknown field" in r.stderr


@pytest.fixture(scope="module")
def slow_server(bundle, tmp_path_factory):
    """No keys; the worker may wait up to 2 s for batch-mates on their way (see _hold)."""
    srv = Server(bundle, tmp_path_factory.mktemp("slow") / "slow.log", "--set", "max_queue_delay_ms=2000",
                 "--set", "warmup_batches=1")
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


def _wait_pending(client, n, timeout=10):
    t_end = time.monotonic() + timeout
    while (pending := metric(client, "edgeft_pending_requests")) != n:
        assert time.monotonic() < t_end, pending
        time.sleep(0.02)


def _hold(srv) -> socket.socket:
    """An admitted request whose body never arrives: the worker waits for it as a batch-mate (up to
    max_queue_delay_ms), which keeps the other requests queued long enough to act on."""
    s = socket.create_connection(("127.0.0.1", srv.port))
    s.sendall(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{{".encode())
    return s


def test_client_that_leaves_while_queued_is_never_computed(slow_server, reference):
    c = httpx.Client(base_url=slow_server.url)
    batches = metric(c, "edgeft_batch_size_count")
    body = json.dumps(v2(["left before compute"])).encode()
    holder = _hold(slow_server)
    _wait_pending(c, 1)
    s = socket.create_connection(("127.0.0.1", slow_server.port))
    s.sendall(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    _wait_pending(c, 2)
    s.close()  # the client leaves while its request waits in the queue
    _wait_pending(c, 1)
    time.sleep(2.3)  # past the worker's batch-collection window
    assert metric(c, "edgeft_batch_size_count") == batches  # dropped before compute
    assert metric(c, "edgeft_requests_total", '{status="499"}') == 1
    holder.close()
    _wait_pending(c, 0)
    r = c.post(INFER, json=v2(TEXTS))
    assert r.status_code == 200 and metric(c, "edgeft_batch_size_count") == batches + 1
    np.testing.assert_allclose(logits_of(r), reference, atol=1e-4)


def test_sigterm_drains_in_flight_requests_and_exits_0(slow_server, reference):
    srv = slow_server
    results = []

    def call():
        results.append(httpx.post(srv.url + INFER, json=v2(TEXTS[:1]), timeout=20))

    holder = _hold(srv)
    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    _wait_pending(httpx.Client(base_url=srv.url), 9)  # all 8 admitted and queued (+ the holder)
    srv.signal(signal.SIGTERM)
    holder.close()
    for t in threads:
        t.join(20)
    assert srv.proc.wait(20) == 0
    assert [r.status_code for r in results] == [200] * 8
    for r in results:
        np.testing.assert_allclose(logits_of(r), reference[:1], atol=1e-4)
    assert "draining" in srv.log()
