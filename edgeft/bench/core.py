"""The bench engine: load every (model, runtime, precision) variant, measure accuracy, then time all
variants interleaved in one process for each (batch, seq), and write bench.json / .md / .png."""

from __future__ import annotations

import datetime as _dt
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeft.bench import stats
from edgeft.bench.models import ModelSpec, discover
from edgeft.bench.runtimes import (MODEL_FORMAT, RUNTIMES, Engine, PeakMemory, RuntimeUnavailable,
                                   detect_runtimes, gpu_info, load_engine, select_runtimes, set_torch_threads)
from edgeft.bench.timing import TimingPlan, measure_interleaved
from edgeft.errors import EdgeftError, ModelError
from edgeft.hardware import usable_cores
from edgeft.progress import say
from edgeft.recipe import BenchConfig

SCHEMA = "edgeft.bench/1"
EVAL_BATCH = 64
DEFAULT_MAX_LENGTH = 128
E2E_BUDGET_FRACTION = 0.25
E2E_TARGET_SAMPLES = 300
FALLBACK_TEXTS = ["a quiet, well acted film that never quite finds its story",
                  "the plot is dull and the actors look bored", "great fun from start to finish",
                  "one of the worst movies of the year", "not bad, not great: a fine way to spend an evening"]


@dataclass
class Variant:
    spec: ModelSpec
    runtime: str
    precision: str
    engine: Engine | None = None
    tokenizer: object = None
    status: str = "ok"
    reason: str | None = None
    load_ms: float | None = None
    memory: dict = field(default_factory=dict)
    quality: dict = field(default_factory=dict)
    preds: np.ndarray | None = None
    logits: np.ndarray | None = None
    max_positions: int | None = None

    @property
    def label(self) -> str:
        return f"{self.spec.name}/{self.runtime}/{self.precision}"

    def key(self, batch: int, seq: int) -> str:
        return f"{self.label}/b{batch}/s{seq}"


def bench_paths(paths: list[Path], cfg: BenchConfig, dataset, out_dir: Path, *, show_progress: bool = True) -> dict:
    """Bench every model the paths stand for (see ``edgeft.bench.models``) on every runtime selected;
    write ``out_dir/bench.{json,md,png}`` and return the report."""
    return bench_models(discover([Path(p) for p in paths]), cfg, dataset, out_dir, show_progress=show_progress)


def _variants(specs: list[ModelSpec], cfg: BenchConfig, detected: dict, selected: list[str]) -> list[Variant]:
    out = []
    for spec in specs:
        for rt in RUNTIMES:
            if MODEL_FORMAT[rt] != spec.format:
                continue
            for prec in [spec.precision] + (["fp16"] if rt == "torch-cuda" else []):
                v = Variant(spec, rt, prec)
                if rt not in selected:
                    if cfg.runtimes != "auto":
                        continue  # runtimes named explicitly: the others are not part of this bench
                    v.status, v.reason = "skipped", detected[rt]["reason"]
                out.append(v)
    return out


def _load_tokenizer(folder: Path, cache: dict):
    if folder not in cache:
        from transformers import AutoTokenizer

        from edgeft.modeling import quiet_transformers

        quiet_transformers()
        try:
            cache[folder] = AutoTokenizer.from_pretrained(str(folder))
        except (OSError, ValueError, TypeError) as e:
            raise ModelError(f"cannot load the tokenizer in {folder}: {str(e).splitlines()[0][:200]}",
                             "save the tokenizer files beside the model") from None
    return cache[folder]


def _max_positions(spec: ModelSpec) -> int | None:
    for folder in (spec.path if spec.format == "hf" else spec.path.parent, spec.tokenizer_dir):
        cfg = folder / "config.json"
        if cfg.is_file():
            try:
                return int(json.loads(cfg.read_text()).get("max_position_embeddings") or 0) or None
            except (ValueError, json.JSONDecodeError, UnicodeDecodeError):
                return None
    return None


