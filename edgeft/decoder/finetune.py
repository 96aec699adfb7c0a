"""Fine-tune a causal LM on fixed-length token blocks: full, LoRA, AdaLoRA, IA3 or prefix tuning.

:func:`finetune_decoder` trains with the causal-LM loss (AdamW, linear warm-up and decay, seeded),
scores validation perplexity (:mod:`edgeft.decoder.evaluate`) before training and after every epoch,
and stops at ``max_steps`` or the wall-clock budget ``max_minutes``, whichever comes first. The
output folder is built aside and renamed into place when whole (nothing is left on an error or
Ctrl-C)::

    OUT/
      config.json, generation_config.json, model.safetensors   the model, safetensors only
      tokenizer files                                           copied from the model folder
      metrics.json                                              method, parameters, per-epoch validation
                                                                perplexity, tokens/s, wall seconds
      finetune-config.json                                      the config of the run
      generations.json                                          greedy continuations of fixed prompts,
                                                                before vs after
      prefix.safetensors                                        prefix tuning only (see below)

LoRA, AdaLoRA and IA3 adapters are merged into the base (``merge_and_unload``) after checking that
the merged model's logits equal the unmerged PEFT model's on a probe batch (max abs diff < 1e-3), so
the folder is a plain Hugging Face model that :func:`edgeft.decoder.export.export_decoder` takes.

Prefix tuning cannot be merged: the folder holds the *unchanged* base model plus
``prefix.safetensors``, the learned key/value states of the virtual tokens per layer
(``layers.{i}.key`` / ``layers.{i}.value``, each ``[kv_heads, virtual_tokens, head_dim]``) with its
shape in the file's metadata. :func:`prefix_past_key_values` / :func:`prefix_cache` turn it into the
``past_key_values`` to feed the base model; the real tokens' position ids then start at
``virtual_tokens`` and the attention mask covers ``virtual_tokens + length`` positions. An export of
such a folder is the base model: the caller feeds the prefix as the first past (the issue measured a
max logit diff of 2e-3 in ONNX that way).

Every bad input (an empty train split, a block longer than the model's context, an unknown method, a
model folder without a tokenizer, ...) is a one-line :class:`edgeft.errors.EdgeftError` raised
before anything is written.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, ValidationError, model_validator

from edgeft.errors import DataError, ModelError, RecipeError, RunDirError
from edgeft.recipe import _Strict

METHODS = ("full", "lora", "adalora", "ia3", "prefix")
MERGED_METHODS = ("lora", "adalora", "ia3")
METRICS_NAME = "metrics.json"
CONFIG_NAME = "finetune-config.json"
GENERATIONS_NAME = "generations.json"
PREFIX_NAME = "prefix.safetensors"
PREFIX_SCHEMA = "edgeft.decoder-prefix/1"
METRICS_SCHEMA = "edgeft.decoder-finetune/1"
MERGE_ATOL = 1e-3
# Files of a tokenizer that are copied verbatim into the output folder (when present).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model",
                   "chat_template.jinja", "chat_template.json")
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
# Learning rates per method when ``lr`` is not given (picked on SmolLM2 + shakespeare's validation split).
DEFAULT_LR = {"full": 5e-5, "lora": 1e-3, "adalora": 2e-3, "ia3": 5e-3, "prefix": 1e-2}


# ---------------------------------------------------------------- config

class DecoderLoraSettings(_Strict):
    r: int = Field(16, gt=0, le=256)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ATTENTION + MLP, min_length=1,
                                      description="module names (Llama-family names by default)")


class DecoderAdaLoraSettings(_Strict):
    init_r: int = Field(12, gt=0, le=256, description="rank every module starts with")
    target_r: int = Field(8, gt=0, le=256, description="average rank AdaLoRA prunes to")
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ATTENTION + MLP, min_length=1)
    tinit: float = Field(0.1, ge=0, lt=1, description="fraction of the planned steps before rank pruning starts")
    tfinal: float = Field(0.2, ge=0, lt=1, description="fraction of the planned steps at the end with ranks fixed")
    delta_t: int = Field(10, gt=0, description="steps between two rank re-allocations")
    orth_reg_weight: float = Field(0.5, ge=0)

    @model_validator(mode="after")
    def _check(self):
        if self.target_r > self.init_r:
            raise ValueError(f"adalora: target_r ({self.target_r}) must be <= init_r ({self.init_r})")
        if self.tinit + self.tfinal >= 1:
            raise ValueError("adalora: tinit + tfinal must be < 1 (a rank-budgeting phase must remain)")
        return self


class DecoderIA3Settings(_Strict):
    target_modules: list[str] = Field(default_factory=lambda: ["k_proj", "v_proj", "down_proj"], min_length=1)
    feedforward_modules: list[str] = Field(default_factory=lambda: ["down_proj"],
                                           description="those of target_modules whose input (not output) is scaled")

    @model_validator(mode="after")
    def _check(self):
        extra = [m for m in self.feedforward_modules if m not in self.target_modules]
        if extra:
            raise ValueError(f"ia3: feedforward_modules {extra} are not in target_modules")
        return self


class DecoderPrefixSettings(_Strict):
    num_virtual_tokens: int = Field(16, gt=0, le=512)
    projection: bool = Field(False, description="train the prefix through an MLP (prefix_projection)")


class DecoderFinetuneConfig(_Strict):
    """How to fine-tune a decoder (a recipe section: unknown keys and wrong types are errors)."""

    method: Literal["full", "lora", "adalora", "ia3", "prefix"] = "lora"
    lr: float | None = Field(None, gt=0, lt=1, description="AdamW learning rate; default per method "
                             + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()))
    epochs: int = Field(1, gt=0, le=100)
    batch_size: int = Field(8, gt=0, le=1024, description="token blocks per step")
    block_size: int = Field(128, ge=2, le=32768, description="tokens per training/validation block")
    max_steps: int | None = Field(None, gt=0, description="stop after this many optimizer steps")
    max_minutes: float | None = Field(12.0, gt=0, description="wall-clock budget: no training step starts after "
                                      "this many minutes from the start (final evaluation and saving follow)")
    max_train_blocks: int | None = Field(None, gt=0, description="use at most this many train blocks")
    max_eval_blocks: int | None = Field(32, gt=0, description="validation blocks scored per evaluation")
    eval_batch_size: int = Field(8, gt=0, le=1024)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0, lt=1)
    grad_clip: float = Field(1.0, gt=0)
    seed: int = Field(42, ge=0, le=2**32 - 1)
    threads: int | None = Field(None, gt=0, description="torch intra-op threads; default: all usable cores")
    prompts: list[str] | None = Field(None, description="prompts for the before/after greedy continuations; "
                                      "default: edgeft.decoder.export.DEFAULT_PROMPTS")
    new_tokens: int = Field(32, gt=0, le=1024, description="greedy tokens generated per prompt")
    lora: DecoderLoraSettings = Field(default_factory=DecoderLoraSettings)
    adalora: DecoderAdaLoraSettings = Field(default_factory=DecoderAdaLoraSettings)
    ia3: DecoderIA3Settings = Field(default_factory=DecoderIA3Settings)
    prefix: DecoderPrefixSettings = Field(default_factory=DecoderPrefixSettings)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]


def _validation_message(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg, kind = first["msg"], first["type"]
    if kind == "extra_forbidden":
        msg = "unknown field"
    elif kind == "literal_error" and first["loc"] and first["loc"][-1] == "method":
        msg = f"unknown method {json.dumps(first.get('input'))[:40]}; use one of {', '.join(METHODS)}"
    elif msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    else:
        msg = msg.replace("Input should be", "must be")
    more = f" ({len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{'decoder finetune' + ('.' + loc if loc else '')}: {msg}{more}"


def decoder_finetune_config(cfg: DecoderFinetuneConfig | Mapping[str, Any] | None = None,
                            **overrides: Any) -> DecoderFinetuneConfig:
    """A checked config from a config, a mapping (e.g. a recipe section) or keyword fields; any
    invalid field (an unknown method, a negative lr, an unknown key) is a one-line RecipeError."""
    if isinstance(cfg, DecoderFinetuneConfig):
        data = cfg.model_dump()
    elif cfg is None:
        data = {}
    elif isinstance(cfg, Mapping):
        data = dict(cfg)
    else:
        raise RecipeError(f"decoder finetune config must be a mapping, got {type(cfg).__name__}",
                          "pass a DecoderFinetuneConfig or a dict of its fields")
    data.update(overrides)
    try:
        return DecoderFinetuneConfig.model_validate(data)
    except ValidationError as e:
        raise RecipeError(_validation_message(e), "see edgeft.decoder.finetune.DecoderFinetuneConfig") from None


# ---------------------------------------------------------------- result

@dataclass
class FinetuneResult:
    out_dir: Path
    method: str
    metrics: dict = field(default_factory=dict)

    @property
    def perplexity_before(self) -> float:
        return self.metrics["validation"]["before"]["perplexity"]

    @property
    def perplexity_after(self) -> float:
        return self.metrics["validation"]["after"]["perplexity"]


# ---------------------------------------------------------------- data

def _split_blocks(data, split: str, tokenizer, block_size: int, limit: int | None) -> np.ndarray:
    """Token blocks of ``split``: from a Corpus, or a mapping of split -> documents or -> blocks."""
    from edgeft.decoder.corpus import Corpus, token_blocks

    if isinstance(data, Corpus):
        items = data.split(split)
    elif isinstance(data, Mapping):
        if split not in data:
            raise DataError(f"the data has no {split} split (keys: {', '.join(map(str, data))[:80]})",
                            "pass a Corpus or a mapping with train and validation entries")
        items = data[split]
    else:
        raise DataError(f"the data must be a Corpus or a mapping of split -> documents or token blocks, "
                        f"got {type(data).__name__}", "pass edgeft.decoder.corpus.load_corpus(...)")
    if isinstance(items, np.ndarray) or (hasattr(items, "shape") and hasattr(items, "dtype")):
        blocks = np.asarray(items)
        if blocks.size == 0:
            raise DataError(f"the {split} split is empty (no token blocks)", "give it some text")
        if blocks.ndim != 2 or not np.issubdtype(blocks.dtype, np.integer):
            raise DataError(f"the {split} token blocks must be a 2-D integer array, got shape {list(blocks.shape)} "
                            f"of {blocks.dtype}", "pass edgeft.decoder.corpus.token_blocks(...)")
        if blocks.shape[1] != block_size:
            raise DataError(f"the {split} token blocks are {blocks.shape[1]} tokens long, the config's block_size "
                            f"is {block_size}", f"set block_size={blocks.shape[1]} or re-cut the blocks")
        blocks = blocks.astype(np.int64)
        return blocks[:limit] if limit is not None else blocks
    docs = [d for d in (items or []) if isinstance(d, str) and d.strip()]
    if not docs:
        raise DataError(f"the {split} split is empty (no text)", "give it at least one non-blank document")
    try:
        return token_blocks(tokenizer, docs, block_size, max_blocks=limit)
    except DataError as e:
        raise DataError(f"the {split} split: {e.problem}", e.fix) from None


# ---------------------------------------------------------------- PEFT

class BudgetSchedule:
    """Linear warm-up then linear decay (transformers' linear schedule) over the steps the run will really
    make: the planned steps, or under a wall-clock budget the steps that fit it, re-estimated after every
    step from the mean step time. Planned over the full epoch (1,174 steps), a 12-minute LoRA run on
    SmolLM2 spent half of its 117 steps in warm-up and ended at 95% of the peak learning rate."""

    def __init__(self, planned_steps: int, warmup_ratio: float, deadline: float):
        self.planned, self.warmup_ratio, self.deadline = planned_steps, warmup_ratio, deadline
        self.total = planned_steps
        self._first: tuple[int, float] | None = None  # (step, time) after the first step: its cost is not typical

    def observe(self, steps_done: int, now: float) -> None:
        if not math.isfinite(self.deadline):
            return
        if self._first is None:
            self._first = (steps_done, now)
            return
        per_step = (now - self._first[1]) / (steps_done - self._first[0])
        fit = steps_done + max(0, int((self.deadline - now) / per_step)) if per_step > 0 else self.planned
        self.total = max(steps_done, min(self.planned, fit))

    def factor(self, step: int) -> float:
        warmup = int(self.warmup_ratio * self.total)
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, (self.total - step) / max(1, self.total - warmup))


def _wrap(model, cfg: DecoderFinetuneConfig, total_steps: int):
    """``model`` wrapped for ``cfg.method`` (full: itself, every parameter trainable)."""
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import AdaLoraConfig, IA3Config, LoraConfig, PrefixTuningConfig, TaskType, get_peft_model

    names = {n.split(".")[-1] for n, _ in model.named_modules()}
    if cfg.method in ("lora", "adalora", "ia3"):
        targets = getattr(cfg, cfg.method).target_modules
        missing = [m for m in targets if m not in names]
        if missing:
            examples = sorted(n for n in names if n.endswith("proj"))[:8] or sorted(n for n in names if n)[:8]
            raise RecipeError(f"{cfg.method}.target_modules: {missing} not found in the model",
                              f"use module names of this model, e.g. {examples}")
    if cfg.method == "lora":
        s = cfg.lora
        peft_cfg = LoraConfig(task_type=TaskType.CAUSAL_LM, r=s.r, lora_alpha=s.alpha, lora_dropout=s.dropout,
                              target_modules=list(s.target_modules))
    elif cfg.method == "adalora":
        s = cfg.adalora
        tinit, tfinal = int(s.tinit * total_steps), int(s.tfinal * total_steps)
        if tinit >= total_steps - tfinal:  # few steps: keep a budgeting phase of at least one step
            tinit, tfinal = 0, 0
        peft_cfg = AdaLoraConfig(task_type=TaskType.CAUSAL_LM, init_r=s.init_r, target_r=s.target_r,
                                 lora_alpha=s.alpha, lora_dropout=s.dropout, target_modules=list(s.target_modules),
                                 total_step=max(1, total_steps), tinit=tinit, tfinal=tfinal,
                                 deltaT=s.delta_t, orth_reg_weight=s.orth_reg_weight)
    elif cfg.method == "ia3":
        s = cfg.ia3
        peft_cfg = IA3Config(task_type=TaskType.CAUSAL_LM, target_modules=list(s.target_modules),
                             feedforward_modules=list(s.feedforward_modules))
    else:
        s = cfg.prefix
        peft_cfg = PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=s.num_virtual_tokens,
                                      prefix_projection=s.projection)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return get_peft_model(model, peft_cfg)
    except (ValueError, TypeError, KeyError) as e:
        raise RecipeError(f"cannot apply {cfg.method} to this model: {' '.join(str(e).split())[:200]}",
                          "check the method's settings (target_modules, ...)") from None


def extract_prefix(peft_model) -> list[tuple[Any, Any]]:
    """The learned prefix of a PEFT prefix-tuning model: per layer ``(key, value)``, each
    ``[kv_heads, virtual_tokens, head_dim]`` (batch dimension dropped), detached float32."""
    import torch

    with torch.no_grad():
        past = peft_model.get_prompt(batch_size=1)
    if hasattr(past, "to_legacy_cache"):
        past = past.to_legacy_cache()
    elif hasattr(past, "layers"):
        past = [(layer.keys, layer.values) for layer in past.layers]
    return [(k[0].detach().float().clone().contiguous(), v[0].detach().float().clone().contiguous())
            for k, v in past]


def save_prefix(layers: list[tuple[Any, Any]], path: str | Path, *, extra: dict | None = None) -> Path:
    """Write a prefix (see :func:`extract_prefix`) as safetensors with its shape in the metadata."""
    from safetensors.torch import save_file

    k0 = layers[0][0]
    meta = {"schema": PREFIX_SCHEMA, "num_layers": str(len(layers)), "num_key_value_heads": str(k0.shape[0]),
            "num_virtual_tokens": str(k0.shape[1]), "head_dim": str(k0.shape[2]),
            "position_offset": str(k0.shape[1]), "layout": "layers.{i}.key/value: [kv_heads, virtual_tokens, head_dim]"}
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    tensors = {}
    for i, (k, v) in enumerate(layers):
        tensors[f"layers.{i}.key"] = k.contiguous()
        tensors[f"layers.{i}.value"] = v.contiguous()
    save_file(tensors, str(path), metadata=meta)
    return Path(path)


def load_prefix(path: str | Path) -> tuple[list[tuple[Any, Any]], dict]:
    """(per-layer ``(key, value)``, metadata) of a ``prefix.safetensors`` (or the folder holding one)."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / PREFIX_NAME
    if not path.is_file():
        raise ModelError(f"{path} not found", "pass a folder written by finetune_decoder with method prefix")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            if meta.get("schema") != PREFIX_SCHEMA:
                raise ModelError(f"{path} is not an edgeft prefix file (schema {meta.get('schema')!r})",
                                 "pass the prefix.safetensors that finetune_decoder wrote")
            n = int(meta["num_layers"])
            layers = [(f.get_tensor(f"layers.{i}.key"), f.get_tensor(f"layers.{i}.value")) for i in range(n)]
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"cannot read the prefix file {path}: {' '.join(str(e).split())[:160]}",
                         "re-create it with finetune_decoder") from None
    return layers, meta


