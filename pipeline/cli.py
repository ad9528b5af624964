"""`pipeline`: a thin click group. Each command parses options, builds one BuildConfig, calls one function.

Exit codes (README, "Exit codes"): 0 ok; 1 the command ran and failed (bad data or files, a check
that found problems); 2 the command line is wrong (unknown or conflicting options, a value out of
range, a path that does not exist or is of the wrong kind); 130 interrupted (Ctrl-C). User mistakes
are one line, never a traceback; tracebacks are for bugs only.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import signal
from pathlib import Path

import click
from click.core import ParameterSource

import pipeline
from pipeline import rundir
from pipeline.config import FALLBACKS, INPUT_RANGES, INT8_IO, VARIANTS, BuildConfig, ConfigError
from pipeline.data import DATASETS
from pipeline.micro.export import BOARDS, TARGETS
from pipeline.models import MODELS, OPTIMIZERS, SCHEDULES
from pipeline.search.space import SPACES
from pipeline.ship.bundle import WHEEL_PLATFORMS


class UserError(click.ClickException):
    """A problem with the user's input or files; exit code 1, message only."""


class Interrupted(click.ClickException):
    """Ctrl-C: exit code 130, as a shell reports a command killed by SIGINT."""

    exit_code = 130


# What an interruption leaves, by command (a build adds the `--resume` line naming its run); a
# finished run that was being changed stays as it was.
INTERRUPTED = {
    **dict.fromkeys(("build", "train", "convert"), "interrupted; nothing half-written was left behind"),
    **dict.fromkeys(("report", "benchmark", "analyze", "export"), "interrupted; the run is unchanged"),
    "deploy": "interrupted: every board was stopped and nothing was merged into the report",
}


def exit_error(error: BaseException, command: str) -> click.ClickException | None:
    """The one line and exit code a command ends with after `error`: 2 for a wrong command line, 130 for
    Ctrl-C, 1 for the user's input, the machine (a full disk) or a bug. None for a bug that ran outside a
    console session: its traceback is the message. Notes the build or the session added (`--resume`, where
    the log is) end the line."""
    from pipeline import failures

    notes = "".join(f"; {n}" for n in getattr(error, "__notes__", ()))
    what = failures.kind(error)
    if what == failures.INTERRUPTED:
        return Interrupted(INTERRUPTED.get(command, "interrupted") + notes)
    if isinstance(error, click.ClickException):
        return error
    if isinstance(error, ConfigError):
        return click.UsageError(str(error))
    if what == failures.INPUT:
        return UserError(f"{error}{notes}")
    if what == failures.MACHINE:
        return UserError(f"{failures.machine_problem(error)}{notes}")
    if notes:
        return UserError(f"failed: {type(error).__name__}: {error}{notes}")
    return None


