"""Ship stage: a run folder's compressed model -> a self-verifying bundle folder + a deterministic .tar.gz.

A text-generation run folder (a decoder LM) is shipped by edgeft.decoder.ship instead (same layout
rules and safety, its own model files, golden generations and model card).

``ship(cfg)`` picks the variant (by default the fastest that met the accuracy goal), then builds the
bundle in a temporary sibling folder through a list of *parts* (model, golden examples, latency
reference, serving files, model card; callers may append their own, e.g. Triton or Kubernetes files),
then writes ``manifest.json`` (every file with its sha256 and size) and ``SHA256SUMS``, tars the
folder and renames both into place. Bad input fails before anything is written. The layout is
edgeft.bundle's.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import shutil
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgeft import __version__
from edgeft.bundle import (BUNDLE_SCHEMA, GOLDEN, LABELS, MANIFEST, MODEL_CARD, MODEL_DIR, MODEL_ONNX, SERVING_DIR,
                           SUMS, sums_text)
from edgeft.errors import EdgeftError, GoalMissed, RunDirError

# Variant name -> aliases accepted by --variant. The names are compress/report.json's artifact keys
# (and edgeft bench's model names). "pruned" is a torch folder: its ONNX export is onnx_fp32.
VARIANTS: dict[str, tuple[str, ...]] = {"onnx_fp32": ("fp32", "onnx"), "onnx_optimized": ("optimized",),
                                        "onnx_int8": ("int8",)}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                   "merges.txt", "spiece.model", "sentencepiece.bpe.model", "added_tokens.json")
GOLDEN_ATOL = {"fp32": 1e-3, "int8": 0.1}  # logits; int8 kernels differ between CPUs (AVX2 vs VNNI vs AMX)
LATENCY_THRESHOLD = 0.25  # verify: a normalised slowdown beyond this (and beyond the CI) is a regression
BUDGET_FACTOR = 3.0  # alert budget = this x the benchmarked p99 at batch 1
TAR_MTIME = 946684800  # 2000-01-01: fixed, so the same bundle always tars to the same bytes
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"  # safe in URLs (/v2/models/NAME/versions/VERSION) and paths


class ShipConfig(BaseModel):
    """Every ``edgeft ship`` flag is a field here; the resolved config is saved in the manifest."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run_dir: Path = Field(description="run folder with compress/report.json")
    variant: str | None = Field(None, description="variant to ship (default: the fastest that met the goal)")
    out: Path | None = Field(None, description="bundle folder (default RUN_DIR/bundle); the .tar.gz goes beside it")
    name: str | None = Field(None, pattern=NAME_PATTERN, description="model name (default: the recipe's name)")
    version: str = Field("1", pattern=NAME_PATTERN, description="model version")
    allow_miss: bool = Field(False, description="ship a variant that missed the accuracy goal")
    force: bool = Field(False, description="replace an existing bundle (only an edgeft bundle)")
    golden: int = Field(256, ge=8, le=10_000, description="golden test texts for the smoke test")
    latency_seconds: float = Field(6.0, gt=0, le=300, description="time spent measuring model vs reference")
    triton: bool = Field(False, description="add a Triton model repository (triton/)")
    kubernetes: bool = Field(False, description="add Kubernetes manifests and a KServe InferenceService (kubernetes/)")
    image: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/:@-]{0,254}$",
                              description="container image the Kubernetes manifests run (default edgeft-NAME:VERSION)")


@dataclass
class Variant:
    name: str
    onnx: Path  # in the run folder
    step: dict[str, Any]
    precision: str  # fp32 | int8

    @property
    def meets_goal(self) -> bool:
        return bool(self.step.get("meets_goal"))


@dataclass
class ShipContext:
    """What every part sees. Parts write files under ``stage`` and fill in ``manifest`` sections."""

    cfg: ShipConfig
    run_dir: Path
    stage: Path
    name: str
    version: str
    variant: Variant
    report: dict[str, Any]
    bench: dict[str, Any] | None
    recipe: Any
    manifest: dict[str, Any] = field(default_factory=dict)
    runner: Any = None  # the serving path's ModelRunner on the staged model (set by the model part)
    golden_texts: list[str] = field(default_factory=list)


Part = Callable[[ShipContext], None]


