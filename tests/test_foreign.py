"""Models edgepipe did not make (issue 19): each built here the way a third party builds them.

A Keras model trained on raw 0..255 pixels with no Rescaling layer (MLPerf Tiny's ResNet-8), a legacy
tf.keras 2 .h5 (MLPerf's VWW), quantized .tflite files with no metadata.json (Coral's uint8 models),
TFLite metadata with labels, a model whose batch is fixed at 1, and an image folder sorted by class.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cli import main

REPO = Path(__file__).resolve().parent.parent
RUNNER = REPO / "device" / "runner.py"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def runner(*args, timeout=120):
    return subprocess.run([sys.executable, str(RUNNER), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def error_line(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output, result.output
    errors = [ln for ln in result.output.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1, result.output
    return errors[0]


@pytest.fixture(scope="module")
def digits():
    from pipeline.data import load_dataset

    return load_dataset("digits", seed=0)


def _mlp(batch_size=None):
    import keras

    # BatchNormalization makes the model depend on the scale of its input, as ResNet-8's does: its moving
    # statistics are those of the range it was trained on, and another range scores at chance.
    return keras.Sequential([keras.Input((28, 28, 1), batch_size=batch_size), keras.layers.Flatten(),
                             keras.layers.Dense(32), keras.layers.BatchNormalization(), keras.layers.ReLU(),
                             keras.layers.Dense(10, activation="softmax")])


def _fit(model, digits, scale, offset, epochs=15):
    import keras

    keras.utils.set_random_seed(0)
    model.compile(optimizer=keras.optimizers.Adam(0.001), loss="sparse_categorical_crossentropy")
    model.fit(digits.x_train.astype(np.float32) * scale + offset, digits.y_train, epochs=epochs, batch_size=64,
              verbose=0)
    return model


@pytest.fixture(scope="module")
def raw_model(tmp_path_factory, digits):
    """Trained on raw 0..255 pixels, no Rescaling layer: MLPerf Tiny's ResNet-8 in small."""
    path = tmp_path_factory.mktemp("raw") / "raw.keras"
    _fit(_mlp(), digits, 1.0, 0.0).save(path)
    return path


@pytest.fixture(scope="module")
def raw_runs(tmp_path_factory, raw_model):
    """The raw-pixel model built with the range detected, with --input-range 0,1 given, and with the
    right --input-range 0,255 given (the issue's TFLite Micro case)."""
    tmp = tmp_path_factory.mktemp("raw-runs")
    out = {}
    for name, extra in (("detected", []), ("given", ["--input-range", "0,1"]), ("right", ["--input-range", "0,255"])):
        result = invoke("build", "--keras-model", raw_model, "--dataset", "digits", "--no-benchmark",
                        "--calibration-samples", "100", *extra, "--out", tmp / name)
        assert result.exit_code == 0, result.output
        out[name] = (tmp / name, result.output)
    return out


@pytest.fixture(scope="module")
def eval_npz(tmp_path_factory, digits):
    path = tmp_path_factory.mktemp("npz") / "test.npz"
    np.savez(path, x=digits.x_test[:300], y=digits.y_test[:300])
    return path


# ---------------------------------------------------------------- item 2: the input range of a user's model

def test_raw_pixel_model_range_is_detected_said_and_recorded(raw_runs):
    run, output = raw_runs["detected"]
    line = next(ln for ln in output.splitlines() if ln.startswith("input range:"))
    assert line.startswith("input range: 0,255, detected:") and "0,1" in line and "-1,1" in line, line
    manifest = json.loads((run / "manifest.json").read_text())
    chosen = manifest["input_range"]
    assert chosen["range"] == "0,255" and chosen["source"] == "detected"
    assert chosen["scores"]["0,255"] > 0.7 > chosen["scores"]["0,1"] + 0.3
    assert json.loads((run / "metadata.json").read_text())["preprocess"]["scale"] == 1.0
    evaluation = json.loads((run / "evaluation.json").read_text())
    assert evaluation["variants"]["fp32"]["accuracy"] > 0.7 and evaluation["variants"]["int8"]["accuracy"] > 0.7


