"""Bad input: one line naming the problem and the fix, exit code 2, no traceback, nothing written."""

import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeft.cli import cli


def invoke(*args):
    return CliRunner().invoke(cli, list(map(str, args)), catch_exceptions=False)


def assert_one_line_error(result, *needles):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_help_and_version():
    assert invoke("--help").exit_code == 0
    for cmd in ("finetune", "compress", "bench", "gate", "run", "recipe"):
        r = invoke(cmd, "--help")
        assert r.exit_code == 0 and "Usage" in r.output
    assert "0.1.0" in invoke("--version").output


def test_recipe_command_prints_resolved_recipe():
    r = invoke("recipe", "recipes/minilm-rotten-tomatoes.yaml", "--set", "finetune.epochs=1")
    assert r.exit_code == 0 and "epochs: 1" in r.output


@pytest.mark.parametrize("write, args, needles", [
    (None, [], ["recipe file", "not found"]),
    ("a: [1,\n", [], ["invalid YAML"]),
    ("finetune:\n  learning_rate: 1\n", [], ["finetune.learning_rate: unknown field"]),
    ("finetune:\n  epochs: two\n", [], ["finetune.epochs"]),
    ("finetune:\n  lr: 0\n", [], ["finetune.lr: must be > 0"]),
    ("data:\n  dataset: imdb\n", [], ["unknown dataset 'imdb'", "fix:"]),
    ("model:\n  name: ./no-such-model\n", ["--set", "data.max_train_samples=10"], ["model folder", "not found"]),
])
def test_finetune_bad_input(tmp_path, write, args, needles):
    recipe = tmp_path / ("missing.yaml" if write is None else "r.yaml")
    if write is not None:
        recipe.write_text(write)
    out = tmp_path / "run"
    r = invoke("finetune", recipe, "--out", out, *args)
    assert_one_line_error(r, *needles)
    assert not out.exists()


def test_missing_columns_in_user_data(tmp_path):
    data = tmp_path / "d.csv"
    data.write_text("body,label\na,1\nb,0\n")
    r = invoke("finetune", "--set", f"data.dataset={data}", "--out", tmp_path / "run")
    assert_one_line_error(r, "column 'text' not found", "data.text_column")
    assert not (tmp_path / "run").exists()


def test_model_folder_without_tokenizer(tmp_path, tiny_model_dir, tiny_csv):
    import shutil

    m = tmp_path / "m"
    shutil.copytree(tiny_model_dir, m)
    for f in ("vocab.txt", "tokenizer.json"):
        (m / f).unlink(missing_ok=True)
    r = invoke("finetune", "--set", f"model.name={m}", "--set", f"data.dataset={tiny_csv}", "--out", tmp_path / "run")
    assert_one_line_error(r, "has no tokenizer")


def test_existing_run_folder_is_refused_and_kept(tmp_path, tiny_csv):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    r = invoke("finetune", "--set", f"data.dataset={tiny_csv}", "--out", out)
    assert_one_line_error(r, "already exists", "--force")
    r = invoke("finetune", "--set", f"data.dataset={tiny_csv}", "--out", out, "--force")
    assert_one_line_error(r, "not an edgeft run folder")
    assert (out / "notes.txt").read_text() == "mine"


