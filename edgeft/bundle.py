"""The ship bundle: its layout, its checksums, and opening one safely.

This module owns the bundle layout. ``edgeft ship`` writes bundles, ``edgeft
verify`` checks them and ``edgeft serve`` (and the scale-out engines) open them
through :func:`open_bundle`, which refuses a bundle whose files do not match
``SHA256SUMS`` before any model file is parsed.

Layout (paths relative to the bundle root)::

    manifest.json          schema edgeft.bundle/1: name, version, task, labels, io, tokenizer,
                           accuracy, bench, serving defaults, files {path: {sha256, bytes}}
    SHA256SUMS             "<sha256>  <path>" per file; `sha256sum -c SHA256SUMS` accepts it
    MODEL_CARD.md
    model/                 model.onnx (+ external data), tokenizer files, config.json, labels.txt
    golden/golden.jsonl    {"text", "label", "logits"} per line, for the smoke test
    serving/               alerts.yml, alerts_test.yml, prometheus.yml, edgeft-serve.service
    ray/serve_config.yaml  Ray Serve config for `serve run` (edgeft.scale.ray_serve)
    triton/                Triton model repository (`ship --triton`, edgeft.scale.triton)
    kubernetes/            Dockerfile, Deployment, Service, HPA, Secret, KServe InferenceService
                           (`ship --kubernetes`, edgeft.scale.kubernetes)

A text-generation bundle (``task: text-generation``, a decoder LM: edgeft.decoder.ship) keeps the
same root files and checksums, with::

    model/                 model.onnx (+ its external data files), config.json, generation_config.json,
                           tokenizer files, chat template (chat_template.jinja or in tokenizer_config.json)
    golden/generation.jsonl  {"name", "kind", "prompt" or "messages", "prompt_ids", "tokens", "text"} per
                           line: fixed prompts and the shipped model's greedy tokens (edgeft.decoder.golden)
    serving/               prometheus.yml, edgeft-serve.service
    manifest.json          + model (context, eos ids, KV layout), perplexity, generation golden tolerance
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeft.errors import EdgeftError

BUNDLE_SCHEMA = "edgeft.bundle/1"
BUNDLE_SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SUMS = "SHA256SUMS"
MODEL_DIR = "model"
MODEL_ONNX = "model/model.onnx"
LABELS = "model/labels.txt"
GOLDEN = "golden/golden.jsonl"
SERVING_DIR = "serving"
RAY_CONFIG = "ray/serve_config.yaml"
TRITON_DIR = "triton"
KUBERNETES_DIR = "kubernetes"
MODEL_CARD = "MODEL_CARD.md"
MODEL_CONFIG = "model/config.json"
TASK_CLASSIFICATION = "text-classification"
TASK_GENERATION = "text-generation"
GOLDEN_GENERATION = "golden/generation.jsonl"
# What a text-generation bundle's model/ holds besides model.onnx and its external data (each when the
# run has it; tokenizer.json and config.json always).
DECODER_MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                       "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json",
                       "chat_template.jinja", "chat_template.json", "edgeft-export.json",
                       "genai_config.json")  # onnxruntime-genai's config, when its builder made the graph


class BundleError(EdgeftError):
    """A bundle is missing, tampered with, or of an unknown schema: exit code 2."""


@dataclass(frozen=True)
class Bundle:
    """An opened (and, unless asked otherwise, checksum-verified) bundle."""

    root: Path
    manifest: dict[str, Any]
    digest: str  # sha256 of SHA256SUMS: names the exact set of bytes being served
    labels: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    @property
    def model_dir(self) -> Path:
        return self.root / MODEL_DIR

    @property
    def onnx_path(self) -> Path:
        return self.root / MODEL_ONNX

    @property
    def max_length(self) -> int:
        return int(self.manifest["tokenizer"]["max_length"])

    @property
    def task(self) -> str:
        return str(self.manifest.get("task") or TASK_CLASSIFICATION)

    @property
    def context_length(self) -> int:
        """A text-generation bundle's context (prompt + new tokens), from its manifest."""
        return int(self.manifest["model"]["context_length"])

    @property
    def serving(self) -> dict[str, Any]:
        return dict(self.manifest.get("serving", {}))


