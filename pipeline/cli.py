"""`pipeline`: a thin click group. Each command parses options, builds one BuildConfig, calls one function.

The options several commands share are in cli_options.py, how a command runs and ends (console session,
the one mapping of errors to a line and an exit code) in cli_run.py, the Ctrl-C policy in interrupts.py,
and the commands for boards over SSH (`device`, `deploy`) in cli_boards.py.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import click

import pipeline
from pipeline import cli_boards, interrupts, rundir
from pipeline.cli_options import (
    ByteSize,
    Finite,
    config_from_options,
    convert_options,
    data_options,
    measure_options,
    output_options,
    refuse_options_with_resume,
    refuse_training_options,
    split_variants,
    ssh_options,
    train_options,
    under_folders,
    verbose_option,
)
from pipeline.cli_run import captured, handle_errors, print_table, warn_learning
from pipeline.config import FALLBACKS
from pipeline.micro.export import BOARDS, TARGETS
from pipeline.search.final import MAX_FACTOR
from pipeline.search.space import SPACES
from pipeline.ship.bundle import WHEEL_PLATFORMS


def versions_line() -> str:
    from importlib import metadata

    parts = [f"edgepipe {pipeline.__version__}"]
    for dist in ("tensorflow", "ai-edge-litert"):
        try:
            parts.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{dist} not installed")
    return ", ".join(parts)


def _print_version(ctx, param, value):
    if value and not ctx.resilient_parsing:
        click.echo(versions_line())
        ctx.exit()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Print the versions of edgepipe, TensorFlow and the interpreter, then exit.")
def main():
    """edgepipe: train a small vision model, quantize it, measure what quantization costs, ship it to a Pi."""


@main.command()
@data_options
@train_options
@convert_options
@output_options
@measure_options
@click.option("--keras-model", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Skip training and convert this .keras model (its input must fit the dataset); the training "
                   "options do not apply to it and are refused.")
@click.option("--max-accuracy-drop", type=click.FloatRange(min=0), metavar="PP",
              help="After writing the report, exit non-zero if a variant lost more than PP percentage points "
                   "(with --fallback auto, the guard's repaired variant is judged instead of the one it replaced).")
@click.option("--min-accuracy", type=click.FloatRange(0, 100), metavar="PCT",
              help="After writing the report, exit 1 if the delivered variant's test accuracy is below PCT percent "
                   "(for scripts: a model that trained to chance is not shipped by accident).")
@click.option("--no-benchmark", is_flag=True, help="Skip the latency benchmark.")
@click.option("--resume", metavar="NAME|DIR",
              help="Continue the interrupted build of run NAME (or run directory DIR) from its last finished "
                   "stage, with the options it was started with.")
@click.option("--analyze", is_flag=True,
              help="Per-layer quantization error of the int8 model (TensorFlow's QuantizationDebugger) in the report.")
@click.option("--fallback", type=click.Choice(FALLBACKS), default="none", show_default=True,
              help="auto: if int8 loses more than --max-accuracy-drop, repair it (equalization, then float layers).")
@click.option("--qat", is_flag=True, help="Also fine-tune with quantization-aware training and report QAT int8.")
@verbose_option
@handle_errors
def build(overwrite, resume, no_benchmark, verbose, min_accuracy, **kwargs):
    """Train, quantize, convert, evaluate, benchmark and report, into one run directory."""
    from pipeline.build import build as run_build
    from pipeline.build import check_accuracy_drop, check_min_accuracy

    if resume:
        refuse_options_with_resume(click.get_current_context())
        cfg = rundir.resume_config(resume)
    else:
        refuse_training_options(click.get_current_context())
        cfg = config_from_options(benchmark=not no_benchmark, overwrite=overwrite, **kwargs)
    run_dir = captured(verbose, lambda log: run_build(cfg, overwrite=overwrite, resume=bool(resume), log=log))
    print_table(run_dir)
    warn_learning(run_dir)
    if min_accuracy is not None:
        check_min_accuracy(run_dir, min_accuracy)
    if cfg.max_accuracy_drop is not None:
        check_accuracy_drop(run_dir, cfg.max_accuracy_drop)


@main.command()
@data_options
@train_options
@output_options
@verbose_option
@handle_errors
def train(overwrite, verbose, **kwargs):
    """Train only: writes model.keras and a manifest."""
    from pipeline.build import build as run_build

    cfg = config_from_options(overwrite=overwrite, **kwargs)
    captured(verbose, lambda log: run_build(cfg, overwrite=overwrite, until="train", log=log))


@main.command()
@click.argument("keras_model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@data_options
@convert_options
@output_options
@verbose_option
@handle_errors
def convert(keras_model, overwrite, verbose, **kwargs):
    """Convert a .keras model into the chosen .tflite variants (no training, no measurements)."""
    from pipeline.build import build as run_build

    cfg = config_from_options(keras_model=keras_model, overwrite=overwrite, **kwargs)
    captured(verbose, lambda log: run_build(cfg, overwrite=overwrite, until="metadata", log=log))


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@measure_options
@verbose_option
@handle_errors
def benchmark(run_dir, verbose, no_xnnpack, **kwargs):
    """Measure latency, memory and size of every variant of a finished run again."""
    from pipeline.build import rebenchmark

    rundir.require_converted(run_dir, "benchmark")
    cfg = rundir.saved_config(run_dir, xnnpack=not no_xnnpack, **kwargs)
    captured(verbose, lambda log: rebenchmark(run_dir, cfg, log=log))
    print_table(run_dir)


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@verbose_option
@handle_errors
def analyze(run_dir, verbose):
    """Per-layer quantization error of a finished run's int8 model, added to its report."""
    from pipeline.guard import analyze_run

    rundir.require_converted(run_dir, "analyze")
    captured(verbose, lambda log: analyze_run(run_dir, log=log))


