"""``edgeft ship`` for a text-generation run folder (``edgeft run`` on a decoder recipe): the chosen ONNX
variant as a self-verifying bundle, in edgeft.bundle's layout with the classification bundle's safety
(built aside and renamed, refused over an existing folder without --force, every file in SHA256SUMS and
the manifest, a deterministic .tar.gz).

The variant is compress/report.json's ``final`` unless ``--variant`` names another (``onnx_fp32`` /
``fp32``, or a candidate's name, or ``int8`` / ``int4`` when one candidate has those bits). A variant
outside the perplexity goal needs ``--allow-miss``; a candidate that compress rejected (garbage) is
never shipped. Golden generations come from edgeft.decoder.golden, recorded with the staged model.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeft import __version__
from edgeft.bundle import (BUNDLE_SCHEMA, DECODER_MODEL_FILES, GOLDEN_GENERATION, MANIFEST, MODEL_CARD, MODEL_DIR,
                           MODEL_ONNX, SERVING_DIR, SUMS, TASK_GENERATION, sums_text)
from edgeft.errors import EdgeftError, GoalMissed
from edgeft.ship import ShipResult, _onnx_io, bundle_target, write_tarball

from edgeft.decoder.pipeline import BENCH_SCHEMA, CANDIDATES, FP32, REPORT_SCHEMA  # the run folder's compress/ layout

FP32_ALIASES = ("fp32", "onnx", "onnx_fp32")


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def is_decoder_run(run_dir: Path) -> bool:
    """The run folder is a text-generation run: its manifest, recipe or compress report says so."""
    import yaml

    from edgeft.layout import RunLayout

    layout = RunLayout(Path(run_dir))
    if (_read_json(layout.manifest) or {}).get("task") == TASK_GENERATION:
        return True
    try:
        recipe = yaml.safe_load(layout.recipe.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        recipe = None
    if isinstance(recipe, dict) and recipe.get("task") == TASK_GENERATION:
        return True
    return str((_read_json(layout.compress_report) or {}).get("schema", "")).startswith("edgeft.decoder-compress/")


@dataclass
class DecoderVariant:
    name: str
    onnx: Path              # in the run folder
    precision: str          # fp32 | int8 | int4
    meets_goal: bool
    rejected: bool
    record: dict[str, Any]  # the candidate's check (or the export's parity report for fp32)


def _variants(run_dir: Path, report: dict[str, Any]) -> dict[str, DecoderVariant]:
    comp = (run_dir / "compress").resolve()
    goal = report.get("max_perplexity_increase")
    out: dict[str, DecoderVariant] = {}
    fp32 = comp / FP32 / "model.onnx"
    if fp32.is_file():
        out[FP32] = DecoderVariant(FP32, fp32, "fp32", True, False, report.get("export") or {})
    for c in (report.get("quantize") or {}).get("candidates") or []:
        if not isinstance(c, dict) or not isinstance(c.get("name"), str):
            continue
        path = (comp / str(c.get("path") or f"{CANDIDATES}/{c['name']}/model.onnx")).resolve()
        if not path.is_relative_to(comp):
            raise EdgeftError(f"compress/report.json: candidate {c['name']} points outside {comp}",
                              "re-run the compress stage (edgeft run)")
        if not path.is_file():
            continue
        bits = (c.get("scheme") or {}).get("bits")
        inc = c.get("perplexity_increase")
        meets = (not c.get("rejected") and isinstance(inc, (int, float)) and isinstance(goal, (int, float))
                 and inc <= goal and not (c["name"] == report.get("final") and report.get("goal_met") is False))
        out[c["name"]] = DecoderVariant(c["name"], path, f"int{bits}" if bits in (4, 8) else "quantized", meets,
                                        bool(c.get("rejected")), c)
    return out


def choose(run_dir: Path, report: dict[str, Any], cfg) -> DecoderVariant:
    variants = _variants(run_dir, report)
    if not variants:
        raise EdgeftError(f"{run_dir}/compress has no ONNX model", "re-run the compress stage (edgeft run)")
    goal = report.get("max_perplexity_increase")
    if cfg.variant:
        key = cfg.variant.strip()
        name = FP32 if key.lower() in FP32_ALIASES else key
        if name not in variants:
            bits = [v for v in variants.values() if v.precision == key.lower()]
            if len(bits) == 1:
                name = bits[0].name
        if name not in variants:
            names = ", ".join(f"{n} (fp32)" if n == FP32 else n for n in variants)
            raise EdgeftError(f"no variant '{cfg.variant}' in this run", f"choose one of: {names}")
        v = variants[name]
    else:
        v = variants.get(str(report.get("final"))) or variants.get(FP32) or next(iter(variants.values()))
    if v.rejected:
        raise EdgeftError(f"variant {v.name} was rejected by the compress checks ({'; '.join(v.record.get('problems') or [])[:160]})",
                          "ship another variant (--variant fp32, or a candidate the checks kept)")
    if not v.meets_goal and not cfg.allow_miss:
        inc = v.record.get("perplexity_increase")
        raise GoalMissed(f"variant {v.name} missed the perplexity goal (validation "
                         f"{'+' + format(inc, '.1%') if isinstance(inc, (int, float)) else '?'} > +{goal:.1%} vs fp32)"
                         if isinstance(goal, (int, float)) else f"variant {v.name} missed the perplexity goal",
                         "pass --allow-miss to ship it anyway (the manifest and model card say so), or --variant fp32")
    return v


# ---------------------------------------------------------------- parts


def copy_onnx_with_data(src: Path, model_dir: Path) -> list[str]:
    """``src`` as ``model_dir/model.onnx`` with its external data files beside it under their own relative
    names (checked first: inside the source folder, regular files, no links). Returns the data files."""
    import onnx

    from edgeft.safeio import check_onnx_external_data, onnx_tensors

    check_onnx_external_data(src)
    head = onnx.load(str(src), load_external_data=False)
    locations = sorted({e.value for _, t in onnx_tensors(head) if t.data_location == onnx.TensorProto.EXTERNAL
                        for e in t.external_data if e.key == "location"})
    shutil.copyfile(src, model_dir / "model.onnx")
    for loc in locations:
        dst = model_dir / loc
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src.parent / loc, dst)
    return locations


def _model_section(decoder, tokenizer, config: dict[str, Any]) -> dict[str, Any]:
    arch = config.get("architectures")
    return {"architecture": arch[0] if isinstance(arch, list) and arch else config.get("model_type"),
            "model_type": config.get("model_type"), "context_length": decoder.context,
            "vocab_size": config.get("vocab_size"), "layers": config.get("num_hidden_layers"),
            "kv_heads": decoder.kv_heads, "head_dim": decoder.head_dim, "kv_dtype": str(decoder.kv_dtype.__name__),
            "eos_token_ids": tokenizer.eos_token_ids, "bos_token": tokenizer.special_tokens.get("bos_token"),
            "eos_token": tokenizer.special_tokens.get("eos_token")}


def _perplexity(report: dict[str, Any], v: DecoderVariant) -> dict[str, Any]:
    exp = report.get("export") or {}
    test = report.get("test_perplexity") or {}
    fp32_val = exp.get("perplexity_onnx")
    val = fp32_val if v.name == FP32 else v.record.get("perplexity")
    fp32_test, shipped_test = test.get(FP32), test.get(v.name)

    def inc(a, b):
        return a / b - 1 if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None

    return {"source": "compress/report.json", "corpus": report.get("corpus"), "block_size": report.get("block_size"),
            "validation_blocks": report.get("validation_blocks"), "test_blocks": report.get("test_blocks"),
            "max_increase": report.get("max_perplexity_increase"), "goal_met": v.meets_goal,
            "validation": {"fp32": fp32_val, "shipped": val, "increase": inc(val, fp32_val)},
            "test": {"fp32": fp32_test, "shipped": shipped_test, "increase": inc(shipped_test, fp32_test)},
            "top1_agreement_vs_fp32": v.record.get("top1_agreement") if v.name != FP32 else 1.0}


def _bench(bench: dict[str, Any] | None, v: DecoderVariant) -> dict[str, Any] | None:
    if not bench or bench.get("schema") != BENCH_SCHEMA:
        return None
    raw = ("decode_step_ms", "ttft_round_ms")  # the gate's raw samples stay in the run's bench.json

    def lean(r: dict) -> dict:
        return {k: x for k, x in r.items() if k not in raw}

    rows = [lean(r) for r in bench.get("rows", []) if isinstance(r, dict) and r.get("variant") == v.name]
    if not rows:
        return None
    ref = bench.get("reference")
    return {"source": "bench.json", "cpu": bench.get("cpu"), "prompt_tokens": bench.get("prompt_tokens"),
            "new_tokens": bench.get("new_tokens"), "repeats": bench.get("repeats"), "reference": ref,
            "rows": sorted(rows, key=lambda r: r.get("threads", 0)),
            "reference_rows": sorted((lean(r) for r in bench.get("rows", []) if isinstance(r, dict) and r.get("variant") == ref),
                                     key=lambda r: r.get("threads", 0))}


def serving_defaults(context: int) -> dict[str, Any]:
    """The manifest's serving section: ServeConfig defaults, the token limits cut to the context."""
    from edgeft.serve.config import ServeConfig

    d = ServeConfig()
    serving = {"queue_capacity": d.queue_capacity, "generation_slots": d.generation_slots,
               "max_new_tokens": max(1, min(d.max_new_tokens, context - 1)),
               "default_max_tokens": max(1, min(d.default_max_tokens, context - 1)),
               "request_timeout_s": d.request_timeout_s, "threads": None}
    ServeConfig.model_validate(serving)  # the server must accept what the bundle says
    return serving


