"""TFLite metadata in the models, the uint8-I/O int8 variant, and MediaPipe Tasks opening both as they are.

MediaPipe runs in a virtual environment of its own: mediapipe 1.2.3 needs absl-py~=2.3, and the
project's QAT extra (tensorflow-model-optimization 0.8.1) pins absl-py~=1.2, so one environment
cannot hold both. The venv is made on first use (EDGEPIPE_MEDIAPIPE_VENV, default
~/.cache/edgepipe/mediapipe-venv) with `pip install mediapipe==1.2.3`.
"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
CIFAR_JPG = REPO.parent / "shared" / "datasets" / "cifar10-jpg"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
VENV = Path(os.environ.get("EDGEPIPE_MEDIAPIPE_VENV") or Path.home() / ".cache" / "edgepipe" / "mediapipe-venv")
MEDIAPIPE = "mediapipe==1.2.3"
TRAIN_PER_CLASS, TEST_PER_CLASS = 100, 60

CLASSIFY = r"""
import json, sys
import numpy as np
import mediapipe as mp
from mediapipe.tasks.python import BaseOptions
from mediapipe.tasks.python.vision import ImageClassifier, ImageClassifierOptions

images = np.load(sys.argv[1])
out = {}
for model in sys.argv[2:]:
    options = ImageClassifierOptions(base_options=BaseOptions(model_asset_path=model), max_results=1)
    with ImageClassifier.create_from_options(options) as classifier:
        top = []
        for img in images:
            c = classifier.classify(mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(img)))
            best = c.classifications[0].categories[0]
            top.append([best.index, best.category_name])
    out[model] = top
