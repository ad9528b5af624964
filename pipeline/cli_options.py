"""The options commands share, as click decorators, and the BuildConfig they make.

Several commands take the same groups of options (data, training, conversion, output, measurement, SSH);
each group is defined once here so their `--help` reads the same everywhere. cli.py only stacks them.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import click
from click.core import ParameterSource

from pipeline import rundir
from pipeline.config import INPUT_RANGES, INT8_IO, MAX_SEED, VARIANTS, BuildConfig
from pipeline.convert import CALIBRATED
from pipeline.data import DATASETS
from pipeline.models import MODELS, OPTIMIZERS, SCHEDULES


def verbose_option(fn):
    return click.option("-v", "--verbose", is_flag=True,
                        help="Also show TensorFlow's and the interpreter's own log lines live "
                             "(they always go to the run's build.log).")(fn)


def split_variants(ctx, param, values):
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
    fn = click.option("--seed", type=click.IntRange(0, MAX_SEED), default=0, show_default=True,
                      help="Seed for weights, shuffling, validation split and calibration sample.")(fn)
    return fn


def under_folders(ctx, param, value):
    """An --out whose nearest existing ancestor is a file can never be written: a usage error (exit 2)."""
    if value is None:
        return None
    for parent in Path(value).parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise click.BadParameter(f"{value}: {parent} is a file, not a folder; choose a path in a folder")
            break
    return value


def output_options(fn):
    fn = click.option("--out", type=click.Path(file_okay=False, path_type=Path), callback=under_folders,
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
                      help="cosine (to 0) or constant, either after --warmup-epochs (default: recipe).")(fn)
    fn = click.option("--warmup-epochs", type=click.IntRange(min=0),
                      help="Linear warm-up epochs (default: recipe).")(fn)
    fn = click.option("--weight-decay", type=click.FloatRange(min=0, max=1, max_open=True),
                      help="Decoupled weight decay (default: recipe).")(fn)
    fn = click.option("--label-smoothing", type=click.FloatRange(min=0, max=1, max_open=True),
                      help="Label smoothing of the loss (default: recipe).")(fn)
    fn = click.option("--ema", type=click.FloatRange(min=0, max=1, max_open=True),
                      help="Decay of a moving average of the weights that the model ends with, e.g. 0.999 "
                           "(BatchNorm statistics recomputed for it); 0: none (default: recipe).")(fn)
    fn = click.option("--reparam/--no-reparam", default=None,
                      help="Train each 3x3 conv as three branches (3x3, 1x1, identity) folded back into it at the "
                           "end: the model delivered is the same; cifar-resnet8 only (default: recipe).")(fn)
    fn = click.option("--sam", type=click.FloatRange(min=0, max=1, max_open=True), metavar="RHO",
                      help="Sharpness-aware minimization of radius RHO, e.g. 0.05: each step takes the gradient at "
                           "the worst point that near the weights (twice the compute per image); 0: plain steps "
                           "(default: recipe).")(fn)
    fn = click.option("--plain-epochs", type=click.IntRange(min=0), metavar="N",
                      help="Train the last N epochs without augmentation, on the images as the test split has "
                           "them (default: the recipe's share of --epochs; cifar-resnet8: 6 of 45).")(fn)
    fn = click.option("--augment/--no-augment", default=None,
                      help="Random shift and horizontal flip of training images only (default: on for cifar10 "
                           "and folders, off for digits).")(fn)
    fn = click.option("--tensorboard", type=click.Path(file_okay=False, path_type=Path),
                      help="Write TensorBoard logs to DIR.")(fn)
    return fn


def convert_options(fn):
    fn = click.option("--quantize", multiple=True, callback=split_variants, metavar="VARIANT[,VARIANT]",
                      help=f"Variants to build: {', '.join(VARIANTS)} or all (repeat or comma-separate; "
                           "fp32 is always built as the baseline). Default: int8.")(fn)
    fn = click.option("--calibration-samples", type=click.IntRange(min=1), default=BuildConfig.calibration_samples,
                      show_default=True,
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


def config_from_options(out, name, overwrite=False, **kwargs) -> BuildConfig:
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
    cfg = BuildConfig(out=str(out) if out else "", xnnpack=xnnpack, **kwargs)
    if cfg.int8_io != "int8" and "int8" not in cfg.quantize:
        raise click.UsageError(f"--int8-io {cfg.int8_io} sets the input and output of the int8 model, and --quantize "
                               f"{','.join(cfg.quantize)} builds none; add int8 to --quantize or drop --int8-io")
    if cfg.calibration_samples != BuildConfig.calibration_samples and not set(cfg.quantize) & set(CALIBRATED):
        raise click.UsageError(f"--calibration-samples {cfg.calibration_samples} sets the images that calibrate "
                               f"{' and '.join(CALIBRATED)}, and --quantize {','.join(cfg.quantize)} builds neither; "
                               "add one to --quantize or drop --calibration-samples")
    return cfg


# Options that do not change what is built, so a resumed build may take them.
RESUME_KEEPS = ("resume", "verbose")


def refuse_options_with_resume(ctx) -> None:
    """--resume continues with the options the build was started with; others would be silently ignored."""
    given = [max(p.opts, key=len) for p in ctx.command.params
             if p.name not in RESUME_KEEPS and ctx.get_parameter_source(p.name) not in (ParameterSource.DEFAULT, None)]
    if given:
        raise click.UsageError(f"--resume continues with the options the build was started with; drop "
                               f"{', '.join(given)} (or start a new build with them and --overwrite)")


def refuse_training_options(ctx) -> None:
    """A --keras-model is converted as it is, untrained: a training option would be silently ignored while
    the run's config recorded it as if it had shaped the model."""
    training = {p.name for p in click.command()(train_options(lambda **_: None)).params}
    if ctx.params.get("qat") or ctx.params.get("fallback") == "auto":
        training -= {"batch_size", "augment"}  # the guard's quantization-aware fine-tuning trains with them
    given = ["/".join([max(p.opts, key=len), *p.secondary_opts]) for p in ctx.command.params
             if p.name in training and ctx.get_parameter_source(p.name) not in (ParameterSource.DEFAULT, None)]
    if ctx.params.get("keras_model") is not None and given:
        raise click.UsageError(f"--keras-model is converted as it is, without training; drop {', '.join(given)} "
                               "(or drop --keras-model to train a zoo model with them)")


class Finite(click.FloatRange):
    """A budget or a limit: click's FloatRange lets nan and inf through, and a nan budget holds nothing back."""

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{number} is not a finite number", param, ctx)
        return number


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
        except (ValueError, OverflowError):  # OverflowError: inf, 1e400
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


def ssh_settings(ssh_config, accept_new_host_key, connect_timeout):
    from pipeline.boards.ssh import SshOptions

    return SshOptions(ssh_config, accept_new_host_key, connect_timeout)