def _fmt(x: Any, spec: str = ".2f") -> str:
    return "-" if not isinstance(x, (int, float)) or isinstance(x, bool) else format(x, spec)


def model_card(m: dict[str, Any], base_model: str) -> str:
    v, p, mod, g = m["variant"], m["perplexity"], m["model"], m["golden"]
    corpus = p.get("corpus") or {}
    lines = [f"# Model card: {m['name']} {m['version']}", "",
             f"A causal (decoder) language model for text generation: the `{v['name']}` ({v['precision']}) ONNX "
             f"export with KV cache of `{base_model}`, compressed by edgeft (weight-only quantization checked against "
             f"the fp32 export). Written by edgeft {__version__} (`edgeft ship`); serve it with `edgeft serve` "
             "(OpenAI-compatible: /v1/completions, /v1/chat/completions), check a copy with `edgeft verify`.", ""]
    if not v["meets_goal"]:
        lines += [f"**This variant MISSED the perplexity goal** (validation {_fmt(p['validation']['increase'], '+.1%')} "
                  f"> +{_fmt(p['max_increase'], '.1%')} vs fp32) and was shipped with `--allow-miss`.", ""]
    lines += ["## Data", "", f"Corpus `{corpus.get('name')}` ({corpus.get('kind')}): "
              f"{corpus.get('train_documents')} train, {corpus.get('validation_documents')} validation and "
              f"{corpus.get('test_documents')} test documents; perplexity on {p.get('validation_blocks')} validation "
              f"and {p.get('test_blocks')} test blocks of {p.get('block_size')} tokens. Choices were made on "
              "validation; test only reports.", "",
              "## Perplexity", "", "| model | validation | test |", "|---|---|---|",
              f"| fp32 ONNX | {_fmt(p['validation']['fp32'])} | {_fmt(p['test']['fp32'])} |",
              f"| **shipped `{v['name']}`** | **{_fmt(p['validation']['shipped'])}** | **{_fmt(p['test']['shipped'])}** |",
              f"| change | {_fmt(p['validation']['increase'], '+.2%')} | {_fmt(p['test']['increase'], '+.2%')} |", "",
              f"Goal: at most +{_fmt(p['max_increase'], '.1%')} validation perplexity vs fp32: "
              f"{'met' if v['meets_goal'] else 'MISSED'}."
              + (f" Teacher-forced next-token agreement with fp32: {_fmt(p['top1_agreement_vs_fp32'], '.3f')}."
                 if p.get("top1_agreement_vs_fp32") is not None else ""), "", "## Speed", ""]
    b = m.get("bench")
    if b:
        cpu = b.get("cpu") or {}
        lines += [f"`edgeft run`'s bench on {cpu.get('model')} (int8 flags: {', '.join(cpu.get('flags') or []) or 'none'}): "
                  f"greedy, batch 1, a {b.get('prompt_tokens')}-token prompt and {b.get('new_tokens')} new tokens, "
                  f"medians of {b.get('repeats')} interleaved rounds.", "",
                  "| variant | threads | decode tok/s | first token ms | prompt tok/s | MB | vs reference |",
                  "|---|---|---|---|---|---|---|"]
        for r in b["rows"] + b.get("reference_rows", []):
            lines.append(f"| {r.get('variant')} | {r.get('threads')} | {_fmt(r.get('decode_tok_s'), '.1f')} | "
                         f"{_fmt(r.get('ttft_ms'), '.1f')} | {_fmt(r.get('prompt_tok_s'), '.0f')} | "
                         f"{_fmt(r.get('size_mb'), '.1f')} | {_fmt(r.get('speedup_vs_reference'), '.2f')}x |")
    else:
        lines += ["The run has no bench figures for this variant (its recipe had no bench stage)."]
    tol = g["tolerance"]
    lines += ["", "## Limits", "",
              f"- Context: {mod['context_length']} tokens for the prompt and the new tokens together; longer prompts "
              "are refused (400), never cut.",
              f"- Trained and measured only on `{corpus.get('name')}`; the model card's figures say nothing about "
              "other text.",
              f"- Chat: {'the tokenizer has a chat template (used by /v1/chat/completions)' if m['tokenizer']['chat_template'] else 'no chat template: only /v1/completions'}.",
              f"- Golden generations: {g['count']} prompts, greedy; `edgeft verify` wants the first "
              f"{tol['prefix_tokens']} tokens exact and >= {tol['min_teacher_forced_agreement']:.0%} teacher-forced "
              f"agreement: {tol['why']}."]
    if v["precision"] in ("int8", "int4"):
        cpu = m["environment"]["cpu"]
        lines += [f"- {v['precision']} weight-only speed depends on the CPU's int8 instructions (shipped on "
                  f"{cpu.get('model')}: {', '.join(cpu.get('flags') or []) or 'no int8 extensions'}); sampled "
                  "(temperature > 0) output is random by design (pass `seed` to repeat it)."]
    return "\n".join(lines) + "\n"