def synthetic_batch(tokenizer, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Exactly ``seq`` tokens per row: [CLS] random non-special tokens [SEP]; the same draw for every model."""
    rng = np.random.default_rng(seed + 7919 * batch + seq)
    raw = rng.integers(0, 1 << 30, size=(batch, seq))
    special = set(tokenizer.all_special_ids)
    normal = np.array([i for i in range(len(tokenizer)) if i not in special])
    ids = normal[raw % normal.size].astype(np.int64)
    if tokenizer.cls_token_id is not None:
        ids[:, 0] = tokenizer.cls_token_id
    if tokenizer.sep_token_id is not None:
        ids[:, -1] = tokenizer.sep_token_id
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


def _predict(v: Variant, texts: list[str], max_length: int) -> np.ndarray:
    from edgeft.evaluate import predict_batched

    return predict_batched(v.engine.logits, v.tokenizer, texts, max_length=max_length, batch_size=EVAL_BATCH)


def _quality(variants: list[Variant], ref: Variant | None, dataset, cfg: BenchConfig, show: bool) -> dict | None:
    from edgeft.data import stratified_subsample
    from edgeft.evaluate import agreement_and_diff, split_metrics

    if dataset is None:
        for v in variants:
            v.quality = {"accuracy": None, "accuracy_note": "no dataset given"}
        return None
    split = stratified_subsample(dataset.split(cfg.eval_split), cfg.max_eval_samples, seed=0)
    labels = np.asarray(split.labels)
    ordered = ([ref] if ref is not None else []) + [v for v in variants if v is not ref]
    for v in ordered:
        if v.status != "ok":
            continue
        names = v.spec.label_names
        if names is not None and list(names) != list(dataset.label_names):
            v.quality = {"accuracy": None, "accuracy_note": f"model labels {names} differ from the dataset's "
                                                            f"{dataset.label_names}"}
            continue
        max_len = v.spec.max_length or (ref.spec.max_length if ref else None) or DEFAULT_MAX_LENGTH
        t0 = time.perf_counter()
        logits = _predict(v, split.texts, max_len)
        if logits.shape[-1] != dataset.num_labels:
            v.quality = {"accuracy": None, "accuracy_note": f"model has {logits.shape[-1]} outputs, the dataset "
                                                            f"{dataset.num_labels} labels"}
            continue
        v.logits, v.preds = logits, logits.argmax(-1)
        m = split_metrics(labels, logits, dataset.label_names)
        v.quality = {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "eval_max_length": max_len,
                     "eval_s": round(time.perf_counter() - t0, 2)}
        if ref is not None and ref.preds is not None:
            v.quality["agreement"], v.quality["max_abs_logit_diff"] = agreement_and_diff(logits, ref.logits)
        say(f"  accuracy {v.label}: {m['accuracy']:.4f} ({len(split)} {cfg.eval_split} samples, "
            f"{v.quality['eval_s']:.1f}s)", enabled=show)
    return {"dataset": dataset.name, "split": cfg.eval_split, "n": len(split), "sha256": split.sha256(),
            "label_names": dataset.label_names}


def _plan(cfg: BenchConfig, n_variants: int, e2e: bool = False) -> TimingPlan:
    per = cfg.max_seconds_per_variant
    budget = per * n_variants * (E2E_BUDGET_FRACTION if e2e else 1.0)
    return TimingPlan(min_samples=min(cfg.min_samples, 100) if e2e else cfg.min_samples,
                      target_samples=max(E2E_TARGET_SAMPLES if e2e else 1000, 1 if e2e else cfg.min_samples),
                      budget_s=budget, warmup_min_s=min(0.5, 0.1 * per), warmup_max_s=min(8.0, 0.4 * per),
                      warmup_min_iters=20)


def _round(xs, nd: int = 4) -> list[float]:
    return [round(float(x), nd) for x in xs]


def _e2e_fn(v: Variant, texts: list[str], batch: int, seq: int):
    state = {"i": 0}
    tok, eng = v.tokenizer, v.engine

    def fn():
        i = state["i"]
        state["i"] = i + batch
        chunk = [texts[(i + k) % len(texts)] for k in range(batch)]
        enc = tok(chunk, padding="max_length", truncation=True, max_length=seq, return_tensors="np")
        out = eng.run(eng.prepare(dict(enc)))
        return out.argmax(-1)

    return fn


def _machine_state() -> dict:
    import psutil

    return {"loadavg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
            "cpu_percent": psutil.cpu_percent(interval=0.2)}


def bench_models(specs: list[ModelSpec], cfg: BenchConfig, dataset, out_dir: Path, *, show_progress: bool = True,
                 stem: str = "bench", reference: str | None = None, title: str | None = None) -> dict:
    """Bench ``specs`` (already discovered); the reference is ``reference`` (a model name) or the first
    Hugging Face model. Writes ``out_dir/<stem>.{json,md,png}``."""
    from edgeft.artifacts import environment_fingerprint
    from edgeft.bench.report import write_outputs

    show = show_progress
    if not specs:
        raise EdgeftError("nothing to bench", "pass at least one model")
    threads = cfg.threads or usable_cores()
    detected = detect_runtimes()
    selected = select_runtimes(cfg.runtimes, detected)
    thread_info = set_torch_threads(threads)
    explicit = cfg.runtimes != "auto"
    machine_start = _machine_state()
    t_begin = time.perf_counter()

    variants = _variants(specs, cfg, detected, selected)
    if not any(v.status == "ok" for v in variants):
        raise EdgeftError(f"none of the models ({', '.join(s.name for s in specs)}) runs on the runtimes "
                          f"selected ({', '.join(selected) or 'none'})",
                          "add a runtime with --runtimes, or bench a model of the matching format")
    ref_name = reference or next((s.name for s in specs if s.format == "hf"), specs[0].name)
    if ref_name not in {s.name for s in specs}:
        raise EdgeftError(f"reference model '{ref_name}' is not among the models benched")
    ref = next((v for v in variants if v.spec.name == ref_name and v.status == "ok"
                and v.precision in ("fp32", v.spec.precision)), None)

    # Load everything first: a model that fails to load is bad input, before any time is spent timing.
    tok_cache: dict = {}
    largest = (max(cfg.batch_sizes), max(cfg.seq_lengths))
    for v in variants:
        if v.status != "ok":
            continue
        v.tokenizer = _load_tokenizer(v.spec.tokenizer_dir, tok_cache)
        v.max_positions = _max_positions(v.spec)
        say(f"[bold]load[/] {v.label}", enabled=show)
        try:
            with PeakMemory(cuda=v.runtime != "torch-cpu" and v.runtime != "ort-cpu") as mem:
                v.engine, v.load_ms = load_engine(v.spec.format, v.spec.path, v.runtime, v.precision, threads)
                seq = min(largest[1], v.max_positions or largest[1])
                v.engine.logits(synthetic_batch(v.tokenizer, largest[0], seq))  # arenas grow to the largest shape
        except RuntimeUnavailable as e:
            if explicit:
                raise
            v.status, v.reason = "skipped", e.problem
            continue
        v.memory = mem.to_dict()
        v.memory["at_shape"] = [largest[0], seq]

    ok = [v for v in variants if v.status == "ok"]
    if ref is not None and ref.status != "ok":
        ref = None
    say(f"[bold]accuracy[/] of {len(ok)} variants", enabled=show and dataset is not None)
    eval_info = _quality(ok, ref, dataset, cfg, show)
    texts = (dataset.split(cfg.eval_split).texts if dataset is not None else None) or FALLBACK_TEXTS

    results: list[dict] = []
    warnings: list[str] = []
    timing_meta: dict = {}
    for batch in cfg.batch_sizes:
        for seq in cfg.seq_lengths:
            runnable = []
            for v in variants:
                if v.status == "ok" and v.max_positions and seq > v.max_positions:
                    results.append(_skipped(v, batch, seq, f"seq {seq} exceeds the model's {v.max_positions} positions"))
                elif v.status == "ok":
                    runnable.append(v)
                else:
                    results.append(_skipped(v, batch, seq, v.reason or "skipped"))
            if not runnable:
                continue
            plan = _plan(cfg, len(runnable))
            prepared = {v.label: v.engine.prepare(synthetic_batch(v.tokenizer, batch, seq)) for v in runnable}
            fns = {v.label: (lambda e=v.engine, p=prepared[v.label]: e.run(p)) for v in runnable}
            say(f"[bold]timing[/] b{batch} s{seq}: {len(runnable)} variants interleaved, {threads} threads, "
                f"budget {plan.budget_s:.0f}s", enabled=show)
            t0 = time.perf_counter()
            engine_t = measure_interleaved(fns, plan)
            engine_s = time.perf_counter() - t0
            e2e_plan = _plan(cfg, len(runnable), e2e=True)
            e2e_fns = {v.label: _e2e_fn(v, texts, batch, seq) for v in runnable}
            t0 = time.perf_counter()
            e2e_t = measure_interleaved(e2e_fns, e2e_plan)
            timing_meta[f"b{batch}/s{seq}"] = {"engine_s": round(engine_s, 1), "e2e_s": round(time.perf_counter() - t0, 1),
                                               "plan": plan.describe(), "e2e_plan": e2e_plan.describe()}
            for v in runnable:
                results.append(_result(v, batch, seq, engine_t[v.label], e2e_t[v.label], ref))
            for r in results[-len(runnable):]:
                s = r["latency_ms"]
                say(f"  {r['key']}: p50 {s['p50']:.2f} ms  p99 {s['p99']:.2f}  CV {s['cv']:.1%}  n {s['n']}",
                    enabled=show)

    _add_ratios(results, ref)
    for r in results:
        if r["status"] != "ok":
            continue
        s = r["latency_ms"]
        if s["is_unstable"]:
            warnings.append(f"{r['key']}: unstable (robust CV {s['cv_robust']:.1%} > {stats.UNSTABLE_CV:.0%})")
        if not r["timing"]["warmup_settled"]:
            warnings.append(f"{r['key']}: warm-up did not settle within {plan.warmup_max_s:.1f}s")
        if not s["is_p99_reliable"]:
            warnings.append(f"{r['key']}: n={s['n']} < 1000, p99 is a rough estimate")
    machine_end = _machine_state()
    if machine_start["loadavg"] and machine_start["loadavg"][0] > 0.5 * usable_cores():
        warnings.append(f"machine busy at start: load average {machine_start['loadavg'][0]} on "
                        f"{usable_cores()} usable cores")

    env = environment_fingerprint()
    env["threads"] = {"intra_op": threads, "inter_op": 1, **thread_info}
    env["gpu"] = gpu_info()
    import onnxruntime as ort

    env["ort_providers"] = list(ort.get_available_providers())
    env["machine_start"], env["machine_end"] = machine_start, machine_end

    report = {
        "schema": SCHEMA,
        "title": title,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "environment": env,
        "config": cfg.model_dump(mode="json"),
        "method": {
            "description": "variants interleaved round by round in one process after per-variant warm-up, "
                           "idling 50 ms before each block so other runtimes' spinning threads are asleep "
                           "(see edgeft/bench/timing.py); engine-only = synthetic batch of exactly seq tokens, "
                           "inputs converted outside the timed call; e2e = real texts tokenized (padding and "
                           "truncation to seq) + inference + argmax inside the timed call; ORT CUDA timings "
                           "include host<->device copies; memory = peak RSS during load + one call at the "
                           "largest shape, minus RSS before the load",
            "timing": timing_meta,
            "stability_rule": f"unstable when robust CV (1.4826*MAD/median) > {stats.UNSTABLE_CV:.0%}",
        },
        "runtimes": {rt: {**detected[rt], "selected": rt in selected} for rt in RUNTIMES},
        "reference": ({"model": ref.spec.name, "runtime": ref.runtime, "precision": ref.precision}
                      if ref is not None else None),
        "eval": eval_info,
        "models": [_model_entry(s) for s in specs],
        "results": results,
        "warnings": warnings,
        "wall_s": round(time.perf_counter() - t_begin, 1),
    }
    write_outputs(report, Path(out_dir), stem)
    say(f"[bold]bench[/] done in {report['wall_s']:.0f}s: {Path(out_dir) / (stem + '.json')}", enabled=show)
    return report


def _model_entry(spec: ModelSpec) -> dict:
    from edgeft.artifacts import sha256_file

    return {"name": spec.name, "format": spec.format, "path": str(spec.path), "precision": spec.precision,
            "size_mb": round(spec.size_mb, 3), "files": {f.name: sha256_file(f) for f in spec.files if f.is_file()}}


def _base(v: Variant, batch: int, seq: int) -> dict:
    return {"key": v.key(batch, seq), "model": v.spec.name, "runtime": v.runtime, "precision": v.precision,
            "batch": batch, "seq": seq, "format": v.spec.format, "path": str(v.spec.path)}


def _skipped(v: Variant, batch: int, seq: int, reason: str) -> dict:
    return {**_base(v, batch, seq), "status": "skipped", "reason": reason}


def _result(v: Variant, batch: int, seq: int, t, e2e, ref: Variant | None) -> dict:
    lat = stats.summarize(t.samples_ms)
    e2e_s = stats.summarize(e2e.samples_ms)
    return {
        **_base(v, batch, seq),
        "status": "ok",
        "reason": None,
        "is_reference": ref is v,
        "providers": v.engine.providers,
        "size_mb": round(v.spec.size_mb, 3),
        "load_ms": round(v.load_ms or 0.0, 1),
        "memory": v.memory,
        "latency_ms": lat,
        "throughput_samples_per_s": batch * 1000.0 / lat["mean"],
        "e2e_latency_ms": e2e_s,
        "e2e_throughput_samples_per_s": batch * 1000.0 / e2e_s["mean"],
        "timing": {"warmup_iters": t.warmup_iters, "warmup_s": round(t.warmup_s, 2),
                   "warmup_settled": t.warmup_settled, "block": t.block, "discarded": t.discarded,
                   "e2e_warmup_settled": e2e.warmup_settled},
        **v.quality,
        "samples_ms": _round(t.samples_ms),
        "e2e_samples_ms": _round(e2e.samples_ms),
    }


def _add_ratios(results: list[dict], ref: Variant | None) -> None:
    if ref is None:
        return
    by_key = {r["key"]: r for r in results}
    for r in results:
        if r["status"] != "ok":
            continue
        rr = by_key.get(ref.key(r["batch"], r["seq"]))
        if rr is None or rr["status"] != "ok":
            continue
        r["speedup_vs_reference"] = rr["latency_ms"]["p50"] / r["latency_ms"]["p50"]
        r["e2e_speedup_vs_reference"] = rr["e2e_latency_ms"]["p50"] / r["e2e_latency_ms"]["p50"]
        r["size_ratio_vs_reference"] = r["size_mb"] / rr["size_mb"] if rr["size_mb"] else None
        if r.get("accuracy") is not None and rr.get("accuracy") is not None:
            r["accuracy_delta_vs_reference"] = r["accuracy"] - rr["accuracy"]