def _sha256(path: Path) -> str:
    from edgeft.artifacts import sha256_file

    return sha256_file(path)


def bundle_files(root: str | Path) -> list[str]:
    """Every regular file under ``root`` except SHA256SUMS, as sorted POSIX relative paths."""
    root = Path(root)
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and not p.is_symlink() and p.relative_to(root).as_posix() != SUMS)


def sums_text(root: str | Path) -> str:
    """The SHA256SUMS text for every file in ``root`` (the manifest included)."""
    root = Path(root)
    return "".join(f"{_sha256(root / rel)}  {rel}\n" for rel in bundle_files(root))


def check_checksums(root: str | Path) -> list[str]:
    """Problems with the bundle's files against SHA256SUMS: changed, missing, extra, links.

    An empty list means every file is exactly as shipped.
    """
    root = Path(root)
    sums = root / SUMS
    if not sums.is_file():
        return [f"{SUMS} is missing"]
    expected: dict[str, str] = {}
    for n, line in enumerate(sums.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        digest, sep, rel = line.partition("  ")
        if not sep or len(digest) != 64 or not rel or rel.startswith("/") or ".." in Path(rel).parts:
            return [f"{SUMS} line {n} is malformed"]
        expected[rel] = digest
    problems = []
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            problems.append(f"link not allowed: {p.relative_to(root).as_posix()}")
    present = set(bundle_files(root))
    for rel in sorted(set(expected) - present):
        problems.append(f"missing: {rel}")
    for rel in sorted(present - set(expected)):
        problems.append(f"extra file: {rel}")
    for rel in sorted(present & set(expected)):
        if _sha256(root / rel) != expected[rel]:
            problems.append(f"changed: {rel}")
    return problems


def read_manifest(root: str | Path) -> dict[str, Any]:
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        raise BundleError(f"bundle folder {root} not found", "pass the folder 'edgeft ship' wrote (unpack a .tar.gz first)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{path} not found: not an edgeft bundle", "pass the folder 'edgeft ship' wrote") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path} is not valid JSON ({type(e).__name__})", "re-ship the bundle") from None
    schema = manifest.get("schema") if isinstance(manifest, dict) else None
    if not isinstance(schema, str) or not schema.startswith("edgeft.bundle/"):
        raise BundleError(f"{path} is not an edgeft bundle manifest (schema {schema!r})", "pass a folder 'edgeft ship' wrote")
    try:
        version = int(schema.rsplit("/", 1)[1])
    except ValueError:
        raise BundleError(f"{path}: unreadable schema {schema!r}", "re-ship the bundle") from None
    if version > BUNDLE_SCHEMA_VERSION:
        raise BundleError(f"bundle schema {schema} is newer than this edgeft reads ({BUNDLE_SCHEMA})",
                          "upgrade edgeft on this machine")
    return manifest


def open_bundle(root: str | Path, *, verify: bool = True) -> Bundle:
    """Open a bundle; with ``verify`` (the default) refuse it unless every checksum matches."""
    root = Path(root)
    manifest = read_manifest(root)
    if verify:
        problems = check_checksums(root)
        if problems:
            more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
            raise BundleError(f"bundle {root} failed its checksums: {'; '.join(problems[:3])}{more}",
                              "re-copy the bundle from its source, or re-ship it; never edit a shipped bundle")
    labels_path = root / LABELS
    labels = labels_path.read_text(encoding="utf-8").splitlines() if labels_path.is_file() else \
        [str(x) for x in manifest.get("labels", [])]
    sums = root / SUMS
    digest = _sha256(sums) if sums.is_file() else ""
    return Bundle(root=root, manifest=manifest, digest=digest, labels=labels)