@dataclass
class DecoderShipResult(ShipResult):
    def render(self) -> str:
        m = self.manifest
        v, p, g = m["variant"], m["perplexity"], m["golden"]
        lines = [f"shipped {m['name']} {m['version']}: variant {v['name']} ({v['precision']}), text generation"
                 + ("  [MISSED the perplexity goal: shipped with --allow-miss]" if not v["meets_goal"] else ""),
                 f"  perplexity: validation {_fmt(p['validation']['shipped'])} ({_fmt(p['validation']['increase'], '+.1%')} "
                 f"vs fp32), test {_fmt(p['test']['shipped'])} ({_fmt(p['test']['increase'], '+.1%')})",
                 f"  golden: {g['count']} prompts, greedy; context {m['model']['context_length']} tokens; chat template: "
                 f"{'yes' if m['tokenizer']['chat_template'] else 'no'}",
                 f"  bundle:  {self.bundle}", f"  archive: {self.tarball}",
                 "next:", f"  edgeft verify {self.bundle}",
                 f"  edgeft serve {self.bundle} --port 8000      # then: curl localhost:8000/v1/models (OpenAI API)",
                 f"  (on another machine: tar xzf {self.tarball.name} && edgeft verify {m['name']}-{m['version']})"]
        return "\n".join(lines)


