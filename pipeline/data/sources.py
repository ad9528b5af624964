"""The file formats of the named datasets: keras.datasets online; MNIST npz / IDX; CIFAR-10 batches; sklearn digits.

Each loader takes (info, data_dir, log) and returns (source kind, (x_train, y_train), (x_test, y_test),
files read), with images checked to uint8 NHWC and labels to int64 by `_check`.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np

from pipeline.data.dataset import DataError, DatasetInfo, Loaded


class DownloadError(DataError):
    """keras.datasets could not fetch a dataset (offline, blocked, a damaged cache)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason

DIGIT_LABELS = tuple("0123456789")


def _check(where: str, x, y, info: DatasetInfo) -> tuple[np.ndarray, np.ndarray]:
    """Images to uint8 (N, H, W, C) and labels to int64 (N,), or a DataError saying what is wrong."""
    x, y = np.asarray(x), np.asarray(y)
    shape, found = info.input_shape, f"{x.dtype} {x.shape}"
    if shape[-1] == 1 and x.shape[1:] == shape[:-1]:
        x = x[..., None]  # MNIST files store (N, 28, 28)
    if x.dtype != np.uint8 or x.shape[1:] != shape or len(x) == 0:
        raise DataError(f"{where}: images are {found}; expected uint8 pixels shaped "
                        f"(N, {', '.join(map(str, shape))}) with N > 0; is this the right dataset?")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]  # keras.datasets.cifar10 returns (N, 1)
    if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{where}: {len(x)} images but labels are {y.dtype} {y.shape}; expected {len(x)} "
                        f"integer labels, one per image; the file is truncated or mismatched")
    if y.min() < 0 or y.max() >= len(info.labels):
        raise DataError(f"{where}: labels range {y.min()}..{y.max()}; expected 0..{len(info.labels) - 1}")
    return np.ascontiguousarray(x), y.astype(np.int64)


def _download(name: str, info: DatasetInfo) -> Loaded:
    import keras  # here, not at the top: TensorFlow takes seconds to import and --help must not wait

    try:
        (x_train, y_train), (x_test, y_test) = getattr(keras.datasets, name).load_data()
    except Exception as e:  # Keras reports every fetch failure as a bare Exception
        reason = " ".join(str(e).split())[:200]
        raise DownloadError(f"{name}: download through keras.datasets failed ({reason}); to work offline pass "
                            f"--data-dir DIR holding {info.offline}, or use --dataset digits (ships with "
                            f"scikit-learn, needs no network)", reason) from e
    where = f"keras.datasets.{name}"
    return "keras.datasets", _check(where, x_train, y_train, info), _check(where, x_test, y_test, info), []


def _data_dir(data_dir: Path, info: DatasetInfo) -> Path:
    if not data_dir.is_dir():
        state = "is a file, not a directory" if data_dir.exists() else "does not exist"
        raise DataError(f"--data-dir {data_dir}: {state}; expected a directory holding {info.offline}")
    return data_dir


