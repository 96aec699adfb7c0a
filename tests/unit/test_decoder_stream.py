"""The pieces under the OpenAI routes, in-process: OrtDecoder.stream (greedy = generate, sampling, closing
stops the work), sampling, the bundle tokenizer's chat template (= transformers'), streamed detokenization
with stop strings, request parsing, and the generation engine's queue (cancelled, late, failing jobs)."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path

import numpy as np
import pytest

from edgeft.errors import DataError


@pytest.fixture(scope="module")
def decoder(tiny_decoder_run):
    from edgeft.decoder.generate import OrtDecoder

    return OrtDecoder(tiny_decoder_run / "compress" / "onnx_fp32" / "model.onnx", threads=1)


@pytest.fixture(scope="module")
def tok(tiny_llama):
    from edgeft.decoder.text import DecoderTokenizer

    return DecoderTokenizer(tiny_llama)


def test_stream_greedy_is_generate_and_stops_after_a_stop_token(decoder):
    ids = [312, 368, 327, 282, 277]
    for n in (1, 7, 40):
        assert list(decoder.stream(ids, n)) == decoder.generate(ids, n).tokens
    full = decoder.generate(ids, 60).tokens
    stop = full[10]
    got = list(decoder.stream(ids, 60, stop_token_ids=[stop]))
    assert got == full[:full.index(stop) + 1] == decoder.generate(ids, 60, eos_token_id=stop).tokens
    assert list(decoder.stream(ids, 60, feed=full)) == full  # teacher-forced on its own greedy tokens
    forced = list(decoder.stream(ids, 8, feed=[7] * 7))  # each pick given the fed tokens before it
    logits = decoder.logits(np.asarray([ids + [7] * 7]))[0]
    assert forced[0] == full[0] and forced[1:] == [int(x) for x in logits[len(ids):].argmax(-1)]
    with pytest.raises(DataError, match="context of 8192"):  # checked at the call, not at the first next()
        decoder.stream([5] * 8190, 10)


def test_closing_a_stream_stops_the_model_steps(decoder, monkeypatch):
    runs = []
    real = decoder.session.run_with_iobinding
    monkeypatch.setattr(decoder.session, "run_with_iobinding", lambda b: (runs.append(1), real(b))[1])
    steps = decoder.stream([1, 2, 3], 1000)
    for i, _ in enumerate(steps):
        if i == 4:
            break
    steps.close()
    assert len(runs) == 5  # the prompt and 4 decode steps: nothing after the caller left


def test_sampling(decoder):
    from edgeft.decoder.generate import Sampling, sample_next

    logits = np.array([0.0, 3.0, 1.0, 2.9], dtype=np.float32)
    assert sample_next(logits) == 1
    assert {sample_next(logits, Sampling(1.0, 1e-6), np.random.default_rng(s)) for s in range(20)} == {1}
    draws = [sample_next(logits, Sampling(1.0, 1.0), rng) for rng in [np.random.default_rng(0)] for _ in range(4000)]
    p = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    assert np.allclose(np.bincount(draws, minlength=4) / 4000, p, atol=0.03)
    top2 = {sample_next(logits, Sampling(1.0, 0.6), np.random.default_rng(s)) for s in range(200)}
    assert top2 == {1, 3}  # the nucleus: the two tokens that reach 0.6
    a = list(decoder.stream([5, 6], 20, sampling=Sampling(0.9, 0.95, seed=11)))
    assert a == list(decoder.stream([5, 6], 20, sampling=Sampling(0.9, 0.95, seed=11)))
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(temperature=float("nan"))):
        with pytest.raises(DataError):
            Sampling(**bad)


def test_chat_template_renders_like_transformers(tok, tiny_llama_tok, tmp_path):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Héllo 😀"},
            {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "More?"}]
    assert tok.encode_chat(msgs) == tiny_llama_tok.apply_chat_template(msgs, add_generation_prompt=True)
    assert tok.eos_token_ids == [tiny_llama_tok.eos_token_id]
    import shutil

    from edgeft.decoder.text import ChatTemplateError, DecoderTokenizer

    folder = Path(shutil.copytree(tok.folder, tmp_path / "t"))
    (folder / "chat_template.jinja").write_text("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ChatTemplateError) as e:
        DecoderTokenizer(folder).render_chat(msgs)
    assert "roles must alternate" in e.value.one_line() and "\n" not in e.value.one_line()
    (folder / "chat_template.jinja").unlink()
    t = DecoderTokenizer(folder)
    assert t.chat_template is None
    with pytest.raises(ChatTemplateError, match="no chat template"):
        t.render_chat(msgs)


def test_text_stream_deltas_concatenate_to_the_text_and_stop_before_stop_strings(tok):
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 40))]  # odd bytes included
        s = tok.text_stream()
        assert "".join(s.push(i)[0] for i in ids) + s.flush() == tok.decode(ids)
        full = tok.decode(ids)
        if len(full) < 5:
            continue
        a = rng.randrange(len(full) - 2)
        stop = full[a:a + rng.randint(1, 3)]
        s, parts = tok.text_stream([stop, "\x00never"]), []
        for i in ids:
            delta, stopped = s.push(i)
            parts.append(delta)
            if stopped:
                break
        else:
            parts.append(s.flush())
        assert "".join(parts) == full[:full.find(stop)]



def test_request_parsing():
    from edgeft.serve.completions import BadRequest, parse_request

    r = parse_request(b'{"model": "m", "prompt": ["hi"], "stop": "x", "max_tokens": 5, "seed": 3, "user": "u"}',
                      "completion")
    assert (r.prompt, r.stop, r.max_tokens, r.seed, r.temperature, r.top_p, r.stream) == ("hi", ("x",), 5, 3, 1.0, 1.0,
                                                                                          False)
    c = parse_request(b'{"model": "m", "messages": [{"role": "developer", "content": [{"type": "text", "text": "a"},'
                      b' {"type": "text", "text": "b"}]}], "max_completion_tokens": 7, "stream": true,'
                      b' "stream_options": {"include_usage": true}, "presence_penalty": 0}', "chat")
    assert c.messages == [{"role": "system", "content": "ab"}] and c.max_tokens == 7 and c.include_usage
    for body, param in [(b'{"model": "m", "prompt": "x", "temperature": true}', "temperature"),
                        (b'{"model": "m", "prompt": "x", "max_tokens": 1.5}', "max_tokens"),
                        (b'{"model": "m", "prompt": [1, -2]}', "prompt"),
                        (b'{"model": "m", "prompt": "x", "echo": true}', "echo"),
                        (b'{"model": "m", "messages": [{"role": "user", "content": "x"}]}', "messages"),
                        (b'[1]', None)]:
        with pytest.raises(BadRequest) as e:
            parse_request(body, "completion")
        assert e.value.status == 400 and e.value.param == param, e.value.message


class FakeDecoder:
    """Stands in for OrtDecoder: one token per step, each step can be held; 'boom' prompts fail."""

    context = 64

    def __init__(self):
        import threading

        self.gate = threading.Event()
        self.gate.set()
        self.started: list[list[int]] = []

    def stream(self, prompt_ids, max_new_tokens, *, sampling=None, stop_token_ids=()):
        self.started.append(list(prompt_ids))

        def steps():
            for i in range(max_new_tokens):
                self.gate.wait(10)
                if prompt_ids == [99]:
                    raise RuntimeError("kernel failed")
                yield 10 + i
        return steps()


def test_engine_drops_cancelled_and_late_jobs_and_survives_a_failure(tok):
    from edgeft.serve.engine import DeadlineExceeded
    from edgeft.serve.generation import GenerationEngine, GenerationRequest
    from edgeft.serve.metrics import Metrics

    dec, metrics = FakeDecoder(), Metrics(generation=True)
    eng = GenerationEngine(dec, tok, slots=1, queue_capacity=3, warmup=0, metrics=metrics)
    eng.start()
    assert eng.wait_ready(5)

    async def events(job):
        out = []
        while not out or out[-1][0] not in ("done", "error"):
            out.append(await asyncio.wait_for(job.events.get(), 10))
        return out

    async def main():
        from edgeft.serve.engine import QueueFull

        now = time.monotonic()
        dec.gate.clear()  # hold the worker inside the first job
        first = eng.submit(GenerationRequest([1], 3), deadline=now + 30, t_admitted=now)
        while not dec.started:
            await asyncio.sleep(0.01)
        gone = eng.submit(GenerationRequest([2], 3), deadline=now + 30, t_admitted=now)
        late = eng.submit(GenerationRequest([3], 3), deadline=now, t_admitted=now)
        boom = eng.submit(GenerationRequest([99], 3), deadline=now + 30, t_admitted=now)
        with pytest.raises(QueueFull):
            eng.submit(GenerationRequest([4], 3), deadline=now + 30, t_admitted=now)
        gone.cancel.set()
        dec.gate.set()
        e1, e2, e3, e4 = await events(first), await events(gone), await events(late), await events(boom)
        ok = eng.submit(GenerationRequest([5], 2), deadline=time.monotonic() + 30, t_admitted=time.monotonic())
        return e1, e2, e3, e4, await events(ok)

    try:
        e1, e2, e3, e4, e5 = asyncio.run(main())
    finally:
        eng.stop()
    assert e1[0][0] == "start" and e1[-1][1].finish_reason == "length" and e1[-1][1].completion_tokens == 3
    assert [k for k, _ in e2] == ["done"] and e2[0][1].finish_reason == "cancelled"  # never started
    assert e3[-1][0] == "error" and isinstance(e3[-1][1], DeadlineExceeded)
    assert e4[-1][0] == "error" and "generation failed" in str(e4[-1][1])
    assert e5[-1][1].finish_reason == "length"  # the worker is still there
    assert dec.started == [[1], [99], [5]]
    text = metrics.render().decode()
    assert 'edgeft_generation_requests_total{finish_reason="error"} 1.0' in text
    assert "edgeft_generated_tokens_total 5.0" in text


def test_openai_routes_in_process_rate_limit_and_a_failing_generation(tok, tmp_path):
    """The routes over the engine with a stand-in decoder: the per-key rate limit answers 429 in OpenAI's
    shape, a generation that fails answers 500 and the next one is served."""
    import httpx

    from edgeft.serve.auth import add_key
    from edgeft.serve.completions import GenerationInfo, build_generation_app
    from edgeft.serve.config import ServeConfig
    from edgeft.serve.generation import GenerationEngine
    from edgeft.serve.metrics import Metrics

    _, key = add_key(tmp_path / "keys", "k1")
    cfg = ServeConfig(keys=tmp_path / "keys", rate_limit_rps=0.5, rate_limit_burst=3)
    metrics = Metrics(generation=True)
    eng = GenerationEngine(FakeDecoder(), tok, warmup=0, metrics=metrics)
    eng.start()
    app = build_generation_app(GenerationInfo("m", "1", "d" * 64, 64, 0, True), cfg, eng, tok, metrics)
    h = {"Authorization": f"Bearer {key}"}

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=10) as c:
            ok = await c.post("/v1/completions", json={"model": "m", "prompt": [5], "max_tokens": 3}, headers=h)
            boom = await c.post("/v1/completions", json={"model": "m", "prompt": [99], "max_tokens": 3}, headers=h)
            again = await c.post("/v1/chat/completions", headers=h,
                                 json={"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2})
            limited = await c.post("/v1/completions", json={"model": "m", "prompt": [5]}, headers=h)
            return ok, boom, again, limited

    try:
        ok, boom, again, limited = asyncio.run(main())
    finally:
        eng.stop()
    assert ok.status_code == 200 and ok.json()["usage"] == {"prompt_tokens": 1, "completion_tokens": 3,
                                                              "total_tokens": 4}
    assert ok.json()["choices"][0]["finish_reason"] == "length"
    assert boom.status_code == 500 and boom.json()["error"]["type"] == "server_error"
    assert again.status_code == 200 and again.json()["choices"][0]["message"]["role"] == "assistant"
    assert limited.status_code == 429 and limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(limited.headers["retry-after"]) >= 1