@main.command()
@click.argument("run_dir", metavar="RUN_DIR|BUNDLE", type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
@handle_errors
def verify(run_dir, as_json):
    """Check a run directory or bundle: every file against the manifest, every model loads and fits its metadata."""
    from pipeline.verify import verify_path

    problems = captured(False, lambda log: verify_path(run_dir))
    if as_json:
        click.echo(json.dumps({"kind": "verify", "schema": 1, "path": str(run_dir), "ok": not problems,
                               "problems": problems}, indent=2))
    elif not problems:
        click.echo(f"{run_dir}: verified")
    if problems:
        if not as_json:
            click.echo(f"{run_dir}: {len(problems)} problem(s)", err=True)
            for p in problems:
                click.echo(f"  - {p}", err=True)
        raise SystemExit(1)


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("more_results", nargs=-1, metavar="", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--device-results", type=click.Path(exists=True, dir_okay=False, path_type=Path), multiple=True,
              metavar="FILE...",
              help="JSON written on a device by `runner.py bench --json` or `eval --json` (several files after one "
                   "--device-results, or the option repeated); shown beside the host's figures.")
@handle_errors
def report(run_dir, more_results, device_results):
    """Render report.json, report.md, report.html and the plots of a finished run again."""
    from pipeline.artifacts import updating
    from pipeline.report import render as report_stage

    if more_results and not device_results:
        raise click.UsageError(f"unexpected argument(s) {' '.join(map(str, more_results))}; device results go "
                               "after --device-results: pipeline report RUN_DIR --device-results FILE...")
    rundir.require_converted(run_dir, "report")
    def rerender(log):
        with updating(run_dir, "report", log=log) as (work, _):
            report_stage.render(work, device_results=[*device_results, *more_results], log=log)

    captured(False, rerender)
    print_table(run_dir)


@main.command()
@click.argument("runs", nargs=-1, metavar="RUN_A RUN_B [...]")
@click.option("--format", "fmt", type=click.Choice(["text", "markdown", "html", "json"]), default="text",
              show_default=True, help="What to print: a terminal table, Markdown, an HTML page or JSON.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), callback=under_folders,
              help="Also write compare.json, compare.md, compare.html and compare.png into DIR.")
@handle_errors
def compare(runs, fmt, out):
    """Finished runs side by side: accuracy with its interval, size, latency; incomparable columns flagged."""
    from pipeline.report import compare as comparison

    if out:
        comparison.check_out(out)
    result = captured(False, lambda log: comparison.compare(list(runs)))
    if fmt == "json":
        click.echo(json.dumps(result, indent=2))
    elif fmt == "html":
        click.echo(comparison.html(result, comparison.plot(result)), nl=False)
    else:
        click.echo(comparison.markdown(result) if fmt == "markdown" else comparison.text(result), nl=False)
        if fmt == "text":
            click.echo()
    if out:
        for path in comparison.write(result, out):
            click.echo(f"wrote {path}", err=True)


def _bundle_variants(ctx, param, values):
    names = tuple(v.strip() for value in values for v in value.split(",") if v.strip())
    if values and not names:
        raise click.BadParameter("empty; name the run's variants to pack (e.g. int8,fp32), or leave the option out "
                                 "for the variant the run delivers and fp32")
    return names


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), callback=under_folders,
              help="Archive to write (default: RUN_DIR.tar.gz beside the run directory).")