def prefix_past_key_values(prefix, batch_size: int = 1) -> tuple[tuple[Any, Any], ...]:
    """The past key/values to feed the base model: per layer ``(key, value)`` each
    ``[batch, kv_heads, virtual_tokens, head_dim]``. ``prefix`` is a path (file or folder) or the
    layers of :func:`extract_prefix`. Feed the real tokens with position ids starting at
    ``virtual_tokens`` and an attention mask of ``virtual_tokens + length`` ones (ONNX decoders:
    ``past_key_values.{i}.key`` / ``.value`` inputs)."""
    layers = load_prefix(prefix)[0] if isinstance(prefix, (str, Path)) else prefix
    return tuple((k.unsqueeze(0).expand(batch_size, -1, -1, -1).contiguous(),
                  v.unsqueeze(0).expand(batch_size, -1, -1, -1).contiguous()) for k, v in layers)


def prefix_cache(prefix, batch_size: int = 1):
    """:func:`prefix_past_key_values` as a transformers ``DynamicCache`` (for a torch base model; it
    grows as the model runs, so build a fresh one per call)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (k, v) in enumerate(prefix_past_key_values(prefix, batch_size)):
        cache.update(k, v, i)
    return cache


def prefix_logits(base_model, prefix, input_ids):
    """Logits of ``base_model`` on ``input_ids`` [b, s] after the prefix (positions from
    ``virtual_tokens``)."""
    import torch

    input_ids = torch.as_tensor(input_ids)
    b, s = input_ids.shape
    past = prefix_cache(prefix, b)
    p = past.get_seq_length()
    with torch.inference_mode():
        return base_model(input_ids=input_ids, past_key_values=past,
                          attention_mask=torch.ones(b, p + s, dtype=torch.long),
                          position_ids=torch.arange(p, p + s).expand(b, s), use_cache=True).logits


def prefix_greedy(base_model, prefix, prompt_ids, max_new_tokens: int, *, eos_token_id: int | None = None):
    """Greedy decoding of the base model after the prefix (the prefix-tuned model's generations)."""
    import torch

    from edgeft.decoder.generate import GenerateResult, check_prompt
    from edgeft.decoder.model import context_length

    past = prefix_cache(prefix, 1)
    p = past.get_seq_length()
    ids = check_prompt(prompt_ids, max_new_tokens, context_length(base_model.config) - p)
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = base_model(input_ids=torch.tensor([ids]), past_key_values=past, use_cache=True,
                         position_ids=torch.arange(p, p + len(ids)).unsqueeze(0))
        token = int(out.logits[0, -1].argmax())
        t1 = time.perf_counter()
        tokens, pos = [token], p + len(ids)
        stopped = eos_token_id is not None and token == eos_token_id
        while len(tokens) < max_new_tokens and not stopped:
            out = base_model(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True,
                             position_ids=torch.tensor([[pos]]))
            pos += 1
            token = int(out.logits[0, -1].argmax())
            tokens.append(token)
            stopped = eos_token_id is not None and token == eos_token_id
        t2 = time.perf_counter()
    return GenerateResult(tokens, len(ids), t1 - t0, t2 - t1, stopped_at_eos=stopped, runtime="torch+prefix")


# ---------------------------------------------------------------- helpers

def _logits(model, blocks: np.ndarray):
    import torch

    with torch.inference_mode():
        return model(input_ids=torch.as_tensor(blocks), use_cache=False).logits.float()


def _perplexity(model, blocks: np.ndarray, batch_size: int) -> dict:
    from edgeft.decoder.evaluate import torch_perplexity

    model.eval()
    t0 = time.perf_counter()
    s = torch_perplexity(model, blocks, batch_size=batch_size).summary()
    s["seconds"] = time.perf_counter() - t0
    return s


def _generations(fn, tokenizer, prompts: list[list[int]], new_tokens: int) -> list[dict]:
    out = []
    for ids in prompts:
        r = fn(ids, new_tokens)
        out.append({"tokens": r.tokens, "text": tokenizer.decode(r.tokens, skip_special_tokens=False),
                    "stopped_at_eos": r.stopped_at_eos})
    return out


def _param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias") else decay).append(p)
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
            if g["params"]]


