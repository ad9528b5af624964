"""`pipeline export --target tflm`: the sources compile and hold the model's bytes and settings, the arena is
the smallest that works in TFLite Micro, TFLM predicts as LiteRT does (MNIST and CIFAR), bad input is one line."""
from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from device import core
from device.integrity import sha256_file
from pipeline.cli import main
from pipeline.micro import runtime
from pipeline.micro import sources as c_sources
from pipeline.micro.export import MARKER, export_tflm
from tests.conftest import REPO

CIFAR_JPG = Path(REPO.parent / "shared" / "datasets" / "cifar10-jpg")
QUIET = {"log": lambda *a: None}


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def exported_run(tmp_path_factory, run: Path, name: str, **kwargs) -> tuple[Path, Path]:
    """A copy of a finished run (the original is shared with other tests) and its export."""
    copy = tmp_path_factory.mktemp(name) / run.name
    shutil.copytree(run, copy)
    return copy, export_tflm(copy, **kwargs, **QUIET)


@pytest.fixture(scope="module")
def mnist_export(tmp_path_factory, mnist_run):
    return exported_run(tmp_path_factory, mnist_run, "mnist-tflm")


def cifar_data(tmp_path: Path, per_class: int = 30, test_per_class: int = 10) -> Path:
    """A small cifar-10-python.tar.gz: real CIFAR-10 images (the first `per_class` train and `test_per_class`
    test images of each class) when this machine has them, else learnable synthetic ones in the same format."""
    if not CIFAR_JPG.is_dir():
        from tests.test_stages import cifar_archive

        return cifar_archive(tmp_path)
    from PIL import Image

    from pipeline.data import CIFAR_LABELS
    from tests.test_data import BATCHES, pickled, write_cifar_tar

    def read(split: str, per_class: int):
        images, labels = [], []
        for i in range(per_class):
            for label, name in enumerate(CIFAR_LABELS):
                with Image.open(CIFAR_JPG / split / name / f"{i:04d}.jpg") as img:
                    images.append(np.asarray(img.convert("RGB")).transpose(2, 0, 1).reshape(-1))
                labels.append(label)
        return np.stack(images), labels

    train, test = read("train", per_class), read("test", test_per_class)
    members = {}
    for k, name in enumerate(BATCHES[:5]):
        members[name] = pickled({b"data": train[0][k::5], b"labels": train[1][k::5]})
    members[BATCHES[5]] = pickled({b"data": test[0], b"labels": test[1]})
    (tmp_path / "cifar").mkdir()
    return write_cifar_tar(tmp_path / "cifar" / "cifar-10-python.tar.gz", members).parent


@pytest.fixture(scope="module")
def cifar_runs(tmp_path_factory):
    """cifar-cnn (Flatten: converted again with batch 1) and cifar-dscnn (global pooling: exported as it is)."""
    from pipeline.build import build
    from pipeline.config import BuildConfig

    tmp = tmp_path_factory.mktemp("cifar")
    data_dir = cifar_data(tmp)
    runs = {}
    for model in ("cifar-cnn", "cifar-dscnn"):
        cfg = BuildConfig(dataset="cifar10", data_dir=str(data_dir), model=model, epochs=1, calibration_samples=50,
                          benchmark=False, out=str(tmp / model))
        run = build(cfg, **QUIET)
        runs[model] = (run, export_tflm(run, **QUIET))
    return runs


# ---------------------------------------------------------------- the export

