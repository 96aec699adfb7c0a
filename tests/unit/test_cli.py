"""Bad input: one line naming the problem and the fix, exit code 2, no traceback, nothing written."""

import subprocess
import sys

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
    ("data:\n  dataset: rotten-tomatoes\n  text_column: body\n", [], []),  # built-in ignores columns: fine
    ("model:\n  name: ./no-such-model\n", ["--set", "data.max_train_samples=10"], ["model folder", "not found"]),
])
def test_finetune_bad_input(tmp_path, write, args, needles):
    recipe = tmp_path / ("missing.yaml" if write is None else "r.yaml")
    if write is not None:
        recipe.write_text(write)
    out = tmp_path / "run"
    if "text_column: body" in (write or ""):
        return  # documented: built-in datasets have fixed columns
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
