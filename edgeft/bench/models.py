"""Which models a bench path stands for.

- a run folder (holds ``.edgeft-run``): ``finetuned/`` (torch; the reference model; without it, the
  source model that ``compress/report.json`` records, as after ``edgeft compress MODEL --out RUN``) and, when
  ``compress/report.json`` exists, the artifacts it lists (``pruned`` HF folder; ``onnx_fp32``,
  ``onnx_optimized``, ``onnx_int8`` ONNX models), paths relative to ``RUN_DIR/compress``;
- a Hugging Face folder (config.json + safetensors) -> torch;
- a ``.onnx`` file, or a folder holding ``model.onnx`` -> ONNX Runtime; the folder holds the tokenizer and
  ``edgeft.json`` (max_length, label_names).
Anything else is a one-line error naming the path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edgeft.errors import ModelError
from edgeft.layout import COMPRESS, FINETUNED, RunLayout, read_side_file
from edgeft.layout import COMPRESS_REPORT as _REPORT
from edgeft.safeio import TOKENIZER_FILES, check_hf_folder

RUN_ARTIFACTS = ("pruned", "onnx_fp32", "onnx_optimized", "onnx_int8")  # bench order after finetuned/
COMPRESS_REPORT = f"{COMPRESS}/{_REPORT}"  # relative to a run folder (RunLayout.compress_report)


@dataclass
class ModelSpec:
    name: str  # stable across runs: the gate matches results by it
    format: str  # "hf" | "onnx"
    path: Path  # HF folder or .onnx file
    tokenizer_dir: Path
    precision: str = "fp32"
    max_length: int | None = None
    label_names: list[str] | None = None
    origin: str = ""  # the path given on the command line
    files: list[Path] = field(default_factory=list)

    @property
    def size_mb(self) -> float:
        return sum(f.stat().st_size for f in self.files if f.is_file()) / 1e6


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / f).is_file() for f in TOKENIZER_FILES)


_edgeft_json = read_side_file  # edgeft.json is read in edgeft.layout only


def hf_spec(folder: Path, name: str, origin: str) -> ModelSpec:
    check_hf_folder(folder)
    meta = _edgeft_json(folder)
    return ModelSpec(name=name, format="hf", path=folder, tokenizer_dir=folder, precision="fp32",
                     max_length=meta.get("max_length"), label_names=meta.get("label_names"), origin=origin,
                     files=sorted(folder.glob("*.safetensors")))


def onnx_spec(path: Path, name: str, origin: str, tokenizer_fallback: Path | None = None,
              precision: str | None = None) -> ModelSpec:
    from edgeft.bench.runtimes import onnx_files, onnx_precision
    from edgeft.safeio import check_onnx_external_data

    if not path.is_file():
        raise ModelError(f"ONNX model {path} not found", "check the path, or re-run 'edgeft compress'")
    check_onnx_external_data(path)  # also: a corrupt file -> one line naming it
    folder = path.parent
    tok_dir = folder
    if not _has_tokenizer(folder):
        if tokenizer_fallback is None or not _has_tokenizer(tokenizer_fallback):
            raise ModelError(f"{folder} has no tokenizer next to {path.name} (tokenizer.json or vocab.txt)",
                             "save the tokenizer (and config.json, edgeft.json) beside the ONNX model")
        tok_dir = tokenizer_fallback
    meta = _edgeft_json(folder) or (_edgeft_json(tokenizer_fallback) if tokenizer_fallback else {})
    return ModelSpec(name=name, format="onnx", path=path, tokenizer_dir=tok_dir,
                     precision=precision or onnx_precision(path), max_length=meta.get("max_length"),
                     label_names=meta.get("label_names"), origin=origin, files=onnx_files(path))


def _run_dir_models(run: Path) -> list[ModelSpec]:
    layout = RunLayout(run)
    ref = layout.reference_model()  # finetuned/, else the source model the compress report records
    if ref is None:
        raise layout.missing_reference_error()
    specs = [hf_spec(ref, FINETUNED, str(run))]
    report = layout.read_compress_report()
    if report is None:
        return specs
    artifacts = report.get("artifacts") or {}
    if not isinstance(artifacts, dict):
        raise ModelError(f"{layout.compress_report}: 'artifacts' is not a mapping", "re-run 'edgeft compress'")
    base = layout.compress.resolve()
    for key in RUN_ARTIFACTS:
        rel = artifacts.get(key)
        if not rel:
            continue
        target = (layout.compress / str(rel)).resolve()
        if not target.is_relative_to(base):
            raise ModelError(f"{layout.compress_report}: artifact {key} '{rel}' points outside {layout.compress}",
                             "re-run 'edgeft compress'")
        if key == "pruned":
            specs.append(hf_spec(target, key, str(run)))
            continue
        if target.is_dir():
            target = target / "model.onnx"
        specs.append(onnx_spec(target, key, str(run), tokenizer_fallback=ref,
                               precision="int8" if key == "onnx_int8" else None))
    return specs


def discover(paths: list[Path]) -> list[ModelSpec]:
    """Expand each path into the models it stands for; names are made unique."""
    specs: list[ModelSpec] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise ModelError(f"{path} not found", "pass a run folder, a Hugging Face folder or an .onnx model")
        if path.is_dir() and RunLayout(path).is_run():
            specs.extend(_run_dir_models(path))
        elif path.is_file() and path.suffix == ".onnx":
            name = path.parent.name if path.stem == "model" else path.stem
            specs.append(onnx_spec(path, name, str(path)))
        elif path.is_dir() and (path / "model.onnx").is_file():
            specs.append(onnx_spec(path / "model.onnx", path.name, str(path)))
        elif path.is_dir() and (path / "config.json").is_file():
            specs.append(hf_spec(path, path.name, str(path)))  # check_hf_folder names what is missing
        else:
            raise ModelError(f"{path} is not a model",
                             "pass a run folder, a Hugging Face folder (config.json + safetensors), "
                             "an .onnx file or a folder holding model.onnx")
    return unique_names(specs)


def unique_names(specs: list[ModelSpec]) -> list[ModelSpec]:
    """Prefix colliding names with the folder they came from; number what still collides."""
    counts: dict[str, int] = {}
    for s in specs:
        counts[s.name] = counts.get(s.name, 0) + 1
    for s in specs:
        if counts[s.name] > 1:
            s.name = f"{Path(s.origin).name}/{s.name}"
    seen: dict[str, int] = {}
    for s in specs:
        if s.name in seen:
            seen[s.name] += 1
            s.name = f"{s.name}#{seen[s.name]}"
        else:
            seen[s.name] = 1
    return specs
