"""Errors at the terminal: control characters escaped, the machine's OSErrors as one-line exit-2 errors,
links as --out refused. Each case here exited 3 or printed raw escape codes before."""

import errno
import os

import pytest
from click.testing import CliRunner

from edgeft.cli import cli
from edgeft.errors import EdgeftError, ModelError, SystemProblem, from_os_error, printable

HOSTILE = "\x1b[2K\rok: all checks passed"
RAW = ("\x1b", "\r", "\x9b", "\x07", "\x08", "\x7f")


def invoke(*args):
    return CliRunner().invoke(cli, list(map(str, args)), catch_exceptions=False)


def assert_no_raw_controls(text):
    for ch in RAW:
        assert ch not in text, repr(text)


def one_error_line(result, code=2):
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    return lines[0]


# ---------------------------------------------------------------- printable / one_line

@pytest.mark.parametrize("raw, shown", [
    ("plain text, spaces kept", "plain text, spaces kept"),
    (HOSTILE, "\\x1b[2K\\rok: all checks passed"),
    ("a\nb\tc", "a\\nb\\tc"),
    ("del\x7f c1\x9b[31m bel\x07 nul\x00", "del\\x7f c1\\x9b[31m bel\\x07 nul\\x00"),
    ("rtl\u202etxt.exe sep\u2028x", "rtl\\u202etxt.exe sep\\u2028x"),
    ("bad byte \udcff", "bad byte \\udcff"),  # os.fsdecode of an undecodable name: printable, not a crash
    ("é ü 中文", "é ü 中文"),
])
def test_printable(raw, shown):
    assert printable(raw) == shown


def test_printable_keeps_newlines_of_multiline_reports_only_when_asked():
    assert printable(f"line 1\nline {HOSTILE}", keep_newlines=True) == "line 1\nline \\x1b[2K\\rok: all checks passed"


def test_one_line_escapes_a_hostile_path_and_stays_one_line():
    err = ModelError(f"ONNX model /m/{HOSTILE}.onnx not found\n  (second line)", "check the path")
    text = err.one_line()
    assert_no_raw_controls(text)
    assert "\n" not in text
    assert text == "ONNX model /m/\\x1b[2K\\rok: all checks passed.onnx not found (second line) (fix: check the path)"


def test_cli_error_line_with_a_hostile_path_prints_no_raw_escape(tmp_path):
    line = one_error_line(invoke("recipe", tmp_path / f"{HOSTILE}.yaml"))
    assert line.startswith("error: ") and "not found" in line
    assert "\\x1b[2K\\rok: all checks passed" in line
    assert_no_raw_controls(line)


def test_cli_internal_error_line_escapes_too(monkeypatch):
    import edgeft.recipe

    def boom(*a, **k):
        raise RuntimeError(f"bug with {HOSTILE}")

    monkeypatch.setattr(edgeft.recipe, "load_recipe", boom)
    monkeypatch.delenv("EDGEFT_DEBUG", raising=False)
    line = one_error_line(invoke("recipe"), code=3)
    assert line.startswith("internal error: RuntimeError")
    assert_no_raw_controls(line)


def test_progress_messages_escape_names(capsys):
    from edgeft.progress import say

    say(f"[bold]load[/] {HOSTILE}")
    err = capsys.readouterr().err
    assert "\\x1b[2K\\rok" in err
    assert_no_raw_controls(err)


# ---------------------------------------------------------------- OSErrors of the machine -> exit 2

@pytest.mark.parametrize("code, needle", [
    (errno.ENOSPC, "no space left on device while writing /d/f"),
    (errno.EDQUOT, "disk quota exceeded while writing /d/f"),
    (errno.ENAMETOOLONG, "file name too long: /d/f"),
    (errno.EACCES, "permission denied: /d/f"),
    (errno.EROFS, "read-only file system: /d/f"),
])
def test_from_os_error_maps_environment_errors(code, needle):
    err = from_os_error(OSError(code, os.strerror(code), "/d/f"))
    assert isinstance(err, SystemProblem) and err.exit_code == 2
    assert err.one_line().startswith(needle) and "(fix: " in err.one_line()