print(json.dumps(out))
"""


def _cifar_batches(folder: Path) -> Path:
    """A small fixed slice of the CIFAR-10 JPEGs, written as the python-version batches the loader reads."""
    from PIL import Image

    def read(split, per_class):
        x, y = [], []
        for label, name in enumerate(CLASSES):
            for i in range(per_class):
                with Image.open(CIFAR_JPG / split / name / f"{i:04d}.jpg") as img:
                    x.append(np.asarray(img.convert("RGB")))
                y.append(label)
        # Channel planes, each 32x32 row-major, as in the original batches.
        return np.stack(x).transpose(0, 3, 1, 2).reshape(len(x), -1), y

    folder.mkdir(parents=True)
    x, y = read("train", TRAIN_PER_CLASS)
    order = np.random.default_rng(0).permutation(len(y))
    for i, part in enumerate(np.array_split(order, 5), start=1):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps({b"data": x[part], b"labels": [y[j] for j in part]}))
    x, y = read("test", TEST_PER_CLASS)
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": x, b"labels": y}))
    return folder


@pytest.fixture(scope="module")
def rgb_run(tmp_path_factory):
    """cifar-cnn, one epoch on 1,000 CIFAR images, int8 with uint8 input and output."""
    if not CIFAR_JPG.is_dir():
        pytest.skip(f"CIFAR-10 JPEGs not found at {CIFAR_JPG}")
    from pipeline.build import build
    from pipeline.config import BuildConfig

    tmp = tmp_path_factory.mktemp("rgb")
    data_dir = _cifar_batches(tmp / "cifar-10-batches-py")
    cfg = BuildConfig(dataset="cifar10", data_dir=str(data_dir), model="cifar-cnn", epochs=1, int8_io="uint8",
                      benchmark=False, out=str(tmp / "run"))
    return build(cfg, log=lambda *a: None)


def _mediapipe_python() -> Path:
    python = VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", MEDIAPIPE], check=True, timeout=1200)
    return python


def test_every_model_carries_metadata_a_reader_understands(rgb_run):
    from pipeline.metadata import _writer

    _writer()  # puts the writer's folder on sys.path
    from tensorflow_lite_support.metadata.python.metadata import MetadataDisplayer

    meta = json.loads((rgb_run / "metadata.json").read_text())
    pre = meta["preprocess"]
    for name, entry in meta["models"].items():
        assert entry["tflite_metadata"] == {"present": True}, name
        shown = MetadataDisplayer.with_model_file(str(rgb_run / name))
        md = json.loads(shown.get_metadata_json())
        assert md["name"].startswith("cifar-cnn") and "cifar10" in md["description"]
        [graph] = md["subgraph_metadata"]
        [image] = graph["input_tensor_metadata"]
        props = image["content"]["content_properties"]
        assert props["color_space"] == "RGB"
        norm = image["process_units"][0]["options"]
        # (pixel - mean) / std must be what training fed: pixel * scale + offset.
        assert norm["mean"] == pytest.approx([-pre["offset"] / pre["scale"]] * 3)
        assert norm["std"] == pytest.approx([1 / pre["scale"]] * 3)
        [scores] = graph["output_tensor_metadata"]
        assert scores["name"] == "probability" and scores["associated_files"][0]["type"] == "TENSOR_AXIS_LABELS"
        assert shown.get_packed_associated_file_list() == ["labels.txt"]
        assert shown.get_associated_file_buffer("labels.txt").decode().split() == list(CLASSES)
    assert meta["models"]["model_int8.tflite"]["input"]["dtype"] == "uint8"
    assert meta["models"]["model_int8.tflite"]["output"]["dtype"] == "uint8"


@pytest.mark.slow
def test_mediapipe_classifies_like_the_runner(rgb_run, tmp_path):
    """MediaPipe Tasks' ImageClassifier opens the fp32 and the uint8-I/O int8 model unchanged; top-1 agrees."""
    from device.core import Model
    from pipeline.data import load_dataset

    python = _mediapipe_python()
    config = json.loads((rgb_run / "config.json").read_text())
    data = load_dataset("cifar10", config["data_dir"], seed=0)
    np.save(tmp_path / "test.npy", data.x_test)
    models = [str(rgb_run / f"model_{v}.tflite") for v in ("fp32", "int8")]
    proc = subprocess.run([str(python), "-c", CLASSIFY, str(tmp_path / "test.npy"), *models], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    for path in models:
        ours = Model(path).predict(data.x_test).argmax(1)
        index = np.array([i for i, _ in theirs[path]])
        assert [n for _, n in theirs[path]] == [CLASSES[i] for i in index]  # labels came from the metadata
        agreement = (index == ours).mean()
        print(f"{Path(path).name}: MediaPipe's top-1 agrees with the runner's on {agreement:.2%} of {len(ours)}")
        assert len(ours) == 10 * TEST_PER_CLASS and agreement >= 0.995, (path, agreement)


def _offline_pip(env: dict) -> dict:
    """pip with no reachable index: no config files, no find-links, an index on a closed local port."""
    env = {k: v for k, v in env.items() if not k.startswith("PIP_")}
    return {**env, "PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_NO_CACHE_DIR": "1"}


def _digits_build(out: Path, side: Path, env: dict) -> subprocess.CompletedProcess:
    code = ("from pipeline.cli import main\n"
            f"main(['build', '--dataset', 'digits', '--model', 'mnist-mlp', '--epochs', '1', '--no-benchmark', "
            f"'--out', '{out}'])")
    env = {**env, "PYTHONPATH": str(REPO), "EDGEPIPE_TFLITE_SUPPORT": str(side)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)


def test_no_writer_and_no_network_means_no_metadata_and_the_report_says_why(tmp_path):
    """Offline, the first-use install fails once; the build succeeds and metadata.json and the report say why."""
    proc = _digits_build(tmp_path / "run", tmp_path / "nothing-here", _offline_pip(os.environ))
    assert proc.returncode == 0, proc.stderr
    output = proc.stdout + proc.stderr
    assert output.count("installing the TFLite metadata writer") == 1, output[-3000:]  # one attempt, not one per model
    assert not (tmp_path / "nothing-here").exists()  # a failed install leaves nothing that passes for installed
    meta = json.loads((tmp_path / "run" / "metadata.json").read_text())
    for entry in meta["models"].values():
        assert entry["tflite_metadata"]["present"] is False
        assert "could not install the TFLite metadata writer" in entry["tflite_metadata"]["reason"]
        assert "python -m pipeline.metadata --install" in entry["tflite_metadata"]["reason"]
    notes = [n for n in json.loads((tmp_path / "run" / "report.json").read_text())["notes"]
             if n["kind"] == "no_tflite_metadata"]
    assert {n["variant"] for n in notes} == {"fp32", "int8"}
    assert "carries no TFLite metadata" in (tmp_path / "run" / "report.html").read_text()


def test_a_writer_missing_its_system_library_names_the_package_to_install(tmp_path):
    """A minimal machine without libusb: the installed writer's compiled module fails to load, as the dynamic
    loader reports it. Installing the writer again would not help, so the reason names the system package."""
    package = tmp_path / "side" / "tensorflow_lite_support" / "metadata"
    package.mkdir(parents=True)
    for folder in (package.parent, package):
        (folder / "__init__.py").write_text("")
    (package / "metadata_schema_py_generated.py").write_text(
        'raise ImportError("libusb-1.0.so.0: cannot open shared object file: No such file or directory")\n')
    proc = _digits_build(tmp_path / "run", tmp_path / "side", os.environ)
    assert proc.returncode == 0, proc.stderr
    assert "installing" not in proc.stdout + proc.stderr  # the folder is there: nothing to install
    for entry in json.loads((tmp_path / "run" / "metadata.json").read_text())["models"].values():
        reason = entry["tflite_metadata"]["reason"]
        assert entry["tflite_metadata"]["present"] is False
        assert "libusb-1.0.so.0: cannot open shared object file" in reason, reason
        assert "apt-get install libusb-1.0-0" in reason and "--install" not in reason, reason


def test_install_ahead_of_time_offline_is_one_line_and_leaves_nothing(tmp_path):
    env = {**_offline_pip(os.environ), "PYTHONPATH": str(REPO), "EDGEPIPE_TFLITE_SUPPORT": str(tmp_path / "side")}
    proc = subprocess.run([sys.executable, "-m", "pipeline.metadata", "--install"], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "could not install the TFLite metadata writer" in proc.stderr
    assert list(tmp_path.iterdir()) == []  # neither the side folder nor pip's temporary one is left


@pytest.mark.slow
def test_the_first_build_installs_the_writer_and_its_models_carry_metadata(tmp_path):
    """The README's two set-up commands are enough: the writer arrives with the first build, from the registry."""
    from pipeline.metadata import has_metadata

    proc = _digits_build(tmp_path / "run", tmp_path / "side", os.environ)
    assert proc.returncode == 0, proc.stderr
    assert (proc.stdout + proc.stderr).count("installing the TFLite metadata writer") == 1
    assert (tmp_path / "side" / "tensorflow_lite_support").is_dir()
    for variant in ("fp32", "int8"):
        assert has_metadata((tmp_path / "run" / f"model_{variant}.tflite").read_bytes())
    again = _digits_build(tmp_path / "run2", tmp_path / "side", os.environ)  # installed once, then used
    assert again.returncode == 0 and "installing" not in again.stdout + again.stderr
    assert has_metadata((tmp_path / "run2" / "model_int8.tflite").read_bytes())


def test_a_shape_the_writer_cannot_describe_is_refused_with_the_reason():
    import keras
    import tensorflow as tf

    from pipeline.metadata import MetadataError, embed

    model = keras.Sequential([keras.Input((784,), batch_size=1), keras.layers.Dense(10, activation="softmax")])
    flatbuffer = tf.lite.TFLiteConverter.from_keras_model(model).convert()
    pre = {"scale": 1 / 255, "offset": 0.0, "labels": [str(i) for i in range(10)]}
    with pytest.raises(MetadataError, match=r"input shape \[1, 784\]"):
        embed(flatbuffer, name="flat", description="a flat model", version="0", preprocess=pre)
