"""`edgeft ship` and `edgeft verify` on a text-generation run folder (the session's tiny decoder run:
`edgeft run` with compress int8 + int4 and a bench): layout, manifest, checksums, golden generations,
model card, the tar.gz, the variant choice and --allow-miss, bad input (one line, exit 2, nothing
written), and verify's verdicts (pass, tampered, golden mismatch, a model that is not its manifest's)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeft.cli import cli

LAYOUT = {"MODEL_CARD.md", "SHA256SUMS", "manifest.json", "golden/generation.jsonl", "model/model.onnx",
          "model/config.json", "model/generation_config.json", "model/tokenizer.json", "model/tokenizer_config.json",
          "model/special_tokens_map.json", "model/vocab.json", "model/merges.txt", "model/chat_template.jinja",
          "model/edgeft-export.json", "serving/prometheus.yml", "serving/edgeft-serve.service"}


def _run(args: list) -> tuple[int, str]:
    res = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return res.exit_code, res.output


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def reseal(bundle: Path) -> None:
    """Rewrite the manifest's file list and SHA256SUMS after an edit: checksums pass, later checks must notice."""
    from edgeft.bundle import bundle_files, sums_text

    m = json.loads((bundle / "manifest.json").read_text())
    m["files"] = {rel: {"sha256": _sha(bundle / rel), "bytes": (bundle / rel).stat().st_size}
                  for rel in bundle_files(bundle) if rel != "manifest.json"}
    (bundle / "manifest.json").write_text(json.dumps(m))
    (bundle / "SHA256SUMS").write_text(sums_text(bundle))


