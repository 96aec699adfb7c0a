"""`edgeft ship` and `edgeft verify` on a real tiny run folder (tiny BERT: fine-tune -> compress -> bench,
built once per module): layout, manifest, checksums (`sha256sum -c`), the tar.gz, the serving files
(`promtool`, `systemd-analyze` when installed), variant choice and --allow-miss, bad input, and
verify's verdicts (pass, tampered / missing / extra file, golden mismatch, newer schema, latency)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgeft.cli import cli

LAYOUT = {"MODEL_CARD.md", "SHA256SUMS", "manifest.json", "golden/golden.jsonl", "model/config.json",
          "model/labels.txt", "model/model.onnx", "model/tokenizer.json", "model/tokenizer_config.json",
          "model/special_tokens_map.json", "model/vocab.txt", "serving/alerts.yml", "serving/alerts_test.yml",
          "serving/prometheus.yml", "serving/edgeft-serve.service", "ray/serve_config.yaml"}
FAST = ["--golden", "16", "--latency-seconds", "0.5"]


def _run(args: list[str]):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A real `edgeft run` (finetune -> compress -> bench) of a tiny BERT on toy data, in seconds."""
    from conftest import make_tiny_classifier, make_tiny_csv

    from edgeft.pipeline import run
    from edgeft.recipe import load_recipe

    base = tmp_path_factory.mktemp("shiprun")
    model, csv = make_tiny_classifier(base / "model"), make_tiny_csv(base / "toy.csv")
    recipe = load_recipe(None, [
        "name=tiny", f"model.name={model}", f"data.dataset={csv}", "finetune.epochs=1", "finetune.max_length=32",
        "finetune.batch_size=16", "compress.prune.heads=0.5", "compress.prune.ffn=0.5",
        "compress.prune.importance_samples=32", "compress.prune.recovery.epochs=0.25", "compress.optimize.level=1",
        "compress.max_accuracy_drop=100", "bench.min_samples=20", "bench.max_seconds_per_variant=0.3",
        "bench.batch_sizes=[1]", "bench.seq_lengths=[16]", "bench.threads=1"])
    return run(recipe, base / "run", show_progress=False)


@pytest.fixture(scope="module")
def bundle(run_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ship") / "tiny-bundle"
    code, text = _run(["ship", run_dir, "--out", out, *FAST])
    assert code == 0, text
    assert f"edgeft serve {out}" in text and f"edgeft verify {out}" in text
    return out


def _copy(bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle, tmp_path / "b"))


def _reseal(bundle: Path) -> None:
    """Rewrite the manifest's file list and SHA256SUMS after an edit (what a tool re-hashing a changed
    bundle would do): checksums then pass, and only the later checks can notice."""
    from edgeft.bundle import bundle_files, sums_text

    m = json.loads((bundle / "manifest.json").read_text())
    m["files"] = {rel: {"sha256": _sha(bundle / rel), "bytes": (bundle / rel).stat().st_size}
                  for rel in bundle_files(bundle) if rel != "manifest.json"}
    (bundle / "manifest.json").write_text(json.dumps(m))
    (bundle / "SHA256SUMS").write_text(sums_text(bundle))


# ---------------------------------------------------------------- ship