def test_export_folder_archive_and_run_records(mnist_export):
    run, out = mnist_export
    expected = {*c_sources.SOURCES, "model.tflite", "README.md", MARKER}
    assert {p.name for p in out.iterdir()} == expected
    summary = json.loads((out / MARKER).read_text())
    for name, entry in summary["files"].items():
        assert entry["sha256"] == sha256_file(out / name), name
    with tarfile.open(out.parent / f"{out.name}.tar.gz") as tar:
        names = tar.getnames()
        assert {f"{out.name}/{n}" for n in expected} <= set(names)
        assert tar.extractfile(f"{out.name}/model.tflite").read() == (out / "model.tflite").read_bytes()
    # The run records the figures: tflm.json, the manifest (files re-hashed) and the report.
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["tflm"]["flash_bytes"] == (out / "model.tflite").stat().st_size
    assert manifest["tflm"]["arena_bytes"] == summary["arena"]["recommended"]
    assert invoke("verify", run).exit_code == 0
    report = (run / "report.md").read_text()
    assert "## Microcontroller (TensorFlow Lite Micro)" in report
    assert f"{summary['flash_bytes']:,} bytes of flash" in report
    readme = (out / "README.md").read_text()
    for words in ("Arduino", "Zephyr", "CMake", f"{summary['arena']['recommended']:,}", f"{summary['flash_bytes']:,}"):
        assert words in readme


def test_micro_model_is_lean_and_predicts_as_the_runs_int8(mnist_export):
    run, out = mnist_export
    summary = json.loads((out / MARKER).read_text())
    ops = [op for op, _ in runtime.read_graph((out / "model.tflite").read_bytes())]
    run_ops = [op for op, _ in runtime.read_graph((run / "model_int8.tflite").read_bytes())]
    assert {"SHAPE", "STRIDED_SLICE", "PACK"} <= set(run_ops)  # Keras 3's Flatten with a dynamic batch
    assert not {"SHAPE", "STRIDED_SLICE", "PACK"} & set(ops) and ops.count("RESHAPE") == 1
    assert summary["ops"] == list(dict.fromkeys(ops))
    assert (out / "model.tflite").stat().st_size < (run / "model_int8.tflite").stat().st_size
    assert "batch 1" in summary["conversion"]
    # Calibrated on the same images as the run's int8 model (calibration.npz): the same predictions on the
    # run's labelled test samples as the run's int8 made in its evaluation.
    assert summary["accuracy"]["agreement_with_run"] == 1.0
    n = summary["accuracy"]["images"]
    with np.load(run / "samples" / "eval.npz") as samples, np.load(run / "predictions.npz") as p:
        index = samples["index"]
        assert n == len(samples["y"]) and np.array_equal(samples["y"], p["y"][index])
        assert summary["accuracy"]["accuracy_litert"] == float((p["probs_int8"][index].argmax(1)
                                                                 == p["y"][index]).mean())


def test_variants_fit_table(mnist_export):
    _, out = mnist_export
    rows = {r["variant"]: r for r in json.loads((out / MARKER).read_text())["variants"]}
    assert set(rows) == {"fp32", "dynamic", "float16", "int8", "int16x8"}
    assert rows["int8"]["exported"] and rows["int8"]["arena"] < rows["fp32"]["arena"]
    # Hybrid (dynamic-range) models and float16 weights are not something TFLite Micro runs.
    assert rows["dynamic"]["arena"] is None and "Hybrid models are not supported" in rows["dynamic"]["reason"]
    assert rows["float16"]["arena"] is None and "DEQUANTIZE" in rows["float16"]["reason"]
    assert all(rows["int8"]["fits"].values())


# ---------------------------------------------------------------- the C/C++ sources

CHECK_PROGRAM = r"""
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>
#include "model_data.h"
#include "model_settings.h"
#include "test_image.h"

int main(int, char** argv) {
  FILE* f = std::fopen(argv[1], "rb");
  if (!f) return 2;
  std::vector<unsigned char> file;
  int c;
  while ((c = std::fgetc(f)) != EOF) file.push_back(static_cast<unsigned char>(c));
  std::fclose(f);
  std::printf("same_bytes %d\n", file.size() == g_model_data_len &&
                                     std::memcmp(file.data(), g_model_data, g_model_data_len) == 0);
  std::printf("aligned %d\n", static_cast<int>(reinterpret_cast<uintptr_t>(g_model_data) % 16 == 0));
  std::printf("shape %d %d %d %d\n", kInputHeight, kInputWidth, kInputChannels, kCategoryCount);
  std::printf("input %.9g %d\n", kInputScale, kInputZeroPoint);
  std::printf("output %.9g %d\n", kOutputScale, kOutputZeroPoint);
  std::printf("arena %d %d\n", kTensorArenaSize, kTensorArenaMeasured);
  std::printf("lut");
  for (int p = 0; p < 256; ++p) std::printf(" %d", kPixelToInput[p]);
  std::printf("\ntest_input");
  for (int i = 0; i < kInputSize; ++i) std::printf(" %d", kPixelToInput[g_test_image[i]]);
  std::printf("\ntest_category %d\n", kTestImageCategory);
  for (int i = 0; i < kCategoryCount; ++i) {
    std::printf("label");
    for (const char* s = kCategoryLabels[i]; *s; ++s) std::printf(" %d", static_cast<unsigned char>(*s));
    std::printf("\n");
  }
  return 0;
}
"""


