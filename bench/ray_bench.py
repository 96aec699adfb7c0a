"""Ray Serve engine measured in one run (`make ray-bench`): overhead vs the embedded server, and
replicas following the load.

    python bench/ray_bench.py [--run RUN_DIR] [--seconds 10] [--repeats 2] [--out bench/results]

1. Overhead: the same bundle served by `edgeft serve` (embedded: one process, edgeft's batcher,
   2 threads) and by `edgeft serve --engine ray` (Ray 2 CPUs, 1 replica of 2 CPUs, 2 threads,
   @serve.batch; Ray's Python proxy, and again with `ray.proxy=haproxy`), each started alone (an idle Ray cluster still spends CPU, so the two never run at
   once), in ABBA order per repeat, then the same wrk closed loop at concurrency 1 and 8 (one test text
   per request, `POST /predict`). Reported: throughput, p50, p99 per engine (medians over repeats) and
   the ratios to the embedded server.
2. Autoscaling: Ray with 2 CPUs, replicas of 0.5 CPU (1 ORT thread), min 1 / max 2 replicas,
   target_ongoing_requests 2, test-sized delays (upscale 2 s, downscale 5 s, look-back 3 s). A steady
   concurrency-8 wrk load for --scale-seconds, then idle: the time from the load's start to 2 RUNNING
   replicas, from its end back to 1, and the status counts of every answer during the load (targets:
   up within 15 s, down within 30 s, only 200 or 503). The replica counts come from the server's
   "replicas" log lines (it polls `serve.status()` each second).
3. With --replicas 1,2,4 (off by default: it needs more cores than replicas x --replica-cpus): goodput
   of N fixed replicas of --replica-cpus CPUs each (ORT threads = that), Ray given N x that + 1 CPUs
   (the proxy's), under a closed loop of 8 x N connections; the ratio to 1 replica (target: >= 3x at 4
   replicas on a 16-core machine). On 2 cores it can only show that the replicas share the same cores.

Results: OUT/<stamp>-ray.{json,md} with the command line, git commit and CPU.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import markdown_header, provenance  # noqa: E402
from serve_bench import Proc, ensure_bundle, ensure_run, free_port, log, run_wrk  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"scale_up_s": 15.0, "scale_down_s": 30.0}
SCALE = ["--set", "ray.num_cpus=2", "--set", "ray.replica_cpus=0.5", "--set", "threads=1",
         "--set", "ray.min_replicas=1", "--set", "ray.max_replicas=2", "--set", "ray.target_ongoing_requests=2",
         "--set", "ray.upscale_delay_s=2", "--set", "ray.downscale_delay_s=5", "--set", "ray.look_back_period_s=3",
         "--set", "ray.metrics_interval_s=1"]


def replica_log(path: Path) -> list[tuple[float, dict]]:
    from edgeft.scale.ray_serve import replica_events

    return replica_events(path.read_text(errors="replace"))


def first_time(events: list[tuple[float, dict]], after: float, running: int) -> float | None:
    return next((t for t, c in events if t >= after and c.get("RUNNING", 0) == running and len(c) == 1), None)


def measure(name: str, cmd: list[str], bodies: Path, seconds: float, logdir: Path, tag: str) -> dict:
    srv = Proc(f"{name}-{tag}", cmd + ["--port", str(free_port())], "/v2/health/ready", logdir).wait_ready()
    try:
        run_wrk(srv.url, 8, 2, bodies)  # warm-up
        out = {"engine": name, "cold_start_s": srv.cold_start_s}
        for c in (1, 8):
            r = run_wrk(srv.url, c, seconds, bodies, server=srv)
            out[f"c{c}"] = {k: r[k] for k in ("throughput_rps", "goodput_rps", "p50_ms", "p90_ms", "p99_ms", "status",
                                              "server_cpu_s", "generator_cpu_s")}
            log(f"{name} c={c}: {r['throughput_rps']:.1f} req/s p50 {r['p50_ms']:.2f} ms p99 {r['p99_ms']:.2f} ms")
    finally:
        out["exit_code"] = srv.stop(60)
    return out


def autoscale(cmd: list[str], bodies: Path, seconds: float, logdir: Path) -> dict:
    srv = Proc("ray-autoscale", cmd + SCALE + ["--port", str(free_port())], "/v2/health/ready", logdir).wait_ready()
    try:
        t_load = time.time()
        r = run_wrk(srv.url, 8, seconds, bodies, server=srv)
        t_idle = time.time()
        while time.time() - t_idle < 90:
            if first_time(replica_log(srv.log_path), t_idle, 1) is not None:
                break
            time.sleep(0.5)
    finally:
        code = srv.stop(60)
    events = replica_log(srv.log_path)
    t_up, t_down = first_time(events, t_load, 2), first_time(events, t_idle, 1)
    return {"load": {"concurrency": 8, "seconds": seconds, "status": r["status"], "throughput_rps": r["throughput_rps"],
                     "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"]},
            "scale_up_s": None if t_up is None else round(t_up - t_load, 1),
            "scale_down_s": None if t_down is None else round(t_down - t_idle, 1),
            "replica_timeline": [{"t_s": round(t - t_load, 1), "replicas": c} for t, c in events],
            "settings": " ".join(SCALE[1::2]), "exit_code": code}


def replica_scaling(base: list[str], counts: list[int], cpus: int, bodies: Path, seconds: float, logdir: Path) -> dict:
    """Goodput of N fixed replicas (closed loop, 8 x N connections), each started alone."""
    rows = []
    for n in counts:
        cmd = base + ["--engine", "ray", "--set", "ray.proxy=haproxy", "--set", f"ray.num_cpus={n * cpus + 1}",
                      "--set", f"ray.replica_cpus={cpus}", "--set", f"threads={cpus}",
                      "--set", f"ray.min_replicas={n}", "--set", f"ray.max_replicas={n}"]
        srv = Proc(f"ray-{n}x", cmd + ["--port", str(free_port())], "/v2/health/ready", logdir).wait_ready()
        try:
            run_wrk(srv.url, 8 * n, 2, bodies)
            r = run_wrk(srv.url, 8 * n, seconds, bodies, server=srv)
        finally:
            srv.stop(60)
        rows.append({"replicas": n, "connections": 8 * n, "goodput_rps": r["goodput_rps"], "p50_ms": r["p50_ms"],
                     "p99_ms": r["p99_ms"], "status": r["status"]})
        log(f"{n} replica(s): goodput {r['goodput_rps']:.1f} req/s")
    for row in rows:
        row["vs_1_replica"] = row["goodput_rps"] / rows[0]["goodput_rps"]
    return {"replica_cpus": cpus, "proxy": "haproxy", "rows": rows}


def render_md(r: dict) -> str:
    lines = [f"# Ray Serve engine vs embedded server ({r['created']})", "", *markdown_header(r), "",
             "## Overhead: same bundle, same load (wrk closed loop, `POST /predict`, one test text per request)", "",
             f"Each engine started alone, ABBA order, {r['repeats']} repeat(s) of {r['seconds_per_step']:g} s per step; "
             "medians over the repeats. Embedded: `edgeft serve --threads 2`; Ray: 2 CPUs, 1 replica of 2 CPUs, "
             "2 ORT threads, behind Ray's Python proxy (ray) or its bundled HAProxy (ray-haproxy, `ray.proxy=haproxy`).",
             "",
             "| concurrency | engine | throughput (req/s) | p50 (ms) | p99 (ms) |", "|---|---|---|---|---|"]
    engines = list(r["overhead"]["rounds"])
    for c in ("c1", "c8"):
        for eng in engines:
            s = r["overhead"][eng][c]
            lines.append(f"| {c[1:]} | {eng} | {s['throughput_rps']:.1f} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} |")
        for eng, q in r["overhead"]["ratio_over_embedded"].items():
            lines.append(f"| {c[1:]} | **{eng} / embedded** | **{q[c]['throughput']:.2f}x** | {q[c]['p50']:.2f}x | "
                         f"{q[c]['p99']:.2f}x |")
    a = r["autoscale"]
    lines += ["", "## Autoscaling (replicas of 0.5 CPU on a 2-CPU Ray; test-sized delays)", "",
              f"Settings: `{a['settings']}`; load: wrk concurrency 8 for {a['load']['seconds']:g} s, then idle.", "",
              f"- 1 -> 2 replicas: **{a['scale_up_s']} s** after the load started (target <= {TARGETS['scale_up_s']:g} s)",
              f"- 2 -> 1 replica: **{a['scale_down_s']} s** after the load stopped (target <= {TARGETS['scale_down_s']:g} s)",
              f"- answers during the load: {a['load']['status']} (target: only 200, or 503 when the queue is full)",
              f"- throughput under the load: {a['load']['throughput_rps']:.1f} req/s, p50 {a['load']['p50_ms']:.1f} ms, "
              f"p99 {a['load']['p99_ms']:.1f} ms",
              "- replica timeline (s from the load's start): "
              + ", ".join(f"{e['t_s']}: {e['replicas']}" for e in a["replica_timeline"]), "",
              ]
    if r.get("replicas"):
        rs = r["replicas"]
        lines += ["## Goodput by replica count", "", f"Fixed replicas of {rs['replica_cpus']} CPUs, HAProxy ingress, "
                  "closed loop of 8 x N connections.", "", "| replicas | goodput (req/s) | vs 1 | p50 (ms) | p99 (ms) |",
                  "|---|---|---|---|---|"]
        lines += [f"| {x['replicas']} | {x['goodput_rps']:.1f} | {x['vs_1_replica']:.2f}x | {x['p50_ms']:.1f} | "
                  f"{x['p99_ms']:.1f} |" for x in rs["rows"]]
    else:
        lines.append("Not measured in this run: goodput with 1, 2 and 4 replicas (`--replicas 1,2,4`, for a machine "
                     "with the cores for them).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/ray_bench.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "ray-bench")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--seconds", type=float, default=10.0, help="per closed-loop step")
    ap.add_argument("--repeats", type=int, default=2, help="ABBA rounds of the overhead comparison")
    ap.add_argument("--scale-seconds", type=float, default=25.0, help="length of the autoscaling load")
    ap.add_argument("--texts", type=int, default=1000)
    ap.add_argument("--replicas", default="", help="e.g. 1,2,4: goodput of N fixed replicas (phase 3)")
    ap.add_argument("--replica-cpus", type=int, default=2, help="CPUs (and ORT threads) per replica in phase 3")
    a = ap.parse_args(argv)
    if shutil.which("wrk") is None:
        raise SystemExit("ray-bench: wrk not found (fix: apt-get install wrk; `make ray-bench` does it)")
    try:
        import ray  # noqa: F401
    except ImportError:
        raise SystemExit("ray-bench: Ray Serve is not installed (fix: pip install 'edgeft[ray]')") from None

    from edgeft.artifacts import write_text_atomic
    from edgeft.bundle import open_bundle
    from edgeft.data import load_dataset
    from edgeft.recipe import load_recipe

    a.work.mkdir(parents=True, exist_ok=True)
    run = ensure_run(a.run, a.work)
    bundle_dir = ensure_bundle(run, a.work)
    bundle = open_bundle(bundle_dir)
    texts = list(load_dataset(load_recipe(run / "recipe.yaml").data).test.texts[:a.texts])
    bodies = a.work / "bodies.jsonl"
    bodies.write_text("".join(json.dumps({"inputs": t}) + "\n" for t in texts), encoding="utf-8")
    logdir = a.work / "logs"
    logdir.mkdir(exist_ok=True)
    base = [sys.executable, "-m", "edgeft.cli", "serve", str(bundle_dir)]
    cmds = {"embedded": base + ["--threads", "2"],
            "ray": base + ["--engine", "ray", "--set", "ray.num_cpus=2", "--set", "ray.replica_cpus=2",
                           "--set", "threads=2"]}
    cmds["ray-haproxy"] = cmds["ray"] + ["--set", "ray.proxy=haproxy"]
    result: dict = {**provenance("bench/ray_bench.py", argv, ("onnxruntime", "ray", "uvicorn", "starlette")),
                    "run_dir": str(run), "bundle": str(bundle_dir), "bundle_digest": bundle.digest,
                    "texts": len(texts), "generator": "wrk (one thread), bench/wrk_predict.lua",
                    "seconds_per_step": a.seconds, "repeats": a.repeats, "targets": TARGETS}
    rounds: dict[str, list[dict]] = {name: [] for name in cmds}
    for i in range(a.repeats):
        for name in list(cmds) if i % 2 == 0 else list(cmds)[::-1]:  # ABC CBA ... across repeats
            rounds[name].append(measure(name, cmds[name], bodies, a.seconds, logdir, str(len(rounds[name]))))
    over: dict = {"rounds": rounds}
    for name, rs in rounds.items():
        over[name] = {c: {k: statistics.median(x[c][k] for x in rs) for k in ("throughput_rps", "p50_ms", "p99_ms")}
                      for c in ("c1", "c8")}
        over[name]["cold_start_s"] = statistics.median(x["cold_start_s"] for x in rs)
    over["ratio_over_embedded"] = {name: {
        c: {"throughput": over[name][c]["throughput_rps"] / over["embedded"][c]["throughput_rps"],
            "p50": over[name][c]["p50_ms"] / over["embedded"][c]["p50_ms"],
            "p99": over[name][c]["p99_ms"] / over["embedded"][c]["p99_ms"]} for c in ("c1", "c8")}
        for name in cmds if name != "embedded"}
    result["overhead"] = over
    log("autoscaling: concurrency 8, then idle")
    result["autoscale"] = autoscale(base + ["--engine", "ray"], bodies, a.scale_seconds, logdir)
    if a.replicas:
        result["replicas"] = replica_scaling(base, [int(x) for x in a.replicas.split(",")], a.replica_cpus, bodies,
                                             a.seconds, logdir)
    result["loadavg_end"] = [round(x, 2) for x in __import__("os").getloadavg()]
    stamp = time.strftime("%Y%m%d-%H%M")
    a.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(a.out / f"{stamp}-ray.json", json.dumps(result, indent=2) + "\n")
    write_text_atomic(a.out / f"{stamp}-ray.md", render_md(result))
    print(render_md(result))
    log(f"wrote {a.out / f'{stamp}-ray.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