def test_layout_and_checksums_accepted_by_sha256sum(bundle):
    files = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()}
    assert files == LAYOUT
    assert not list(bundle.parent.glob(".*partial*")) and not list(bundle.parent.glob(".*.tmp"))
    from edgeft.bundle import check_checksums, open_bundle

    assert check_checksums(bundle) == []
    b = open_bundle(bundle)  # what `edgeft serve` does first
    assert b.labels == ["neg", "pos"] and b.max_length == 32 and b.digest == _sha(bundle / "SHA256SUMS")
    if shutil.which("sha256sum") is None:
        pytest.skip("sha256sum not installed")
    res = subprocess.run(["sha256sum", "-c", "--strict", "SHA256SUMS"], cwd=bundle, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count(": OK") == len(LAYOUT) - 1


def test_manifest_contents(bundle, run_dir):
    from edgeft.serve.config import ServeConfig
    from edgeft.ship import VARIANTS

    m = json.loads((bundle / "manifest.json").read_text())
    report = json.loads((run_dir / "compress" / "report.json").read_text())
    bench = json.loads((run_dir / "bench.json").read_text())
    assert m["schema"] == "edgeft.bundle/1" and m["name"] == "tiny" and m["version"] == "1"
    assert m["task"] == "text-classification" and m["labels"] == ["neg", "pos"] and m["edgeft_version"]
    assert m["io"]["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert m["io"]["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 2]},
                                  {"name": "label", "datatype": "BYTES", "shape": [-1]}]
    assert [i["name"] for i in m["io"]["onnx"]["inputs"]] == ["input_ids", "attention_mask", "token_type_ids"]
    assert all(i["datatype"] == "INT64" for i in m["io"]["onnx"]["inputs"])
    assert m["tokenizer"]["max_length"] == 32 and m["tokenizer"]["truncation"] is True
    assert m["tokenizer"]["padding_side"] == "right"
    # accuracy: the shipped variant's compress step, drops vs fp32
    v = m["variant"]["name"]
    assert v in VARIANTS and m["variant"]["meets_goal"] is True and m["variant"]["shipped_with_allow_miss"] is False
    step = next(s for s in report["steps"] if s["path"] == report["artifacts"][v])
    assert m["accuracy"]["validation"]["accuracy"] == step["validation"]["accuracy"]
    assert m["accuracy"]["test"]["drop_points"] == step["test_accuracy_drop_points"]
    assert m["accuracy"]["validation"]["fp32_accuracy"] == report["goal"]["baseline_validation_accuracy"]
    # the default is the fastest variant (bench p50 at batch 1) among those meeting the goal
    p50 = {r["model"]: r["latency_ms"]["p50"] for r in bench["results"]
           if r["status"] == "ok" and r["model"] in VARIANTS and r["runtime"] == "ort-cpu"}
    assert v == min(p50, key=p50.get)
    # bench figures with the machine they were taken on; alert budget from them
    shape = m["bench"]["shapes"][0]
    assert shape["batch"] == 1 and shape["latency_ms"]["p99"] > 0 and m["bench"]["machine"]["cpu"]["model"]
    assert m["serving"]["latency_budget_ms"] == max(1, np.ceil(3 * shape["latency_ms"]["p99"]))
    assert "bench p99 at batch 1" in m["alerts"]["budget_source"]
    assert ServeConfig.model_validate(m["serving"]).latency_budget_ms == m["serving"]["latency_budget_ms"]
    # ship-time latency reference: raw samples of model and reference workload
    lc = m["latency_check"]
    assert len(lc["model"]["samples_ms"]) >= 20 and len(lc["reference"]["samples_ms"]) >= 20
    assert lc["ratio_p50"] == pytest.approx(lc["model"]["p50_ms"] / lc["reference"]["p50_ms"])
    # source run and every file
    assert m["source"]["manifest_sha256"] == _sha(run_dir / "manifest.json")
    assert m["source"]["compress_report_sha256"] == _sha(run_dir / "compress" / "report.json")
    assert m["source"]["recipe_sha256"]
    assert set(m["files"]) == LAYOUT - {"manifest.json", "SHA256SUMS"}
    for rel, meta in m["files"].items():
        assert meta == {"sha256": _sha(bundle / rel), "bytes": (bundle / rel).stat().st_size}
    # data: the run's splits and hashes
    run_manifest = json.loads((run_dir / "manifest.json").read_text())
    assert m["data"]["test"]["sha256"] == run_manifest["data"]["test"]["sha256"]


def test_model_folder_golden_and_card(bundle, run_dir):
    m = json.loads((bundle / "manifest.json").read_text())
    assert (bundle / "model" / "labels.txt").read_text() == "neg\npos\n"
    cfg = json.loads((bundle / "model" / "config.json").read_text())
    assert cfg["id2label"] == {"0": "neg", "1": "pos"} and cfg["label2id"] == {"neg": 0, "pos": 1}
    src = run_dir / "compress" / m["variant"]["source"].split("compress/", 1)[1]
    assert _sha(bundle / "model" / "model.onnx") == _sha(src)
    rows = [json.loads(line) for line in (bundle / "golden" / "golden.jsonl").read_text().splitlines()]
    assert len(rows) == 16 == m["golden"]["count"]
    from edgeft.data import load_dataset
    from edgeft.recipe import load_recipe

    recipe = load_recipe(run_dir / "recipe.yaml")
    test_texts = set(load_dataset(recipe.data, seed=recipe.seed).test.texts)
    for r in rows:
        assert r["text"] in test_texts and r["label"] == ["neg", "pos"][int(np.argmax(r["logits"]))]
    card = (bundle / "MODEL_CARD.md").read_text()
    for words in ("## Data", "## Accuracy", "## Latency", "## Limits", "32 tokens", m["bench"]["machine"]["cpu"]["model"],
                  m["data"]["test"]["sha256"][:16], f"{m['accuracy']['test']['accuracy']:.4f}"):
        assert words in card, words


