import json

import pytest

from edgeft.artifacts import RUN_MARKER, atomic_dir, prepare_run_dir, write_bytes_atomic, write_manifest
from edgeft.errors import RunDirError


class Boom(Exception):
    pass


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path, monkeypatch):
    target = tmp_path / "a.json"
    write_bytes_atomic(target, b"old")

    def fail_replace(src, dst):
        raise Boom()

    monkeypatch.setattr("edgeft.artifacts.os.replace", fail_replace)
    with pytest.raises(Boom):
        write_bytes_atomic(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temp file left


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(Boom):
        with atomic_dir(tmp_path / "out") as d:
            (d / "model.onnx").write_bytes(b"half")
            raise Boom()
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(tmp_path / "out") as d:
        (d / "model.onnx").write_bytes(b"whole")
    assert (tmp_path / "out" / "model.onnx").read_bytes() == b"whole"


def test_run_dir_refuses_existing_and_never_deletes_foreign_folders(tmp_path):
    run = prepare_run_dir(tmp_path / "run")
    assert (run / RUN_MARKER).exists()
    (run / "keep.txt").write_text("x")
    with pytest.raises(RunDirError, match="already exists"):
        prepare_run_dir(run)
    prepare_run_dir(run, force=True)
    assert not (run / "keep.txt").exists()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(RunDirError, match="not an edgeft run folder"):
        prepare_run_dir(foreign, force=True)
    assert (foreign / "thesis.tex").read_text() == "precious"


def test_manifest_has_checksums_and_environment(tmp_path):
    run = prepare_run_dir(tmp_path / "run")
    (run / "metrics.json").write_text("{}")
    write_manifest(run, recipe_sha256="abc", seed=7, data={"name": "d"}, stages=["finetune"])
    m = json.loads((run / "manifest.json").read_text())
    assert m["seed"] == 7 and m["recipe_sha256"] == "abc" and m["stages"] == ["finetune"]
    assert len(m["files"]["metrics.json"]["sha256"]) == 64
    assert "torch" in m["environment"]["versions"] and "flags" in m["environment"]["cpu"]


def test_manifest_skips_lock_and_work_files_by_relative_path(tmp_path):
    # a run folder whose own path contains ".partial" still has its files hashed
    run = prepare_run_dir(tmp_path / "a.partial.parent" / "run")
    (run / "metrics.json").write_text("{}")
    (run / ".edgeft.lock").write_text("123\n")
    (run / ".compress.x.partial").mkdir()
    (run / ".compress.x.partial" / "model.onnx").write_bytes(b"half")
    write_manifest(run)
    files = json.loads((run / "manifest.json").read_text())["files"]
    assert set(files) == {"metrics.json", RUN_MARKER}


def test_force_empties_an_edgeft_folder_but_keeps_its_lock_file(tmp_path):
    run = prepare_run_dir(tmp_path / "run")
    lock = run / ".edgeft.lock"
    inode = lock.stat().st_ino
    (run / "finetuned").mkdir()
    prepare_run_dir(run, force=True)
    assert not (run / "finetuned").exists() and lock.stat().st_ino == inode  # the same lock, not a new one


def test_atomic_dir_replaces_an_existing_folder_only_when_whole(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with pytest.raises(Boom):
        with atomic_dir(tmp_path / "out") as d:
            (d / "new.txt").write_text("new")
            assert (tmp_path / "out" / "old.txt").exists()
            raise Boom()
    assert (tmp_path / "out" / "old.txt").read_text() == "old"
    with atomic_dir(tmp_path / "out") as d:
        (d / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["new.txt"]