@click.option("--variants", callback=_bundle_variants, multiple=True, metavar="VARIANT[,VARIANT]",
              help="Models to include, including guard variants such as int8-cle (default: the variant the run "
                   "delivers, and fp32 as the reference).")
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle written by `pipeline bundle`.")
@click.option("--wheels", type=click.Choice(list(WHEEL_PLATFORMS)), multiple=True,
              help="Also carry the runtime's wheels for this board platform (repeatable), for boards without "
                   "internet; `pipeline deploy` installs from them.")
@handle_errors
def bundle(run_dir, out, variants, overwrite, wheels):
    """Pack a run into one .tar.gz for a Raspberry Pi: models, metadata, runner, samples, README."""
    from pipeline.ship.bundle import make_bundle

    path = make_bundle(run_dir, out, variants or None, overwrite=overwrite, wheels=wheels,
                       log=lambda m: click.echo(m, err=True))
    click.echo(f"wrote {path} ({path.stat().st_size:,} bytes)")


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--target", type=click.Choice(TARGETS), default="tflm", show_default=True,
              help="tflm: C/C++ sources for TensorFlow Lite Micro on a microcontroller.")
@click.option("--variant", help="The run's integer model to export (default: what the run delivers, the "
                                "accuracy guard's repair such as int8-cle where it made one, else int8).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), callback=under_folders,
              help="Folder to write, plus FOLDER.tar.gz beside it (default: RUN_DIR-tflm beside the run).")
@click.option("--overwrite", is_flag=True, help="Replace an earlier export in --out.")
@click.option("--board", type=click.Choice(list(BOARDS)),
              help="Refuse to export unless the model and its arena fit this board.")
@click.option("--flash", type=ByteSize(), help="Flash free for the model, for a board not in --board's list.")
@click.option("--ram", type=ByteSize(), help="RAM free for the tensor arena, for a board not in --board's list.")
@click.option("--test-images", type=click.IntRange(min=1),
              help="Check accuracy on the first N of the run's labelled test images (samples/eval.npz) only.")
@handle_errors
def export(run_dir, target, **kwargs):
    """Export a finished run for a microcontroller: C/C++ sources, measured arena, accuracy under TFLite Micro."""
    from pipeline.micro.export import export_tflm

    captured(False, lambda log: export_tflm(run_dir, log=log, **kwargs))


def entry():
    """The `pipeline` command (the console script)."""
    try:
        main()
    finally:
        interrupts.finished()


@main.command()
@data_options
@click.option("--target", default="host", show_default=True, metavar="host|DEVICE|tflm:BOARD",
              help="Where candidates are measured: this host, a board over SSH (a name from `pipeline device "
                   "list` or [user@]host[:port]), or TFLite Micro's arena for a microcontroller.")
@click.option("--max-latency-ms", type=Finite(min=0, min_open=True),
              help="Latency budget (host, or a board that is not emulated).")
