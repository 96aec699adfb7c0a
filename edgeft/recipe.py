"""Recipes: a typed, strictly validated schema loaded from YAML.

Unknown keys, wrong types and out-of-range values are reported with their
path (``finetune.lr: must be > 0``) before any work starts. Any field can be
overridden with ``--set a.b=value``; the resolved recipe is saved into the run
folder.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Hashable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgeft.errors import RecipeError

STAGES = ("finetune", "compress", "bench")
OPT_LEVELS = (0, 1, 2, 99)  # ONNX Runtime transformers optimizer levels
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # a run-folder name: one path component, no '..'


def check_run_name(v: str) -> str:
    """A recipe name: one path component (the run folder is runs/<name>-<time>)."""
    if not NAME_RE.fullmatch(v) or ".." in v:
        raise ValueError(f"{v!r} is not a plain name: use letters, digits, '.', '_' and '-' (no path "
                         "separators or '..', at most 100 characters); the run folder is runs/<name>-<time>")
    return v


class _Strict(BaseModel):
    # strict: no coercion, so `epochs: true` or `lr: "1"` is an error rather than 1.
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, strict=True, allow_inf_nan=False)


class ModelConfig(_Strict):
    name: str = Field("minilm-l6",
                      description="'minilm-l6' (packaged), a local Hugging Face folder, or a hub id ORG/NAME")
    revision: str | None = Field(None, description="hub revision (commit/tag) to pin")
    trust_remote_code: bool = Field(False, description="run code shipped with the model; off unless you trust it")


class DataConfig(_Strict):
    dataset: str = Field(
        "rotten-tomatoes",
        description="built-in name (rotten-tomatoes, 20newsgroups, reuters-r8), a .csv/.jsonl/.parquet file, or hf:NAME",
    )
    text_column: str = "text"
    label_column: str = "label"
    validation_fraction: float = Field(0.1, gt=0, lt=0.5, description="of the training data, stratified")
    test_fraction: float = Field(0.2, gt=0, lt=0.5, description="only for data without its own test split")
    max_train_samples: int | None = Field(None, gt=0, description="stratified subsample of train (for quick runs)")
    max_eval_samples: int | None = Field(None, gt=0, description="stratified subsample of validation and test")
    max_text_chars: int = Field(100_000, ge=1, description="every text is cut to this many characters when loaded, "
                                "before tokenizing (a huge cell would otherwise be tokenized whole)")


class LoraConfig(_Strict):
    r: int = Field(16, gt=0, le=256)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.1, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["query", "key", "value", "dense"])


class FinetuneConfig(_Strict):
    method: Literal["full", "lora"] = "full"
    epochs: int = Field(2, gt=0, le=100)
    lr: float = Field(5e-5, gt=0, lt=1)
    batch_size: int = Field(16, gt=0, le=4096, description="chosen on validation: 16 beat 32 on Rotten Tomatoes")
    eval_batch_size: int = Field(128, gt=0, le=4096)
    max_length: int = Field(64, gt=1, le=4096)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.01, ge=0, lt=1)
    grad_clip: float = Field(1.0, gt=0)
    threads: int | None = Field(None, gt=0, description="torch intra-op threads; default: all usable cores")
    lora: LoraConfig = Field(default_factory=LoraConfig)


class RecoveryConfig(_Strict):
    """Short fine-tune after pruning, distilling from the unpruned model."""

    epochs: float = Field(1.0, ge=0, le=20, description="0 skips recovery")
    lr: float = Field(5e-5, gt=0, lt=1)
    distill_alpha: float = Field(0.5, ge=0, le=1, description="weight of the distillation loss (vs hard labels)")
    temperature: float = Field(2.0, gt=0)
    # Recovery's own training settings (finetune.* does not reach the compress stage).
    batch_size: int = Field(16, gt=0, le=4096)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.01, ge=0, lt=1)
    grad_clip: float = Field(1.0, gt=0)


class PruneConfig(_Strict):
    heads: float = Field(0.33, ge=0, lt=1, description="fraction of attention heads to remove, the same count in "
                         "every layer (each layer keeps at least one)")
    ffn: float = Field(0.75, ge=0, lt=1, description="fraction of FFN intermediate neurons to remove in every layer")
    importance_samples: int = Field(512, gt=0, description="training samples used to score importance")
    importance_batch_size: int = Field(16, gt=0, le=4096, description="batch size of the importance pass")
    recovery: RecoveryConfig = Field(default_factory=RecoveryConfig)


class ExportConfig(_Strict):
    opset: int = Field(17, ge=14, le=23)
    atol: float = Field(1e-3, gt=0, description="max abs logit difference allowed for float steps")


class OptimizeConfig(_Strict):
    enabled: bool = True
    level: int = Field(1, description="ORT transformers optimizer level: 0, 1, 2 or 99 (2 and 99 add "
                                      "CPU-specific layout rewrites; 1 keeps the graph portable)")
    layernorm: Literal["instance-norm", "fused"] = Field(
        "instance-norm", description="instance-norm: (Skip)LayerNorm rewritten for ORT CPU's faster "
                                     "InstanceNormalization kernel; fused: keep ORT's fused op (GPU)")

    @field_validator("level")
    @classmethod
    def _check_level(cls, v: int) -> int:
        if v not in OPT_LEVELS:
            raise ValueError(f"must be one of {', '.join(map(str, OPT_LEVELS))} (got {v})")
        return v


class CalibrationConfig(_Strict):
    method: Literal["minmax", "entropy", "percentile"] = "minmax"
    samples: int = Field(256, gt=0)


class QuantizeConfig(_Strict):
    mode: Literal["dynamic", "static"] = "dynamic"
    per_channel: bool = True
    reduce_range: bool = False
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    sensitivity_budget: int = Field(8, ge=0, description="max MatMuls to keep in fp32 when the goal is missed")


class CompressConfig(_Strict):
    prune: PruneConfig | None = Field(default_factory=PruneConfig, description="null skips pruning")
    export: ExportConfig = Field(default_factory=ExportConfig)
    optimize: OptimizeConfig = Field(default_factory=OptimizeConfig)
    quantize: QuantizeConfig | None = Field(default_factory=QuantizeConfig, description="null skips quantization")
    max_accuracy_drop: float = Field(1.0, ge=0, le=100, description="points of validation accuracy vs fine-tuned fp32")
    allow_miss: bool = Field(False, description="exit 0 even when the accuracy goal is missed")
    threads: int | None = Field(None, gt=0, description="torch/ORT intra-op threads; default: all usable cores")


class BenchConfig(_Strict):
    runtimes: list[str] | Literal["auto"] = "auto"
    batch_sizes: list[int] = Field(default_factory=lambda: [1])
    seq_lengths: list[int] = Field(default_factory=lambda: [128])
    threads: int | None = Field(None, gt=0, description="intra-op threads for every runtime; default: usable cores")
    min_samples: int = Field(200, gt=0)
    max_seconds_per_variant: float = Field(20.0, gt=0)
    eval_split: Literal["validation", "test"] = "test"
    max_eval_samples: int | None = Field(None, gt=0)

    @field_validator("runtimes")
    @classmethod
    def _check_runtimes(cls, v: list[str] | str) -> list[str] | str:
        from edgeft.bench.runtimes import RUNTIMES  # lazy: edgeft.bench imports this module

        if v == "auto":
            return v
        if "auto" in v:
            raise ValueError("auto is not a runtime name: write runtimes: auto (no list) or list the runtimes")
        if not v:
            raise ValueError(f"must be auto or a non-empty list of {', '.join(RUNTIMES)}")
        for rt in v:
            if rt not in RUNTIMES:
                close = difflib.get_close_matches(rt, RUNTIMES, n=1, cutoff=0.3)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise ValueError(f"unknown runtime '{rt}'{hint} (known: auto, {', '.join(RUNTIMES)})")
        return v

    @model_validator(mode="after")
    def _check_lists(self) -> BenchConfig:
        if not self.batch_sizes or any(b <= 0 for b in self.batch_sizes):
            raise ValueError("batch_sizes: must be a non-empty list of positive integers")
        if not self.seq_lengths or any(s <= 1 for s in self.seq_lengths):
            raise ValueError("seq_lengths: must be a non-empty list of integers > 1")
        return self


class Recipe(_Strict):
    name: str = Field("minilm-rotten-tomatoes", description="run-folder prefix: letters, digits, '.', '_', '-'")
    task: Literal["text-classification"] = Field(
        "text-classification", description="text-classification (this table); text-generation recipes have their own "
        "schema (edgeft.decoder.recipe; see the README's Decoder LMs)")
    seed: int = Field(42, ge=0, le=2**32 - 1, description="seeds torch, numpy and the data splits")
    stages: list[Literal["finetune", "compress", "bench"]] = Field(default_factory=lambda: list(STAGES))
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    compress: CompressConfig = Field(default_factory=CompressConfig)
    bench: BenchConfig = Field(default_factory=BenchConfig)

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        return check_run_name(v)

    @model_validator(mode="after")
    def _check_stages(self) -> Recipe:
        if not self.stages:
            raise ValueError(f"stages: name at least one of {', '.join(STAGES)}")
        if len(set(self.stages)) != len(self.stages):
            raise ValueError("stages: each stage may appear once")
        if list(self.stages) != [s for s in STAGES if s in self.stages]:
            raise ValueError(f"stages: must be in the order {', '.join(STAGES)}")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ---------------------------------------------------------------- YAML loading


class _UniqueKeyLoader(yaml.SafeLoader):
    """Safe loader that rejects duplicate keys (PyYAML silently keeps the last)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, Hashable):
            raise RecipeError(f"a key at line {key_node.start_mark.line + 1} is a {type(key).__name__}, "
                              "not a field name", "write keys as plain names (name: value)")
        if key in seen:
            raise RecipeError(f"duplicate key '{key}' at line {key_node.start_mark.line + 1}",
                              "keep one of the two entries")
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
# YAML 1.1 reads 1e-4 (no dot) as a string; with strict types that would be an error, so read it as YAML 1.2 does.
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def _format_validation_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"] if not str(p).startswith("function-after"))
    msg = first["msg"]
    kind = first["type"]
    if kind == "extra_forbidden":
        return f"{loc}: unknown field{_did_you_mean(first['loc'])}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        msg = msg.replace("Input should be ", "must be ").replace("greater than or equal to", ">=")
        msg = msg.replace("less than or equal to", "<=").replace("greater than", ">").replace("less than", "<")
    elif msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
        if ":" in msg.split(" ")[0]:
            return f"{loc + '.' if loc else ''}{msg}"
    else:
        msg = msg.replace("Input should be", "must be")
        if kind.endswith("_type") and isinstance(first.get("input"), (bool, int, float, str)):
            msg += f" (got {json.dumps(first['input'])[:40]}, a {type(first['input']).__name__})"
    extra = f" ({len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{loc or 'recipe'}: {msg}{extra}"