def handle_errors(fn):
    """Every command: Ctrl-C remembered however it surfaces, every exception mapped by `exit_error`."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from pipeline import failures

        try:
            with failures.ctrl_c():
                return fn(*args, **kwargs)
        except (click.exceptions.Exit, click.Abort, SystemExit):
            raise
        except BaseException as e:
            mapped = exit_error(e, fn.__name__)
            if mapped is None or mapped is e:
                raise
            raise mapped from e
    return wrapper


def verbose_option(fn):
    return click.option("-v", "--verbose", is_flag=True,
                        help="Also show TensorFlow's and the interpreter's own log lines live "
                             "(they always go to the run's build.log).")(fn)


def captured(verbose: bool, work):
    """Run work(log) with TensorFlow's and LiteRT's own output kept in a log, off the terminal; a bug
    keeps the log and names it (console.session)."""
    from pipeline import console

    with console.session(verbose) as session:
        return work(session.say)


def _split_variants(ctx, param, values):
    names = [v.strip() for value in values for v in value.split(",") if v.strip()]
    if values and not names:
        raise click.BadParameter(f"empty; pass one or more of {', '.join((*VARIANTS, 'all'))}, or leave the option "
                                 "out for int8")
    choices = (*VARIANTS, "all")
    unknown = [n for n in names if n not in choices]
    if unknown:
        raise click.BadParameter(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(choices)}")
    return tuple(names)


def _data_dir(ctx, param, value):
    """A --data-dir that does not exist, or that the dataset cannot read, is a usage error (exit 2)."""
    if value is None:
        return None
    dataset = ctx.params.get("dataset") or "mnist"
    info = DATASETS.get(dataset)
    if info is not None and not getattr(info, "offline", True):
        raise click.BadParameter(f"{value}: --dataset {dataset} reads no files; drop --data-dir, or choose a "
                                 "dataset that reads them (--dataset mnist)")
    if not value.exists():
        expected = getattr(info, "offline", None) or "the dataset's files"
        raise click.BadParameter(f"{value} does not exist; expected a folder holding {expected}")
    return value


def data_options(fn):
    # Eager: --data-dir's check needs the dataset, whichever comes first on the command line.
    fn = click.option("--dataset", type=click.Choice(list(DATASETS)), is_eager=True,
                      help="Training data: mnist, cifar10, digits (scikit-learn's 8x8 digits, no network needed) "
                           "or folder (your images, one folder per class). Default: folder when --data-dir holds "
                           "class folders, else mnist.")(fn)
    fn = click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), callback=_data_dir,
                      help="Read the dataset offline from DIR (mnist.npz or IDX files; cifar-10-batches-py, "
                           "cifar-10-python.tar.gz or CIFAR class folders) or your own class folders.")(fn)
    fn = click.option("--image-size", metavar="HxW",
                      help="Size images from folders are resized to (default: the dataset's, 32x32 for a folder).")(fn)
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
    # The recipe options default to the model's own recipe (models.MODELS; the README lists them).
    fn = click.option("--epochs", type=click.IntRange(min=1), help="Training epochs (default: the model's recipe).")(fn)
    fn = click.option("--batch-size", type=click.IntRange(min=1), help="Training batch size (default: recipe).")(fn)
    fn = click.option("--optimizer", type=click.Choice(OPTIMIZERS), help="Optimizer (default: recipe).")(fn)
    fn = click.option("--learning-rate", type=click.FloatRange(min=0, min_open=True),
                      help="Peak learning rate (default: recipe).")(fn)
    fn = click.option("--lr-schedule", type=click.Choice(SCHEDULES),
                      help="cosine (to 0, after --warmup-epochs) or constant (default: recipe).")(fn)
    fn = click.option("--warmup-epochs", type=click.IntRange(min=0),
                      help="Linear warm-up epochs (default: recipe).")(fn)
    fn = click.option("--weight-decay", type=click.FloatRange(min=0, max=1, max_open=True),
                      help="Decoupled weight decay (default: recipe).")(fn)
    fn = click.option("--label-smoothing", type=click.FloatRange(min=0, max=1, max_open=True),
                      help="Label smoothing of the loss (default: recipe).")(fn)
    fn = click.option("--augment/--no-augment", default=None,
                      help="Random shift and horizontal flip of training images only (default: on for cifar10 "
                           "and folders, off for digits).")(fn)
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
                      help="Input/output type of the int8 model: int8 (integer-only), uint8 (integer-only, what "
                           "MediaPipe Tasks and TFLite Model Maker use) or float.")(fn)
    fn = click.option("--input-range", type=click.Choice(list(INPUT_RANGES)),
                      help="Pixel range the model expects (default: 0,255 for a --keras-model that starts with "
                           "a Rescaling or Normalization layer, else 0,1); recorded for the device.")(fn)
    return fn


def measure_options(fn):
    fn = click.option("--runs", "bench_runs", type=click.IntRange(min=1), default=200, show_default=True,
                      help="Timed inferences per variant and thread count.")(fn)
    fn = click.option("--warmup", "bench_warmup", type=click.IntRange(min=0), default=20, show_default=True,
                      help="Warm-up inferences per variant, timed but kept out of the statistics.")(fn)
    fn = click.option("--threads", type=click.IntRange(min=1), multiple=True,
                      help="Interpreter threads to measure (repeatable; default: 1 and min(4, cores)).")(fn)
    fn = click.option("--no-xnnpack", is_flag=True, help="Benchmark the built-in kernels instead of XNNPACK.")(fn)
    fn = click.option("--cross-check", is_flag=True,
                      help="Also run Google's litert-benchmark on every variant and compare medians.")(fn)
    return fn


def _config(out, name, overwrite=False, **kwargs) -> BuildConfig:
    """The BuildConfig of these options. Without --out or --name, the default run name gets the next
    free number (`mnist-cnn-mnist-2`) when a finished run has it, unless --overwrite asks to replace it."""
    if out is not None and name is not None:
        raise click.UsageError("--out and --name both name the run directory; pass only one")
    if name is not None:
        if not name.strip() or "/" in name or name in (".", ".."):
            raise click.BadParameter(f"'{name}' is not a plain name; use --out for a path", param_hint="--name")
        out = rundir.RUNS / name
    if out is not None and str(out).strip() in ("", "."):  # click turns an empty --out into "."
        raise click.BadParameter("empty or the current folder; pass the name of a new run directory",
                                 param_hint="--out")
    cfg = _make_config(out, **kwargs)
    if out is None and not overwrite and cfg.run_dir.exists():
        final = rundir.next_free(cfg.run_dir)
        click.echo(f"{cfg.run_dir} exists; writing {final} (--name or --out choose the folder, "
                   "--overwrite replaces it)")
        cfg = dataclasses.replace(cfg, out=str(final))
    return cfg


def _make_config(out, **kwargs) -> BuildConfig:
    xnnpack = not kwargs.pop("no_xnnpack", False)
    if not kwargs.get("quantize"):
        kwargs.pop("quantize", None)  # the config's default (int8) applies
    if kwargs.get("dataset") is None:
        from pipeline.data import is_image_folder

        kwargs["dataset"] = "folder" if kwargs.get("data_dir") and is_image_folder(kwargs["data_dir"]) else "mnist"
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
        _refuse_options_with_resume(click.get_current_context())
    cfg = rundir.resume_config(resume) if resume else _config(benchmark=not no_benchmark, overwrite=overwrite, **kwargs)
    run_dir = captured(verbose, lambda log: run_build(cfg, overwrite=overwrite, resume=bool(resume), log=log))
    _print_table(run_dir)
    _warn_learning(run_dir)
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

    cfg = _config(overwrite=overwrite, **kwargs)
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

    cfg = _config(keras_model=keras_model, overwrite=overwrite, **kwargs)
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
    _print_table(run_dir)


# Options that do not change what is built, so a resumed build may take them.
RESUME_KEEPS = ("resume", "verbose")


def _refuse_options_with_resume(ctx) -> None:
    """--resume continues with the options the build was started with; others would be silently ignored."""
    given = [max(p.opts, key=len) for p in ctx.command.params
             if p.name not in RESUME_KEEPS and ctx.get_parameter_source(p.name) not in (ParameterSource.DEFAULT, None)]
    if given:
        raise click.UsageError(f"--resume continues with the options the build was started with; drop "
                               f"{', '.join(given)} (or start a new build with them and --overwrite)")


def _warn_learning(run_dir: Path) -> None:
    """The report's notes that say the model did not learn, on the console too (they are in the report)."""
    from pipeline.report.render import learning_warnings

    for text in learning_warnings(run_dir):
        click.echo(f"warning: {text}", err=True)