def _load(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any] | None, Any, dict[str, Any]]:
    from edgeft.layout import RunLayout
    from edgeft.recipe import load_recipe

    layout = RunLayout(run_dir)
    if not run_dir.is_dir():
        raise EdgeftError(f"run folder {run_dir} not found", "pass a folder written by 'edgeft run'")
    fix = ("run `edgeft run RECIPE` with a compress stage (stages: [compress] or [finetune, compress, bench]) "
           "and ship its run folder")
    if not layout.compress_report.is_file():
        raise EdgeftError(f"{run_dir} has no compress/report.json: this text-generation run has no finished "
                          "compress stage", fix)
    report = _read_json(layout.compress_report)
    if report is None:
        raise EdgeftError(f"{layout.compress_report} is not valid JSON", fix)
    if report.get("schema") != REPORT_SCHEMA:
        raise EdgeftError(f"{layout.compress_report} has schema {report.get('schema')!r}; this edgeft reads "
                          f"'{REPORT_SCHEMA}'", fix)
    bench = None
    if layout.bench_json.is_file():
        bench = _read_json(layout.bench_json)
        if bench is None:
            raise EdgeftError(f"{layout.bench_json} is not valid JSON", "re-run the bench stage or delete bench.json")
    recipe = load_recipe(layout.recipe) if layout.recipe.is_file() else None
    return report, bench, recipe, _read_json(layout.manifest) or {}


