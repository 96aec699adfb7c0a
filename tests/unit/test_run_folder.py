"""The run folder: its layout owner, the lock (a real second process), SIGTERM and SIGKILL of real
`edgeft` processes, --force that keeps the old compress/ until the new one is whole, the recipe an
in-place compress saves, the manifest a stand-alone bench updates, bench refusing a user's folder,
`compress MODEL --out D` + `bench D` and `stages: [compress, bench]`, and `edgeft run` end to end."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from edgeft.artifacts import atomic_dir, clean_stale_partials, open_run_dir, prepare_run_dir, run_lock
from edgeft.cli import cli
from edgeft.errors import ModelError, RunDirError
from edgeft.layout import LOCK_NAME, RUN_MARKER, RunLayout, read_side_file, write_side_file

ROOT = Path(__file__).resolve().parents[2]
BENCH_FAST = ["bench.min_samples=20", "bench.max_seconds_per_variant=0.2", "bench.batch_sizes=[1]",
              "bench.seq_lengths=[16]", "bench.threads=1", "bench.runtimes=[torch-cpu,ort-cpu]"]
COMPRESS_FAST = ["compress.prune=null", "compress.optimize.level=1", "compress.quantize=null",
                 "compress.max_accuracy_drop=100"]


def invoke(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


def _sets(items: list[str]) -> list[str]:
    return [x for item in items for x in ("--set", item)]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _assert_manifest_matches(run: Path) -> dict:
    """Every file in the run folder (not the manifest, the lock or work files) is in the manifest with
    its sha256, and nothing else is."""
    m = json.loads((run / "manifest.json").read_text())
    on_disk = {p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file()} - {"manifest.json", LOCK_NAME}
    assert set(m["files"]) == on_disk
    for rel, entry in m["files"].items():
        assert entry["sha256"] == _sha(run / rel), rel
    return m


def _env(**extra) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", **extra)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.monotonic()
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"process ended early ({proc.returncode}): {err[-2000:]}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            pytest.fail("process never reached the pause point")
        time.sleep(0.1)


# ---------------------------------------------------------------- layout owner


def test_layout_names_and_side_file(tmp_path):
    lay = RunLayout(tmp_path)
    assert lay.finetuned == tmp_path / "finetuned" and lay.compress_report == tmp_path / "compress" / "report.json"
    assert lay.compress_recipe == tmp_path / "compress" / "recipe.yaml" and lay.bench_json.name == "bench.json"
    assert lay.lock.name == LOCK_NAME and lay.marker.name == RUN_MARKER and not lay.is_run()
    write_side_file(tmp_path, max_length=32, label_names=["a", "b"], method="full")
    assert read_side_file(tmp_path) == {"max_length": 32, "label_names": ["a", "b"], "method": "full"}
    (tmp_path / "edgeft.json").write_text("{nope")
    with pytest.raises(ModelError, match="edgeft.json is not valid JSON"):
        read_side_file(tmp_path)
    assert read_side_file(tmp_path / "missing") == {}


def test_atomic_dir_gives_mkstemp_files_the_umask_mode(tmp_path):
    """safetensors writes model.safetensors through mkstemp (0600) while the rest is 0644."""
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "model") as d:
            fd, name = tempfile.mkstemp(dir=d)
            os.close(fd)
            os.rename(name, d / "model.safetensors")
            (d / "config.json").write_text("{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "model" / "model.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == 0o755


def test_symlinked_out_is_refused_never_followed(tmp_path):
    real = prepare_run_dir(tmp_path / "real")
    (real / "keep.txt").write_text("x")
    link = tmp_path / "link"
    link.symlink_to(real)
    for kwargs in ({"force": True}, {"force": False}, {"mode": "output"}):
        with pytest.raises(RunDirError, match="symbolic link"):
            with open_run_dir(link, **kwargs):
                pass
    assert (real / "keep.txt").read_text() == "x"


# ---------------------------------------------------------------- lock, stale partials


HOLDER = """
import sys, time
from edgeft.artifacts import run_lock, partial_dir
with run_lock(sys.argv[1]):
    with partial_dir(sys.argv[1], "compress") as p:
        (p / "model.onnx").write_bytes(b"x" * 4096)
        print("ready", flush=True)
        time.sleep(60)