@dataclass
class ShipResult:
    bundle: Path
    tarball: Path
    manifest: dict[str, Any]

    def render(self) -> str:
        m = self.manifest
        acc = m["accuracy"]
        lines = [f"shipped {m['name']} {m['version']}: variant {m['variant']['name']} ({m['variant']['precision']})"
                 + ("  [MISSED the accuracy goal: shipped with --allow-miss]" if not m["variant"]["meets_goal"] else ""),
                 f"  accuracy: validation {acc['validation']['accuracy']:.4f} (drop {acc['validation']['drop_points']:.2f} pt),"
                 f" test {acc['test']['accuracy']:.4f} (drop {acc['test']['drop_points']:.2f} pt) vs fine-tuned fp32",
                 f"  golden: {m['golden']['count']} test texts; latency budget {m['serving']['latency_budget_ms']:g} ms "
                 f"({m['alerts']['budget_source']})",
                 f"  bundle:  {self.bundle}", f"  archive: {self.tarball}",
                 "next:", f"  edgeft verify {self.bundle}",
                 f"  edgeft serve {self.bundle} --port 8000      # then: curl localhost:8000/v2/models/{m['name']}",
                 f"  (on another machine: tar xzf {self.tarball.name} && edgeft verify {m['name']}-{m['version']})"]
        return "\n".join(lines)


# ---------------------------------------------------------------- reading the run folder


def _read_json(path: Path, what: str, fix: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EdgeftError(f"{path} not found: {what} is missing", fix) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EdgeftError(f"{path} is not valid JSON ({type(e).__name__})", fix) from None
    if not isinstance(data, dict):
        raise EdgeftError(f"{path} is not {what}", fix)
    return data


def _precision(path: Path, name: str) -> str:
    import onnx

    if name == "onnx_int8":
        return "int8"
    model = onnx.load(str(path), load_external_data=False)
    quant_ops = {"MatMulInteger", "QAttention", "DynamicQuantizeLinear", "QLinearMatMul", "QuantizeLinear"}
    return "int8" if any(n.op_type in quant_ops for n in model.graph.node) else "fp32"


def find_variants(run_dir: Path, report: dict[str, Any]) -> dict[str, Variant]:
    """The run's shippable ONNX variants (in pipeline order) with their compress step."""
    artifacts = report.get("artifacts")
    if not isinstance(artifacts, dict):
        raise EdgeftError(f"{run_dir}/compress/report.json has no 'artifacts'", "re-run 'edgeft compress'")
    steps = [s for s in report.get("steps", []) if isinstance(s, dict)]
    comp = (run_dir / "compress").resolve()
    out: dict[str, Variant] = {}
    for name in VARIANTS:
        rel = artifacts.get(name)
        if not rel:
            continue
        path = (comp / str(rel)).resolve()
        if path.is_dir():
            path = path / "model.onnx"
        if not path.is_relative_to(comp):
            raise EdgeftError(f"compress/report.json: {name} '{rel}' points outside {comp}", "re-run 'edgeft compress'")
        if not path.is_file():
            continue
        rel_file = path.relative_to(comp).as_posix()
        step = next((s for s in steps if str(s.get("path", "")).rstrip("/") in (rel_file, str(rel).rstrip("/"))), None)
        if step is None:
            raise EdgeftError(f"compress/report.json has no step for {name} ({rel_file})", "re-run 'edgeft compress'")
        out[name] = Variant(name, path, step, _precision(path, name))
    return out


def resolve_variant_name(text: str, available: dict[str, Variant]) -> str:
    key = text.strip().lower().replace("-", "_")
    for name, aliases in VARIANTS.items():
        if key == name or key in aliases:
            if name in available:
                return name
            break
    names = ", ".join(f"{n} ({'/'.join(VARIANTS[n])})" for n in available)
    raise EdgeftError(f"no variant '{text}' in this run", f"choose one of: {names}")


def _bench_rows(bench: dict[str, Any] | None, variant: str) -> list[dict[str, Any]]:
    if not bench:
        return []
    rows = [r for r in bench.get("results", []) if isinstance(r, dict) and r.get("model") == variant
            and r.get("status") == "ok" and isinstance(r.get("latency_ms"), dict)]
    # CPU rows first (this is a CPU server bundle), then small batches and short sequences.
    return sorted(rows, key=lambda r: (not str(r.get("runtime", "")).endswith("cpu"), r.get("batch", 0), r.get("seq", 0)))


def _b1_row(bench: dict[str, Any] | None, variant: str) -> dict[str, Any] | None:
    return next((r for r in _bench_rows(bench, variant) if r.get("batch") == 1), None)


def choose_variant(run_dir: Path, report: dict[str, Any], bench: dict[str, Any] | None, cfg: ShipConfig) -> Variant:
    variants = find_variants(run_dir, report)
    if not variants:
        raise EdgeftError(f"{run_dir}/compress has no ONNX model", "re-run 'edgeft compress' (it exports onnx/)")
    goal = report.get("goal", {}).get("max_accuracy_drop_points")
    if cfg.variant:
        v = variants[resolve_variant_name(cfg.variant, variants)]
        if not v.meets_goal and not cfg.allow_miss:
            raise GoalMissed(f"variant {v.name} missed the accuracy goal (validation drop "
                             f"{v.step.get('accuracy_drop_points', float('nan')):.2f} > {goal} points)",
                             "pass --allow-miss to ship it anyway (the manifest and model card say so)")
        return v
    meeting = [v for v in variants.values() if v.meets_goal]
    final = next((v for v in variants.values() if v.onnx == (run_dir / "compress" / str(report.get("final", ""))).resolve()),
                 list(variants.values())[-1])
    if not meeting:
        if not cfg.allow_miss:
            raise GoalMissed(f"no variant of {run_dir} met the accuracy goal (validation drop <= {goal} points)",
                             f"re-run compress with other settings, or pass --allow-miss to ship its best candidate "
                             f"{final.name}")
        return final
    timed = {v.name: _b1_row(bench, v.name) for v in meeting}
    if all(timed.values()):
        return min(meeting, key=lambda v: timed[v.name]["latency_ms"]["p50"])
    return final if final in meeting else meeting[-1]


# ---------------------------------------------------------------- parts


def _copy_onnx(src: Path, dst: Path) -> None:
    """model/model.onnx as one self-contained file; external data (inside model/) only past protobuf's 2 GB."""
    import onnx

    from edgeft.safeio import check_onnx_external_data, onnx_tensors

    check_onnx_external_data(src)
    head = onnx.load(str(src), load_external_data=False)
    external = any(t.data_location == onnx.TensorProto.EXTERNAL for _, t in onnx_tensors(head))
    if not external:
        shutil.copyfile(src, dst)
        return
    model = onnx.load(str(src))
    if any(t.data_location == onnx.TensorProto.EXTERNAL for _, t in onnx_tensors(model)):  # onnx skips sparse ones
        raise EdgeftError(f"{src} keeps sparse tensors in external data, which onnx cannot inline into the bundle",
                          "save the model with its sparse tensors inside the .onnx file")
    if model.ByteSize() < 2_000_000_000 - 10_000_000:
        onnx.save(model, str(dst))
    else:
        onnx.save(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=dst.name + ".data")


def _tokenizer_source(ctx: ShipContext) -> Path:
    from edgeft.finetune import FINETUNED

    for folder in (ctx.variant.onnx.parent, ctx.run_dir / FINETUNED):
        if (folder / "tokenizer.json").is_file() or (folder / "vocab.txt").is_file():
            return folder
    raise EdgeftError(f"no tokenizer next to {ctx.variant.onnx} nor in {ctx.run_dir / FINETUNED}",
                      "re-run 'edgeft compress' (it saves the tokenizer with each model)")


def _labels(ctx: ShipContext) -> list[str]:
    names = ctx.report.get("label_names")
    if not (isinstance(names, list) and names and all(isinstance(x, str) for x in names)):
        raise EdgeftError("compress/report.json has no label_names", "re-run 'edgeft compress'")
    return list(names)


def _onnx_io(path: Path) -> dict[str, Any]:
    import onnx
    from onnx import helper

    model = onnx.load(str(path), load_external_data=False)
    init = {t.name for t in model.graph.initializer}

    def desc(v) -> dict[str, Any]:
        t = v.type.tensor_type
        np_name = helper.tensor_dtype_to_np_dtype(t.elem_type).name
        dt = {"float32": "FP32", "float16": "FP16", "int64": "INT64", "int32": "INT32"}.get(np_name, np_name.upper())
        return {"name": v.name, "datatype": dt, "shape": [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]}

    return {"inputs": [desc(v) for v in model.graph.input if v.name not in init],
            "outputs": [desc(v) for v in model.graph.output],
            "opset": max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None)}