def compile_and_run(folder: Path, tmp_path: Path, *args) -> dict[str, list[str]]:
    """Build the generated files that need no TFLite Micro headers with a check program, the way a
    strict firmware build would (-std=c++17 -Wall -Werror), run it and parse its 'key values' lines."""
    (tmp_path / "check.cc").write_text(CHECK_PROGRAM)
    binary = tmp_path / "check"
    sources = [folder / n for n in ("model_data.cc", "model_settings.cc", "test_image.cc")]
    build = subprocess.run(["g++", "-std=c++17", "-Wall", "-Wextra", "-Werror", "-I", str(folder),
                            "-o", str(binary), str(tmp_path / "check.cc"), *map(str, sources)],
                           check=False, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    ran = subprocess.run([str(binary), *map(str, args)], capture_output=True, text=True, check=True)
    lines: dict[str, list[str]] = {}
    for line in ran.stdout.splitlines():
        key, *values = line.split()
        lines.setdefault(key, []).append(values)
    return lines


def check_sources_against_model(out: Path, run: Path, tmp_path: Path) -> None:
    summary = json.loads((out / MARKER).read_text())
    got = compile_and_run(out, tmp_path, out / "model.tflite")
    assert got["same_bytes"] == [["1"]] and got["aligned"] == [["1"]]
    # Settings against the model's own tensor details, read by the LiteRT interpreter.
    model = core.Model(out / "model.tflite", metadata=json.loads((run / "metadata.json").read_text()), verify=False)
    _, h, w, c = model.input.shape
    assert got["shape"] == [[str(h), str(w), str(c), str(model.output.shape[-1])]]
    assert np.float32(got["input"][0][0]) == np.float32(model.input.scale)
    assert int(got["input"][0][1]) == model.input.zero_point
    assert np.float32(got["output"][0][0]) == np.float32(model.output.scale)
    assert int(got["output"][0][1]) == model.output.zero_point
    assert [int(v) for v in got["arena"][0]] == [summary["arena"]["recommended"], summary["arena"]["measured"]]
    # The pixel table is what device/core.py feeds the interpreter for each pixel value 0..255.
    ramp = np.resize(np.arange(256, dtype=np.uint8), (1, h, w, c))
    assert [int(v) for v in got["lut"][0]] == model.prepare(ramp).reshape(-1)[:256].tolist()
    assert [bytes(int(b) for b in v).decode() for v in got["label"]] == model.labels
    # The example's image, quantized the example's way, is classified as its stated label under TFLM.
    x = np.array([int(v) for v in got["test_input"][0]], np.int8).reshape(1, h, w, c)
    interpreter = runtime.micro_interpreter((out / "model.tflite").read_bytes(), summary["arena"]["recommended"])
    interpreter.set_input(x, 0)
    interpreter.invoke()
    assert int(np.argmax(interpreter.get_output(0))) == int(got["test_category"][0][0])


def test_mnist_sources_compile_and_hold_the_model(mnist_export, tmp_path):
    check_sources_against_model(mnist_export[1], mnist_export[0], tmp_path)
    resolver = (mnist_export[1] / "op_resolver.h").read_text()
    assert "tflite::MicroMutableOpResolver<kModelOpCount>" in resolver and "kModelOpCount = 5;" in resolver
    for method in ("AddConv2D", "AddMaxPool2D", "AddReshape", "AddFullyConnected", "AddSoftmax"):
        assert f"resolver.{method}()" in resolver
    assert "AddShape" not in resolver and "AddPack" not in resolver


def test_labels_are_escaped_for_c(tmp_path):
    labels = ['say "hi"', "back\\slash", "caf\u00e9 \u2615", "tri??=graph", "7 \\x41 tab\tend", "\u00e91"]
    spec = {"shape": [1, 2, 2, 1], "dtype": "int8", "scale": 0.5, "zero_point": -1}
    files = c_sources.render(
        model_bytes=b"\x1c\x00\x00\x00TFL3" + bytes(range(40)), source='run "x"\\model.tflite', sha256="0" * 64,
        generator="edgepipe test", preprocess={"scale": 1 / 255, "offset": 0.0, "color": "grayscale"},
        input_spec=spec, output_spec={**spec, "shape": [1, len(labels)]}, labels=labels,
        arena={"recommended": 1040, "measured": 16, "how": "test", "margin": {"fraction": 0.1, "minimum": 1024}},
        ops=["RESHAPE"], resolver_methods=runtime.MICRO_OPS, pixel_table=np.zeros(256, np.int8),
        test_image=np.arange(4, dtype=np.uint8), test_label=0, test_index=0)
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    (tmp_path / "model.bin").write_bytes(b"\x1c\x00\x00\x00TFL3" + bytes(range(40)))
    got = compile_and_run(tmp_path, tmp_path, tmp_path / "model.bin")
    assert got["same_bytes"] == [["1"]]
    assert [bytes(int(b) for b in v) for v in got["label"]] == [s.encode("utf-8") for s in labels]


# ---------------------------------------------------------------- arena and accuracy under TFLM

def test_arena_is_the_smallest_that_works(mnist_export):
    from tflite_micro import runtime as tflm

    out = mnist_export[1]
    arena = json.loads((out / MARKER).read_text())["arena"]
    model = (out / "model.tflite").read_bytes()
    sample = np.zeros((1, 28, 28, 1), np.int8)
    for size in (arena["measured"], arena["recommended"]):
        interpreter = tflm.Interpreter.from_bytes(model, arena_size=size)
        interpreter.set_input(sample, 0)
        interpreter.invoke()
    with runtime.c_stderr() as text, pytest.raises(RuntimeError):
        tflm.Interpreter.from_bytes(model, arena_size=int(arena["measured"] * 0.9))
    assert "Failed to resize buffer" in text[0] or "failed" in text[0].lower()
    assert arena["recommended"] >= arena["measured"] + 1024 and arena["recommended"] % 16 == 0
    assert abs(arena["reported"] - arena["measured"]) <= 16  # the allocation report and the search agree


def tflm_vs_litert(out: Path, run: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    """Raw int8 outputs of the exported model for images x, computed here straight from the interpreters:
    TFLite Micro, LiteRT with its built-in kernels, and LiteRT with XNNPACK (how the report measures)."""
    from tflite_micro import runtime as tflm

    summary = json.loads((out / MARKER).read_text())
    meta = json.loads((run / "metadata.json").read_text())
    interpreter = tflm.Interpreter.from_bytes((out / "model.tflite").read_bytes(),
                                                 arena_size=summary["arena"]["recommended"])
    outputs = {"tflm": []}
    prepared = core.Model(out / "model.tflite", metadata=meta, verify=False).prepare(x)
    for i in range(len(x)):
        interpreter.set_input(prepared[i:i + 1], 0)
        interpreter.invoke()
        outputs["tflm"].append(np.array(interpreter.get_output(0)).reshape(-1))
    for name, xnnpack in (("builtin", False), ("xnnpack", True)):
        litert = core.Model(out / "model.tflite", metadata=meta, verify=False, xnnpack=xnnpack)
        outputs[name] = [litert.invoke(prepared[i:i + 1]).reshape(-1) for i in range(len(x))]
    return {k: np.stack(v) for k, v in outputs.items()}


def check_predictions(out: Path, run: Path, x: np.ndarray, y: np.ndarray) -> dict:
    got = tflm_vs_litert(out, run, x)
    # TFLM's reference kernels and LiteRT's built-in ones: the same labels, int8 outputs at most a rounding
    # step or two apart (equal for the conv nets; softmax and fully-connected rounding differs slightly).
    np.testing.assert_array_equal(got["tflm"].argmax(1), got["builtin"].argmax(1))
    steps = int(np.abs(got["tflm"].astype(int) - got["builtin"]).max())
    assert steps <= 2
    acc = json.loads((out / MARKER).read_text())["accuracy"]
    assert acc["images"] == len(y) and acc["builtin_agreement"] == 1.0
    assert acc["builtin_max_output_difference"] == steps and acc["builtin_identical"] == (steps == 0)
    assert acc["accuracy_tflm"] == pytest.approx(float((got["tflm"].argmax(1) == y).mean()))
    # XNNPACK rounds int8 differently, by a step or so: the export counts and lists the labels that change.
    tflm, xnnpack = got["tflm"].argmax(1), got["xnnpack"].argmax(1)
    assert acc["agreement"] == pytest.approx(float((tflm == xnnpack).mean()))
    assert [d["index"] for d in acc["differing"]] == np.flatnonzero(tflm != xnnpack)[:50].tolist()
    return acc


def test_mnist_tflm_predictions_equal_litert(mnist_export, mnist_test):
    run, out = mnist_export
    with np.load(run / "samples" / "eval.npz") as samples:  # what the export checks: test images across classes
        x, y, index = samples["x"], samples["y"], samples["index"]
    assert np.array_equal(x, mnist_test[0][index]) and np.array_equal(y, mnist_test[1][index])
    acc = check_predictions(out, run, x, y)
    assert acc["agreement"] >= 0.99  # a trained model: its top-1 labels survive XNNPACK's rounding


@pytest.mark.slow
def test_cifar_exports_predict_as_litert_and_compile(cifar_runs, tmp_path):
    from pipeline.data import load_dataset

    for model, (run, out) in cifar_runs.items():
        cfg = json.loads((run / "config.json").read_text())
        data = load_dataset("cifar10", cfg["data_dir"], seed=cfg["seed"])
        check_predictions(out, run, data.x_test, data.y_test)
        assert json.loads((out / MARKER).read_text())["input"]["shape"] == [1, 32, 32, 3]
        (tmp_path / model).mkdir()
        check_sources_against_model(out, run, tmp_path / model)
    # cifar-dscnn ends in global pooling (MEAN), no run-time shape: its int8 model goes as the run made it.
    run, out = cifar_runs["cifar-dscnn"]
    summary = json.loads((out / MARKER).read_text())
    assert (out / "model.tflite").read_bytes() == (run / "model_int8.tflite").read_bytes()
    assert "unchanged" in summary["conversion"] and "MEAN" in summary["ops"]
    run, out = cifar_runs["cifar-cnn"]
    assert "batch 1" in json.loads((out / MARKER).read_text())["conversion"]


# ---------------------------------------------------------------- bad input

@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """Runs made by `pipeline convert` from small Keras models: fp32 only, int8 with float I/O, and one
    with a GELU, which the converter keeps as an int8 GELU op that TFLite Micro does not have."""
    import keras

    tmp = tmp_path_factory.mktemp("tiny")

    def model(path, activation):
        m = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(16, activation=activation, name="dense_gelu"),
                              keras.layers.Dense(10, activation="softmax")])
        m.save(path)
        return path

    relu, gelu = model(tmp / "relu.keras", "relu"), model(tmp / "gelu.keras", "gelu")
    runs = {}
    calibrated = ["--calibration-samples", "20"]  # fp32 alone calibrates nothing, and the option is refused there
    for name, keras_model, extra in (("fp32", relu, ["--quantize", "fp32"]),
                                     ("float-io", relu, ["--int8-io", "float", *calibrated]),
                                     ("gelu", gelu, calibrated)):
        result = invoke("convert", keras_model, "--dataset", "digits", *extra, "--out", tmp / name)
        assert result.exit_code == 0, result.output
        runs[name] = tmp / name
    return runs