def _print_table(run_dir: Path) -> None:
    report_md = Path(run_dir) / "report.md"
    if report_md.exists():
        from pipeline.report.render import delivery_line, summary_table

        click.echo(summary_table(run_dir))
        click.echo(delivery_line(run_dir))


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
    _print_table(run_dir)


@main.command()
@click.argument("runs", nargs=-1, metavar="RUN_A RUN_B [...]")
@click.option("--format", "fmt", type=click.Choice(["text", "markdown", "html", "json"]), default="text",
              show_default=True, help="What to print: a terminal table, Markdown, an HTML page or JSON.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Also write compare.json, compare.md, compare.html and compare.png into DIR.")
@handle_errors
def compare(runs, fmt, out):
    """Finished runs side by side: accuracy with its interval, size, latency; incomparable columns flagged."""
    from pipeline.report import compare as comparison

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


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Archive to write (default: RUN_DIR.tar.gz beside the run directory).")
@click.option("--variants", callback=lambda ctx, param, values: tuple(
                  v.strip() for value in values for v in value.split(",") if v.strip()),
              multiple=True, metavar="VARIANT[,VARIANT]",
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


class ByteSize(click.ParamType):
    """A byte count: 262144, 256K or 256KiB, 1M or 1MiB (K and M are 1024 and 1024*1024)."""
    name = "BYTES"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        text = str(value).strip().upper().removesuffix("IB").removesuffix("B")
        scale = {"K": 1024, "M": 1024 * 1024}.get(text[-1:], 1)
        try:
            n = int(float(text[:-1] if scale > 1 else text) * scale)
        except ValueError:
            n = -1
        if n <= 0:
            self.fail(f"'{value}' is not a byte count; write e.g. 262144, 256K or 1M", param, ctx)
        return n


def ssh_options(fn):
    fn = click.option("--ssh-config", type=click.Path(exists=True, dir_okay=False),
                      help="OpenSSH client configuration to use instead of ~/.ssh/config (ssh -F).")(fn)
    fn = click.option("--accept-new-host-key", is_flag=True,
                      help="Accept and remember the host key of a board never connected to (OpenSSH's "
                           "accept-new); a changed key is always refused.")(fn)
    fn = click.option("--connect-timeout", type=click.IntRange(min=1), default=10, show_default=True,
                      help="Seconds to wait for a board to answer.")(fn)
    return fn


def _ssh(ssh_config, accept_new_host_key, connect_timeout):
    from pipeline.boards.ssh import SshOptions

    return SshOptions(ssh_config, accept_new_host_key, connect_timeout)


@main.group("device")
def device_group():
    """Named boards for `pipeline deploy` ($XDG_CONFIG_HOME/edgepipe/devices.json); SSH keys stay in ~/.ssh."""


@device_group.command("add")
@click.argument("name")
@click.argument("target", metavar="[USER@]HOST[:PORT]")
@click.option("--replace", is_flag=True, help="Point an existing name at a new destination.")
@handle_errors
def device_add(name, target, replace):
    """Name a board; HOST may be an address, a host name or a Host alias of ~/.ssh/config."""
    from pipeline.boards import devices

    board = devices.add(name, target, replace)
    click.echo(f"{board.name}: {board.target} (in {devices.config_path()})")


@device_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the boards as JSON.")
@handle_errors
def device_list(as_json):
    """The named boards."""
    from pipeline.boards import devices

    boards = devices.load()
    if as_json:
        click.echo(json.dumps({n: {"target": d.target} for n, d in boards.items()}, indent=2))
    elif not boards:
        click.echo("no boards yet; add one with `pipeline device add NAME [USER@]HOST[:PORT]`")
    for name, board in sorted(boards.items()) if not as_json else ():
        click.echo(f"{name}  {board.target}")


@device_group.command("remove")
@click.argument("name")
@click.option("--purge", is_flag=True, help="First delete ~/edgepipe on the board over SSH: every run, environment "
                                            "and cache `pipeline deploy` put there, and nothing else.")
@ssh_options
@handle_errors
def device_remove(name, purge, **ssh):
    """Forget a named board (with --purge, after cleaning up after deploy on it)."""
    from pipeline.boards import devices
    from pipeline.boards.deploy import purge as purge_board
    from pipeline.boards.ssh import BoardError

    if name not in devices.load():
        raise UserError(f"no board named {name}; `pipeline device list` shows the known ones")
    if purge:
        try:
            removed = purge_board(name, _ssh(**ssh))
        except BoardError as e:
            raise UserError(f"{name}: {e}; the board stays in the list (remove it without --purge to forget it anyway)")
        click.echo(f"{name}: " + ("removed ~/edgepipe from the board" if removed else "nothing to remove on the board"))
    devices.remove(name)
    click.echo(f"{name}: forgotten")


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--device", "targets", multiple=True, required=True, metavar="NAME|[USER@]HOST[:PORT]",
              help="A board by name (`pipeline device list`) or SSH destination; "
                   "repeat for several, deployed in parallel.")