def _read(path: Path, files: list) -> bytes:
    """Whole file, hashed as read, so `files` records exactly the bytes that were parsed."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e}); check that the file is readable") from e
    files.append({"path": str(path), "sha256": hashlib.sha256(raw).hexdigest()})
    return raw


# ---- MNIST: Keras's mnist.npz or the four IDX files from the original distribution ----

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def load_mnist(info: DatasetInfo, data_dir: Path | None, log=print) -> Loaded:
    if data_dir is None:
        try:
            return _download("mnist", info)
        except DownloadError as e:
            # The main command must work on a machine without network; the digits are real handwriting in
            # MNIST's layout, so every model and stage runs, and the manifest's data source says which it was.
            log(f"data: MNIST download failed ({e.reason[:80]}); using scikit-learn's 1,797 8x8 digits in the MNIST "
                "layout instead; for the full 70,000 pass --data-dir DIR holding mnist.npz or the IDX files, or "
                "build with network")
            kind, train, test, files = load_digits(info, None)
            return f"{kind} (stand-in: the MNIST download failed)", train, test, files
    folder, files = _data_dir(data_dir, info), []
    if (folder / "mnist.npz").is_file():
        return "npz", *_read_npz(folder / "mnist.npz", files, info), files
    paths = [next((p for p in (folder / stem, folder / f"{stem}.gz") if p.is_file()), None) for stem in IDX_FILES]
    missing = [stem for stem, path in zip(IDX_FILES, paths) if path is None]
    if len(missing) == len(IDX_FILES):
        raise DataError(f"--data-dir {folder}: holds none of the MNIST files; expected {info.offline}")
    if missing:
        raise DataError(f"--data-dir {folder}: missing {', '.join(missing)} (raw or .gz); all four MNIST IDX "
                        f"files are needed, or mnist.npz instead")

    def split(images: Path, labels: Path) -> tuple[np.ndarray, np.ndarray]:
        return _check(f"{images} with {labels}", _read_idx(images, 2051, files), _read_idx(labels, 2049, files), info)

    return "idx", split(*paths[:2]), split(*paths[2:]), files


def _read_npz(path: Path, files: list, info: DatasetInfo) -> tuple[tuple, tuple]:
    expected = "the Keras mnist.npz with arrays x_train, y_train, x_test, y_test"
    raw = _read(path, files)
    # Checked first: on anything but a zip, np.load guesses .npy or pickle and its errors mislead.
    if not zipfile.is_zipfile(io.BytesIO(raw)):
        raise DataError(f"{path}: not a zip archive (truncated, or not an .npz); expected {expected}; "
                        f"download it again")
    try:
        # allow_pickle=False: an .npz must never be able to run code while it loads.
        with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
            missing = [k for k in NPZ_KEYS if k not in npz.files]
            if missing:
                raise DataError(f"{path}: no array(s) {', '.join(missing)}; expected {expected}")
            arrays = {k: npz[k] for k in NPZ_KEYS}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise DataError(f"{path}: not a readable .npz ({e}); expected {expected}; download it again") from e
    return (_check(f"{path} (x_train, y_train)", arrays["x_train"], arrays["y_train"], info),
            _check(f"{path} (x_test, y_test)", arrays["x_test"], arrays["y_test"], info))


def _read_idx(path: Path, magic: int, files: list) -> np.ndarray:
    """One IDX file: a big-endian magic (0x0803: uint8, 3 dims; 0x0801: uint8, 1 dim), the dims, the bytes."""
    raw = _read(path, files)
    what = f"MNIST IDX {'image' if magic == 2051 else 'label'} file (magic {magic})"
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: not valid gzip ({e}); expected a gzip-compressed {what}; "
                            f"download it again") from e
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    got = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if got != magic or len(raw) < header:
        fix = ("it is gzip-compressed, so add .gz to its name" if raw[:2] == b"\x1f\x8b"
               else "check that the file names are not swapped")
        raise DataError(f"{path}: magic number {got}, {len(raw)} bytes; expected an {what}; {fix}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    if ndim == 3 and dims[1:] != (28, 28):
        raise DataError(f"{path}: images are {dims[1]}x{dims[2]}; expected 28x28 MNIST digits")
    size = header + int(np.prod(dims))
    if len(raw) != size:
        raise DataError(f"{path}: {len(raw)} bytes, expected {size} for dims {dims}; the file is truncated "
                        f"or corrupt, download it again")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims).copy()  # copy: frombuffer is read-only


# ---- CIFAR-10: the python-version batches, as a folder or as the original .tar.gz ----

CIFAR_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
CIFAR_LABELS = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR_ORIGIN = "the python version from https://www.cs.toronto.edu/~kriz/cifar.html"


def load_cifar10(info: DatasetInfo, data_dir: Path | None, log=print) -> Loaded:
    if data_dir is None:
        return _download("cifar10", info)
    folder, files = _data_dir(data_dir, info), []
    batches_dir = next((d for d in (folder, folder / "cifar-10-batches-py")
                        if any((d / b).is_file() for b in CIFAR_BATCHES)), None)
    if batches_dir:
        missing = [b for b in CIFAR_BATCHES if not (batches_dir / b).is_file()]
        if missing:
            raise DataError(f"{batches_dir}: missing {', '.join(missing)}; expected all of "
                            f"{', '.join(CIFAR_BATCHES)} ({CIFAR_ORIGIN})")
        kind, raws = "cifar-batches", {str(batches_dir / b): _read(batches_dir / b, files) for b in CIFAR_BATCHES}
    elif (folder / "cifar-10-python.tar.gz").is_file():
        kind, raws = "cifar-tar", _cifar_tar(folder / "cifar-10-python.tar.gz", files)
    else:
        raise DataError(f"--data-dir {folder}: holds none of the CIFAR-10 files; expected {info.offline}")
    batches = [_cifar_batch(raw, where, info) for where, raw in raws.items()]  # data_batch_1..5, test_batch
    train = np.concatenate([x for x, _ in batches[:5]]), np.concatenate([y for _, y in batches[:5]])
    return kind, train, batches[5], files


def _cifar_tar(path: Path, files: list) -> dict[str, bytes]:
    """The six batch members' bytes, keyed '<archive>:<member>' and in CIFAR_BATCHES order."""
    wanted = [f"cifar-10-batches-py/{b}" for b in CIFAR_BATCHES]
    members: dict[str, bytes] = {}
    try:
        # One pass in archive order: looking members up by name would re-decompress the gzip per seek.
        with tarfile.open(fileobj=io.BytesIO(_read(path, files)), mode="r:gz") as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                if name in wanted and member.isfile():
                    members[name] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: not a readable .tar.gz ({e}); expected cifar-10-python.tar.gz "
                        f"({CIFAR_ORIGIN}); download it again") from e
    missing = [name for name in wanted if name not in members]
    if missing:
        raise DataError(f"{path}: no member(s) {', '.join(missing)}; expected cifar-10-python.tar.gz "
                        f"({CIFAR_ORIGIN})")
    return {f"{path}:{name}": members[name] for name in wanted}


