"""bench.json (versioned, raw samples kept), bench.md (table with ratios vs the reference) and bench.png
(latency vs accuracy, one point per model and runtime), all written atomically.

bench.json, schema ``edgeft.bench/1``:

- ``schema``, ``title``, ``created`` (UTC ISO), ``wall_s``
- ``environment``: python/platform, ``cpu`` (model, cores, int8/bf16 flags, has_vnni, has_amx_int8),
  ``versions`` (torch, onnxruntime, transformers, ...), ``threads`` (intra_op, inter_op=1, torch's own),
  ``gpu`` (or null), ``ort_providers``, ``machine_start`` / ``machine_end`` (load average, CPU %)
- ``config``: the BenchConfig used; ``method``: how it was timed, per (batch, seq) plans and seconds
- ``runtimes``: every known runtime -> present, reason when absent, selected
- ``reference``: {model, runtime, precision} the ratios are taken against (null when none ran)
- ``eval``: dataset, split, n, sha256 of the texts+labels, label_names (null without a dataset)
- ``models``: name, format (hf|onnx), path, precision, size_mb, sha256 of each file
- ``results``: one per (model, runtime, precision, batch, seq); ``key`` = "model/runtime/precision/bB/sS";
  ``status`` ok|skipped (+ ``reason``); when ok: ``latency_ms`` and ``e2e_latency_ms`` (n, mean, stdev,
  min, max, p25, p50, p75, p90, p99, iqr, mad, cv, cv_robust, outliers, is_unstable, is_p99_reliable),
  raw ``samples_ms`` / ``e2e_samples_ms``, ``throughput_samples_per_s`` (engine, e2e), ``size_mb``,
  ``load_ms``, ``memory`` (peak_rss_mb, rss_delta_mb, is_exact_peak, gpu_mb, at_shape), ``providers`` (ORT),
  ``timing`` (warm-up calls/seconds/settled, block, discarded), ``accuracy``, ``macro_f1``, ``agreement`` and
  ``max_abs_logit_diff`` vs the reference, ``speedup_vs_reference``, ``e2e_speedup_vs_reference``,
  ``size_ratio_vs_reference``, ``accuracy_delta_vs_reference``, ``is_reference``
- ``warnings``: unstable variants, unsettled warm-ups, p99 from < 1000 samples, busy machine
"""

from __future__ import annotations

import io
from pathlib import Path

from edgeft.artifacts import write_bytes_atomic, write_json_atomic, write_text_atomic


def write_outputs(report: dict, out_dir: Path, stem: str = "bench") -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / f"{stem}.json", report)
    write_text_atomic(out_dir / f"{stem}.md", render_markdown(report))
    write_bytes_atomic(out_dir / f"{stem}.png", render_png(report))


def _f(x, fmt: str = ".2f", empty: str = "-") -> str:
    return empty if x is None else format(x, fmt)


def _ratio(x) -> str:
    return "-" if x is None else f"{x:.2f}x"


