"""Verify a bundle on the machine that will serve it: checksums, load, golden smoke test, latency.

1. checksums: every file against SHA256SUMS and the manifest's file list (a changed, missing or extra
   file, or a link, is named); nothing is parsed before this passes.
2. load: the ONNX external-data check and checker (edgeft.safeio), then the serving path's runner
   (tokenizer.json + an ONNX Runtime session); its inputs and outputs must match the manifest.
3. golden: every golden text at batch size 1; same labels, logits within the manifest's tolerance.
4. latency: the model and the fixed reference workload timed interleaved, and the ratio
   model / reference compared with the one recorded at ship time, by edgeft.gate's rule (median
   ratio, 95 % bootstrap CI; a regression only when the slowdown passes the threshold and the CI
   excludes no change; INCONCLUSIVE when the noise cannot resolve it).

A text-generation bundle (a decoder LM): checksums as above; load = the ONNX checks, then a KV-cache
decoder session and the tokenizer, matching the manifest; golden = the recorded prompts regenerate
their greedy tokens (edgeft.decoder.golden states the tolerance); no latency reference.

Exit codes like ``edgeft gate``: 0 pass; 1 golden mismatch, latency regression or inconclusive;
2 bad input (not a bundle, a newer schema, tampered or unloadable files).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeft.bundle import GOLDEN, SUMS, TASK_GENERATION, BundleError, check_checksums, read_manifest
from edgeft.errors import EdgeftError

VERIFY_SCHEMA = "edgeft.verify/1"
TAGS = {"ok": "ok", "fail": "FAIL", "bad": "BAD", "inconclusive": "INCONCLUSIVE", "skipped": "skipped"}


@dataclass
class Check:
    name: str
    status: str  # ok | fail | bad | inconclusive | skipped
    detail: str
    problems: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class VerifyResult:
    bundle: Path
    manifest: dict[str, Any]
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        statuses = {c.status for c in self.checks}
        if "bad" in statuses:
            return "bad"
        if "fail" in statuses:
            return "fail"
        return "inconclusive" if "inconclusive" in statuses else "pass"

    @property
    def exit_code(self) -> int:
        return {"pass": 0, "fail": 1, "inconclusive": 1, "bad": 2}[self.verdict]

    def render(self) -> str:
        m = self.manifest
        v = m.get("variant", {})
        lines = [f"verify {m.get('name')} {m.get('version')} ({v.get('name')}, {v.get('precision')}) in {self.bundle}"]
        for c in self.checks:
            lines.append(f"  {TAGS[c.status]:<13} {c.name:<10} {c.detail}")
            lines += [f"{'':<26}{p}" for p in c.problems[:20]]
            if len(c.problems) > 20:
                lines.append(f"{'':<26}... and {len(c.problems) - 20} more")
        lines += [f"  note: {n}" for n in self.notes]
        head = {"pass": "PASS", "fail": "FAIL", "inconclusive": "INCONCLUSIVE (not a pass: re-run on a quieter machine, "
                "or pass --skip-latency)", "bad": "BAD BUNDLE (do not serve it: re-copy or re-ship)"}[self.verdict]
        lines.append(f"verify: {head}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"schema": VERIFY_SCHEMA, "bundle": str(self.bundle), "name": self.manifest.get("name"),
                "version": self.manifest.get("version"), "verdict": self.verdict, "exit_code": self.exit_code,
                "checks": [c.__dict__ for c in self.checks], "notes": self.notes}


def _checksums(root: Path, manifest: dict[str, Any]) -> Check:
    problems = check_checksums(root)
    files = manifest.get("files")
    if not isinstance(files, dict):
        problems.append("manifest.json has no 'files' list")
    elif not problems:
        # SHA256SUMS and the manifest are written together; a hand-regenerated SHA256SUMS shows up here.
        sums = {}
        for line in (root / SUMS).read_text(encoding="utf-8").splitlines():
            digest, _, rel = line.partition("  ")
            sums[rel] = digest
        for rel, meta in sorted(files.items()):
            if not isinstance(meta, dict) or sums.get(rel) != meta.get("sha256"):
                problems.append(f"manifest disagrees with {SUMS}: {rel}")
        problems += [f"not in the manifest: {rel}" for rel in sorted(set(sums) - set(files) - {"manifest.json"})]
    if problems:
        return Check("checksums", "bad", f"{len(problems)} problem(s): the bundle is not what was shipped", problems)
    from edgeft.artifacts import sha256_file

    n = len(files) + 1
    return Check("checksums", "ok", f"{n} files match {SUMS} and the manifest (bundle digest "
                                    f"{sha256_file(root / SUMS)[:16]})")


def _load(root: Path, manifest: dict[str, Any], threads: int):
    from edgeft.bundle import MODEL_DIR, MODEL_ONNX
    from edgeft.bundle_checks import open_runner
    from edgeft.safeio import load_onnx_checked

    try:
        load_onnx_checked(root / MODEL_ONNX)
        runner = open_runner(root / MODEL_DIR, root / MODEL_ONNX, int(manifest["tokenizer"]["max_length"]), threads)
    except (EdgeftError, KeyError, TypeError, ValueError) as e:
        msg = e.one_line() if isinstance(e, EdgeftError) else f"manifest lacks tokenizer.max_length ({type(e).__name__})"
        return Check("load", "bad", msg), None
    want = [i.get("name") for i in manifest.get("io", {}).get("onnx", {}).get("inputs", [])]
    labels = manifest.get("labels") or []
    problems = []
    if want and runner.input_names != want:
        problems.append(f"ONNX inputs {runner.input_names}, the manifest says {want}")
    if runner.num_labels is not None and runner.num_labels != len(labels):
        problems.append(f"the model has {runner.num_labels} outputs, the manifest {len(labels)} labels")
    if problems:
        return Check("load", "bad", "the model does not match its manifest", problems), None
    return Check("load", "ok", f"ONNX checker passed; ORT session ({threads} threads): {', '.join(runner.input_names)} "
                               f"-> logits [-1, {len(labels)}], max_length {runner.max_length}"), runner


def _golden(root: Path, manifest: dict[str, Any], runner) -> tuple[Check, list[str]]:
    from edgeft.bundle_checks import compare_golden, predict_one_by_one, read_golden

    try:
        golden = read_golden(root / GOLDEN)
        atol = float(manifest["golden"]["tolerance"]["logits_atol"])
    except BundleError as e:
        return Check("golden", "bad", e.one_line()), []
    except (KeyError, TypeError, ValueError):
        return Check("golden", "bad", "manifest.json has no golden.tolerance.logits_atol"), []
    texts = [g["text"] for g in golden]
    res = compare_golden(golden, list(manifest.get("labels") or []), predict_one_by_one(runner, texts), atol)
    n = res.n
    detail = (f"{n - len(res.label_mismatches) - len(res.near_ties_flipped)}/{n} labels same, max |logit diff| "
              f"{res.max_abs_diff:.3g} (tolerance {atol:g})")
    if res.near_ties_flipped:
        detail += f"; {len(res.near_ties_flipped)} near-tie flip(s) excused"
    problems = [f"golden line {i + 1}: label {golden[i]['label']} -> other label" for i in res.label_mismatches]
    problems += [f"golden line {i + 1}: logits differ by more than {atol:g}" for i in res.logit_failures
                 if i not in res.label_mismatches]
    return Check("golden", "ok" if res.ok else "fail", detail, problems, res.to_dict()), texts


def _latency(manifest: dict[str, Any], runner, threads: int, texts: list[str], budget_s: float,
             notes: list[str]) -> Check:
    from edgeft.artifacts import cpu_info
    from edgeft.bundle_checks import latency_encoding, measure_latency
    from edgeft.gate import MAX_CV
    from edgeft.gate import _latency as gate_latency

    rec = manifest.get("latency_check")
    try:
        base, base_ref = rec["model"]["samples_ms"], rec["reference"]["samples_ms"]
        thr = float(rec.get("threshold", 0.25))
    except (KeyError, TypeError, ValueError):
        return Check("latency", "skipped", "the manifest records no latency check (shipped by an older edgeft?)")
    enc = latency_encoding(runner, texts)
    if enc[0].tokens != rec.get("tokens"):
        return Check("latency", "bad", f"the latency input has {enc[0].tokens} tokens here, {rec.get('tokens')} at ship "
                                       "time (tokenizer or golden file differs)")
    cur = measure_latency(runner, enc, threads=threads, budget_s=budget_s)
    comp = gate_latency("model/reference", {"samples_ms": cur["model"]["samples_ms"]}, {"samples_ms": base}, thr, MAX_CV,
                        cur_ref={"samples_ms": cur["reference"]["samples_ms"]}, base_ref={"samples_ms": base_ref})
    status = {"ok": "ok", "improvement": "ok", "regression": "fail", "inconclusive": "inconclusive"}[comp.verdict]
    here, there = cpu_info(), (rec.get("machine") or {}).get("cpu") or {}
    if (here.get("model"), here.get("flags")) != (there.get("model"), there.get("flags")):
        notes.append(f"CPU differs from the ship machine ('{there.get('model')}' {there.get('flags')} -> "
                     f"'{here.get('model')}' {here.get('flags')}): the comparison is normalised by the reference workload"
                     + ("; int8 speed also depends on int8 instructions, which the fp32 reference does not use"
                        if manifest.get("variant", {}).get("precision") == "int8" else ""))
    detail = (f"model/reference p50 {comp.baseline:.3f} at ship -> {comp.current:.3f} here "
              f"(model p50 {cur['model']['p50_ms']:.2f} ms, reference {cur['reference']['p50_ms']:.2f} ms)")
    if comp.change is not None:
        detail += f", {comp.change:+.1%}"
        if comp.ci:
            detail += f" (95% CI {comp.ci[0]:+.1%}..{comp.ci[1]:+.1%})"
    detail += f"; threshold +{thr:.0%}"
    extra = comp.detail.replace("(normalised by the reference)", "").strip()
    return Check("latency", status, detail + (f"; {extra}" if extra else ""),
                 data={"verdict": comp.verdict, "ratio_change": comp.change, "ci": list(comp.ci) if comp.ci else None,
                       "threshold": thr, "threads": threads,
                       "here": {k: {kk: vv for kk, vv in cur[k].items() if kk != "samples_ms"}
                                for k in ("model", "reference")}})


def _threads(manifest: dict[str, Any], notes: list[str]) -> int:
    """The ship-time thread count (the latency figures depend on it), capped by this machine's cores."""
    from edgeft.onnx_eval import usable_cores

    try:
        recorded = int(manifest["latency_check"]["threads"])
    except (KeyError, TypeError, ValueError):
        return usable_cores()
    if recorded > usable_cores():
        notes.append(f"the bundle was timed with {recorded} threads; this machine has {usable_cores()} usable cores")
    return max(1, min(recorded, usable_cores()))


