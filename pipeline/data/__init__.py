"""Where images come from: the Dataset every stage uses, the registry of named datasets, load_dataset().

Online users get `keras.datasets` (download and cache). Offline users point `--data-dir` at whatever
they downloaded; the file formats are parsed in `sources.py`, so a corrupt or misplaced file ends in
a one-line DataError naming it, not in a traceback from numpy, gzip or pickle. Every load also
records where its pixels came from, so a manifest can say what a model was trained on.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

# The package's API: the shared types (dataset.py) and the loaders (folders.py, sources.py).
from pipeline.data.dataset import DataError, Dataset, DatasetInfo, Loaded, PreprocessSpec, _arrays_sha256  # noqa: F401
from pipeline.data.folders import FOLDER_LAYOUT, is_image_folder, load_folder_dataset
from pipeline.data.sources import CIFAR_LABELS, DIGIT_LABELS, IDX_FILES, load_cifar10, load_digits, load_mnist


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, *, seed: int = 0,
                 validation_fraction: float = 0.1, input_shape: tuple[int, int, int] | None = None,
                 log=print) -> Dataset:
    """Load `name` from the network or from `data_dir`; validation is a seeded slice of the train split.

    Image folders (`--dataset folder`, or CIFAR-10 as JPEGs) are decoded to `input_shape` (default: the
    dataset's standard size) and split by class.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset '{name}'; choose from {', '.join(DATASETS)}")
    if not 0 <= validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    info = DATASETS[name]
    shape = tuple(input_shape or info.input_shape)
    if name == "folder" or (name == "cifar10" and data_dir is not None and is_image_folder(data_dir)):
        if data_dir is None:
            raise DataError("--dataset folder reads your images: pass --data-dir DIR holding one folder per class")
        return load_folder_dataset(name, Path(data_dir).expanduser(), shape, seed=seed, log=log,
                                   validation_fraction=validation_fraction,
                                   expected_labels=info.labels if name != "folder" else None)
    if shape != info.input_shape:
        raise DataError(f"{name}: images from {info.offline or 'this source'} are "
                        f"{'x'.join(map(str, info.input_shape[:2]))}; only image folders are resized, drop "
                        f"--image-size")
    kind, (x_train, y_train), (x_test, y_test), files = info.loader(
        info, None if data_dir is None else Path(data_dir).expanduser(), log)
    n = len(x_train)
    n_val = max(1, round(n * validation_fraction)) if validation_fraction > 0 else 0
    if n_val >= n:
        raise DataError(f"{name}: {n} training image(s), none left after {n_val} for validation; check the data files")
    order = np.random.default_rng(seed).permutation(n)
    val, train = order[:n_val], order[n_val:]
    source = {
        "kind": kind,
        "files": files,
        # Hashes the pixels and labels, not the files: the same data gives the same hash in any format.
        "sha256": _arrays_sha256(x_train, y_train, x_test, y_test),
        "counts": {"train": len(train), "val": len(val), "test": len(x_test)},
    }
    return Dataset(name, x_train[train], y_train[train], x_train[val], y_train[val], x_test, y_test, info.spec, source)



DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo(
        "MNIST handwritten digits: 60,000 train / 10,000 test, 28x28 grayscale",
        (28, 28, 1), DIGIT_LABELS, "mnist-cnn", load_mnist,
        offline="mnist.npz (Keras layout) or the four IDX files " + ", ".join(IDX_FILES) + " (raw or .gz)"),
    "cifar10": DatasetInfo(
        "CIFAR-10 photos in 10 classes: 50,000 train / 10,000 test, 32x32 RGB",
        (32, 32, 3), CIFAR_LABELS, "cifar-cnn", load_cifar10,
        offline="the cifar-10-batches-py folder (data_batch_1..5, test_batch), its contents, "
                "cifar-10-python.tar.gz, or the images in class folders (train/airplane/*.jpg ...)"),
    "digits": DatasetInfo(
        "scikit-learn's 1,797 real 8x8 digits in the MNIST layout (28x28 grayscale); no network, no files",
        (28, 28, 1), DIGIT_LABELS, "mnist-cnn", load_digits),
    "folder": DatasetInfo(
        "your own images, one folder per class (optionally under train/, val/, test/); any format Pillow "
        "reads, resized to --image-size (default 32x32), RGB unless the model takes grayscale",
        (32, 32, 3), (), "cifar-resnet8", None, offline=FOLDER_LAYOUT),
}