def one_line_error(result, *words):
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    # Progress lines may come first (the model was converted and measured before it was found too big).
    lines = result.output.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("Error: ")]
    assert errors == lines[-1:], result.output
    for w in words:
        assert w in errors[0], (w, errors[0])
    return errors[0]


def test_no_int8_variant(tiny_runs, tmp_path):
    result = invoke("export", tiny_runs["fp32"], "--out", tmp_path / "x")
    one_line_error(result, "no int8 model", "--quantize int8")
    assert not (tmp_path / "x").exists()


def test_float_io_int8_is_converted_with_int8_io(tiny_runs, tmp_path):
    run = tiny_runs["float-io"]
    assert core.Model(run / "model_int8.tflite").input.dtype == np.float32
    result = invoke("export", run, "--out", tmp_path / "x")
    assert result.exit_code == 0, result.output
    assert "float32" in result.output and "int8 input/output" in result.output
    info = core.Model(tmp_path / "x" / "model.tflite", metadata=json.loads((run / "metadata.json").read_text()),
                      verify=False)
    assert info.input.dtype == np.int8 and info.output.dtype == np.int8


def test_unsupported_op_names_op_layer_and_fix(tiny_runs, tmp_path):
    result = invoke("export", tiny_runs["gelu"], "--out", tmp_path / "x")
    one_line_error(result, "op GELU", "layer 'dense_gelu'", "relu")
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.partial-*"))