def _scale_checks(root: Path, manifest: dict[str, Any], require: tuple[str, ...]) -> list[Check]:
    """Offline checks of the scale-out files the bundle holds (or ``require`` demands): the Ray Serve
    config, the Triton repository, the Kubernetes manifests. Nothing here starts a cluster."""
    import importlib
    import importlib.util

    from edgeft.bundle import RAY_CONFIG

    checks = []
    kinds = {"ray": ("edgeft.scale.ray_serve", "check_ray_config", (root / RAY_CONFIG).is_file()),
             "triton": ("edgeft.scale.triton", "check_triton", "triton" in manifest),
             "kubernetes": ("edgeft.scale.kubernetes", "check_kubernetes", "kubernetes" in manifest)}
    for kind, (module, func, present) in kinds.items():
        if not present and kind not in require:
            continue
        detail = "valid (checked offline)"
        kwargs = {}
        if kind == "kubernetes" and importlib.util.find_spec("kubernetes_validate") is None:
            kwargs["require_validator"] = False  # a serving machine need not carry the schemas
            detail = "valid (semantic checks only; for the schemas: pip install 'edgeft[kubernetes]')"
        problems = getattr(importlib.import_module(module), func)(root, **kwargs)
        checks.append(Check(kind, "bad" if problems else "ok", f"{len(problems)} problem(s)" if problems else detail,
                            problems))
    return checks