def model_part(ctx: ShipContext) -> None:
    """model/: model.onnx, tokenizer files (tokenizer.json always: the server's fast tokenizer), config.json
    with id2label, labels.txt; then the serving path's runner on these very files."""
    from edgeft.bundle_checks import open_runner

    model = ctx.stage / MODEL_DIR
    model.mkdir()
    _copy_onnx(ctx.variant.onnx, ctx.stage / MODEL_ONNX)
    src = _tokenizer_source(ctx)
    for name in TOKENIZER_FILES:
        if (src / name).is_file() and not (src / name).is_symlink():
            shutil.copyfile(src / name, model / name)
    if not (model / "tokenizer.json").is_file():  # a slow-tokenizer folder: convert once, here
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(src), use_fast=True, trust_remote_code=False).save_pretrained(str(model))
    labels = _labels(ctx)
    cfg_src = ctx.variant.onnx.parent / "config.json"
    if not cfg_src.is_file():
        from edgeft.finetune import FINETUNED

        cfg_src = ctx.run_dir / FINETUNED / "config.json"
    config = json.loads(cfg_src.read_text(encoding="utf-8")) if cfg_src.is_file() else {}
    config["id2label"] = {str(i): name for i, name in enumerate(labels)}
    config["label2id"] = {name: i for i, name in enumerate(labels)}
    (model / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (ctx.stage / LABELS).write_text("".join(f"{x}\n" for x in labels), encoding="utf-8")

    tok_cfg = {}
    if (model / "tokenizer_config.json").is_file():
        tok_cfg = json.loads((model / "tokenizer_config.json").read_text(encoding="utf-8"))
    max_length = int(ctx.report.get("max_length") or 0)
    if max_length < 2:
        raise EdgeftError("compress/report.json has no max_length", "re-run 'edgeft compress'")
    onnx_io = _onnx_io(ctx.stage / MODEL_ONNX)
    ctx.runner = open_runner(model, ctx.stage / MODEL_ONNX, max_length)
    if ctx.runner.num_labels is not None and ctx.runner.num_labels != len(labels):
        raise EdgeftError(f"{ctx.variant.onnx} has {ctx.runner.num_labels} outputs but the run has {len(labels)} labels",
                          "re-run 'edgeft compress'")
    ctx.manifest.update({
        "labels": labels,
        "io": {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
               "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, len(labels)]},
                           {"name": "label", "datatype": "BYTES", "shape": [-1]}],
               "onnx": onnx_io},
        "tokenizer": {"max_length": max_length, "truncation": True,
                      "truncation_side": tok_cfg.get("truncation_side", "right"),
                      "padding": "longest", "padding_side": tok_cfg.get("padding_side", "right"),
                      "lowercase": bool(tok_cfg.get("do_lower_case", False)),
                      "files": sorted(p.name for p in model.iterdir() if p.name in TOKENIZER_FILES)},
    })