def _one_error_line(text: str) -> str:
    lines = [x for x in text.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in text, text
    return lines[0]


@pytest.fixture(scope="module")
def run(tiny_decoder_run):
    return tiny_decoder_run


@pytest.fixture(scope="module")
def report(run):
    return json.loads((run / "compress" / "report.json").read_text())


@pytest.fixture(scope="module")
def bundle(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("ship") / "tiny-dec"
    code, text = _run(["ship", run, "--out", out])
    assert code == 0, text
    assert "text generation" in text and f"edgeft verify {out}" in text and f"edgeft serve {out}" in text
    assert "/v1/models" in text
    return out


def _copy_run(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run", ignore=shutil.ignore_patterns(".edgeft.lock", "bundle*")))


def _nothing_written(tmp_path: Path, name: str = "b") -> None:
    assert not (tmp_path / name).exists() and not (tmp_path / f"{name}.tar.gz").exists()
    assert not list(tmp_path.glob(f".{name}*"))


# ---------------------------------------------------------------- ship


def test_layout_checksums_and_tarball(bundle):
    files = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()}
    assert files == LAYOUT
    from edgeft.bundle import check_checksums, open_bundle

    assert check_checksums(bundle) == []
    b = open_bundle(bundle)
    assert b.task == "text-generation" and b.context_length == 8192
    if shutil.which("sha256sum"):
        res = subprocess.run(["sha256sum", "-c", "--strict", "SHA256SUMS"], cwd=bundle, capture_output=True, text=True)
        assert res.returncode == 0 and res.stdout.count(": OK") == len(LAYOUT) - 1, res.stdout + res.stderr
    tgz = bundle.with_name(bundle.name + ".tar.gz")
    with tarfile.open(tgz) as tar:
        names = tar.getnames()
        assert names[0] == "tiny-dec-1" and {n.split("/", 1)[1] for n in names[1:] if "." in n.split("/")[-1]} >= \
            {"manifest.json", "model/model.onnx", "golden/generation.jsonl"}
    from edgeft.ship import write_tarball

    assert write_tarball(bundle, tgz.with_name("again.tar.gz"), "tiny-dec-1").read_bytes() == tgz.read_bytes()


def test_manifest_contents(bundle, run, report):
    from edgeft.serve.config import ServeConfig

    m = json.loads((bundle / "manifest.json").read_text())
    assert m["schema"] == "edgeft.bundle/1" and m["task"] == "text-generation" and m["name"] == "tiny-dec"
    v = m["variant"]
    assert v["name"] == report["final"] and v["meets_goal"] is True and v["shipped_with_allow_miss"] is False
    cand = next(c for c in report["quantize"]["candidates"] if c["name"] == v["name"])
    assert v["precision"] == f"int{cand['scheme']['bits']}" and v["scheme"] == cand["scheme"]
    assert _sha(bundle / "model" / "model.onnx") == _sha(run / "compress" / cand["path"]) == m["source"]["model_sha256"]
    # perplexity straight from compress/report.json
    p = m["perplexity"]
    assert p["test"]["fp32"] == report["test_perplexity"]["onnx_fp32"]
    assert p["test"]["shipped"] == report["test_perplexity"][v["name"]]
    assert p["validation"]["shipped"] == cand["perplexity"] and p["max_increase"] == report["max_perplexity_increase"]
    assert p["validation"]["increase"] == pytest.approx(cand["perplexity"] / report["export"]["perplexity_onnx"] - 1)
    # model, tokenizer, io, serving, environment, sources
    assert m["model"]["context_length"] == 8192 and m["model"]["eos_token_ids"] == [2]
    assert m["model"]["kv_heads"] == 2 and m["model"]["architecture"] == "LlamaForCausalLM"
    assert m["tokenizer"]["chat_template"] is True and "tokenizer.json" in m["tokenizer"]["files"]
    assert "past_key_values.0.key" in [i["name"] for i in m["io"]["onnx"]["inputs"]]
    cfg = ServeConfig.model_validate(m["serving"])
    assert cfg.max_new_tokens <= 8191 and cfg.generation_slots >= 1
    assert m["environment"]["versions"]["onnxruntime"] and m["environment"]["cpu"]["model"]
    assert m["source"]["compress_report_sha256"] == _sha(run / "compress" / "report.json")
    assert m["source"]["bench_sha256"] == _sha(run / "bench.json")
    assert set(m["files"]) == LAYOUT - {"manifest.json", "SHA256SUMS"}
    # bench figures of the shipped variant
    bench = json.loads((run / "bench.json").read_text())
    assert [r["decode_tok_s"] for r in m["bench"]["rows"]] == \
        [r["decode_tok_s"] for r in bench["rows"] if r["variant"] == v["name"]]


def test_golden_generations_and_model_card(bundle):
    from edgeft.decoder.export import DEFAULT_PROMPTS
    from edgeft.decoder.generate import OrtDecoder

    rows = [json.loads(x) for x in (bundle / "golden" / "generation.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows if r["kind"] == "completion"] == list(DEFAULT_PROMPTS)
    assert [r["kind"] for r in rows].count("chat") == 1
    dec = OrtDecoder(bundle / "model" / "model.onnx", threads=1)
    for r in rows:
        assert len(r["tokens"]) == 32 and dec.generate(r["prompt_ids"], 32).tokens == r["tokens"]
    m = json.loads((bundle / "manifest.json").read_text())
    assert m["golden"]["count"] == len(rows) and m["golden"]["tolerance"]["prefix_tokens"] >= 1
    card = (bundle / "MODEL_CARD.md").read_text()
    for words in ("## Data", "## Perplexity", "## Speed", "## Limits", "decode tok/s", "8192 tokens",
                  f"{m['perplexity']['test']['shipped']:.2f}", m["bench"]["cpu"]["model"], "chat template"):
        assert words in card, words


def test_existing_out_needs_force_and_force_replaces(bundle, run, tmp_path):
    code, text = _run(["ship", run, "--out", bundle])
    assert code == 2 and "already exists" in _one_error_line(text)
    out = Path(shutil.copytree(bundle, tmp_path / "b"))
    code, text = _run(["ship", run, "--out", out, "--force", "--version", "2", "--variant", "fp32"])
    assert code == 0, text
    m = json.loads((out / "manifest.json").read_text())
    assert m["version"] == "2" and m["variant"]["name"] == "onnx_fp32" and m["variant"]["precision"] == "fp32"
    assert _sha(out / "model" / "model.onnx") == _sha(run / "compress" / "onnx_fp32" / "model.onnx")
    code, text = _run(["verify", out])
    assert code == 0 and "verify: PASS" in text, text


def test_named_variants(run, report, tmp_path):
    code, text = _run(["ship", run, "--out", tmp_path / "b8", "--variant", "int8"])
    assert code == 0, text
    m = json.loads((tmp_path / "b8" / "manifest.json").read_text())
    assert m["variant"]["precision"] == "int8" and m["variant"]["name"].startswith("int8-")
    code, text = _run(["ship", run, "--out", tmp_path / "b", "--variant", "fp16"])
    line = _one_error_line(text)
    assert code == 2 and "no variant 'fp16'" in line and "onnx_fp32 (fp32)" in line
    assert all(c["name"] in line for c in report["quantize"]["candidates"])
    _nothing_written(tmp_path)


def test_missed_goal_needs_allow_miss(run, tmp_path):
    copy = _copy_run(run, tmp_path)
    rp = copy / "compress" / "report.json"
    rep = json.loads(rp.read_text())
    rep["max_perplexity_increase"], rep["goal_met"] = -1.0, False  # every candidate misses it
    rp.write_text(json.dumps(rep))
    code, text = _run(["ship", copy, "--out", tmp_path / "b"])
    assert code == 1 and "--allow-miss" in _one_error_line(text) and "missed the perplexity goal" in text
    _nothing_written(tmp_path)
    code, text = _run(["ship", copy, "--out", tmp_path / "b", "--allow-miss"])
    assert code == 0 and "MISSED" in text, text
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert m["variant"]["meets_goal"] is False and m["variant"]["shipped_with_allow_miss"] is True
    assert "MISSED the perplexity goal" in (tmp_path / "b" / "MODEL_CARD.md").read_text()
    code, text = _run(["ship", copy, "--out", tmp_path / "fp", "--variant", "fp32"])
    assert code == 0, text  # the fp32 reference is the goal's baseline: always within it


def test_a_rejected_candidate_is_never_shipped(run, tmp_path):
    copy = _copy_run(run, tmp_path)
    rp = copy / "compress" / "report.json"
    rep = json.loads(rp.read_text())
    rep["quantize"]["candidates"][0].update(rejected=True, problems=["perplexity is not finite"])
    rp.write_text(json.dumps(rep))
    name = rep["quantize"]["candidates"][0]["name"]
    code, text = _run(["ship", copy, "--out", tmp_path / "b", "--variant", name, "--allow-miss"])
    assert code == 2 and "rejected by the compress checks" in _one_error_line(text)
    _nothing_written(tmp_path)


@pytest.mark.parametrize("case, needle", [
    ("no_report", "edgeft run"), ("no_compress", "edgeft run"), ("bad_schema", "edgeft.decoder-compress/1"),
    ("bad_json", "not valid JSON"), ("triton", "--triton packages text-classification bundles only"),
    ("kubernetes", "--kubernetes"), ("bad_name", "--name"), ("outside", "points outside"),
])
def test_bad_decoder_runs_are_one_line_exit_2_and_write_nothing(run, tmp_path, case, needle):
    copy = _copy_run(run, tmp_path)
    rp = copy / "compress" / "report.json"
    args = ["ship", copy, "--out", tmp_path / "b"]
    if case == "no_report":
        rp.unlink()
    elif case == "no_compress":
        shutil.rmtree(copy / "compress")
    elif case == "bad_schema":
        rp.write_text(json.dumps({**json.loads(rp.read_text()), "schema": "edgeft.decoder-compress/9"}))
    elif case == "bad_json":
        rp.write_text("{")
    elif case == "outside":
        rep = json.loads(rp.read_text())
        rep["quantize"]["candidates"][0]["path"] = "../../../etc/passwd"
        rp.write_text(json.dumps(rep))
    elif case == "bad_name":
        args += ["--name", "../evil"]
    else:
        args += [f"--{case}"]
    code, text = _run(args)
    line = _one_error_line(text)
    assert code == 2 and needle in line, line
    if case == "no_report":
        assert "compress stage" in line
    _nothing_written(tmp_path)


# ---------------------------------------------------------------- verify


def test_verify_passes(bundle, tmp_path):
    code, text = _run(["verify", bundle, "--json-out", tmp_path / "v.json"])
    assert code == 0 and "verify: PASS" in text, text
    assert "regenerate exactly" in text and "KV-cache decoder" in text
    v = json.loads((tmp_path / "v.json").read_text())
    assert [(c["name"], c["status"]) for c in v["checks"]] == [("checksums", "ok"), ("load", "ok"), ("golden", "ok"),
                                                               ("latency", "skipped")]
    assert v["checks"][2]["data"]["exact"] == v["checks"][2]["data"]["n"] == 5


def test_a_tampered_file_fails_verify_and_serve_in_one_line(bundle, tmp_path):
    from serve_helpers import env, serve_cmd

    b = Path(shutil.copytree(bundle, tmp_path / "b"))
    with open(b / "model" / "tokenizer.json", "ab") as f:
        f.write(b" ")
    code, text = _run(["verify", b])
    assert code == 2 and "BAD BUNDLE" in text, text
    named = [x for x in text.splitlines() if "changed: model/tokenizer.json" in x]
    assert len(named) == 1, text
    assert [x.split()[1] for x in text.splitlines() if x.startswith("  ") and len(x.split()) > 1
            and x.split()[0] in ("ok", "BAD", "FAIL")] == ["checksums"], text  # nothing was loaded after it
    r = subprocess.run(serve_cmd(b, "--port", "0"), env=env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "changed: model/tokenizer.json" in _one_error_line(r.stderr)


def test_verify_golden_mismatch_exit_1(bundle, tmp_path):
    b = Path(shutil.copytree(bundle, tmp_path / "b"))
    path = b / "golden" / "generation.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    rows[1]["tokens"][0] = (rows[1]["tokens"][0] + 1) % 300  # the first token: beyond any tolerance
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    reseal(b)
    code, text = _run(["verify", b])
    assert code == 1 and "verify: FAIL" in text and "golden line 2 (prompt-2): token 0 differs" in text, text


def test_verify_passes_a_late_flip_within_the_tolerance(bundle, tmp_path):
    """What another CPU's int8 kernels may do: one near-tie broken the other way late in a generation."""
    b = Path(shutil.copytree(bundle, tmp_path / "b"))
    path = b / "golden" / "generation.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    rows[0]["tokens"][30] = (rows[0]["tokens"][30] + 1) % 300
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    reseal(b)
    code, text = _run(["verify", b])
    assert code == 0 and f"{len(rows) - 1}/{len(rows)} prompts regenerate exactly" in text, text


def test_verify_tolerates_late_flips_within_the_stated_tolerance():
    from edgeft.decoder.golden import GOLDEN_MIN_AGREEMENT, GOLDEN_PREFIX_TOKENS, GoldenComparison

    late = GoldenComparison(2, 1, [None, GOLDEN_PREFIX_TOKENS + 3], [1.0, 0.97])
    assert late.ok  # a near-tie flip after the first few tokens on another CPU: passes
    assert not GoldenComparison(1, 0, [GOLDEN_PREFIX_TOKENS - 1], [0.99]).ok
    assert not GoldenComparison(1, 0, [20], [GOLDEN_MIN_AGREEMENT - 0.01]).ok
    assert not GoldenComparison(1, 1, [None], [1.0], prompt_changed=[0]).ok


@pytest.mark.parametrize("edit, needle", [
    (lambda m: m["model"].update(context_length=4096), "the manifest says 4096"),
    (lambda m: m["tokenizer"].update(chat_template=False), "chat template absent"),
])
def test_verify_a_model_that_is_not_its_manifests_is_bad(bundle, tmp_path, edit, needle):
    b = Path(shutil.copytree(bundle, tmp_path / "b"))
    m = json.loads((b / "manifest.json").read_text())
    edit(m)
    (b / "manifest.json").write_text(json.dumps(m))
    reseal(b)
    code, text = _run(["verify", b])
    assert code == 2 and needle in text and "BAD BUNDLE" in text, text


def test_verify_refuses_a_model_without_kv_cache(bundle, tmp_path):
    """A classifier's ONNX where the decoder should be (resealed): the load check names it, exit 2."""
    from conftest import make_tiny_classifier

    from edgeft.export import export_onnx

    b = Path(shutil.copytree(bundle, tmp_path / "b"))
    onnx = export_onnx(make_tiny_classifier(tmp_path / "hf"), tmp_path / "onnx")
    shutil.copyfile(onnx, b / "model" / "model.onnx")
    reseal(b)
    code, text = _run(["verify", b])
    assert code == 2 and "is not a decoder with KV cache" in text, text


def test_serve_takes_the_bundles_defaults_and_refuses_ray(bundle):
    code, text = _run(["serve", bundle, "--print-config"])
    assert code == 0 and "generation_slots: 1" in text and "max_new_tokens: 2048" in text, text
    code, text = _run(["serve", bundle, "--engine", "ray"])
    assert code == 2 and "text-classification bundles only" in _one_error_line(text)