def test_from_os_error_sees_through_wrappers_and_leaves_bugs_alone():
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("PytorchStreamWriter failed writing file data/0") from inner
    except RuntimeError as e:
        wrapped = e
    assert from_os_error(wrapped, "runs/a").one_line().startswith("no space left on device while writing runs/a")
    # safetensors/Rust style: only the OS message survives
    assert from_os_error(ValueError("I/O error: No space left on device (os error 28)")) is not None
    assert from_os_error(FileNotFoundError(errno.ENOENT, "gone", "x")) is None  # may be an edgeft bug: exit 3
    assert from_os_error(KeyError("x")) is None


def test_full_disk_is_exit_2_naming_the_out_folder(tmp_path, tiny_model_dir, tiny_csv, monkeypatch):
    """A full disk (every fsync fails with ENOSPC) exited 3 'internal error: OSError' before."""
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    out = tmp_path / "run"
    line = one_error_line(invoke("finetune", "--set", f"model.name={tiny_model_dir}", "--set",
                                 f"data.dataset={tiny_csv}", "--out", out))
    assert line.startswith(f"error: no space left on device while writing {out}")  # the file, or at least --out
    assert line.endswith("(fix: free space or pass --out on another disk)")


def test_full_disk_names_the_file_even_without_out(tmp_path, monkeypatch):
    from edgeft.artifacts import write_text_atomic

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as info:
        write_text_atomic(tmp_path / "metrics.json", "{}")
    assert from_os_error(info.value).one_line().startswith(f"no space left on device while writing {tmp_path}/metrics.json")
    assert not list(tmp_path.iterdir())  # no temporary file left behind


def test_full_disk_during_export_does_not_blame_the_model_folder(tmp_path, tiny_model_dir, monkeypatch):
    import optimum.exporters.onnx

    from edgeft.export import export_onnx

    def full(*a, output, **k):
        raise OSError(errno.ENOSPC, "No space left on device", os.path.join(output, "model.onnx"))

    monkeypatch.setattr(optimum.exporters.onnx, "main_export", full)
    with pytest.raises(SystemProblem, match="no space left on device while writing") as info:
        export_onnx(tiny_model_dir, tmp_path / "onnx")
    assert "check the model folder" not in info.value.one_line()
    assert not isinstance(info.value, ModelError)


def test_out_name_too_long_is_exit_2(tmp_path, tiny_model_dir, tiny_csv):
    out = tmp_path / ("x" * 300)
    line = one_error_line(invoke("finetune", "--set", f"model.name={tiny_model_dir}", "--set",
                                 f"data.dataset={tiny_csv}", "--out", out))
    assert line.startswith("error: file name too long: ") and "shorter --out" in line


@pytest.mark.parametrize("force", [True, False])
@pytest.mark.parametrize("command", ["finetune", "bench"])
def test_symlinked_out_is_refused_and_nothing_behind_it_is_touched(tmp_path, tiny_model_dir, tiny_csv, force,
                                                                   command):
    from edgeft.artifacts import RUN_MARKER

    real = tmp_path / "real"
    real.mkdir()
    (real / RUN_MARKER).write_text("created by edgeft\n")  # looks like a run folder --force may replace
    (real / "keep.txt").write_text("mine")
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    args = (["finetune", "--set", f"model.name={tiny_model_dir}", "--set", f"data.dataset={tiny_csv}"]
            if command == "finetune" else ["bench", tiny_model_dir, "--data", f"{tiny_csv}:test"])
    for out in (link, f"{link}/"):
        line = one_error_line(invoke(*args, "--out", out, *(["--force"] if force else [])))
        assert "is a symbolic link" in line, line
    assert link.is_symlink() and (real / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in real.iterdir()) == sorted([RUN_MARKER, "keep.txt"])


def test_negative_onnx_offset_is_exit_2(tmp_path, tiny_csv):
    from onnx import TensorProto, helper

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "w.bin").write_bytes(b"\0" * 64)
    t = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[2], data_location=TensorProto.EXTERNAL)
    for k, v in (("location", "w.bin"), ("offset", "-8")):
        e = t.external_data.add()
        e.key, e.value = k, v
    graph = helper.make_graph([helper.make_node("Identity", ["W"], ["y"])], "g", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [t])
    (folder / "model.onnx").write_bytes(helper.make_model(graph).SerializeToString())
    line = one_error_line(invoke("bench", folder / "model.onnx", "--data", f"{tiny_csv}:test", "--out", tmp_path / "o"))
    assert "offset '-8', not a whole number" in line and "refusing to load it" in line


def test_edgeft_error_is_still_exit_2():
    assert EdgeftError("x").exit_code == 2 and SystemProblem("x").exit_code == 2