def render_markdown(report: dict) -> str:
    env = report["environment"]
    cpu = env.get("cpu", {})
    ref = report.get("reference")
    ev = report.get("eval")
    lines = [f"# {report.get('title') or 'edgeft bench'}", ""]
    lines.append(f"{report['created']} · schema `{report['schema']}` · {cpu.get('model', '?')} "
                 f"({cpu.get('usable_cores')} usable cores; flags {', '.join(cpu.get('flags', [])) or 'none'}) · "
                 f"{env['threads']['intra_op']} intra-op threads, 1 inter-op · GPU: "
                 f"{(env.get('gpu') or {}).get('name', 'none')}")
    v = env.get("versions", {})
    lines.append(f"torch {v.get('torch', '-')} · onnxruntime {v.get('onnxruntime') or v.get('onnxruntime-gpu', '-')} · "
                 f"transformers {v.get('transformers', '-')} · python {env.get('python')}")
    if ref:
        lines.append(f"Reference (ratios): **{ref['model']}** on {ref['runtime']} {ref['precision']}. "
                     "Speed-up = reference p50 / p50 (higher is faster).")
    if ev:
        lines.append(f"Accuracy on {ev['dataset']}:{ev['split']} ({ev['n']} samples); agreement = same prediction "
                     "as the reference.")
    lines += ["", "| model | runtime | prec | b | s | p50 ms | p90 | p99 | mean | CV | n | speed-up | "
                  "e2e p50 ms | e2e speed-up | samples/s | MB | size | load ms | RSS MB | accuracy | agreement |",
              "|" + "---|" * 21]
    for r in report["results"]:
        if r["status"] != "ok":
            continue
        s, e = r["latency_ms"], r["e2e_latency_ms"]
        unstable = " ⚠" if s.get("is_unstable") else ""
        mem = r.get("memory") or {}
        acc = r.get("accuracy")
        lines.append(
            f"| {r['model']}{' (ref)' if r.get('is_reference') else ''} | {r['runtime']} | {r['precision']} | "
            f"{r['batch']} | {r['seq']} | {s['p50']:.2f} | {s['p90']:.2f} | {s['p99']:.2f} | {s['mean']:.2f} | "
            f"{s['cv']:.1%}{unstable} | {s['n']} | {_ratio(r.get('speedup_vs_reference'))} | {e['p50']:.2f} | "
            f"{_ratio(r.get('e2e_speedup_vs_reference'))} | {r['throughput_samples_per_s']:.1f} | "
            f"{r['size_mb']:.1f} | {_ratio(1 / r['size_ratio_vs_reference']) if r.get('size_ratio_vs_reference') else '-'} | "
            f"{r['load_ms']:.0f} | {_f(mem.get('rss_delta_mb'), '.0f')} | {_f(acc, '.4f')} | "
            f"{_f(r.get('agreement'), '.2%')} |")
    skipped = {}
    for r in report["results"]:
        if r["status"] != "ok":
            skipped.setdefault(f"{r['model']} on {r['runtime']} {r['precision']}", r.get("reason"))
    if skipped:
        lines += ["", "Skipped:"]
        lines += [f"- {k}: {why}" for k, why in skipped.items()]
    suite = report.get("suite") or {}
    if suite.get("checks"):
        lines += ["", "Targets:"]
        for c in suite["checks"]:
            ci = f" (95% CI {c['ci'][0]:.2f}..{c['ci'][1]:.2f})" if c.get("ci") else ""
            lines.append(f"- [{'met' if c['met'] else 'MISSED'}] {c['check']}: {_f(c['value'])}{ci}")
    if report.get("warnings"):
        lines += ["", "Warnings:"]
        lines += [f"- {w}" for w in report["warnings"]]
    lines += ["", "CV = stdev / mean (⚠: robust CV > 10%, unstable). size = reference size / size. "
                  "RSS MB = peak resident memory added by loading the variant and one call at the largest shape.",
              f"Method: {report['method']['description']}.", ""]
    return "\n".join(lines)


def render_png(report: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in report["results"] if r["status"] == "ok"]
    combos = list(dict.fromkeys((r["batch"], r["seq"]) for r in ok))[:4] or [(0, 0)]
    fig, axes = plt.subplots(1, len(combos), figsize=(6.4 * len(combos), 4.8), squeeze=False)
    markers = {"torch-cpu": "o", "ort-cpu": "s", "torch-cuda": "^", "ort-cuda": "D", "ort-trt": "P"}
    for ax, (b, s) in zip(axes[0], combos):
        pts = [r for r in ok if (r["batch"], r["seq"]) == (b, s)]
        have_acc = any(r.get("accuracy") is not None for r in pts)
        for i, r in enumerate(pts):
            y = r.get("accuracy") if have_acc else 0.0
            if y is None:
                continue
            x = r["latency_ms"]["p50"]
            ax.errorbar([x], [y], xerr=[[x - r["latency_ms"]["p25"]], [r["latency_ms"]["p90"] - x]],
                        fmt=markers.get(r["runtime"], "o"), ms=8, capsize=3,
                        label=f"{r['model']} · {r['runtime']} {r['precision']}")
            speed = f" ({r['speedup_vs_reference']:.2f}x)" if r.get("speedup_vs_reference") else ""
            ax.annotate(f"{r['model']}{speed}", (x, y), textcoords="offset points",
                        xytext=(6, 7 if i % 2 == 0 else -13), fontsize=7)  # above / below: neighbours overlap
        ax.set_xlabel(f"engine latency p50 (ms), bars p25-p90 · batch {b}, seq {s}")
        ax.set_ylabel("accuracy" if have_acc else "(no accuracy: no dataset)")
        ax.grid(alpha=0.3)
        ax.set_xlim(left=0)
        ax.margins(y=0.2)
        if pts:
            ax.legend(fontsize=7, loc="lower right")
    title = report.get("title") or "edgeft bench"
    cpu = report["environment"].get("cpu", {}).get("model", "")
    fig.suptitle(f"{title}\nlatency vs accuracy · {cpu} · intra-op threads: {report['environment']['threads']['intra_op']}",
                 fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
