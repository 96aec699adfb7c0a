"""Load test of `edgeft serve` against what users run instead, all in one run (`make serve-bench`).

    python bench/serve_bench.py [--run RUN_DIR] [--seconds 8] [--repeats 2] [--out bench/results]

Servers, all started once and left running (an idle one costs no CPU), measured interleaved
(repeat -> concurrency -> server) so machine drift hits them alike:
  edgeft             `edgeft serve BUNDLE` (dynamic batching, the bundle's defaults)
  edgeft-nobatch     the same with --set max_batch_size=1
  fastapi-pipeline   FastAPI + transformers pipeline, torch fp32, the fine-tuned model (bench/serve_baselines.py)
  fastapi-optimum    FastAPI + optimum ORTModelForSequenceClassification, optimum's own int8 (avx512_vnni, dynamic)
and, in the same rotation, the offline engine: the server's ModelRunner called in this process on
the same texts, at batch 1 and at the mean batch size the edgeft server formed at concurrency 16.

Load: wrk (C, one thread, one connection per concurrent client), closed loop at concurrency 1, 4,
16 and 64, one test text per request (`POST /predict`, TEI style, which every server above answers),
cycling through the run's test split. Then, on the edgeft server: paced (Poisson) load at 70% of
its peak throughput (p99/p50) and at 2x its peak (status counts, goodput, RSS growth); cold start;
401s for missing/wrong/malformed keys with the batch counter unchanged; SIGTERM under load; stock
tritonclient (binary and JSON) labels vs the offline engine on 200 test texts; batch-of-1 vs batched
agreement over the whole test split. CPU: server and generator share the 2 cores unpinned; each
step records the CPU seconds each used.

Without --run it takes the newest runs/minilm-rotten-tomatoes-* with a compress report, or runs the
default recipe. A bundle is shipped into WORK if the run has none. Results:
OUT/<stamp>-serve.{json,md,png} with the command line, git commit and CPU (model, int8 flags).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import provenance  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LUA = ROOT / "bench" / "wrk_predict.lua"
BASELINES = ROOT / "bench" / "serve_baselines.py"
DEFAULT_RECIPE = ROOT / "recipes" / "minilm-rotten-tomatoes.yaml"
CONCURRENCY = (1, 4, 16, 64)
TARGETS = {
    "batching_speedup_c16": 1.5, "served_vs_offline_c16": 0.8, "vs_fastapi_pipeline_c16": 5.0,
    "vs_fastapi_optimum_c16": 2.0, "p99_over_p50_at_70pct": 2.0, "overload_goodput_vs_peak": 0.9,
    "overload_rss_growth": 0.10, "batch_agreement": 0.995,
}


def log(msg: str) -> None:
    print(f"serve-bench: {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e.setdefault("TOKENIZERS_PARALLELISM", "false")
    e.setdefault("HF_HUB_OFFLINE", "1")
    return e


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 10):
    import http.client
    from urllib.parse import urlsplit

    u = urlsplit(url)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        c.request(method, u.path or "/", body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


class Proc:
    """A server subprocess; cold start = exec to the first 200 on its readiness route."""

    def __init__(self, name: str, cmd: list[str], ready_path: str, logdir: Path):
        self.name, self.port = name, int(cmd[cmd.index("--port") + 1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = logdir / f"{name}.log"
        self._log = open(self.log_path, "wb")
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, env=env(), stdout=self._log, stderr=subprocess.STDOUT)
        self.ready_path = ready_path
        self.cold_start_s: float | None = None

    def wait_ready(self, timeout: float = 180) -> "Proc":
        while time.monotonic() - self.t0 < timeout:
            if self.proc.poll() is not None:
                raise SystemExit(f"serve-bench: {self.name} exited {self.proc.returncode}: "
                                 f"{self.log_path.read_text(errors='replace')[-1500:]}")
            try:
                if http("GET", self.url + self.ready_path, timeout=1)[0] == 200:
                    self.cold_start_s = time.monotonic() - self.t0
                    return self
            except OSError:
                pass
            time.sleep(0.02)
        raise SystemExit(f"serve-bench: {self.name} not ready in {timeout} s")

    def cpu_s(self) -> float:
        import psutil

        try:
            p = psutil.Process(self.proc.pid)
            t = p.cpu_times()
            return t.user + t.system + sum(c.cpu_times().user + c.cpu_times().system for c in p.children(True))
        except psutil.Error:
            return float("nan")

    def rss_mb(self) -> float:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss / 1e6

    def stop(self, timeout: float = 30) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def children_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_wrk(url: str, concurrency: int, seconds: float, bodies: Path, *, rate: float = 0.0, key: str = "",
            server: Proc | None = None, arrivals: str = "uniform") -> dict:
    cmd = ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--timeout", "30s", "--latency",
           "-s", str(LUA), url, "--", str(bodies), f"{rate:.3f}", key, arrivals]
    cpu0, srv0, t0 = children_cpu_s(), server.cpu_s() if server else None, time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.monotonic() - t0
    if out.returncode != 0 or "EDGEFT_WRK " not in out.stdout:
        raise SystemExit(f"serve-bench: wrk failed ({out.returncode}): {out.stderr[-800:]} {out.stdout[-800:]}")
    res = json.loads(out.stdout.split("EDGEFT_WRK ", 1)[1].splitlines()[0])
    dur = res["duration_us"] / 1e6
    ok = res["status"].get("200", 0)
    res.update({
        "concurrency": concurrency, "offered_rate_rps": rate or None, "arrivals": arrivals if rate else "closed loop",
        "seconds": dur,
        "throughput_rps": res["requests"] / dur, "goodput_rps": ok / dur,
        "p50_ms": res["latency_us"]["p50"] / 1000, "p90_ms": res["latency_us"]["p90"] / 1000,
        "p99_ms": res["latency_us"]["p99"] / 1000,
        "generator_cpu_s": children_cpu_s() - cpu0, "wall_s": wall,
    })
    if server is not None:
        res["server_cpu_s"] = server.cpu_s() - srv0
    return res


def batch_counter(url: str) -> tuple[float, float]:
    """(batches run, rows) from the edgeft server's batch-size histogram."""
    _, body = http("GET", url + "/metrics")
    text = body.decode()
    count = float(re.search(r"^edgeft_batch_size_count (\S+)$", text, re.M).group(1))
    total = float(re.search(r"^edgeft_batch_size_sum (\S+)$", text, re.M).group(1))
    return count, total


