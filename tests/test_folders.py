"""Image-folder datasets: odd images, the decode cache, bad folders, augmentation, CIFAR JPEGs end to end.

The odd images are written here (RGBA, palette, 16-bit, EXIF-rotated, corrupt, wrong extension). The
CIFAR tests take a fixed slice of ../shared/datasets/cifar10-jpg (the first images of each class) and
skip when that folder is absent.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import BuildConfig, ConfigError
from pipeline.data import DataError, load_dataset

REPO = Path(__file__).resolve().parent.parent
CIFAR_JPG = Path(os.environ.get("EDGEPIPE_CIFAR_JPG_DIR", REPO.parent / "shared" / "datasets" / "cifar10-jpg"))
CIFAR_LABELS = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """Each test its own decode cache, so none reads another's (or the user's) arrays."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("EDGEPIPE_CACHE_DIR", str(folder))
    return folder


def quiet(*_):
    pass


def solid(color, size=(20, 12), mode="RGB"):
    return Image.new(mode, size, color)


def write_odd_folder(root: Path) -> dict:
    """Two classes of odd but valid images, one corrupt file, and files that must be ignored."""
    red, blue = root / "red", root / "blue"
    for d in (red, blue, red / "nested", root / ".hidden_class"):
        d.mkdir(parents=True)
    solid((255, 0, 0)).save(red / "plain.jpg", quality=95)
    solid((255, 0, 0, 255), mode="RGBA").save(red / "alpha.png")
    solid((255, 0, 0)).convert("P", palette=Image.Palette.ADAPTIVE).save(red / "palette.gif")
    solid((250, 0, 0)).save(red / "nested" / "deep.webp", lossless=True)
    solid((255, 0, 0)).save(red / "really_a_png.jpg", format="PNG")  # wrong extension: read by content
    (red / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (red / "notes.txt").write_text("not an image")
    (red / ".DS_Store").write_bytes(b"\0\0")
    # 16-bit grayscale at full scale: must come out as 255, not clipped garbage.
    Image.fromarray(np.full((12, 20), 65535, np.uint16)).save(blue / "sixteen.png")
    solid((0, 0, 255)).save(blue / "plain.bmp")
    solid((0, 0, 255)).save(blue / "plain.tiff")
    # EXIF orientation 6 (rotate 90 clockwise to view): stored 20 wide x 10 high, left half white.
    pixels = np.zeros((10, 20, 3), np.uint8)
    pixels[:, :10] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(blue / "rotated.jpg", exif=exif, quality=100)
    return {"red": 5, "blue": 4, "broken": "red/broken.jpg"}


def test_odd_images_are_read_converted_and_the_broken_one_listed(tmp_path):
    expected = write_odd_folder(tmp_path / "photos")
    lines = []
    data = load_dataset("folder", tmp_path / "photos", input_shape=(8, 8, 3), validation_fraction=0.25,
                        log=lines.append)
    assert data.spec.labels == ("blue", "red")  # sorted folder names; hidden folder ignored
    counts = data.source["counts"]
    assert counts["train"] + counts["val"] + counts["test"] == expected["red"] + expected["blue"]
    assert data.source["skipped"]["count"] == 1 and expected["broken"] in data.source["skipped"]["first"][0]
    assert any("skipped 1 unreadable" in line and "broken.jpg" in line for line in lines)
    assert any("resized" in line for line in lines)  # 12x20 and 20x10 images all became 8x8
    x = np.concatenate([data.x_train, data.x_val, data.x_test])
    y = np.concatenate([data.y_train, data.y_val, data.y_test])
    assert x.shape[1:] == (8, 8, 3) and x.dtype == np.uint8
    reds = x[y == 1].reshape(-1, 3).mean(axis=0)
    assert reds[0] > 240 and reds[1] < 15 and reds[2] < 15  # RGBA, palette, PNG-as-.jpg: all red
    assert data.source["per_class"]["train"].keys() == {"blue", "red"}
    assert data.source["image_size"] == "8x8" and data.source["resize"] == "bilinear"


def test_exif_orientation_and_16_bit_are_applied(tmp_path):
    from device.core import load_image

    write_odd_folder(tmp_path)
    pre = {"height": 20, "width": 10, "channels": 3, "resize": "bilinear"}
    rotated = load_image(tmp_path / "blue" / "rotated.jpg", pre)
    # Rotated upright it is 10 wide x 20 high, and the white half is on top.
    assert rotated[:8].mean() > 200 and rotated[12:].mean() < 50
    gray = load_image(tmp_path / "blue" / "sixteen.png", {**pre, "channels": 1})
    assert gray.min() == 255


def test_cache_is_reused_validated_and_rebuilt_when_corrupt(tmp_path, cache):
    write_odd_folder(tmp_path / "photos")
    first = load_dataset("folder", tmp_path / "photos", input_shape=(8, 8, 3), validation_fraction=0.25, log=quiet)
    assert first.source["decode_cache"]["hit"] is False
    again = load_dataset("folder", tmp_path / "photos", input_shape=(8, 8, 3), validation_fraction=0.25, log=quiet)
    assert again.source["decode_cache"]["hit"] is True and again.source["sha256"] == first.source["sha256"]
    assert np.array_equal(again.x_train, first.x_train)
    # A flipped byte in the cached array: noticed, said, decoded again, same pixels.
    array = Path(again.source["decode_cache"]["path"])
    raw = bytearray(array.read_bytes())
    raw[-1] ^= 0xFF
    array.write_bytes(bytes(raw))
    lines = []
    rebuilt = load_dataset("folder", tmp_path / "photos", input_shape=(8, 8, 3), validation_fraction=0.25,
                           log=lines.append)
    assert rebuilt.source["decode_cache"]["hit"] is False and any("unusable" in line for line in lines)
    assert np.array_equal(rebuilt.x_train, first.x_train)
    # A changed file changes the key: its new pixels are decoded, not the cached ones.
    os.utime(tmp_path / "photos" / "red" / "plain.jpg", ns=(1, 1))
    changed = load_dataset("folder", tmp_path / "photos", input_shape=(8, 8, 3), validation_fraction=0.25, log=quiet)
    assert changed.source["decode_cache"]["hit"] is False
    # Another size is another cache entry.
    other = load_dataset("folder", tmp_path / "photos", input_shape=(6, 6, 3), validation_fraction=0.25, log=quiet)
    assert other.x_train.shape[1:] == (6, 6, 3)


def test_unwritable_cache_is_said_and_the_build_goes_on(tmp_path, monkeypatch):
    write_odd_folder(tmp_path / "photos")
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("EDGEPIPE_CACHE_DIR", str(blocker / "decoded"))
    lines = []
    data = load_dataset("folder", tmp_path / "photos", input_shape=(8, 8, 3), validation_fraction=0.25,
                        log=lines.append)
    assert len(data.x_train) > 0 and any("decode cache not written" in line for line in lines)


def _classes(root: Path, names, per_class=3):
    for name in names:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            solid((i * 40, 0, 0)).save(root / name / f"{i}.png")


@pytest.mark.parametrize("make, fragments", [
    (lambda r: r.mkdir(), ["no class folders", "one folder per class"]),
    (lambda r: _classes(r, ["only"]), ["only one class folder", "only"]),
    (lambda r: (_classes(r, ["a", "b"]), (r / "c").mkdir()), ["holds no image files", "c"]),
    (lambda r: _classes(r, ["a", "b:c"]), ["not a valid file name", "b:c"]),
    (lambda r: _classes(r, ["a", "CON"]), ["not a valid file name", "CON"]),
    (lambda r: _classes(r, ["a", "b"], per_class=2), ["too few to split", "add images"]),
    (lambda r: [(r / c).mkdir(parents=True) or (r / c / "x.jpg").write_bytes(b"junk") for c in "ab"],
     ["none of the 2 image files could be read"]),
    (lambda r: (_classes(r / "train", ["a", "b"]), _classes(r / "test", ["a", "zebra"])),
     ["zebra", "not in"]),
    # Each was read without a word: test/ became a class and its images training images; one of val/ and
    # validation/ was left out; Kaggle's training_set/ and test_set/ became a two-class model.
    (lambda r: (_classes(r, ["cat", "dog"]), _classes(r / "test", ["cat", "dog"])),
     ["test/ but no train/", "move the training class folders into"]),
    (lambda r: [_classes(r / s, ["a", "b"]) for s in ("train", "val", "validation")],
     ["both val/ and validation/", "merge them into val/"]),
    (lambda r: [_classes(r / s, ["cat", "dog"]) for s in ("training_set", "test_set")],
     ["test_set, training_set each hold the same folders (cat, dog)", "rename them train/ and test/"]),
])
def test_bad_folders_are_one_line_errors(tmp_path, make, fragments):
    root = tmp_path / "photos"
    make(root)
    with pytest.raises(DataError) as err:
        load_dataset("folder", root, log=quiet)
    message = str(err.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_class_folders_with_subfolders_of_their_own_are_still_classes(tmp_path):
    """Photos kept by year inside each class share subfolder names without being splits."""
    root = tmp_path / "photos"
    for year in ("2019", "2020"):
        _classes(root / "cat" / year, ["x"], per_class=3)
        _classes(root / "dog" / year, ["x"], per_class=3)
    data = load_dataset("folder", root, log=quiet)
    assert data.spec.labels == ("cat", "dog")


@pytest.mark.parametrize("size, fragment", [("0x0", "between"), ("10000x10000", "between"), ("32by32", "HEIGHTxWIDTH"),
                                            ("abc", "HEIGHTxWIDTH")])
def test_bad_image_size_is_a_config_error(size, fragment):
    with pytest.raises(ConfigError, match=fragment):
        BuildConfig(dataset="folder", data_dir="x", image_size=size)


def test_model_that_cannot_take_the_size_is_refused_before_training():
    with pytest.raises(ConfigError, match="at least 10x10"):
        BuildConfig(dataset="folder", data_dir="x", model="cifar-cnn", image_size="8x8")
    with pytest.raises(ConfigError, match="drop it"):
        BuildConfig(dataset="mnist", image_size="32x32")
    # A folder takes the model's channels: a grayscale model trains on grayscale conversions.
    assert BuildConfig(dataset="folder", data_dir="x", model="mnist-cnn", image_size="40x30").input_shape == (40, 30, 1)


def test_recipes_defaults_and_overrides():
    cfg = BuildConfig(dataset="cifar10", model="cifar-resnet8")
    assert (cfg.epochs, cfg.optimizer, cfg.augment) == (45, "sgd", True)
    cfg = BuildConfig(dataset="cifar10", model="cifar-resnet8", epochs=3, learning_rate=0.05, augment=False)
    assert (cfg.epochs, cfg.learning_rate, cfg.augment, cfg.label_smoothing) == (3, 0.05, False, 0.1)
    assert BuildConfig(dataset="mnist").augment is False and BuildConfig(dataset="digits").augment is False


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_weight_decay_shrinks_kernels_only(optimizer):
    """A step with zero gradients moves a variable by its decay alone: kernels shrink, while BatchNorm's scale
    and shift and the biases keep their values."""
    import keras

    from pipeline.train import _optimizer

    model = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Conv2D(2, 3), keras.layers.BatchNormalization(),
                              keras.layers.Flatten(), keras.layers.Dense(3)])
    for v in model.trainable_variables:
        v.assign(keras.ops.ones(v.shape))
    recipe = {"learning_rate": 0.1, "lr_schedule": "constant", "warmup_epochs": 0, "weight_decay": 0.01,
              "optimizer": optimizer, "ema": 0.0}
    _optimizer(recipe, steps_per_epoch=1).apply([keras.ops.zeros(v.shape) for v in model.trainable_variables],
                                                model.trainable_variables)
    after = {v.path: float(keras.ops.convert_to_numpy(v).max()) for v in model.trainable_variables}
    assert {p for p, x in after.items() if x < 1} == {p for p in after if p.endswith("kernel")}
    assert len(after) == 6  # two kernels, two biases, gamma and beta