def test_tarball_is_the_bundle_and_deterministic(bundle, tmp_path):
    from edgeft.ship import write_tarball

    tgz = bundle.with_name(bundle.name + ".tar.gz")
    with tarfile.open(tgz) as tar:
        members = tar.getmembers()
        names = [t.name for t in members]
        rels = [n.split("/", 1)[1] for n in names[1:]]
        assert names[0] == "tiny-1" and all(n.startswith("tiny-1/") for n in names[1:]) and rels == sorted(rels)
        assert {t.mtime for t in members} == {946684800} and {t.uid for t in members} == {0}
        for t in members:
            if t.isfile():
                rel = t.name.split("/", 1)[1]
                assert tar.extractfile(t).read() == (bundle / rel).read_bytes(), rel
        assert {t.name.split("/", 1)[1] for t in members if t.isfile()} == LAYOUT
    again = write_tarball(bundle, tmp_path / "again.tar.gz", "tiny-1")
    assert again.read_bytes() == tgz.read_bytes()


def test_extra_parts_are_covered_and_force_replaces_a_bundle(bundle, run_dir, tmp_path):
    from edgeft.ship import ShipConfig, ship

    out = _copy(bundle, tmp_path)
    shutil.copy(bundle.with_name(bundle.name + ".tar.gz"), out.with_name("b.tar.gz"))

    def triton(ctx):  # how engineer scaleout's --triton adds files before the checksums
        (ctx.stage / "triton").mkdir()
        (ctx.stage / "triton" / "config.pbtxt").write_text(f'name: "{ctx.name}"\n')

    res = ship(ShipConfig(run_dir=run_dir, out=out, force=True, golden=8, latency_seconds=0.3, version="2"),
               extra_parts=[triton])
    m = json.loads((out / "manifest.json").read_text())
    assert m["version"] == "2" and "triton/config.pbtxt" in m["files"]
    assert "triton/config.pbtxt" in (out / "SHA256SUMS").read_text()
    assert res.tarball == out.with_name("b.tar.gz")
    with tarfile.open(res.tarball) as tar:
        assert "tiny-2/triton/config.pbtxt" in tar.getnames()


def test_promtool_checks_and_tests_the_alert_rules(bundle, tmp_path):
    if shutil.which("promtool") is None:
        pytest.skip("promtool not installed")
    serving = bundle / "serving"
    for args in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts_test.yml"],
                 ["check", "config", "prometheus.yml"]):
        res = subprocess.run(["promtool", *args], cwd=serving, capture_output=True, text=True)
        assert res.returncode == 0, res.stdout + res.stderr
    rules = (serving / "alerts.yml").read_text()
    for name in ("edgeft_requests_total", "edgeft_rejections_total", "edgeft_request_duration_seconds_bucket",
                 "edgeft_pending_requests", "edgeft_queue_capacity", "edgeft_model_ready", "edgeft_auth_failures_total",
                 'up{job="edgeft"}'):
        assert name in rules, name
    # The unit tests bite: a rule whose budget drifted from the bundle's fails them.
    budget = json.loads((bundle / "manifest.json").read_text())["alerts"]["latency_budget_s"]
    broken = tmp_path / "serving"
    shutil.copytree(serving, broken)
    text = rules.replace(f"> {budget:g}\n", f"> {budget * 10:g}\n")
    assert text != rules
    (broken / "alerts.yml").write_text(text)
    res = subprocess.run(["promtool", "test", "rules", "alerts_test.yml"], cwd=broken, capture_output=True, text=True)
    assert res.returncode != 0 and "EdgeftLatencyOverBudget" in res.stdout + res.stderr


def test_systemd_unit_is_hardened_and_verifies(bundle, tmp_path):
    unit = (bundle / "serving" / "edgeft-serve.service").read_text()
    for directive in ("DynamicUser=yes", "NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes",
                      "ReadOnlyPaths=/opt/edgeft/bundles/tiny-1", "MemoryMax=", "Restart=on-failure",
                      "--host 127.0.0.1 --port 8000 --keys"):
        assert directive in unit, directive
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    # verify checks that ExecStart's binary exists: point it at this environment's edgeft.
    exe = shutil.which("edgeft") or sys.executable
    path = tmp_path / "edgeft-serve.service"
    path.write_text(unit.replace("/opt/edgeft/venv/bin/edgeft", exe))
    res = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