def test_cli_help_does_not_import_heavy_libraries():
    code = ("import sys; from edgeft.cli import cli; "
            "heavy = [m for m in ('torch', 'transformers', 'onnxruntime', 'onnx') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_builtin_dataset_ignores_column_settings(tmp_path):
    # Documented: built-in datasets have fixed columns, so text_column/label_column do not apply to them
    # (this case used to sit in the bad-input test and return before asserting anything).
    from edgeft.data import load_dataset
    from edgeft.recipe import DataConfig

    recipe = tmp_path / "r.yaml"
    recipe.write_text("data:\n  dataset: rotten-tomatoes\n  text_column: body\n  label_column: y\n")
    r = invoke("recipe", recipe)
    assert r.exit_code == 0 and "text_column: body" in r.output
    odd = load_dataset(DataConfig(dataset="rotten-tomatoes", text_column="body", label_column="y")).summary()
    assert odd == load_dataset(DataConfig(dataset="rotten-tomatoes")).summary()


# ---------------------------------------------------------------- validated before any work starts


def _tiny_args(tiny_model_dir, tiny_csv, *extra):
    return ["--set", f"model.name={tiny_model_dir}", "--set", f"data.dataset={tiny_csv}", *extra]


def _no_run_folder(tmp_path, out):
    assert not out.exists()
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("setting, needles", [
    ("bench.runtimes=[cuda]", ["bench.runtimes: unknown runtime 'cuda'", "known: auto, torch-cpu"]),
    ("compress.optimize.level=5", ["compress.optimize.level: must be one of 0, 1, 2, 99"]),
    (f"seed={2**32}", ["seed: must be <= 4294967295"]),
    ("seed=-1", ["seed: must be >= 0"]),
    ("finetune.epochs=true", ["finetune.epochs: must be a valid integer"]),
    ("stages=[]", ["stages: name at least one"]),
    ("finetune={[1]: x}", ["override 'finetune={[1]: x}'", "a key at line 1 is a list"]),
])
def test_run_refuses_bad_settings_before_any_work(tmp_path, monkeypatch, tiny_model_dir, tiny_csv, setting, needles):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    r = invoke("run", *_tiny_args(tiny_model_dir, tiny_csv, "--set", setting), "--out", out)
    assert_one_line_error(r, *needles)
    _no_run_folder(tmp_path, out)


@pytest.mark.parametrize("name", ["../../x", "/tmp/edgeft-escape", "a/b", "..", "x\\y"])
def test_recipe_name_cannot_leave_runs(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    r = invoke("run", "--set", f"name={name!r}")
    assert_one_line_error(r, "name:", "is not a plain name")
    assert list(tmp_path.iterdir()) == [] and not Path("/tmp/edgeft-escape").exists()


def test_unhashable_yaml_key_in_recipe_file(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("finetune: {[1]: x}\n")
    out = tmp_path / "run"
    assert_one_line_error(invoke("finetune", recipe, "--out", out), str(recipe), "a key at line 1 is a list")
    assert not out.exists()


def test_unavailable_runtime_fails_before_the_finetune(tmp_path, monkeypatch, tiny_model_dir, tiny_csv):
    import edgeft.bench.runtimes as rts

    real = rts.detect_runtimes

    def without_cuda():
        found = real()
        found["torch-cuda"] = {"present": False, "reason": "no CUDA GPU (test)"}
        return found

    monkeypatch.setattr(rts, "detect_runtimes", without_cuda)
    monkeypatch.setattr("edgeft.finetune.finetune", lambda *a, **k: pytest.fail("the fine-tune started"))
    out = tmp_path / "run"
    r = invoke("run", *_tiny_args(tiny_model_dir, tiny_csv, "--set", "bench.runtimes=[torch-cuda]"), "--out", out)
    assert_one_line_error(r, "bench.runtimes: runtime torch-cuda is not present here", "no CUDA GPU (test)")
    assert not out.exists()


def test_mistyped_builtin_model_fails_at_once(tmp_path, monkeypatch):
    import time

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # it must not depend on being offline
    t0 = time.monotonic()
    out = tmp_path / "run"
    r = invoke("finetune", "--set", "model.name=minilm-l7", "--set", "data.max_train_samples=10", "--out", out)
    assert_one_line_error(r, "model 'minilm-l7' is not a built-in model", "did you mean 'minilm-l6'?", "ORG/NAME")
    assert time.monotonic() - t0 < 20 and not out.exists()


def test_model_needing_remote_code_is_refused_before_the_run_folder(tmp_path, tiny_model_dir, tiny_csv):
    import json
    import shutil

    model = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(model_type="edgeft-custom", auto_map={"AutoConfig": "configuration_custom.CustomConfig"})
    (model / "config.json").write_text(json.dumps(cfg))
    (model / "configuration_custom.py").write_text("raise SystemExit('remote code ran')\n")
    out = tmp_path / "run"
    r = invoke("finetune", *_tiny_args(model, tiny_csv), "--out", out)
    assert_one_line_error(r, "needs its own code to load", "model.trust_remote_code")
    assert not out.exists()


def test_unknown_lora_target_module_is_refused_before_the_run_folder(tmp_path, tiny_model_dir, tiny_csv):
    out = tmp_path / "run"
    r = invoke("finetune", *_tiny_args(tiny_model_dir, tiny_csv, "--set", "finetune.method=lora",
                                       "--set", "finetune.lora.target_modules=[q_proj]"), "--out", out)
    assert_one_line_error(r, "finetune.lora.target_modules: ['q_proj'] not found in the model", "query")
    assert not out.exists()


def test_too_few_rows_per_class(tmp_path, tiny_model_dir):
    data = tmp_path / "d.csv"
    data.write_text("text,label\ngood film,pos\ngreat plot,pos\nbad film,neg\ndull plot,neg\n")
    out = tmp_path / "run"
    r = invoke("finetune", "--set", f"model.name={tiny_model_dir}", "--set", f"data.dataset={data}", "--out", out)
    assert_one_line_error(r, "split is empty", "at least 3 rows per class")
    assert not out.exists()


def test_blank_labels_are_counted_in_metrics_and_output(tmp_path, tiny_model_dir, tiny_csv):
    import json

    data = tmp_path / "d.csv"
    data.write_text(tiny_csv.read_text() + "orphan,\nanother orphan,  \n")
    out = tmp_path / "run"
    r = invoke("finetune", *_tiny_args(tiny_model_dir, data, "--set", "finetune.epochs=1",
                                       "--set", "finetune.max_length=16"), "--out", out)
    assert r.exit_code == 0, r.output
    assert "dropped 2 rows with a blank label" in r.output
    assert json.loads((out / "metrics.json").read_text())["data"]["blank_label_rows_dropped"] == 2


def test_bench_threads_zero_is_refused(tmp_path, tiny_model_dir):
    r = invoke("bench", tiny_model_dir, "--threads", "0", "--out", tmp_path / "b")
    assert_one_line_error(r, "bench.threads: must be > 0")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("data, dataset, split", [
    ("hf:imdb", "hf:imdb", "test"),
    ("hf:org/name:validation", "hf:org/name", "validation"),
    ("data/x.csv:test", "data/x.csv", "test"),
    ("data/x.csv", "data/x.csv", "test"),
    ("c:/odd:name.csv", "c:/odd:name.csv", "test"),
])
def test_bench_data_splits_on_the_last_colon_only_before_a_split_name(tmp_path, monkeypatch, tiny_model_dir,
                                                                      data, dataset, split):
    import edgeft.recipe
    from edgeft.errors import EdgeftError

    seen = {}
    real = edgeft.recipe.load_recipe

    def capture(*args, **kwargs):
        seen["recipe"] = real(*args, **kwargs)
        return seen["recipe"]

    def stop(cfg, seed=42):
        raise EdgeftError("stopped before loading the data")

    monkeypatch.setattr("edgeft.recipe.load_recipe", capture)
    monkeypatch.setattr("edgeft.data.load_dataset", stop)
    r = invoke("bench", tiny_model_dir, "--data", data, "--out", tmp_path / "b")
    assert_one_line_error(r, "stopped before loading the data")
    assert (seen["recipe"].data.dataset, seen["recipe"].bench.eval_split) == (dataset, split)