def test_resnet8_is_the_mlperf_tiny_reference_size():
    from pipeline.models import build_model, count_macs

    model = build_model("cifar-resnet8", (32, 32, 3), 10)
    assert model.count_params() == 78_666
    assert 12_000_000 < count_macs(model) < 13_000_000  # MLPerf Tiny quotes about 12.5 M


@pytest.mark.parametrize("side", [12, 64])
def test_augmentation_shifts_and_flips_only_and_repeats_with_its_seed(side):
    """Shifts of up to an eighth of the side (CIFAR's 4 pixels at least): a 64-pixel photo moves up to 8."""
    import tensorflow as tf

    from pipeline.data.augment import PAD, augment_batch, pad_for

    pad = pad_for(side)
    assert pad == max(PAD, side // 8)
    rng = np.random.default_rng(0)
    images = rng.integers(1, 256, (16, side, side, 3), dtype=np.uint8)  # no zeros: padding is recognisable
    out = augment_batch(tf.constant(images), tf.constant([7, 1], tf.int64)).numpy()
    again = augment_batch(tf.constant(images), tf.constant([7, 1], tf.int64)).numpy()
    assert np.array_equal(out, again) and out.shape == images.shape and out.dtype == np.uint8
    assert not np.array_equal(out, images)
    shifts = []
    for src, aug in zip(images, out):
        padded = np.pad(src, ((pad, pad), (pad, pad), (0, 0)))
        shifts += [max(abs(dy - pad), abs(dx - pad)) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                   for c in (padded[dy:dy + side, dx:dx + side], padded[dy:dy + side, dx:dx + side][:, ::-1])
                   if np.array_equal(aug, c)][:1]
    assert len(shifts) == len(images)  # every image is one of its crops, flipped or not
    if pad > PAD:
        assert max(shifts) > PAD  # crops a 4-pixel pad could not have made


def test_calibration_is_stratified_by_class():
    from pipeline.convert import calibration_images
    from pipeline.data import Dataset, PreprocessSpec

    y = np.array([0] * 90 + [1] * 9 + [2] * 1)
    x = (y[:, None, None, None] * np.ones((1, 4, 4, 1))).astype(np.uint8)
    spec = PreprocessSpec(4, 4, 1, labels=("a", "b", "c"), scale=1.0)
    data = Dataset("t", x, y, x[:1], y[:1], x[:1], y[:1], spec, {})
    picked = calibration_images(data, 12, seed=0)[:, 0, 0, 0].astype(int)
    assert np.bincount(picked, minlength=3).tolist() == [6, 5, 1]  # equal shares, the rest from larger classes


# ---- real CIFAR-10 JPEGs, a small fixed slice ----

@pytest.fixture(scope="module")
def cifar_slice(tmp_path_factory) -> Path:
    """The first 20 training and 10 test images of each class, in the shared set's layout."""
    if not (CIFAR_JPG / "train" / "airplane").is_dir():
        pytest.skip(f"CIFAR-10 JPEGs not found at {CIFAR_JPG} (set EDGEPIPE_CIFAR_JPG_DIR)")
    root = tmp_path_factory.mktemp("cifar-slice")
    for split, n in (("train", 20), ("test", 10)):
        for label in CIFAR_LABELS:
            (root / split / label).mkdir(parents=True)
            for f in sorted((CIFAR_JPG / split / label).iterdir())[:n]:
                shutil.copy2(f, root / split / label / f.name)
    return root


def test_cifar_jpegs_get_the_usual_label_ids(cifar_slice):
    data = load_dataset("cifar10", cifar_slice, log=quiet)
    assert data.spec.labels == CIFAR_LABELS and data.source["kind"] == "image-folders"
    assert data.source["counts"] == {"train": 180, "val": 20, "test": 100}
    assert np.array_equal(data.y_test, np.repeat(np.arange(10), 10))  # test/ in sorted class order
    cat = np.asarray(Image.open(min((cifar_slice / "test" / "cat").iterdir())).convert("RGB"))
    assert np.array_equal(data.x_test[30], cat)  # 32x32 JPEGs: decoded, not resized


def test_augmentation_never_reaches_the_converted_model(cifar_slice, tmp_path):
    """Trained with augmentation, the model holds only its own layers: rebuilt from the zoo with the same
    weights (no augmentation anywhere), it converts to the same ops and the same outputs."""
    from device.core import Model
    from pipeline.convert import calibration_images, convert
    from pipeline.models import build_model
    from pipeline.train import train

    cfg = BuildConfig(dataset="cifar10", data_dir=str(cifar_slice), model="cifar-cnn", epochs=1, augment=True,
                      calibration_samples=20, out=str(tmp_path / "run"))
    data = load_dataset("cifar10", cifar_slice, log=quiet)
    trained, history = train(cfg, data, log=quiet)
    assert history["recipe"]["augment"] is True and history["images_per_second"][0] > 0
    plain = build_model("cifar-cnn", (32, 32, 3), 10)
    plain.set_weights(trained.get_weights())
    assert [type(layer).__name__ for layer in trained.layers] == [type(layer).__name__ for layer in plain.layers]
    calibration = calibration_images(data, 20, cfg.seed)
    outputs, ops = [], []
    for i, model in enumerate((trained, plain)):
        path = tmp_path / f"m{i}.tflite"
        path.write_bytes(convert(model, "int8", cfg, calibration))
        tflite = Model(path, metadata={"preprocess": data.spec.to_dict()}, verify=False)
        ops.append(tflite.info()["ops"])
        outputs.append(tflite.predict(data.x_test))
    assert ops[0] == ops[1] and not any("RANDOM" in op or "STATELESS" in op for op in ops[0])
    assert np.array_equal(outputs[0], outputs[1])


@pytest.mark.slow
def test_runner_on_the_test_jpegs_gives_the_host_evaluations_predictions(cifar_slice, tmp_path):
    """A whole build on the slice; then the bundle's runner, fed the original JPEG files, predicts what
    the host evaluation predicted from the decoded arrays."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    build = subprocess.run([sys.executable, "-m", "pipeline.cli", "build", "--dataset", "cifar10", "--data-dir",
                            str(cifar_slice), "--model", "cifar-cnn", "--epochs", "1", "--quantize", "int8",
                            "--no-benchmark", "--out", str(out)], capture_output=True, text=True, env=env, check=False)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["data"]["per_class"]["test"]["cat"] == 10 and manifest["data"]["image_size"] == "32x32"
    assert manifest["training"]["recipe"]["epochs"] == 1 and len(manifest["training"]["images_per_second"]) == 1
    assert json.loads((out / "metadata.json").read_text())["preprocess"]["resize"] == "bilinear"
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert set(evaluation["variants"]["int8"]["per_class"]) == set(CIFAR_LABELS)
    images = [p for label in CIFAR_LABELS for p in sorted((cifar_slice / "test" / label).iterdir())]
    with np.load(out / "predictions.npz") as saved:
        host = {v: saved[f"probs_{v}"].argmax(axis=1) for v in ("fp32", "int8")}
    for variant in ("fp32", "int8"):
        runner = subprocess.run([sys.executable, str(REPO / "device" / "runner.py"), "classify", "--json",
                                 "--model", str(out / f"model_{variant}.tflite"), *map(str, images)],
                                capture_output=True, text=True, check=False)
        assert runner.returncode == 0, runner.stderr[-2000:]
        device = [r["top"][0]["index"] for r in json.loads(runner.stdout)["results"]]
        assert device == host[variant].tolist()


def test_cli_infers_a_folder_dataset_and_says_what_is_wrong_in_one_line(tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import main

    photos = tmp_path / "photos"
    _classes(photos, ["cats", "dogs"])
    (photos / "birds").mkdir()
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["build", "--data-dir", str(photos), "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert "birds" in result.output and "holds no image files" in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not out.exists()  # no run directory; the staging folder stays for --resume, as for any failure
    result = CliRunner().invoke(main, ["build", "--data-dir", str(photos), "--image-size", "0x0", "--out", str(out)])
    assert result.exit_code == 2 and "--image-size" in result.output


def _noise_folder(root: Path, counts: dict[str, int], seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def _build_cli(folder: Path, out: Path, *extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", "build", "--data-dir", str(folder), "--model",
                           "mnist-mlp", "--image-size", "8x8", "--epochs", "1", "--no-benchmark", "--out", str(out),
                           *extra], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.mark.slow
def test_a_model_at_chance_or_at_the_majority_rate_is_warned_about_and_min_accuracy_fails(tmp_path):
    """Noise images carry no class: the build must say the model learned nothing, on the console and in
    the report, and --min-accuracy must turn that into exit 1 (after the report is written)."""
    balanced = _build_cli(_noise_folder(tmp_path / "noise", {"a": 60, "b": 60, "c": 60}), tmp_path / "run-b",
                          "--min-accuracy", "90")
    assert balanced.returncode == 1, balanced.stderr
    assert "below --min-accuracy 90%" in balanced.stderr and (tmp_path / "run-b" / "report.json").exists()
    report = json.loads((tmp_path / "run-b" / "report.json").read_text())
    ci = next(v["interval_95"] for v in report["variants"] if v["variant"] == "int8")
    assert ci["low"] <= 1 / 3 <= ci["high"]  # noise, 18 test images: the interval holds chance
    assert "warning: int8: test accuracy" in balanced.stderr and "is at chance" in balanced.stderr
    assert ("at_chance", "int8") in {(n["kind"], n["variant"]) for n in report["notes"]}
    assert "is at chance" in (tmp_path / "run-b" / "report.md").read_text()

    skewed = _build_cli(_noise_folder(tmp_path / "skewed", {"cats": 90, "dogs": 10}), tmp_path / "run-s",
                        "--min-accuracy", "1")
    assert skewed.returncode == 0, skewed.stderr
    out = skewed.stdout + skewed.stderr
    assert "warning: the folder is imbalanced: 'cats' has" in out
    report = json.loads((tmp_path / "run-s" / "report.json").read_text())
    kinds = {(n["kind"], n["variant"]) for n in report["notes"]}
    recall = report["learning"]["recall"]["int8"]
    assert (recall["dogs"] == 0) == (("zero_recall", "int8") in kinds)
    int8 = next(v for v in report["variants"] if v["variant"] == "int8")
    majority = max(report["learning"]["test_counts"]) / sum(report["learning"]["test_counts"])
    ci = int8["interval_95"]
    at_majority = int8["accuracy"] <= majority or ci["low"] <= majority <= ci["high"]
    assert (("majority_class", "int8") in kinds) == at_majority
    assert (("majority_class", "int8") in kinds) == ("no better than always answering 'cats'" in out)


def test_validation_that_stalls_while_training_climbs_is_overfitting():
    from pipeline.report.notes import learning_notes

    base = {"variants": [], "learning": {"labels": ["a", "b"], "test_counts": [50, 50], "recall": {}}}
    stalled = {**base["learning"], "train_accuracy": [0.5, 0.7, 0.8, 0.9, 0.97],
               "val_accuracy": [0.5, 0.66, 0.65, 0.64, 0.66]}
    [note] = learning_notes({**base, "learning": stalled})
    assert note["kind"] == "overfitting" and "epoch 2 (66.0%)" in note["text"] and "97.0%" in note["text"]
    improving = {**stalled, "val_accuracy": [0.5, 0.66, 0.7, 0.75, 0.8]}
    assert learning_notes({**base, "learning": improving}) == []


def test_what_to_try_fits_who_trained_the_model():
    """A given --keras-model was told to try more --epochs or another --model, options its build refuses."""
    from pipeline.report.notes import learning_notes

    chance = {"variant": "int8", "accuracy": 0.5, "interval_95": {"low": 0.4, "high": 0.6}}
    learning = {"labels": ["a", "b"], "test_counts": [50, 50], "recall": {}}
    said = {who: learning_notes({"variants": [chance], "learning": {**learning, "trained_by": who}})[0]["text"]
            for who in ("build", "user", "search")}
    assert "--epochs" in said["build"] and "--model" in said["build"]
    assert "--epochs" not in said["user"] and "--model" not in said["user"] and "--input-range" in said["user"]
    assert "--budget-minutes" in said["search"] and "--epochs" not in said["search"]
    # A report written before it said who trained the model reads as the build's.
    assert learning_notes({"variants": [chance], "learning": learning})[0]["text"] == said["build"]


def test_the_default_recipe_fits_the_folder(tmp_path):
    """Grayscale -> mnist-cnn, small -> cifar-cnn (no BatchNorm), photos -> photo-cnn at 64x64, >= 50 steps an epoch;
    what the user chose stays, and the config says why the rest was chosen."""
    from pipeline.models import MIN_STEPS_PER_EPOCH

    def folder(name, mode, size, per_class=60):
        for c in ("a", "b"):
            (tmp_path / name / c).mkdir(parents=True)
            for i in range(per_class):
                Image.new(mode, size, 128).save(tmp_path / name / c / f"{i}.png")
        return str(tmp_path / name)

    gray = BuildConfig(dataset="folder", data_dir=folder("gray", "L", (28, 28)))
    assert (gray.model, gray.image_size, gray.augment) == ("mnist-cnn", None, False)
    assert "mnist-cnn for grayscale" in gray.folder_defaults and "flips mirror digits" in gray.folder_defaults
    assert gray.batch_size == 16 and 96 // gray.batch_size < MIN_STEPS_PER_EPOCH  # the floor: batch 16
    photos = folder("photos", "RGB", (300, 200), per_class=1500)
    rgb = BuildConfig(dataset="folder", data_dir=photos)
    assert (rgb.model, rgb.image_size, rgb.augment) == ("photo-cnn", "64x64", True)
    assert "photo-cnn for fewer than 5,000 photos" in rgb.folder_defaults and "photos of 200 px" in rgb.folder_defaults
    assert rgb.batch_size == 32  # the recipe's: 80% of 3,000 images for training are 75 steps an epoch
    small = BuildConfig(dataset="folder", data_dir=folder("small", "RGB", (32, 32), per_class=500))
    assert (small.model, small.image_size) == ("cifar-cnn", None)
    assert small.batch_size == 800 // MIN_STEPS_PER_EPOCH  # cut from the recipe's 64 for 50 steps an epoch
    mine = BuildConfig(dataset="folder", data_dir=photos, model="cifar-resnet8", image_size="32x32", batch_size=8)
    assert (mine.model, mine.image_size, mine.batch_size, mine.folder_defaults) == ("cifar-resnet8", "32x32", 8, None)
    assert BuildConfig.from_dict(rgb.to_dict()) == rgb


def test_images_in_two_splits_or_two_classes_are_warned_about_and_recorded(tmp_path):
    """A copy of a training image in test/ is scored as an image the model trained on: the build must say so."""
    root = tmp_path / "photos"
    _noise_folder(root / "train", {"cat": 6, "dog": 6})
    _noise_folder(root / "test", {"cat": 3, "dog": 3}, seed=1)
    _noise_folder(root / "val", {"cat": 2, "dog": 2}, seed=2)
    shutil.copy(root / "test" / "cat" / "2.png", root / "val" / "cat" / "from-test.png")
    shutil.copy(root / "train" / "cat" / "0.png", root / "test" / "cat" / "copy.png")
    Image.open(root / "train" / "dog" / "1.png").save(root / "test" / "dog" / "copy.bmp")  # another name, lossless
    shutil.copy(root / "train" / "cat" / "5.png", root / "train" / "dog" / "also-a-cat.png")
    lines = []
    data = load_dataset("folder", root, log=lines.append)
    found = data.source["duplicates"]
    assert found["test_in_train"] == 2 and found["val_in_train"] == 0 and found["test_in_val"] == 1
    assert sorted(found["examples"]) == ["test/cat/2.png = val/cat/from-test.png",
                                         "test/cat/copy.png = train/cat/0.png", "test/dog/copy.bmp = train/dog/1.png"]
    assert found["label_conflicts"] == 1
    assert found["label_conflict_examples"] == ["train/cat/5.png = train/dog/also-a-cat.png"]
    warnings = [line for line in lines if line.startswith("warning:")]
    assert any("2 test image(s) also in train" in w and "remove the copies" in w for w in warnings), lines
    assert any("1 image(s) are in two class folders" in w for w in warnings), lines
    assert any(w.startswith("warning: 1 test image(s) also in val") for w in warnings), lines

    clean = tmp_path / "clean"
    _noise_folder(clean, {"cat": 6, "dog": 6})
    lines.clear()
    assert "duplicates" not in load_dataset("folder", clean, log=lines.append).source
    assert not any("warning:" in line for line in lines)
