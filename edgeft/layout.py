"""The one owner of the run folder's layout and of the ``edgeft.json`` side file.

A run folder (``edgeft run`` / ``finetune`` / ``compress`` / ``bench`` write one)::

    RUN_DIR/
      .edgeft-run          marker: edgeft made this folder; only such folders are replaced by --force
      .edgeft.lock         flock held by the edgeft process writing into the folder (holds its pid)
      recipe.yaml          the resolved recipe of the run
      manifest.json        versions, hardware, seed, data and recipe hashes, sha256 of every file, status
      metrics.json         fine-tune metrics
      finetuned/           the fine-tuned HF model (+ edgeft.json)
      compress/            report.json, recipe.yaml (the recipe compress used), pruned/, onnx/, optimized/, int8/
      bench.json/.md/.png  the bench report

Every model folder edgeft writes holds ``edgeft.json`` (max_length, label_names, ...): read and write it
with :func:`read_side_file` / :func:`write_side_file` only. Nothing heavy is imported here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RUN_MARKER = ".edgeft-run"
LOCK_NAME = ".edgeft.lock"
SIDE_FILE = "edgeft.json"
MANIFEST = "manifest.json"
MANIFEST_SCHEMA = "edgeft.manifest/1"
RECIPE = "recipe.yaml"
METRICS = "metrics.json"
FINETUNED = "finetuned"
COMPRESS = "compress"
COMPRESS_REPORT = "report.json"
BENCH_STEM = "bench"
BUNDLE = "bundle"


@dataclass(frozen=True)
class RunLayout:
    """Paths of one run folder. ``RunLayout(run_dir).compress_report`` and so on; nothing is created."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def marker(self) -> Path:
        return self.root / RUN_MARKER

    @property
    def lock(self) -> Path:
        return self.root / LOCK_NAME

    @property
    def recipe(self) -> Path:
        return self.root / RECIPE

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST

    @property
    def metrics(self) -> Path:
        return self.root / METRICS

    @property
    def finetuned(self) -> Path:
        return self.root / FINETUNED

    @property
    def compress(self) -> Path:
        return self.root / COMPRESS

    @property
    def compress_report(self) -> Path:
        return self.compress / COMPRESS_REPORT

    @property
    def compress_recipe(self) -> Path:
        return self.compress / RECIPE

    def bench_file(self, suffix: str = "json", stem: str = BENCH_STEM) -> Path:
        return self.root / f"{stem}.{suffix}"

    @property
    def bench_json(self) -> Path:
        return self.bench_file("json")

    @property
    def bench_md(self) -> Path:
        return self.bench_file("md")

    @property
    def bench_png(self) -> Path:
        return self.bench_file("png")

    @property
    def bundle(self) -> Path:
        return self.root / BUNDLE

    def is_run(self) -> bool:
        """A folder edgeft made as a run folder (holds the marker)."""
        return self.marker.is_file()

    def has_edgeft_manifest(self) -> bool:
        try:
            data = json.loads(self.manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(data, dict) and str(data.get("schema", "")).startswith("edgeft.manifest/")

    def is_edgeft_folder(self) -> bool:
        """edgeft made this folder (a run folder, or a bench folder with edgeft's manifest)."""
        return self.is_run() or self.has_edgeft_manifest()

    def stages_done(self) -> list[str]:
        """The stages whose outputs are in the folder, in pipeline order."""
        done = {"finetune": self.metrics.is_file(), "compress": self.compress_report.is_file(),
                "bench": self.bench_json.is_file()}
        return [s for s, ok in done.items() if ok]

    def read_compress_report(self) -> dict[str, Any] | None:
        """The compress report, or None when there is none; a one-line ModelError when it is unreadable."""
        from edgeft.errors import ModelError

        path = self.compress_report
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ModelError(f"{path} is not a valid compress report ({type(e).__name__})",
                             "re-run 'edgeft compress'") from None
        if not isinstance(data, dict):
            raise ModelError(f"{path} is not a valid compress report (not a mapping)", "re-run 'edgeft compress'")
        return data

    def reference_model(self) -> Path | None:
        """The fp32 model this run's compressed models came from: ``finetuned/``, else the source model
        the compress report records (``edgeft compress MODEL --out RUN`` copies no model into RUN)."""
        if self.finetuned.is_dir():
            return self.finetuned
        report = self.read_compress_report()
        if not report or not report.get("model_dir"):
            return None
        src = Path(str(report["model_dir"]))
        return src if src.is_dir() else None

    def missing_reference_error(self):
        from edgeft.errors import ModelError

        report = self.read_compress_report()
        if report and report.get("model_dir"):
            return ModelError(f"run folder {self.root} has no {FINETUNED}/ model and the source model its compress "
                              f"report names ({report['model_dir']}) is gone",
                              "restore that folder, or re-run 'edgeft compress' from an existing model")
        return ModelError(f"run folder {self.root} has no {FINETUNED}/ model and no compress report",
                          "run 'edgeft finetune' or 'edgeft compress MODEL --out' into it first")


def read_side_file(folder: str | Path) -> dict[str, Any]:
    """``folder/edgeft.json`` as a dict ({} when absent); a one-line ModelError when it is not valid JSON."""
    from edgeft.errors import ModelError

    path = Path(folder) / SIDE_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelError(f"{path} is not valid JSON ({type(e).__name__})", "re-create the model folder") from None
    return data if isinstance(data, dict) else {}


def write_side_file(folder: str | Path, *, max_length: int, label_names: list[str], **extra: Any) -> Path:
    """Write ``folder/edgeft.json`` (atomically): what a model folder needs to be tokenized and read alone."""
    from edgeft.artifacts import write_json_atomic

    return write_json_atomic(Path(folder) / SIDE_FILE,
                             {"max_length": int(max_length), "label_names": list(label_names), **extra})
