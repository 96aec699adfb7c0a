"""Fine-tune stage: a pretrained transformer on a labelled text dataset (full or LoRA).

Writes ``RUN_DIR/finetuned/`` (safetensors, tokenizer, config with id2label) and
``RUN_DIR/metrics.json``.
"""

from __future__ import annotations

import time
from pathlib import Path

from edgeft.artifacts import atomic_dir, write_json_atomic
from edgeft.data import Dataset
from edgeft.layout import FINETUNED, RunLayout, write_side_file
from edgeft.progress import say
from edgeft.recipe import Recipe

__all__ = ["FINETUNED", "apply_lora", "finetune", "set_threads"]


def set_threads(threads: int | None) -> int:
    import torch

    from edgeft.hardware import usable_cores

    n = threads or usable_cores()
    torch.set_num_threads(n)
    return n


def apply_lora(model, cfg):
    """Wrap ``model`` with LoRA adapters; the classification head is trained in full."""
    from peft import LoraConfig, TaskType, get_peft_model

    names = {n.split(".")[-1] for n, _ in model.named_modules()}
    missing = [m for m in cfg.target_modules if m not in names]
    if missing:
        from edgeft.errors import RecipeError
        raise RecipeError(f"finetune.lora.target_modules: {missing} not found in the model",
                          f"use module names of this model, e.g. {sorted(n for n in names if n)[:8]}")
    lora = LoraConfig(task_type=TaskType.SEQ_CLS, r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=list(cfg.target_modules))
    return get_peft_model(model, lora)


def finetune(recipe: Recipe, dataset: Dataset, run_dir: str | Path, *, show_progress: bool = True) -> dict:
    """Fine-tune ``recipe.model`` on ``dataset``; save the best-validation model and metrics."""
    import torch

    from edgeft.modeling import load_classifier, load_tokenizer
    from edgeft.train import TrainSettings, evaluate, train_classifier

    run_dir = Path(run_dir)
    layout = RunLayout(run_dir)
    cfg = recipe.finetune
    threads = set_threads(cfg.threads)
    torch.manual_seed(recipe.seed)
    t_start = time.perf_counter()
    tokenizer = load_tokenizer(recipe.model.name, revision=recipe.model.revision,
                               trust_remote_code=recipe.model.trust_remote_code)
    model = load_classifier(recipe.model.name, dataset.label_names, revision=recipe.model.revision,
                            trust_remote_code=recipe.model.trust_remote_code)
    n_params = sum(p.numel() for p in model.parameters())
    if cfg.method == "lora":
        model = apply_lora(model, cfg.lora)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    say(f"[bold]fine-tune[/] {recipe.model.name} ({n_params / 1e6:.1f}M params, {cfg.method}, "
        f"{n_trainable / 1e6:.2f}M trainable) on {dataset.name}: {len(dataset.train)} train / "
        f"{len(dataset.validation)} validation / {len(dataset.test)} test, {threads} threads", enabled=show_progress)
    if dataset.dropped_text():
        say(f"  data: {dataset.dropped_text()} before splitting (counts in metrics.json data)", enabled=show_progress)
    if dataset.cut_text():
        say(f"  data: {dataset.cut_text()} (count in metrics.json data)", enabled=show_progress)

    settings = TrainSettings(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                             eval_batch_size=cfg.eval_batch_size, max_length=cfg.max_length,
                             warmup_ratio=cfg.warmup_ratio, weight_decay=cfg.weight_decay,
                             grad_clip=cfg.grad_clip, seed=recipe.seed)
    result = train_classifier(model, tokenizer, dataset.train, dataset.validation, dataset.label_names, settings,
                              show_progress=show_progress, label=f"fine-tune ({cfg.method})")
    if cfg.method == "lora":
        # Merge adapters so every later stage sees a plain transformers model.
        model = model.merge_and_unload()
    test = evaluate(model, tokenizer, dataset.test, dataset.label_names, max_length=cfg.max_length,
                    batch_size=cfg.eval_batch_size)
    validation = result.best_validation

    with atomic_dir(layout.finetuned) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_side_file(tmp, max_length=cfg.max_length, label_names=dataset.label_names,
                        base_model=recipe.model.name, method=cfg.method)

    metrics = {
        "stage": "finetune",
        "model": recipe.model.name,
        "method": cfg.method,
        "params": n_params,
        "trainable_params": n_trainable,
        "threads": threads,
        "best_epoch": result.best_epoch,
        "epochs": result.epochs,
        "validation": validation,
        "test": test,
        "majority_class": {"validation": dataset.majority_class_accuracy("validation"),
                           "test": dataset.majority_class_accuracy("test")},
        "train_samples_per_s": result.train_samples_per_s,
        "train_s": result.train_seconds,
        "wall_s": time.perf_counter() - t_start,
        "data": dataset.summary(),
    }
    write_json_atomic(layout.metrics, metrics)
    say(f"  test accuracy {test['accuracy']:.4f} (majority class {metrics['majority_class']['test']:.4f}), "
        f"macro-F1 {test['macro_f1']:.4f}; best epoch {result.best_epoch}; saved {layout.finetuned}",
        enabled=show_progress)
    return metrics
