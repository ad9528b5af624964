"""`pipeline`: a thin click group. Each command parses options, builds one BuildConfig, calls one function.

User mistakes become `click.ClickException`s with a one-line message (exit 1) or usage errors
(exit 2); tracebacks are for bugs only.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import click

import pipeline
from pipeline.config import FALLBACKS, INT8_IO, VARIANTS, BuildConfig, ConfigError
from pipeline.data import DATASETS
from pipeline.models import MODELS


class UserError(click.ClickException):
    """A problem with the user's input or files; exit code 1, message only."""


def _user_errors():
    """The exception types that mean 'your input', not 'our bug'; imported lazily to keep --help fast."""
    from device.core import DeviceError
    from pipeline.artifacts import RunDirError
    from pipeline.data import DataError
    from pipeline.report.render import ReportError
    from pipeline.train import ModelMismatchError

    return (DeviceError, RunDirError, DataError, ModelMismatchError, ReportError)


def handle_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConfigError as e:
            raise click.UsageError(str(e))
        except click.ClickException:
            raise
        except Exception as e:
            if isinstance(e, _user_errors()):
                raise UserError(str(e))
            raise
        except KeyboardInterrupt:
            raise UserError("interrupted; nothing half-written was left behind (continue with --resume)")
    return wrapper


def _split_variants(ctx, param, values):
    names = [v.strip() for value in values for v in value.split(",") if v.strip()]
    choices = (*VARIANTS, "all")
    unknown = [n for n in names if n not in choices]
    if unknown:
        raise click.BadParameter(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(choices)}")
    return tuple(names)


def data_options(fn):
    fn = click.option("--dataset", type=click.Choice(list(DATASETS)), default="mnist", show_default=True,
                      help="Training data: mnist, cifar10, or digits (scikit-learn's 8x8 digits, no network needed).")(fn)
    fn = click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
                      help="Read the dataset offline from DIR (mnist.npz or IDX files; cifar-10-batches-py "
                           "or cifar-10-python.tar.gz) instead of downloading it.")(fn)
    fn = click.option("--seed", type=int, default=0, show_default=True,
                      help="Seed for weights, shuffling, validation split and calibration sample.")(fn)
    return fn


def output_options(fn):
    fn = click.option("--out", type=click.Path(file_okay=False, path_type=Path),
                      help="Run directory to write (default: artifacts/<model>-<dataset>).")(fn)
    fn = click.option("--name", help="Run name: writes artifacts/NAME (instead of --out).")(fn)
    fn = click.option("--overwrite", is_flag=True, help="Replace an existing run directory.")(fn)
    return fn


def train_options(fn):
    fn = click.option("--model", type=click.Choice(list(MODELS)),
                      help="Architecture from the zoo (default: the dataset's default).")(fn)
    fn = click.option("--epochs", type=click.IntRange(min=1), default=5, show_default=True,
                      help="Training epochs.")(fn)
    fn = click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
                      help="Training batch size.")(fn)
    fn = click.option("--tensorboard", type=click.Path(file_okay=False, path_type=Path),
                      help="Write TensorBoard logs to DIR.")(fn)
    return fn


def convert_options(fn):
    fn = click.option("--quantize", multiple=True, callback=_split_variants, metavar="VARIANT[,VARIANT]",
                      help=f"Variants to build: {', '.join(VARIANTS)} or all (repeat or comma-separate; "
                           "fp32 is always built as the baseline). Default: int8.")(fn)
    fn = click.option("--calibration-samples", type=click.IntRange(min=1), default=300, show_default=True,
                      help="Training images used to calibrate int8/int16x8 activation ranges.")(fn)
    fn = click.option("--int8-io", type=click.Choice(INT8_IO), default="int8", show_default=True,
                      help="Input/output type of the int8 model: int8 (integer-only) or float.")(fn)
    return fn