def _did_you_mean(loc: tuple) -> str:
    model: type[BaseModel] = Recipe
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None:
            return ""
        ann = field.annotation
        candidates = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not candidates:
            return ""
        model = candidates[0]
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return f"; did you mean '{close[0]}'?" if close else f"; known fields: {', '.join(model.model_fields)}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a","b","c"], value parsed as YAML)."""
    if "=" not in text:
        raise RecipeError(f"override '{text}' is not KEY=VALUE", "write it like --set finetune.epochs=2")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise RecipeError(f"override '{text}' has an empty key", "write it like --set finetune.epochs=2")
    try:
        value = yaml.load(raw, Loader=_UniqueKeyLoader) if raw.strip() else None
    except RecipeError as e:
        raise RecipeError(f"override '{text}': {e.problem}", e.fix) from None
    except yaml.YAMLError as e:
        raise RecipeError(f"override '{text}': value is not valid YAML ({e.problem})", "quote the value") from None
    return path, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = dict(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise RecipeError(f"override '{text}': '{part}' is not a section", "check the key path")
            node[part] = dict(child)
            node = node[part]
        node[path[-1]] = value
    return data


def recipe_from_dict(data: dict, overrides: list[str] | None = None) -> Recipe:
    if not isinstance(data, dict):
        raise RecipeError("the recipe must be a YAML mapping at the top level", "see recipes/ for examples")
    data = apply_overrides(data, overrides or [])
    schema: type[BaseModel] = Recipe
    if data.get("task") == "text-generation":
        from edgeft.decoder.recipe import DecoderRecipe as schema
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise RecipeError(_format_validation_error(e), "fix the recipe or the --set override") from None


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> Recipe:
    """Load and validate a recipe. ``path=None`` gives the built-in defaults."""
    if path is None:
        return recipe_from_dict({}, overrides)
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {path} not found", "pass the path of a YAML recipe, e.g. recipes/minilm-rotten-tomatoes.yaml")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except RecipeError as e:
        raise RecipeError(f"{path}: {e.problem}", e.fix) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(f"{path}: invalid YAML{where}: {getattr(e, 'problem', e)}", "fix the YAML syntax") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not a UTF-8 text file", "pass a YAML recipe") from None
    if data is None:
        data = {}
    try:
        return recipe_from_dict(data, overrides)
    except RecipeError as e:
        raise RecipeError(f"{path}: {e.problem}", e.fix) from None


def recipe_reference() -> str:
    """Markdown table of every field, its type, default and description (for the README)."""
    rows = ["| field | type | default | description |", "|---|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            sub = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
            path = f"{prefix}{name}"
            if sub:
                rows.append(f"| `{path}` | section{' or null' if type(None) in getattr(ann, '__args__', ()) else ''} | | {field.description or ''} |")
                walk(sub[0], path + ".")
                continue
            default = field.get_default(call_default_factory=True)
            tname = str(ann).replace("typing.", "").replace("<class '", "").replace("'>", "")
            rows.append(f"| `{path}` | `{tname}` | `{default!r}` | {field.description or ''} |")

    walk(Recipe, "")
    return "\n".join(rows)
