"""`edgeft serve` on a text-generation bundle: the OpenAI-compatible API of a REAL server process on a free
port, called with the official `openai` client (completions and chat, plain and streamed) and with httpx
for the error statuses, the slot queue, a client leaving mid-stream, /metrics and SIGTERM. The bundle is
shipped in-process from the session's tiny decoder run (tests/conftest.py)."""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import time

import httpx
import pytest
from decoder_helpers import ship_run
from serve_helpers import Server

try:
    import openai
except ImportError:  # the official client is a test dependency; without it only its tests skip
    openai = None

NAME = "tiny-dec"
MAX_NEW = 8000
LIMITS = ["--threads", "1", "--set", "queue_capacity=2", "--set", "generation_slots=1", "--set", "max_body_bytes=65536",
          "--set", "receive_timeout_s=3", "--set", "warmup_batches=1", "--set", f"max_new_tokens={MAX_NEW}"]
PROMPT = "The capital of France is"
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a city by the sea."}]


@pytest.fixture(scope="module")
def bundle(tiny_decoder_run, tmp_path_factory):
    return ship_run(tiny_decoder_run, tmp_path_factory.mktemp("dec-bundle") / "tiny-dec")


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
        assert srv.stop() == 0


@pytest.fixture(scope="module")
def client(server, keyfile):
    if openai is None:
        pytest.skip("the official openai client is not installed (pip install openai)")
    return openai.OpenAI(base_url=server.url + "/v1", api_key=keyfile[1], max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def http(server, keyfile):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {keyfile[1]}"}, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def reference(bundle):
    """Greedy tokens straight from OrtDecoder, fed by transformers' tokenizer and chat template (not the server's)."""
    from transformers import AutoTokenizer

    from edgeft.decoder.generate import OrtDecoder

    tok = AutoTokenizer.from_pretrained(bundle / "model")
    dec = OrtDecoder(bundle / "model" / "model.onnx", threads=1)

    def greedy(ids: list[int], n: int) -> tuple[str, list[int]]:
        tokens = dec.generate(ids, n, eos_token_id=tok.eos_token_id).tokens
        body = tokens[:-1] if tokens and tokens[-1] == tok.eos_token_id else tokens
        return tok.decode(body, skip_special_tokens=True), tokens

    return tok, greedy


def metric(http, name, labels=""):
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", http.get("/metrics").text, re.M)
    return float(m.group(1)) if m else None


def assert_serving(http):
    """The server still answers a good request."""
    r = http.post("/v1/completions", json={"model": NAME, "prompt": "To be", "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, r.text


def oai_error(r: httpx.Response, status: int, needle: str, param: str | None = None, code: str | None = None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and needle in err["message"], err
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


# --- the API with the official client ------------------------------------------------------------

def test_models_route_and_auth(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [NAME] and models.data[0].owned_by == "edgeft"
    assert client.models.retrieve(NAME).id == NAME
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=NAME, prompt="x", max_tokens=2)


def test_auth_and_health_routes(server, http):
    assert http.get("/v1/models").json()["data"][0]["id"] == NAME
    oai_error(http.get("/v1/models/nope"), 404, "does not exist", code="model_not_found")
    oai_error(httpx.get(server.url + "/v1/models"), 401, "missing API key", code="invalid_api_key")
    r = httpx.post(server.url + "/v1/completions", json={"model": NAME, "prompt": "x"},
                   headers={"Authorization": "Bearer wrong"})
    oai_error(r, 401, "invalid API key")
    assert httpx.get(server.url + "/v2/health/live").json() == {"live": True}  # health needs no key
    assert httpx.get(server.url + "/v2/health/ready").json() == {"ready": True}


def test_greedy_completion_plain_and_streamed_equal_the_decoder(client, http, reference):
    tok, greedy = reference
    ids = tok(PROMPT)["input_ids"]
    want_text, want_tokens = greedy(ids, 40)
    tokens_before = metric(http, "edgeft_generated_tokens_total")
    ttft_before = metric(http, "edgeft_time_to_first_token_seconds_count")
    r = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=40, temperature=0)
    assert r.object == "text_completion" and r.model == NAME and len(r.choices) == 1
    assert r.choices[0].text == want_text
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(want_tokens)
    assert r.usage.total_tokens == len(ids) + len(want_tokens)
    assert r.choices[0].finish_reason == ("stop" if want_tokens[-1] == tok.eos_token_id else "length")
    chunks = list(client.completions.create(model=NAME, prompt=PROMPT, max_tokens=40, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == want_text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want_tokens)
    # /metrics counts the tokens of both generations and their first tokens
    assert metric(http, "edgeft_generated_tokens_total") == tokens_before + 2 * len(want_tokens)
    assert metric(http, "edgeft_time_to_first_token_seconds_count") == ttft_before + 2
    # a prompt given as token ids is the same request
    same = client.completions.create(model=NAME, prompt=ids, max_tokens=40, temperature=0)
    assert same.choices[0].text == want_text


def test_chat_plain_and_streamed_equal_the_decoder_on_the_chat_template(client, reference):
    tok, greedy = reference
    ids = tok.apply_chat_template(CHAT, add_generation_prompt=True)
    want_text, want_tokens = greedy(ids, 24)
    r = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=24, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want_text
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(want_tokens)
    stream = client.chat.completions.create(model=NAME, messages=CHAT, max_completion_tokens=24, temperature=0,
                                            stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want_text
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_sse_wire_format(http):
    with http.stream("POST", "/v1/completions", json={"model": NAME, "prompt": PROMPT, "max_tokens": 6,
                                                       "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    body = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert all(b["object"] == "text_completion" and b["id"].startswith("cmpl-") for b in body)
    assert body[-1]["choices"][0]["finish_reason"] == "length"
    assert all(b["choices"][0]["finish_reason"] is None for b in body[:-1])


def test_stop_strings_end_the_text_before_them(client):
    full = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=30, temperature=0).choices[0].text
    assert len(full) > 4
    stop = full[3:5]
    r = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=30, temperature=0, stop=[stop, "never-there"])
    assert r.choices[0].text == full[:full.find(stop)] and r.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(model=NAME, prompt=PROMPT, max_tokens=30, temperature=0, stop=stop,
                                              stream=True))
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text
    assert streamed[-1].choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 30  # the generation stopped there, it did not run on


def test_sampling_is_seeded_and_top_p_narrows_to_greedy(client):
    def once(**kw):
        return client.completions.create(model=NAME, prompt=PROMPT, max_tokens=16, **kw).choices[0].text

    a = once(temperature=1.5, seed=7)
    assert a == once(temperature=1.5, seed=7)  # same seed, same text
    assert any(once(temperature=1.5, seed=s) != a for s in (8, 9, 10))
    greedy = once(temperature=0)
    assert once(temperature=1.0, top_p=1e-9, seed=3) == greedy  # the nucleus is the arg-max alone


# --- bad input: clear OpenAI errors, and the server keeps serving ----------------------------------

@pytest.mark.parametrize("route, body, status, needle, param, code", [
    ("/v1/completions", {"model": NAME, "prompt": "x", "n": 2}, 400, "n must be 1", "n", None),
    ("/v1/completions", {"model": NAME, "prompt": [5] * 8192}, 400, "context is 8192 tokens", "prompt",
     "context_length_exceeded"),
    ("/v1/completions", {"model": NAME, "prompt": [5] * 8000, "max_tokens": 500}, 400,
     "8500 tokens exceed the model's context of 8192; ask for at most 192", "max_tokens", "context_length_exceeded"),
    ("/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": MAX_NEW + 1}, 400, "max_new_tokens",
     "max_tokens", None),
    ("/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": 0}, 400, "integer >= 1", "max_tokens", None),
    ("/v1/completions", {"model": NAME, "prompt": "x", "temperature": 3}, 400, "temperature", "temperature", None),
    ("/v1/completions", {"model": NAME, "prompt": "x", "top_p": 0}, 400, "top_p", "top_p", None),
    ("/v1/completions", {"model": NAME, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4", "stop",
     None),
    ("/v1/completions", {"model": NAME, "prompt": "x", "logprobs": 2}, 400, "not supported", "logprobs", None),
    ("/v1/completions", {"model": NAME, "prompt": "x", "frobnicate": 1}, 400, "unknown parameter", "frobnicate", None),
    ("/v1/completions", {"model": NAME, "prompt": ["a", "b"]}, 400, "one prompt per request", "prompt", None),
    ("/v1/completions", {"model": NAME, "prompt": ""}, 400, "empty", "prompt", None),
    ("/v1/completions", {"prompt": "x"}, 400, "'model' is required", "model", None),
    ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "does not exist", "model", "model_not_found"),
    ("/v1/chat/completions", {"model": NAME, "messages": []}, 400, "non-empty list", "messages", None),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "wizard", "content": "x"}]}, 400, "role",
     "messages", None),
    ("/v1/chat/completions", {"model": NAME, "messages": CHAT, "tools": [{"type": "function"}]}, 400,
     "not supported", "tools", None),
    ("/v1/completions", b'{"model": ', 400, "not valid JSON", None, None),
])
def test_bad_requests_get_openai_errors(http, route, body, status, needle, param, code):
    r = http.post(route, content=body) if isinstance(body, bytes) else http.post(route, json=body)
    oai_error(r, status, needle, param, code)
    assert_serving(http)


