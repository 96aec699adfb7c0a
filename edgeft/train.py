"""One training loop for fine-tuning and for recovery after pruning (with distillation).

AdamW with linear warm-up and decay, seeded, dynamic padding up to ``max_length``,
evaluation on the validation split each epoch, best checkpoint (validation
accuracy, then macro-F1) kept in memory and restored at the end.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from edgeft.data import Split
from edgeft.evaluate import pad_batch, tokenize
from edgeft.metrics import classification_metrics
from edgeft.progress import bar


@dataclass
class TrainSettings:
    epochs: float = 2.0
    lr: float = 5e-5
    batch_size: int = 32
    eval_batch_size: int = 128
    max_length: int = 64
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 42
    # Distillation (recovery after pruning): loss = (1-a)*CE + a*T^2*KL(student/T || teacher/T)
    distill_alpha: float = 0.0
    temperature: float = 2.0


@dataclass
class TrainResult:
    epochs: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_validation: dict = field(default_factory=dict)
    train_seconds: float = 0.0
    train_samples_per_s: float = 0.0


def collate(features: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence in the batch (dynamic padding), as torch tensors."""
    return {k: torch.from_numpy(v) for k, v in pad_batch(features, pad_id).items()}


@torch.inference_mode()
def predict_logits(model, tokenizer, texts: list[str], *, max_length: int, batch_size: int = 128,
                   show_progress: bool = False, label: str = "evaluate") -> np.ndarray:
    """Logits for ``texts``. Batches are formed over length-sorted texts (less padding), and
    results are put back in the original order."""
    from edgeft.evaluate import predict_batched

    model.eval()

    def run_batch(batch: dict[str, np.ndarray]) -> np.ndarray:
        return model(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits.float().numpy()

    with bar(label, math.ceil(len(texts) / batch_size), enabled=show_progress) as b:
        return predict_batched(run_batch, tokenizer, texts, max_length=max_length, batch_size=batch_size,
                               num_outputs=model.config.num_labels, on_batch=b.advance)


def evaluate(model, tokenizer, split: Split, label_names: list[str], *, max_length: int,
             batch_size: int = 128, show_progress: bool = False) -> dict:
    logits = predict_logits(model, tokenizer, split.texts, max_length=max_length, batch_size=batch_size,
                            show_progress=show_progress)
    return classification_metrics(split.labels, logits.argmax(-1), label_names)


def _param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in name or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train_classifier(model, tokenizer, train: Split, validation: Split, label_names: list[str],
                     settings: TrainSettings, *, teacher=None, show_progress: bool = True,
                     label: str = "fine-tune") -> TrainResult:
    """Train ``model`` in place; on return it holds the best-validation weights."""
    from transformers import get_linear_schedule_with_warmup

    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    feats = tokenize(tokenizer, train.texts, settings.max_length)
    labels = np.asarray(train.labels)
    pad_id = tokenizer.pad_token_id or 0
    steps_per_epoch = math.ceil(len(feats) / settings.batch_size)
    total_steps = max(1, math.ceil(settings.epochs * steps_per_epoch))
    optimizer = torch.optim.AdamW(_param_groups(model, settings.weight_decay), lr=settings.lr)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(settings.warmup_ratio * total_steps), total_steps)
    if teacher is not None:
        teacher.eval()

    result = TrainResult()
    best_key, best_state = None, None
    step, epoch, seen, t_train = 0, 0, 0, 0.0
    while step < total_steps:
        epoch += 1
        model.train()
        perm = rng.permutation(len(feats))
        n_this = min(steps_per_epoch, total_steps - step)
        t0, losses, epoch_samples = time.perf_counter(), [], 0
        with bar(f"{label} epoch {epoch}", n_this, enabled=show_progress) as b:
            for i in range(n_this):
                idx = perm[i * settings.batch_size:(i + 1) * settings.batch_size]
                batch = collate([feats[j] for j in idx], pad_id)
                y = torch.as_tensor(labels[idx])
                logits = model(**batch).logits
                loss = F.cross_entropy(logits, y)
                if teacher is not None and settings.distill_alpha > 0:
                    with torch.no_grad():
                        t_logits = teacher(**batch).logits
                    T = settings.temperature
                    kd = F.kl_div(F.log_softmax(logits / T, -1), F.log_softmax(t_logits / T, -1),
                                  log_target=True, reduction="batchmean") * T * T
                    loss = (1 - settings.distill_alpha) * loss + settings.distill_alpha * kd
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                epoch_samples += len(idx)
                losses.append(loss.item())
                elapsed = time.perf_counter() - t0
                b.advance(loss=float(np.mean(losses[-50:])), samples_per_s=epoch_samples / max(elapsed, 1e-9))
        epoch_s = time.perf_counter() - t0
        t_train += epoch_s
        seen += epoch_samples
        val = evaluate(model, tokenizer, validation, label_names, max_length=settings.max_length,
                       batch_size=settings.eval_batch_size)
        record = {"epoch": epoch, "steps": n_this, "train_loss": float(np.mean(losses)),
                  "train_s": epoch_s, "train_samples_per_s": epoch_samples / epoch_s,
                  "validation_accuracy": val["accuracy"], "validation_macro_f1": val["macro_f1"]}
        result.epochs.append(record)
        if show_progress:
            from edgeft.progress import say
            say(f"  epoch {epoch}: loss {record['train_loss']:.4f}  val acc {val['accuracy']:.4f}  "
                f"val macro-F1 {val['macro_f1']:.4f}  {epoch_s:.0f}s ({record['train_samples_per_s']:.1f} samples/s)")
        key = (val["accuracy"], val["macro_f1"])
        if best_key is None or key > best_key:
            best_key = key
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            result.best_epoch, result.best_validation = epoch, val
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    result.train_seconds = t_train
    result.train_samples_per_s = seen / t_train if t_train else 0.0
    return result
