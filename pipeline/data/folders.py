"""Class-folder image sets: discovery, decoding on every core, resizing, and the decode cache.

DIR holds one folder per class, directly or under train/ (with optional val/ and test/). Class names
are the folder names in sorted order, which is also CIFAR-10's label order. Every image goes through
`device.core.load_image`, the function the runner uses on a board, so a photo is resized exactly as
the model was trained. Decoding 58,000 JPEGs costs seconds, so the arrays are cached outside the run
directory, keyed on the files' names, sizes and modification times and on the target size.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile
import zipfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from pipeline.data import DataError

SUFFIXES = {".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
SPLITS = {"train": ("train",), "val": ("val", "validation"), "test": ("test",)}
RESIZE = "bilinear"  # Pillow's, antialiased when shrinking; recorded in the preprocessing the runner reads
MAX_UNREADABLE = 0.25  # above this share of unreadable files the folder is wrong, not a few files
CACHE_FORMAT = 1
CHUNK = 1000  # images per task handed to a decoding process
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}
FOLDER_LAYOUT = "one folder per class (DIR/cat/*.jpg, DIR/dog/*.jpg), or such folders under DIR/train and DIR/test"


def is_image_folder(path) -> bool:
    """Whether DIR looks like class folders (as opposed to MNIST / CIFAR array files)."""
    path = Path(path)
    return path.is_dir() and any(p.is_dir() and not _hidden(p.name) and p.name != "cifar-10-batches-py"
                                 for p in path.iterdir())


def _hidden(name: str) -> bool:
    return name.startswith((".", "_", "~"))  # .DS_Store, __MACOSX, ~$ lock files


def cache_dir() -> Path:
    if os.environ.get("EDGEPIPE_CACHE_DIR"):
        return Path(os.environ["EDGEPIPE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgepipe" / "decoded"


def discover(root: Path) -> tuple[tuple[str, ...], dict[str, list[tuple[str, int]]]]:
    """Class names and, per split present on disk, the sorted (relative path, label) of every image file."""
    if not root.is_dir():
        state = "is a file, not a directory" if root.exists() else "does not exist"
        raise DataError(f"--data-dir {root}: {state}; expected {FOLDER_LAYOUT}")
    split_dirs = {split: root / name for split, names in SPLITS.items() for name in names if (root / name).is_dir()}
    if "train" not in split_dirs:
        split_dirs = {"train": root}
    classes = _class_names(split_dirs["train"])
    files = {}
    for split, folder in split_dirs.items():
        found = _class_names(folder)
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise DataError(f"{folder}: class folder(s) {', '.join(unknown)} are not in {split_dirs['train']}; "
                            f"every split needs the same classes, rename or remove them")
        files[split] = [(str((folder / c / f).relative_to(root)), label)
                        for label, c in enumerate(classes) if (folder / c).is_dir()
                        for f in _images(folder / c)]
        empty = [c for c in found if not _images(folder / c)]
        if empty:
            raise DataError(f"{folder / empty[0]}: class folder holds no image files; add images "
                            f"({', '.join(sorted(SUFFIXES))}) or remove the folder")
    return classes, files


def _class_names(folder: Path) -> tuple[str, ...]:
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not _hidden(p.name))
    if not names:
        raise DataError(f"--data-dir {folder}: no class folders; expected {FOLDER_LAYOUT}")
    if len(names) == 1:
        raise DataError(f"{folder}: only one class folder ({names[0]}); a classifier needs at least two classes, "
                        f"add a folder per class")
    for name in names:
        stem = name.split(".")[0].lower()
        if (re.search(r'[<>:"/\\|?*\x00-\x1f]', name) or name != name.rstrip(". ") or stem in _WINDOWS_RESERVED):
            raise DataError(f"{folder / name}: class folder name {name!r} is not a valid file name on Windows "
                            f"(reserved name, trailing dot or space, or one of <>:\"/\\|?*); rename the folder: "
                            f"its name becomes the label in the bundle")
    return tuple(names)


def _images(folder: Path) -> list[str]:
    """Image files below a class folder (nested folders included), sorted, hidden and non-image files ignored."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not _hidden(d)]
        out += [os.path.relpath(os.path.join(dirpath, f), folder) for f in filenames
                if not _hidden(f) and Path(f).suffix.lower() in SUFFIXES]
    return sorted(out)


# ---- decoding, in parallel ----