# ---------------------------------------------------------------- ship: choice of variant and bad input


def _run_copy(run_dir: Path, tmp_path: Path, meets: dict[str, bool] | None = None) -> Path:
    copy = Path(shutil.copytree(run_dir, tmp_path / "run"))
    if meets is not None:
        rp = copy / "compress" / "report.json"
        report = json.loads(rp.read_text())
        paths = {report["artifacts"][k]: k for k in ("onnx_fp32", "onnx_optimized", "onnx_int8")}
        for s in report["steps"]:
            if s.get("path") in paths:
                s["meets_goal"] = meets[paths[s["path"]]]
        report["goal_met"] = any(meets.values())
        rp.write_text(json.dumps(report))
    return copy


def test_missed_goal_needs_allow_miss(run_dir, tmp_path):
    run = _run_copy(run_dir, tmp_path, {"onnx_fp32": False, "onnx_optimized": False, "onnx_int8": False})
    out = tmp_path / "bundle"
    code, text = _run(["ship", run, "--out", out, *FAST])
    assert code == 1 and "--allow-miss" in text and len(text.strip().splitlines()) == 1, text
    assert not out.exists() and not list(tmp_path.glob(".bundle*"))
    code, text = _run(["ship", run, "--out", out, "--allow-miss", *FAST])
    assert code == 0 and "MISSED" in text, text
    m = json.loads((out / "manifest.json").read_text())
    assert m["variant"]["meets_goal"] is False and m["variant"]["shipped_with_allow_miss"] is True
    assert m["accuracy"]["goal"]["met"] is False and "MISSED the accuracy goal" in (out / "MODEL_CARD.md").read_text()


def test_named_variant_that_missed_needs_allow_miss(run_dir, tmp_path):
    run = _run_copy(run_dir, tmp_path, {"onnx_fp32": True, "onnx_optimized": True, "onnx_int8": False})
    code, text = _run(["ship", run, "--variant", "int8", "--out", tmp_path / "b", *FAST])
    assert code == 1 and "onnx_int8 missed the accuracy goal" in text, text
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("case", ["no_compress", "no_report", "bad_variant", "not_a_folder"])
def test_bad_run_input_is_one_line_exit_2_nothing_written(run_dir, tmp_path, case):
    run = _run_copy(run_dir, tmp_path)
    args = ["ship", run, "--out", tmp_path / "b", *FAST]
    if case == "no_compress":
        shutil.rmtree(run / "compress")
        want = f"run 'edgeft compress {run}' first"
    elif case == "no_report":
        (run / "compress" / "report.json").unlink()
        want = "report.json not found"
    elif case == "bad_variant":
        args += ["--variant", "fp16"]
        want = "onnx_fp32 (fp32/onnx), onnx_optimized (optimized), onnx_int8 (int8)"
    else:
        args[1] = tmp_path / "nowhere"
        want = "not found"
    code, text = _run(args)
    assert code == 2 and text.startswith("error: ") and len(text.strip().splitlines()) == 1, text
    assert want in text, text
    assert not (tmp_path / "b").exists() and not (tmp_path / "b.tar.gz").exists()


def test_existing_out_is_refused_and_force_replaces_only_bundles(run_dir, bundle, tmp_path):
    code, text = _run(["ship", run_dir, "--out", bundle, *FAST])
    assert code == 2 and "already exists" in text and "--force" in text, text
    other = tmp_path / "precious"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    code, text = _run(["ship", run_dir, "--out", other, "--force", *FAST])
    assert code == 2 and "not an edgeft bundle" in text, text
    assert (other / "keep.txt").read_text() == "mine"
    code, text = _run(["ship", run_dir, "--out", tmp_path / "x", "--name", "../evil", *FAST])
    assert code == 2 and "--name" in text, text


# ---------------------------------------------------------------- verify


def test_verify_passes_and_writes_json(bundle, tmp_path):
    code, text = _run(["verify", bundle, "--skip-latency", "--json-out", tmp_path / "v.json"])
    assert code == 0, text
    assert "verify: PASS" in text and "16/16 labels same" in text
    v = json.loads((tmp_path / "v.json").read_text())
    assert v["verdict"] == "pass" and [c["status"] for c in v["checks"]] == ["ok", "ok", "ok", "ok", "skipped"]
    assert [c["name"] for c in v["checks"]][3] == "ray"


