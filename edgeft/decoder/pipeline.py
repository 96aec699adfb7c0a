"""``edgeft run`` for a text-generation recipe: the stages of a decoder run, in one run folder.

    finetuned/                 the fine-tuned model (adapters merged), metrics.json, generations.json
    compress/onnx_fp32/        the KV-cache export (lm_head untied), validated against torch
    compress/candidates/NAME/  every weight-only candidate, each checked against onnx_fp32
    compress/report.json       export parity, every candidate's check, the choice, test perplexities
    bench.json, bench.md       tokens/s, time to first token, prompt tokens/s, size, perplexity per
                               variant and thread count, interleaved rounds

Settings are chosen on the validation blocks; the test blocks only report. The model, the corpus and
the blocks are resolved before the run folder is made, so bad input writes nothing.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeft.decoder.recipe import DecoderBenchConfig, DecoderCompressConfig, DecoderRecipe

REPORT_SCHEMA = "edgeft.decoder-compress/1"
BENCH_SCHEMA = "edgeft.decoder-bench/2"  # /2: raw per-round samples and model identities
FP32 = "onnx_fp32"
CANDIDATES = "candidates"


@dataclass
class DecoderInputs:
    """What every stage needs, resolved before the run folder exists."""

    model_dir: Path
    tokenizer: Any
    corpus: Any
    validation: np.ndarray  # [n, block_size] token blocks: choices
    test: np.ndarray        # report only
    prompt: list[int]       # the bench prompt: the first tokens of a test document


def resolve_inputs(recipe: DecoderRecipe) -> DecoderInputs:
    from edgeft.decoder.corpus import load_corpus, token_blocks
    from edgeft.decoder.model import resolve_decoder, load_tokenizer
    from edgeft.errors import DataError

    model_dir = resolve_decoder(recipe.model.name)
    tok = load_tokenizer(model_dir)
    d = recipe.data
    corpus = load_corpus(d.corpus, tokenizer=tok, seed=recipe.seed, max_documents=d.max_documents)
    validation = token_blocks(tok, corpus.validation, d.block_size, max_blocks=d.eval_blocks)
    test = token_blocks(tok, corpus.test, d.block_size, max_blocks=d.eval_blocks)
    want = recipe.bench.prompt_tokens
    prompt: list[int] = []
    for doc in corpus.test:  # the first test document(s): a real text, never one the choices saw
        prompt += tok(doc, add_special_tokens=False)["input_ids"][:want - len(prompt)]
        if len(prompt) >= want:
            break
    if len(prompt) < want:
        raise DataError(f"the test split has fewer than {want} tokens for the bench prompt",
                        "lower bench.prompt_tokens or give a larger corpus")
    from edgeft.decoder.generate import check_prompt, folder_context_length

    check_prompt(prompt, recipe.bench.new_tokens, folder_context_length(Path(model_dir)))  # prompt + new tokens fit?
    return DecoderInputs(Path(model_dir), tok, corpus, validation, test, prompt)


def _schemes(cfg: DecoderCompressConfig):
    from edgeft.decoder.quantize import WeightOnlyScheme, check_scheme_for_exporter

    schemes = [WeightOnlyScheme(**s.model_dump()) for s in cfg.schemes]  # its own checks: one-line errors
    for s in schemes:
        check_scheme_for_exporter(s, cfg.exporter)
    return schemes


def compress_decoder(inputs: DecoderInputs, cfg: DecoderCompressConfig, out_dir: Path) -> dict[str, Any]:
    """Export, quantize every scheme, check and choose; write out_dir/report.json; return the report.
    A missed goal is raised (GoalMissed) after the report is written, unless ``allow_miss``."""
    from edgeft.artifacts import write_json_atomic
    from edgeft.decoder.evaluate import ort_perplexity
    from edgeft.decoder.export import export_decoder, prompt_ids
    from edgeft.decoder.generate import OrtDecoder
    from edgeft.decoder.quantize import quantize_and_choose

    schemes = _schemes(cfg)
    t0 = time.time()
    onnx_path, parity = export_decoder(inputs.model_dir, out_dir / FP32, blocks=inputs.validation, threads=cfg.threads,
                                       exporter=cfg.exporter)
    prompts = prompt_ids(inputs.tokenizer)
    needs_calibration = any(s.algorithm == "gptq" for s in schemes)
    calibration = inputs.validation if needs_calibration else None  # GPTQ's Hessians; choices stay on validation
    choice = quantize_and_choose(onnx_path, out_dir / CANDIDATES, schemes, inputs.validation, prompts,
                                 calibration=calibration, max_perplexity_increase=cfg.max_perplexity_increase,
                                 by=cfg.choose_by, threads=cfg.threads, source_model=inputs.model_dir)
    test_ppl = {FP32: ort_perplexity(OrtDecoder(onnx_path, threads=cfg.threads), inputs.test).perplexity}
    if choice.chosen is not None:
        test_ppl[choice.chosen.name] = ort_perplexity(OrtDecoder(choice.chosen.path, threads=cfg.threads),
                                                      inputs.test).perplexity
    report = {"schema": REPORT_SCHEMA, "task": "text-generation", "source_model": str(inputs.model_dir),
              "corpus": inputs.corpus.summary(), "block_size": int(inputs.validation.shape[1]),
              "validation_blocks": int(len(inputs.validation)), "test_blocks": int(len(inputs.test)),
              "export": {"path": f"{FP32}/{onnx_path.name}", **parity.summary()},
              "quantize": _relative(choice.summary(), out_dir), "max_perplexity_increase": cfg.max_perplexity_increase,
              "goal_met": choice.goal_met, "final": choice.chosen.name if choice.chosen else FP32,
              "final_path": str(Path(choice.chosen.path).relative_to(out_dir)) if choice.chosen else f"{FP32}/model.onnx",
              "test_perplexity": test_ppl, "seconds": round(time.time() - t0, 1),
              "verdict": choice.reason}
    write_json_atomic(out_dir / "report.json", report)
    if not choice.goal_met and not cfg.allow_miss:
        from edgeft.errors import GoalMissed

        err = GoalMissed(f"no weight-only candidate within +{cfg.max_perplexity_increase:.1%} validation perplexity; "
                         f"kept {report['final']}", "set compress.allow_miss=true to accept it, or add 8-bit schemes")
        err.report = report
        raise err
    return report


def _relative(summary: dict[str, Any], root: Path) -> dict[str, Any]:
    """Candidate paths relative to the compress folder (it is built aside, then renamed)."""
    for c in summary.get("candidates", []):
        if c.get("path") and Path(c["path"]).is_relative_to(root):
            c["path"] = Path(c["path"]).relative_to(root).as_posix()
    return summary


def _variant_files(name: str, path: Path) -> list[Path]:
    """The files that make a variant (as the classification bench records them): the torch model's
    safetensors, an ONNX model's graph and its external data."""
    if name == "torch_fp32":
        return sorted(Path(path).glob("*.safetensors"))
    from edgeft.bench.runtimes import onnx_files

    return onnx_files(Path(path))