def golden_part(ctx: ShipContext) -> None:
    """golden/golden.jsonl: ``cfg.golden`` test-split texts (stratified, seeded) with the shipped model's
    label and logits at batch size 1; also the data section (split sizes and hashes)."""
    import numpy as np

    from edgeft.bundle_checks import predict_one_by_one
    from edgeft.data import load_dataset, stratified_subsample

    dataset = load_dataset(ctx.recipe.data, seed=ctx.recipe.seed)
    summary = dataset.summary()
    recorded = (ctx.manifest.get("source", {}).get("run_data") or {}).get("test", {}).get("sha256")
    if recorded and recorded != summary["test"]["sha256"]:
        raise EdgeftError(f"the test split of {ctx.recipe.data.dataset} no longer matches the run's "
                          f"(sha256 {summary['test']['sha256'][:12]} vs {recorded[:12]})",
                          "restore the dataset the run was made with")
    labels = ctx.manifest["labels"]
    if list(dataset.label_names) != labels:
        raise EdgeftError(f"the dataset's labels {dataset.label_names} differ from the model's {labels}",
                          "ship the run with the data it was trained on")
    sample = stratified_subsample(dataset.test, ctx.cfg.golden, ctx.recipe.seed + 9)
    logits = predict_one_by_one(ctx.runner, sample.texts)
    pred = logits.argmax(axis=1)
    lines = [json.dumps({"text": t, "label": labels[int(p)], "logits": [round(float(x), 6) for x in lg],
                         "truth": labels[y]}, ensure_ascii=False)
             for t, p, lg, y in zip(sample.texts, pred, logits, sample.labels)]
    (ctx.stage / GOLDEN).parent.mkdir()
    (ctx.stage / GOLDEN).write_text("\n".join(lines) + "\n", encoding="utf-8")
    ctx.golden_texts = sample.texts
    margin = np.sort(logits, axis=1)
    ctx.manifest["golden"] = {
        "path": GOLDEN, "count": len(lines), "split": "test", "sample_seed": ctx.recipe.seed + 9, "batch_size": 1,
        "accuracy_vs_truth": float(np.mean(pred == np.asarray(sample.labels))),
        "min_top2_margin": float((margin[:, -1] - margin[:, -2]).min()) if logits.shape[1] > 1 else None,
        "tolerance": {"logits_atol": GOLDEN_ATOL[ctx.variant.precision],
                      "label_rule": "labels must match, except where the golden top-2 logit margin is within 2 x logits_atol",
                      "why": "same model and ORT version: exact on one machine; other CPUs' kernels differ"
                             + (" (int8: AVX2 vs VNNI vs AMX)" if ctx.variant.precision == "int8" else "")}}
    ctx.manifest["data"] = {"dataset": summary["name"], "label_names": summary["label_names"],
                            **{s: summary[s] for s in ("train", "validation", "test")}}


def latency_part(ctx: ShipContext) -> None:
    """The model and the fixed reference workload timed interleaved here; verify repeats it elsewhere."""
    from edgeft.artifacts import cpu_info
    from edgeft.bundle_checks import (LATENCY_INPUT, REFERENCE_DESCRIPTION, latency_encoding, measure_latency)
    from edgeft.onnx_eval import usable_cores

    import onnxruntime as ort

    threads = usable_cores()
    enc = latency_encoding(ctx.runner, ctx.golden_texts)
    m = measure_latency(ctx.runner, enc, threads=threads, budget_s=ctx.cfg.latency_seconds)
    ctx.manifest["latency_check"] = {
        "reference_workload": REFERENCE_DESCRIPTION, "input": LATENCY_INPUT, "threshold": LATENCY_THRESHOLD,
        "machine": {"cpu": cpu_info(), "onnxruntime": ort.__version__}, **m}