def test_openai_client_raises_its_own_errors(client):
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        client.completions.create(model=NAME, prompt="x", n=2)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=CHAT)


def test_big_body_413_and_unknown_route(http):
    oai_error(http.post("/v1/completions", json={"model": NAME, "prompt": "word " * 20_000}), 413, "max_body_bytes")
    oai_error(http.get("/v1/completions"), 405, "not allowed")
    oai_error(http.post("/v1/embeddings", json={}), 404, "no route")
    assert_serving(http)


def _hold(server, key) -> socket.socket:
    """An admitted request whose body never arrives: it holds an admission slot (admission precedes the body)."""
    s = socket.create_connection(("127.0.0.1", server.port))
    s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
              f"Content-Length: 100\r\n\r\n{{".encode())
    return s


def _wait(fn, timeout=10.0):
    t_end = time.monotonic() + timeout
    while not fn():
        assert time.monotonic() < t_end, "timed out"
        time.sleep(0.02)


def test_full_slot_queue_answers_503_with_retry_after(server, keyfile, http):
    holders = [_hold(server, keyfile[1]) for _ in range(2)]  # queue_capacity=2
    try:
        _wait(lambda: metric(http, "edgeft_pending_requests") == 2)
        t0 = time.monotonic()
        r = http.post("/v1/completions", json={"model": NAME, "prompt": "x", "max_tokens": 2})
        err = oai_error(r, 503, "queue_capacity", code="server_busy")
        assert r.headers["retry-after"] == "1" and err["type"] == "server_error" and time.monotonic() - t0 < 1
        assert httpx.get(server.url + "/v2/health/live").status_code == 200
    finally:
        for s in holders:
            s.close()
    _wait(lambda: metric(http, "edgeft_pending_requests") == 0)
    assert metric(http, "edgeft_rejections_total", '{reason="queue_full"}') >= 1
    assert_serving(http)


