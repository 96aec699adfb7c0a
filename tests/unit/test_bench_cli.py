"""`edgeft bench` / `edgeft gate` on bad input: one line, exit 2; gate exit codes 0 / 1."""

import json

import pytest
from click.testing import CliRunner

from edgeft.cli import cli
from test_gate import make_report  # same folder (pytest prepend import mode)


def invoke(*args):
    return CliRunner().invoke(cli, list(map(str, args)), catch_exceptions=False)


def assert_one_line_error(result, *needles, code=2):
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture()
def data_arg(tiny_csv):
    return f"{tiny_csv}:test"


def test_bench_missing_path(tmp_path, data_arg):
    assert_one_line_error(invoke("bench", tmp_path / "nope", "--data", data_arg, "--out", tmp_path / "o"), "not found")


def test_bench_not_a_model(tmp_path, data_arg):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "readme.txt").write_text("hi")
    assert_one_line_error(invoke("bench", tmp_path / "junk", "--data", data_arg, "--out", tmp_path / "o"),
                          "is not a model", str(tmp_path / "junk"))


def test_bench_corrupt_onnx_names_the_file(tmp_path, data_arg, tiny_model_dir):
    folder = tmp_path / "onnx"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"\x08\x07garbage-not-a-protobuf" * 10)
    assert_one_line_error(invoke("bench", folder, "--data", data_arg, "--out", tmp_path / "o"),
                          str(folder / "model.onnx"))


def test_bench_truncated_weights_name_the_file(tmp_path, data_arg, tiny_model_dir):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    w = broken / "model.safetensors"
    w.write_bytes(w.read_bytes()[:200])
    assert_one_line_error(invoke("bench", broken, "--data", data_arg, "--out", tmp_path / "o"), str(w))


def test_bench_runtime_asked_for_but_absent_lists_present(tmp_path, data_arg, tiny_model_dir):
    from edgeft.bench.runtimes import detect_runtimes

    absent = [rt for rt, d in detect_runtimes().items() if not d["present"]]
    if not absent:
        pytest.skip("every runtime is present here")
    r = invoke("bench", tiny_model_dir, "--runtimes", absent[0], "--data", data_arg, "--out", tmp_path / "o")
    assert_one_line_error(r, absent[0], "not present", "present runtimes: torch-cpu")
    assert not (tmp_path / "o" / "bench.json").exists()


def test_bench_unknown_runtime(tmp_path, data_arg, tiny_model_dir):
    assert_one_line_error(invoke("bench", tiny_model_dir, "--runtimes", "tensorflow", "--data", data_arg,
                                 "--out", tmp_path / "o"), "unknown runtime 'tensorflow'")


def test_gate_cli_exit_codes(tmp_path):
    base = make_report(tmp_path / "base.json", seed=0)
    same = make_report(tmp_path / "same.json", seed=1)
    slow = make_report(tmp_path / "slow.json", seed=2, scale={"onnx_int8": 1.25})
    r = invoke("gate", same, "--baseline", base)
    assert r.exit_code == 0 and r.output.startswith("gate: PASS"), r.output
    r = invoke("gate", slow, "--baseline", base, "--max-latency-regression", "10%", "--json-out", tmp_path / "v.json")
    assert r.exit_code == 1 and "REGRESSION" in r.output and "onnx_int8/ort-cpu/int8/b1/s128" in r.output
    assert json.loads((tmp_path / "v.json").read_text())["verdict"] == "regression"
    # a generous threshold lets the same shift pass
    assert invoke("gate", slow, "--baseline", base, "--max-latency-regression", "0.5").exit_code == 0


@pytest.mark.parametrize("content, needle", [("", "is empty"), ("{]", "not valid JSON"),
                                             ('{"schema": "edgeft.bench/0", "results": []}', "schema")])
def test_gate_cli_bad_input(tmp_path, content, needle):
    base = make_report(tmp_path / "base.json")
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    assert_one_line_error(invoke("gate", bad, "--baseline", base), needle)
    assert_one_line_error(invoke("gate", base, "--baseline", bad), needle, "baseline")


def test_gate_cli_other_model_set_and_bad_threshold(tmp_path):
    base = make_report(tmp_path / "base.json")
    other = make_report(tmp_path / "other.json", models={"x": ("ort-cpu", "fp32", 5.0)})
    assert_one_line_error(invoke("gate", other, "--baseline", base), "different model sets")
    assert_one_line_error(invoke("gate", base, "--baseline", base, "--max-latency-regression", "ten"),
                          "not a fraction")


def _run_folder(tmp_path, tiny_model_dir, report_text):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_model_dir, run / "finetuned")
    (run / ".edgeft-run").write_text("test\n")
    (run / "compress").mkdir()
    (run / "compress" / "report.json").write_text(report_text)
    return run


@pytest.mark.parametrize("report_text, needle", [
    ("{truncated", "not a valid compress report"),
    ('{"artifacts": {"onnx_int8": "../../../etc"}}', "points outside"),
    ('{"artifacts": {"onnx_int8": "int8/model.onnx"}}', "not found"),
])
def test_bench_bad_run_folder(tmp_path, data_arg, tiny_model_dir, report_text, needle):
    run = _run_folder(tmp_path, tiny_model_dir, report_text)
    assert_one_line_error(invoke("bench", run, "--data", data_arg, "--out", tmp_path / "o"), needle)


def test_bench_run_folder_without_finetuned(tmp_path, data_arg):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".edgeft-run").write_text("x")
    assert_one_line_error(invoke("bench", tmp_path / "run", "--data", data_arg, "--out", tmp_path / "o"),
                          "has no finetuned/")
