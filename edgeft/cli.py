"""edgeft command line. Each command parses, calls one library function, renders.

Heavy libraries (torch, transformers, onnxruntime) are imported only inside
commands, so ``edgeft --help`` is instant.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from edgeft import __version__
from edgeft.errors import EdgeftError

SET_HELP = "Override a recipe field, e.g. --set finetune.epochs=1 (repeatable)."


def _fail(err: EdgeftError) -> None:
    click.echo(f"error: {err.one_line()}", err=True)
    sys.exit(err.exit_code)


def _guard(fn):
    """Turn edgeft errors into one line + exit code; never a traceback for bad input."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EdgeftError as e:
            _fail(e)
        except KeyboardInterrupt:
            click.echo("interrupted: nothing half-written was left (partial outputs are removed)", err=True)
            sys.exit(130)
        except MemoryError:
            click.echo("error: out of memory (fix: lower the batch size or max_length)", err=True)
            sys.exit(2)
        except Exception as e:  # an edgeft bug, not bad input: keep it to one line unless debugging
            if os.environ.get("EDGEFT_DEBUG"):
                raise
            msg = " ".join(str(e).split())[:300]
            click.echo(f"internal error: {type(e).__name__}: {msg} (set EDGEFT_DEBUG=1 for a traceback, "
                       "and please report it)", err=True)
            sys.exit(3)

    return wrapper


def _recipe(path: str | None, overrides: tuple[str, ...], extra: list[str] | None = None):
    from edgeft.recipe import load_recipe

    return load_recipe(path, list(overrides) + (extra or []))


recipe_arg = click.argument("recipe", required=False, type=click.Path(dir_okay=False))
set_opt = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
out_opt = click.option("--out", type=click.Path(file_okay=False), default=None,
                       help="Run folder to create (default: runs/<recipe name>-<timestamp>).")
force_opt = click.option("--force", is_flag=True, help="Replace an existing edgeft run folder (never other folders).")
quiet_opt = click.option("--quiet", is_flag=True, help="No progress output.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgeft")
def cli() -> None:
    """Fine-tune, compress, benchmark and gate transformer models for on-prem CPU/GPU servers.

    \b
    Typical use:
      edgeft run recipes/minilm-rotten-tomatoes.yaml     all stages the recipe names
      edgeft finetune RECIPE --out runs/a                 one stage at a time
      edgeft compress runs/a
      edgeft bench runs/a
      edgeft gate runs/a/bench.json --baseline bench/baselines/ci.json
    """


@cli.command()
@recipe_arg
@set_opt
@out_opt
@force_opt
@quiet_opt
@_guard
def finetune(recipe, overrides, out, force, quiet):
    """Fine-tune the recipe's model on its dataset (full or LoRA).

    Writes RUN_DIR/finetuned/ (safetensors, tokenizer, config) and RUN_DIR/metrics.json.
    Without RECIPE the built-in defaults are used (MiniLM on Rotten Tomatoes).
    """
    from edgeft.pipeline import default_run_dir, finetune_stage

    r = _recipe(recipe, overrides)
    run_dir = finetune_stage(r, out or default_run_dir(r), force=force, show_progress=not quiet)
    click.echo(str(run_dir))


@cli.command()
@click.argument("model", type=click.Path())
@click.option("--recipe", "recipe", type=click.Path(dir_okay=False), default=None,
              help="Recipe to take the compress/data sections from (default: the run folder's recipe.yaml).")
@set_opt
@click.option("--allow-miss", is_flag=True, help="Exit 0 when the accuracy goal is missed (sets compress.allow_miss).")
@out_opt
@force_opt
@quiet_opt
@_guard
def compress(model, recipe, overrides, allow_miss, out, force, quiet):
    """Prune, export to ONNX, optimise and quantize MODEL (a run folder or a fine-tuned folder).

    Each step is validated against the model before it; the report goes to RUN_DIR/compress/report.json.
    """
    from edgeft.artifacts import is_run_dir
    from edgeft.pipeline import compress_stage

    if recipe is None and is_run_dir(model) and (Path(model) / "recipe.yaml").is_file():
        recipe = str(Path(model) / "recipe.yaml")
    r = _recipe(recipe, overrides, ["compress.allow_miss=true"] if allow_miss else None)
    run_dir = compress_stage(model, r, out, force=force, show_progress=not quiet)
    click.echo(str(run_dir))


def _csv_ints(text: str | None, name: str) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise EdgeftError(f"--{name} '{text}' is not a comma-separated list of integers", f"write it like --{name} 1,8") from None
    return values