def _decode_chunk(root: str, paths: list[str], preprocess: dict):
    """Worker: (uint8 images, readable mask, errors of the unreadable, original sizes) for one chunk."""
    from PIL import Image

    from device.core import load_image

    images, ok, errors, sizes = [], [], [], []
    for rel in paths:
        path = Path(root) / rel
        try:
            with Image.open(path) as img:
                sizes.append(f"{img.width}x{img.height}")
            images.append(load_image(path, preprocess))
            ok.append(True)
        except Exception as e:  # any damage Pillow reports: the file is skipped and listed
            ok.append(False)
            errors.append(f"{rel}: {' '.join(str(e).split())[:160]}")
    shape = (0, preprocess["height"], preprocess["width"], preprocess["channels"])
    return (np.stack(images) if images else np.zeros(shape, np.uint8)), ok, errors, sizes


def decode(root: Path, paths: list[str], preprocess: dict, workers: int | None = None):
    """Every path decoded, on every core for a large set; the in-process path avoids start-up for a few."""
    workers = workers or os.cpu_count() or 1
    chunks = [paths[i:i + CHUNK] for i in range(0, len(paths), CHUNK)] or [[]]
    if workers == 1 or len(chunks) == 1:
        parts = [_decode_chunk(str(root), c, preprocess) for c in chunks]
    else:
        import multiprocessing

        # spawn, not fork: the parent may already hold TensorFlow's threads, which fork can deadlock.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            parts = list(pool.map(_decode_chunk, [str(root)] * len(chunks), chunks, [preprocess] * len(chunks)))
    x = np.concatenate([p[0] for p in parts])
    ok = np.array([o for p in parts for o in p[1]], bool)
    return x, ok, [e for p in parts for e in p[2]], Counter(s for p in parts for s in p[3])


# ---- the cache ----

