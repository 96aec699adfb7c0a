"""Stages in order, each in its own sub-folder of one run folder.

``run(recipe, run_dir)`` runs the stages the recipe names; the per-stage
functions below are what the CLI calls for a single stage. Heavy libraries are
imported inside the functions so ``edgeft --help`` stays fast.
"""

from __future__ import annotations

import time
from pathlib import Path

from edgeft.artifacts import is_run_dir, prepare_run_dir, sha256_text, write_manifest, write_text_atomic
from edgeft.errors import ModelError, RunDirError
from edgeft.recipe import Recipe

COMPRESS_DIR = "compress"


def default_run_dir(recipe: Recipe) -> Path:
    return Path("runs") / f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _check_model(recipe: Recipe) -> None:
    from edgeft.modeling import resolve_model

    resolve_model(recipe.model.name)


def _save_recipe(recipe: Recipe, run_dir: Path) -> str:
    text = recipe.to_yaml()
    write_text_atomic(run_dir / "recipe.yaml", text)
    return sha256_text(text)


def _manifest(run_dir: Path, recipe: Recipe, recipe_sha: str, dataset, stages: list[str]) -> None:
    write_manifest(run_dir, recipe_sha256=recipe_sha, seed=recipe.seed,
                   data=dataset.summary() if dataset is not None else {}, stages=stages)


def run(recipe: Recipe, run_dir: str | Path, *, force: bool = False, show_progress: bool = True) -> Path:
    """Run every stage the recipe names, in order, into a fresh run folder."""
    from edgeft.data import load_dataset

    # Bad data or a bad model fails before the run folder is made.
    dataset = load_dataset(recipe.data, seed=recipe.seed)
    _check_model(recipe)
    run_dir = prepare_run_dir(run_dir, force=force)
    recipe_sha = _save_recipe(recipe, run_dir)
    done: list[str] = []
    model_dir: Path | None = Path(recipe.model.name) if "finetune" not in recipe.stages else None
    try:
        if "finetune" in recipe.stages:
            from edgeft.finetune import FINETUNED, finetune

            finetune(recipe, dataset, run_dir, show_progress=show_progress)
            model_dir = run_dir / FINETUNED
            done.append("finetune")
        if "compress" in recipe.stages:
            from edgeft.compress import compress
            from edgeft.modeling import resolve_model

            compress(Path(resolve_model(str(model_dir))), recipe, dataset, run_dir / COMPRESS_DIR,
                     show_progress=show_progress)
            done.append("compress")
        if "bench" in recipe.stages:
            from edgeft.bench import bench_paths

            bench_paths([run_dir], recipe.bench, dataset, run_dir, show_progress=show_progress)
            done.append("bench")
    finally:
        # The manifest records what did complete, also when a stage fails or misses its goal.
        _manifest(run_dir, recipe, recipe_sha, dataset, done)
    return run_dir


def finetune_stage(recipe: Recipe, run_dir: str | Path, *, force: bool = False, show_progress: bool = True) -> Path:
    from edgeft.data import load_dataset
    from edgeft.finetune import finetune

    dataset = load_dataset(recipe.data, seed=recipe.seed)
    _check_model(recipe)
    run_dir = prepare_run_dir(run_dir, force=force)
    recipe_sha = _save_recipe(recipe, run_dir)
    try:
        finetune(recipe, dataset, run_dir, show_progress=show_progress)
    finally:
        _manifest(run_dir, recipe, recipe_sha, dataset, ["finetune"] if (run_dir / "metrics.json").exists() else [])
    return run_dir


def resolve_input_model(path: str | Path) -> tuple[Path, Path | None]:
    """A fine-tuned model folder, or a run folder holding ``finetuned/`` -> (model folder, run folder)."""
    from edgeft.finetune import FINETUNED
    from edgeft.safeio import check_hf_folder

    path = Path(path)
    if is_run_dir(path):
        if not (path / FINETUNED).is_dir():
            raise ModelError(f"run folder {path} has no {FINETUNED}/ model", "run 'edgeft finetune' first")
        return check_hf_folder(path / FINETUNED), path
    return check_hf_folder(path), None


def compress_stage(model: str | Path, recipe: Recipe, out: str | Path | None, *, force: bool = False,
                   show_progress: bool = True) -> Path:
    """Compress a fine-tuned folder (or the one in a run folder) into ``OUT/compress``."""
    import shutil

    from edgeft.compress import compress
    from edgeft.data import load_dataset

    model_dir, source_run = resolve_input_model(model)
    dataset = load_dataset(recipe.data, seed=recipe.seed)
    if out is None and source_run is not None:
        run_dir = source_run
        target = run_dir / COMPRESS_DIR
        if target.exists():
            if not force:
                raise RunDirError(f"{target} already exists", "pass --force to replace it, or --out NEW_RUN_DIR")
            shutil.rmtree(target)
    else:
        run_dir = prepare_run_dir(out or default_run_dir(recipe), force=force)
    recipe_sha = _save_recipe(recipe, run_dir) if source_run is None or out is not None else None
    try:
        compress(model_dir, recipe, dataset, run_dir / COMPRESS_DIR, show_progress=show_progress)
    finally:
        _manifest(run_dir, recipe, recipe_sha or sha256_text(recipe.to_yaml()), dataset,
                  [s for s in ("finetune", "compress") if (run_dir / {"finetune": "metrics.json",
                   "compress": f"{COMPRESS_DIR}/report.json"}[s]).exists()])
    return run_dir