def test_client_leaving_mid_stream_stops_its_generation_and_frees_the_slot(server, keyfile, http):
    tokens_before = metric(http, "edgeft_generated_tokens_total")
    cancelled = metric(http, "edgeft_generation_requests_total", '{finish_reason="cancelled"}')
    with httpx.Client(base_url=server.url, headers=http.headers, timeout=30) as c:
        with c.stream("POST", "/v1/completions", json={"model": NAME, "prompt": PROMPT, "max_tokens": MAX_NEW,
                                                        "temperature": 0, "stream": True}) as r:
            assert r.status_code == 200
            n = 0
            for line in r.iter_lines():
                n += line.startswith("data: ")
                if n == 3:  # three chunks in, the client leaves
                    break
    # the connection is closed: the generation stops at its next step and the slot is free again
    _wait(lambda: metric(http, "edgeft_pending_requests") == 0, timeout=5)
    _wait(lambda: metric(http, "edgeft_generation_requests_total", '{finish_reason="cancelled"}') == cancelled + 1,
          timeout=5)
    generated = metric(http, "edgeft_generated_tokens_total") - tokens_before
    assert 3 <= generated < MAX_NEW / 4, generated  # nowhere near the 8000 it asked for
    # both slots are free: one held, the other still answers
    holder = _hold(server, keyfile[1])
    try:
        assert_serving(http)
    finally:
        holder.close()