def cache_key(root: Path, paths: list[str], preprocess: dict) -> str:
    h = hashlib.sha256(json.dumps([CACHE_FORMAT, str(root.resolve()), preprocess["height"], preprocess["width"],
                                   preprocess["channels"], preprocess["resize"]]).encode())
    for rel in paths:
        st = os.stat(root / rel)
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _read_cache(path: Path, key: str, count: int, log):
    """The cached (x, ok, errors, sizes), or None; a damaged or foreign file is reported and ignored."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            meta = json.loads(str(npz["meta"]))
            x, ok = npz["x"], npz["ok"]
        if (meta.get("key") != key or ok.shape != (count,) or len(x) != int(ok.sum())
                or hashlib.sha256(np.ascontiguousarray(x)).hexdigest() != meta.get("sha256")):
            raise ValueError("contents do not match their checksum or the folder")
        return x, ok, meta["errors"], Counter(meta["sizes"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        log(f"decode cache {path} is unusable ({' '.join(str(e).split())[:120]}); decoding again")
        return None


def _write_cache(path: Path, key: str, x, ok, errors, sizes, log) -> None:
    meta = json.dumps({"key": key, "sha256": hashlib.sha256(np.ascontiguousarray(x)).hexdigest(),
                       "errors": errors, "sizes": dict(sizes)})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp", suffix=".npz")
        try:
            with os.fdopen(fd, "wb") as f:
                buf = io.BytesIO()
                np.savez(buf, x=x, ok=ok, meta=np.array(meta))
                f.write(buf.getbuffer())
            os.replace(tmp, path)  # readers see the old file or the whole new one, never half
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as e:
        log(f"decode cache not written to {path.parent} ({e.strerror or e}); the next build decodes again "
            f"(set EDGEPIPE_CACHE_DIR to a writable folder)")


def load_images(root: Path, paths: list[str], preprocess: dict, log=print):
    """(x, ok, errors, sizes, cache facts) for `paths` under `root`, from the cache when it is still valid."""
    key = cache_key(root, paths, preprocess)
    path = cache_dir() / f"{key}.npz"
    cached = _read_cache(path, key, len(paths), log)
    if cached is not None:
        return (*cached, {"path": str(path), "hit": True})
    x, ok, errors, sizes = decode(root, paths, preprocess)
    _write_cache(path, key, x, ok, errors, sizes, log)
    return x, ok, errors, sizes, {"path": str(path), "hit": False}


# ---- the dataset ----

def load_folder_dataset(name: str, root: Path, size: tuple[int, int, int], *, seed: int, validation_fraction: float,
                        expected_labels: tuple[str, ...] | None = None, log=print):
    """A Dataset from class folders: decoded (or cached), unreadable files skipped, split stratified by class."""
    from pipeline.data import Dataset, PreprocessSpec, _arrays_sha256

    classes, files = discover(root)
    if expected_labels is not None and classes != tuple(expected_labels):
        raise DataError(f"--data-dir {root}: class folders {', '.join(classes)}; expected {name}'s classes "
                        f"{', '.join(expected_labels)}; for classes of your own use --dataset folder")
    height, width, channels = size
    spec = PreprocessSpec(height, width, channels, labels=classes, resize=RESIZE)
    pre = spec.to_dict()
    paths = [rel for split in files.values() for rel, _ in split]
    x, ok, errors, sizes, cache = load_images(root, paths, pre, log)
    if not ok.any():
        raise DataError(f"--data-dir {root}: none of the {len(paths)} image files could be read (first: {errors[0]}); "
                        f"expected images Pillow reads (JPEG, PNG, BMP, WebP, TIFF...)")
    if (~ok).mean() > MAX_UNREADABLE:
        raise DataError(f"--data-dir {root}: {int((~ok).sum())} of {len(paths)} image files are unreadable "
                        f"(first: {errors[0]}); fix or remove them")
    if errors:
        log(f"skipped {len(errors)} unreadable image(s): " + "; ".join(errors[:5]) + ("; ..." if len(errors) > 5 else ""))
    target = f"{width}x{height}"
    if set(sizes) != {target}:
        common = ", ".join(f"{s} ({n})" for s, n in sizes.most_common(3))
        log(f"resized images of {len(sizes)} size(s) (most common: {common}) to {height}x{width} ({RESIZE})")

    # Rows of x are the readable files in `paths` order; split them back out per split.
    labels = np.array([label for split in files.values() for _, label in split], np.int64)
    index = np.cumsum(ok) - 1
    bounds = np.cumsum([0] + [len(v) for v in files.values()])
    parts = {}
    for (split, _), lo, hi in zip(files.items(), bounds[:-1], bounds[1:]):
        keep = np.flatnonzero(ok[lo:hi]) + lo
        parts[split] = (x[index[keep]], labels[keep])
    rng = np.random.default_rng(seed)
    for split in ("test", "val"):  # what has no folder of its own is drawn from train, per class
        if split not in parts:
            parts["train"], parts[split] = _stratified_split(*parts["train"], validation_fraction, rng, classes, root)
    empty = [classes[c] for c in range(len(classes)) if not (parts["train"][1] == c).any()]
    if empty:
        raise DataError(f"{root}: class '{empty[0]}' has no readable training image; add images or remove the folder")

    counts = {split: {c: int((y == i).sum()) for i, c in enumerate(classes)} for split, (_, y) in parts.items()}
    source = {
        "kind": "image-folders", "folder": str(root), "files": [],
        "sha256": _arrays_sha256(parts["train"][0], parts["train"][1], parts["test"][0], parts["test"][1]),
        "counts": {split: len(parts[split][1]) for split in ("train", "val", "test")},
        "per_class": counts, "image_size": f"{height}x{width}", "channels": channels, "resize": RESIZE,
        "split": {s: ("folder" if s in files else f"stratified from train, seed {seed}") for s in ("val", "test")},
        "original_sizes": dict(sizes.most_common(5)),
        "skipped": {"count": len(errors), "first": errors[:10]},
        "decode_cache": cache,
    }
    return Dataset(name, *parts["train"], *parts["val"], *parts["test"], spec, source)


def _stratified_split(x, y, fraction: float, rng, classes, root):
    """(kept, drawn): `fraction` of each class, at least one image, drawn at random with `rng`."""
    drawn = []
    for c in range(len(classes)):
        members = np.flatnonzero(y == c)
        take = max(1, round(len(members) * fraction))
        if len(members) - take < 1:
            raise DataError(f"{root}: class '{classes[c]}' has {len(members)} readable image(s), too few to split "
                            f"into training, validation and test; add images or provide val/ and test/ folders")
        drawn.append(rng.permutation(members)[:take])
    drawn = np.sort(np.concatenate(drawn))
    kept = np.setdiff1d(np.arange(len(y)), drawn)
    return (x[kept], y[kept]), (x[drawn], y[drawn])
