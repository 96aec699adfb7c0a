"""onnxruntime-genai: its model builder, which writes ONNX Runtime's fused decoder graph, and its own
generate loop (a peer in the bench).

The builder turns a Hugging Face Llama-family folder into ~11 nodes per layer (GroupQueryAttention
with rotary embedding inside, SkipSimplifiedLayerNormalization, MatMul or MatMulNBits) where optimum's
``text-generation-with-past`` export has ~250 (7,425 nodes for SmolLM2-135M against 341). At batch 1
ONNX Runtime's per-node cost dominates a small model's decode step, so the fused graph decodes
faster at the same weights (fp32 on SmolLM2, median decode: 47.5 vs 41.8 tok/s at 1 thread, 61.7 vs 40.9 at 2,
bench/results/20261202-0152-decoder.md). Its weight-only quantization is ONNX Runtime's own
(``MatMulNBitsQuantizer``: RTN or k-quant, mixed precision by layer group, and the embedding shared
with a quantized lm_head).

The builder is a script (argparse, prints, ``sys.path`` set up on import) that imports names only
transformers 5 has; edgeft pins 4.57 for optimum-onnx. It runs in a child process (``python -m
edgeft.decoder.genai ...``) with those names stubbed: the Llama path it takes never uses them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from edgeft.errors import ModelError

ONNX_NAME = "model.onnx"
GENAI_CONFIG = "genai_config.json"
BUILD_TIMEOUT_S = 3600
# Multimodal classes the builder imports at module level; absent from transformers 4.57.
_TRANSFORMERS5_NAMES = ("Gemma3ForConditionalGeneration", "Lfm2VlForConditionalGeneration",
                        "Mistral3ForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration",
                        "Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration",
                        "Qwen3VLForConditionalGeneration", "AutoModelForSpeechSeq2Seq")
# The folder's own files win over the builder's copies (edgeft fixes SmolLM2's tokenizer once).
_SOURCE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "vocab.json", "merges.txt", "chat_template.jinja")
PRECISIONS = ("fp32", "int8", "int4")


def available() -> bool:
    return importlib.util.find_spec("onnxruntime_genai") is not None


def require() -> None:
    if not available():
        raise ModelError("onnxruntime-genai is not installed (its model builder writes the fused decoder graph)",
                         "pip install onnxruntime-genai, or set compress.exporter: optimum")


def build(model_dir: str | Path, out_dir: str | Path, *, precision: str = "fp32",
          options: dict[str, str] | None = None, cache_dir: str | Path | None = None) -> Path:
    """Run the builder on the Hugging Face folder ``model_dir`` into ``out_dir`` (which must not exist;
    the caller builds aside and swaps). Returns ``out_dir/model.onnx``; a failed build is one ModelError."""
    require()
    if precision not in PRECISIONS:
        raise ModelError(f"onnxruntime-genai precision '{precision}' is not one edgeft builds", f"use {', '.join(PRECISIONS)}")
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    cache = Path(cache_dir) if cache_dir else out_dir.parent / f".{out_dir.name}.cache"
    cmd = [sys.executable, "-m", "edgeft.decoder.genai", "-i", str(model_dir), "-o", str(out_dir), "-p", precision,
           "-e", "cpu", "-c", str(cache)]
    if options:
        cmd += ["--extra_options", *(f"{k}={v}" for k, v in options.items())]
    env = {**os.environ, "TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        raise ModelError(f"onnxruntime-genai's builder ran past {BUILD_TIMEOUT_S} s on {model_dir}",
                         "set compress.exporter: optimum") from None
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    if proc.returncode != 0 or not (out_dir / ONNX_NAME).is_file():
        lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        last = next((ln for ln in reversed(lines) if "Error" in ln or "error" in ln), lines[-1] if lines else "no output")
        raise ModelError(f"onnxruntime-genai's builder failed on {model_dir}: {last[:240]}",
                         "set compress.exporter: optimum, or check that the model is a Llama-family causal LM")
    for name in _SOURCE_FILES:
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, out_dir / name)
    return out_dir / ONNX_NAME


def set_threads(folder: str | Path, threads: int | None) -> None:
    """Pin the genai runtime's intra-op threads in ``genai_config.json`` (null: its default)."""
    path = Path(folder) / GENAI_CONFIG
    cfg = json.loads(path.read_text())
    opts = cfg["model"]["decoder"].setdefault("session_options", {})
    if threads is None:
        opts.pop("intra_op_num_threads", None)
    else:
        opts["intra_op_num_threads"] = int(threads)
    path.write_text(json.dumps(cfg, indent=2))


class GenaiGenerator:
    """onnxruntime-genai's own greedy loop over a builder folder: the runtime the bench compares with."""

    def __init__(self, folder: str | Path, *, threads: int | None = None):
        require()
        import onnxruntime_genai as og

        self.folder = Path(folder)
        if not (self.folder / GENAI_CONFIG).is_file():
            raise ModelError(f"{self.folder} has no {GENAI_CONFIG}", "build it with compress.exporter: genai")
        config = og.Config(str(self.folder))
        if threads is not None:
            config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": int(threads)}}}}))
        self._og = og
        self.model = og.Model(config)

    def generate(self, prompt_ids, max_new_tokens: int):
        from edgeft.decoder.generate import GenerateResult

        og = self._og
        ids = [int(i) for i in np.asarray(prompt_ids).reshape(-1)]
        params = og.GeneratorParams(self.model)
        # min_length keeps eos from ending the run early: every variant generates the same number of tokens
        params.set_search_options(max_length=len(ids) + max_new_tokens, min_length=len(ids) + max_new_tokens,
                                  do_sample=False)
        gen = og.Generator(self.model, params)
        t0 = time.perf_counter()
        gen.append_tokens(ids)
        gen.generate_next_token()
        tokens = [int(gen.get_next_tokens()[0])]
        t1 = time.perf_counter()
        while len(tokens) < max_new_tokens and not gen.is_done():
            gen.generate_next_token()
            tokens.append(int(gen.get_next_tokens()[0]))
        t2 = time.perf_counter()
        return GenerateResult(tokens, len(ids), t1 - t0, t2 - t1, runtime="onnxruntime-genai")


def _run_builder(argv: list[str]) -> None:
    import runpy

    import transformers  # noqa: F401  (the lazy module replaces itself in sys.modules on first use)

    mod = sys.modules["transformers"]
    for name in _TRANSFORMERS5_NAMES:
        try:
            getattr(mod, name)
        except (AttributeError, ImportError):
            setattr(sys.modules["transformers"], name, type(name, (), {}))
    import onnxruntime_genai.models as models

    sys.path.insert(0, os.path.dirname(models.__file__))
    from builders import base  # the builder's own package, importable once its folder is on sys.path

    original = base.Model.make_config_init

    def make_config_init(self, config):
        if getattr(config, "rope_scaling", "absent") is None:  # transformers 4.x writes null; 5.x rope_parameters
            config.rope_scaling = {"rope_type": "default", "rope_theta": config.rope_theta}
        return original(self, config)

    base.Model.make_config_init = make_config_init
    sys.argv = ["onnxruntime_genai.models.builder", *argv]
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__")


if __name__ == "__main__":
    _run_builder(sys.argv[1:])
