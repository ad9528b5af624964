"""pipeline.data: every offline format, pixel-exact, plus the one-line errors for every way a file goes wrong.

MNIST and CIFAR-10 files are written here, small, in their real formats (IDX headers, Python-2-style
pickled batches, the original tar member paths): these machines have no network and no CIFAR-10.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest

from pipeline.data import DATASETS, DataError, PreprocessSpec, load_dataset

REPO = Path(__file__).resolve().parent.parent
SHARED_MNIST = Path(os.environ.get("EDGEPIPE_MNIST_DIR", REPO.parent / "shared" / "datasets" / "mnist-9k"))
IDX = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def as_set(images: np.ndarray) -> set[bytes]:
    return {img.tobytes() for img in images}


def assert_one_line_naming(err: pytest.ExceptionInfo, *fragments) -> str:
    message = str(err.value)
    assert "\n" not in message and message.strip() == message
    for fragment in fragments:
        assert str(fragment) in message, (fragment, message)
    return message


# ---- MNIST fixtures: unique images, so splits can be traced back image by image ----

def fake_mnist(n_train=50, n_test=20):
    """Image i carries its index in pixel (0, 0)/(0, 1); test images also have (27, 27) = 255."""
    rng = np.random.default_rng(1)
    x = rng.integers(0, 255, (n_train + n_test, 28, 28), dtype=np.uint8)
    x[:, 0, 0], x[:, 0, 1] = np.arange(len(x)) % 256, np.arange(len(x)) // 256
    x[:n_train, 27, 27], x[n_train:, 27, 27] = 0, 255
    y = (np.arange(len(x)) % 10).astype(np.uint8)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


def idx_bytes(array: np.ndarray) -> bytes:
    magic = 2051 if array.ndim == 3 else 2049
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(folder: Path, arrays, gz: bool) -> list[Path]:
    paths = []
    for stem, array in zip(IDX, arrays):
        raw = idx_bytes(array)
        path = folder / (stem + ".gz" if gz else stem)
        path.write_bytes(gzip.compress(raw) if gz else raw)
        paths.append(path)
    return paths


@pytest.fixture
def mnist_idx(tmp_path):
    arrays = fake_mnist()
    write_idx(tmp_path, arrays, gz=False)
    return tmp_path, arrays


# ---- CIFAR-10 fixtures: the python-version batches as cPickle wrote them ----

def fake_cifar(per_batch=4, n_test=3):
    rng = np.random.default_rng(2)
    batches = {}
    for name in BATCHES:
        n = n_test if name == "test_batch" else per_batch
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        batches[name] = {b"batch_label": f"{name} of 6".encode(), b"labels": [int(v) for v in rng.integers(0, 10, n)],
                         b"data": data, b"filenames": [f"img_{i}.png".encode() for i in range(n)]}
    # A known pixel: test image 2, row 5, column 7 is (R, G, B) = (11, 201, 22); the planes are R, G, B.
    for plane, value in enumerate((11, 201, 22)):
        batches["test_batch"][b"data"][2, plane * 1024 + 5 * 32 + 7] = value
    return batches


def pickled(obj) -> bytes:
    return pickle.dumps(obj, protocol=2)  # the real batches are protocol-2 pickles


def write_cifar_dir(folder: Path, batches) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, batch in batches.items():
        (folder / name).write_bytes(pickled(batch))
    (folder / "batches.meta").write_bytes(pickled({b"label_names": [b"airplane"], b"num_vis": 3072}))
    return folder


def write_cifar_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        folder = tarfile.TarInfo("cifar-10-batches-py")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for name, raw in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


def nhwc(data: np.ndarray) -> np.ndarray:
    """The reference conversion, pixel by pixel: row r, column c, channel k is data[k*1024 + r*32 + c]."""
    out = np.empty((len(data), 32, 32, 3), np.uint8)
    for r in range(32):
        for c in range(32):
            for k in range(3):
                out[:, r, c, k] = data[:, k * 1024 + r * 32 + c]
    return out


# ---- registry, spec, import cost ----

def test_registry_matches_the_models():
    assert set(DATASETS) == {"mnist", "cifar10", "digits", "folder"}
    assert DATASETS["mnist"].default_model == DATASETS["digits"].default_model == "mnist-cnn"
    assert DATASETS["cifar10"].default_model == "cifar-cnn"
    assert DATASETS["mnist"].input_shape == DATASETS["digits"].input_shape == (28, 28, 1)
    assert DATASETS["cifar10"].input_shape == (32, 32, 3)
    assert DATASETS["cifar10"].labels[:2] == ("airplane", "automobile") and DATASETS["cifar10"].labels[-1] == "truck"
    assert DATASETS["mnist"].labels == tuple("0123456789")
    # A folder dataset has no file-format loader: pipeline.data.folders reads it.
    assert all((callable(info.loader) or name == "folder") and info.description for name, info in DATASETS.items())


def test_spec_round_trips_through_json():
    spec = DATASETS["cifar10"].spec
    assert spec.color == "rgb" and spec.layout == "NHWC" and spec.scale == pytest.approx(1 / 255)
    d = json.loads(json.dumps(spec.to_dict()))
    assert d["labels"] == list(DATASETS["cifar10"].labels)
    assert PreprocessSpec.from_dict(d) == spec
    assert PreprocessSpec(28, 28, 1, labels=["a", "b"]).color == "grayscale"
    with pytest.raises(ValueError, match="grayscale"):
        PreprocessSpec(28, 28, 1, labels=("a",), color="rgb")


def test_import_does_not_load_tensorflow_or_sklearn():
    code = "import sys, pipeline.data; print([m for m in ('tensorflow', 'keras', 'sklearn') if m in sys.modules])"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]"


# ---- MNIST ----

@pytest.mark.skipif(not (SHARED_MNIST / "mnist.npz").is_file(),
                    reason=f"real MNIST subset not found at {SHARED_MNIST} (set EDGEPIPE_MNIST_DIR)")
def test_real_mnist_npz():
    data = load_dataset("mnist", str(SHARED_MNIST))  # a str, as BuildConfig passes it
    with np.load(SHARED_MNIST / "mnist.npz") as d:
        y_train, x_test, y_test = d["y_train"], d["x_test"], d["y_test"]
    assert data.x_train.shape == (7200, 28, 28, 1) and data.x_val.shape == (800, 28, 28, 1)
    assert data.x_train.dtype == np.uint8 and data.y_train.dtype == data.y_test.dtype == np.int64
    np.testing.assert_array_equal(data.x_test[..., 0], x_test)
    np.testing.assert_array_equal(data.y_test, y_test)
    assert sorted(np.concatenate([data.y_train, data.y_val])) == sorted(y_train)
    assert data.source["kind"] == "npz" and data.source["counts"] == {"train": 7200, "val": 800, "test": 1000}
    npz = SHARED_MNIST / "mnist.npz"
    assert data.source["files"] == [{"path": str(npz), "sha256": sha256(npz)}]
    assert len(data.source["sha256"]) == 64 and data.spec.to_dict()["height"] == 28


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_mnist_idx_round_trip(tmp_path, gz):
    x_train, y_train, x_test, y_test = fake_mnist()
    paths = write_idx(tmp_path, (x_train, y_train, x_test, y_test), gz)
    data = load_dataset("mnist", tmp_path, validation_fraction=0.2)
    assert data.source["kind"] == "idx"
    assert data.source["files"] == [{"path": str(p), "sha256": sha256(p)} for p in paths]
    assert data.x_test.shape == (20, 28, 28, 1) and data.x_test.dtype == np.uint8
    np.testing.assert_array_equal(data.x_test[..., 0], x_test)
    np.testing.assert_array_equal(data.y_test, y_test)
    # Every train image lands in train or val exactly once, with its own label (index in pixel (0, 0)).
    assert len(data.x_train) == 40 and len(data.x_val) == 10
    merged = np.concatenate([data.x_train, data.x_val])[..., 0]
    merged_y = np.concatenate([data.y_train, data.y_val])
    np.testing.assert_array_equal(merged[np.argsort(merged[:, 0, 0])], x_train)
    np.testing.assert_array_equal(merged_y[np.argsort(merged[:, 0, 0])], y_train)


def test_same_data_same_hash_in_any_format(tmp_path):
    x_train, y_train, x_test, y_test = fake_mnist()
    (tmp_path / "idx").mkdir()
    (tmp_path / "npz").mkdir()
    write_idx(tmp_path / "idx", (x_train, y_train, x_test, y_test), gz=True)
    np.savez(tmp_path / "npz" / "mnist.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    from_idx, from_npz = load_dataset("mnist", tmp_path / "idx"), load_dataset("mnist", tmp_path / "npz", seed=5)
    assert from_npz.source["kind"] == "npz" and from_idx.source["kind"] == "idx"
    assert from_idx.source["sha256"] == from_npz.source["sha256"]
    x_train[3, 10, 10] ^= 1
    np.savez(tmp_path / "npz" / "mnist.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    assert load_dataset("mnist", tmp_path / "npz").source["sha256"] != from_idx.source["sha256"]


def test_validation_is_seeded_from_train_and_never_touches_test(mnist_idx):
    folder, (x_train, _, x_test, _) = mnist_idx
    a, a_again, b = (load_dataset("mnist", folder, seed=s) for s in (0, 0, 1))
    np.testing.assert_array_equal(a.x_val, a_again.x_val)
    assert as_set(a.x_val) != as_set(b.x_val)
    for data in (a, b):
        val = as_set(data.x_val[..., 0])
        assert val <= as_set(x_train) and not val & as_set(x_test) and not val & as_set(data.x_train[..., 0])
        assert (data.x_val[:, 27, 27] == 0).all()  # the test-image marker
    assert len(a.x_val) == 5 and len(load_dataset("mnist", folder, validation_fraction=0.001).x_val) == 1
    assert len(load_dataset("mnist", folder, validation_fraction=0).x_val) == 0


# ---- CIFAR-10 ----

@pytest.mark.parametrize("layout", ["batches-folder", "data-dir-is-batches", "tar.gz"])
def test_cifar10_round_trip(tmp_path, layout):
    batches = fake_cifar()
    if layout == "batches-folder":
        write_cifar_dir(tmp_path / "cifar-10-batches-py", batches)
        read = [tmp_path / "cifar-10-batches-py" / b for b in BATCHES]
    elif layout == "data-dir-is-batches":
        read = [write_cifar_dir(tmp_path, batches) / b for b in BATCHES]
    else:
        read = [write_cifar_tar(tmp_path / "cifar-10-python.tar.gz",
                                {"readme.html": b"<html>", **{b: pickled(batches[b]) for b in reversed(BATCHES)}})]
    data = load_dataset("cifar10", tmp_path, validation_fraction=0.25)
    assert data.source["kind"] == ("cifar-tar" if layout == "tar.gz" else "cifar-batches")
    assert data.source["files"] == [{"path": str(p), "sha256": sha256(p)} for p in read]
    assert data.x_test.shape == (3, 32, 32, 3) and data.x_test.dtype == np.uint8 and data.y_test.dtype == np.int64
    assert data.x_test[2, 5, 7].tolist() == [11, 201, 22]
    np.testing.assert_array_equal(data.x_test, nhwc(batches["test_batch"][b"data"]))
    assert data.y_test.tolist() == batches["test_batch"][b"labels"]
    assert len(data.x_train) == 15 and len(data.x_val) == 5 and data.spec.color == "rgb"
    # Train and val together are exactly the five train batches, each image still with its own label.
    expected = zip(nhwc(np.concatenate([batches[b][b"data"] for b in BATCHES[:5]])),
                   sum((batches[b][b"labels"] for b in BATCHES[:5]), []))
    loaded = zip(np.concatenate([data.x_train, data.x_val]), np.concatenate([data.y_train, data.y_val]))
    assert {(x.tobytes(), int(y)) for x, y in loaded} == {(x.tobytes(), y) for x, y in expected}


# ---- digits ----

def test_digits_in_mnist_layout():
    data = load_dataset("digits")
    assert data.x_train.shape[1:] == (28, 28, 1) and data.x_train.dtype == np.uint8
    assert len(data.x_train) + len(data.x_val) == 1437 and len(data.x_test) == 360 and len(data.x_val) == 144
    assert data.x_train.max() == 255 and data.x_train.min() == 0
    everything = np.concatenate([data.x_train, data.x_val, data.x_test])
    assert not everything[:, :4].any() and not everything[:, -4:].any()  # 4-pixel empty frame, like MNIST
    assert not everything[:, :, :4].any() and not everything[:, :, -4:].any()
    assert everything[:, 4:24, 4:24].mean() > 30  # the 20x20 box holds the ink
    assert np.bincount(data.y_test).min() >= 35  # stratified: every class has about 36 of the 360
    assert data.source["kind"] == "sklearn" and data.source["files"] == []


def test_digits_split_is_fixed_and_validation_follows_seed():
    a, b = load_dataset("digits", seed=0), load_dataset("digits", seed=7)
    np.testing.assert_array_equal(a.x_test, b.x_test)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert a.source["sha256"] == b.source["sha256"]
    assert as_set(np.concatenate([a.x_train, a.x_val])) == as_set(np.concatenate([b.x_train, b.x_val]))
    assert as_set(a.x_val) != as_set(b.x_val)


# ---- errors: DataError, one line, naming the file or directory ----

def _missing_dir(tmp_path):
    return "mnist", tmp_path / "nope", [tmp_path / "nope", "does not exist", "mnist.npz"]


def _empty_dir_mnist(tmp_path):
    return "mnist", tmp_path, [tmp_path, "mnist.npz", "train-images-idx3-ubyte", ".gz"]


def _empty_dir_cifar(tmp_path):
    return "cifar10", tmp_path, [tmp_path, "cifar-10-batches-py", "cifar-10-python.tar.gz"]


def _three_idx_files(tmp_path):
    write_idx(tmp_path, fake_mnist(), gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    return "mnist", tmp_path, [tmp_path, "missing t10k-labels-idx1-ubyte"]


def _garbage_npz(tmp_path):
    (tmp_path / "mnist.npz").write_bytes(b"this is not a zip file" * 10)
    return "mnist", tmp_path, [tmp_path / "mnist.npz", "x_train"]


def _truncated_npz(tmp_path):
    x_train, y_train, x_test, y_test = fake_mnist()
    np.savez(tmp_path / "mnist.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    raw = (tmp_path / "mnist.npz").read_bytes()
    (tmp_path / "mnist.npz").write_bytes(raw[: len(raw) // 2])
    return "mnist", tmp_path, [tmp_path / "mnist.npz", "not a zip archive"]


def _npz_corrupt_member(tmp_path):
    x_train, y_train, x_test, y_test = fake_mnist()
    np.savez(tmp_path / "mnist.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    raw = bytearray((tmp_path / "mnist.npz").read_bytes())
    raw[1000:1010] = bytes(10)  # inside x_train's pixels: the zip's CRC no longer matches
    (tmp_path / "mnist.npz").write_bytes(bytes(raw))
    return "mnist", tmp_path, [tmp_path / "mnist.npz", "not a readable .npz", "CRC"]


def _npz_missing_key(tmp_path):
    x_train, y_train, x_test, _ = fake_mnist()
    np.savez(tmp_path / "mnist.npz", x_train=x_train, y_train=y_train, x_test=x_test)
    return "mnist", tmp_path, [tmp_path / "mnist.npz", "y_test"]


def _npz_wrong_shape(tmp_path):
    x = np.zeros((5, 32, 32), np.uint8)
    np.savez(tmp_path / "mnist.npz", x_train=x, y_train=np.zeros(5, np.uint8), x_test=x, y_test=np.zeros(5, np.uint8))
    return "mnist", tmp_path, [tmp_path / "mnist.npz", "(5, 32, 32)", "(N, 28, 28, 1)"]


def _npz_float_pixels(tmp_path):
    x_train, y_train, x_test, y_test = fake_mnist()
    np.savez(tmp_path / "mnist.npz", x_train=x_train / 255, y_train=y_train, x_test=x_test, y_test=y_test)
    return "mnist", tmp_path, [tmp_path / "mnist.npz", "float64", "uint8"]


def _idx_bad_magic(tmp_path):
    paths = write_idx(tmp_path, fake_mnist(), gz=False)
    paths[0].write_bytes(b"\x00\x00\x08\x01" + paths[0].read_bytes()[4:])  # a label magic on the images
    return "mnist", tmp_path, [paths[0], "magic number 2049", "2051"]


def _idx_gzip_without_gz_name(tmp_path):
    paths = write_idx(tmp_path, fake_mnist(), gz=False)
    paths[3].write_bytes(gzip.compress(paths[3].read_bytes()))
    return "mnist", tmp_path, [paths[3], "gzip-compressed", "add .gz"]


def _idx_truncated(tmp_path):
    paths = write_idx(tmp_path, fake_mnist(), gz=True)
    raw = gzip.decompress(paths[2].read_bytes())
    paths[2].write_bytes(gzip.compress(raw[:-100]))
    return "mnist", tmp_path, [paths[2], "truncated", f"expected {len(raw)}"]


def _idx_bad_gzip(tmp_path):
    paths = write_idx(tmp_path, fake_mnist(), gz=True)
    paths[1].write_bytes(paths[1].read_bytes()[:20])
    return "mnist", tmp_path, [paths[1], "gzip"]


def _idx_count_mismatch(tmp_path):
    x_train, y_train, x_test, y_test = fake_mnist()
    paths = write_idx(tmp_path, (x_train, y_train[:-1], x_test, y_test), gz=False)
    return "mnist", tmp_path, [paths[0], paths[1], "50 images", "(49,)"]


def _idx_wrong_image_size(tmp_path):
    paths = write_idx(tmp_path, fake_mnist(), gz=False)
    paths[2].write_bytes(idx_bytes(np.zeros((20, 32, 32), np.uint8)))
    return "mnist", tmp_path, [paths[2], "32x32", "28x28"]


def _one_training_image(tmp_path):
    x_train, y_train, x_test, y_test = fake_mnist(n_train=1)
    write_idx(tmp_path, (x_train, y_train, x_test, y_test), gz=False)
    return "mnist", tmp_path, ["1 training image(s)", "none left"]


def _labels_out_of_range(tmp_path):
    x_train, y_train, x_test, y_test = fake_mnist()
    y_test[4] = 12
    paths = write_idx(tmp_path, (x_train, y_train, x_test, y_test), gz=False)
    return "mnist", tmp_path, [paths[3], "0..12", "0..9"]


def _cifar_missing_batch(tmp_path):
    folder = write_cifar_dir(tmp_path / "cifar-10-batches-py", fake_cifar())
    (folder / "data_batch_3").unlink()
    return "cifar10", tmp_path, [folder, "missing data_batch_3"]


def _cifar_garbage_pickle(tmp_path):
    folder = write_cifar_dir(tmp_path, fake_cifar())
    (folder / "data_batch_2").write_bytes(pickled(fake_cifar()["data_batch_2"])[:500])
    return "cifar10", tmp_path, [folder / "data_batch_2", "not a readable CIFAR-10 batch"]


def _cifar_missing_labels(tmp_path):
    batches = fake_cifar()
    del batches["test_batch"][b"labels"]
    folder = write_cifar_dir(tmp_path, batches)
    return "cifar10", tmp_path, [folder / "test_batch", "b'labels'"]


def _cifar_wrong_width(tmp_path):
    batches = fake_cifar()
    batches["data_batch_5"][b"data"] = batches["data_batch_5"][b"data"][:, :3000]
    folder = write_cifar_dir(tmp_path, batches)
    return "cifar10", tmp_path, [folder / "data_batch_5", "(4, 3000)", "3072"]


def _cifar_truncated_tar(tmp_path):
    path = write_cifar_tar(tmp_path / "cifar-10-python.tar.gz", {b: pickled(v) for b, v in fake_cifar().items()})
    path.write_bytes(path.read_bytes()[:3000])
    return "cifar10", tmp_path, [path, "not a readable .tar.gz"]


def _cifar_tar_missing_member(tmp_path):
    members = {b: pickled(v) for b, v in fake_cifar().items() if b != "test_batch"}
    path = write_cifar_tar(tmp_path / "cifar-10-python.tar.gz", members)
    return "cifar10", tmp_path, [path, "cifar-10-batches-py/test_batch"]


def _digits_with_data_dir(tmp_path):
    return "digits", tmp_path, [tmp_path, "--dataset digits", "drop --data-dir"]


ERROR_CASES = [_missing_dir, _empty_dir_mnist, _empty_dir_cifar, _three_idx_files, _garbage_npz, _truncated_npz,
               _npz_corrupt_member, _npz_missing_key, _npz_wrong_shape, _npz_float_pixels, _idx_bad_magic,
               _idx_gzip_without_gz_name, _idx_truncated, _idx_bad_gzip, _idx_count_mismatch, _idx_wrong_image_size,
               _one_training_image, _labels_out_of_range, _cifar_missing_batch, _cifar_garbage_pickle,
               _cifar_missing_labels, _cifar_wrong_width, _cifar_truncated_tar, _cifar_tar_missing_member,
               _digits_with_data_dir]


@pytest.mark.parametrize("case", ERROR_CASES, ids=[c.__name__.strip("_") for c in ERROR_CASES])
def test_bad_data_gives_one_line_naming_the_culprit(tmp_path, case):
    name, data_dir, fragments = case(tmp_path)
    with pytest.raises(DataError) as err:
        load_dataset(name, data_dir)
    assert_one_line_naming(err, *fragments)


def test_a_pickle_that_runs_code_is_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    folder = write_cifar_dir(tmp_path / "cifar-10-batches-py", fake_cifar())
    (folder / "data_batch_1").write_bytes(pickle.dumps({b"data": Exploit(), b"labels": []}, protocol=2))
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", tmp_path)
    assert_one_line_naming(err, folder / "data_batch_1", "refusing to load")
    assert not marker.exists()


def test_unknown_dataset():
    with pytest.raises(DataError) as err:
        load_dataset("imagenet")
    assert_one_line_naming(err, "imagenet", "mnist, cifar10, digits")


# ---- no network ----

@pytest.mark.parametrize("name", ["cifar10"])  # MNIST falls back to the digits instead (below)
@pytest.mark.parametrize("failure", [
    Exception("URL fetch failure on https://storage.googleapis.com/x.npz: None -- [Errno -3] Temporary failure\n"
              "in name resolution"),  # what Keras raises
    urllib.error.URLError(OSError(101, "Network is unreachable")),
], ids=["keras-exception", "urlerror"])
def test_offline_download_failure_explains_the_way_out(monkeypatch, name, failure):
    import keras

    def offline():
        raise failure

    monkeypatch.setattr(getattr(keras.datasets, name), "load_data", offline)
    with pytest.raises(DataError) as err:
        load_dataset(name)
    message = assert_one_line_naming(err, f"{name}: download", "--data-dir DIR", "--dataset digits")
    assert ("name resolution" in message) or ("Network is unreachable" in message)
    assert ("mnist.npz" in message) if name == "mnist" else ("cifar-10-python.tar.gz" in message)


def test_mnist_without_network_falls_back_to_the_digits_and_the_manifest_says_so(tmp_path):
    """The main command works on a machine without network: a real failed download (no internet, an empty
    Keras cache) ends in the scikit-learn digits, one line saying so and how to get the full set."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "KERAS_HOME": str(tmp_path / "keras"), "HOME": str(tmp_path)}
    env.pop("EDGEPIPE_MNIST_DIR", None)
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "build", "--quantize", "int8", "--epochs", "1",
                           "--no-benchmark", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = [line for line in (proc.stdout + proc.stderr).splitlines() if "using scikit-learn's" in line]
    assert len(said) == 1, proc.stdout[-3000:]
    assert "MNIST download failed" in said[0] and "1,797 8x8 digits" in said[0]
    assert "--data-dir" in said[0] and "network" in said[0]  # how to get the full set
    source = json.loads((tmp_path / "run" / "manifest.json").read_text())["data"]
    assert source["kind"] == "sklearn (stand-in: the MNIST download failed)"
    digits = load_dataset("digits")
    assert source["sha256"] == digits.source["sha256"]  # the pixels recorded are the digits' own
    assert source["counts"] == digits.source["counts"]