def _load_decoder(root: Path, manifest: dict[str, Any], threads: int):
    """Load a text-generation bundle's model as a KV-cache decoder and its tokenizer; check the manifest."""
    from edgeft.bundle import MODEL_DIR, MODEL_ONNX
    from edgeft.decoder.generate import OrtDecoder
    from edgeft.decoder.text import DecoderTokenizer
    from edgeft.safeio import load_onnx_checked

    try:
        load_onnx_checked(root / MODEL_ONNX)
        decoder = OrtDecoder(root / MODEL_ONNX, threads=threads)
        tokenizer = DecoderTokenizer(root / MODEL_DIR)
    except EdgeftError as e:
        return Check("load", "bad", e.one_line()), None, None
    problems = []
    model = manifest.get("model") if isinstance(manifest.get("model"), dict) else {}
    if model.get("context_length") != decoder.context:
        problems.append(f"context {decoder.context} tokens in model/config.json, the manifest says "
                        f"{model.get('context_length')}")
    want = [i.get("name") for i in manifest.get("io", {}).get("onnx", {}).get("inputs", [])]
    if want and decoder.input_names != want:
        problems.append(f"ONNX inputs {decoder.input_names}, the manifest says {want}")
    chat = bool((manifest.get("tokenizer") or {}).get("chat_template"))
    if chat != (tokenizer.chat_template is not None):
        problems.append(f"the manifest says chat template {'present' if chat else 'absent'}, model/ has "
                        f"{'one' if tokenizer.chat_template is not None else 'none'}")
    if problems:
        return Check("load", "bad", "the model does not match its manifest", problems), None, None
    return Check("load", "ok", f"ONNX checker passed; KV-cache decoder ({len(decoder.past_names)} past inputs, "
                               f"{threads} threads), context {decoder.context} tokens, eos {tokenizer.eos_token_ids}, "
                               f"chat template {'yes' if chat else 'no'}"), decoder, tokenizer


