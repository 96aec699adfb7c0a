"""edgeft command line. Each command parses, calls one library function, renders.

Heavy libraries (torch, transformers, onnxruntime) are imported only inside
commands, so ``edgeft --help`` is instant.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from edgeft import __version__
from edgeft.errors import EdgeftError, from_os_error, printable

SET_HELP = "Override a recipe field, e.g. --set finetune.epochs=1 (repeatable)."


def _fail(err: EdgeftError) -> None:
    click.echo(f"error: {err.one_line()}", err=True)  # one_line() escapes control characters
    sys.exit(err.exit_code)


def _refuse_linked_out(kwargs: dict) -> None:
    """An --out that is a symbolic link is refused: edgeft never writes, replaces or deletes through one."""
    out = kwargs.get("out")
    if out and os.path.islink(str(out).rstrip("/") or str(out)):
        raise EdgeftError(f"--out {out} is a symbolic link; edgeft never writes or deletes through links"
                          + (", even with --force" if kwargs.get("force") else ""),
                          "pass the real folder path, or another --out")


def _guard(fn):
    """Turn edgeft errors into one line + exit code; never a traceback for bad input.

    Exit codes: 0 ok, 1 goal missed / regression / failed check, 2 bad input or the machine's
    environment (disk full, permission denied, name too long: OSErrors mapped here), 3 an edgeft
    bug (internal error), 130 / 143 interrupted (SIGINT / SIGTERM).
    """
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            _refuse_linked_out(kwargs)
            return fn(*args, **kwargs)
        except EdgeftError as e:
            _fail(e)
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (see _install_signal_handlers): 130 / 143
            click.echo(f"interrupted ({getattr(e, 'signal_name', 'SIGINT')}): nothing half-written was left "
                       "(partial outputs are removed; a run folder's manifest records the interruption)", err=True)
            sys.exit(getattr(e, "exit_code", 130))
        except MemoryError:
            click.echo("error: out of memory (fix: lower the batch size or max_length)", err=True)
            sys.exit(2)
        except Exception as e:  # an edgeft bug, not bad input: keep it to one line unless debugging
            env = from_os_error(e, kwargs.get("out") or kwargs.get("json_out"))
            if env is not None:  # the user's disk or permissions, not a bug
                _fail(env)
            if os.environ.get("EDGEFT_DEBUG"):
                raise
            msg = " ".join(str(e).split())[:300]
            click.echo(printable(f"internal error: {type(e).__name__}: {msg} (set EDGEFT_DEBUG=1 for a traceback, "
                                 "and please report it)"), err=True)
            sys.exit(3)

    return wrapper


def _recipe(path: str | None, overrides: tuple[str, ...], extra: list[str] | None = None, *,
            text_generation: bool = False):
    """The recipe; a text-generation one only where the command takes it (``edgeft run``, ``edgeft recipe``)."""
    from edgeft.recipe import load_recipe

    r = load_recipe(path, list(overrides) + (extra or []))
    if r.task == "text-generation" and not text_generation:
        raise EdgeftError("this command takes text-classification recipes; a text-generation recipe runs its "
                          "stages with `edgeft run`", "use `edgeft run RECIPE` (stages: compress, bench)")
    return r


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
      edgeft gate --baseline-model old/bundle --candidate runs/a
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
    click.echo(printable(run_dir))


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
    from edgeft.layout import RunLayout
    from edgeft.pipeline import compress_stage

    source = RunLayout(Path(model))
    if recipe is None and source.is_run() and source.recipe.is_file():
        recipe = str(source.recipe)
    from edgeft.errors import GoalMissed

    r = _recipe(recipe, overrides, ["compress.allow_miss=true"] if allow_miss else None)
    try:
        run_dir = compress_stage(model, r, out, force=force, show_progress=not quiet)
    except GoalMissed as e:  # the report is complete: show it, then the one-line verdict
        if not quiet and isinstance(getattr(e, "report", None), dict):
            _print_compress_summary(e.report)
        raise
    if not quiet:
        _print_compress_summary(_read_compress_report(Path(run_dir)))
    click.echo(printable(run_dir))


def _read_compress_report(run_dir: Path) -> dict | None:
    import json

    path = run_dir / "compress" / "report.json"
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) else None


def _print_compress_summary(report: dict | None) -> None:
    """The compress report as a table on stderr (steps, accuracy, agreement, size), then the verdict."""
    if not report:
        return
    from rich.markup import escape
    from rich.table import Table

    from edgeft.progress import console

    t = Table(title="compress", show_lines=False)
    for col in ("step", "val acc", "test acc", "drop (pts)", "agree", "max |diff|", "MB", "params"):
        t.add_column(col, justify="right" if col != "step" else "left")
    for s in report.get("steps", []):
        agree = s.get("agreement_vs_parent", {}).get("validation")
        diff = s.get("max_abs_logit_diff_vs_parent")
        t.add_row(printable(s["step"]), f"{s['validation']['accuracy']:.4f}", f"{s['test']['accuracy']:.4f}",
                  f"{s.get('accuracy_drop_points', 0.0):.2f}", f"{agree:.4f}" if agree is not None else "",
                  f"{diff:.1e}" if diff is not None and s["step"] in ("export", "optimize") else "",
                  f"{s['size_mb']:.1f}", f"{s['params'] / 1e6:.2f}M")
    console.print(t)
    q = next((s for s in report.get("steps", []) if s.get("step") == "quantize"), None)
    if q is not None:
        flags = ", ".join(q["cpu_int8"].get("flags") or []) or "none"
        choice = q.get("scheme_choice") or {}
        tried = ", ".join(f"{c['scheme']} {c['validation_accuracy']:.4f}" for c in choice.get("candidates", []))
        console.print(printable(f"int8 on {q['cpu_int8'].get('model')} (flags: {flags}); scheme "
                                f"{q.get('scheme', 'u8s8')}{' (tried ' + tried + ')' if len(choice.get('candidates', [])) > 1 else ''}"
                                f"; fp32 nodes kept: {', '.join(q['fp32_nodes']) or 'none'}"), highlight=False)
    style = "green" if report.get("goal_met") else "bold red"
    console.print(f"[{style}]{escape(printable(report.get('verdict', '')))}[/]; final: "
                  f"{escape(printable(report.get('final', '')))}", highlight=False)


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
    from edgeft.layout import RunLayout

    extra = []
    if runtimes:
        extra.append(f"bench.runtimes={runtimes if runtimes == 'auto' else '[' + runtimes + ']'}")
    if batch:
        extra.append(f"bench.batch_sizes={_csv_ints(batch, 'batch')}")
    if seq:
        extra.append(f"bench.seq_lengths={_csv_ints(seq, 'seq')}")
    if threads is not None:  # 0 is validated (bench.threads must be > 0), not ignored
        extra.append(f"bench.threads={threads}")
    if data:
        # DATASET[:SPLIT]: split off the last ':' only when it names a split, so hf:NAME stays whole.
        name, sep, split = data.rpartition(":")
        if not sep or split not in ("train", "validation", "test"):
            name, split = data, ""
        extra.append(f"data.dataset={json.dumps(name)}")  # quoted: the value is read as YAML
        if split:
            extra.append(f"bench.eval_split={split}")
    first = RunLayout(Path(models[0]))
    if recipe is None and first.is_run() and first.recipe.is_file():
        recipe = str(first.recipe)
    r = _recipe(recipe, overrides, extra)
    from edgeft.pipeline import bench_stage

    click.echo(printable(bench_stage(list(models), r, out, force=force, show_progress=not quiet)))


@cli.command()
@click.argument("current", required=False, type=click.Path())
@click.option("--baseline", default=None, type=click.Path(), help="Stored bench.json to compare CURRENT against.")
@click.option("--baseline-model", default=None, type=click.Path(),
              help="A/B mode: the old model (run folder, bundle, HF folder or .onnx), timed interleaved with --candidate.")
@click.option("--candidate", default=None, type=click.Path(), help="A/B mode: the new model (same kinds as --baseline-model).")
@click.option("--max-latency-regression", default="10%", show_default=True,
              help="Allowed latency increase, e.g. 10% or 0.1.")
@click.option("--max-accuracy-drop", default=None, show_default="0.5", type=float,
              help="Allowed accuracy drop, in points (classification reports and A/B mode).")
@click.option("--max-perplexity-increase", default=None, show_default="2%",
              help="Stored mode, decoder bench reports: allowed relative test-perplexity increase, e.g. 2% or 0.02.")
@click.option("--normalize/--no-normalize", default=False,
              help="Stored mode: compare latencies as ratios to the in-run reference model (baseline from another machine).")
@click.option("--expect-same-model", is_flag=True,
              help="Stored mode: refuse (exit 2) when a model's files differ from the baseline's (another checkpoint).")
@click.option("--budget-seconds", type=float, default=None,
              help="A/B mode: seconds of warm-up + timing before giving up as INCONCLUSIVE (default 30).")
@click.option("--threads", type=int, default=None, help="A/B mode: intra-op threads for both models (default: usable cores).")
@click.option("--baseline-threads", type=int, default=None, help="A/B mode: intra-op threads for the baseline only.")
@click.option("--candidate-threads", type=int, default=None, help="A/B mode: intra-op threads for the candidate only.")
@click.option("--batch", type=int, default=None, help="A/B mode: batch size timed (default 1).")
@click.option("--seq", type=int, default=None, help="A/B mode: tokens per row timed (default 128, capped by the models).")
@click.option("--variant", default=None, help="A/B mode: variant of a run folder (default: the one 'edgeft ship' picks).")
@click.option("--min-rounds", type=int, default=None, help="A/B mode: rounds before the first decision (default 20).")
@click.option("--data", default=None, help="A/B mode: DATASET[:SPLIT] to compare accuracy on (optional).")
@click.option("--json-out", type=click.Path(dir_okay=False), default=None, help="Also write the verdict as JSON.")
@_guard
def gate(current, baseline, baseline_model, candidate, max_latency_regression, max_accuracy_drop,
         max_perplexity_increase, normalize, expect_same_model, budget_seconds, threads, baseline_threads,
         candidate_threads, batch, seq, variant, min_rounds, data, json_out):
    """Latency/accuracy gate: exit 0 pass, 1 regression (or inconclusive), 2 bad input.

    \b
    A/B (recommended in CI): edgeft gate --baseline-model OLD --candidate NEW
      times both interleaved in one process and decides on the paired ratio.
    Stored baseline:         edgeft gate CURRENT.json --baseline BASE.json
      (two 'edgeft bench' reports, or two decoder bench reports of 'edgeft run')
    """
    from edgeft.gate import parse_fraction

    threshold = parse_fraction(max_latency_regression)
    ppl_increase = None if max_perplexity_increase is None else parse_fraction(max_perplexity_increase)
    ab_only = {"--budget-seconds": budget_seconds, "--threads": threads, "--baseline-threads": baseline_threads,
               "--candidate-threads": candidate_threads, "--variant": variant, "--min-rounds": min_rounds,
               "--data": data, "--batch": batch, "--seq": seq}
    if baseline_model is not None or candidate is not None:
        if baseline_model is None or candidate is None:
            raise EdgeftError("A/B mode needs both --baseline-model and --candidate",
                              "edgeft gate --baseline-model OLD --candidate NEW")
        if current is not None or baseline is not None or normalize or expect_same_model:
            raise EdgeftError("CURRENT/--baseline/--normalize/--expect-same-model belong to the stored-baseline mode",
                              "use either --baseline-model OLD --candidate NEW, or CURRENT.json --baseline BASE.json")
        if ppl_increase is not None:
            raise EdgeftError("--max-perplexity-increase belongs to the stored-baseline mode (decoder bench reports)",
                              "gate decoder bench reports with CURRENT.json --baseline BASE.json")
        from edgeft.ab_gate import DEFAULT_BUDGET_S, DEFAULT_MIN_ROUNDS, ABConfig, ab_gate

        cfg = ABConfig(baseline=Path(baseline_model), candidate=Path(candidate), max_latency_regression=threshold,
                       budget_s=DEFAULT_BUDGET_S if budget_seconds is None else budget_seconds, threads=threads,
                       baseline_threads=baseline_threads, candidate_threads=candidate_threads, batch=1 if batch is None else batch,
                       seq=128 if seq is None else seq,
                       variant=variant, min_rounds=DEFAULT_MIN_ROUNDS if min_rounds is None else min_rounds,
                       data=data, max_accuracy_drop=0.5 if max_accuracy_drop is None else max_accuracy_drop,
                       show_progress=False)
        result = ab_gate(cfg)
    else:
        if current is None or baseline is None:
            raise EdgeftError("nothing to gate", "edgeft gate --baseline-model OLD --candidate NEW, "
                                                 "or edgeft gate CURRENT.json --baseline BASE.json")
        given = [k for k, v in ab_only.items() if v is not None]
        if given:
            raise EdgeftError(f"{', '.join(given)} belong to the A/B mode", "use --baseline-model OLD --candidate NEW")
        from edgeft.gate import gate as run_gate

        result = run_gate(Path(current), Path(baseline), max_latency_regression=threshold,
                          max_accuracy_drop=max_accuracy_drop, max_perplexity_increase=ppl_increase,
                          normalize=normalize, expect_same_model=expect_same_model)
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

    from edgeft.errors import GoalMissed

    r = _recipe(recipe, overrides, text_generation=True)
    if r.task == "text-generation":
        from edgeft.decoder.pipeline import run_decoder

        run_dir = run_decoder(r, out or default_run_dir(r), force=force, show_progress=not quiet)
        click.echo(printable(run_dir))
        if not quiet:
            click.echo(printable(f"next: see {Path(run_dir) / 'bench.md'} and {Path(run_dir) / 'compress' / 'report.json'}"),
                       err=True)
        return
    try:
        run_dir = run(r, out or default_run_dir(r), force=force, show_progress=not quiet)
    except GoalMissed as e:
        if not quiet and isinstance(getattr(e, "report", None), dict):
            _print_compress_summary(e.report)
        raise
    if not quiet and "compress" in r.stages:
        _print_compress_summary(_read_compress_report(Path(run_dir)))
    click.echo(printable(run_dir))
    if not quiet:  # stderr: stdout stays the run folder alone (the Makefile reads it)
        click.echo(printable(f"next: edgeft ship {run_dir}   (a verified bundle to serve)"), err=True)


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
    click.echo(_recipe(recipe, overrides, text_generation=True).to_yaml(), nl=False)


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
@click.option("--engine", type=click.Choice(["embedded", "ray"]), default=None,
              help="engine: embedded (default; one process) or ray (Ray Serve replicas with autoscaling; "
                   "pip install 'edgeft[ray]'; ray.* settings via --set ray.KEY=VALUE).")
@click.option("--print-config", is_flag=True, help="Print the resolved ServeConfig as YAML and exit.")
@_guard
def serve_cmd(bundle, host, port, keys, config_file, overrides, threads, max_batch_size, insecure_no_auth_public,
              engine, print_config):
    """Serve BUNDLE (from `edgeft ship`) over HTTP: KServe V2 / Triton API, TEI-style /predict, /metrics.

    A text-generation bundle (a decoder LM) is served with OpenAI-compatible routes instead:
    /v1/models, /v1/completions, /v1/chat/completions (stream: true for Server-Sent Events).
    Settings: the bundle's serving defaults, then --config, then --set KEY=VALUE, then flags.
    SIGTERM drains and exits 0; SIGHUP reloads the key file.
    """
    from edgeft.bundle import read_manifest
    from edgeft.serve.config import resolve_config

    manifest = read_manifest(bundle)
    cfg = resolve_config(manifest.get("serving") if isinstance(manifest.get("serving"), dict) else None,
                         config_file, overrides,
                         {"host": host, "port": port, "keys": keys, "threads": threads, "max_batch_size": max_batch_size,
                          "insecure_no_auth_public": insecure_no_auth_public, "engine": engine})
    if print_config:
        click.echo(cfg.to_yaml(), nl=False)
        return
    if cfg.engine == "ray":
        if manifest.get("task") == "text-generation":
            from edgeft.serve.server import ServeRefused

            raise ServeRefused("engine: ray serves text-classification bundles only; this bundle is a text-generation "
                               "model", "serve it with --engine embedded (the default)")
        from edgeft.scale.ray_serve import run_ray

        sys.exit(run_ray(bundle, cfg))
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
    click.echo(printable(f"key id {kid} added to {keyfile}; the key above is not stored anywhere, keep it now "
                         "(running servers pick it up on SIGHUP)"), err=True)


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
@click.option("--triton", is_flag=True, help="Add a Triton model repository (triton/: ensemble of tokenizer, ONNX, labels).")
@click.option("--kubernetes", is_flag=True,
              help="Add Kubernetes manifests (Deployment, Service, HPA, key Secret) and a KServe InferenceService.")
@click.option("--image", default=None, help="Container image the Kubernetes manifests run (default edgeft-NAME:VERSION).")
@_guard
def ship_cmd(run_dir, variant, out, name, version, allow_miss, golden, latency_seconds, force, triton, kubernetes,
             image):
    """Package RUN_DIR's compressed model as a self-verifying bundle folder + .tar.gz (see README: Ship)."""
    from pydantic import ValidationError

    from edgeft.ship import ShipConfig, ship

    try:
        cfg = ShipConfig(run_dir=run_dir, variant=variant, out=out, name=name, version=version, allow_miss=allow_miss,
                         force=force, golden=golden, latency_seconds=latency_seconds, triton=triton,
                         kubernetes=kubernetes, image=image)
    except ValidationError as e:
        err = e.errors()[0]
        raise EdgeftError(f"--{str(err['loc'][0]).replace('_', '-')}: {err['msg']}",
                          "names and versions use letters, digits, '.', '_' and '-'") from None
    import contextlib

    from edgeft.artifacts import run_lock
    from edgeft.layout import RunLayout

    # ship reads the run folder and (by default) writes bundle/ into it: no other edgeft writer meanwhile
    src = RunLayout(Path(run_dir))
    with run_lock(src.root) if src.is_run() and not src.root.is_symlink() else contextlib.nullcontext():
        result = ship(cfg)
    click.echo(printable(result.render(), keep_newlines=True))