def _bench_section(ctx: ShipContext) -> dict[str, Any] | None:
    rows = _bench_rows(ctx.bench, ctx.variant.name)
    if not rows:
        return None
    env = ctx.bench.get("environment", {})

    def lat(d: dict | None) -> dict | None:
        return None if not d else {k: d.get(k) for k in ("p50", "p90", "p99", "mean", "n", "cv_robust", "is_unstable",
                                                         "is_p99_reliable")}

    return {"source": "bench.json", "created": ctx.bench.get("created"),
            "machine": {"cpu": env.get("cpu"), "threads": env.get("threads"), "platform": env.get("platform"),
                        "gpu": env.get("gpu"), "onnxruntime": env.get("versions", {}).get("onnxruntime")},
            "method": (ctx.bench.get("method") or {}).get("description"),
            "shapes": [{"key": r["key"], "runtime": r.get("runtime"), "precision": r.get("precision"),
                        "batch": r.get("batch"), "seq": r.get("seq"), "latency_ms": lat(r.get("latency_ms")),
                        "e2e_latency_ms": lat(r.get("e2e_latency_ms")),
                        "throughput_samples_per_s": r.get("throughput_samples_per_s"),
                        "speedup_vs_reference": r.get("speedup_vs_reference"), "accuracy": r.get("accuracy"),
                        "peak_rss_mb": (r.get("memory") or {}).get("peak_rss_mb")} for r in rows],
            "warnings": [w for w in ctx.bench.get("warnings", []) if ctx.variant.name in w or "machine" in w]}


def serving_part(ctx: ShipContext) -> None:
    """serving/: alert rules + their promtool tests, a scrape config, a systemd unit; the manifest's
    serving defaults (ServeConfig fields) with the latency budget from the bundle's own figures."""
    from edgeft.monitoring import AlertSettings, alerts_test_yaml, alerts_yaml, prometheus_yaml, systemd_unit
    from edgeft.serve.config import ServeConfig

    bench = _bench_section(ctx)
    ctx.manifest["bench"] = bench
    b1 = next((s for s in (bench or {}).get("shapes", []) if s["batch"] == 1), None)
    if b1 is not None:
        p99, source = b1["latency_ms"]["p99"], f"{BUDGET_FACTOR:g}x bench p99 at batch 1 ({b1['key']})"
    else:
        p99, source = ctx.manifest["latency_check"]["model"]["p99_ms"], \
            f"{BUDGET_FACTOR:g}x p99 at batch 1 measured at ship time (the run has no bench of this variant)"
    budget_ms = float(max(1, math.ceil(BUDGET_FACTOR * p99)))
    defaults = ServeConfig()
    serving = {"max_batch_size": defaults.max_batch_size, "max_batch_tokens": defaults.max_batch_tokens,
               "max_queue_delay_ms": defaults.max_queue_delay_ms, "queue_capacity": defaults.queue_capacity,
               "threads": None, "latency_budget_ms": budget_ms}
    ServeConfig.model_validate(serving)  # the server must accept what the bundle says
    ctx.manifest["serving"] = serving
    settings = AlertSettings(latency_budget_s=budget_ms / 1000)
    ctx.manifest["alerts"] = {"files": [f"{SERVING_DIR}/alerts.yml", f"{SERVING_DIR}/alerts_test.yml"],
                              "budget_source": source, "budget_p99_ms": p99, **settings.to_dict()}
    folder = ctx.stage / SERVING_DIR
    folder.mkdir()
    (folder / "alerts.yml").write_text(alerts_yaml(settings, ctx.name), encoding="utf-8")
    (folder / "alerts_test.yml").write_text(alerts_test_yaml(settings, ctx.name), encoding="utf-8")
    (folder / "prometheus.yml").write_text(prometheus_yaml(), encoding="utf-8")
    model_mb = (ctx.stage / MODEL_ONNX).stat().st_size / 1e6
    memory_mb = int(math.ceil((4 * model_mb + 1024) / 256) * 256)  # 4x the weights + 1 GiB for Python/ORT/batches
    (folder / "edgeft-serve.service").write_text(
        systemd_unit(ctx.name, ctx.version, memory_max_mb=memory_mb, shutdown_timeout_s=defaults.shutdown_timeout_s),
        encoding="utf-8")