def test_too_big_for_the_budget_writes_nothing(mnist_export, tmp_path):
    run, _ = mnist_export
    result = invoke("export", run, "--out", tmp_path / "x", "--ram", "16K")
    one_line_error(result, "does not fit", "the arena needs", "16,384", "nano33ble")
    result = invoke("export", run, "--out", tmp_path / "x", "--flash", "100KiB", "--ram", "1M")
    one_line_error(result, "the model needs", "102,400")
    assert not list(tmp_path.iterdir())
    one_line_error(invoke("export", run, "--out", tmp_path / "x", "--board", "pico", "--ram", "1M"), "--board")
    for given in ("lots", "inf", "1e400"):  # inf and 1e400 were an OverflowError traceback
        result = invoke("export", run, "--flash", given)
        assert result.exit_code == 2 and "is not a byte count" in result.output, result.output


def test_an_out_that_holds_the_run_is_refused_before_anything_is_deleted(mnist_export, tmp_path):
    """--overwrite replaced the earlier export in --out, and with it a run kept inside it."""
    run, out = mnist_export
    earlier = tmp_path / "export"
    shutil.copytree(out, earlier)
    inside = shutil.copytree(run, earlier / "run")
    one_line_error(invoke("export", inside, "--out", earlier, "--overwrite"), "holds the run directory",
                   "which replacing it would delete")
    assert (inside / "manifest.json").is_file() and (earlier / MARKER).is_file()