@pytest.mark.parametrize("part", ["triton", "kubernetes"])
def test_verify_demanding_a_part_the_bundle_lacks_is_one_line_exit_2(bundle, part):
    code, text = _run(["verify", bundle, "--skip-latency", f"--{part}"])
    assert code == 2 and f"re-ship it with `edgeft ship --{part}`" in text and "BAD BUNDLE" in text, text


def test_ship_with_triton_and_kubernetes_verifies(run_dir, tmp_path):
    out = tmp_path / "scale-bundle"
    code, text = _run(["ship", run_dir, "--out", out, *FAST, "--triton", "--kubernetes", "--image",
                       "registry.example/tiny:1"])
    assert code == 0, text
    m = json.loads((out / "manifest.json").read_text())
    assert {"triton", "kubernetes", "ray"} <= set(m)
    assert any(f.startswith("triton/") for f in m["files"]) and "kubernetes/deployment.yaml" in m["files"]
    assert "registry.example/tiny:1" in (out / "kubernetes" / "deployment.yaml").read_text()
    code, text = _run(["verify", out, "--skip-latency", "--triton", "--kubernetes", "--json-out", tmp_path / "v.json"])
    assert code == 0, text
    checks = {c["name"]: c["status"] for c in json.loads((tmp_path / "v.json").read_text())["checks"]}
    assert checks["triton"] == checks["kubernetes"] == checks["ray"] == "ok"
    # a broken scale-out file behind resealed checksums is named, exit 2
    (out / "kubernetes" / "service.yaml").write_text("kind: [\n")
    _reseal(out)
    code, text = _run(["verify", out, "--skip-latency"])
    assert code == 2 and "service.yaml" in text, text


@pytest.mark.parametrize("change, named", [
    (lambda b: (b / "model" / "config.json").write_text("{}"), "changed: model/config.json"),
    (lambda b: (b / "golden" / "golden.jsonl").unlink(), "missing: golden/golden.jsonl"),
    (lambda b: (b / "model" / "extra.onnx").write_bytes(b"x"), "extra file: model/extra.onnx"),
    (lambda b: (b / "model" / "link").symlink_to(b / "model" / "model.onnx"), "link not allowed: model/link"),
])
def test_verify_names_tampered_missing_extra_files_exit_2(bundle, tmp_path, change, named):
    b = _copy(bundle, tmp_path)
    change(b)
    code, text = _run(["verify", b, "--skip-latency"])
    assert code == 2 and named in text and "BAD BUNDLE" in text, text
    assert "golden" not in text.split(named)[1].split("verify:")[0]  # nothing was loaded after the failure


def test_verify_refuses_a_regenerated_sha256sums_that_the_manifest_contradicts(bundle, tmp_path):
    from edgeft.bundle import sums_text

    b = _copy(bundle, tmp_path)
    (b / "model" / "labels.txt").write_text("pos\nneg\n")
    (b / "SHA256SUMS").write_text(sums_text(b))
    code, text = _run(["verify", b, "--skip-latency"])
    assert code == 2 and "manifest disagrees with SHA256SUMS: model/labels.txt" in text, text


def test_verify_golden_mismatch_exit_1(bundle, tmp_path):
    """A changed model behind resealed checksums: the classifier bias shifted towards the other label."""
    import onnx
    from onnx import numpy_helper

    b = _copy(bundle, tmp_path)
    path = b / "model" / "model.onnx"
    model = onnx.load(str(path))
    bias = next(t for t in model.graph.initializer if list(t.dims) == [2] and "classifier" in t.name)
    first = json.loads((b / "golden" / "golden.jsonl").read_text().splitlines()[0])
    shift = np.array([5.0, -5.0] if first["label"] == "pos" else [-5.0, 5.0], dtype=np.float32)
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + shift, bias.name))
    onnx.save(model, str(path))
    _reseal(b)
    code, text = _run(["verify", b, "--skip-latency"])
    assert code == 1 and "verify: FAIL" in text and "golden line 1: label" in text, text