def _tokens_sha256(tokens) -> str:
    """sha256 of token ids (shape included): the gate compares perplexity and latency only on the same tokens."""
    import hashlib

    arr = np.ascontiguousarray(np.asarray(tokens, dtype=np.int64))
    return hashlib.sha256(f"{arr.shape}".encode() + arr.tobytes()).hexdigest()


def bench_decoder(inputs: DecoderInputs, compress_dir: Path, cfg: DecoderBenchConfig, out_json: Path,
                  out_md: Path, *, progress=None) -> dict[str, Any]:
    """Greedy generation (batch 1) of every variant at every thread count, interleaved over
    ``cfg.repeats`` rounds (order rotated each round); medians. Test-split perplexity per variant.

    Each row also keeps its raw samples, in round order, for ``edgeft gate``: ``decode_step_ms`` (per round,
    every decode step's latency: new_tokens - 1 of them) and ``ttft_round_ms`` (per round, time to first token);
    ``models`` holds each variant's files' sha256, ``eval`` / ``prompt`` the sha256 of the tokens measured."""
    import torch

    from edgeft.artifacts import cpu_info, sha256_file, write_json_atomic, write_text_atomic
    from edgeft.decoder.evaluate import ort_perplexity, torch_perplexity
    from edgeft.decoder.generate import OrtDecoder, torch_greedy
    from edgeft.decoder.model import load_causal_lm
    from edgeft.decoder.quantize import onnx_size_mb

    report = json.loads((compress_dir / "report.json").read_text(encoding="utf-8"))
    onnx_variants = {FP32: compress_dir / FP32 / "model.onnx"}
    for c in report["quantize"]["candidates"]:
        if not c.get("rejected"):
            onnx_variants[c["name"]] = compress_dir / CANDIDATES / c["name"] / "model.onnx"
    torch_model = load_causal_lm(inputs.model_dir) if cfg.torch else None
    rows: dict[tuple[str, int], list[dict]] = {}
    sessions: dict[tuple[str, int], Any] = {}
    names = (["torch_fp32"] if torch_model is not None else []) + list(onnx_variants)

    def once(name: str, threads: int) -> dict:
        if name == "torch_fp32":
            torch.set_num_threads(threads)
            res = torch_greedy(torch_model, inputs.prompt, cfg.new_tokens)
        else:
            key = (name, threads)
            if key not in sessions:
                sessions[key] = OrtDecoder(onnx_variants[name], threads=threads)
                sessions[key].generate(inputs.prompt, 4)  # warm-up
            res = sessions[key].generate(inputs.prompt, cfg.new_tokens)
        return {"decode_tok_s": res.decode_tok_s, "ttft_ms": res.ttft_s * 1000, "prompt_tok_s": res.prompt_tok_s,
                "new_tokens": len(res.tokens),
                "decode_step_ms": [round(x * 1000, 4) for x in res.extra.get("decode_step_s", [])]}

    if torch_model is not None:
        torch_greedy(torch_model, inputs.prompt, 4)  # warm-up
    for r in range(cfg.repeats):
        for threads in cfg.threads:
            order = names[r % len(names):] + names[:r % len(names)]  # rotated: drift hits every variant alike
            for name in order:
                rows.setdefault((name, threads), []).append(once(name, threads))
                if progress:
                    progress(f"round {r + 1}/{cfg.repeats}, {threads} thread(s): {name}")
        sessions.clear()  # a fresh session per round and thread count: no variant keeps a warm cache

    ppl: dict[str, float] = {}
    if torch_model is not None:
        torch.set_num_threads(max(cfg.threads))
        ppl["torch_fp32"] = torch_perplexity(torch_model, inputs.test).perplexity
    for name, path in onnx_variants.items():
        ppl[name] = ort_perplexity(OrtDecoder(path, threads=max(cfg.threads)), inputs.test).perplexity
    sizes = {name: onnx_size_mb(path) for name, path in onnx_variants.items()}
    if torch_model is not None:
        sizes["torch_fp32"] = sum(p.stat().st_size for p in inputs.model_dir.glob("*.safetensors")) / 1e6
    table = []
    for (name, threads), samples in rows.items():
        med = {k: statistics.median(s[k] for s in samples) for k in ("decode_tok_s", "ttft_ms", "prompt_tok_s")}
        spread = max(s["decode_tok_s"] for s in samples) / min(s["decode_tok_s"] for s in samples) - 1
        table.append({"variant": name, "threads": threads, **med, "decode_spread": spread, "rounds": len(samples),
                      "size_mb": sizes.get(name), "test_perplexity": ppl.get(name),
                      "perplexity_increase_vs_fp32": ppl[name] / ppl[FP32] - 1 if name in ppl else None,
                      # raw samples in round order (round r of every row ran in the same interleaved round)
                      "decode_step_ms": [s["decode_step_ms"] for s in samples],
                      "ttft_round_ms": [round(s["ttft_ms"], 4) for s in samples]})
    for row in table:
        ref = next((x for x in table if x["variant"] == ("torch_fp32" if torch_model is not None else FP32)
                    and x["threads"] == row["threads"]), None)
        row["speedup_vs_reference"] = row["decode_tok_s"] / ref["decode_tok_s"] if ref else None
    paths = {**({"torch_fp32": inputs.model_dir} if torch_model is not None else {}), **onnx_variants}
    models = [{"name": name, "path": str(path),
               "files": {f.name: sha256_file(f) for f in _variant_files(name, path) if f.is_file()}}
              for name, path in paths.items()]
    out = {"schema": BENCH_SCHEMA, "task": "text-generation", "cpu": cpu_info(), "prompt_tokens": len(inputs.prompt),
           "new_tokens": cfg.new_tokens, "repeats": cfg.repeats, "threads": cfg.threads,
           "reference": "torch_fp32" if torch_model is not None else FP32, "rows": table,
           "chosen": report["final"], "test_blocks": int(len(inputs.test)), "block_size": int(inputs.test.shape[1]),
           "prompt": {"tokens": len(inputs.prompt), "sha256": _tokens_sha256(inputs.prompt)},
           "eval": {"split": "test", "blocks": int(len(inputs.test)), "block_size": int(inputs.test.shape[1]),
                    "sha256": _tokens_sha256(inputs.test)},
           "models": models}
    write_json_atomic(out_json, out)
    write_text_atomic(out_md, render_bench_md(out))
    return out