def test_range_detection_scores_images_from_the_whole_split():
    """A split read from class folders is in class order: scored on its first images only, a model that answers one
    class for everything looked 100% right (a search's saturated ResNet scored 98% under 0-255, 10% on test)."""
    import keras

    from pipeline.foreign import detect_input_range

    inputs = keras.Input((4, 4, 1))
    out = keras.layers.Dense(10, kernel_initializer="zeros", bias_initializer=keras.initializers.Constant(
        [1.0] + [0.0] * 9))(keras.layers.Flatten()(inputs))
    always_first = keras.Model(inputs, keras.layers.Softmax()(out))
    y = np.repeat(np.arange(10), 600)  # 6,000 images, class by class
    x = np.zeros((len(y), 4, 4, 1), np.uint8)
    scores = detect_input_range(always_first, x, y, None)["scores"]
    assert all(score == pytest.approx(0.1, abs=0.01) for score in scores.values()), scores


def test_given_range_at_chance_is_warned_with_the_numbers(raw_runs):
    run, output = raw_runs["given"]
    warning = [ln for ln in output.splitlines() if ln.startswith("warning: --input-range 0,1")]
    chosen = json.loads((run / "manifest.json").read_text())["input_range"]
    assert chosen["source"] == "given" and chosen["warning"] in warning[0]
    assert len(warning) == 1 and f"0,255 scores {100 * chosen['scores']['0,255']:.1f}%" in warning[0], output
    assert f"scores {100 * chosen['scores']['0,1']:.1f}%" in warning[0] and "pass --input-range 0,255" in warning[0]


# ---------------------------------------------------------------- item 6: the user's model name, the range shown

def test_user_model_name_and_range_in_metadata_report_and_compare(raw_runs):
    run, _ = raw_runs["detected"]
    assert json.loads((run / "metadata.json").read_text())["model"] == "raw.keras"
    report = (run / "report.md").read_text()
    assert "raw.keras on digits, input pixels scaled to 0..255 (detected)" in report
    assert "mnist-cnn" not in report
    result = invoke("compare", run, raw_runs["given"][0], "--format", "json")
    assert result.exit_code == 0, result.output
    runs = json.loads(result.output)["runs"]
    assert [(r["model"], r["input_range"]) for r in runs] == [("raw.keras", "0,255"), ("raw.keras", "0,1")]
    text = invoke("compare", run, raw_runs["given"][0])
    assert text.exit_code == 0 and "0..255" in text.output and "raw.keras" in text.output, text.output


# ---------------------------------------------------------------- item 1: the TFLM export keeps the run's range