"""


def test_lock_refuses_a_second_writer_and_force_and_dies_with_its_process(tmp_path, tiny_csv):
    run = prepare_run_dir(tmp_path / "run")
    (run / "metrics.json").write_text("{}")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, text=True, env=_env())
    try:
        assert holder.stdout.readline().strip() == "ready"
        # `--force` on a folder whose run is in progress: exit 2, names the holder, deletes nothing
        code, out = invoke("finetune", "--set", f"data.dataset={tiny_csv}", "--out", run, "--force", "--quiet")
        assert code == 2, out
        assert f"in use by another edgeft process (pid {holder.pid})" in out and len(out.strip().splitlines()) == 1
        assert (run / "metrics.json").exists() and list(run.glob(".compress.*.partial"))
        with pytest.raises(RunDirError, match=f"pid {holder.pid}"):
            with run_lock(run):
                pass
        code, out = invoke("ship", run, "--out", tmp_path / "bundle")  # ship writes bundle/ into run folders
        assert code == 2 and f"pid {holder.pid}" in out, out
        # its partial folder is being built (its flock is held): not stale, kept
        assert clean_stale_partials(run) == [] and list(run.glob(".compress.*.partial"))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # SIGKILL: the OS dropped the lock; the partial it left is stale and the next run removes it (one line)
    assert list(run.glob(".compress.*.partial"))
    proc = subprocess.run([sys.executable, "-c", "import sys; from edgeft.artifacts import open_run_dir\n"
                           "with open_run_dir(sys.argv[1], mode='update'): pass", str(run)],
                          capture_output=True, text=True, env=_env())
    assert proc.returncode == 0, proc.stderr
    assert not list(run.glob("*.partial")) and (run / "metrics.json").exists()
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "removed 1 stale partial folder" in lines[0] and ".compress." in lines[0]


def test_lock_is_reentrant_in_process_and_released(tmp_path):
    with run_lock(tmp_path / "r"):
        with run_lock(tmp_path / "r"):
            pass
        with open(tmp_path / "r" / LOCK_NAME) as f:
            assert f.read().strip() == str(os.getpid())
    with run_lock(tmp_path / "r"):  # released: can be taken again
        pass


# ---------------------------------------------------------------- SIGTERM of a real edgeft process


def _compress_recipe(tmp_path: Path, tiny_csv: Path, model: Path) -> Path:
    data = {"name": "tiny", "model": {"name": str(model)}, "data": {"dataset": str(tiny_csv)},
            "finetune": {"max_length": 32, "batch_size": 16, "eval_batch_size": 64},
            "compress": {"prune": None, "quantize": None, "optimize": {"level": 1}, "max_accuracy_drop": 100}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_sigterm_cleans_up_exits_143_and_the_manifest_says_interrupted(tmp_path, tiny_model_dir, tiny_csv):
    recipe, out, flag = _compress_recipe(tmp_path, tiny_csv, tiny_model_dir), tmp_path / "run", tmp_path / "paused"
    cmd = [sys.executable, "-m", "edgeft.cli", "compress", str(tiny_model_dir), "--recipe", str(recipe),
           "--out", str(out), "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(EDGEFT_TEST_PAUSE_IN="compress", EDGEFT_TEST_PAUSE_FILE=str(flag)))
    try:
        _wait_for(flag, proc)
        assert list(out.glob(".compress.*.partial"))  # mid-work: the partial compress folder exists
        # a second writer (here with --force) is refused while the first runs
        code, text = invoke("compress", tiny_model_dir, "--recipe", recipe, "--out", out, "--force", "--quiet")
        assert code == 2 and f"pid {proc.pid}" in text, text
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert "interrupted (SIGTERM)" in err and "Traceback" not in err
    assert not list(out.glob(".*.partial")) and not (out / "compress").exists()
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "interrupted" and m["interrupted"]["stage"] == "compress"
    assert m["interrupted"]["signal"] == "SIGTERM" and m["interrupted"]["at"].endswith("Z")
    assert m["stages"] == []


# ---------------------------------------------------------------- in-place compress --force, recipe, manifest


def _fake_compress(fail: bool):
    def compress(model_dir, recipe, dataset, out_dir, *, show_progress=True):
        assert not Path(out_dir).exists()
        with atomic_dir(out_dir) as tmp:
            (tmp / "report.json").write_text(json.dumps({"schema": "edgeft.compress/1", "model_dir": str(model_dir),
                                                         "artifacts": {}}))
            if fail:
                raise KeyboardInterrupt
        return {}
    return compress


def test_force_keeps_old_compress_until_new_is_whole_and_saves_its_recipe(tmp_path, tiny_model_dir, tiny_csv,
                                                                          monkeypatch):
    import edgeft.compress

    run = prepare_run_dir(tmp_path / "run")
    shutil.copytree(tiny_model_dir, run / "finetuned")
    recipe = _compress_recipe(tmp_path, tiny_csv, tiny_model_dir)
    shutil.copy(recipe, run / "recipe.yaml")
    (run / "compress").mkdir()
    (run / "compress" / "report.json").write_text('{"old": true}')
    monkeypatch.setattr(edgeft.compress, "compress", _fake_compress(fail=True))
    code, out = invoke("compress", run, "--force", "--quiet", "--set", "compress.max_accuracy_drop=7")
    assert code == 130, out
    assert json.loads((run / "compress" / "report.json").read_text()) == {"old": True}  # old one kept
    assert not list(run.glob(".*.partial"))
    monkeypatch.setattr(edgeft.compress, "compress", _fake_compress(fail=False))
    code, out = invoke("compress", run, "--force", "--quiet", "--set", "compress.max_accuracy_drop=7")
    assert code == 0, out
    assert "old" not in json.loads((run / "compress" / "report.json").read_text())
    # the resolved recipe it used (the override included) is saved, and the manifest hashes what was saved
    saved = run / "compress" / "recipe.yaml"
    assert yaml.safe_load(saved.read_text())["compress"]["max_accuracy_drop"] == 7
    m = _assert_manifest_matches(run)
    assert m["compress_recipe_sha256"] == _sha(saved) and m["recipe_sha256"] == _sha(run / "recipe.yaml")
    assert m["status"] == "complete" and "compress" in m["stages"]


def test_compress_given_an_onnx_file_says_what_it_takes(tmp_path, tiny_csv):
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"\x08\x07")
    code, out = invoke("compress", onnx, "--set", f"data.dataset={tiny_csv}", "--out", tmp_path / "run", "--quiet")
    assert code == 2, out
    assert "is an ONNX file" in out and "fine-tuned Hugging Face folder or a run folder" in out
    assert "not found" not in out and not (tmp_path / "run").exists()


def test_bench_refuses_a_folder_edgeft_did_not_make(tmp_path, tiny_model_dir, tiny_csv):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "bench.md").write_text("my own notes")
    for extra in ([], ["--force"]):
        code, out = invoke("bench", tiny_model_dir, "--data", f"{tiny_csv}:test", "--out", mine, "--quiet", *extra)
        assert code == 2, out
        assert "edgeft did not make it" in out and "new or empty folder" in out and len(out.strip().splitlines()) == 1
    assert (mine / "bench.md").read_text() == "my own notes" and sorted(p.name for p in mine.iterdir()) == ["bench.md"]


# ---------------------------------------------------------------- compress --out D, then bench D


def test_compress_out_then_bench_takes_the_reference_from_the_report(tmp_path, tiny_model_dir, tiny_csv):
    recipe = _compress_recipe(tmp_path, tiny_csv, tiny_model_dir)
    run = tmp_path / "run"
    code, out = invoke("compress", tiny_model_dir, "--recipe", recipe, "--out", run, "--quiet")
    assert code == 0, out
    assert not (run / "finetuned").exists()
    assert json.loads((run / "compress" / "report.json").read_text())["model_dir"] == str(tiny_model_dir.resolve())
    before = json.loads((run / "manifest.json").read_text())
    code, out = invoke("bench", run, "--quiet", *_sets(BENCH_FAST))
    assert code == 0, out
    rep = json.loads((run / "bench.json").read_text())
    assert {r["model"] for r in rep["results"]} == {"finetuned", "onnx_fp32", "onnx_optimized"}
    assert all(r["status"] == "ok" for r in rep["results"])
    # the stand-alone bench updated the run's manifest: bench files hashed, stages, earlier fields kept
    m = _assert_manifest_matches(run)
    assert {"bench.json", "bench.md", "bench.png"} <= set(m["files"]) and m["stages"] == ["compress", "bench"]
    assert m["recipe_sha256"] == before["recipe_sha256"] and m["status"] == "complete"


def test_stages_compress_bench_run(tmp_path, tiny_model_dir, tiny_csv):
    out = tmp_path / "run"
    code, text = invoke("run", "--set", f"model.name={tiny_model_dir}", "--set", f"data.dataset={tiny_csv}",
                        "--set", "stages=[compress,bench]", "--set", "finetune.max_length=32",
                        *_sets(COMPRESS_FAST + BENCH_FAST), "--out", out, "--quiet")
    assert code == 0, text
    rep = json.loads((out / "bench.json").read_text())
    assert {r["model"] for r in rep["results"]} == {"finetuned", "onnx_fp32", "onnx_optimized"}
    m = _assert_manifest_matches(out)
    assert m["stages"] == ["compress", "bench"] and m["status"] == "complete"


# ---------------------------------------------------------------- edgeft run, end to end


def test_edgeft_run_end_to_end_on_a_tiny_model(tmp_path, tiny_model_dir, tiny_csv):
    out = tmp_path / "run"
    sets = [f"model.name={tiny_model_dir}", f"data.dataset={tiny_csv}", "name=tiny", "finetune.epochs=1",
            "finetune.max_length=32", "finetune.batch_size=16", "compress.prune.heads=0.5", "compress.prune.ffn=0.5",
            "compress.prune.importance_samples=32", "compress.prune.recovery.epochs=0.25",
            "compress.optimize.level=1", "compress.max_accuracy_drop=100", *BENCH_FAST]
    old = os.umask(0o022)
    try:
        code, text = invoke("run", *_sets(sets), "--out", out, "--quiet")
    finally:
        os.umask(old)
    assert code == 0, text
    assert text.strip().splitlines()[-1] == str(out)
    for rel in (RUN_MARKER, "recipe.yaml", "manifest.json", "metrics.json", "finetuned/model.safetensors",
                "finetuned/config.json", "finetuned/edgeft.json", "compress/report.json", "compress/recipe.yaml",
                "compress/pruned/model.safetensors", "compress/onnx/model.onnx", "compress/optimized/model.onnx",
                "compress/int8/model.onnx", "bench.json", "bench.md", "bench.png"):
        assert (out / rel).is_file(), rel
    assert not list(out.glob(".*.partial"))
    for p in out.rglob("*"):  # every file shared alike (model.safetensors was 0600)
        if p.is_file():
            assert stat.S_IMODE(p.stat().st_mode) == 0o644, p
    m = _assert_manifest_matches(out)
    assert m["stages"] == ["finetune", "compress", "bench"] and m["status"] == "complete"
    assert m["recipe_sha256"] == _sha(out / "recipe.yaml")
    rep = json.loads((out / "bench.json").read_text())
    models = {r["model"] for r in rep["results"] if r["status"] == "ok"}
    assert models == {"finetuned", "pruned", "onnx_fp32", "onnx_optimized", "onnx_int8"}
    assert all(r["latency_ms"]["p50"] > 0 for r in rep["results"] if r["status"] == "ok")
