"""Stages in order, each in its own sub-folder of one run folder.

``run(recipe, run_dir)`` runs the stages the recipe names; the per-stage
functions below are what the CLI calls for a single stage. Every writing stage
holds the run folder's lock (``open_run_dir``) for its whole duration, and the
manifest records how it ended (complete, goal_missed, failed, interrupted). Heavy libraries are
imported inside the functions so ``edgeft --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from edgeft.artifacts import (is_run_dir, open_run_dir, partial_dir, read_manifest, replace_dir, sha256_file,
                              update_manifest, write_manifest, write_text_atomic)
from edgeft.errors import EdgeftError, ModelError, RunDirError
from edgeft.layout import COMPRESS, RunLayout
from edgeft.recipe import Recipe

COMPRESS_DIR = COMPRESS  # names live in edgeft.layout


def default_run_dir(recipe: Recipe) -> Path:
    return Path("runs") / f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _check_model(recipe: Recipe, stages: list[str] | None = None) -> None:
    """Everything that can be checked before work starts and before the run folder exists."""
    from edgeft.preflight import preflight

    preflight(recipe, stages)


def _save_recipe(recipe: Recipe, path: Path) -> str:
    """Save the resolved recipe at ``path``; return the sha256 of what was saved."""
    write_text_atomic(path, recipe.to_yaml())
    return sha256_file(path)


def _recipe_hashes(layout: RunLayout) -> dict:
    """sha256 of the recipes saved in the run folder (the run's, and the one compress used)."""
    return {"recipe_sha256": sha256_file(layout.recipe) if layout.recipe.is_file() else None,
            "compress_recipe_sha256": sha256_file(layout.compress_recipe) if layout.compress_recipe.is_file() else None}


def _manifest(layout: RunLayout, recipe: Recipe, dataset, stages: list[str], fields: dict) -> None:
    hashes = _recipe_hashes(layout)
    write_manifest(layout.root, recipe_sha256=hashes.pop("recipe_sha256"), seed=recipe.seed,
                   data=dataset.summary() if dataset is not None else {}, stages=stages, extra={**hashes, **fields})


@contextlib.contextmanager
def _recorded(write, *, on_failure: bool = True):
    """Call ``write(fields)`` once the block ends, with how it ended: ``status`` complete, goal_missed,
    failed (``on_failure``) or interrupted (Ctrl-C or SIGTERM: the stage, the signal, the time).
    Set ``state["stage"]`` in the block to the stage running."""
    from edgeft.errors import GoalMissed
    from edgeft.signals import signal_name

    state: dict = {"stage": None}
    now = lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())  # noqa: E731
    try:
        yield state
    except KeyboardInterrupt as e:
        write({"status": "interrupted",
               "interrupted": {"stage": state["stage"], "signal": signal_name(e), "at": now(), "unix": time.time()}})
        raise
    except GoalMissed:
        write({"status": "goal_missed", "stage": state["stage"]})
        raise
    except BaseException as e:
        if on_failure:
            write({"status": "failed", "failed": {"stage": state["stage"], "error": type(e).__name__, "at": now()}})
        raise
    else:
        write({"status": "complete", "stage": state["stage"], "finished_at": now()})


def _compress_into(model_dir: Path, recipe: Recipe, dataset, layout: RunLayout, *, show_progress: bool) -> None:
    """Compress into a hidden partial sibling; swap it in as ``compress/`` only when complete (an old
    ``compress/`` stays until then). The resolved recipe compress used is saved as compress/recipe.yaml."""
    from edgeft.compress import compress

    with partial_dir(layout.root, COMPRESS) as stage:
        built = RunLayout(stage).compress
        try:
            compress(model_dir, recipe, dataset, built, show_progress=show_progress)
        finally:
            if RunLayout(stage).compress_report.is_file():  # complete (a missed goal is raised after the report)
                _save_recipe(recipe, RunLayout(stage).compress_recipe)
                replace_dir(built, layout.compress)


def _source_model(recipe: Recipe) -> Path:
    from edgeft.modeling import resolve_model

    path = Path(resolve_model(recipe.model.name))
    return path.resolve() if path.exists() else path


def run(recipe: Recipe, run_dir: str | Path, *, force: bool = False, show_progress: bool = True) -> Path:
    """Run every stage the recipe names, in order, into a fresh run folder (locked while it runs)."""
    from edgeft.data import load_dataset

    # Bad data or a bad model fails before the run folder is made.
    dataset = load_dataset(recipe.data, seed=recipe.seed)
    _check_model(recipe)
    with open_run_dir(run_dir, force=force) as run_dir:
        layout = RunLayout(run_dir)
        _save_recipe(recipe, layout.recipe)
        done: list[str] = []
        # The manifest records what did complete, also when a stage fails, misses its goal or is interrupted.
        with _recorded(lambda fields: _manifest(layout, recipe, dataset, done, fields)) as state:
            model_dir = None if "finetune" in recipe.stages else _source_model(recipe)
            if "finetune" in recipe.stages:
                from edgeft.finetune import finetune

                state["stage"] = "finetune"
                finetune(recipe, dataset, run_dir, show_progress=show_progress)
                model_dir = layout.finetuned.resolve()
                done.append("finetune")
            if "compress" in recipe.stages:
                state["stage"] = "compress"
                _compress_into(model_dir, recipe, dataset, layout, show_progress=show_progress)
                done.append("compress")
            if "bench" in recipe.stages:
                from edgeft.bench import bench_paths

                state["stage"] = "bench"
                bench_paths([run_dir], recipe.bench, dataset, run_dir, show_progress=show_progress)
                done.append("bench")
    return run_dir