def offline(runner, texts: list[str], batch: int, seconds: float) -> dict:
    """The engine without HTTP: tokenize + pad + session.run on the same texts, in this process."""
    runner.predict(texts[:batch])
    n, i, lat = 0, 0, []
    t_end = time.perf_counter() + seconds
    t0 = time.perf_counter()
    while time.perf_counter() < t_end:
        chunk = [texts[(i + k) % len(texts)] for k in range(batch)]
        s = time.perf_counter()
        runner.predict(chunk)
        lat.append(time.perf_counter() - s)
        i, n = i + batch, n + batch
    wall = time.perf_counter() - t0
    lat.sort()
    return {"batch": batch, "texts": n, "seconds": wall, "throughput_rps": n / wall,
            "p50_ms": 1000 * lat[len(lat) // 2]}


def ensure_run(run: Path | None, work: Path) -> Path:
    if run is not None:
        return run
    found = sorted((ROOT / "runs").glob("minilm-rotten-tomatoes-*/compress/report.json"))
    if found:
        return found[-1].parent.parent
    log(f"no --run given and no demo run found: running {DEFAULT_RECIPE.name} (about 15 minutes on 2 cores)")
    out = subprocess.run([sys.executable, "-m", "edgeft.cli", "run", str(DEFAULT_RECIPE), "--out", str(work / "run")],
                         env=env(), stdout=subprocess.PIPE, text=True)
    if out.returncode != 0:
        raise SystemExit("serve-bench: the default run failed")
    return work / "run"


def ensure_bundle(run: Path, work: Path) -> Path:
    if (run / "bundle" / "manifest.json").is_file():
        return run / "bundle"
    bundle = work / "bundle"
    if not (bundle / "manifest.json").is_file():
        shutil.rmtree(bundle, ignore_errors=True)
        log(f"shipping {run} -> {bundle}")
        subprocess.run([sys.executable, "-m", "edgeft.cli", "ship", str(run), "--out", str(bundle)], env=env(),
                       check=True, stdout=subprocess.DEVNULL)
    return bundle


def ensure_optimum(run: Path, work: Path) -> Path:
    opt = work / "optimum-int8"
    if not (opt / "model.onnx").is_file():
        from edgeft.quantize import optimum_baseline

        shutil.rmtree(opt, ignore_errors=True)
        log(f"plain optimum int8 (ORTQuantizer, avx512_vnni dynamic per-channel) -> {opt}")
        optimum_baseline(run / "finetuned", opt)
    return opt


def auth_check(url: str, model: str, key: str, bodies: list[bytes]) -> dict:
    """Every missing, wrong or malformed key -> 401 and no batch computed; the right key -> 200."""
    bad = {"missing": {}, "wrong": {"Authorization": "Bearer " + "x" * len(key)},
           "empty": {"Authorization": "Bearer "}, "basic": {"Authorization": "Basic " + key},
           "no-scheme": {"Authorization": key}, "two-tokens": {"Authorization": f"Bearer {key} {key}"},
           "truncated": {"Authorization": "Bearer " + key[:-1]}, "long": {"Authorization": "Bearer " + "k" * 8000}}
    before = batch_counter(url)
    statuses: dict[str, dict[str, int]] = {}
    for name, h in bad.items():
        for b in bodies:
            st, _ = http("POST", url + "/predict", b, {"Content-Type": "application/json", **h})
            statuses.setdefault(name, {}).setdefault(str(st), 0)
            statuses[name][str(st)] += 1
    after = batch_counter(url)
    ok, _ = http("POST", url + "/predict", bodies[0], {"Content-Type": "application/json",
                                                         "Authorization": "Bearer " + key})
    return {"requests_per_case": len(bodies), "statuses": statuses, "batches_before": before[0],
            "batches_after": after[0], "valid_key_status": ok,
            "all_401": all(set(v) == {"401"} for v in statuses.values()),
            "no_inference": before == after}


def sigterm_under_load(srv: Proc, key: str, bodies: list[bytes], *, clients: int = 16, seconds: float = 6,
                       signal_at_s: float = 2.5) -> dict:
    """Clients send one request per connection; after SIGTERM, requests whose connection was accepted
    must all get an answer (200, or 503 once not ready); refused connections are not failures."""
    import http.client

    log_lines_before = len(srv.log_path.read_text(errors="replace").splitlines())
    stop_at = time.monotonic() + seconds
    counts: dict[str, int] = {}
    lock = threading.Lock()
    term_sent = threading.Event()

    def bump(k: str) -> None:
        with lock:
            counts[k] = counts.get(k, 0) + 1

    def client(i: int) -> None:
        j = i
        while time.monotonic() < stop_at:
            j += clients
            c = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
            try:
                c.connect()
            except OSError:
                bump("refused_after_sigterm" if term_sent.is_set() else "refused_before_sigterm")
                time.sleep(0.05)
                continue
            phase = "after" if term_sent.is_set() else "before"
            try:
                c.request("POST", "/predict", body=bodies[j % len(bodies)],
                          headers={"Content-Type": "application/json", "Authorization": "Bearer " + key})
                r = c.getresponse()
                r.read()
                bump(f"{r.status}_{phase}")
            except OSError as e:
                bump(f"failed_{phase}:{type(e).__name__}")
            finally:
                c.close()

    ts = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in ts:
        t.start()
    time.sleep(signal_at_s)
    t_sig = time.monotonic()
    term_sent.set()
    srv.proc.send_signal(signal.SIGTERM)
    rc = srv.proc.wait(60)
    exit_s = time.monotonic() - t_sig
    for t in ts:
        t.join()
    # What the server itself answered, from its access log (one JSON line per request it read).
    served: dict[str, int] = {}
    for line in srv.log_path.read_text(errors="replace").splitlines()[log_lines_before:]:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("route") == "/predict":
            served[str(rec["status"])] = served.get(str(rec["status"]), 0) + 1
    answered_by_client = sum(v for k, v in counts.items() if k[:3].isdigit())
    answered_by_server = sum(v for k, v in served.items() if k in ("200", "503"))
    resets = sum(v for k, v in counts.items() if k.startswith("failed"))
    return {"clients": clients, "counts": counts, "server_access_log": served, "server_exit_code": rc,
            "exit_after_sigterm_s": exit_s,
            # A request the server read but did not answer (or answered with an error): the figure that must be 0.
            "failed_accepted_requests": max(0, answered_by_server - answered_by_client)
            + sum(v for k, v in served.items() if k not in ("200", "503", "401")),
            # Connections the kernel accepted into the listen backlog after the server had stopped accepting:
            # reset when the listening socket closed; the server never read them.
            "reset_in_listen_backlog": resets}


def triton_check(url: str, model: str, texts: list[str], want: list[str]) -> dict:
    import numpy as np
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url.removeprefix("http://"))
    out = {}
    for mode, binary in (("binary", True), ("json", False)):
        got = []
        for t in texts:
            inp = httpclient.InferInput("text", [1, 1], "BYTES")
            inp.set_data_from_numpy(np.array([[t]], dtype=object), binary_data=binary)
            res = client.infer(model, [inp], outputs=[httpclient.InferRequestedOutput("label", binary_data=binary)])
            lab = res.as_numpy("label").reshape(-1)[0]
            got.append(lab.decode() if isinstance(lab, bytes) else str(lab))
        out[mode] = {"texts": len(texts), "same_labels": sum(g == w for g, w in zip(got, want))}
    return out


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/serve_bench.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "serve-bench")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--seconds", type=float, default=8.0, help="per closed-loop step")
    ap.add_argument("--repeats", type=int, default=2, help="rounds of the interleaved sweep")
    ap.add_argument("--texts", type=int, default=1000, help="test texts cycled by the load generator")
    a = ap.parse_args(argv)
    if shutil.which("wrk") is None:
        raise SystemExit("serve-bench: wrk not found (fix: apt-get install wrk; `make serve-bench` does it)")

    from edgeft.artifacts import cpu_info, sha256_file, write_text_atomic
    from edgeft.bundle import open_bundle
    from edgeft.data import load_dataset
    from edgeft.recipe import load_recipe
    from edgeft.serve.auth import add_key
    from edgeft.serve.runner import ModelRunner

    a.work.mkdir(parents=True, exist_ok=True)
    run = ensure_run(a.run, a.work)
    bundle_dir = ensure_bundle(run, a.work)
    bundle = open_bundle(bundle_dir)
    opt_dir = ensure_optimum(run, a.work)
    recipe = load_recipe(run / "recipe.yaml")
    test = load_dataset(recipe.data).test
    texts = list(test.texts[:a.texts])
    bodies = a.work / "bodies.jsonl"
    bodies.write_text("".join(json.dumps({"inputs": t}) + "\n" for t in texts), encoding="utf-8")
    logdir = a.work / "logs"
    logdir.mkdir(exist_ok=True)
    ml = str(bundle.max_length)
    edgeft_cmd = [sys.executable, "-m", "edgeft.cli", "serve", str(bundle_dir)]

    log(f"run {run}; bundle {bundle_dir} ({bundle.name} {bundle.version}, {bundle.onnx_path.name}); "
        f"{len(texts)} test texts; CPU {cpu_info()['model']} {cpu_info()['flags']}")
    servers = {
        "edgeft": Proc("edgeft", edgeft_cmd + ["--port", str(free_port())], "/v2/health/ready", logdir),
        "edgeft-nobatch": Proc("edgeft-nobatch", edgeft_cmd + ["--port", str(free_port()), "--set", "max_batch_size=1"],
                               "/v2/health/ready", logdir),
        "fastapi-pipeline": Proc("fastapi-pipeline", [sys.executable, str(BASELINES), "pipeline", str(run / "finetuned"),
                                                      "--port", str(free_port()), "--max-length", ml], "/health", logdir),
        "fastapi-optimum": Proc("fastapi-optimum", [sys.executable, str(BASELINES), "optimum", str(opt_dir),
                                                    "--port", str(free_port()), "--max-length", ml], "/health", logdir),
    }
    result: dict = {
        **provenance("bench/serve_bench.py", argv, ("onnxruntime", "tokenizers", "uvicorn", "fastapi")),
        "started_unix": time.time(), "run_dir": str(run), "bundle": str(bundle_dir),
        "bundle_digest": bundle.digest, "model_file": str(bundle.onnx_path.relative_to(bundle_dir)),
        "compress_report": {"path": str(run / "compress" / "report.json"),
                            "sha256": sha256_file(run / "compress" / "report.json")},
        "texts": len(texts), "generator": "wrk 4.1 (one thread), bench/wrk_predict.lua",
        "cpu_sharing": "server and generator unpinned on the same cores; CPU seconds of each recorded per step",
        "seconds_per_step": a.seconds, "repeats": a.repeats, "targets": TARGETS,
    }
    try:
        # Cold starts happen concurrently above; take a clean one for the edgeft server alone, below.
        for s in servers.values():
            s.wait_ready()
        result["cold_start_concurrent_s"] = {k: s.cold_start_s for k, s in servers.items()}
        runner = ModelRunner(bundle.model_dir, bundle.onnx_path, max_length=bundle.max_length, threads=None)
        for name, s in servers.items():  # warm-up at the largest concurrency
            run_wrk(s.url, 16, 2, bodies)
        steps: list[dict] = []
        for rep in range(a.repeats):
            for c in CONCURRENCY:
                for name, s in servers.items():
                    b0 = batch_counter(s.url) if name.startswith("edgeft") else None
                    r = run_wrk(s.url, c, a.seconds, bodies, server=s)
                    if b0 is not None:
                        b1 = batch_counter(s.url)
                        r["mean_batch_rows"] = (b1[1] - b0[1]) / max(1.0, b1[0] - b0[0])
                    r.update(server=name, repeat=rep)
                    if r["status"].get("200", 0) < 0.99 * r["requests"]:  # a broken server must not look fast
                        raise SystemExit(f"serve-bench: {name} answered {r['status']} at c={c}; see {s.log_path}")
                    steps.append(r)
                    log(f"rep {rep} c{c:<3} {name:<17} {r['throughput_rps']:7.1f} req/s  p50 {r['p50_ms']:7.2f}  "
                        f"p99 {r['p99_ms']:7.2f} ms  status {r['status']}  errors {r['errors']}")
                    time.sleep(0.2)
                if c in (1, 16):
                    mb = 1 if c == 1 else max(1, round(median([x["mean_batch_rows"] for x in steps
                                                                 if x["server"] == "edgeft" and x["concurrency"] == 16])))
                    o = offline(runner, texts, mb, a.seconds)
                    o.update(server="offline-engine", concurrency=c, repeat=rep)
                    steps.append(o)
                    log(f"rep {rep} c{c:<3} offline b{mb:<3}      {o['throughput_rps']:7.1f} texts/s")
        result["steps"] = steps

        def agg(server: str, c: int, key: str = "throughput_rps") -> float:
            return median([x[key] for x in steps if x["server"] == server and x["concurrency"] == c])

        table = {name: {c: {k: agg(name, c, k) for k in ("throughput_rps", "p50_ms", "p99_ms")} for c in CONCURRENCY}
                 for name in servers}
        result["table"] = table
        result["offline"] = {c: {"batch": agg("offline-engine", c, "batch"),
                                 "throughput_rps": agg("offline-engine", c)} for c in (1, 16)}
        peak = max(table["edgeft"][c]["throughput_rps"] for c in CONCURRENCY)
        e16 = table["edgeft"][16]["throughput_rps"]
        ratios = {
            "batching_speedup_c16": e16 / table["edgeft-nobatch"][16]["throughput_rps"],
            "served_vs_offline_c16": e16 / result["offline"][16]["throughput_rps"],
            "served_vs_offline_c1": table["edgeft"][1]["throughput_rps"] / result["offline"][1]["throughput_rps"],
            "vs_fastapi_pipeline_c16": e16 / table["fastapi-pipeline"][16]["throughput_rps"],
            "vs_fastapi_optimum_c16": e16 / table["fastapi-optimum"][16]["throughput_rps"],
        }
        result["peak_rps"] = peak
        c16 = [x for x in steps if x["server"] == "edgeft" and x["concurrency"] == 16]
        result["c16_server_cpu_ms_per_request"] = median([1000 * x["server_cpu_s"] / x["requests"] for x in c16])
        result["mean_batch_rows_c16"] = agg("edgeft", 16, "mean_batch_rows")

        # Paced load on the edgeft server alone (the others idle).
        srv = servers["edgeft"]
        p70 = run_wrk(srv.url, 64, 2 * a.seconds, bodies, rate=0.7 * peak, server=srv)  # evenly spaced (wrk2-like)
        ratios["p99_over_p50_at_70pct"] = p70["p99_ms"] / p70["p50_ms"]
        p70p = run_wrk(srv.url, 64, 2 * a.seconds, bodies, rate=0.7 * peak, server=srv, arrivals="poisson")
        ratios["p99_over_p50_at_70pct_poisson"] = p70p["p99_ms"] / p70p["p50_ms"]
        result["paced_70pct_poisson"] = p70p
        for r_ in (p70, p70p):  # server CPU per answer: paced arrivals form smaller batches than the closed loop
            r_["server_cpu_ms_per_request"] = 1000 * r_["server_cpu_s"] / max(1, r_["requests"])
        rss0 = srv.rss_mb()
        over = run_wrk(srv.url, 512, 2 * a.seconds, bodies, rate=2 * peak, server=srv)
        rss1 = srv.rss_mb()
        t_over, st = time.monotonic(), None  # the queue drains, then the server answers again
        while time.monotonic() - t_over < 30 and st != 200:
            st, _ = http("POST", srv.url + "/predict", json.dumps({"inputs": texts[0]}).encode(),
                         {"Content-Type": "application/json"})
            if st != 200:
                time.sleep(0.05)
        over.update(rss_before_mb=rss0, rss_after_mb=rss1, alive_after=srv.proc.poll() is None,
                    answer_after_status=st, recovered_after_s=time.monotonic() - t_over,
                    only_200_503=set(over["status"]) <= {"200", "503"})
        ratios["overload_goodput_vs_peak"] = over["goodput_rps"] / peak
        ratios["overload_rss_growth"] = rss1 / rss0 - 1
        result["paced_70pct"], result["overload_2x"] = p70, over
        log(f"70% of peak ({0.7 * peak:.0f} req/s offered): p50 {p70['p50_ms']:.2f} p99 {p70['p99_ms']:.2f} ms; "
            f"2x peak: status {over['status']} goodput {over['goodput_rps']:.1f} req/s, RSS {rss0:.0f}->{rss1:.0f} MB")

        # Stock tritonclient vs the offline engine (batch of 1), 200 texts.
        want = [bundle.labels[int(i)] for t in texts[:200] for i in runner.predict([t])[0].argmax(-1)]
        result["tritonclient"] = triton_check(srv.url, bundle.name, texts[:200], want)
        log(f"tritonclient: {result['tritonclient']}")
        for name, s in servers.items():
            result.setdefault("server_exit_codes", {})[name] = s.stop()

        # Clean cold start, auth and SIGTERM on a fresh server with a key file.
        keyfile = a.work / "keys.txt"
        keyfile.unlink(missing_ok=True)
        _, key = add_key(keyfile, "bench")
        sec = Proc("edgeft-keys", edgeft_cmd + ["--port", str(free_port()), "--keys", str(keyfile)],
                   "/v2/health/ready", logdir).wait_ready()
        result["cold_start_s"] = sec.cold_start_s
        enc = [json.dumps({"inputs": t}).encode() for t in texts[:40]]
        result["auth"] = auth_check(sec.url, bundle.name, key, enc)
        log(f"cold start {sec.cold_start_s:.2f} s; auth {result['auth']['all_401']=} {result['auth']['no_inference']=}")
        result["sigterm"] = sigterm_under_load(sec, key, enc)
        log(f"SIGTERM under load: {result['sigterm']}")
    finally:
        for s in servers.values():
            if s.proc.poll() is None:
                s.stop()

    # Batch-of-1 vs batched label agreement over the whole test split (shipped variant).
    variant = json.loads((bundle_dir / "manifest.json").read_text()).get("variant", {})
    source = Path(variant.get("source") or "")  # compress/<folder>/model.onnx in the run
    agree_cmd = [sys.executable, "-m", "edgeft.serve.agreement", str(run), "--split", "test", "--n", "100000"]
    if len(source.parts) == 3 and source.parts[0] == "compress" and (run / source.parent).is_dir():
        agree_cmd += ["--variant", source.parts[1]]
    out = subprocess.run(agree_cmd, capture_output=True, text=True, env=env())
    if out.returncode == 0:
        result["batch_agreement"] = json.loads(out.stdout)
        first = next(v for k, v in result["batch_agreement"].items() if k.startswith("answers_"))
        ratios["batch_agreement"] = first["agreement_batched_vs_b1"]
    else:
        result["batch_agreement"] = {"error": out.stderr[-500:]}
    result["ratios"] = ratios
    result["checks"] = {k: (v >= TARGETS[k] if k not in ("p99_over_p50_at_70pct", "overload_rss_growth")
                            else v <= TARGETS[k]) for k, v in ratios.items() if k in TARGETS}
    result["finished_unix"] = time.time()

    stamp = time.strftime("%Y%m%d-%H%M")
    a.out.mkdir(parents=True, exist_ok=True)
    base = a.out / f"{stamp}-serve"
    write_text_atomic(base.with_suffix(".json"), json.dumps(result, indent=2, default=str) + "\n")
    write_text_atomic(base.with_suffix(".md"), render_md(result))
    plot(result, base.with_suffix(".png"))
    print(base.with_suffix(".md"))
    return 0