@cli.command("verify")
@click.argument("bundle", type=click.Path())
@click.option("--skip-latency", is_flag=True, help="Skip the latency check (checksums, load and golden only).")
@click.option("--latency-seconds", type=float, default=4.0, show_default=True, help="Seconds of latency measurement.")
@click.option("--json-out", type=click.Path(dir_okay=False), default=None, help="Also write the result as JSON.")
@click.option("--triton", is_flag=True, help="Demand the Triton model repository (checked offline whenever present).")
@click.option("--kubernetes", is_flag=True, help="Demand the Kubernetes manifests (checked offline whenever present).")
@_guard
def verify_cmd(bundle, skip_latency, latency_seconds, json_out, triton, kubernetes):
    """Check BUNDLE: checksums, load, golden answers, machine-normalised latency, and the scale-out files
    (Ray, Triton, Kubernetes) it holds. Exit 0 pass, 1 fail, 2 bad bundle."""
    from edgeft.verify import verify

    result = verify(bundle, skip_latency=skip_latency, latency_seconds=latency_seconds,
                    require=tuple(k for k, on in (("triton", triton), ("kubernetes", kubernetes)) if on))
    click.echo(printable(result.render(), keep_newlines=True))
    if json_out:
        from edgeft.artifacts import write_json_atomic

        write_json_atomic(json_out, result.to_dict())
    sys.exit(result.exit_code)


def _install_signal_handlers() -> None:
    """SIGTERM (CI cancellation, `timeout`) is handled like Ctrl-C: cleanup runs, exit 143."""
    from edgeft.signals import install

    install()


def main() -> None:
    _install_signal_handlers()
    cli(prog_name="edgeft")


if __name__ == "__main__":
    main()