def test_metric_names_and_access_log(http, server, keyfile):
    text = http.get("/metrics").text
    for name in ["edgeft_generated_tokens_total", "edgeft_prompt_tokens_total",
                 "edgeft_time_to_first_token_seconds_bucket", "edgeft_generation_requests_total",
                 "edgeft_requests_total", "edgeft_rejections_total", "edgeft_pending_requests", "edgeft_queue_capacity",
                 "edgeft_model_ready", "edgeft_build_info", "edgeft_auth_failures_total"]:
        assert re.search(rf"^{name}[{{ ]", text, re.M), name
    for reason in ("stop", "length", "cancelled", "error"):
        assert f'edgeft_generation_requests_total{{finish_reason="{reason}"}}' in text
    time.sleep(0.2)
    log = server.log()
    assert PROMPT not in log and keyfile[1] not in log  # neither the prompt nor the key is logged
    lines = [json.loads(x) for x in log.splitlines() if '"request_id"' in x]
    assert any(x["route"] == "/v1/completions" and x["status"] == 200 and x["key_id"] == "alice" and x["tokens"]
               for x in lines)


# --- a bundle without a chat template; SIGTERM while streaming --------------------------------------

@pytest.fixture(scope="module")
def no_template_server(bundle, tmp_path_factory):
    """The same bundle without its chat template (resealed: a valid bundle), served without keys."""
    from test_decoder_ship import reseal

    b = tmp_path_factory.mktemp("notemplate") / "b"
    shutil.copytree(bundle, b)
    (b / "model" / "chat_template.jinja").unlink()
    m = json.loads((b / "manifest.json").read_text())
    m["tokenizer"]["chat_template"] = False
    (b / "manifest.json").write_text(json.dumps(m))
    reseal(b)
    srv = Server(b, tmp_path_factory.mktemp("log2") / "serve.log", "--threads", "1", "--set", "warmup_batches=1")
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


def test_chat_without_a_template_is_a_clear_400(no_template_server):
    c = httpx.Client(base_url=no_template_server.url, timeout=30)
    r = c.post("/v1/chat/completions", json={"model": NAME, "messages": CHAT})
    oai_error(r, 400, "has no chat template", "messages", "chat_template_missing")
    assert "/v1/completions" in r.json()["error"]["message"]
    ok = c.post("/v1/completions", json={"model": NAME, "prompt": PROMPT, "max_tokens": 4, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 4


def test_sigterm_lets_a_stream_finish_then_exits_0(no_template_server):
    srv = no_template_server
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json={"model": NAME, "prompt": PROMPT, "max_tokens": 2000,
                                                        "temperature": 0, "stream": True}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            srv.signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data: ")]
    assert json.loads(first.removeprefix("data: "))["object"] == "text_completion"
    assert rest[-1] == "data: [DONE]" and json.loads(rest[-2].removeprefix("data: "))["choices"][0]["finish_reason"]
    assert srv.proc.wait(30) == 0
    assert "draining" in srv.log()


def test_refuses_a_public_host_without_keys(bundle):
    import subprocess

    from serve_helpers import env, serve_cmd

    r = subprocess.run(serve_cmd(bundle, "--host", "0.0.0.0", "--port", "0"), env=env(), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "refusing to listen on 0.0.0.0" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