def measure_options(fn):
    fn = click.option("--runs", "bench_runs", type=click.IntRange(min=1), default=200, show_default=True,
                      help="Timed inferences per variant and thread count.")(fn)
    fn = click.option("--warmup", "bench_warmup", type=click.IntRange(min=0), default=20, show_default=True,
                      help="Warm-up inferences per variant, timed but kept out of the statistics.")(fn)
    fn = click.option("--threads", type=click.IntRange(min=1), multiple=True,
                      help="Interpreter threads to measure (repeatable; default: 1 and all cores).")(fn)
    fn = click.option("--no-xnnpack", is_flag=True, help="Benchmark the built-in kernels instead of XNNPACK.")(fn)
    fn = click.option("--cross-check", is_flag=True,
                      help="Also run Google's litert-benchmark on every variant and compare medians.")(fn)
    return fn


def _config(out, name, **kwargs) -> BuildConfig:
    if out and name:
        raise click.UsageError("--out and --name both name the run directory; pass only one")
    if name:
        if "/" in name or name in (".", ".."):
            raise click.BadParameter(f"'{name}' is not a plain name; use --out for a path", param_hint="--name")
        out = Path("artifacts") / name
    xnnpack = not kwargs.pop("no_xnnpack", False)
    if not kwargs.get("quantize"):
        kwargs.pop("quantize", None)  # the config's default (int8) applies
    for key in ("data_dir", "keras_model", "tensorboard"):
        if kwargs.get(key) is not None:
            kwargs[key] = str(kwargs[key])
    return BuildConfig(out=str(out) if out else "", xnnpack=xnnpack, **kwargs)


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
              help="Skip training and convert this .keras model (its input must fit the dataset).")
@click.option("--max-accuracy-drop", type=click.FloatRange(min=0), metavar="PP",
              help="After writing the report, exit non-zero if a variant lost more than PP percentage points "
                   "(with --fallback auto, the guard's repaired variant is judged instead of the one it replaced).")
@click.option("--no-benchmark", is_flag=True, help="Skip the latency benchmark.")
@click.option("--resume", metavar="NAME|DIR",
              help="Continue the interrupted build of run NAME (or run directory DIR) from its last finished "
                   "stage, with the options it was started with.")
@click.option("--analyze", is_flag=True,
              help="Per-layer quantization error of the int8 model (TensorFlow's QuantizationDebugger) in the report.")
@click.option("--fallback", type=click.Choice(FALLBACKS), default="none", show_default=True,
              help="auto: if int8 loses more than --max-accuracy-drop, repair it (equalization, then float layers).")
@click.option("--qat", is_flag=True, help="Also fine-tune with quantization-aware training and report QAT int8.")
@handle_errors
def build(overwrite, resume, no_benchmark, **kwargs):
    """Train, quantize, convert, evaluate, benchmark and report, into one run directory."""
    from pipeline.build import build as run_build, check_accuracy_drop, AccuracyDropError

    cfg = _resume_config(resume) if resume else _config(benchmark=not no_benchmark, **kwargs)
    run_dir = run_build(cfg, overwrite=overwrite, resume=bool(resume), log=click.echo)
    _print_table(run_dir)
    if cfg.max_accuracy_drop is not None:
        try:
            check_accuracy_drop(run_dir, cfg.max_accuracy_drop)
        except AccuracyDropError as e:
            raise UserError(str(e))


@main.command()
@data_options
@train_options
@output_options
@handle_errors
def train(overwrite, **kwargs):
    """Train only: writes model.keras and a manifest."""
    from pipeline.build import build as run_build

    run_build(_config(**kwargs), overwrite=overwrite, until="train", log=click.echo)