@click.option("--bundle", "bundle_path", type=click.Path(exists=True, dir_okay=False),
              help="Deploy this bundle of the run (e.g. made with `pipeline bundle --wheels`) "
                   "instead of making one.")
@click.option("--runs", type=click.IntRange(min=1), default=200, show_default=True,
              help="Timed inferences per model on the board.")
@click.option("--warmup", type=click.IntRange(min=0), default=20, show_default=True,
              help="Warm-up inferences before them.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="Interpreter threads on the board.")
@click.option("--timeout", type=click.FloatRange(min=1), default=900, show_default=True,
              help="Seconds a board may take, from connecting to its results.")
@click.option("--clean", is_flag=True, help="Delete the run's folder on each board first (~/edgepipe/RUN), so the "
                                            "bundle is copied and unpacked afresh; environments are kept.")
@ssh_options
@handle_errors
def deploy(run_dir, targets, bundle_path, runs, warmup, threads, timeout, clean, **ssh):
    """Put a run's models on boards over SSH, evaluate and benchmark them there, and add each board to the report."""
    from pipeline.boards import deploy as boards

    cfg = boards.DeployConfig(tuple(targets), bundle_path, runs, warmup, threads, timeout, clean, _ssh(**ssh))
    entries = boards.deploy(run_dir, cfg, log=lambda m: click.echo(m, err=True))
    for line in boards.summary(entries):
        click.echo(line)
    _print_table(run_dir)
    failed = [e["name"] for e in entries if not e["ok"]]
    if len(failed) == len(entries):
        raise UserError(f"{len(failed)} of {len(entries)} board(s) failed: {', '.join(failed)} (reasons above); "
                        "nothing was merged, the run is unchanged")
    if failed:
        raise UserError(f"{len(failed)} of {len(entries)} board(s) failed: {', '.join(failed)} (reasons above and in "
                        f"the report); the others were merged")


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--target", type=click.Choice(TARGETS), default="tflm", show_default=True,
              help="tflm: C/C++ sources for TensorFlow Lite Micro on a microcontroller.")
