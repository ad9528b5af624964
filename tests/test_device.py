"""The device runner: parity with Keras and the pipeline, independence from TensorFlow, bad input."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from device import core, integrity

REPO = Path(__file__).resolve().parent.parent
RUNNER = REPO / "device" / "runner.py"


def run_runner(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, str(RUNNER), *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=120)


def _error_lines(stderr: str) -> list[str]:
    # LiteRT's C++ logging may add an INFO line about XNNPACK; the runner's own message is one line.
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def test_fp32_runner_matches_keras(mnist_run, mnist_test):
    import keras

    x, _ = mnist_test
    keras_model = keras.models.load_model(mnist_run / "model.keras")
    model = core.Model(mnist_run / "model_fp32.tflite")
    ours = model.predict(x[:200])
    theirs = keras_model.predict(core.normalize(x[:200], model.preprocess), verbose=0)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_int8_accuracy_through_runner_equals_pipeline_report(mnist_run, mnist_test, tmp_path):
    x, y = mnist_test
    np.savez(tmp_path / "test.npz", x=x, y=y)
    proc = run_runner("eval", tmp_path / "test.npz", "--model", mnist_run / "model_int8.tflite", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    evaluation = json.loads((mnist_run / "evaluation.json").read_text())
    assert out["n"] == len(y)
    assert out["accuracy"] == evaluation["variants"]["int8"]["accuracy"]
    assert out["accuracy"] > 0.8
    assert sum(map(sum, out["confusion"])) == len(y)


def test_int8_io_is_quantized_from_the_model(mnist_run):
    info = core.Model(mnist_run / "model_int8.tflite").info()
    assert info["input"]["dtype"] == "int8" and info["output"]["dtype"] == "int8"
    # [0,1] inputs over int8: scale 1/255 and zero point -128; softmax outputs: 1/256 and -128.
    assert info["input"]["scale"] == pytest.approx(1 / 255, rel=1e-3) and info["input"]["zero_point"] == -128
    assert info["output"]["scale"] == pytest.approx(1 / 256, rel=1e-3) and info["output"]["zero_point"] == -128


def test_quantize_round_trip_uses_tensor_params():
    spec = core.TensorSpec("t", 0, (1,), np.dtype("uint8"), 0.5, 10)
    q = core.quantize(np.array([-100.0, 0.0, 1.0, 1000.0], np.float32), spec)
    assert q.dtype == np.uint8 and q.tolist() == [0, 10, 12, 255]
    assert core.dequantize(q, spec).tolist() == [-5.0, 0.0, 1.0, 122.5]


def test_device_runs_with_tensorflow_unimportable(mnist_run, tmp_path):
    blocker = tmp_path / "block"
    (blocker / "tensorflow").mkdir(parents=True)
    (blocker / "tensorflow" / "__init__.py").write_text("raise ImportError('TensorFlow is blocked in this test')\n")
    img = tmp_path / "digit.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(img)
    env = {**os.environ, "PYTHONPATH": str(blocker)}
    proc = run_runner("classify", "--json", "--model", mnist_run / "model_int8.tflite", img, env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["results"][0]["top"][0]["label"] in [str(i) for i in range(10)]
    blocked = subprocess.run([sys.executable, "-c", "import tensorflow"], env=env, capture_output=True, text=True)
    assert "blocked" in blocked.stderr  # the block works, so the runner really ran without TensorFlow
    check = subprocess.run([sys.executable, "-c", "import device.runner, sys; "
                            "print(sorted(m for m in sys.modules "
                            "if m.split('.')[0] in ('tensorflow','pipeline','click','keras')))"],
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert check.returncode == 0 and check.stdout.strip() == "[]", check.stdout + check.stderr


def _confident_example(run, x, y, prefer: int) -> int:
    """A test image that the int8 model gets right with a clear margin, of class `prefer` when there is one,
    so these tests check the image handling, not the model's accuracy (a 2-epoch model on the 8x8 fallback
    digits is sure of some classes only)."""
    probs = core.Model(run / "model_int8.tflite").predict(x)
    top2 = np.sort(probs, axis=1)[:, -2:]
    confident = np.flatnonzero((probs.argmax(axis=1) == y) & (top2[:, 1] - top2[:, 0] > 0.5))
    if not len(confident):
        pytest.fail("no confidently classified image in the test split")
    preferred = confident[y[confident] == prefer]
    return int(preferred[0] if len(preferred) else confident[0])


def test_classify_real_digit_any_size_and_mode(mnist_run, mnist_test, tmp_path):
    x, y = mnist_test
    idx = _confident_example(mnist_run, x, y, 7)
    big = Image.fromarray(x[idx, ..., 0]).resize((56, 56)).convert("RGB")
    big.save(tmp_path / "digit.jpg", quality=95)
    proc = run_runner("classify", "--model", mnist_run / "model_int8.tflite", tmp_path / "digit.jpg", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)["results"][0]
    assert result["image"].endswith("digit.jpg") and result["top"][0]["label"] == str(y[idx])


@pytest.mark.parametrize("mode", ["P", "RGBA", "LA", "I;16"])
def test_unusual_image_modes_are_converted(mnist_run, mnist_test, tmp_path, mode):
    x, y = mnist_test
    idx = _confident_example(mnist_run, x, y, 3)
    img = Image.fromarray(x[idx, ..., 0])
    if mode == "I;16":
        img = Image.fromarray(x[idx, ..., 0].astype(np.uint16) * 257)
    else:
        img = img.convert(mode)
    path = tmp_path / f"digit_{mode.replace(';', '')}.png"
    img.save(path)
    model = core.Model(mnist_run / "model_int8.tflite")
    assert model.classify([path])[0]["top"][0]["label"] == str(y[idx])


def _bad_image_cases(tmp_path: Path, good_png: bytes) -> dict[str, Path]:
    cases = {"not an image": b"hello, I am text\n", "truncated image": good_png[: len(good_png) // 2],
             "empty file": b""}
    paths = {}
    for name, data in cases.items():
        p = tmp_path / (name.replace(" ", "_") + ".png")
        p.write_bytes(data)
        paths[name] = p
    bomb = tmp_path / "bomb.png"
    Image.new("L", (12000, 12000)).save(bomb)  # 144 Mpx, above the runner's limit
    paths["decompression bomb"] = bomb
    return paths


def test_bad_images_give_one_line_errors(mnist_run, tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(good)
    for name, path in _bad_image_cases(tmp_path, good.read_bytes()).items():
        proc = run_runner("classify", "--model", mnist_run / "model_int8.tflite", path)
        assert proc.returncode == 1, (name, proc.stderr)
        assert "Traceback" not in proc.stderr, (name, proc.stderr)
        err = _error_lines(proc.stderr)
        assert len(err) == 1 and path.name in err[0], (name, proc.stderr)


def test_bad_models_give_one_line_errors(mnist_run, tmp_path):
    good = (mnist_run / "model_int8.tflite").read_bytes()
    cases = {"empty.tflite": b"", "truncated.tflite": good[:12], "text.tflite": b"not a model at all" * 10,
             "png.tflite": (mnist_run / "samples" / sorted(os.listdir(mnist_run / "samples"))[0]).read_bytes(),
             "half.tflite": good[: len(good) // 2]}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        proc = run_runner("info", "--model", tmp_path / name)
        assert proc.returncode == 1, (name, proc.stdout, proc.stderr)
        err = _error_lines(proc.stderr)
        assert "Traceback" not in proc.stderr and len(err) == 1 and name in err[0], (name, proc.stderr)
    proc = run_runner("info", "--model", tmp_path / "missing.tflite")
    assert proc.returncode == 2 and "missing.tflite: no such model file" in proc.stderr  # usage: README's table


def test_sha256_mismatch_is_refused(mnist_run, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(mnist_run, folder)
    model = folder / "model_int8.tflite"
    data = bytearray(model.read_bytes())
    data[-1] ^= 0xFF
    model.write_bytes(bytes(data))
    proc = run_runner("info", "--model", model)
    assert proc.returncode == 1 and "sha256" in proc.stderr and "does not match" in proc.stderr
    proc = run_runner("verify", folder, "--json")
    assert proc.returncode == 1
    assert any("model_int8.tflite" in p for p in json.loads(proc.stdout)["problems"])


def test_npz_without_x_y(mnist_run, tmp_path):
    np.savez(tmp_path / "bad.npz", images=np.zeros((2, 28, 28), np.uint8))
    (tmp_path / "garbage.npz").write_bytes(b"PK\x03\x04 not really")
    np.savez(tmp_path / "labels.npz", x=np.zeros((2, 28, 28), np.uint8), y=np.array([3, 10]))  # 10 classes: 0-9
    for name in ("bad.npz", "garbage.npz", "labels.npz"):
        proc = run_runner("eval", tmp_path / name, "--model", mnist_run / "model_int8.tflite")
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, (name, proc.stderr)
        assert name in proc.stderr, (name, proc.stderr)
    assert "labels range from 3 to 10" in proc.stderr


def test_model_without_metadata_warns_and_infers(mnist_run, tmp_path):
    lone = tmp_path / "lone.tflite"
    shutil.copy(mnist_run / "model_int8.tflite", lone)
    with pytest.warns(UserWarning, match="no metadata.json"):
        model = core.Model(lone)
    assert (model.preprocess["height"], model.preprocess["width"], model.preprocess["channels"]) == (28, 28, 1)


def test_bench_reports_latency_and_memory(mnist_run):
    proc = run_runner("bench", "--model", mnist_run / "model_int8.tflite", "--runs", "50", "--warmup", "5",
                      "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    lat = out["latency"]
    assert lat["n"] == 50 and len(out["samples_ms"]) == 50 and out["warmup"]["n"] == 5
    assert lat["min_ms"] <= lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"] <= lat["max_ms"]
    assert lat["p50_ms"] == pytest.approx(float(np.median(out["samples_ms"])))
    assert out["peak_rss_mb"] > 1 and out["interpreter"]["name"] == "ai_edge_litert"
    off = run_runner("bench", "--model", mnist_run / "model_int8.tflite", "--runs", "5", "--no-xnnpack", "--json")
    assert off.returncode == 0 and json.loads(off.stdout)["xnnpack"] is False


def test_bundle_unpacks_verifies_and_classifies(mnist_run, tmp_path):
    from pipeline.ship.bundle import make_bundle

    archive = make_bundle(mnist_run, tmp_path / "b.tar.gz")
    dest = tmp_path / "pi"
    dest.mkdir()
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        tar.extractall(dest, filter="data")
    for required in ("model_int8.tflite", "model_fp32.tflite", "metadata.json", "labels.txt", "requirements.txt",
                     "README.md", "device/runner.py", "device/core.py", "samples/eval.npz"):
        assert required in names, required
    reqs = (dest / "requirements.txt").read_text()
    assert 'tflite-runtime==2.14.0; python_version < "3.10" or platform_machine == "armv7l"' in reqs
    # Run from inside the unpacked bundle with no repository on the path: the default model is used.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    verify = subprocess.run([sys.executable, "device/runner.py", "verify"], cwd=dest, env=env,
                            capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    pngs = sorted(p.name for p in (dest / "samples").glob("*.png"))
    proc = subprocess.run([sys.executable, "device/runner.py", "classify", "--json", *[f"samples/{p}" for p in pngs]],
                          cwd=dest, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)["results"]
    correct = sum(r["top"][0]["label"] == Path(r["image"]).stem.split("_")[1] for r in results)
    assert len(results) == len(pngs) >= 5 and correct >= len(pngs) - 2


def test_bundle_with_escaping_paths_is_refused(tmp_path):
    import io

    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(core.DeviceError, match="outside"):
        integrity.extract_bundle(evil, tmp_path / "dest")
    assert not (tmp_path / "escaped.txt").exists()


def test_classify_cold_start_imports_only_what_one_png_needs(mnist_run, tmp_path):
    """The runner's classify of one PNG, then of a folder: no Pillow plugin but PNG's (and the few Pillow
    preloads), no numpy.ma (numpy.median's NaN check), no importlib.metadata, no device.board."""
    digit = tmp_path / "digits" / "one.png"
    digit.parent.mkdir()
    Image.fromarray(np.full((28, 28), 200, np.uint8)).save(digit)
    (tmp_path / "digits" / "notes.txt").write_text("not an image")
    for target in (digit, digit.parent):
        proc = subprocess.run([sys.executable, "-X", "importtime", str(RUNNER), "classify", str(target), "--model",
                               str(mnist_run / "model_int8.tflite"), "--json"], capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert [r["image"] for r in json.loads(proc.stdout)["results"]] == [str(digit)]
        modules = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
        plugins = {m for m in modules if m.startswith("PIL.") and m.endswith("ImagePlugin")}
        assert plugins <= {"PIL.PngImagePlugin", "PIL.BmpImagePlugin", "PIL.GifImagePlugin", "PIL.JpegImagePlugin",
                           "PIL.PpmImagePlugin"}, plugins
        assert not modules & {"numpy.ma", "importlib.metadata", "device.board"}, target


def test_border_median_is_the_median():
    from device.images import _background

    rng = np.random.default_rng(0)
    for shape in ((28, 28), (5, 7, 3), (2, 2)):
        pixels = rng.integers(0, 256, shape).astype(np.uint8)
        g = pixels.mean(axis=-1) if pixels.ndim == 3 else pixels
        border = np.concatenate([g[0], g[-1], g[1:-1, 0], g[1:-1, -1]])
        assert _background(pixels) == pytest.approx(float(np.median(border)))


# ---------------------------------------------------------------- small models as third parties export them

def _brightness(x):
    """Class 0 ("bright") when the mean input value is above 128, else class 1: says what the model was fed."""
    import tensorflow as tf

    mean = tf.reduce_mean(tf.cast(x, tf.float32), axis=[1, 2, 3])
    return tf.nn.softmax(tf.stack([mean / 10.0, tf.fill(tf.shape(mean), 12.8)], axis=1))


def _log_of_mean(x):
    """log(mean input), 0: minus infinity for a black image."""
    import tensorflow as tf

    mean = tf.reduce_mean(x, axis=[1, 2, 3])
    return tf.stack([tf.math.log(mean), tf.zeros_like(mean)], axis=1)


def _with_nan_input_scale(flatbuffer: bytes) -> bytes:
    """The model with a NaN quantization scale on its input, as a crafted file can carry."""
    import flatbuffers
    from tensorflow.lite.python import schema_py_generated as schema

    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(flatbuffer, 0))
    quantization = schema.QuantizationParametersT()
    quantization.scale, quantization.zeroPoint = [float("nan")], [0]
    model.subgraphs[0].tensors[model.subgraphs[0].inputs[0]].quantization = quantization
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


@pytest.fixture(scope="module")
def odd_models(tmp_path_factory) -> dict[str, Path]:
    """8x8 models with no metadata.json, converted from tf.functions (a second or two each): a uint8 input the
    model casts itself (no quantization), height and width left open, a float input, one that can output
    minus infinity, and the uint8 one with a NaN input scale."""
    import tensorflow as tf

    folder = tmp_path_factory.mktemp("odd-models")
    made = {}
    for name, fn, spec in (("uint8", _brightness, tf.TensorSpec([None, 8, 8, 1], tf.uint8)),
                           ("dynamic", _brightness, tf.TensorSpec([None, None, None, 3], tf.float32)),
                           ("float", _brightness, tf.TensorSpec([None, 8, 8, 1], tf.float32)),
                           ("log", _log_of_mean, tf.TensorSpec([None, 8, 8, 1], tf.float32))):
        function = tf.function(fn, input_signature=[spec])
        converter = tf.lite.TFLiteConverter.from_concrete_functions([function.get_concrete_function()], function)
        made[name] = folder / f"{name}.tflite"
        made[name].write_bytes(converter.convert())
    made["nan_scale"] = folder / "nan_scale.tflite"
    made["nan_scale"].write_bytes(_with_nan_input_scale(made["uint8"].read_bytes()))
    return made


def _grey(path: Path, value: int, size=(8, 8)) -> Path:
    Image.fromarray(np.full(size, value, np.uint8)).save(path)
    return path


def test_integer_input_without_quantization_takes_raw_pixels(odd_models, tmp_path):
    """A uint8 input the model casts itself took pixel / 255 truncated to 0 or 1: every image black."""
    bright, dark = _grey(tmp_path / "bright.png", 200), _grey(tmp_path / "dark.png", 30)
    proc = run_runner("classify", "--model", odd_models["uint8"], bright, dark, "--json")
    assert proc.returncode == 0, proc.stderr
    assert [r["top"][0]["index"] for r in json.loads(proc.stdout)["results"]] == [0, 1]
    assert "uint8 input without quantization takes the raw pixel" in proc.stderr
    assert run_runner("classify", "--model", odd_models["uint8"], bright, "--input-range", "0,255", "--json",
                      ).returncode == 0
    for given in ("0,1", "-1,1"):  # fractions (and -1 for uint8) would be truncated or wrapped: refused
        proc = run_runner("classify", "--model", odd_models["uint8"], bright, f"--input-range={given}")
        err = _error_lines(proc.stderr)
        assert proc.returncode == 1 and proc.stdout == "" and "Traceback" not in proc.stderr, proc.stderr
        assert len(err) == 1 and f"--input-range {given} gives values" in err[0] and "whole numbers" in err[0]
        assert "drop --input-range" in err[0] and "warning:" not in proc.stderr


def test_quantize_never_truncates_an_integer_input():
    spec = core.TensorSpec("t", 0, (1,), np.dtype("uint8"), 0.0, 0)
    assert core.quantize(np.array([0.0, 3.0, 255.0], np.float32), spec).tolist() == [0, 3, 255]
    for values in ([0.5], [256.0], [-1.0], [np.nan]):
        with pytest.raises(core.DeviceError, match="not all whole numbers from 0 to 255"):
            core.quantize(np.array(values, np.float32), spec)


def test_model_without_fixed_input_size_is_refused(odd_models, tmp_path):
    """Height and width left open read as 1x1: every image was shrunk to one pixel and classified."""
    image = Image.fromarray(np.full((8, 8, 3), 200, np.uint8))
    image.save(tmp_path / "a.png")
    for args in (("classify", tmp_path / "a.png"), ("info",)):
        proc = run_runner(*args, "--model", odd_models["dynamic"])
        err = _error_lines(proc.stderr)
        assert proc.returncode == 1 and proc.stdout == "" and "Traceback" not in proc.stderr, proc.stderr
        assert len(err) == 1 and "input shape [-1, -1, -1, 3] has no fixed size" in err[0], err
        assert "export the model with a fixed input size" in err[0]


def test_npz_that_is_an_npy_or_has_misshapen_labels(odd_models, tmp_path):
    """Each was a traceback: an .npy under an .npz name, 'y' a single value, 'y' of shape (4, 2, 3)."""
    x = np.zeros((4, 8, 8, 1), np.uint8)
    np.save(tmp_path / "array.npy", x)
    (tmp_path / "array.npy").rename(tmp_path / "array.npz")
    np.savez(tmp_path / "scalar.npz", x=x[:1], y=np.array(3))
    np.savez(tmp_path / "cube.npz", x=x, y=np.zeros((4, 2, 3), np.int64))
    # Cast to int64 these wrapped around: the message read "labels range from -1".
    np.savez(tmp_path / "huge.npz", x=x, y=np.array([0, 1, 1, 2 ** 64 - 1], np.uint64))
    np.savez(tmp_path / "far.npz", x=x, y=np.array([0, 1, 1, 1e30]))
    for name, says in (("array.npz", "one array (a .npy file), not an .npz archive"),
                       ("scalar.npz", "'y' is a single value; expected one class index per image"),
                       ("cube.npz", "'y' has shape [4, 2, 3]; expected one class index per image, shape (N,)"),
                       ("huge.npz", "'y' holds values from 0 to 1.84467e+19; expected class indices from 0"),
                       ("far.npz", "'y' holds values from 0 to 1e+30; expected class indices from 0")):
        proc = run_runner("eval", tmp_path / name, "--model", odd_models["uint8"])
        err = _error_lines(proc.stderr)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr and len(err) == 1, (name, proc.stderr)
        assert err[0].startswith(f"error: {tmp_path / name}: {says}"), (name, err)


GOOD_PREPROCESS = {"height": 8, "width": 8, "channels": 1, "scale": 1.0, "offset": 0.0, "labels": ["bright", "dark"]}


@pytest.mark.parametrize("damage, says", [
    (lambda m: m["preprocess"].update(resize="foo"), "preprocess 'resize' is 'foo', expected one of nearest, box"),
    (lambda m: m["preprocess"].update(scale="x"), "preprocess 'scale' is 'x', expected a number, or one per channel"),
    (lambda m: m["preprocess"].pop("height"), "preprocess 'height' is missing, expected a whole number of pixels"),
    (lambda m: m["preprocess"].update(labels="a b"), "preprocess 'labels' is 'a b', expected a list of label names"),
    (lambda m: m.update(models=[1]), "'models' is [1], expected an object naming each model file"),
])
def test_damaged_metadata_is_one_line_naming_it(odd_models, tmp_path, damage, says):
    """Each was a traceback in Pillow or numpy, or blamed the image (KeyError: 'height')."""
    meta = {"preprocess": dict(GOOD_PREPROCESS)}
    damage(meta)
    shutil.copy(odd_models["uint8"], tmp_path / "model.tflite")
    (tmp_path / "metadata.json").write_text(json.dumps(meta))
    _grey(tmp_path / "a.png", 200)
    for args in (("classify", "--model", tmp_path / "model.tflite", tmp_path / "a.png"), ("verify", tmp_path)):
        proc = run_runner(*args)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, (args[0], proc.stderr)
        said = (_error_lines(proc.stderr) if args[0] == "classify" else
                [line.strip()[2:] for line in proc.stdout.splitlines() if line.strip().startswith("- ")])
        assert len(said) == 1 and f"{tmp_path / 'metadata.json'}: {says}" in said[0], (args[0], proc.stdout, said)
        assert "a.png" not in said[0] and "rebuild it with `pipeline build`" in said[0]


def test_eval_keeps_every_class_when_labels_repeat(odd_models, tmp_path):
    """per_class was keyed by label: of two classes named "crane" (as in ImageNet), one's figures were lost."""
    x = np.stack([np.full((8, 8, 1), v, np.uint8) for v in (200, 210, 30)])
    np.savez(tmp_path / "eval.npz", x=x, y=np.array([0, 1, 1]))  # predicted: 0, 0, 1
    (tmp_path / "labels.txt").write_text("crane\ncrane\n")
    proc = run_runner("eval", tmp_path / "eval.npz", "--model", odd_models["uint8"], "--labels",
                      tmp_path / "labels.txt", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["per_class"] == {"crane (0)": 1.0, "crane (1)": 0.5}
    probs = np.eye(3, dtype=np.float32)
    # A label that reads like another's indexed name: every class takes its index, still one key each.
    assert list(core.score(probs, [0, 1, 2], ["a", "a", "a (1)"])["per_class"]) == ["a (0)", "a (1)", "a (1) (2)"]
    assert list(core.score(probs, [0, 1, 2], ["a", "b"])["per_class"]) == ["a", "b", "2"]


def _decoded(path: Path, channels: int = 1) -> np.ndarray:
    from device.images import read_image

    size = Image.open(path).size
    pixels, _ = read_image(path, {"height": size[1], "width": size[0], "channels": channels, "resize": "nearest"})
    return pixels[..., 0] if channels == 1 else pixels


def test_png_transparency_of_grey_and_rgb_images_is_flattened_onto_black(odd_models, tmp_path):
    """A tRNS chunk (one colour made transparent) in a grey or RGB PNG was ignored: only alpha images were
    flattened onto black, as documented for all."""
    grey = np.full((4, 6), 100, np.uint8)
    grey[:, :3] = 255
    Image.fromarray(grey).save(tmp_path / "grey.png", transparency=255)
    rgb = np.full((4, 6, 3), (10, 20, 30), np.uint8)
    rgb[:, :3] = 200
    Image.fromarray(rgb).save(tmp_path / "rgb.png", transparency=(200, 200, 200))
    assert Image.open(tmp_path / "grey.png").mode == "L" and Image.open(tmp_path / "rgb.png").mode == "RGB"
    assert _decoded(tmp_path / "grey.png").tolist() == [[0, 0, 0, 100, 100, 100]] * 4
    assert _decoded(tmp_path / "rgb.png", 3).tolist() == [[[0, 0, 0]] * 3 + [[10, 20, 30]] * 3] * 4
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(tmp_path / "clear.png", transparency=255)
    proc = run_runner("classify", "--model", odd_models["uint8"], tmp_path / "clear.png", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["results"][0]["top"][0]["index"] == 1, proc.stderr  # dark


def test_16_bit_images_scale_by_their_depth_not_their_brightest_pixel(tmp_path):
    """A 16-bit image whose pixels were all at most 255 was read as 8-bit: all 200 read as 200 (bright), and
    one pixel of 256 flipped the whole image to 0."""
    flat = np.full((2, 3), 200, np.uint16)
    Image.fromarray(flat).save(tmp_path / "flat.png")
    flat[0, 0] = 256
    Image.fromarray(flat).save(tmp_path / "one_brighter.png")
    Image.fromarray(np.arange(6, dtype=np.uint16).reshape(2, 3) * 257 * 40).save(tmp_path / "ramp.png")
    assert Image.open(tmp_path / "flat.png").mode == "I;16"
    assert _decoded(tmp_path / "flat.png").tolist() == [[1, 1, 1]] * 2  # 200 of 65535 is 0.78 of 255
    assert _decoded(tmp_path / "one_brighter.png").tolist() == [[1, 1, 1]] * 2
    assert _decoded(tmp_path / "ramp.png").tolist() == [[0, 40, 80], [120, 160, 200]]
    # Mode I (32-bit) is ambiguous (older Pillows open a 16-bit PNG so): its values decide.
    Image.fromarray(np.full((2, 3), 200, np.int32)).save(tmp_path / "i8.tif")
    Image.fromarray(np.full((2, 3), 65535, np.int32)).save(tmp_path / "i16.tif")
    assert Image.open(tmp_path / "i8.tif").mode == "I"
    assert _decoded(tmp_path / "i8.tif").tolist() == [[200] * 3] * 2
    assert _decoded(tmp_path / "i16.tif").tolist() == [[255] * 3] * 2


def test_floating_point_image_is_refused_in_one_line(odd_models, tmp_path):
    """Mode F was cast to 8 bits as it was: 0..1 values read as a black image."""
    Image.fromarray(np.full((8, 8), 0.8, np.float32)).save(tmp_path / "f.tif")
    assert Image.open(tmp_path / "f.tif").mode == "F"
    proc = run_runner("classify", "--model", odd_models["uint8"], tmp_path / "f.tif")
    err = _error_lines(proc.stderr)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and len(err) == 1, proc.stderr
    assert err[0].startswith(f"error: {tmp_path / 'f.tif'}: a floating-point image") and "8- or 16-bit" in err[0]


def _strict_json(text: str):
    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_json_output_is_strict_json(odd_models, tmp_path):
    """--json printed -Infinity and NaN, which strict parsers (JavaScript's, jq) refuse with the whole output."""
    bright, black = _grey(tmp_path / "bright.png", 200), _grey(tmp_path / "black.png", 0)
    proc = run_runner("classify", "--model", odd_models["log"], bright, black, "--json")  # log(0) for black
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    first, second = _strict_json(proc.stdout)["results"]
    assert [t["index"] for t in first["top"]] == [1, 0] and "top" not in second
    assert second["error"].startswith(f"{black}: the model's scores for it are not all finite")
    proc = run_runner("info", "--model", odd_models["nan_scale"], "--json")
    assert proc.returncode == 0, proc.stderr
    assert _strict_json(proc.stdout)["input"]["scale"] is None


def test_eval_refuses_scores_that_are_not_finite(odd_models, tmp_path):
    """eval took the argmax of NaN and infinite scores and reported an accuracy as if measured."""
    data = tmp_path / "eval.npz"
    np.savez(data, x=np.stack([np.full((8, 8, 1), v, np.uint8) for v in (200, 0, 90)]), y=np.array([1, 0, 1]))
    proc = run_runner("eval", data, "--model", odd_models["log"], "--json")  # log(0) for the black image
    err = _error_lines(proc.stderr)
    assert proc.returncode == 1 and proc.stdout == "" and "Traceback" not in proc.stderr, proc.stderr
    assert len(err) == 1 and "not all finite (NaN or infinity) for 1 of 3 images, the first image 1" in err[0], err


def test_a_path_of_the_wrong_kind_is_a_usage_error(odd_models, tmp_path):
    """docs/exit-codes.md: a path that does not exist, or a file where a folder is expected (or the reverse),
    exits 2. These exited 1, and `verify FILE` said "no such folder" of a file that exists."""
    model, folder, missing = odd_models["uint8"], tmp_path / "folder", tmp_path / "missing.txt"
    folder.mkdir()
    archive = tmp_path / "b.tar.gz"
    with tarfile.open(archive, "w:gz"):
        pass
    cases = [(("verify", model), f"{model}: is a file, not a folder; pass an unpacked bundle"),
             (("classify", "--model", folder, "a.png"), f"{folder}: is a folder, not a model file; pass a .tflite"),
             (("eval", folder, "--model", model), f"{folder}: is a folder, not a .npz file"),
             (("unpack", folder, tmp_path / "new"), f"{folder}: is a folder, not a bundle file"),
             (("unpack", archive, model), f"{model}: is a file, not a folder to unpack into; pass a new folder"),
             (("info", "--model", model, "--labels", missing), f"{missing}: no such labels file"),
             (("info", "--model", model, "--labels", folder), f"{folder}: is a folder, not a labels file")]
    for args, says in cases:
        proc = run_runner(*args)
        err = _error_lines(proc.stderr)
        assert proc.returncode == 2 and proc.stdout == "" and len(err) == 1, (args, proc.stderr)
        assert err[0].startswith(f"error: {says}") and "Traceback" not in proc.stderr, (args, err)
    assert not (tmp_path / "new").exists()