class _ArraysOnly(pickle.Unpickler):
    """CIFAR batches are pickles, and a pickle can run any code; these are all a numpy array needs."""
    # numpy.core is the name in pickles written before numpy 2 (the real batches), numpy._core after.
    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
               *((f"numpy.{core}.multiarray", n) for core in ("core", "_core") for n in ("_reconstruct", "scalar")),
               *((f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core"))}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}, which is not part of a numpy array")
        return super().find_class(module, name)


def _cifar_batch(raw: bytes, where: str, info: DatasetInfo) -> tuple[np.ndarray, np.ndarray]:
    expected = f"a pickled dict with b'data' (N, 3072) uint8 and b'labels' ({CIFAR_ORIGIN})"
    try:
        # encoding="bytes": the batches were pickled by Python 2, so their keys load as b"data", b"labels".
        batch = _ArraysOnly(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:  # a damaged pickle can fail with almost any exception type
        raise DataError(f"{where}: not a readable CIFAR-10 batch ({type(e).__name__}: {e}); expected {expected}; "
                        f"download it again") from e
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        found = f"keys {', '.join(map(repr, batch))}" if isinstance(batch, dict) else type(batch).__name__
        raise DataError(f"{where}: holds {found}; expected {expected}")
    data = np.asarray(batch[b"data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{where}: b'data' is {data.dtype} {data.shape}; expected {expected}")
    # Each row is the whole R plane, then G, then B, each 32x32 row-major: split planes, move channels last.
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return _check(where, images, batch[b"labels"], info)


# ---- digits: scikit-learn's 1,797 real 8x8 digits, brought to the MNIST layout ----

def load_digits(info: DatasetInfo, data_dir: Path | None, log=print) -> Loaded:
    if data_dir is not None:
        # Rejected rather than ignored: a silently skipped --data-dir lets users believe their files were used.
        raise DataError(f"--data-dir {data_dir}: --dataset digits reads no files (the digits ship with "
                        f"scikit-learn); drop --data-dir, or use --dataset mnist to read MNIST from it")
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    small = np.rint(digits.images * (255 / 16)).astype(np.uint8)  # 0..16 ink counts to 0..255
    # MNIST centres each digit in a 20x20 box inside a 28x28 frame; do the same, so the models fit.
    boxes = np.stack([np.asarray(Image.fromarray(d).resize((20, 20), Image.Resampling.BILINEAR)) for d in small])
    x = np.pad(boxes, ((0, 0), (4, 4), (4, 4)))
    # The test split is fixed (constant seed, not --seed) so accuracies stay comparable across runs.
    x_train, x_test, y_train, y_test = train_test_split(x, digits.target, test_size=0.2, random_state=0,
                                                        stratify=digits.target)
    where = "sklearn.datasets.load_digits"
    return "sklearn", _check(where, x_train, y_train, info), _check(where, x_test, y_test, info), []