@main.command()
@click.argument("keras_model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@data_options
@convert_options
@output_options
@handle_errors
def convert(keras_model, overwrite, **kwargs):
    """Convert a .keras model into the chosen .tflite variants (no training, no measurements)."""
    from pipeline.build import build as run_build

    cfg = _config(keras_model=keras_model, **kwargs)
    run_build(cfg, overwrite=overwrite, until="metadata", log=click.echo)


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@measure_options
@handle_errors
def benchmark(run_dir, **kwargs):
    """Measure latency, memory and size of every variant of a finished run again."""
    from pipeline.build import rebenchmark

    cfg = _run_config(run_dir, **kwargs)
    rebenchmark(run_dir, cfg, log=click.echo)
    _print_table(run_dir)


def _resume_config(target: str) -> BuildConfig:
    """The configuration an interrupted build saved in its staging folder."""
    final = Path(target) if ("/" in target or Path(target).is_dir()) else Path("artifacts") / target
    staging = final.parent / f".{final.name}.partial"
    try:
        saved = json.loads((staging / "config.json").read_text())
    except (OSError, ValueError):
        if final.is_dir():
            raise UserError(f"--resume {target}: the run {final} is already complete; nothing to resume")
        raise UserError(f"--resume {target}: no interrupted build found at {staging}; start it with "
                        "`pipeline build --name NAME` first")
    saved["out"] = str(final)
    return BuildConfig.from_dict(saved)


def _run_config(run_dir: Path, **overrides) -> BuildConfig:
    try:
        saved = json.loads((run_dir / "manifest.json").read_text())["config"]
    except (OSError, ValueError, KeyError):
        raise UserError(f"{run_dir}: no readable manifest.json; pass a run directory written by `pipeline build`")
    saved.update({k: v for k, v in overrides.items() if k != "no_xnnpack"})
    saved["xnnpack"] = not overrides.get("no_xnnpack", False)
    saved["threads"] = tuple(overrides.get("threads") or ())
    return BuildConfig.from_dict(saved)


def _print_table(run_dir: Path) -> None:
    report_md = Path(run_dir) / "report.md"
    if report_md.exists():
        from pipeline.report.render import summary_table

        click.echo(summary_table(run_dir))


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@handle_errors
def analyze(run_dir):
    """Per-layer quantization error of a finished run's int8 model, added to its report."""
    from pipeline.guard import analyze_run

    analyze_run(run_dir, log=click.echo)


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
@handle_errors
def verify(run_dir, as_json):
    """Check a run directory or bundle: every file against the manifest, every model loads and fits its metadata."""
    from pipeline.verify import verify_path

    problems = verify_path(run_dir)
    if as_json:
        click.echo(json.dumps({"path": str(run_dir), "ok": not problems, "problems": problems}, indent=2))
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
@click.option("--device-results", type=click.Path(exists=True, dir_okay=False, path_type=Path), multiple=True,
              help="JSON written on a device by `runner.py bench --json` or `eval --json` (repeatable); "
                   "shown beside the host's figures.")
@handle_errors
def report(run_dir, device_results):
    """Render report.json, report.md, report.html and the plots of a finished run again."""
    from pipeline.report import render as report_stage
    from pipeline.artifacts import update_manifest

    report_stage.render(run_dir, device_results=list(device_results), log=click.echo)
    update_manifest(run_dir)
    _print_table(run_dir)


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Archive to write (default: RUN_DIR.tar.gz beside the run directory).")
@click.option("--variants", callback=lambda ctx, param, values: tuple(
                  v.strip() for value in values for v in value.split(",") if v.strip()),
              multiple=True, metavar="VARIANT[,VARIANT]",
              help="Models to include, including guard variants such as int8-cle (default: int8 and fp32); "
                   "int8 is required.")
@handle_errors
def bundle(run_dir, out, variants):
    """Pack a run into one .tar.gz for a Raspberry Pi: models, metadata, runner, samples, README."""
    from pipeline.ship.bundle import BundleError, make_bundle

    try:
        path = make_bundle(run_dir, out, variants or None)
    except BundleError as e:
        raise UserError(str(e))
    click.echo(f"wrote {path} ({path.stat().st_size:,} bytes)")



if __name__ == "__main__":
    main()