def _read_config(model_dir: Path) -> dict:
    try:
        return json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def _copy_tokenizer(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def _copy_base(src: Path, dst: Path) -> None:
    """The base model's files as they are (prefix tuning leaves the base unchanged)."""
    for p in sorted(src.iterdir()):
        if p.is_file() and (p.suffix == ".safetensors" or p.name in ("config.json", "generation_config.json",
                                                                     "model.safetensors.index.json")):
            shutil.copy2(p, dst / p.name)


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.is_symlink():
        raise RunDirError(f"{out_dir} is a symbolic link; edgeft does not write through links",
                          "choose another output folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise RunDirError(f"{out_dir} exists and is not a folder", "choose another output folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise RunDirError(f"output folder {out_dir} exists and is not empty",
                          "choose another folder, remove it, or pass overwrite=True")


# ---------------------------------------------------------------- fine-tune

def finetune_decoder(model_dir: str | Path, data, cfg: DecoderFinetuneConfig | Mapping[str, Any] | None,
                     out_dir: str | Path, *, progress: bool = True, overwrite: bool = False,
                     on_step: Callable[[dict], None] | None = None) -> FinetuneResult:
    """Fine-tune the causal LM in ``model_dir`` on ``data`` and write the result to ``out_dir``.

    ``data``: an :class:`edgeft.decoder.corpus.Corpus`, or a mapping with ``train`` and
    ``validation`` entries, each a list of documents (tokenized into ``block_size`` blocks with
    :func:`edgeft.decoder.corpus.token_blocks`) or an int array of blocks ``[n, block_size]``.
    ``progress`` shows bars and lines on stderr; ``on_step`` is called after every optimizer step
    with ``{"step", "epoch", "loss", "elapsed_s"}`` (an exception it raises aborts the run, nothing
    written). Returns the output folder and the metrics (also in ``out_dir/metrics.json``)."""
    import torch

    from edgeft.artifacts import atomic_dir, write_json_atomic
    from edgeft.decoder.export import DEFAULT_PROMPTS
    from edgeft.decoder.generate import check_prompt, torch_greedy
    from edgeft.decoder.model import context_length, load_causal_lm, load_tokenizer
    from edgeft.finetune import set_threads
    from edgeft.progress import bar, say
    from edgeft.safeio import check_hf_folder

    t_start = time.perf_counter()
    cfg = decoder_finetune_config(cfg)
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite)
    model_dir = check_hf_folder(model_dir)  # one-line ModelError without weights or tokenizer
    hf_cfg = _read_config(model_dir)
    context = next((hf_cfg[k] for k in ("max_position_embeddings", "n_positions", "max_sequence_length")
                    if isinstance(hf_cfg.get(k), int) and hf_cfg[k] > 0), None)
    virtual = cfg.prefix.num_virtual_tokens if cfg.method == "prefix" else 0
    if context is not None and cfg.block_size + virtual > context:
        extra = f" + {virtual} virtual tokens" if virtual else ""
        raise RecipeError(f"block_size {cfg.block_size}{extra} exceeds the model's context of {context} tokens",
                          f"set block_size to at most {context - virtual}")
    tok = load_tokenizer(model_dir)
    vocab = hf_cfg.get("vocab_size")
    train = _split_blocks(data, "train", tok, cfg.block_size, cfg.max_train_blocks)
    val = _split_blocks(data, "validation", tok, cfg.block_size, cfg.max_eval_blocks)
    for name, blocks in (("train", train), ("validation", val)):
        if isinstance(vocab, int) and (blocks.min() < 0 or blocks.max() >= vocab):
            raise DataError(f"the {name} blocks hold token ids outside the model's vocabulary of {vocab}",
                            "tokenize the text with this model's tokenizer")
    prompt_texts = list(cfg.prompts if cfg.prompts is not None else DEFAULT_PROMPTS)
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in prompt_texts]
    for text, ids in zip(prompt_texts, prompts):
        try:
            check_prompt(ids, cfg.new_tokens, (context or 2048) - virtual)
        except DataError as e:
            raise DataError(f"prompt {text[:40]!r}: {e.problem}", e.fix) from None

    threads = set_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = load_causal_lm(model_dir)
    if context is None:
        context = context_length(model.config)
    n_params = sum(p.numel() for p in model.parameters())
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    planned = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        planned = min(planned, cfg.max_steps)
    lr = cfg.learning_rate
    deadline = t_start + cfg.max_minutes * 60 if cfg.max_minutes is not None else math.inf
    say(f"[bold]fine-tune decoder[/] {model_dir.name} ({n_params / 1e6:.1f}M params, {cfg.method}, lr {lr:g}) "
        f"on {len(train)} train / {len(val)} validation blocks of {cfg.block_size} tokens, {planned} steps planned"
        + (f", budget {cfg.max_minutes:g} min" if cfg.max_minutes is not None else "") + f", {threads} threads",
        enabled=progress)

    # before: the base model's perplexity and generations
    before = _perplexity(model, val, cfg.eval_batch_size)
    gen_before = _generations(lambda ids, n: torch_greedy(model, ids, n, eos_token_id=tok.eos_token_id), tok,
                              prompts, cfg.new_tokens)
    say(f"  validation perplexity before: {before['perplexity']:.3f} ({before['tokens']} tokens)", enabled=progress)

    model = _wrap(model, cfg, planned)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=lr)
    schedule = BudgetSchedule(planned, cfg.warmup_ratio, deadline)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.factor)
    adalora = cfg.method == "adalora"

    epochs: list[dict] = []
    step, epoch, t_train, tokens_seen = 0, 0, 0.0, 0
    stopped_by = "epochs"
    while step < planned and stopped_by == "epochs":
        epoch += 1
        model.train()
        perm = rng.permutation(len(train))
        n_this = min(steps_per_epoch, planned - step)
        losses: list[float] = []
        t0, done, epoch_tokens = time.perf_counter(), 0, 0
        with bar(f"fine-tune ({cfg.method}) epoch {epoch}", n_this, enabled=progress) as b:
            for i in range(n_this):
                if step > 0 and time.perf_counter() >= deadline:
                    stopped_by = "max_minutes"
                    break
                idx = np.sort(perm[i * cfg.batch_size:(i + 1) * cfg.batch_size])
                x = torch.as_tensor(train[idx])
                out = model(input_ids=x, labels=x, use_cache=False)
                loss = out.loss
                if not torch.isfinite(loss):
                    raise ModelError(f"training diverged: the loss is {float(loss)} at step {step + 1}",
                                     f"lower the learning rate (now {lr:g})")
                loss.backward()
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
                optimizer.step()
                schedule.observe(step + 1, time.perf_counter())
                scheduler.step()
                if adalora:
                    model.base_model.update_and_allocate(step)
                optimizer.zero_grad(set_to_none=True)
                step += 1
                done += 1
                tokens_seen += x.numel()
                epoch_tokens += x.numel()
                losses.append(float(loss.detach()))
                elapsed = time.perf_counter() - t0
                b.advance(loss=float(np.mean(losses[-20:])), tok_s=epoch_tokens / max(elapsed, 1e-9))
                if on_step is not None:
                    on_step({"step": step, "epoch": epoch, "loss": losses[-1],
                             "elapsed_s": time.perf_counter() - t_start})
        epoch_s = time.perf_counter() - t0
        t_train += epoch_s
        if (cfg.max_steps is not None and step >= cfg.max_steps and stopped_by == "epochs"
                and step < cfg.epochs * steps_per_epoch):
            stopped_by = "max_steps"
        if done == 0:
            break
        v = _perplexity(model, val, cfg.eval_batch_size)
        record = {"epoch": epoch, "steps": done, "complete": done == steps_per_epoch,
                  "train_loss": float(np.mean(losses)), "train_loss_first": losses[0], "train_loss_last": losses[-1],
                  "train_s": epoch_s, "validation_perplexity": v["perplexity"], "validation_s": v["seconds"]}
        epochs.append(record)
        say(f"  epoch {epoch}: {done} steps, loss {record['train_loss']:.4f}, validation perplexity "
            f"{v['perplexity']:.3f}, {epoch_s:.0f}s" + ("" if record["complete"] else f" (stopped: {stopped_by})"),
            enabled=progress)
    model.eval()

    # merge (checked) or extract the prefix (checked)
    probe = val[:2]
    check: dict = {}
    prefix_layers = None
    if cfg.method in MERGED_METHODS:
        unmerged = _logits(model, probe)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = model.merge_and_unload()
        diff = float((_logits(model, probe) - unmerged).abs().max())
        check = {"merged_vs_unmerged_max_abs_diff": diff, "atol": MERGE_ATOL, "probe_blocks": len(probe)}
        if not diff < MERGE_ATOL:
            raise ModelError(f"the merged {cfg.method} model differs from the unmerged one (max logit diff {diff:.2e} "
                             f">= {MERGE_ATOL:g})", "report it as an edgeft bug; nothing was written")
    elif cfg.method == "prefix":
        peft_logits = _logits(model, probe)
        prefix_layers = extract_prefix(model)
        model = model.get_base_model()
        diff = float((prefix_logits(model, prefix_layers, probe).float() - peft_logits).abs().max())
        check = {"prefix_vs_peft_max_abs_diff": diff, "atol": MERGE_ATOL, "probe_blocks": len(probe)}
        if not diff < MERGE_ATOL:
            raise ModelError(f"the saved prefix does not reproduce the prefix-tuned model (max logit diff {diff:.2e} "
                             f">= {MERGE_ATOL:g})", "report it as an edgeft bug; nothing was written")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.method == "prefix":
        gen_fn = lambda ids, n: prefix_greedy(model, prefix_layers, ids, n, eos_token_id=tok.eos_token_id)  # noqa: E731
    else:
        gen_fn = lambda ids, n: torch_greedy(model, ids, n, eos_token_id=tok.eos_token_id)  # noqa: E731
    gen_after = _generations(gen_fn, tok, prompts, cfg.new_tokens)
    after_ppl = epochs[-1]["validation_perplexity"] if epochs else before["perplexity"]
    wall = time.perf_counter() - t_start

    metrics = {
        "schema": METRICS_SCHEMA,
        "stage": "finetune-decoder",
        "model": str(model_dir),
        "method": cfg.method,
        "lr": lr,
        "params": n_params,
        "trainable_params": n_trainable,
        "trainable_fraction": n_trainable / n_params if n_params else None,
        "threads": threads,
        "block_size": cfg.block_size,
        "batch_size": cfg.batch_size,
        "train_blocks": int(len(train)),
        "validation_blocks": int(len(val)),
        "steps": step,
        "planned_steps": planned,
        "scheduled_steps": schedule.total,  # what the learning-rate schedule was fitted to (the budget)
        "stopped_by": stopped_by,
        "epochs": epochs,
        "validation": {"before": {"perplexity": before["perplexity"], "tokens": before["tokens"]},
                       "after": {"perplexity": after_ppl, "tokens": before["tokens"]},
                       "relative_change": after_ppl / before["perplexity"] - 1},
        "train_tokens": tokens_seen,
        "train_s": t_train,
        "train_tokens_per_s": tokens_seen / t_train if t_train else 0.0,
        "check": check,
        "wall_s": wall,
        "output": {"kind": "base+prefix" if cfg.method == "prefix" else
                   ("merged" if cfg.method in MERGED_METHODS else "full"),
                   "prefix": PREFIX_NAME if cfg.method == "prefix" else None,
                   "prefix_position_offset": virtual if cfg.method == "prefix" else None},
    }
    generations = {"new_tokens": cfg.new_tokens, "greedy": True, "stops_at_eos": True,
                   "prompts": [{"prompt": text, "before": b["text"], "after": a["text"], "before_tokens": b["tokens"],
                                "after_tokens": a["tokens"]}
                               for text, b, a in zip(prompt_texts, gen_before, gen_after)]}

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out_dir) as tmp:
        if cfg.method == "prefix":
            _copy_base(model_dir, tmp)
            save_prefix(prefix_layers, tmp / PREFIX_NAME, extra={"base_model": model_dir.name})
        else:
            model.config._name_or_path = ""
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model.save_pretrained(tmp, safe_serialization=True)
        copied = _copy_tokenizer(model_dir, tmp)
        if not copied:  # a tokenizer that only loads from files edgeft does not list: write it out
            tok.save_pretrained(tmp)
        write_json_atomic(tmp / CONFIG_NAME, {"schema": METRICS_SCHEMA, **cfg.model_dump(mode="json"), "lr": lr})
        write_json_atomic(tmp / GENERATIONS_NAME, generations)
        metrics["wall_s"] = time.perf_counter() - t_start
        write_json_atomic(tmp / METRICS_NAME, metrics)
    say(f"  validation perplexity {before['perplexity']:.3f} -> {after_ppl:.3f} "
        f"({metrics['validation']['relative_change'] * 100:+.1f}%), {metrics['train_tokens_per_s']:.0f} tokens/s, "
        f"{metrics['wall_s'] / 60:.1f} min; saved {out_dir}", enabled=progress)
    return FinetuneResult(out_dir, cfg.method, metrics)


__all__ = ["DecoderFinetuneConfig", "FinetuneResult", "decoder_finetune_config", "extract_prefix", "finetune_decoder",
           "load_prefix", "prefix_cache", "prefix_greedy", "prefix_logits", "prefix_past_key_values", "save_prefix"]