def _accuracy_section(ctx: ShipContext) -> dict[str, Any]:
    goal = ctx.report.get("goal", {})
    step = ctx.variant.step
    out = {"goal": {"metric": goal.get("metric", "validation accuracy"),
                    "max_drop_points": goal.get("max_accuracy_drop_points"), "met": ctx.variant.meets_goal},
           "source": "compress/report.json"}
    for split, base_key, drop_key in (("validation", "baseline_validation_accuracy", "accuracy_drop_points"),
                                      ("test", "baseline_test_accuracy", "test_accuracy_drop_points")):
        m = step.get(split) or {}
        out[split] = {"accuracy": m.get("accuracy"), "macro_f1": m.get("macro_f1"), "n": m.get("n"),
                      "fp32_accuracy": goal.get(base_key), "drop_points": step.get(drop_key)}
    if step.get("agreement_vs_parent"):
        out["agreement_vs_parent"] = step["agreement_vs_parent"]
    return out


def _fmt(x: Any, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def model_card_part(ctx: ShipContext) -> None:
    m = ctx.manifest
    acc, data, lc = m["accuracy"], m["data"], m["latency_check"]
    labels, v = m["labels"], m["variant"]
    from edgeft.layout import read_side_file

    meta = read_side_file(ctx.variant.onnx.parent)
    base = meta.get("base_model") or ctx.recipe.model.name
    language = {"minilm-l6": "English"}.get(str(base), f"those of the base model {base}")
    steps = [s.get("step") for s in ctx.report.get("steps", [])]
    cpu = lc["machine"]["cpu"]
    lines = [
        f"# Model card: {m['name']} {m['version']}", "",
        f"Text classification into {len(labels)} labels ({', '.join(f'`{x}`' for x in labels)}). "
        f"The `{v['name']}` ({v['precision']}) ONNX model of `{base}` fine-tuned by edgeft "
        f"({meta.get('method', ctx.recipe.finetune.method)}) on `{data['dataset']}`, then compressed "
        f"({' -> '.join(s for s in steps if s and s != 'finetuned')}). Written by edgeft {__version__} "
        f"(`edgeft ship`); serve it with `edgeft serve`, check a copy with `edgeft verify`.", "",
        "Input: one text per item (`text`, BYTES). Output: `logits` (FP32, one per label; softmax gives "
        "probabilities) and `label` (the arg-max label).", "",
    ]
    if not v["meets_goal"]:
        lines += [f"**This variant MISSED the accuracy goal** (validation drop {_fmt(acc['validation']['drop_points'], '.2f')} "
                  f"> {acc['goal']['max_drop_points']} points) and was shipped with `--allow-miss`.", ""]
    lines += ["## Data", "", f"Dataset `{data['dataset']}`, labels {', '.join(data['label_names'])}. "
              "Splits are seeded and stratified; settings were chosen on validation, test only reports.", "",
              "| split | texts | class counts | sha256 |", "|---|---|---|---|"]
    lines += [f"| {s} | {data[s]['size']} | {data[s]['class_counts']} | `{data[s]['sha256'][:16]}...` |"
              for s in ("train", "validation", "test")]
    lines += ["", "## Accuracy", "", "| model | validation | test |", "|---|---|---|",
              f"| fine-tuned fp32 (torch) | {_fmt(acc['validation']['fp32_accuracy'])} | {_fmt(acc['test']['fp32_accuracy'])} |",
              f"| **shipped `{v['name']}`** | **{_fmt(acc['validation']['accuracy'])}** | **{_fmt(acc['test']['accuracy'])}** |",
              f"| drop (points) | {_fmt(acc['validation']['drop_points'], '.2f')} | {_fmt(acc['test']['drop_points'], '.2f')} |",
              "", f"Goal: at most {acc['goal']['max_drop_points']} points of validation accuracy lost vs fp32: "
              f"{'met' if v['meets_goal'] else 'MISSED'}. Golden examples: {m['golden']['count']} test texts, "
              f"accuracy {m['golden']['accuracy_vs_truth']:.4f} on them.", "", "## Latency", ""]
    bench = m.get("bench")
    if bench:
        bc = bench["machine"]["cpu"] or {}
        lines += [f"`edgeft bench` ({bench['created']}) on {bc.get('model')} ({bc.get('usable_cores')} usable cores, "
                  f"int8 flags: {', '.join(bc.get('flags') or []) or 'none'}; VNNI {'yes' if bc.get('has_vnni') else 'no'}, "
                  f"AMX {'yes' if bc.get('has_amx_int8') else 'no'}), {(bench['machine']['threads'] or {}).get('intra_op')} "
                  f"threads, ONNX Runtime {bench['machine']['onnxruntime']}; synthetic inputs of `seq` tokens:", "",
                  "| runtime | batch | seq | p50 ms | p90 ms | p99 ms | texts/s | speed-up vs torch fp32 |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {s['runtime']} | {s['batch']} | {s['seq']} | {_fmt(s['latency_ms']['p50'], '.2f')} | "
                  f"{_fmt(s['latency_ms']['p90'], '.2f')} | {_fmt(s['latency_ms']['p99'], '.2f')} | "
                  f"{_fmt(s['throughput_samples_per_s'], '.1f')} | {_fmt(s['speedup_vs_reference'], '.2f')} |"
                  for s in bench["shapes"]]
    else:
        lines += ["The run has no `edgeft bench` figures for this variant."]
    lines += ["", f"Ship-time check on {cpu['model']} ({lc['threads']} threads, one {lc['tokens']}-token text): "
              f"model p50 {lc['model']['p50_ms']:.2f} ms, reference workload p50 {lc['reference']['p50_ms']:.2f} ms "
              f"(ratio {lc['ratio_p50']:.3f}; `edgeft verify` compares this ratio on its machine). "
              f"Alert budget for p99 request time: {m['serving']['latency_budget_ms']:g} ms ({m['alerts']['budget_source']}).",
              "", "## Limits", "",
              f"- At most {m['tokenizer']['max_length']} tokens per text: longer texts are cut "
              f"({m['tokenizer']['truncation_side']} side), so the model never sees the rest.",
              f"- Language: {language}; trained only on `{data['dataset']}` ({', '.join(labels)}): text from other "
              "domains or with other labels gets one of these labels anyway.",
              f"- Golden logits tolerance {m['golden']['tolerance']['logits_atol']:g}: "
              f"{m['golden']['tolerance']['why']}."]
    if v["precision"] == "int8":
        lines += ["- Dynamic int8 picks one activation scale per batch tensor, so under dynamic batching a text's "
                  "answer can depend on its batch-mates (a small share of labels near the decision boundary flip). "
                  "If answers must not depend on batch-mates, serve with `max_batch_size: 1` or ship the fp32 "
                  "variant (`--variant optimized`).",
                  f"- int8 speed depends on the CPU's int8 instructions (quantized on {cpu['model']}: "
                  f"{', '.join(cpu.get('flags') or []) or 'no int8 extensions'}); AVX-512 VNNI or AMX CPUs run it faster, "
                  "plain AVX2 slower."]
    (ctx.stage / MODEL_CARD).write_text("\n".join(lines) + "\n", encoding="utf-8")


DEFAULT_PARTS: tuple[Part, ...] = (model_part, golden_part, latency_part, serving_part, model_card_part)


def scale_parts(cfg: ShipConfig) -> list[Part]:
    """The scale-out files: Ray Serve's config always (small), Triton and Kubernetes when asked."""
    from edgeft.scale.ray_serve import ray_part

    parts: list[Part] = [ray_part]
    if cfg.triton:
        from edgeft.scale.triton import triton_part

        parts.append(triton_part)
    if cfg.kubernetes:
        from edgeft.scale.kubernetes import kubernetes_part

        parts.append(kubernetes_part)
    return parts


# ---------------------------------------------------------------- archive and entry point


def write_tarball(folder: Path, dest: Path, arcname: str) -> Path:
    """A deterministic .tar.gz of ``folder`` (sorted entries, fixed mtime/owner/modes), written atomically."""
    entries = sorted(folder.rglob("*"), key=lambda p: p.relative_to(folder).as_posix())
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as raw:
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz:
                with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
                    for p in [folder, *entries]:
                        rel = p.relative_to(folder).as_posix()
                        info = tarfile.TarInfo(arcname if rel == "." else f"{arcname}/{rel}")
                        info.mtime, info.uid, info.gid, info.uname, info.gname = TAR_MTIME, 0, 0, "", ""
                        if p.is_dir():
                            info.type, info.mode = tarfile.DIRTYPE, 0o755
                            tar.addfile(info)
                        else:
                            info.size, info.mode = p.stat().st_size, 0o644
                            with open(p, "rb") as f:
                                tar.addfile(info, f)
            raw.flush()
            os.fsync(raw.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def _check_out(out: Path, tarball: Path, force: bool) -> None:
    from edgeft.bundle import BundleError, read_manifest

    if out.exists() or out.is_symlink():
        if not out.is_dir() or out.is_symlink():
            raise RunDirError(f"{out} exists and is not a folder", "choose another --out")
        if not force:
            raise RunDirError(f"bundle folder {out} already exists", "choose another --out, or pass --force to replace it")
        try:
            read_manifest(out)
        except BundleError:
            raise RunDirError(f"{out} is not an edgeft bundle; refusing to replace it even with --force",
                              "choose another --out") from None
    if tarball.exists() and (not force or not tarball.is_file()):
        raise RunDirError(f"{tarball} already exists", "choose another --out, or pass --force to replace it")


def load_run(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any] | None, Any, dict[str, Any]]:
    """(compress report, bench.json or None, recipe, run manifest or {}); one-line errors for a run not ready."""
    from edgeft.layout import RunLayout
    from edgeft.recipe import load_recipe

    layout = RunLayout(run_dir)
    if not run_dir.is_dir():
        raise EdgeftError(f"run folder {run_dir} not found", "pass a folder written by 'edgeft run' or 'edgeft compress'")
    if not layout.compress.is_dir():
        raise EdgeftError(f"{run_dir} has no compress/ folder", f"run 'edgeft compress {run_dir}' first")
    report = _read_json(layout.compress_report, "the compress report",
                        f"the compress stage did not finish: run 'edgeft compress {run_dir} --force'")
    if report.get("schema") != "edgeft.compress/1":
        raise EdgeftError(f"{run_dir}/compress/report.json has schema {report.get('schema')!r}; this edgeft reads "
                          "'edgeft.compress/1'", "re-run 'edgeft compress' with this edgeft")
    bench = None
    if layout.bench_json.is_file():
        bench = _read_json(layout.bench_json, "a bench report", "re-run 'edgeft bench' or delete bench.json")
    if not layout.recipe.is_file():
        raise EdgeftError(f"{run_dir} has no recipe.yaml (the golden examples come from its dataset)",
                          "ship a run folder written by 'edgeft run' or 'edgeft compress'")
    recipe = load_recipe(layout.recipe)
    run_manifest = {}
    if layout.manifest.is_file():
        run_manifest = _read_json(layout.manifest, "a run manifest", "re-run the stage that wrote it")
    return report, bench, recipe, run_manifest


def bundle_target(cfg: ShipConfig, run_dir: Path, name: str) -> tuple[Path, Path]:
    """The bundle folder and its tarball for the model ``name`` (checked: usable in URLs and paths);
    refuses to overwrite anything but an edgeft bundle, and that only with ``--force``."""
    try:
        ShipConfig.model_validate({"run_dir": run_dir, "name": name})
    except ValidationError:
        raise EdgeftError(f"the recipe name '{name}' is not usable as a model name", "pass --name NAME") from None
    out = Path(cfg.out) if cfg.out else run_dir / "bundle"
    tarball = out.with_name(out.name + ".tar.gz")
    _check_out(out, tarball, cfg.force)
    return out, tarball


def ship(cfg: ShipConfig, *, extra_parts: Sequence[Part] = ()) -> ShipResult:
    """Build the bundle (see the module docstring). ``extra_parts`` run after the default ones, before
    the manifest and checksums are written, so their files are covered too."""
    from edgeft.artifacts import atomic_dir, sha256_file
    from edgeft.decoder.ship import is_decoder_run, ship_decoder

    run_dir = Path(cfg.run_dir)
    if is_decoder_run(run_dir):  # a text-generation run: its own bundle contents (edgeft.decoder.ship)
        return ship_decoder(cfg, extra_parts=extra_parts)
    report, bench, recipe, run_manifest = load_run(run_dir)
    variant = choose_variant(run_dir, report, bench, cfg)
    name = cfg.name or recipe.name
    out, tarball = bundle_target(cfg, run_dir, name)
    if cfg.triton:  # Triton versions are integers: refuse before anything is written
        from edgeft.scale.triton import triton_version

        triton_version(cfg.version)

    t0 = time.time()
    manifest: dict[str, Any] = {
        "schema": BUNDLE_SCHEMA, "name": name, "version": cfg.version, "edgeft_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "task": "text-classification",
        "variant": {"name": variant.name, "precision": variant.precision, "meets_goal": variant.meets_goal,
                    "shipped_with_allow_miss": not variant.meets_goal,
                    "source": variant.onnx.relative_to(run_dir.resolve()).as_posix()
                    if variant.onnx.is_relative_to(run_dir.resolve()) else str(variant.onnx)},
        "source": {"run_dir": str(run_dir.resolve()),
                   "manifest_sha256": sha256_file(run_dir / "manifest.json") if (run_dir / "manifest.json").is_file() else None,
                   "recipe_sha256": run_manifest.get("recipe_sha256") or sha256_file(run_dir / "recipe.yaml"),
                   "compress_report_sha256": sha256_file(run_dir / "compress" / "report.json"),
                   "bench_sha256": sha256_file(run_dir / "bench.json") if bench else None,
                   "model_sha256": sha256_file(variant.onnx), "run_data": run_manifest.get("data") or None},
        "ship_config": cfg.model_dump(mode="json"),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as stage:
        ctx = ShipContext(cfg, run_dir, stage, name, cfg.version, variant, report, bench, recipe, manifest)
        manifest["accuracy"] = _accuracy_section(ctx)
        for part in (*DEFAULT_PARTS, *scale_parts(cfg), *extra_parts):
            part(ctx)
        manifest["source"].pop("run_data", None)
        manifest["ship_s"] = round(time.time() - t0, 1)
        files = [p for p in sorted(stage.rglob("*")) if p.is_file()]
        manifest["files"] = {p.relative_to(stage).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                             for p in files}
        (stage / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        (stage / SUMS).write_text(sums_text(stage), encoding="utf-8")
        # The archive is written (atomically) before the folder is renamed into place: both or neither.
        write_tarball(stage, tarball, f"{name}-{cfg.version}")
    return ShipResult(out, tarball, manifest)