def _verify_generation(root: Path, manifest: dict[str, Any], res: VerifyResult, require: tuple[str, ...]) -> VerifyResult:
    """A text-generation bundle after its checksums: load, golden generations, scale-out files (none are
    written for decoders, so only a demanded one is checked: it is missing)."""
    from edgeft.bundle import GOLDEN_GENERATION
    from edgeft.decoder import golden
    from edgeft.onnx_eval import usable_cores

    check, decoder, tokenizer = _load_decoder(root, manifest, usable_cores())
    res.checks.append(check)
    if decoder is None:
        return res
    try:
        rows = golden.read(root / GOLDEN_GENERATION)
    except BundleError as e:
        res.checks.append(Check("golden", "bad", e.one_line()))
        return res
    cmp = golden.compare_generations(decoder, tokenizer, rows)
    detail = (f"{cmp.exact}/{cmp.n} prompts regenerate exactly; teacher-forced agreement >= {cmp.min_agreement:.3f} "
              f"(tolerance: first {golden.GOLDEN_PREFIX_TOKENS} tokens exact, agreement >= "
              f"{golden.GOLDEN_MIN_AGREEMENT:g})")
    problems = [f"golden line {i + 1} ({rows[i].get('name')}): the prompt tokenizes differently now (tokenizer or "
                "chat template changed)" for i in cmp.prompt_changed]
    problems += [f"golden line {i + 1} ({rows[i].get('name')}): token {cmp.first_mismatch[i]} differs "
                 f"(the first {golden.GOLDEN_PREFIX_TOKENS} must match)" for i in cmp.prefix_failures]
    problems += [f"golden line {i + 1} ({rows[i].get('name')}): teacher-forced agreement {cmp.agreement[i]:.3f} < "
                 f"{golden.GOLDEN_MIN_AGREEMENT:g}" for i in cmp.agreement_failures if i not in cmp.prefix_failures]
    res.checks.append(Check("golden", "ok" if cmp.ok else "fail", detail, problems, cmp.to_dict()))
    res.checks.extend(_scale_checks(root, manifest, require))
    res.checks.append(Check("latency", "skipped", "text-generation bundles record no latency reference (tokens/s: "
                                                  "MODEL_CARD.md)"))
    return res


def verify(bundle: str | Path, *, skip_latency: bool = False, latency_seconds: float = 4.0,
           require: tuple[str, ...] = ()) -> VerifyResult:
    """Run the checks in order; a bad step stops the ones that depend on it. Raises BundleError only
    when ``bundle`` is not a bundle of a schema this edgeft reads. ``require``: scale-out parts
    ("triton", "kubernetes") that must be present."""
    if latency_seconds <= 0:
        raise EdgeftError(f"--latency-seconds {latency_seconds} must be positive", "give seconds, e.g. 4")
    root = Path(bundle)
    manifest = read_manifest(root)
    res = VerifyResult(root, manifest)
    res.checks.append(_checksums(root, manifest))
    if res.checks[-1].status != "ok":
        return res
    if manifest.get("task") == TASK_GENERATION:
        return _verify_generation(root, manifest, res, require)
    threads = _threads(manifest, res.notes)
    check, runner = _load(root, manifest, threads)
    res.checks.append(check)
    if runner is None:
        return res
    check, texts = _golden(root, manifest, runner)
    res.checks.append(check)
    if check.status == "bad":
        return res
    res.checks.extend(_scale_checks(root, manifest, require))
    if skip_latency:
        res.checks.append(Check("latency", "skipped", "--skip-latency"))
    else:
        res.checks.append(_latency(manifest, runner, threads, texts, latency_seconds, res.notes))
    return res
