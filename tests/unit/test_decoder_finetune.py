"""Decoder fine-tuning (edgeft.decoder.finetune) on a tiny in-process Llama: every method learns a toy
corpus, adapters are merged exactly, prefix tuning ships a prefix that reproduces the PEFT model, the
output folder is whole or absent, bad inputs are one-line errors with nothing written, and the
wall-clock budget stops training."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from edgeft.errors import DataError, EdgeftError, ModelError, RecipeError, RunDirError
from test_decoder_tiny import TEXT

BLOCK = 32
# Learning rates that move each method clearly within a few steps on the toy corpus.
LR = {"full": 3e-3, "lora": 1e-2, "adalora": 1e-1, "ia3": 1e-1, "prefix": 5e-2}


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    return tiny_llama


@pytest.fixture(scope="module")
def tok(tiny_llama_tok):
    return tiny_llama_tok


@pytest.fixture(scope="module")
def blocks(tok):
    from edgeft.decoder.corpus import token_blocks

    return token_blocks(tok, [TEXT] * 12, BLOCK)


@pytest.fixture(scope="module")
def data(blocks):
    return {"train": blocks, "validation": blocks[:4]}


def cfg(method="lora", **kw):
    base = {"method": method, "lr": LR[method], "block_size": BLOCK, "batch_size": 4, "max_steps": 10,
            "max_eval_blocks": 4, "new_tokens": 8, "threads": 1}
    base.update(kw)
    return base


def leftovers(parent: Path, name: str) -> list[str]:
    """Anything a run left under ``parent`` for the output folder ``name`` (the folder or a partial)."""
    return sorted(p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}."))


def train_perplexity(folder: Path, blocks: np.ndarray, method: str) -> float:
    import torch

    from edgeft.decoder.evaluate import score_logits
    from edgeft.decoder.finetune import prefix_logits
    from edgeft.decoder.model import load_causal_lm

    model = load_causal_lm(folder)
    with torch.inference_mode():
        x = torch.as_tensor(blocks)
        logits = prefix_logits(model, folder, x) if method == "prefix" else model(input_ids=x).logits
    nll, _ = score_logits(logits, blocks)
    return float(np.exp(nll / (blocks.shape[0] * (blocks.shape[1] - 1))))


@pytest.fixture(scope="module")
def runs(tiny, data, tmp_path_factory):
    """One short run per method (shared by the tests that read their output)."""
    from edgeft.decoder.finetune import METHODS, finetune_decoder

    root = tmp_path_factory.mktemp("runs")
    return {m: finetune_decoder(tiny, data, cfg(m), root / m, progress=False) for m in METHODS}


# ---------------------------------------------------------------- every method

@pytest.mark.parametrize("method", ["full", "lora", "adalora", "ia3", "prefix"])
def test_each_method_lowers_the_training_loss(runs, tiny, blocks, method):
    res = runs[method]
    before = train_perplexity(tiny, blocks, "full")
    after = train_perplexity(res.out_dir, blocks, method)
    assert after < 0.9 * before, (method, before, after)
    m = res.metrics
    assert m["method"] == method and m["steps"] == 10 and m["stopped_by"] == "max_steps"
    assert m["validation"]["after"]["perplexity"] < m["validation"]["before"]["perplexity"]
    assert 0 < m["trainable_params"] <= m["params"]
    if method == "full":
        assert m["trainable_params"] == m["params"]
    else:
        assert m["trainable_params"] < 0.5 * m["params"]
    assert m["train_tokens"] == 10 * 4 * BLOCK and m["train_tokens_per_s"] > 0 and m["wall_s"] > 0
    assert len(m["epochs"]) == 1 and m["epochs"][0]["validation_perplexity"] == m["validation"]["after"]["perplexity"]


@pytest.mark.parametrize("method", ["lora", "adalora", "ia3"])
def test_adapters_are_merged_and_match_the_unmerged_model(runs, method):
    res = runs[method]
    check = res.metrics["check"]
    assert check["merged_vs_unmerged_max_abs_diff"] < 1e-3
    assert res.metrics["output"]["kind"] == "merged"
    names = {p.name for p in res.out_dir.iterdir()}
    assert not any("adapter" in n for n in names)  # a plain model, no PEFT files
    cfgjson = json.loads((res.out_dir / "config.json").read_text())
    assert cfgjson["model_type"] == "llama"


@pytest.mark.parametrize("method", ["full", "lora", "prefix"])
def test_output_folder_layout(runs, tiny, method):
    from edgeft.decoder.model import load_causal_lm, load_tokenizer
    from edgeft.safeio import check_hf_folder

    out = runs[method].out_dir
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "metrics.json",
            "finetune-config.json", "generations.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth"))]
    assert not [n for n in names if n.startswith(".")]
    check_hf_folder(out)
    assert (out / "tokenizer.json").read_bytes() == (tiny / "tokenizer.json").read_bytes()  # copied as is
    load_tokenizer(out)
    load_causal_lm(out)
    saved = json.loads((out / "finetune-config.json").read_text())
    assert saved["method"] == method and saved["block_size"] == BLOCK and saved["lr"] == LR[method]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == method and "trainable_params" in metrics and metrics["epochs"]
    gens = json.loads((out / "generations.json").read_text())
    assert gens["new_tokens"] == 8 and len(gens["prompts"]) == 4
    for g in gens["prompts"]:
        assert {"prompt", "before", "after"} <= set(g) and 1 <= len(g["after_tokens"]) <= 8
    assert ("prefix.safetensors" in names) == (method == "prefix")
    if method == "prefix":  # the base model's weights, unchanged
        assert (out / "model.safetensors").read_bytes() == (tiny / "model.safetensors").read_bytes()


def test_merged_output_exports_to_onnx(runs, blocks, tmp_path):
    from edgeft.decoder.export import export_decoder

    _, report = export_decoder(runs["lora"].out_dir, tmp_path / "onnx", blocks=blocks[:2], new_tokens=8)
    assert report.ok


# ---------------------------------------------------------------- prefix tuning

def _random_prefix_model(tiny, virtual=6):
    import torch
    from peft import PrefixTuningConfig, TaskType, get_peft_model

    from edgeft.decoder.model import load_causal_lm

    torch.manual_seed(1)
    model = get_peft_model(load_causal_lm(tiny), PrefixTuningConfig(task_type=TaskType.CAUSAL_LM,
                                                                    num_virtual_tokens=virtual))
    return model.eval()


def test_prefix_past_key_values_reproduce_the_peft_model(tiny, blocks, tmp_path):
    import torch

    from edgeft.decoder.finetune import extract_prefix, load_prefix, prefix_past_key_values, save_prefix

    peft_model = _random_prefix_model(tiny, virtual=6)
    x = torch.as_tensor(blocks[:2])
    with torch.inference_mode():
        ref = peft_model(input_ids=x).logits
    path = save_prefix(extract_prefix(peft_model), tmp_path / "prefix.safetensors")
    layers, meta = load_prefix(path)
    assert meta["num_virtual_tokens"] == "6" and meta["num_layers"] == "2" and meta["position_offset"] == "6"
    assert tuple(layers[0][0].shape) == (2, 6, 16)  # [kv_heads, virtual tokens, head_dim]
    past = prefix_past_key_values(path, batch_size=2)
    assert len(past) == 2 and tuple(past[0][0].shape) == (2, 2, 6, 16)

    from transformers import DynamicCache

    base = peft_model.get_base_model()

    def run(positions):
        cache = DynamicCache()
        for i, (k, v) in enumerate(past):
            cache.update(k, v, i)
        with torch.inference_mode():
            return base(input_ids=x, past_key_values=cache, attention_mask=torch.ones(2, 6 + BLOCK, dtype=torch.long),
                        position_ids=positions.expand(2, BLOCK)).logits

    assert float((run(torch.arange(6, 6 + BLOCK)) - ref).abs().max()) < 1e-4  # positions after the virtual tokens
    assert float((run(torch.arange(BLOCK)) - ref).abs().max()) > 1e-3         # positions from 0 do not match


def test_prefix_run_records_its_check(runs):
    m = runs["prefix"].metrics
    assert m["check"]["prefix_vs_peft_max_abs_diff"] < 1e-3
    assert m["output"] == {"kind": "base+prefix", "prefix": "prefix.safetensors", "prefix_position_offset": 16}


# ---------------------------------------------------------------- atomicity

def test_an_interrupt_mid_training_leaves_nothing(tiny, data, tmp_path):
    from edgeft.decoder.finetune import finetune_decoder

    def stop(info):
        if info["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune_decoder(tiny, data, cfg("lora"), tmp_path / "out", progress=False, on_step=stop)
    assert leftovers(tmp_path, "out") == []


def test_an_error_while_saving_leaves_nothing(tiny, data, tmp_path, monkeypatch):
    import edgeft.decoder.finetune as ft

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ft, "_copy_tokenizer", boom)
    with pytest.raises(OSError):
        ft.finetune_decoder(tiny, data, cfg("lora", max_steps=2), tmp_path / "out", progress=False)
    assert leftovers(tmp_path, "out") == []


def test_a_bad_merge_fails_and_writes_nothing(tiny, data, tmp_path, monkeypatch):
    import torch
    from peft.tuners.lora import LoraModel

    import edgeft.decoder.finetune as ft

    real = LoraModel.merge_and_unload

    def corrupt(self, *a, **k):
        merged = real(self, *a, **k)
        with torch.no_grad():
            merged.model.layers[0].self_attn.q_proj.weight.add_(0.5)
        return merged

    monkeypatch.setattr(LoraModel, "merge_and_unload", corrupt)
    with pytest.raises(ModelError, match="merged lora model differs"):
        ft.finetune_decoder(tiny, data, cfg("lora", max_steps=2), tmp_path / "out", progress=False)
    assert leftovers(tmp_path, "out") == []


# ---------------------------------------------------------------- bad input

def _no_tokenizer(tiny, tmp_path):
    import shutil

    folder = tmp_path / "no-tok"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny / name, folder / name)
    return folder


@pytest.mark.parametrize("case", ["empty-train-list", "blank-train", "empty-train-array", "no-validation",
                                  "block-too-long", "prefix-too-long", "unknown-method", "unknown-field",
                                  "no-tokenizer", "wrong-block-length", "out-of-vocab", "bad-target-modules"])
def test_bad_input_is_a_one_line_error_and_writes_nothing(case, tiny, blocks, tmp_path):
    from edgeft.decoder.finetune import finetune_decoder

    model, c = tiny, cfg("lora")
    data = {"train": blocks, "validation": blocks[:2]}
    expect: type[EdgeftError] = DataError
    if case == "empty-train-list":
        data["train"] = []
    elif case == "blank-train":
        data["train"] = ["   ", "\n"]
    elif case == "empty-train-array":
        data["train"] = np.zeros((0, BLOCK), dtype=np.int64)
    elif case == "no-validation":
        del data["validation"]
    elif case == "block-too-long":
        c, expect = cfg("lora", block_size=256), RecipeError
    elif case == "prefix-too-long":
        c, expect = cfg("prefix", block_size=120), RecipeError  # 120 + 16 virtual tokens > 128
    elif case == "unknown-method":
        c, expect = {**cfg("lora"), "method": "bitfit"}, RecipeError
    elif case == "unknown-field":
        c, expect = cfg("lora", learning_rate=1e-3), RecipeError
    elif case == "no-tokenizer":
        model, expect = _no_tokenizer(tiny, tmp_path), ModelError
    elif case == "wrong-block-length":
        c = cfg("lora", block_size=16)
    elif case == "out-of-vocab":
        bad = blocks.copy()
        bad[0, 0] = 10**6
        data["train"] = bad
    elif case == "bad-target-modules":
        c, expect = cfg("lora", lora={"target_modules": ["query", "value"]}), RecipeError
    with pytest.raises(expect) as err:
        finetune_decoder(model, data, c, tmp_path / "out", progress=False)
    text = str(err.value)
    assert "\n" not in text and "Traceback" not in text and len(text) < 400, text
    if case == "unknown-method":
        assert "unknown method" in text and "lora" in text
    if case in ("empty-train-list", "blank-train", "empty-train-array"):
        assert "train split is empty" in text
    if case == "block-too-long":
        assert "context of 128" in text
    assert leftovers(tmp_path, "out") == []


def test_an_existing_output_folder_is_not_overwritten_unless_asked(tiny, data, tmp_path):
    from edgeft.decoder.finetune import finetune_decoder

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(RunDirError):
        finetune_decoder(tiny, data, cfg("ia3", max_steps=1), out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    finetune_decoder(tiny, data, cfg("ia3", max_steps=1), out, progress=False, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "metrics.json").is_file()


def test_config_is_typed_frozen_and_strict():
    from pydantic import ValidationError

    from edgeft.decoder.finetune import DEFAULT_LR, DecoderFinetuneConfig, decoder_finetune_config

    c = decoder_finetune_config({"method": "adalora"}, epochs=2)
    assert c.epochs == 2 and c.learning_rate == DEFAULT_LR["adalora"]
    with pytest.raises(ValidationError):
        c.epochs = 3  # frozen
    with pytest.raises(ValidationError):
        DecoderFinetuneConfig(lr="1e-3")  # strict: no coercion
    for bad in ({"lr": -1.0}, {"adalora": {"init_r": 4, "target_r": 8}},
                {"ia3": {"target_modules": ["k_proj"], "feedforward_modules": ["down_proj"]}}, {"epochs": 0}):
        with pytest.raises(RecipeError) as err:
            decoder_finetune_config(bad)
        assert "\n" not in str(err.value)


# ---------------------------------------------------------------- budget, seeding, corpora

def test_the_max_minutes_budget_stops_training(tiny, data, tmp_path):
    from edgeft.decoder.finetune import finetune_decoder

    res = finetune_decoder(tiny, data, cfg("lora", max_steps=None, epochs=50, max_minutes=0.02), tmp_path / "out",
                           progress=False, on_step=lambda info: time.sleep(0.25))
    m = res.metrics
    assert m["stopped_by"] == "max_minutes"
    assert 1 <= m["steps"] < m["planned_steps"] and m["planned_steps"] == 50 * 12
    assert not m["epochs"][-1]["complete"]
    assert m["validation"]["after"]["perplexity"] == m["epochs"][-1]["validation_perplexity"]
    assert (res.out_dir / "model.safetensors").is_file()


def test_runs_are_seeded(tiny, data, tmp_path):
    from edgeft.decoder.finetune import finetune_decoder

    a = finetune_decoder(tiny, data, cfg("lora", max_steps=3), tmp_path / "a", progress=False)
    b = finetune_decoder(tiny, data, cfg("lora", max_steps=3), tmp_path / "b", progress=False)
    assert a.perplexity_after == b.perplexity_after
    assert (a.out_dir / "model.safetensors").read_bytes() == (b.out_dir / "model.safetensors").read_bytes()


def test_takes_a_corpus_of_documents(tiny, tmp_path):
    from edgeft.decoder.corpus import load_corpus
    from edgeft.decoder.finetune import finetune_decoder

    src = tmp_path / "text.txt"
    src.write_text("\n\n".join([TEXT.strip()] * 6))
    corpus = load_corpus(src)
    res = finetune_decoder(tiny, corpus, cfg("lora", max_steps=2, epochs=1), tmp_path / "out", progress=False)
    assert res.metrics["train_blocks"] > 0 and res.metrics["steps"] == 2


def test_the_schedule_fits_the_wall_clock_budget():
    import math

    from edgeft.decoder.finetune import BudgetSchedule

    s = BudgetSchedule(1000, 0.1, deadline=100.0)
    assert s.factor(50) == 0.5 and s.total == 1000  # no timing yet: the planned steps
    s.observe(1, 1.0)   # the first step (compile, caches) is not a typical step
    s.observe(11, 11.0)  # then 1 s a step: 89 s left -> 89 more steps fit
    assert s.total == 100
    assert s.factor(0) == 0 and s.factor(5) == 0.5 and s.factor(10) == 1.0  # warm-up: 10% of 100 steps
    assert s.factor(55) == 0.5 and s.factor(100) == 0.0  # decays to zero at the budget
    s.observe(50, 200.0)  # past the deadline: the schedule ends now
    assert s.total == 50
    free = BudgetSchedule(40, 0.05, deadline=math.inf)
    free.observe(1, 1.0), free.observe(2, 2.0)
    assert free.total == 40 and free.factor(2) == 1.0