def _step_p50_ms(row: dict[str, Any]) -> str:
    """Median decode step latency over all of a row's rounds, for bench.md ('' without raw samples)."""
    steps = [x for r in row.get("decode_step_ms") or [] for x in r]
    return f"{statistics.median(steps):.2f}" if steps else ""


def render_bench_md(b: dict[str, Any]) -> str:
    cpu = b["cpu"]
    lines = [f"# decoder bench ({b['prompt_tokens']}-token prompt, {b['new_tokens']} new tokens, greedy, batch 1)", "",
             f"CPU: {cpu['model']} ({', '.join(cpu['flags']) or 'no int8 flags'}); medians of {b['repeats']} "
             f"interleaved rounds; perplexity on {b['test_blocks']} test blocks of {b['block_size']} tokens; "
             f"chosen by compress: {b['chosen']}", "",
             "| variant | threads | decode tok/s | vs reference | ms/token p50 | spread | first token ms "
             "| prompt tok/s | MB | test ppl | ppl vs fp32 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(b["rows"], key=lambda r: (r["threads"], -r["decode_tok_s"])):
        inc = r["perplexity_increase_vs_fp32"]
        lines.append(f"| {r['variant']} | {r['threads']} | {r['decode_tok_s']:.1f} | "
                     f"{r['speedup_vs_reference']:.2f}x | {_step_p50_ms(r)} | {r['decode_spread']:.0%} | "
                     f"{r['ttft_ms']:.1f} | {r['prompt_tok_s']:.0f} | "
                     f"{r['size_mb']:.0f} | {r['test_perplexity']:.2f} | {'' if inc is None else f'{inc:+.1%}'} |")
    lines += ["", "spread: max / min - 1 of the rounds' decode tok/s. bench.json keeps every round's per-token decode "
              "step latencies and time to first token, and each variant's files' sha256, for `edgeft gate` "
              f"(schema {b['schema']})."]
    return "\n".join(lines) + "\n"


def run_decoder(recipe: DecoderRecipe, run_dir: str | Path, *, force: bool = False, show_progress: bool = True) -> Path:
    """The recipe's stages into a fresh run folder (locked while it runs; the manifest says how it ended)."""
    from edgeft.artifacts import open_run_dir, partial_dir, replace_dir, sha256_file, write_manifest
    from edgeft.layout import COMPRESS, RunLayout
    from edgeft.pipeline import _recorded, _save_recipe
    from edgeft.progress import console

    def say(msg: str) -> None:
        if show_progress:
            console.print(f"[dim]decoder:[/] {msg}", highlight=False)

    say(f"model {recipe.model.name}, corpus {recipe.data.corpus}")
    inputs = resolve_inputs(recipe)  # bad model / corpus / prompt: fails before the run folder exists
    _schemes(recipe.compress)
    with open_run_dir(run_dir, force=force) as run_dir:
        layout = RunLayout(run_dir)
        _save_recipe(recipe, layout.recipe)
        done: list[str] = []

        def manifest(fields: dict) -> None:
            write_manifest(layout.root, recipe_sha256=sha256_file(layout.recipe), seed=recipe.seed, data=inputs.corpus.summary(),
                           stages=done, extra={"task": "text-generation", **fields})

        with _recorded(manifest) as state:
            if "finetune" in recipe.stages:
                from edgeft.decoder.finetune import finetune_decoder

                state["stage"] = "finetune"
                say(f"finetune: {recipe.finetune.method}, at most {recipe.finetune.max_minutes} min")
                res = finetune_decoder(inputs.model_dir, inputs.corpus,
                                       recipe.finetune.model_copy(update={"seed": recipe.seed}), layout.finetuned,
                                       progress=show_progress)
                say(f"finetune: validation perplexity {res.perplexity_before:.2f} -> {res.perplexity_after:.2f}")
                inputs.model_dir = Path(res.out_dir).resolve()  # compress and bench take the fine-tuned model
                done.append("finetune")
            if "compress" in recipe.stages:
                state["stage"] = "compress"
                say("compress: ONNX export with KV cache, then every weight-only scheme, checked on validation")
                with partial_dir(layout.root, COMPRESS) as stage:
                    built = RunLayout(stage).compress
                    built.mkdir(parents=True, exist_ok=True)
                    try:
                        report = compress_decoder(inputs, recipe.compress, built)
                    finally:
                        if (built / "report.json").is_file():
                            replace_dir(built, layout.compress)
                say(f"compress: {report['verdict']}")
                done.append("compress")
            if "bench" in recipe.stages:
                state["stage"] = "bench"
                say("bench: greedy generation per variant and thread count, interleaved")
                bench_decoder(inputs, layout.compress, recipe.bench, layout.bench_json, layout.bench_md,
                              progress=say if show_progress else None)
                done.append("bench")
    return run_dir