def ship_decoder(cfg, *, extra_parts: Sequence = ()) -> DecoderShipResult:
    """Build a text-generation bundle (see the module docstring). ``extra_parts`` (callables of a
    ShipContext-like object with ``stage``, ``manifest``, ``name``, ``version``, ``cfg``) run before the
    manifest and checksums are written, so their files are covered too."""
    from edgeft.artifacts import atomic_dir, environment_fingerprint, sha256_file
    from edgeft.decoder import golden
    from edgeft.decoder.generate import OrtDecoder
    from edgeft.decoder.text import DecoderTokenizer
    from edgeft.monitoring import prometheus_yaml, systemd_unit

    run_dir = Path(cfg.run_dir)
    report, bench, recipe, run_manifest = _load(run_dir)
    if cfg.triton or cfg.kubernetes:
        raise EdgeftError(f"--{'triton' if cfg.triton else 'kubernetes'} packages text-classification bundles only; "
                          "this is a text-generation run", "ship it without that flag")
    variant = choose(run_dir, report, cfg)
    name = cfg.name or (recipe.name if recipe is not None else None)
    if name is None:
        raise EdgeftError(f"{run_dir} has no recipe.yaml to take the model name from", "pass --name NAME")
    out, tarball = bundle_target(cfg, run_dir, name)
    src_dir = variant.onnx.parent
    if not (src_dir / "tokenizer.json").is_file() or not (src_dir / "config.json").is_file():
        raise EdgeftError(f"{src_dir} has no tokenizer.json or config.json beside the model",
                          "re-run the compress stage (it copies them beside every variant)")

    t0 = time.time()
    root = run_dir.resolve()
    manifest: dict[str, Any] = {
        "schema": BUNDLE_SCHEMA, "name": name, "version": cfg.version, "edgeft_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "task": TASK_GENERATION,
        "variant": {"name": variant.name, "precision": variant.precision, "meets_goal": variant.meets_goal,
                    "shipped_with_allow_miss": not variant.meets_goal, "scheme": variant.record.get("scheme"),
                    "source": variant.onnx.relative_to(root).as_posix() if variant.onnx.is_relative_to(root)
                    else str(variant.onnx)},
        "source": {"run_dir": str(root),
                   "manifest_sha256": sha256_file(run_dir / MANIFEST) if (run_dir / MANIFEST).is_file() else None,
                   "recipe_sha256": run_manifest.get("recipe_sha256") or (
                       sha256_file(run_dir / "recipe.yaml") if (run_dir / "recipe.yaml").is_file() else None),
                   "compress_report_sha256": sha256_file(run_dir / "compress" / "report.json"),
                   "bench_sha256": sha256_file(run_dir / "bench.json") if bench else None,
                   "model_sha256": sha256_file(variant.onnx), "source_model": report.get("source_model")},
        "ship_config": cfg.model_dump(mode="json"),
        "environment": environment_fingerprint(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as stage:
        model = stage / MODEL_DIR
        model.mkdir()
        data_files = copy_onnx_with_data(variant.onnx, model)
        for fname in DECODER_MODEL_FILES:
            if (src_dir / fname).is_file() and not (src_dir / fname).is_symlink():
                shutil.copyfile(src_dir / fname, model / fname)
        decoder = OrtDecoder(stage / MODEL_ONNX)  # a KV-cache decoder, or a one-line ModelError
        tokenizer = DecoderTokenizer(model)
        config = json.loads((model / "config.json").read_text(encoding="utf-8"))
        manifest["model"] = _model_section(decoder, tokenizer, config)
        manifest["io"] = {"onnx": _onnx_io(stage / MODEL_ONNX), "external_data": data_files}
        manifest["tokenizer"] = {"files": sorted(p.name for p in model.iterdir() if p.name in DECODER_MODEL_FILES
                                                 and p.name not in ("config.json", "generation_config.json",
                                                                    "edgeft-export.json", "genai_config.json")),
                                 "chat_template": tokenizer.chat_template is not None,
                                 "special_tokens": tokenizer.special_tokens}
        manifest["perplexity"] = _perplexity(report, variant)
        rows = golden.record(decoder, tokenizer)
        (stage / GOLDEN_GENERATION).parent.mkdir()
        (stage / GOLDEN_GENERATION).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                               encoding="utf-8")
        manifest["golden"] = {"path": GOLDEN_GENERATION, "count": len(rows), "decoding": "greedy, eos not stopping",
                              "new_tokens": [len(r["tokens"]) for r in rows], "tolerance": golden.tolerance()}
        manifest["bench"] = _bench(bench, variant)
        manifest["serving"] = serving_defaults(decoder.context)
        serving = stage / SERVING_DIR
        serving.mkdir()
        from edgeft.serve.config import ServeConfig

        (serving / "prometheus.yml").write_text(prometheus_yaml(), encoding="utf-8")
        model_mb = sum(p.stat().st_size for p in model.iterdir() if p.is_file()) / 1e6
        memory_mb = int(math.ceil((2 * model_mb + 1024) / 256) * 256)  # the weights, KV caches, Python/ORT
        (serving / "edgeft-serve.service").write_text(
            systemd_unit(name, cfg.version, memory_max_mb=memory_mb, shutdown_timeout_s=ServeConfig().shutdown_timeout_s),
            encoding="utf-8")
        base = (recipe.model.name if recipe is not None else None) or report.get("source_model") or "?"
        (stage / MODEL_CARD).write_text(model_card(manifest, str(base)), encoding="utf-8")
        ctx = _PartContext(cfg, run_dir, stage, name, cfg.version, manifest)
        for part in extra_parts:
            part(ctx)
        manifest["ship_s"] = round(time.time() - t0, 1)
        files = [p for p in sorted(stage.rglob("*")) if p.is_file()]
        manifest["files"] = {p.relative_to(stage).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                             for p in files}
        (stage / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        (stage / SUMS).write_text(sums_text(stage), encoding="utf-8")
        write_tarball(stage, tarball, f"{name}-{cfg.version}")  # before the rename: both or neither
    return DecoderShipResult(out, tarball, manifest)


@dataclass
class _PartContext:
    cfg: Any
    run_dir: Path
    stage: Path
    name: str
    version: str
    manifest: dict[str, Any]
