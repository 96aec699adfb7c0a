"""Compress stage: prune (+ distillation recovery) -> ONNX export -> graph optimisation -> int8.

Each step is validated against the model before it (max abs logit difference for
float steps, prediction agreement, accuracy on validation and test) and against
the accuracy goal (``compress.max_accuracy_drop`` points of *validation* accuracy
vs the fine-tuned fp32 model; the test split is only reported). When int8 misses
the goal, the most sensitive MatMuls are kept in fp32, within
``quantize.sensitivity_budget``. Everything goes into ``RUN_DIR/compress`` built
atomically; ``GoalMissed`` is raised only after the folder and report are complete.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeft.artifacts import atomic_dir, cpu_info, write_json_atomic
from edgeft.data import Dataset, stratified_subsample
from edgeft.errors import DataError, GoalMissed, ModelError, RecipeError, RunDirError
from edgeft.metrics import agreement, classification_metrics
from edgeft.progress import say
from edgeft.recipe import Recipe

SCHEMA = "edgeft.compress/1"
PRUNED, ONNX_FP32, OPTIMIZED, INT8 = "pruned", "onnx/model.onnx", "optimized/model.onnx", "int8/model.onnx"
SENSITIVITY_SAMPLES = 256  # validation samples used to score each node (KL of logits vs the float parent)


# ---------------------------------------------------------------- evaluation


@dataclass
class _Eval:
    """Logits of the validation and test splits for every candidate, and their metrics."""

    dataset: Dataset
    tokenizer: object
    max_length: int
    batch_size: int = 64

    def torch_logits(self, model) -> dict[str, np.ndarray]:
        from edgeft.train import predict_logits

        return {s: predict_logits(model, self.tokenizer, self.dataset.split(s).texts, max_length=self.max_length,
                                  batch_size=self.batch_size) for s in ("validation", "test")}

    def onnx_logits(self, path: Path) -> dict[str, np.ndarray]:
        from edgeft.onnx_eval import make_session, onnx_logits

        session = make_session(path)
        return {s: onnx_logits(session, self.tokenizer, self.dataset.split(s).texts, max_length=self.max_length,
                               batch_size=self.batch_size) for s in ("validation", "test")}

    def metrics(self, logits: dict[str, np.ndarray]) -> dict:
        out = {}
        for s, lg in logits.items():
            m = classification_metrics(self.dataset.split(s).labels, lg.argmax(-1), self.dataset.label_names)
            out[s] = {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "n": m["n"]}
        return out


def _compare(logits: dict[str, np.ndarray], parent: dict[str, np.ndarray], *, float_step: bool) -> dict:
    out = {"agreement_vs_parent": {s: agreement(logits[s].argmax(-1), parent[s].argmax(-1)) for s in logits}}
    diff = max(float(np.abs(logits[s] - parent[s]).max()) if len(logits[s]) else 0.0 for s in logits)
    out["max_abs_logit_diff_vs_parent"] = diff
    if not float_step:
        out["max_abs_logit_diff_vs_parent_note"] = "int8: compared by agreement and accuracy, not atol"
    return out


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = log_softmax(p_logits.astype(np.float64)), log_softmax(q_logits.astype(np.float64))
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def _size_mb(path: Path) -> float:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.glob("*.safetensors")) / 1e6
    return path.stat().st_size / 1e6


def _read_meta(model_dir: Path, recipe: Recipe, dataset: Dataset) -> dict:
    meta_path = model_dir / "edgeft.json"
    meta = {}
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ModelError(f"{meta_path} is not valid JSON", "re-create the fine-tuned folder") from None
    max_length = int(meta.get("max_length") or recipe.finetune.max_length)
    label_names = meta.get("label_names") or dataset.label_names
    if list(label_names) != list(dataset.label_names):
        raise DataError(f"the model was fine-tuned for labels {label_names}, the data has {dataset.label_names}",
                        "compress with the recipe (data section) the model was fine-tuned with")
    return {"max_length": max_length, "label_names": list(label_names)}


# ---------------------------------------------------------------- pre-flight


def _preflight(model, recipe: Recipe, dataset: Dataset) -> None:
    """Refuse bad settings before any work (exit 2, nothing written)."""
    cfg = recipe.compress
    if model.config.num_labels != dataset.num_labels:
        raise ModelError(f"the model has {model.config.num_labels} labels, the data {dataset.num_labels}",
                         "compress with the data the model was fine-tuned on")
    if cfg.prune is not None and (cfg.prune.heads > 0 or cfg.prune.ffn > 0):
        from edgeft.prune import head_counts, heads_to_remove

        counts = head_counts(model)  # raises ModelError naming the supported architectures
        for layer, n in enumerate(counts):
            if heads_to_remove(n, cfg.prune.heads) >= n:
                raise RecipeError(f"compress.prune.heads={cfg.prune.heads} would remove all {n} heads of layer {layer}",
                                  f"use a fraction below {(n - 0.5) / n:.2f}; every layer keeps at least one head")
    from edgeft.export import OPT_LEVELS

    if cfg.optimize.enabled and cfg.optimize.level not in OPT_LEVELS:
        raise RecipeError(f"compress.optimize.level={cfg.optimize.level} is not an ONNX Runtime optimizer level",
                          f"use one of {', '.join(map(str, OPT_LEVELS))}")
    q = cfg.quantize
    if q is not None and q.mode == "static":
        from edgeft.quantize import MIN_CALIBRATION_SAMPLES

        if q.calibration.samples < MIN_CALIBRATION_SAMPLES:
            raise RecipeError(f"compress.quantize.calibration.samples={q.calibration.samples}: calibration set too "
                              f"small (at least {MIN_CALIBRATION_SAMPLES})", "raise it, e.g. to 256")
        if len(dataset.train) < q.calibration.samples:
            raise DataError(f"calibration set too small: compress.quantize.calibration.samples="
                            f"{q.calibration.samples} but the training split has {len(dataset.train)} samples",
                            "lower compress.quantize.calibration.samples or use more training data")


# ---------------------------------------------------------------- the stage


def compress(model_dir: Path, recipe: Recipe, dataset: Dataset, out_dir: Path, *, show_progress: bool = True) -> dict:
    """Run the compress steps the recipe names on the fine-tuned ``model_dir`` into ``out_dir``.

    Returns the report (also written to ``out_dir/report.json``). Raises ``GoalMissed`` after
    everything is written when the accuracy goal is missed and ``compress.allow_miss`` is off."""
    from edgeft.finetune import set_threads
    from edgeft.modeling import load_classifier, load_tokenizer
    from edgeft.safeio import check_hf_folder

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    cfg = recipe.compress
    if out_dir.exists():
        raise RunDirError(f"{out_dir} already exists", "remove it or compress into a new run folder")
    check_hf_folder(model_dir)
    meta = _read_meta(model_dir, recipe, dataset)
    threads = set_threads(recipe.finetune.threads)
    model = load_classifier(str(model_dir))
    model.eval()
    _preflight(model, recipe, dataset)
    try:
        tokenizer = load_tokenizer(str(model_dir))
    except (TypeError, AttributeError, KeyError) as e:  # transformers raises these for mismatched files
        raise ModelError(f"cannot load the tokenizer in {model_dir} ({type(e).__name__})",
                         "save the model's own tokenizer into the folder (tokenizer.save_pretrained)") from None

    t_start = time.perf_counter()
    ev = _Eval(dataset, tokenizer, meta["max_length"], batch_size=min(recipe.finetune.eval_batch_size, 64))
    log = (lambda msg: say(msg, enabled=show_progress))
    log(f"[bold]compress[/] {model_dir} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params), "
        f"goal: <= {cfg.max_accuracy_drop:g} points validation accuracy drop, {threads} threads")

    steps: list[dict] = []
    artifacts: dict[str, str] = {}
    candidates: list[dict] = []  # ONNX models that could be "final", in order of expected speed (slowest first)

    def goal_fields(metrics: dict) -> dict:
        drop = (base_val - metrics["validation"]["accuracy"]) * 100
        test_drop = (base_test - metrics["test"]["accuracy"]) * 100
        return {"accuracy_drop_points": drop, "test_accuracy_drop_points": test_drop,
                "meets_goal": bool(drop <= cfg.max_accuracy_drop + 1e-9)}

    def record_onnx_step(step: dict, artifact: str, rel: str, t0: float) -> np.ndarray:
        """Goal fields, timing, and bookkeeping of an ONNX step; returns its logits (the next parent's)."""
        step.update(goal_fields(step))
        step["seconds"] = time.perf_counter() - t0
        steps.append(step)
        artifacts[artifact] = rel
        candidates.append(step)
        return step.pop("_logits")

    with atomic_dir(out_dir) as tmp:
        # ------------------------------------------------ baseline: the fine-tuned fp32 model
        t0 = time.perf_counter()
        base_logits = ev.torch_logits(model)
        base_metrics = ev.metrics(base_logits)
        base_val, base_test = base_metrics["validation"]["accuracy"], base_metrics["test"]["accuracy"]
        steps.append({"step": "finetuned", "runtime": "torch-fp32", "path": str(model_dir),
                      "params": int(sum(p.numel() for p in model.parameters())), "size_mb": _size_mb(model_dir),
                      **base_metrics, "seconds": time.perf_counter() - t0})
        log(f"  fine-tuned fp32: validation acc {base_val:.4f}, test acc {base_test:.4f}")
        parent_logits, float_model, float_dir = base_logits, model, model_dir

        # ------------------------------------------------ 1. structured pruning + recovery
        if cfg.prune is not None and (cfg.prune.heads > 0 or cfg.prune.ffn > 0):
            float_model, pruned_step = _prune_step(model_dir, model, tokenizer, recipe, dataset, meta, ev,
                                                   tmp / PRUNED, log, show_progress)
            logits = ev.torch_logits(float_model)
            metrics = ev.metrics(logits)
            pruned_step.update(metrics)
            pruned_step.update(_compare(logits, parent_logits, float_step=False))
            pruned_step["max_abs_logit_diff_vs_parent_note"] = "pruning changes the function; compare accuracy"
            pruned_step.update(goal_fields(metrics))
            steps.append(pruned_step)
            artifacts["pruned"] = PRUNED
            parent_logits, float_dir = logits, tmp / PRUNED
            log(f"  pruned: {pruned_step['params_before'] / 1e6:.1f}M -> {pruned_step['params'] / 1e6:.1f}M params, "
                f"validation acc {metrics['validation']['accuracy']:.4f} "
                f"(drop {pruned_step['accuracy_drop_points']:.2f} points), test acc {metrics['test']['accuracy']:.4f}")

        # ------------------------------------------------ 2. ONNX export
        from edgeft.export import export_onnx, optimize_onnx

        t0 = time.perf_counter()
        onnx_path = export_onnx(float_dir, (tmp / ONNX_FP32).parent, opset=cfg.export.opset)
        step = _onnx_step("export", onnx_path, tmp, ev, parent_logits, float_step=True, atol=cfg.export.atol,
                          extra={"opset": cfg.export.opset, "exporter": "optimum", "checker": "passed",
                                 "dynamic_axes": ["batch_size", "sequence_length"]})
        parent_logits, parent_path = record_onnx_step(step, "onnx_fp32", ONNX_FP32, t0), onnx_path
        log(f"  onnx fp32: max |diff| {step['max_abs_logit_diff_vs_parent']:.2e}, "
            f"validation acc {step['validation']['accuracy']:.4f}, {step['size_mb']:.1f} MB")

        # ------------------------------------------------ 3. graph optimisation
        if cfg.optimize.enabled:
            t0 = time.perf_counter()
            opt_path, fused = optimize_onnx(onnx_path, (tmp / OPTIMIZED).parent, level=cfg.optimize.level,
                                            model_type=float_model.config.model_type, src_dir=onnx_path.parent,
                                            layernorm=cfg.optimize.layernorm)
            step = _onnx_step("optimize", opt_path, tmp, ev, parent_logits, float_step=True, atol=cfg.export.atol,
                              extra={"level": cfg.optimize.level, "layernorm": cfg.optimize.layernorm,
                                     "fused_operators": fused})
            parent_logits, parent_path = record_onnx_step(step, "onnx_optimized", OPTIMIZED, t0), opt_path
            log(f"  optimized (level {cfg.optimize.level}): fused {_fmt_counts(fused)}; "
                f"max |diff| {step['max_abs_logit_diff_vs_parent']:.2e}")

        # ------------------------------------------------ 4. int8 quantization
        if cfg.quantize is not None:
            t0 = time.perf_counter()
            # QDQ (static) cannot wrap ORT's fused contrib ops, so static starts from the plain export;
            # ORT fuses the QDQ graph when the session loads it.
            q_src = parent_path if cfg.quantize.mode == "dynamic" else onnx_path
            step = _quantize_step(q_src, tmp, recipe, dataset, ev, tokenizer, meta, parent_logits,
                                  parent_meets_goal=candidates[-1]["meets_goal"], goal_fields=goal_fields, log=log)
            step["seconds"] = time.perf_counter() - t0
            steps.append(step)
            artifacts["onnx_int8"] = INT8
            candidates.append(step)

        # ------------------------------------------------ verdict
        chain_end = candidates[-1]
        goal_met = bool(chain_end["meets_goal"])
        meeting = [c for c in candidates if c["meets_goal"]]
        if meeting:
            final = meeting[-1]  # the most compressed (fastest) one that meets the goal
        else:
            final = max(candidates, key=lambda c: (c["validation"]["accuracy"], candidates.index(c)))
        report = {
            "schema": SCHEMA,
            "model_dir": str(model_dir),
            "max_length": meta["max_length"],
            "label_names": meta["label_names"],
            "goal": {"metric": "validation accuracy", "max_accuracy_drop_points": cfg.max_accuracy_drop,
                     "baseline_validation_accuracy": base_val, "baseline_test_accuracy": base_test},
            "goal_met": goal_met,
            "final": final["path"],
            "final_meets_goal": bool(final["meets_goal"]),
            "artifacts": artifacts,
            "steps": steps,
            "cpu": cpu_info(),
            "threads": threads,
            "recipe": recipe.compress.model_dump(mode="json"),
            "wall_seconds": time.perf_counter() - t_start,
        }
        report["verdict"] = _verdict(report, chain_end, final)
        for rel in artifacts.values():  # every artifact folder can be tokenized on its own
            folder = tmp / rel if not rel.endswith(".onnx") else (tmp / rel).parent
            if not (folder / "edgeft.json").is_file():
                write_json_atomic(folder / "edgeft.json", {"max_length": meta["max_length"],
                                                           "label_names": meta["label_names"]})
        write_json_atomic(tmp / "report.json", report)

    _print_summary(report, show_progress)
    if not goal_met and not cfg.allow_miss:
        raise GoalMissed(report["verdict"], "lower the compression (prune targets, quantize.sensitivity_budget), "
                         "raise compress.max_accuracy_drop, or pass --allow-miss to accept the best candidate")
    return report


def _fmt_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "none"


def _verdict(report: dict, chain_end: dict, final: dict) -> str:
    goal = report["goal"]["max_accuracy_drop_points"]
    if report["goal_met"]:
        return (f"goal met: {final['path']} loses {final['accuracy_drop_points']:.2f} points of validation accuracy "
                f"(<= {goal:g})")
    text = (f"accuracy goal missed: {chain_end['path']} loses {chain_end['accuracy_drop_points']:.2f} points of "
            f"validation accuracy (> {goal:g})")
    if report["final_meets_goal"]:
        text += f"; {final['path']} meets the goal and is reported as final"
    else:
        text += f"; no candidate meets it, best kept: {final['path']} ({final['accuracy_drop_points']:.2f} points)"
    return text


# ---------------------------------------------------------------- steps


def _prune_step(model_dir: Path, teacher, tokenizer, recipe: Recipe, dataset: Dataset, meta: dict, ev: _Eval,
                out: Path, log, show_progress: bool) -> tuple[object, dict]:
    from edgeft.export import copy_side_files
    from edgeft.modeling import load_classifier
    from edgeft.prune import count_parameters, ffn_sizes, head_counts, importance, make_plan, prune, shape_summary
    from edgeft.train import TrainSettings, train_classifier

    cfg = recipe.compress.prune
    t0 = time.perf_counter()
    student = load_classifier(str(model_dir))
    heads_before, ffn_before, params_before = head_counts(student), ffn_sizes(student), count_parameters(student)
    n_imp = min(cfg.importance_samples, len(dataset.train))
    imp = importance(student, tokenizer, dataset.train, max_length=meta["max_length"], samples=n_imp,
                     batch_size=recipe.finetune.batch_size, seed=recipe.seed)
    plan = make_plan(imp, heads=cfg.heads, ffn=cfg.ffn)
    prune(student, plan)
    t_imp = time.perf_counter() - t0
    before_recovery = ev.metrics({"validation": ev.torch_logits(student)["validation"]})["validation"]
    log(f"  pruned {shape_summary(heads_before, head_counts(student), ffn_before, ffn_sizes(student))['heads_after']} "
        f"heads, FFN {ffn_before[0]} -> {ffn_sizes(student)[0]}; validation acc before recovery "
        f"{before_recovery['accuracy']:.4f}")
    recovery = {"epochs": cfg.recovery.epochs}
    if cfg.recovery.epochs > 0:
        ft = recipe.finetune
        settings = TrainSettings(epochs=cfg.recovery.epochs, lr=cfg.recovery.lr, batch_size=ft.batch_size,
                                 eval_batch_size=ft.eval_batch_size, max_length=meta["max_length"],
                                 warmup_ratio=ft.warmup_ratio, weight_decay=ft.weight_decay, grad_clip=ft.grad_clip,
                                 seed=recipe.seed, distill_alpha=cfg.recovery.distill_alpha,
                                 temperature=cfg.recovery.temperature)
        result = train_classifier(student, tokenizer, dataset.train, dataset.validation, dataset.label_names,
                                  settings, teacher=teacher, show_progress=show_progress, label="recovery")
        recovery.update({"lr": cfg.recovery.lr, "distill_alpha": cfg.recovery.distill_alpha,
                         "temperature": cfg.recovery.temperature, "best_epoch": result.best_epoch,
                         "history": result.epochs, "train_seconds": result.train_seconds})
    student.eval()
    student.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    copy_side_files(model_dir, out / ".side")
    for f in (out / ".side").iterdir():  # only what save_pretrained did not write (edgeft.json, ...)
        if not (out / f.name).exists():
            f.replace(out / f.name)
    import shutil

    shutil.rmtree(out / ".side")
    # The pruned folder must reload to the same function (pruned_heads + FFN width in config.json).
    reloaded = load_classifier(str(out))
    probe = dataset.validation.texts[:16]
    from edgeft.train import predict_logits

    a = predict_logits(student, tokenizer, probe, max_length=meta["max_length"])
    b = predict_logits(reloaded, tokenizer, probe, max_length=meta["max_length"])
    reload_diff = float(np.abs(a - b).max()) if len(probe) else 0.0
    if reload_diff > 1e-4:
        raise ModelError(f"the pruned model does not reload identically (max |diff| {reload_diff:.2e})",
                         "report this; set compress.prune: null meanwhile")
    step = {"step": "prune", "runtime": "torch-fp32", "path": PRUNED, "method": "taylor-importance, uniform per layer",
            "targets": {"heads": cfg.heads, "ffn": cfg.ffn}, "importance_samples": imp.samples,
            "plan": plan.summary(), "shapes": shape_summary(heads_before, head_counts(student), ffn_before,
                                                            ffn_sizes(student)),
            "params_before": params_before, "params": count_parameters(student), "size_mb": _size_mb(out),
            "validation_before_recovery": before_recovery, "recovery": recovery,
            "reload_max_abs_diff": reload_diff, "seconds": time.perf_counter() - t0,
            "importance_seconds": t_imp}
    return student, step


def _onnx_step(name: str, path: Path, root: Path, ev: _Eval, parent_logits: dict, *, float_step: bool,
               atol: float | None, extra: dict) -> dict:
    logits = ev.onnx_logits(path)
    metrics = ev.metrics(logits)
    cmp = _compare(logits, parent_logits, float_step=float_step)
    if float_step and atol is not None and cmp["max_abs_logit_diff_vs_parent"] > atol:
        raise ModelError(f"{name}: ONNX logits differ from the parent model by "
                         f"{cmp['max_abs_logit_diff_vs_parent']:.2e} (> compress.export.atol {atol:g})",
                         "report this model; raise compress.export.atol only if the accuracy is unchanged")
    from edgeft.export import op_counts

    return {"step": name, "runtime": "onnxruntime-cpu", "path": str(path.relative_to(root)),
            "size_mb": path.stat().st_size / 1e6, "params": _onnx_params(path), "op_counts": op_counts(path),
            **extra, **metrics, **cmp, "_logits": logits}


def _onnx_params(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return int(sum(int(np.prod(t.dims)) for t in model.graph.initializer))


def _quantize_step(src: Path, root: Path, recipe: Recipe, dataset: Dataset, ev: _Eval, tokenizer, meta: dict,
                   parent_logits: dict, *, parent_meets_goal: bool, goal_fields, log) -> dict:
    import shutil

    from edgeft.export import check_onnx, copy_side_files
    from edgeft.quantize import (calibration_feeds, exclusion_steps, node_sensitivity, quantizable_nodes,
                                 quantize_dynamic, quantize_static, quantized_op_summary)

    q = recipe.compress.quantize
    dst = root / INT8
    work = root / ".quantize-work"
    work.mkdir(exist_ok=True)
    info = {"mode": q.mode, "per_channel": q.per_channel, "reduce_range": q.reduce_range, "input": str(src.relative_to(root)),
            "weights": "s8", "activations": "u8 (dynamic, per tensor)" if q.mode == "dynamic" else "u8 (static QDQ)"}
    if q.mode == "static":
        rng = np.random.default_rng(recipe.seed)
        idx = rng.permutation(len(dataset.train))[:q.calibration.samples]
        calib = dataset.train.take(idx)
        feeds = calibration_feeds(src, tokenizer, calib.texts, max_length=meta["max_length"])
        info["calibration"] = {"method": q.calibration.method, "samples": len(feeds), "split": "train"}

        def qfn(s, d, exclude=(), only=None):
            return quantize_static(s, d, feeds, method=q.calibration.method, per_channel=q.per_channel,
                                   reduce_range=q.reduce_range, exclude=exclude, only=only)
    else:
        def qfn(s, d, exclude=(), only=None):
            return quantize_dynamic(s, d, per_channel=q.per_channel, reduce_range=q.reduce_range,
                                    exclude=exclude, only=only)

    def attempt(exclude: list[str]) -> dict:
        path = work / f"try{len(attempts)}" / "model.onnx"
        qfn(src, path, exclude=exclude)
        logits = ev.onnx_logits(path)
        metrics = ev.metrics(logits)
        rec = {"fp32_nodes": list(exclude), **metrics, **_compare(logits, parent_logits, float_step=False),
               "size_mb": path.stat().st_size / 1e6}
        rec.update(goal_fields(rec))
        rec["_path"] = path
        attempts.append(rec)
        return rec

    attempts: list[dict] = []
    best = attempt([])
    log(f"  int8 {q.mode}{' per-channel' if q.per_channel else ''}: validation acc "
        f"{best['validation']['accuracy']:.4f} (drop {best['accuracy_drop_points']:.2f} points), "
        f"agreement {best['agreement_vs_parent']['validation']:.4f}")
    sensitivity: dict[str, float] = {}
    search_note = None
    if not best["meets_goal"] and q.sensitivity_budget > 0:
        if not parent_meets_goal:
            search_note = "skipped: the float model already misses the goal, keeping nodes fp32 cannot fix that"
        else:
            nodes = quantizable_nodes(src)
            sub = stratified_subsample(dataset.validation, SENSITIVITY_SAMPLES, recipe.seed + 7)
            from edgeft.onnx_eval import make_session, onnx_logits

            parent_sub = onnx_logits(make_session(src), tokenizer, sub.texts, max_length=meta["max_length"])

            def score(path: Path) -> float:
                return _kl(parent_sub, onnx_logits(make_session(path), tokenizer, sub.texts,
                                                   max_length=meta["max_length"]))

            log(f"  int8 misses the goal: measuring the sensitivity of {len(nodes)} nodes")
            sensitivity = node_sensitivity(qfn, src, nodes, score, work)
            ranked = sorted(sensitivity, key=sensitivity.get, reverse=True)
            for k in exclusion_steps(min(q.sensitivity_budget, len(ranked))):
                rec = attempt(ranked[:k])
                log(f"    {k} node(s) fp32: validation acc {rec['validation']['accuracy']:.4f} "
                    f"(drop {rec['accuracy_drop_points']:.2f})")
                if rec["meets_goal"]:
                    break
    # Keep the first attempt that meets the goal (fewest fp32 nodes, fastest); else the most accurate.
    meeting = [a for a in attempts if a["meets_goal"]]
    chosen = meeting[0] if meeting else max(attempts, key=lambda a: (a["validation"]["accuracy"], -len(a["fp32_nodes"])))
    dst.parent.mkdir(parents=True, exist_ok=True)
    chosen["_path"].replace(dst)
    copy_side_files(src.parent, dst.parent)
    shutil.rmtree(work, ignore_errors=True)
    check_onnx(dst)
    step = {"step": "quantize", "runtime": "onnxruntime-cpu", "path": INT8, **info,
            "cpu_int8": {k: v for k, v in cpu_info().items() if k in ("model", "flags", "has_vnni", "has_amx_int8")},
            "size_mb": dst.stat().st_size / 1e6, "params": _onnx_params(dst),
            "quantized_ops": quantized_op_summary(dst),
            **{k: v for k, v in chosen.items() if not k.startswith("_")},
            "attempts": [{k: v for k, v in a.items() if not k.startswith("_") and k not in ("test",)}
                         for a in attempts],
            "sensitivity": dict(sorted(sensitivity.items(), key=lambda kv: -kv[1])) if sensitivity else {},
            "sensitivity_metric": f"KL(parent || int8) of logits on {SENSITIVITY_SAMPLES} validation samples, "
                                  "one node quantized at a time" if sensitivity else None}
    if search_note:
        step["sensitivity_note"] = search_note
    return step


# ---------------------------------------------------------------- summary


def _print_summary(report: dict, show: bool) -> None:
    if not show:
        return
    from rich.table import Table

    from edgeft.progress import console

    t = Table(title="compress", show_lines=False)
    for col in ("step", "val acc", "test acc", "drop (pts)", "agree", "max |diff|", "MB", "params"):
        t.add_column(col, justify="right" if col != "step" else "left")
    for s in report["steps"]:
        agree = s.get("agreement_vs_parent", {}).get("validation")
        diff = s.get("max_abs_logit_diff_vs_parent")
        t.add_row(s["step"], f"{s['validation']['accuracy']:.4f}", f"{s['test']['accuracy']:.4f}",
                  f"{s.get('accuracy_drop_points', 0.0):.2f}", f"{agree:.4f}" if agree is not None else "",
                  f"{diff:.1e}" if diff is not None and s["step"] in ("export", "optimize") else "",
                  f"{s['size_mb']:.1f}", f"{s['params'] / 1e6:.2f}M")
    console.print(t)
    q = next((s for s in report["steps"] if s["step"] == "quantize"), None)
    if q is not None:
        flags = ", ".join(q["cpu_int8"]["flags"]) or "none"
        console.print(f"int8 on {q['cpu_int8']['model']} (flags: {flags}); fp32 nodes kept: "
                      f"{', '.join(q['fp32_nodes']) or 'none'}", highlight=False)
    style = "green" if report["goal_met"] else "bold red"
    console.print(f"[{style}]{report['verdict']}[/]; final: {report['final']}", highlight=False)
