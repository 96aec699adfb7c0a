"""Checks that run before any work starts and before a run folder exists.

The recipe schema already checked types, ranges and names; these need the machine or the model: the
model resolves and its config loads (custom code refused unless ``trust_remote_code``), LoRA target
modules exist in the model, and runtimes named in ``bench.runtimes`` are present here.
"""

from __future__ import annotations

from collections.abc import Iterable

from edgeft.recipe import Recipe


def preflight(recipe: Recipe, stages: Iterable[str] | None = None) -> None:
    """Raise an :class:`~edgeft.errors.EdgeftError` (exit 2) for what would fail later in ``stages``
    (default: the recipe's)."""
    from edgeft.modeling import preflight_model

    stages = list(recipe.stages if stages is None else stages)
    if "finetune" in stages:
        preflight_model(recipe.model, recipe.finetune.lora if recipe.finetune.method == "lora" else None)
    else:
        from edgeft.modeling import resolve_model

        resolve_model(recipe.model.name)
    if "bench" in stages and recipe.bench.runtimes != "auto":
        check_runtimes(recipe.bench.runtimes)


def check_runtimes(requested: list[str]) -> None:
    """Every runtime named must be present on this machine (e.g. torch-cuda needs a CUDA GPU)."""
    from edgeft.bench.runtimes import detect_runtimes, select_runtimes
    from edgeft.errors import EdgeftError

    try:
        select_runtimes(requested, detect_runtimes())
    except EdgeftError as e:
        raise type(e)(f"bench.runtimes: {e.problem}", e.fix) from None
