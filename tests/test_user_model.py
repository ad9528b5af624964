"""A user's own model, read as it is: its input range, logits, what cannot load or convert, MACs, labels."""
from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cli import main

REPO = Path(__file__).resolve().parent.parent
RUNNER = REPO / "device" / "runner.py"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_line_error(result) -> str:
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


@pytest.fixture(scope="module")
def digits():
    from pipeline.data import load_dataset

    return load_dataset("digits", seed=0)


def _fit(model, digits, scale=1 / 255, offset=0.0, logits=False, epochs=15):
    import keras

    keras.utils.set_random_seed(0)
    model.compile(optimizer=keras.optimizers.Adam(0.003),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=logits), metrics=["accuracy"])
    x = digits.x_train.astype(np.float32) * scale + offset
    model.fit(x, digits.y_train, epochs=epochs, batch_size=64, verbose=0)
    return model


def _mlp(head_layers, last_activation="softmax", size=(28, 28, 1)):
    from keras import Input, Sequential, layers

    return Sequential([Input(size), *head_layers, layers.Flatten(),
                       layers.Dense(32, activation="relu"), layers.Dense(10, activation=last_activation)])


def _eval(run: Path, variant="fp32") -> dict:
    proc = subprocess.run([sys.executable, str(RUNNER), "eval", "--model", str(run / f"model_{variant}.tflite"),
                           str(run / "samples" / "eval.npz"), "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


# ---------------------------------------------------------------- input range and logits

def test_rescaling_layer_means_raw_pixels(tmp_path, digits):
    """A model that scales its own input is fed 0-255 pixels, on the host and through the runner."""
    from keras import layers

    model = _fit(_mlp([layers.Rescaling(1 / 255)]), digits, scale=1.0)
    model.save(tmp_path / "own.keras")
    result = invoke("convert", tmp_path / "own.keras", "--dataset", "digits", "--quantize", "int8",
                    "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    pre = json.loads((tmp_path / "run" / "metadata.json").read_text())["preprocess"]
    assert (pre["scale"], pre["offset"]) == (1.0, 0.0)
    assert _eval(tmp_path / "run")["accuracy"] > 0.8
    assert _eval(tmp_path / "run", "int8")["accuracy"] > 0.8

    result = invoke("convert", tmp_path / "own.keras", "--dataset", "digits", "--input-range", "0,1",
                    "--out", tmp_path / "run2")
    assert result.exit_code == 1 and "Rescaling" in one_line_error(result)
    assert not (tmp_path / "run2").exists() and not list(tmp_path.glob(".run2*"))


def test_input_range_minus_one_to_one_is_recorded_and_used(tmp_path, digits):
    model = _fit(_mlp([]), digits, scale=2 / 255, offset=-1.0)
    model.save(tmp_path / "pm1.keras")
    result = invoke("build", "--keras-model", tmp_path / "pm1.keras", "--dataset", "digits",
                    "--input-range", "-1,1", "--no-benchmark", "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    pre = json.loads((tmp_path / "run" / "metadata.json").read_text())["preprocess"]
    assert pre["scale"] == pytest.approx(2 / 255) and pre["offset"] == -1.0
    evaluation = json.loads((tmp_path / "run" / "evaluation.json").read_text())
    assert evaluation["variants"]["fp32"]["accuracy"] > 0.8
    assert evaluation["keras"]["fp32_tflite_max_abs_diff"] < 1e-4
    assert _eval(tmp_path / "run")["accuracy"] > 0.8


def test_logits_become_probabilities(tmp_path, digits):
    model = _fit(_mlp([], last_activation=None), digits, logits=True)
    model.save(tmp_path / "logits.keras")
    result = invoke("build", "--keras-model", tmp_path / "logits.keras", "--dataset", "digits",
                    "--no-benchmark", "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "run" / "metadata.json").read_text())
    assert meta["output"] == "logits"
    probs = np.load(tmp_path / "run" / "predictions.npz")
    for key in ("probs_fp32", "probs_int8", "probs_keras"):
        assert np.allclose(probs[key].sum(axis=1), 1.0, atol=1e-3) and probs[key].min() >= 0, key
    evaluation = json.loads((tmp_path / "run" / "evaluation.json").read_text())
    assert evaluation["variants"]["int8"]["mean_abs_prob_diff_vs_fp32"] < 0.05
    proc = subprocess.run([sys.executable, str(RUNNER), "classify", "--model",
                           str(tmp_path / "run" / "model_int8.tflite"),
                           str(next((tmp_path / "run" / "samples").glob("*.png"))), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    scores = [t["score"] for t in json.loads(proc.stdout)["results"][0]["top"]] if "results" in json.loads(
        proc.stdout) else [t["score"] for t in json.loads(proc.stdout)[0]["top"]]
    assert all(0 <= s <= 1 for s in scores) and sum(scores) <= 1 + 1e-3


# ---------------------------------------------------------------- models that cannot be used, in one line

def test_models_keras_cannot_read_are_named(tmp_path):
    import keras

    (tmp_path / "text.keras").write_text("hello")
    with zipfile.ZipFile(tmp_path / "other.keras", "w") as z:
        z.writestr("notes.txt", "x")

    @keras.saving.register_keras_serializable(package="mine")
    class Doubler(keras.layers.Layer):
        def call(self, x):
            return x * 2

    _mlp([Doubler()]).save(tmp_path / "custom.keras")
    keras.saving.get_custom_objects().pop("mine>Doubler")
    from keras import Input, Sequential, layers

    Sequential([Input((None, None, 1)), layers.GlobalAveragePooling2D(), layers.Dense(10, activation="softmax")]
               ).save(tmp_path / "dynamic.keras")
    for name, expected in (("text.keras", "a text file"), ("other.keras", "zip archive without config.json"),
                           ("custom.keras", "'Doubler'"), ("dynamic.keras", "dynamic input shape")):
        result = invoke("build", "--keras-model", tmp_path / name, "--dataset", "digits", "--out", tmp_path / "r")
        line = one_line_error(result)
        assert result.exit_code == 1 and expected in line and "File not found" not in line, (name, line)
        assert not (tmp_path / "r").exists() and not list(tmp_path.glob(".r.*")), name


def test_unconvertible_op_is_one_line(tmp_path):
    """A built-in layer whose op TFLite has no kernel for: the error names the op (not a ConverterError
    traceback) and leaves no run behind."""
    from keras import Input, Sequential, layers

    Sequential([Input((28, 28, 1)), layers.Resizing(32, 32, interpolation="bicubic"), layers.Flatten(),
                layers.Dense(10, activation="softmax")]).save(tmp_path / "bicubic.keras")
    result = invoke("convert", tmp_path / "bicubic.keras", "--dataset", "digits", "--quantize", "int8",
                    "--out", tmp_path / "r")
    line = one_line_error(result)
    assert result.exit_code == 1 and "tf.ResizeBicubic" in line and "no fp32 kernel" in line, line
    assert not (tmp_path / "r").exists() and not list(tmp_path.glob(".r.*"))


def test_a_model_whose_scores_overflow_is_refused_not_measured(tmp_path):
    """Scores of NaN still have an argmax: the evaluation would report an accuracy (the share of one class among
    the labels) as if measured, and report.json would hold NaN. The runner's eval refuses them; so does the build."""
    from keras import Input, Sequential, layers

    model = Sequential([Input((28, 28, 1)), layers.Flatten(), layers.Dense(10, activation="softmax")])
    weights, bias = model.layers[-1].get_weights()
    weights[:, 3] = weights[:, 5] = 3e38  # any lit pixel sends two logits to infinity, and softmax to NaN
    model.layers[-1].set_weights([weights, bias])
    model.save(tmp_path / "overflow.keras")
    result = invoke("build", "--keras-model", tmp_path / "overflow.keras", "--dataset", "digits", "--quantize",
                    "float16", "--no-benchmark", "--out", tmp_path / "r")
    line = one_line_error(result)
    assert result.exit_code == 1, result.output
    assert line.startswith("Error: fp32 (model_fp32.tflite) on the test split: the model's scores are not all "
                           "finite (NaN or infinity) for 360 of 360 images"), line
    assert not (tmp_path / "r").exists() and not list(tmp_path.glob(".r.*"))


# ---------------------------------------------------------------- labels and MACs

def test_labels_with_slashes_make_flat_sample_names(tmp_path, digits):
    import dataclasses

    from pipeline.build import _write_samples

    labels = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
              "Ankle boot")
    data = dataclasses.replace(digits, spec=dataclasses.replace(digits.spec, labels=labels))
    _write_samples(tmp_path / "samples", data, images=len(data.x_test))
    names = [p.name for p in (tmp_path / "samples").iterdir()]
    assert all((tmp_path / "samples" / n).is_file() for n in names)
    assert any("T-shirt_top" in n for n in names) and any("Ankle_boot" in n for n in names)


def test_count_macs_against_hand_counts():
    from keras import Input, Sequential, layers

    from pipeline.models import count_macs

    conv = Sequential([Input((8, 8, 1)), layers.Conv2D(4, 3)])  # 6*6 positions * 4 out * 9 taps * 1 in
    assert count_macs(conv) == 1296
    sep = Sequential([Input((6, 6, 4)), layers.SeparableConv2D(8, 3, padding="same")])
    assert count_macs(sep) == 6 * 6 * 4 * 9 + 6 * 6 * 4 * 8  # depthwise, then pointwise
    conv1d = Sequential([Input((10, 3)), layers.Conv1D(5, 3)])
    assert count_macs(conv1d) == 8 * 5 * 3 * 3
    sep1d = Sequential([Input((10, 3)), layers.SeparableConv1D(4, 3, padding="same")])
    assert count_macs(sep1d) == 10 * 3 * 3 + 10 * 3 * 4
    dense_seq = Sequential([Input((10, 3)), layers.Dense(2)])  # applied at each of 10 positions
    assert count_macs(dense_seq) == 10 * 3 * 2
    nested = Sequential([Input((8, 8, 1)), Sequential([Input((8, 8, 1)), layers.Conv2D(4, 3)]),
                         layers.Flatten(), layers.Dense(10)])
    assert count_macs(nested) == 1296 + 6 * 6 * 4 * 10
    dw = Sequential([Input((8, 8, 2)), layers.DepthwiseConv2D(3, depth_multiplier=2)])
    assert count_macs(dw) == 6 * 6 * 4 * 9


def test_subprocess_timeouts_are_recorded_not_raised(tmp_path, digits, monkeypatch):
    """QAT, the litert-benchmark cross-check and the memory probe run in child processes with a time
    limit; running out of it is a recorded failure with the reason, never a TimeoutExpired traceback."""
    import shutil as sh

    from keras import Input, Sequential, layers

    from pipeline.config import BuildConfig
    from pipeline.convert import calibration_images, convert
    from pipeline.guard import qat
    from pipeline.measure import benchmark

    model = Sequential([Input((28, 28, 1)), layers.Flatten(), layers.Dense(10, activation="softmax")])
    cfg = BuildConfig(dataset="digits", out=str(tmp_path / "run"))
    calibration = calibration_images(digits, 20, 0)
    (tmp_path / "m.tflite").write_bytes(convert(model, "fp32", cfg, calibration))

    monkeypatch.setattr(benchmark, "MEMORY_TIMEOUT_S", 0.01)
    assert "memory not measured" in benchmark.fresh_process_memory(tmp_path / "m.tflite")["error"]
    if sh.which("litert-benchmark"):
        monkeypatch.setattr(benchmark, "CROSS_CHECK_TIMEOUT_S", 0.01)
        assert "was stopped" in benchmark.litert_benchmark(tmp_path / "m.tflite", 1, 10, 1)["error"]
    if qat.available() is None:
        monkeypatch.setattr(qat, "TIMEOUT_S", 0.01)
        (tmp_path / "qat").mkdir()
        record, flatbuffer = qat.fine_tune(model, cfg, digits, calibration, lambda fb: 0.0, tmp_path / "qat",
                                           log=lambda *a: None)
        assert flatbuffer is None and record["status"] == "failed" and "stopped after" in record["reason"]


def test_input_and_output_conventions_are_read_inside_nested_models():
    from keras import Input, Sequential, layers

    from pipeline.config import BuildConfig
    from pipeline.train import input_convention, outputs_probabilities

    cfg = BuildConfig(dataset="digits", out="unused")
    pre = Sequential([Input((28, 28, 1)), layers.Rescaling(1 / 255)])
    head = Sequential([Input((784,)), layers.Dense(10, activation="softmax")])
    nested = Sequential([Input((28, 28, 1)), pre, layers.Flatten(), head])
    assert input_convention(cfg, nested) == (1.0, 0.0) and outputs_probabilities(nested)
    plain = Sequential([Input((28, 28, 1)), layers.Flatten(), layers.Dense(10)])
    assert input_convention(cfg, plain) == (1 / 255, 0.0) and not outputs_probabilities(plain)
    assert input_convention(BuildConfig(dataset="digits", out="u", input_range="-1,1"), plain) == (2 / 255, -1.0)


def test_a_folder_is_decoded_for_the_users_model_grayscale_and_its_size(tmp_path):
    # The folder used to be decoded for the zoo model it would have trained (RGB, 32x32), so a grayscale
    # model was refused as not fitting the folder, and one of another size needed --image-size.
    import keras
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = (digits.images * 255 / 16).astype(np.uint8)
    x, y = [], []
    for split in ("train", "test"):
        for label in range(3):
            folder = tmp_path / "folder" / split / f"d{label}"
            folder.mkdir(parents=True)
            for i in np.flatnonzero(digits.target == label)[slice(0, 120) if split == "train" else slice(120, 160)]:
                image = Image.fromarray(pixels[i]).resize((12, 12), Image.BILINEAR)
                image.save(folder / f"{i}.png")
                if split == "train":
                    x.append(np.asarray(image)[..., None])
                    y.append(label)
    model = _fit(keras.Sequential([keras.Input((12, 12, 1)), keras.layers.Rescaling(1 / 255), keras.layers.Flatten(),
                                   keras.layers.Dense(3, activation="softmax")]),
                 type("Split", (), {"x_train": np.array(x), "y_train": np.array(y)}), scale=1.0)
    model.save(tmp_path / "gray12.keras")
    result = invoke("build", "--data-dir", tmp_path / "folder", "--keras-model", tmp_path / "gray12.keras",
                    "--no-benchmark", "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    preprocess = json.loads((tmp_path / "run" / "metadata.json").read_text())["preprocess"]
    assert (preprocess["height"], preprocess["width"], preprocess["channels"]) == (12, 12, 1)
    evaluation = json.loads((tmp_path / "run" / "evaluation.json").read_text())["variants"]
    assert evaluation["fp32"]["accuracy"] > 0.9, evaluation
    # Another --image-size than the model's: the way out is the size, not another --model.
    result = invoke("build", "--data-dir", tmp_path / "folder", "--keras-model", tmp_path / "gray12.keras",
                    "--image-size", "16x16", "--no-benchmark", "--out", tmp_path / "run16")
    assert result.exit_code == 1 and "--model" not in result.output, result.output
    assert "drop --image-size (a folder is decoded to the model's own size) or pass --image-size 12x12" in result.output