@cli.command()
@click.argument("models", nargs=-1, required=True, type=click.Path())
@click.option("--recipe", type=click.Path(dir_okay=False), default=None, help="Recipe for the bench/data sections.")
@set_opt
@click.option("--runtimes", default=None, help="auto, or a comma list of torch-cpu,ort-cpu,torch-cuda,ort-cuda,ort-trt (bench.runtimes).")
@click.option("--batch", default=None, help="Batch sizes, e.g. 1,8 (bench.batch_sizes).")
@click.option("--seq", default=None, help="Sequence lengths, e.g. 32,128 (bench.seq_lengths).")
@click.option("--threads", type=int, default=None, help="Intra-op threads for every runtime (bench.threads).")
@click.option("--data", "data", default=None, help="DATASET:SPLIT to measure accuracy on (data.dataset, bench.eval_split).")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Folder for bench.json/md/png (default: the first run folder, else runs/bench-<timestamp>).")
@force_opt
@quiet_opt
@_guard
def bench(models, recipe, overrides, runtimes, batch, seq, threads, data, out, force, quiet):
    """Latency, throughput, accuracy, memory and size of MODELS on every runtime present.

    MODELS are run folders, Hugging Face folders or .onnx files. Writes bench.json, bench.md and bench.png.
    """
    import time

    from edgeft.artifacts import is_run_dir
    from edgeft.bench import bench_paths

    extra = []
    if runtimes:
        extra.append(f"bench.runtimes={runtimes if runtimes == 'auto' else '[' + runtimes + ']'}")
    if batch:
        extra.append(f"bench.batch_sizes={_csv_ints(batch, 'batch')}")
    if seq:
        extra.append(f"bench.seq_lengths={_csv_ints(seq, 'seq')}")
    if threads:
        extra.append(f"bench.threads={threads}")
    if data:
        name, _, split = data.rpartition(":") if ":" in data else (data, "", "")
        extra.append(f"data.dataset={name}")
        if split:
            extra.append(f"bench.eval_split={split}")
    if recipe is None and is_run_dir(models[0]) and (Path(models[0]) / "recipe.yaml").is_file():
        recipe = str(Path(models[0]) / "recipe.yaml")
    r = _recipe(recipe, overrides, extra)
    from edgeft.data import load_dataset

    dataset = load_dataset(r.data, seed=r.seed)
    if out is None:
        out = models[0] if is_run_dir(models[0]) else f"runs/bench-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(out)
    if (out / "bench.json").exists() and not force:
        raise EdgeftError(f"{out / 'bench.json'} already exists", "pass --force to replace it, or --out NEW_FOLDER")
    report = bench_paths([Path(m) for m in models], r.bench, dataset, out, show_progress=not quiet)
    click.echo(str(out / "bench.json") if isinstance(report, dict) else str(out))


@cli.command()
@click.argument("current", type=click.Path())
@click.option("--baseline", required=True, type=click.Path(), help="Stored bench.json to compare against.")
@click.option("--max-latency-regression", default="10%", show_default=True,
              help="Allowed latency increase, e.g. 10% or 0.1.")
@click.option("--max-accuracy-drop", default=0.5, show_default=True, type=float, help="Allowed accuracy drop, in points.")
@click.option("--normalize/--no-normalize", default=False,
              help="Compare latencies as ratios to the in-run reference model (baseline from another machine).")
@click.option("--json-out", type=click.Path(dir_okay=False), default=None, help="Also write the verdict as JSON.")
@_guard
def gate(current, baseline, max_latency_regression, max_accuracy_drop, normalize, json_out):
    """Compare CURRENT bench.json against a baseline: exit 0 pass, 1 regression, 2 bad input."""
    from edgeft.gate import gate as run_gate
    from edgeft.gate import parse_fraction

    result = run_gate(Path(current), Path(baseline), max_latency_regression=parse_fraction(max_latency_regression),
                      max_accuracy_drop=max_accuracy_drop, normalize=normalize)
    click.echo(result.render())
    if json_out:
        from edgeft.artifacts import write_json_atomic

        write_json_atomic(json_out, result.to_dict())
    sys.exit(result.exit_code)


@cli.command("run")
@recipe_arg
@set_opt
@out_opt
@force_opt
@quiet_opt
@_guard
def run_cmd(recipe, overrides, out, force, quiet):
    """Run every stage the recipe names (finetune, compress, bench), in order, into one run folder."""
    from edgeft.pipeline import default_run_dir, run

    r = _recipe(recipe, overrides)
    run_dir = run(r, out or default_run_dir(r), force=force, show_progress=not quiet)
    click.echo(str(run_dir))
    if not quiet:  # stderr: stdout stays the run folder alone (the Makefile reads it)
        click.echo(f"next: edgeft ship {run_dir}   (a verified bundle to serve)", err=True)


@cli.command("recipe")
@recipe_arg
@set_opt
@click.option("--reference", is_flag=True, help="Print the table of every recipe field instead.")
@_guard
def recipe_cmd(recipe, overrides, reference):
    """Validate RECIPE (with overrides) and print it resolved, defaults filled in."""
    from edgeft.recipe import recipe_reference

    if reference:
        click.echo(recipe_reference())
        return
    click.echo(_recipe(recipe, overrides).to_yaml(), nl=False)


