"""Compress stage: prune (+ distillation recovery) -> ONNX export -> graph optimisation -> int8.

Each step is validated against the model before it (max abs logit difference for
float steps, prediction agreement, accuracy on validation and test) and against
the accuracy goal (``compress.max_accuracy_drop`` points of *validation* accuracy
vs the fine-tuned fp32 model; the test split is only reported). When int8 misses
the goal, the documented remedies for CPUs without VNNI are tried first and then
the most sensitive MatMuls are kept in fp32, within ``quantize.sensitivity_budget``
(``edgeft.quantize.quantize_step``). Everything goes into ``RUN_DIR/compress`` built
atomically; ``GoalMissed`` is raised only after the folder and report are complete.

The stage reads only its own recipe section (``CompressConfig``); what it needs about the
model and the run comes in explicitly (``seed``, ``default_max_length`` for folders without
``edgeft.json``). Rendering the report is the CLI's (``edgeft.cli``).
"""

from __future__ import annotations

import time
from pathlib import Path

from edgeft.artifacts import atomic_dir, cpu_info, write_json_atomic
from edgeft.data import Dataset
from edgeft.errors import DataError, GoalMissed, ModelError, RecipeError, RunDirError
from edgeft.evaluate import SplitEvaluator, StepResult, compare
from edgeft.layout import SIDE_FILE, write_side_file
from edgeft.progress import say
from edgeft.recipe import CompressConfig, Recipe

SCHEMA = "edgeft.compress/1"
PRUNED, ONNX_FP32, OPTIMIZED, INT8 = "pruned", "onnx/model.onnx", "optimized/model.onnx", "int8/model.onnx"


def _read_meta(model_dir: Path, dataset: Dataset, default_max_length: int) -> dict:
    from edgeft.layout import read_side_file

    meta = read_side_file(model_dir)  # {} without edgeft.json; one-line ModelError when it is not JSON
    max_length = int(meta.get("max_length") or default_max_length)
    label_names = meta.get("label_names") or dataset.label_names
    if list(label_names) != list(dataset.label_names):
        raise DataError(f"the model was fine-tuned for labels {label_names}, the data has {dataset.label_names}",
                        "compress with the recipe (data section) the model was fine-tuned with")
    return {"max_length": max_length, "label_names": list(label_names)}


# ---------------------------------------------------------------- pre-flight


def _preflight(model, cfg: CompressConfig, dataset: Dataset) -> None:
    """Refuse bad settings before any work (exit 2, nothing written)."""
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
    """:func:`compress_model` with a whole recipe: its ``compress`` section, its seed, and
    ``finetune.max_length`` as the fallback for a model folder without ``edgeft.json`` (the length it
    was fine-tuned with). No other ``finetune`` setting reaches the compress stage."""
    return compress_model(model_dir, recipe.compress, dataset, out_dir, seed=recipe.seed,
                          default_max_length=recipe.finetune.max_length, show_progress=show_progress)