def test_verify_newer_schema_and_not_a_bundle_exit_2(bundle, tmp_path):
    b = _copy(bundle, tmp_path)
    m = json.loads((b / "manifest.json").read_text())
    m["schema"] = "edgeft.bundle/2"
    (b / "manifest.json").write_text(json.dumps(m))
    _reseal(b)
    code, text = _run(["verify", b])
    assert code == 2 and "newer" in text and len(text.strip().splitlines()) == 1, text
    code, text = _run(["verify", tmp_path])
    assert code == 2 and "not an edgeft bundle" in text, text


def _fake_measure(scale: float, noise: float = 0.01):
    """Stand-in for measure_latency: the reference like at ship time, the model ``scale`` x slower."""
    def measure(runner, encoding, *, threads, budget_s):
        rng = np.random.default_rng(1)
        model = (1.0 + noise * rng.standard_normal(300)) * scale
        ref = 2.0 + 2.0 * noise * rng.standard_normal(300)
        return {"model": {"p50_ms": float(np.median(model)), "samples_ms": model.tolist()},
                "reference": {"p50_ms": float(np.median(ref)), "samples_ms": ref.tolist()}}
    return measure


@pytest.mark.parametrize("scale, noise, code, verdict", [
    (1.0, 0.01, 0, "ok"), (1.6, 0.01, 1, "regression"),
    (1.6, 0.6, 1, "regression"),  # the whole CI beyond the threshold: a regression whatever the CV (issue 8)
    (1.25, 0.6, 1, "inconclusive")])
def test_verify_latency_verdicts_use_the_gate_rule(bundle, tmp_path, monkeypatch, scale, noise, code, verdict):
    import edgeft.bundle_checks as bc

    b = _copy(bundle, tmp_path)
    m = json.loads((b / "manifest.json").read_text())
    rng = np.random.default_rng(0)  # the ship-time record: model 1 ms, reference 2 ms, quiet
    m["latency_check"]["model"]["samples_ms"] = (1.0 + 0.01 * rng.standard_normal(300)).tolist()
    m["latency_check"]["reference"]["samples_ms"] = (2.0 + 0.02 * rng.standard_normal(300)).tolist()
    (b / "manifest.json").write_text(json.dumps(m))
    _reseal(b)
    monkeypatch.setattr(bc, "measure_latency", _fake_measure(scale, noise))
    rc, text = _run(["verify", b, "--json-out", tmp_path / "v.json"])
    assert rc == code, text
    lat = json.loads((tmp_path / "v.json").read_text())["checks"][-1]
    assert lat["name"] == "latency" and lat["data"]["verdict"] == verdict, text


def test_verify_latency_measures_for_real(bundle):
    from edgeft.verify import verify

    res = verify(bundle, latency_seconds=0.5)
    lat = res.checks[-1]
    assert lat.name == "latency" and lat.status != "bad" and lat.data["here"]["model"]["n"] >= 20, res.render()
    assert lat.data["here"]["reference"]["p50_ms"] > 0 and lat.data["ci"] is not None
    assert res.checks[0].status == res.checks[1].status == res.checks[2].status == "ok"


def test_cli_help_stays_light():
    code = ("import sys; from edgeft.cli import cli; import edgeft.ship, edgeft.verify, edgeft.monitoring; "
            "print([m for m in ('torch', 'onnxruntime', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_edgeft_serve_answers_the_golden_examples(bundle, tmp_path):
    """The contract with `edgeft serve`: it opens the bundle, takes its serving defaults, and answers every
    golden text (one per request, so batch size 1) with the golden label and logits."""
    import httpx
    from serve_helpers import Server

    rows = [json.loads(line) for line in (bundle / "golden" / "golden.jsonl").read_text().splitlines()]
    budget = json.loads((bundle / "manifest.json").read_text())["serving"]["latency_budget_ms"]
    srv = Server(bundle, tmp_path / "serve.log", "--threads", "1")
    try:
        srv.wait_ready()
        with httpx.Client(base_url=srv.url, timeout=10) as client:
            for r in rows:
                body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [r["text"]]}]}
                out = client.post("/v2/models/tiny/versions/1/infer", json=body)
                assert out.status_code == 200, out.text
                outputs = {o["name"]: o["data"] for o in out.json()["outputs"]}
                assert outputs["label"] == [r["label"]]
                assert np.allclose(outputs["logits"], r["logits"], atol=1e-3)
            metrics = client.get("/metrics").text
        assert f'le="{budget / 1000:g}"' in metrics or f'le="{budget / 1000}"' in metrics  # the alert's bucket edge
    finally:
        assert srv.stop() == 0