@cli.command("serve")
@click.argument("bundle", type=click.Path())
@click.option("--host", default=None, help="Address to bind (host; default 127.0.0.1).")
@click.option("--port", type=int, default=None, help="TCP port (port; default 8000).")
@click.option("--keys", type=click.Path(dir_okay=False), default=None,
              help="API key file from `edgeft keys add` (keys); without it there is no access control.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="YAML file of ServeConfig fields (between the bundle's defaults and --set).")
@set_opt
@click.option("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (threads; default: usable cores).")
@click.option("--max-batch-size", type=int, default=None, help="Texts per batch (max_batch_size; 1 = no batching).")
@click.option("--insecure-no-auth-public", is_flag=True, default=None,
              help="Allow a non-loopback --host without --keys (insecure_no_auth_public).")
@click.option("--print-config", is_flag=True, help="Print the resolved ServeConfig as YAML and exit.")
@_guard
def serve_cmd(bundle, host, port, keys, config_file, overrides, threads, max_batch_size, insecure_no_auth_public,
              print_config):
    """Serve BUNDLE (from `edgeft ship`) over HTTP: KServe V2 / Triton API, TEI-style /predict, /metrics.

    Settings: the bundle's serving defaults, then --config, then --set KEY=VALUE, then flags.
    SIGTERM drains and exits 0; SIGHUP reloads the key file.
    """
    from edgeft.bundle import read_manifest
    from edgeft.serve.config import resolve_config

    manifest = read_manifest(bundle)
    cfg = resolve_config(manifest.get("serving") if isinstance(manifest.get("serving"), dict) else None,
                         config_file, overrides,
                         {"host": host, "port": port, "keys": keys, "threads": threads, "max_batch_size": max_batch_size,
                          "insecure_no_auth_public": insecure_no_auth_public})
    if print_config:
        click.echo(cfg.to_yaml(), nl=False)
        return
    from edgeft.serve.server import serve

    sys.exit(serve(bundle, cfg))


@cli.group("keys")
def keys_cmd() -> None:
    """Manage API keys for `edgeft serve` (only SHA-256 digests are stored)."""


@keys_cmd.command("add")
@click.argument("keyfile", type=click.Path(dir_okay=False))
@click.option("--id", "key_id", default=None, help="Key id shown in logs (default key<N>).")
@_guard
def keys_add(keyfile, key_id):
    """Create a key, store its digest in KEYFILE (mode 0600) and print the key ONCE."""
    from edgeft.serve.auth import add_key

    kid, key = add_key(keyfile, key_id)
    click.echo(key)
    click.echo(f"key id {kid} added to {keyfile}; the key above is not stored anywhere, keep it now "
               "(running servers pick it up on SIGHUP)", err=True)


@cli.command("ship")
@click.argument("run_dir", type=click.Path())
@click.option("--variant", default=None, help="Variant to ship: onnx_fp32 (fp32), onnx_optimized (optimized), onnx_int8 "
              "(int8). Default: the fastest that met the accuracy goal.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Bundle folder (default RUN_DIR/bundle); OUT.tar.gz is written beside it.")
@click.option("--name", default=None, help="Model name (default: the recipe's name).")
@click.option("--version", "version", default="1", show_default=True, help="Model version.")
@click.option("--allow-miss", is_flag=True, help="Ship a variant that missed the accuracy goal (the manifest says so).")
@click.option("--golden", type=int, default=256, show_default=True, help="Golden test texts for the smoke test.")
@click.option("--latency-seconds", type=float, default=6.0, show_default=True,
              help="Seconds timing the model against the reference workload (machine-normalised latency).")
@click.option("--force", is_flag=True, help="Replace an existing bundle (never other folders).")
@_guard
def ship_cmd(run_dir, variant, out, name, version, allow_miss, golden, latency_seconds, force):
    """Package RUN_DIR's compressed model as a self-verifying bundle folder + .tar.gz (see README: Ship)."""
    from pydantic import ValidationError

    from edgeft.ship import ShipConfig, ship

    try:
        cfg = ShipConfig(run_dir=run_dir, variant=variant, out=out, name=name, version=version, allow_miss=allow_miss,
                         force=force, golden=golden, latency_seconds=latency_seconds)
    except ValidationError as e:
        err = e.errors()[0]
        raise EdgeftError(f"--{str(err['loc'][0]).replace('_', '-')}: {err['msg']}",
                          "names and versions use letters, digits, '.', '_' and '-'") from None
    click.echo(ship(cfg).render())


@cli.command("verify")
@click.argument("bundle", type=click.Path())
@click.option("--skip-latency", is_flag=True, help="Skip the latency check (checksums, load and golden only).")
@click.option("--latency-seconds", type=float, default=4.0, show_default=True, help="Seconds of latency measurement.")
@click.option("--json-out", type=click.Path(dir_okay=False), default=None, help="Also write the result as JSON.")
@_guard
def verify_cmd(bundle, skip_latency, latency_seconds, json_out):
    """Check BUNDLE: checksums, load, golden answers, machine-normalised latency. Exit 0 pass, 1 fail, 2 bad bundle."""
    from edgeft.verify import verify

    result = verify(bundle, skip_latency=skip_latency, latency_seconds=latency_seconds)
    click.echo(result.render())
    if json_out:
        from edgeft.artifacts import write_json_atomic

        write_json_atomic(json_out, result.to_dict())
    sys.exit(result.exit_code)


def main() -> None:
    cli(prog_name="edgeft")


if __name__ == "__main__":
    main()