def finetune_stage(recipe: Recipe, run_dir: str | Path, *, force: bool = False, show_progress: bool = True) -> Path:
    from edgeft.data import load_dataset
    from edgeft.finetune import finetune

    dataset = load_dataset(recipe.data, seed=recipe.seed)
    _check_model(recipe, ["finetune"])
    with open_run_dir(run_dir, force=force) as run_dir:
        layout = RunLayout(run_dir)
        _save_recipe(recipe, layout.recipe)
        with _recorded(lambda fields: _manifest(layout, recipe, dataset, layout.stages_done(), fields)) as state:
            state["stage"] = "finetune"
            finetune(recipe, dataset, run_dir, show_progress=show_progress)
    return run_dir


def resolve_input_model(path: str | Path) -> tuple[Path, Path | None]:
    """A fine-tuned model folder, or a run folder -> (model folder, run folder). A run folder's model is
    its ``finetuned/``, else the source model its compress report records."""
    from edgeft.safeio import check_hf_folder

    path = Path(path)
    if path.is_file():
        what = "an ONNX file" if path.suffix == ".onnx" else "a file"
        raise ModelError(f"{path} is {what}; compress takes a fine-tuned Hugging Face folder or a run folder",
                         "pass the fine-tuned folder (or the run folder) the model came from; "
                         "'edgeft bench' and 'edgeft gate' take .onnx files")
    if is_run_dir(path):
        layout = RunLayout(path)
        ref = layout.reference_model()
        if ref is None:
            raise layout.missing_reference_error()
        return check_hf_folder(ref), path
    return check_hf_folder(path), None


def compress_stage(model: str | Path, recipe: Recipe, out: str | Path | None, *, force: bool = False,
                   show_progress: bool = True) -> Path:
    """Compress a fine-tuned folder (or the one in a run folder) into ``OUT/compress``; without ``out``
    a run folder is compressed in place (``--force`` replaces its compress/ only once the new one is whole)."""
    from edgeft.data import load_dataset

    model_dir, source_run = resolve_input_model(model)
    model_dir = Path(model_dir).resolve()  # the report records it: bench takes the reference model from there
    dataset = load_dataset(recipe.data, seed=recipe.seed)
    in_place = out is None and source_run is not None
    run_dir = source_run if in_place else Path(out or default_run_dir(recipe))
    with open_run_dir(run_dir, force=force, mode="update" if in_place else "fresh") as run_dir:
        layout = RunLayout(run_dir)
        if in_place and layout.compress.exists() and not force:
            raise RunDirError(f"{layout.compress} already exists",
                              "pass --force to replace it (the old one stays until the new one is complete), "
                              "or --out NEW_RUN_DIR")
        if in_place:
            def write(fields: dict) -> None:
                update_manifest(run_dir, stages=layout.stages_done(), **_recipe_hashes(layout), **fields)
        else:
            _save_recipe(recipe, layout.recipe)

            def write(fields: dict) -> None:
                _manifest(layout, recipe, dataset, layout.stages_done(), fields)
        with _recorded(write) as state:
            state["stage"] = "compress"
            _compress_into(model_dir, recipe, dataset, layout, show_progress=show_progress)
    return run_dir


def bench_stage(models: list[str | Path], recipe: Recipe, out: str | Path | None, *, force: bool = False,
                show_progress: bool = True) -> Path:
    """Bench ``models`` into ``out`` (default: the first model when it is a run folder, else
    runs/bench-<timestamp>); return the bench.json path. Only folders edgeft made, or new or empty ones,
    are written into; the folder's manifest is updated (files, hashes, stages) afterwards."""
    from edgeft.bench import bench_models
    from edgeft.bench.models import discover
    from edgeft.data import load_dataset

    dataset = load_dataset(recipe.data, seed=recipe.seed)
    specs = discover([Path(m) for m in models])  # bad paths fail before any folder is made
    first = Path(models[0])
    out = Path(out) if out is not None else (first if is_run_dir(first) else
                                             Path("runs") / f"bench-{time.strftime('%Y%m%d-%H%M%S')}")
    layout = RunLayout(out)
    if layout.bench_json.exists() and not force:
        raise EdgeftError(f"{layout.bench_json} already exists", "pass --force to replace it, or --out NEW_FOLDER")
    with open_run_dir(out, force=force, mode="output"):
        fresh = not read_manifest(out)

        def write(fields: dict) -> None:
            extra = {"seed": recipe.seed, "data": dataset.summary(), "stages": ["bench"]} if fresh else \
                {"stages": layout.stages_done()}
            update_manifest(out, **extra, **fields)
        # A bench that fails leaves the folder's manifest as it was (nothing of it changed).
        with _recorded(write, on_failure=False) as state:
            state["stage"] = "bench"
            bench_models(specs, recipe.bench, dataset, out, show_progress=show_progress)
    return layout.bench_json
