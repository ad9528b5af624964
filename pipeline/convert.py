"""Conversion to `.tflite`: one named preset per quantization variant.

Each preset configures a `tf.lite.TFLiteConverter`; the table `PRESETS` is the registry the CLI's
`--quantize` choices come from.
"""
from __future__ import annotations

import contextlib
import io
import re
import time
import warnings

import numpy as np

from device.core import normalize
from pipeline import console
from pipeline.config import BuildConfig
from pipeline.data import Dataset
from pipeline.failures import InputError

NOTES = {
    "int16x8": "int16 activations with int8 weights: XNNPACK does not run them, so this variant uses "
               "the reference kernels and is far slower than int8 on CPUs (about 80x on x86 here); "
               "it exists for accuracy, not speed.",
    "dynamic": "weights int8, activations float, quantized on the fly at run time: smaller, "
               "but not an integer-only model (no int8-only accelerators).",
    "float16": "weights stored as float16 and expanded to float32 on a CPU: half the size, same speed.",
}


def fp32_baseline(converter, tf, calibration, cfg):
    """No optimization: the float model every other variant is judged against."""


def dynamic_range_weights_int8(converter, tf, calibration, cfg):
    converter.optimizations = [tf.lite.Optimize.DEFAULT]


def float16_weights(converter, tf, calibration, cfg):
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.target_spec.supported_types = [tf.float16]


def full_integer_int8(converter, tf, calibration, cfg):
    """Every op int8, calibrated on training images; int8 (or uint8) input/output unless --int8-io float."""
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = calibration
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    if cfg.int8_io in ("int8", "uint8"):
        # uint8 adds one requantize op at each end; the graph between stays int8.
        converter.inference_input_type = converter.inference_output_type = getattr(tf, cfg.int8_io)


def int16_activations_int8_weights(converter, tf, calibration, cfg):
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = calibration
    converter.target_spec.supported_ops = [
        tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]


PRESETS = {
    "fp32": fp32_baseline,
    "dynamic": dynamic_range_weights_int8,
    "float16": float16_weights,
    "int8": full_integer_int8,
    "int16x8": int16_activations_int8_weights,
}
CALIBRATED = ("int8", "int16x8")  # the presets that read calibration images
CALIBRATION = "calibration.npz"  # in the run (not the bundle): the pixels int8 was calibrated on, as array x


def calibration_images(data: Dataset, count: int, seed: int) -> np.ndarray:
    """A seeded sample of the training split (never validation or test, never augmented), normalized like
    training, stratified: each class gets its share, so a rare class still sets the activation ranges."""
    return normalize(calibration_pixels(data, count, seed), data.spec.to_dict())


def calibration_pixels(data: Dataset, count: int, seed: int) -> np.ndarray:
    """The images calibration_images normalizes, as the dataset holds them (uint8): what the run keeps in
    CALIBRATION, so the TFLM export converts again on exactly these without the dataset."""
    rng = np.random.default_rng(seed)
    classes = np.unique(data.y_train)
    members = [rng.permutation(np.flatnonzero(data.y_train == c)) for c in classes]
    # Round-robin over the shuffled classes: equal shares, and the rest from classes that have more.
    order = [m[i] for i in range(max(map(len, members), default=0)) for m in members if i < len(m)]
    take = np.sort(np.array(order[:count], dtype=np.int64))
    return data.x_train[take]


def convert(model, variant: str, cfg: BuildConfig, calibration: np.ndarray) -> bytes:
    import tensorflow as tf

    def representative():
        for i in range(len(calibration)):
            yield [calibration[i:i + 1]]

    # Keras prints the exported signature on every conversion, and the converter warns that int8
    # inputs carry no statistics (they do not need any: calibration sets the scale); both are noise.
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs")
        converter = tf.lite.TFLiteConverter.from_keras_model(model)
        PRESETS[variant](converter, tf, representative, cfg)
        try:
            return converter.convert()
        except Exception as e:
            if type(e).__name__ != "ConverterError":
                raise
            raise ConversionError(_conversion_problem(variant, str(e))) from None


class ConversionError(InputError):
    """The converter cannot make this variant of the user's model; the message names the ops."""


def _conversion_problem(variant: str, message: str) -> str:
    ops = sorted(set(re.findall(r"'(tfl?\.[A-Za-z0-9_]+)' op", message)))
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    what = f"op(s) {', '.join(ops)}" if ops else (lines[0][:200] if lines else "an unsupported op")
    fix = f"TFLite has no {variant} kernel for them: replace or reconfigure the layers that make them"
    if variant in ("int8", "int16x8"):
        fix += f", or drop {variant} from --quantize (dynamic and float16 keep such ops in float)"
    return f"cannot convert the model to {variant}: {what}; {fix}"


def convert_all(model, cfg: BuildConfig, data: Dataset, log=print) -> dict[str, tuple[bytes, float]]:
    """Every configured variant: {variant: (flatbuffer bytes, seconds)}."""
    calibration = calibration_images(data, cfg.calibration_samples, cfg.seed)
    if any(v in CALIBRATED for v in cfg.quantize) and cfg.calibration_samples > len(data.x_train):
        log(f"calibration: --calibration-samples {cfg.calibration_samples} is more than the {len(data.x_train):,} "
            f"training images; calibrating on all {len(data.x_train):,}")
    out = {}
    with console.progress("converting", total=len(cfg.quantize), unit="variants") as bar:
        for variant in cfg.quantize:
            bar.advance(0, description=f"converting {variant}")
            t0 = time.perf_counter()
            out[variant] = (convert(model, variant, cfg, calibration), time.perf_counter() - t0)
            log(f"converted {variant}: {len(out[variant][0]):,} bytes in {out[variant][1]:.2f} s")
            if variant in NOTES:
                log(f"  note: {NOTES[variant]}")
            bar.advance()
    return out