def test_tflm_export_uses_the_runs_range_and_prints_both_figures(raw_runs, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(raw_runs["right"][0], run)
    result = invoke("export", run, "--target", "tflm", "--out", tmp_path / "x")
    assert result.exit_code == 0, result.output
    line = next(ln for ln in result.output.splitlines() if "accuracy under TFLite Micro" in ln)
    summary = json.loads((run / "tflm.json").read_text())
    a = summary["accuracy"]
    assert f"{100 * a['accuracy_tflm']:.2f}%" in line and f"{100 * a['run_accuracy']:.2f}%" in line
    assert "converted again" in summary["conversion"]  # calibrated anew, so the range mattered
    assert a["accuracy_tflm"] > 0.7 and abs(a["accuracy_tflm"] - a["run_accuracy"]) < 0.03


def test_tflm_export_refuses_when_it_disagrees_with_the_run(raw_runs, tmp_path):
    """A run whose recorded preprocessing is not what its int8 was made with: calibrated on the wrong
    values, TFLite Micro scores far from the run's int8, and the export refuses with both figures."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(raw_runs["right"][0], run)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["preprocess"]["scale"] = 1 / 255
    (run / "manifest.json").write_text(json.dumps(manifest))
    result = invoke("export", run, "--target", "tflm", "--out", tmp_path / "x")
    line = error_line(result)
    assert "TFLite Micro model scores" in line and "the run's int8" in line and "pp apart" in line
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.tar.gz").exists()
    assert not (run / "tflm.json").exists()


# ---------------------------------------------------------------- item 7: legacy tf.keras 2 files

def _legacy_h5(path: Path, custom: bool = False) -> Path:
    import tf_keras

    layers = [tf_keras.Input((28, 28, 1)), tf_keras.layers.Conv2D(4, 3), tf_keras.layers.DepthwiseConv2D(3)]
    if custom:
        class Doubling(tf_keras.layers.Layer):
            def call(self, x):
                return 2 * x

        layers.append(Doubling())
    layers += [tf_keras.layers.Flatten(), tf_keras.layers.Dense(10, activation="softmax")]
    tf_keras.Sequential(layers).save(path)
    return path


def test_legacy_h5_is_read_with_tf_keras_and_rebuilt(tmp_path):
    h5 = _legacy_h5(tmp_path / "vww_like.h5")
    result = invoke("convert", h5, "--dataset", "digits", "--quantize", "fp32", "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    said = next(ln for ln in result.output.splitlines() if ln.startswith("model: vww_like.h5"))
    assert "tf_keras" in said and "DepthwiseConv2D(groups)" in said and "outputs agree" in said
    assert (tmp_path / "run" / "model_fp32.tflite").is_file()
    # untrained: every range scores at chance, so 0..1 is assumed and said to be a guess
    assert "warning: no input range is clearly best" in result.output and "assuming 0,1" in result.output
    # the model is read before the data: its line comes first
    lines = result.output.splitlines()
    assert lines.index(said) < next(i for i, ln in enumerate(lines) if ln.startswith("data:"))


def test_unreadable_legacy_h5_is_one_line_before_the_data(tmp_path):
    h5 = _legacy_h5(tmp_path / "custom.h5", custom=True)
    result = invoke("convert", h5, "--dataset", "digits", "--out", tmp_path / "run")
    line = error_line(result)
    assert "HDF5 model" in line and "re-save it" in line and "model.save('model.keras')" in line, line
    assert not any(ln.startswith("data:") for ln in result.output.splitlines())
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- items 3-5: the runner on foreign .tflite files

def _tflite(model, calibration: np.ndarray | None, io_type=None) -> bytes:
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if calibration is not None:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([calibration[i:i + 1]] for i in range(len(calibration)))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = io_type
        converter.inference_output_type = io_type
    return converter.convert()


@pytest.fixture(scope="module")
def foreign_models(tmp_path_factory, digits, raw_model):
    """Quantized models as Coral ships them (input (pixel - 128) / 128, uint8 scale 1/128 zero point 128),
    the same with int8 input, the float raw-pixel model, none with a metadata.json."""
    import keras
    import tensorflow as tf

    tmp = tmp_path_factory.mktemp("foreign")
    centred = _fit(_mlp(), digits, 1 / 128, -1.0)
    # Calibration covering pixels 0 and 255 gives the input exactly scale 1/128 and zero point 128 (uint8).
    calibration = np.concatenate([np.zeros((1, 28, 28, 1)), np.full((1, 28, 28, 1), 255.0),
                                  digits.x_train[:100].astype(np.float32)]).astype(np.float32) / 128 - 1
    paths = {}
    for name, io_type in (("uint8", tf.uint8), ("int8", tf.int8)):
        paths[name] = tmp / f"coral_{name}.tflite"
        paths[name].write_bytes(_tflite(centred, calibration, io_type))
    paths["float"] = tmp / "raw_float.tflite"
    paths["float"].write_bytes(_tflite(keras.models.load_model(raw_model), None))
    return paths


def test_quantized_input_takes_the_raw_pixel(foreign_models, eval_npz):
    from device.core import Model

    u8 = Model(foreign_models["uint8"], verify=False).input
    assert (u8.dtype.name, u8.scale, u8.zero_point) == ("uint8", 1 / 128, 128)
    for name, said in (("uint8", "uint8 input takes the raw pixel"), ("int8", "int8 input takes the pixel - 128")):
        proc = runner("eval", "--model", foreign_models[name], eval_npz, "--json")
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["accuracy"] > 0.8, (name, proc.stdout[:200])
        assert said in proc.stderr and "--input-range" in proc.stderr, proc.stderr


def test_float_input_says_the_assumed_range_and_takes_input_range(foreign_models, eval_npz):
    proc = runner("eval", "--model", foreign_models["float"], eval_npz, "--json")
    assert proc.returncode == 0, proc.stderr
    assert "float32 input: assuming pixels scaled to 0..1" in proc.stderr and "--input-range" in proc.stderr
    assert json.loads(proc.stdout)["accuracy"] < 0.3
    proc = runner("eval", "--model", foreign_models["float"], eval_npz, "--input-range", "0,255", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["accuracy"] > 0.7 and "input range 0,255 as given" in proc.stderr


def test_tflite_metadata_gives_normalization_and_labels(foreign_models, eval_npz, digits, tmp_path):
    from pipeline.metadata import embed

    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    model = tmp_path / "with_metadata.tflite"
    model.write_bytes(embed(foreign_models["float"].read_bytes(), name="raw", description="raw", version="1",
                            preprocess={"scale": 1.0, "offset": 0.0, "labels": names}))
    proc = runner("eval", "--model", model, eval_npz, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["accuracy"] > 0.7
    assert "from the model's TFLite metadata" in proc.stderr and "10 labels from" in proc.stderr
    from PIL import Image

    Image.fromarray(digits.x_test[0][..., 0]).save(tmp_path / "a.png")
    proc = runner("classify", "--model", model, tmp_path / "a.png", "--json")
    assert proc.returncode == 0, proc.stderr
    assert all(t["label"] == names[t["index"]] for t in json.loads(proc.stdout)["results"][0]["top"])


def test_labels_file_and_no_labels(foreign_models, digits, tmp_path):
    from PIL import Image

    Image.fromarray(digits.x_test[0][..., 0]).save(tmp_path / "a.png")
    proc = runner("classify", "--model", foreign_models["uint8"], tmp_path / "a.png", "--json")
    assert proc.returncode == 0 and "no labels in the model" in proc.stderr and "--labels FILE" in proc.stderr
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"digit {i}\n" for i in range(10)))
    proc = runner("classify", "--model", foreign_models["uint8"], tmp_path / "a.png", "--labels", labels, "--json")
    assert proc.returncode == 0, proc.stderr
    assert all(t["label"] == f"digit {t['index']}" for t in json.loads(proc.stdout)["results"][0]["top"])
    labels.write_text("a\nb\n")
    proc = runner("classify", "--model", foreign_models["uint8"], tmp_path / "a.png", "--labels", labels)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith("error: --labels: 2 labels")


def test_fixed_batch_model_runs_one_image_at_a_time(digits, eval_npz, tmp_path):
    model = _fit(_mlp(batch_size=1), digits, 1 / 255, 0.0, epochs=5)
    path = tmp_path / "batch1.tflite"
    path.write_bytes(_tflite(model, None))
    from PIL import Image

    images = []
    for i in range(3):
        images.append(tmp_path / f"{i}.png")
        Image.fromarray(digits.x_test[i][..., 0]).save(images[-1])
    proc = runner("classify", "--model", path, *images, "--json")
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["results"]) == 3
    proc = runner("eval", "--model", path, eval_npz, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["n"] == 300 and json.loads(proc.stdout)["accuracy"] > 0.5


# ---------------------------------------------------------------- item 10: samples across classes, class folders

def test_samples_across_classes_and_classify_on_class_folders(tmp_path):
    import keras
    from PIL import Image

    rng = np.random.default_rng(0)
    data = tmp_path / "shapes"
    for split, count in (("train", 12), ("test", 10)):
        for c, name in enumerate(("circle", "square", "triangle")):
            (data / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 80, (32, 32, 3)).astype(np.uint8) + np.uint8(60 * c)
                Image.fromarray(pixels).save(data / split / name / f"{i}.png")
    model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Flatten(),
                              keras.layers.Dense(3, activation="softmax")])
    model.save(tmp_path / "shapes.keras")
    result = invoke("convert", tmp_path / "shapes.keras", "--dataset", "folder", "--data-dir", data,
                    "--quantize", "fp32", "--input-range", "0,1", "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    samples = sorted(p.stem.split("_", 1)[1] for p in (tmp_path / "run" / "samples").glob("*.png"))
    assert set(samples) == {"circle", "square", "triangle"} and len(samples) == 8, samples
    # The labelled set a board evaluates on is across classes too (its first images were all circles), and
    # says which of the test split's images (read class by class) it holds.
    with np.load(tmp_path / "run" / "samples" / "eval.npz") as ev:
        assert ev["y"][:3].tolist() == [0, 1, 2] and sorted(ev["index"].tolist()) == list(range(30))
        assert np.array_equal(ev["y"], np.repeat([0, 1, 2], 10)[ev["index"]])

    proc = runner("classify", "--model", tmp_path / "run" / "model_fp32.tflite", data / "test")
    assert proc.returncode == 1
    line = proc.stderr.strip().splitlines()[-1]
    assert "holds 3 folder(s) and no image files" in line and f"{data / 'test' / 'circle'}" in line, proc.stderr
    proc = runner("classify", "--model", tmp_path / "run" / "model_fp32.tflite", data / "test" / "circle")
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------- the MLPerf comparison needs MLPerf's files

def test_mlperf_compare_refuses_cleanly_without_the_files(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "mlperf_compare.py"), "--h5",
                           tmp_path / "pretrainedResnet.h5", "--out", tmp_path / "run"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr
    line, = proc.stderr.strip().splitlines()
    assert line.startswith("error: --h5 ") and "pretrainedResnet_quant.tflite" in line and "mlcommons/tiny" in line
    assert not (tmp_path / "run").exists()