def render_md(r: dict) -> str:
    cpu = r["cpu"]
    lines = [f"# Serve load test ({time.strftime('%Y-%m-%d %H:%M', time.gmtime(r['started_unix']))} UTC)", "",
             f"- command: `{r['command']}`", f"- git commit: `{r['git_commit']}`{' (dirty tree)' if r['git_dirty'] else ''}",
             f"- CPU: {cpu['model']}, {cpu['usable_cores']} usable cores, int8 flags: {', '.join(cpu['flags']) or 'none'}",
             f"- bundle: `{r['bundle']}` ({r['model_file']}, digest {r['bundle_digest'][:12]}), {r['texts']} test texts, "
             "one per request",
             f"- generator: {r['generator']}; {r['cpu_sharing']}",
             f"- {r['repeats']} interleaved rounds of {r['seconds_per_step']:.0f} s per step; medians of the rounds", "",
             "## Closed loop: throughput (req/s) and p50 / p99 (ms)", "",
             "| server | " + " | ".join(f"c={c}" for c in CONCURRENCY) + " |", "|---|" + "---|" * len(CONCURRENCY)]
    for name, row in r["table"].items():
        cells = [f"{row[c]['throughput_rps']:.0f} ({row[c]['p50_ms']:.1f} / {row[c]['p99_ms']:.1f})" for c in CONCURRENCY]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    off = r["offline"]
    lines += ["", f"Offline engine (same ModelRunner, this process): batch 1 {off[1]['throughput_rps']:.0f} texts/s; "
              f"batch {off[16]['batch']:.0f} (the server's mean batch at c=16: {r['mean_batch_rows_c16']:.1f}) "
              f"{off[16]['throughput_rps']:.0f} texts/s.", ""]
    gen = [x for x in r["steps"] if x.get("server") == "edgeft" and x["concurrency"] == 16]
    if gen:
        g = gen[-1]
        lines.append(f"CPU at c=16 (edgeft, last round): server {g['server_cpu_s']:.1f} s, generator "
                     f"{g['generator_cpu_s']:.1f} s over {g['seconds']:.1f} s wall.")
    lines += ["", "## Targets", "", "| check | measured | target | met |", "|---|---|---|---|"]
    for k, v in r["ratios"].items():
        if k in TARGETS:
            op = "<=" if k in ("p99_over_p50_at_70pct", "overload_rss_growth") else ">="
            lines.append(f"| {k} | {v:.3f} | {op} {TARGETS[k]} | {'yes' if r['checks'][k] else '**no**'} |")
        else:
            lines.append(f"| {k} | {v:.3f} | (reported) | |")
    p, o = r["paced_70pct"], r["overload_2x"]
    lines += ["", f"- peak (edgeft, closed loop): {r['peak_rps']:.0f} req/s",
              f"- paced at 70% of peak ({p['offered_rate_rps']:.0f} req/s offered, 64 connections): "
              f"{p['throughput_rps']:.0f} req/s, p50 {p['p50_ms']:.2f} ms, p90 {p['p90_ms']:.2f} ms, p99 {p['p99_ms']:.2f} ms, "
              f"status {p['status']}; server CPU {p['server_cpu_ms_per_request']:.2f} ms per request "
              f"(closed loop c=16: {r['c16_server_cpu_ms_per_request']:.2f})",
              f"- the same with Poisson arrivals: p50 {r['paced_70pct_poisson']['p50_ms']:.2f} ms, p99 "
              f"{r['paced_70pct_poisson']['p99_ms']:.2f} ms, status {r['paced_70pct_poisson']['status']}",
              f"- paced at 2x peak ({o['offered_rate_rps']:.0f} req/s offered, 512 connections): status {o['status']}, "
              f"socket errors {o['errors']}, goodput {o['goodput_rps']:.0f} req/s, RSS {o['rss_before_mb']:.0f} -> "
              f"{o['rss_after_mb']:.0f} MB, alive after: {o['alive_after']}, answers {o['answer_after_status']} again "
              f"{o['recovered_after_s']:.2f} s after the load stopped (its queue drained)",
              f"- cold start (exec to ready, alone): {r['cold_start_s']:.2f} s; started together: "
              + ", ".join(f"{k} {v:.1f} s" for k, v in r["cold_start_concurrent_s"].items()),
              f"- auth: {r['auth']['requests_per_case']} requests per bad-key case ({', '.join(r['auth']['statuses'])}): "
              f"all 401: {r['auth']['all_401']}; batches before/after: {r['auth']['batches_before']:.0f} / "
              f"{r['auth']['batches_after']:.0f}; valid key: {r['auth']['valid_key_status']}",
              f"- SIGTERM under load ({r['sigterm']['clients']} clients, one request per connection): {r['sigterm']['counts']}; "
              f"server access log {r['sigterm']['server_access_log']}; failed requests the server read: "
              f"{r['sigterm']['failed_accepted_requests']}; resets of connections never accepted (listen backlog at "
              f"close): {r['sigterm']['reset_in_listen_backlog']}; exit code "
              f"{r['sigterm']['server_exit_code']} after {r['sigterm']['exit_after_sigterm_s']:.2f} s",
              "- tritonclient vs offline engine labels: " + ", ".join(
                  f"{m} {v['same_labels']}/{v['texts']}" for m, v in r["tritonclient"].items())]
    ba = r.get("batch_agreement", {})
    for k, v in ba.items():
        if k.startswith("answers_"):
            lines.append(f"- batch agreement, {k[8:]} over {ba['texts']} test texts (batches of {ba['batch_size']}): "
                         f"batched vs batch-of-1 {v['agreement_batched_vs_b1']:.4f}, length-sorted "
                         f"{v['agreement_length_sorted_vs_b1']:.4f}; accuracy b1 {v['accuracy_b1']:.4f}, batched "
                         f"{v['accuracy_batched']:.4f}")
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, row in r["table"].items():
        ax1.plot(CONCURRENCY, [row[c]["throughput_rps"] for c in CONCURRENCY], marker="o", label=name)
        ax2.plot(CONCURRENCY, [row[c]["p99_ms"] for c in CONCURRENCY], marker="o", label=name)
    for ax, title in ((ax1, "throughput (req/s)"), (ax2, "p99 latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(CONCURRENCY, [str(c) for c in CONCURRENCY])
        ax.set_xlabel("concurrent clients (closed loop)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax2.set_yscale("log")
    ax1.legend(fontsize=8)
    fig.suptitle(f"edgeft serve vs alternatives, {r['cpu']['model']} ({r['cpu']['usable_cores']} cores)", fontsize=9)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
