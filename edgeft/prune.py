"""Structured pruning: remove attention heads and FFN neurons so the Linear layers really shrink.

Importance is first-order Taylor (Michel et al. 2019 for heads; the same for FFN
neurons): a mask of ones is multiplied into each head's context vector and each
FFN neuron's activation, and ``|d loss / d mask|`` is summed over batches of
training data. The least important heads/neurons of every layer are removed,
the same number in each layer: the ONNX attention fusion and the reload of the
FFN size (``config.intermediate_size``) both want uniform layers.

Heads go through transformers' ``prune_heads`` (recorded in
``config.pruned_heads``, re-applied on ``from_pretrained``); FFN neurons are cut
from ``intermediate.dense`` / ``output.dense`` and the new width is written to
the config, so ``save_pretrained`` + ``load_classifier`` reload the pruned model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from edgeft.data import Split
from edgeft.errors import ModelError, RecipeError


@dataclass(frozen=True)
class _Arch:
    """Where an architecture keeps its layers (attribute paths relative to the base model)."""

    layers: str           # base model -> list of layers
    attn: str             # layer -> module with prune_heads()
    attn_out: str         # layer -> Linear taking the concatenated heads
    ffn_in: str           # layer -> FFN up-projection
    ffn_out: str          # layer -> FFN down-projection
    num_heads: str        # attn module attribute holding its current head count
    ffn_config_key: str   # config field holding the FFN width


_BERT = _Arch("encoder.layer", "attention", "attention.output.dense", "intermediate.dense", "output.dense",
              "self.num_attention_heads", "intermediate_size")
_DISTILBERT = _Arch("transformer.layer", "attention", "attention.out_lin", "ffn.lin1", "ffn.lin2",
                    "n_heads", "hidden_dim")
ARCHITECTURES = {"bert": _BERT, "roberta": _BERT, "xlm-roberta": _BERT, "distilbert": _DISTILBERT}
SUPPORTED = "BERT-family (bert incl. MiniLM, roberta, xlm-roberta) and distilbert"


@dataclass(frozen=True)
class PrunePlan:
    """What to remove. Head indices are positions among the layer's *current* heads;
    ``ffn_keep`` lists the FFN neurons to keep per layer (same count in every layer)."""

    heads: dict[int, list[int]] = field(default_factory=dict)
    ffn_keep: dict[int, list[int]] = field(default_factory=dict)

    def summary(self) -> dict:
        return {"heads_removed": {str(k): sorted(v) for k, v in self.heads.items()},
                "ffn_kept_per_layer": {str(k): len(v) for k, v in self.ffn_keep.items()}}


@dataclass
class Importance:
    heads: list[np.ndarray]   # per layer, one score per current head
    ffn: list[np.ndarray]     # per layer, one score per FFN neuron
    samples: int = 0


def _get(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def arch_of(model) -> _Arch:
    model_type = getattr(model.config, "model_type", "?")
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        raise ModelError(f"the pruner does not support model type '{model_type}'",
                         f"use a {SUPPORTED} model, or set compress.prune: null to skip pruning")
    try:
        _get(model.base_model, arch.layers)
    except AttributeError:
        raise ModelError(f"model type '{model_type}' does not have the expected layer structure",
                         "set compress.prune: null to skip pruning") from None
    return arch


def layers_of(model) -> list:
    return list(_get(model.base_model, arch_of(model).layers))


def head_counts(model) -> list[int]:
    arch = arch_of(model)
    return [int(_get(_get(layer, arch.attn), arch.num_heads)) for layer in layers_of(model)]


def ffn_sizes(model) -> list[int]:
    arch = arch_of(model)
    return [int(_get(layer, arch.ffn_in).out_features) for layer in layers_of(model)]


def count_parameters(model) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def importance(model, tokenizer, split: Split, *, max_length: int, samples: int = 512, batch_size: int = 32,
               seed: int = 42) -> Importance:
    """Taylor importance of every head and FFN neuron, from the loss on ``samples`` examples of ``split``."""
    from edgeft.train import collate, tokenize

    arch = arch_of(model)
    layers = layers_of(model)
    heads = head_counts(model)
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(split))[:samples]
    feats = tokenize(tokenizer, [split.texts[i] for i in idx], max_length)
    labels = np.asarray(split.labels)[idx]
    pad_id = tokenizer.pad_token_id or 0

    head_masks = [torch.ones(h, requires_grad=True) for h in heads]
    ffn_masks = [torch.ones(_get(layer, arch.ffn_in).out_features, requires_grad=True) for layer in layers]
    head_scores = [torch.zeros(h) for h in heads]
    ffn_scores = [torch.zeros(m.numel()) for m in ffn_masks]

    def head_hook(mask, n_heads):
        def hook(_module, args):
            x = args[0]
            shape = x.shape
            return (x.view(*shape[:-1], n_heads, -1).mul(mask.view(n_heads, 1)).view(shape),) + tuple(args[1:])
        return hook

    def ffn_hook(mask):
        def hook(_module, args):
            return (args[0] * mask,) + tuple(args[1:])
        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(_get(layer, arch.attn_out).register_forward_pre_hook(head_hook(head_masks[i], heads[i])))
        handles.append(_get(layer, arch.ffn_out).register_forward_pre_hook(ffn_hook(ffn_masks[i])))
    was_training = model.training
    model.eval()  # no dropout: scores must not depend on noise
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)  # gradients only for the masks: less memory, faster
    try:
        for start in range(0, len(feats), batch_size):
            batch = collate(feats[start:start + batch_size], pad_id)
            y = torch.as_tensor(labels[start:start + batch_size])
            loss = F.cross_entropy(model(**batch).logits, y)
            masks = head_masks + ffn_masks
            grads = torch.autograd.grad(loss, masks)
            for i in range(len(layers)):
                head_scores[i] += grads[i].abs()
                ffn_scores[i] += grads[len(layers) + i].abs()
    finally:
        for h in handles:
            h.remove()
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
        model.train(was_training)
    return Importance([s.numpy() for s in head_scores], [s.numpy() for s in ffn_scores], samples=len(feats))


def head_importance(model, tokenizer, split: Split, *, max_length: int, samples: int = 512) -> list[np.ndarray]:
    """Per layer, the Taylor importance of each attention head (Michel et al. 2019)."""
    return importance(model, tokenizer, split, max_length=max_length, samples=samples).heads


def ffn_importance(model, tokenizer, split: Split, *, max_length: int, samples: int = 512) -> list[np.ndarray]:
    """Per layer, the Taylor importance of each FFN intermediate neuron."""
    return importance(model, tokenizer, split, max_length=max_length, samples=samples).ffn


def heads_to_remove(n_heads: int, fraction: float) -> int:
    return int(round(n_heads * fraction))


def make_plan(imp: Importance, *, heads: float, ffn: float) -> PrunePlan:
    """Remove the ``heads`` / ``ffn`` fraction with the lowest importance, the same count in every layer."""
    if not 0 <= heads < 1 or not 0 <= ffn < 1:
        raise RecipeError("compress.prune.heads and compress.prune.ffn must be in [0, 1)",
                          "use e.g. heads: 0.33, ffn: 0.5")
    head_plan: dict[int, list[int]] = {}
    for layer, scores in enumerate(imp.heads):
        n = heads_to_remove(len(scores), heads)
        if n >= len(scores):
            raise RecipeError(f"compress.prune.heads={heads} would remove all {len(scores)} heads of layer {layer}",
                              f"use a fraction below {(len(scores) - 0.5) / len(scores):.2f}; every layer keeps a head")
        if n:
            head_plan[layer] = sorted(int(h) for h in np.argsort(scores, kind="stable")[:n])
    ffn_plan: dict[int, list[int]] = {}
    for layer, scores in enumerate(imp.ffn):
        keep = max(1, len(scores) - int(round(len(scores) * ffn)))
        if keep < len(scores):
            ffn_plan[layer] = sorted(int(i) for i in np.argsort(-scores, kind="stable")[:keep])
    if ffn_plan and len({len(v) for v in ffn_plan.values()}) != 1 or (ffn_plan and len(ffn_plan) != len(imp.ffn)):
        raise ModelError("FFN layers of different widths cannot be pruned to one reloadable size",
                         "set compress.prune.ffn: 0")
    return PrunePlan(head_plan, ffn_plan)


def _prune_linear(layer: torch.nn.Linear, index: torch.Tensor, dim: int) -> torch.nn.Linear:
    from transformers.pytorch_utils import prune_linear_layer

    return prune_linear_layer(layer, index, dim=dim)


def _set(obj, path: str, value) -> None:
    *parents, last = path.split(".")
    for part in parents:
        obj = getattr(obj, part)
    setattr(obj, last, value)


def prune(model, plan: PrunePlan):
    """Apply ``plan`` to ``model`` in place (and return it). The config is updated so that
    ``save_pretrained`` + ``from_pretrained`` rebuild the same shapes."""
    arch = arch_of(model)
    layers = layers_of(model)
    counts = head_counts(model)
    # transformers' prune_heads takes head ids of the *original* model (already-pruned ones removed).
    original_heads = int(getattr(model.config, "num_attention_heads", getattr(model.config, "n_heads", 0)))
    already = {int(k): set(v) for k, v in (model.config.pruned_heads or {}).items()}
    to_prune: dict[int, list[int]] = {}
    for layer, positions in plan.heads.items():
        if not 0 <= layer < len(layers):
            raise ModelError(f"prune plan names layer {layer}; the model has {len(layers)}", "rebuild the plan")
        if len(set(positions)) >= counts[layer]:
            raise RecipeError(f"pruning would remove every head of layer {layer}", "keep at least one head per layer")
        kept_ids = [h for h in range(original_heads) if h not in already.get(layer, set())]
        to_prune[layer] = [kept_ids[p] for p in positions]
    if to_prune:
        model.prune_heads(to_prune)
    if plan.ffn_keep:
        sizes = {len(v) for v in plan.ffn_keep.values()}
        if len(sizes) != 1 or len(plan.ffn_keep) != len(layers):
            raise ModelError("FFN pruning must keep the same number of neurons in every layer",
                             "build the plan with make_plan()")
        for layer, keep in plan.ffn_keep.items():
            index = torch.as_tensor(sorted(keep), dtype=torch.long)
            mod = layers[layer]
            _set(mod, arch.ffn_in, _prune_linear(_get(mod, arch.ffn_in), index, dim=0))
            _set(mod, arch.ffn_out, _prune_linear(_get(mod, arch.ffn_out), index, dim=1))
        setattr(model.config, arch.ffn_config_key, sizes.pop())
    return model


def shape_summary(before_heads: list[int], after_heads: list[int], before_ffn: list[int],
                  after_ffn: list[int]) -> dict:
    return {"heads_before": before_heads, "heads_after": after_heads,
            "ffn_before": before_ffn, "ffn_after": after_ffn,
            "heads_removed_fraction": 1 - sum(after_heads) / max(1, sum(before_heads)),
            "ffn_removed_fraction": 1 - sum(after_ffn) / max(1, sum(before_ffn))}


def prune_step(model_dir, teacher, tokenizer, cfg, dataset, evaluator, out, *, max_length: int, seed: int,
               report_path: str = "pruned", log=None, show_progress: bool = False):
    """The compress stage's prune step: importance on the training split, prune to ``cfg`` (a
    ``PruneConfig``) targets, recovery fine-tune distilled from ``teacher`` with ``cfg.recovery``'s own
    settings, save to ``out`` and check it reloads to the same function.

    Returns ``(student, StepResult)``; the result holds the validation/test metrics and logits of the
    pruned model (comparison with the parent and the goal fields are the caller's)."""
    import shutil
    import time
    from pathlib import Path

    from edgeft.evaluate import StepResult
    from edgeft.export import copy_side_files, model_size_mb
    from edgeft.modeling import load_classifier
    from edgeft.train import TrainSettings, predict_logits, train_classifier

    log = log or (lambda _msg: None)
    model_dir, out = Path(model_dir), Path(out)
    t0 = time.perf_counter()
    student = load_classifier(str(model_dir))
    heads_before, ffn_before, params_before = head_counts(student), ffn_sizes(student), count_parameters(student)
    n_imp = min(cfg.importance_samples, len(dataset.train))
    imp = importance(student, tokenizer, dataset.train, max_length=max_length, samples=n_imp,
                     batch_size=cfg.importance_batch_size, seed=seed)
    plan = make_plan(imp, heads=cfg.heads, ffn=cfg.ffn)
    prune(student, plan)
    t_imp = time.perf_counter() - t0
    before_recovery = evaluator.metrics(evaluator.torch_logits(student, ("validation",)))["validation"]
    log(f"  pruned {shape_summary(heads_before, head_counts(student), ffn_before, ffn_sizes(student))['heads_after']} "
        f"heads, FFN {ffn_before[0]} -> {ffn_sizes(student)[0]}; validation acc before recovery "
        f"{before_recovery['accuracy']:.4f}")
    rc = cfg.recovery
    recovery = {"epochs": rc.epochs}
    if rc.epochs > 0:
        settings = TrainSettings(epochs=rc.epochs, lr=rc.lr, batch_size=rc.batch_size, max_length=max_length,
                                 warmup_ratio=rc.warmup_ratio, weight_decay=rc.weight_decay, grad_clip=rc.grad_clip,
                                 seed=seed, distill_alpha=rc.distill_alpha, temperature=rc.temperature)
        result = train_classifier(student, tokenizer, dataset.train, dataset.validation, dataset.label_names,
                                  settings, teacher=teacher, show_progress=show_progress, label="recovery")
        recovery.update({"lr": rc.lr, "batch_size": rc.batch_size, "warmup_ratio": rc.warmup_ratio,
                         "weight_decay": rc.weight_decay, "grad_clip": rc.grad_clip,
                         "distill_alpha": rc.distill_alpha, "temperature": rc.temperature,
                         "best_epoch": result.best_epoch, "history": result.epochs,
                         "train_s": result.train_seconds})
    student.eval()
    student.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    copy_side_files(model_dir, out / ".side")
    for f in (out / ".side").iterdir():  # only what save_pretrained did not write (edgeft.json, ...)
        if not (out / f.name).exists():
            f.replace(out / f.name)
    shutil.rmtree(out / ".side")
    # The pruned folder must reload to the same function (pruned_heads + FFN width in config.json).
    reloaded = load_classifier(str(out))
    probe = dataset.validation.texts[:16]
    a = predict_logits(student, tokenizer, probe, max_length=max_length)
    b = predict_logits(reloaded, tokenizer, probe, max_length=max_length)
    reload_diff = float(np.abs(a - b).max()) if len(probe) else 0.0
    if reload_diff > 1e-4:
        raise ModelError(f"the pruned model does not reload identically (max |diff| {reload_diff:.2e})",
                         "report this; set compress.prune: null meanwhile")
    logits = evaluator.torch_logits(student)
    fields = {"runtime": "torch-fp32", "path": report_path, "method": "taylor-importance, uniform per layer",
              "targets": {"heads": cfg.heads, "ffn": cfg.ffn}, "importance_samples": imp.samples,
              "importance_batch_size": cfg.importance_batch_size,
              "plan": plan.summary(), "shapes": shape_summary(heads_before, head_counts(student), ffn_before,
                                                              ffn_sizes(student)),
              "params_before": params_before, "params": count_parameters(student), "size_mb": model_size_mb(out),
              "validation_before_recovery": before_recovery, "recovery": recovery,
              "reload_max_abs_diff": reload_diff, "elapsed_s": time.perf_counter() - t0,
              "importance_s": t_imp, **evaluator.metrics(logits)}
    return student, StepResult("prune", fields, path=out, logits=logits)