@click.option("--variant", help="The run's integer model to export (default: what the run delivers, the "
                                "accuracy guard's repair such as int8-cle where it made one, else int8).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
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
    """The `pipeline` command. Once a command has finished, its outcome stands: a Ctrl-C that lands while
    Python shuts down (TensorFlow's exit handlers take a while) would otherwise kill the process with no
    message and an exit code that says the finished work was interrupted."""
    try:
        main()
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


@main.command()
@data_options
@click.option("--target", default="host", show_default=True, metavar="host|DEVICE|tflm:BOARD",
              help="Where candidates are measured: this host, a board over SSH (a name from `pipeline device "
                   "list` or [user@]host[:port]), or TFLite Micro's arena for a microcontroller.")
@click.option("--max-latency-ms", type=click.FloatRange(min=0, min_open=True),
              help="Latency budget (host, or a board that is not emulated).")
@click.option("--max-size-kb", type=click.FloatRange(min=0, min_open=True), help="Budget for the .tflite size.")
@click.option("--max-ram-kb", type=click.FloatRange(min=0, min_open=True), help="Budget for the TFLM arena.")
@click.option("--quantize", multiple=True, callback=_split_variants, metavar="VARIANT[,VARIANT]",
              help="The variants that compete (default int8).")
@click.option("--max-accuracy-drop", type=click.FloatRange(min=0), metavar="PP",
              help="Guarded int8: int8 competes as the accuracy guard delivers it (repaired when it loses more than "
                   "PP points on validation; out of a trial when no remedy with int8's graph holds).")
@click.option("--budget-minutes", type=click.FloatRange(min=0, min_open=True), default=60, show_default=True,
              help="Wall time for the whole search.")
@click.option("--trials", type=click.IntRange(min=1), default=20, show_default=True, help="Trials to train at most.")
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True, help="Epochs per trial at most.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Training batch size.")
@click.option("--space", type=click.Choice(list(SPACES)), default="default", show_default=True,
              help="The search space preset.")
@click.option("--cpus-per-trial", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--address", help="A Ray cluster's address (default: a local Ray of this machine's cores).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="The search folder to write.")
@click.option("--name", help="Search name: writes artifacts/NAME (instead of --out).")
@click.option("--resume", metavar="NAME|DIR", help="Continue an interrupted search (Ray Tune's restore).")
@ssh_options
@handle_errors
def search(resume, out, name, image_size, quantize, **kwargs):
    """Find the most accurate model within latency, size and RAM budgets, measured on the target."""
    from pipeline.search.feasibility import SearchError
    from pipeline.search.run import SearchConfig, load_config
    from pipeline.search.run import search as run_search

    try:
        if image_size:
            raise SearchError("--image-size: the search chooses the resolution itself; drop --image-size")
        if resume:
            folder = Path(resume) if Path(resume).is_dir() else Path("artifacts") / resume
            cfg = load_config(folder)
        else:
            if out is not None and name is not None:
                raise click.UsageError("--out and --name both name the search folder; pass only one")
            folder = out or Path("artifacts") / (name or "search")
            if kwargs.get("data_dir") is not None:
                kwargs["data_dir"] = str(kwargs["data_dir"])
            if kwargs.get("ssh_config") is not None:  # --resume may run from another folder
                kwargs["ssh_config"] = str(Path(kwargs["ssh_config"]).resolve())
            kwargs["dataset"] = kwargs.get("dataset") or "mnist"
            cfg = SearchConfig(out=str(folder), quantize=quantize or ("int8",), **kwargs)
        captured(False, lambda log: run_search(cfg, resume=bool(resume), log=log))
    except SearchError as e:
        raise UserError(str(e))
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted; finished trials are kept: continue with `pipeline search --resume {folder}`")


if __name__ == "__main__":
    entry()