@click.option("--max-size-kb", type=Finite(min=0, min_open=True), help="Budget for the .tflite size.")
@click.option("--max-ram-kb", type=Finite(min=0, min_open=True), help="Budget for the TFLM arena.")
@click.option("--quantize", multiple=True, callback=split_variants, metavar="VARIANT[,VARIANT]",
              help="The variants that compete (default int8).")
@click.option("--max-accuracy-drop", type=Finite(min=0), metavar="PP",
              help="Guarded int8: int8 competes as the accuracy guard delivers it (repaired when it loses more than "
                   "PP points on validation; out of a trial when no remedy with int8's graph holds).")
@click.option("--budget-minutes", type=Finite(min=0, min_open=True), default=60, show_default=True,
              help="Wall time for the whole search.")
@click.option("--trials", type=click.IntRange(min=1), default=20, show_default=True, help="Trials to train at most.")
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True, help="Epochs per trial at most.")
@click.option("--final-epochs", type=click.IntRange(min=0),
              help="Epochs to train the pick again for (default: as many as the rest of the budget holds, at most "
                   f"{MAX_FACTOR}x --epochs; 0 keeps its trial's model).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Training batch size of the trials and of the pick's final training.")
@click.option("--space", type=click.Choice(list(SPACES)), default="default", show_default=True,
              help="The search space preset.")
@click.option("--cpus-per-trial", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--address", help="A Ray cluster's address (default: a local Ray of this machine's cores).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="The search folder to write.")
@click.option("--name", help="Search name: writes artifacts/NAME (instead of --out).")
@click.option("--resume", metavar="NAME|DIR", help="Continue an interrupted search (Ray Tune's restore).")
@click.option("--measure-only", is_flag=True,
              help="Measure every candidate of the space against the budgets on the target and report them; train "
                   "none (minutes, where a search takes --budget-minutes).")
@ssh_options
@handle_errors
def search(resume, out, name, image_size, quantize, **kwargs):
    """Find the most accurate model within latency, size and RAM budgets, measured on the target."""
    from pipeline.search import SearchError
    from pipeline.search.run import SearchConfig, load_config
    from pipeline.search.run import search as run_search

    if image_size:
        raise SearchError("--image-size: the search chooses the resolution itself; drop --image-size")
    if resume:
        ctx = click.get_current_context()
        given = [max(p.opts, key=len) for p in ctx.command.params if p.name != "resume"
                 and ctx.get_parameter_source(p.name) not in (click.core.ParameterSource.DEFAULT, None)]
        if given:  # a resumed search runs as it was started (its search_config.json): they would be ignored
            raise click.UsageError(f"--resume continues a search with the options it was started with; drop "
                                   f"{', '.join(given)} (or start a new search with them and another --out)")
        folder = Path(resume) if Path(resume).is_dir() else rundir.RUNS / resume
        cfg = load_config(folder)
    else:
        if out is not None and name is not None:
            raise click.UsageError("--out and --name both name the search folder; pass only one")
        # Absolute: --resume may run from another folder, and Ray's workers read the experiment's path.
        folder = (out or rundir.RUNS / (name or "search")).resolve()
        if kwargs.get("data_dir") is not None:  # a trial runs in its own folder, where a relative path names nothing
            kwargs["data_dir"] = os.path.abspath(kwargs["data_dir"])
        if kwargs.get("ssh_config") is not None:  # --resume may run from another folder
            kwargs["ssh_config"] = str(Path(kwargs["ssh_config"]).resolve())
        kwargs["dataset"] = kwargs.get("dataset") or "mnist"
        cfg = SearchConfig(out=str(folder), quantize=quantize or ("int8",), **kwargs)
    interrupts.leaves(f"interrupted; finished trials are kept: continue with `pipeline search --resume {folder}`")
    captured(False, lambda log: run_search(cfg, resume=bool(resume), log=log))


main.add_command(cli_boards.device_group, "device")
main.add_command(cli_boards.deploy)

if __name__ == "__main__":
    entry()
