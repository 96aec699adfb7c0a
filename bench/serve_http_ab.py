"""HTTP parser and event loop of `edgeft serve`, A/B/C in one run: h11 + asyncio, httptools + asyncio,
httptools + uvloop (the default), the same bundle, wrk closed loop, interleaved rounds.

    python bench/serve_http_ab.py [--run RUN_DIR] [--concurrency 16] [--seconds 5] [--rounds 3]

Results: bench/results/<stamp>-serve-http-ab.{json,md} with the command line, git commit and CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_bench as sb  # noqa: E402

VARIANTS = {"h11+asyncio": ["--set", "http=h11", "--set", "loop=asyncio"],
            "httptools+asyncio": ["--set", "http=httptools", "--set", "loop=asyncio"],
            "httptools+uvloop": ["--set", "http=httptools", "--set", "loop=uvloop"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/serve_http_ab.py")
    ap.add_argument("--run", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=sb.ROOT / "runs" / "serve-bench")
    ap.add_argument("--out", type=Path, default=sb.ROOT / "bench" / "results")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args(argv)
    from edgeft.artifacts import write_text_atomic
    from edgeft.data import load_dataset
    from edgeft.recipe import load_recipe

    a.work.mkdir(parents=True, exist_ok=True)
    run = sb.ensure_run(a.run, a.work)
    bundle = sb.ensure_bundle(run, a.work)
    bodies = a.work / "bodies.jsonl"
    texts = load_dataset(load_recipe(run / "recipe.yaml").data).test.texts[:1000]
    bodies.write_text("".join(json.dumps({"inputs": t}) + "\n" for t in texts), encoding="utf-8")
    logdir = a.work / "logs"
    logdir.mkdir(exist_ok=True)
    servers = {name: sb.Proc(name, [sys.executable, "-m", "edgeft.cli", "serve", str(bundle), "--port",
                                    str(sb.free_port()), *flags], "/v2/health/ready", logdir)
               for name, flags in VARIANTS.items()}
    steps = []
    try:
        for s in servers.values():
            s.wait_ready()
            sb.run_wrk(s.url, a.concurrency, 2, bodies)  # warm-up
        for rnd in range(a.rounds):
            order = list(servers) if rnd % 2 == 0 else list(reversed(servers))
            for name in order:
                r = sb.run_wrk(servers[name].url, a.concurrency, a.seconds, bodies, server=servers[name])
                if r["status"].get("200", 0) < 0.99 * r["requests"]:
                    raise SystemExit(f"serve-http-ab: {name} answered {r['status']}")
                r.update(server=name, round=rnd)
                steps.append(r)
                sb.log(f"round {rnd} {name:<18} {r['throughput_rps']:7.1f} req/s  p50 {r['p50_ms']:.2f} ms")
    finally:
        for s in servers.values():
            s.stop()
    table = {n: {"throughput_rps": sb.median([x["throughput_rps"] for x in steps if x["server"] == n]),
                 "p50_ms": sb.median([x["p50_ms"] for x in steps if x["server"] == n]),
                 "server_cpu_ms_per_request": sb.median([1000 * x["server_cpu_s"] / x["requests"]
                                                         for x in steps if x["server"] == n])} for n in servers}
    # Per round ratios against h11+asyncio (paired within a round), then their median.
    ratios = {n: sb.median([next(x for x in steps if x["server"] == n and x["round"] == r)["throughput_rps"]
                            / next(x for x in steps if x["server"] == "h11+asyncio" and x["round"] == r)["throughput_rps"]
                            for r in range(a.rounds)]) for n in servers}
    res = {**sb.provenance("bench/serve_http_ab.py", argv, ("onnxruntime", "uvicorn", "httptools", "uvloop")),
           "bundle": str(bundle), "concurrency": a.concurrency, "seconds": a.seconds,
           "rounds": a.rounds, "table": table, "throughput_vs_h11_asyncio": ratios, "steps": steps}
    base = a.out / f"{time.strftime('%Y%m%d-%H%M')}-serve-http-ab"
    write_text_atomic(base.with_suffix(".json"), json.dumps(res, indent=2) + "\n")
    cpu = res["cpu"]
    md = [f"# edgeft serve: HTTP parser and event loop ({time.strftime('%Y-%m-%d %H:%M')} UTC)", "",
          f"- command: `{res['command']}`", f"- git commit: `{res['git_commit']}`",
          f"- CPU: {cpu['model']}, {cpu['usable_cores']} usable cores, int8 flags: {', '.join(cpu['flags']) or 'none'}",
          f"- wrk closed loop, {a.concurrency} connections, {a.rounds} interleaved rounds of {a.seconds:.0f} s", "",
          "| server | req/s | p50 ms | server CPU ms/request | vs h11+asyncio (paired per round) |",
          "|---|---|---|---|---|"]
    for n, row in table.items():
        md.append(f"| {n} | {row['throughput_rps']:.0f} | {row['p50_ms']:.2f} | {row['server_cpu_ms_per_request']:.2f} "
                  f"| {ratios[n]:.2f}x |")
    write_text_atomic(base.with_suffix(".md"), "\n".join(md) + "\n")
    print(base.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