def compress_model(model_dir: Path, cfg: CompressConfig, dataset: Dataset, out_dir: Path, *, seed: int,
                   default_max_length: int, show_progress: bool = True) -> dict:
    """Run the compress steps ``cfg`` names on the fine-tuned ``model_dir`` into ``out_dir``.

    Returns the report (also written to ``out_dir/report.json``). Raises ``GoalMissed`` after
    everything is written when the accuracy goal is missed and ``cfg.allow_miss`` is off."""
    from edgeft.finetune import set_threads
    from edgeft.modeling import load_classifier, load_tokenizer
    from edgeft.safeio import check_hf_folder

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if out_dir.exists():
        raise RunDirError(f"{out_dir} already exists", "remove it or compress into a new run folder")
    check_hf_folder(model_dir)
    meta = _read_meta(model_dir, dataset, default_max_length)
    threads = set_threads(cfg.threads)
    model = load_classifier(str(model_dir))
    model.eval()
    _preflight(model, cfg, dataset)
    try:
        tokenizer = load_tokenizer(str(model_dir))
    except (TypeError, AttributeError, KeyError) as e:  # transformers raises these for mismatched files
        raise ModelError(f"cannot load the tokenizer in {model_dir} ({type(e).__name__})",
                         "save the model's own tokenizer into the folder (tokenizer.save_pretrained)") from None

    from edgeft.export import model_size_mb

    t_start = time.perf_counter()
    ev = SplitEvaluator(dataset, tokenizer, meta["max_length"], threads=threads)
    log = (lambda msg: say(msg, enabled=show_progress))
    log(f"[bold]compress[/] {model_dir} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params), "
        f"goal: <= {cfg.max_accuracy_drop:g} points validation accuracy drop, {threads} threads")

    steps: list[StepResult] = []
    artifacts: dict[str, str] = {}
    candidates: list[StepResult] = []  # ONNX models that could be "final", in order of expected speed (slowest first)

    def goal_fields(metrics: dict) -> dict:
        drop = (base_val - metrics["validation"]["accuracy"]) * 100
        test_drop = (base_test - metrics["test"]["accuracy"]) * 100
        return {"accuracy_drop_points": drop, "test_accuracy_drop_points": test_drop,
                "meets_goal": bool(drop <= cfg.max_accuracy_drop + 1e-9)}

    def record_onnx_step(step: StepResult, artifact: str, rel: str, t0: float) -> dict:
        """Goal fields, timing, and bookkeeping of an ONNX step; returns its logits (the next parent's)."""
        step.update(goal_fields(step.fields))
        step.update({"elapsed_s": time.perf_counter() - t0})
        steps.append(step)
        artifacts[artifact] = rel
        candidates.append(step)
        return step.logits

    with atomic_dir(out_dir) as tmp:
        # ------------------------------------------------ baseline: the fine-tuned fp32 model
        t0 = time.perf_counter()
        base_logits = ev.torch_logits(model)
        base_metrics = ev.metrics(base_logits)
        base_val, base_test = base_metrics["validation"]["accuracy"], base_metrics["test"]["accuracy"]
        steps.append(StepResult("finetuned", {
            "runtime": "torch-fp32", "path": str(model_dir), "params": int(sum(p.numel() for p in model.parameters())),
            "size_mb": model_size_mb(model_dir), **base_metrics, "elapsed_s": time.perf_counter() - t0},
            path=model_dir, logits=base_logits))
        log(f"  fine-tuned fp32: validation acc {base_val:.4f}, test acc {base_test:.4f}")
        parent_logits, float_model, float_dir = base_logits, model, model_dir

        # ------------------------------------------------ 1. structured pruning + recovery
        if cfg.prune is not None and (cfg.prune.heads > 0 or cfg.prune.ffn > 0):
            from edgeft.prune import prune_step

            float_model, pruned = prune_step(model_dir, model, tokenizer, cfg.prune, dataset, ev, tmp / PRUNED,
                                             max_length=meta["max_length"], seed=seed, report_path=PRUNED, log=log,
                                             show_progress=show_progress)
            pruned.update(compare(pruned.logits, parent_logits, float_step=False))
            pruned.update({"max_abs_logit_diff_vs_parent_note": "pruning changes the function; compare accuracy"})
            pruned.update(goal_fields(pruned.fields))
            steps.append(pruned)
            artifacts["pruned"] = PRUNED
            parent_logits, float_dir = pruned.logits, tmp / PRUNED
            log(f"  pruned: {pruned['params_before'] / 1e6:.1f}M -> {pruned['params'] / 1e6:.1f}M params, "
                f"validation acc {pruned['validation']['accuracy']:.4f} "
                f"(drop {pruned['accuracy_drop_points']:.2f} points), test acc {pruned['test']['accuracy']:.4f}")

        # ------------------------------------------------ 2. ONNX export
        from edgeft.export import export_onnx, optimize_onnx

        t0 = time.perf_counter()
        checks: dict = {}
        onnx_path = export_onnx(float_dir, (tmp / ONNX_FP32).parent, opset=cfg.export.opset, checks=checks)
        step = _onnx_step("export", onnx_path, tmp, ev, parent_logits, float_step=True, atol=cfg.export.atol,
                          extra={"opset": cfg.export.opset, "exporter": "optimum", "checker": checks,
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
            from edgeft.quantize import quantize_step

            t0 = time.perf_counter()
            # QDQ (static) cannot wrap ORT's fused contrib ops, so static starts from the plain export;
            # ORT fuses the QDQ graph when the session loads it.
            q_src = parent_path if cfg.quantize.mode == "dynamic" else onnx_path
            step = quantize_step(q_src, tmp, cfg.quantize, dataset, ev, parent_logits, seed=seed,
                                 max_length=meta["max_length"], goal_fields=goal_fields,
                                 parent_meets_goal=candidates[-1].meets_goal, dst_rel=INT8, log=log)
            step.update({"elapsed_s": time.perf_counter() - t0})
            steps.append(step)
            artifacts["onnx_int8"] = INT8
            candidates.append(step)

        # ------------------------------------------------ verdict
        chain_end = candidates[-1]
        goal_met = chain_end.meets_goal
        meeting = [c for c in candidates if c.meets_goal]
        if meeting:
            final = meeting[-1]  # the most compressed (fastest) one that meets the goal
        else:
            final = max(candidates, key=lambda c: (c.validation_accuracy, candidates.index(c)))
        report = {
            "schema": SCHEMA,
            "model_dir": str(model_dir),
            "max_length": meta["max_length"],
            "label_names": meta["label_names"],
            "goal": {"metric": "validation accuracy", "max_accuracy_drop_points": cfg.max_accuracy_drop,
                     "baseline_validation_accuracy": base_val, "baseline_test_accuracy": base_test},
            "goal_met": goal_met,
            "final": final["path"],
            "final_meets_goal": final.meets_goal,
            "artifacts": artifacts,
            "steps": [s.to_report() for s in steps],
            "cpu": cpu_info(),
            "threads": threads,
            "recipe": cfg.model_dump(mode="json"),
            "wall_s": time.perf_counter() - t_start,
        }
        report["verdict"] = _verdict(report, chain_end, final)
        for rel in artifacts.values():  # every artifact folder can be tokenized on its own
            folder = tmp / rel if not rel.endswith(".onnx") else (tmp / rel).parent
            if not (folder / SIDE_FILE).is_file():
                write_side_file(folder, max_length=meta["max_length"], label_names=meta["label_names"])
        write_json_atomic(tmp / "report.json", report)

    if not goal_met and not cfg.allow_miss:
        err = GoalMissed(report["verdict"], "lower the compression (prune targets, quantize.sensitivity_budget), "
                         "raise compress.max_accuracy_drop, or pass --allow-miss to accept the best candidate")
        err.report = report  # complete and written: the CLI renders it before the one-line error
        raise err
    return report


def _fmt_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "none"


def _verdict(report: dict, chain_end: StepResult, final: StepResult) -> str:
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


def _onnx_step(name: str, path: Path, root: Path, ev: SplitEvaluator, parent_logits: dict, *, float_step: bool,
               atol: float | None, extra: dict) -> StepResult:
    logits = ev.onnx_logits(path)
    metrics = ev.metrics(logits)
    cmp = compare(logits, parent_logits, float_step=float_step)
    if float_step and atol is not None and cmp["max_abs_logit_diff_vs_parent"] > atol:
        raise ModelError(f"{name}: ONNX logits differ from the parent model by "
                         f"{cmp['max_abs_logit_diff_vs_parent']:.2e} (> compress.export.atol {atol:g})",
                         "report this model; raise compress.export.atol only if the accuracy is unchanged")
    from edgeft.export import model_size_mb, onnx_param_count, op_counts

    fields = {"runtime": "onnxruntime-cpu", "path": str(path.relative_to(root)), "size_mb": model_size_mb(path),
              "params": onnx_param_count(path), "op_counts": op_counts(path), **extra, **metrics, **cmp}
    return StepResult(name, fields, path=path, logits=logits)