def test_existing_folders(mnist_export, tmp_path):
    run, out = mnist_export
    precious = tmp_path / "mine"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    one_line_error(invoke("export", run, "--out", precious), "already exists", "--overwrite")
    one_line_error(invoke("export", run, "--out", precious, "--overwrite"), "not an edgepipe", "refusing")
    assert (precious / "notes.txt").read_text() == "keep me" and len(list(precious.iterdir())) == 1
    one_line_error(invoke("export", run, "--out", out), "already exists")
    one_line_error(invoke("export", run, "--out", run / "inside"), "inside the run directory")
    assert not (run / "inside").exists()


def test_overwrite_replaces_only_an_exports_own_archive(mnist_export, tmp_path):
    """--overwrite replaces FOLDER.tar.gz only when it is what an export packed: FOLDER/ holding its marker."""
    from pipeline.ship.bundle import make_bundle

    run, out = mnist_export
    bundle = make_bundle(run, tmp_path / "pi.tar.gz")  # the device bundle sits where `--out pi` puts its archive
    shutil.copy(out.parent / f"{out.name}.tar.gz", tmp_path / "renamed.tar.gz")  # another export's, renamed
    for name, archive in (("pi", bundle), ("renamed", tmp_path / "renamed.tar.gz")):
        before = archive.read_bytes()
        one_line_error(invoke("export", run, "--out", tmp_path / name, "--overwrite"),
                       "is not the archive of an edgepipe TFLite Micro export", f"{name}/{MARKER}", "refusing")
        assert archive.read_bytes() == before and not (tmp_path / name).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pi.tar.gz", "renamed.tar.gz"]


@pytest.mark.slow
def test_overwrite_replaces_an_export(mnist_export):
    run, out = mnist_export
    (out / "stale.txt").write_text("from before")
    result = invoke("export", run, "--overwrite", "--board", "nano33ble", "--test-images", "50")
    assert result.exit_code == 0, result.output
    assert not (out / "stale.txt").exists() and json.loads((out / MARKER).read_text())["accuracy"]["images"] == 50
    assert not list(out.parent.glob(f".{out.name}*"))


def test_run_without_calibration_images(mnist_export, tmp_path):
    """A run built before runs kept calibration.npz: one line naming the file and the fix, nothing written."""
    run = tmp_path / "old"
    shutil.copytree(mnist_export[0], run)
    (run / "calibration.npz").unlink()
    manifest = json.loads((run / "manifest.json").read_text())
    del manifest["files"]["calibration.npz"]
    (run / "manifest.json").write_text(json.dumps(manifest))
    one_line_error(invoke("export", run, "--out", tmp_path / "x"), "no calibration.npz", "`pipeline build`")
    assert not (tmp_path / "x").exists()
    one_line_error(invoke("export", tmp_path, "--out", tmp_path / "y"), "pipeline build")


def test_export_reads_the_run_not_the_dataset(tmp_path):
    """Built from an mnist.npz that is gone by export time: the export needs only the run's own files
    (calibration.npz, hashed in the manifest like the rest, and never in the bundle)."""
    from pipeline.data import load_dataset

    digits = load_dataset("digits", seed=0)
    data_dir = tmp_path / "mnist"
    data_dir.mkdir()
    np.savez(data_dir / "mnist.npz", x_train=digits.x_train[..., 0], y_train=digits.y_train,
             x_test=digits.x_test[..., 0], y_test=digits.y_test)
    run = tmp_path / "run"
    result = invoke("build", "--dataset", "mnist", "--data-dir", data_dir, "--epochs", "1", "--quantize", "int8",
                    "--calibration-samples", "40", "--no-benchmark", "--out", run)
    assert result.exit_code == 0, result.output
    shutil.rmtree(data_dir)
    with np.load(run / "calibration.npz") as f:
        assert f["x"].dtype == np.uint8 and f["x"].shape == (40, 28, 28, 1)
    result = invoke("export", run, "--out", tmp_path / "x")
    assert result.exit_code == 0, result.output
    assert "calibrated on the run's 40 training images" in result.output
    assert json.loads((tmp_path / "x" / MARKER).read_text())["accuracy"]["images"] == 200
    assert invoke("verify", run).exit_code == 0
    assert invoke("bundle", run, "--out", tmp_path / "b.tar.gz").exit_code == 0
    with tarfile.open(tmp_path / "b.tar.gz") as tar:
        assert not [n for n in tar.getnames() if "calibration" in n]
    with np.load(run / "calibration.npz") as f:
        x = f["x"].copy()
    x[0, 0, 0, 0] ^= 1
    np.savez_compressed(run / "calibration.npz", x=x)
    result = invoke("verify", run)
    assert result.exit_code != 0 and "calibration.npz" in result.output
