"""Class-folder image sets: discovery, decoding on every core, resizing, and the decode cache.

DIR holds one folder per class, directly or under train/ (with optional val/ and test/). Class names
are the folder names in sorted order, which is also CIFAR-10's label order. Every image goes through
`device.images.read_image`, the function the runner uses on a board, so a photo is resized exactly as
the model was trained. Decoding 58,000 JPEGs costs seconds, so the arrays are cached outside the run
directory, keyed on the files' names, sizes and modification times and on the target size.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from device.images import IMAGE_EXTENSIONS
from pipeline import console
from pipeline.data.dataset import DataError
from pipeline.data.duplicates import duplicates

# The runner's list: a folder trains on exactly the files `runner.py eval` would read from it.
_SUFFIX_TUPLE = tuple(IMAGE_EXTENSIONS)
SPLITS = {"train": ("train",), "val": ("val", "validation"), "test": ("test",)}
RESIZE = "bilinear"  # Pillow's, antialiased when shrinking; recorded in the preprocessing the runner reads
MAX_UNREADABLE = 0.25  # above this share of unreadable files the folder is wrong, not a few files
# 2: the runner's decoding changed (a PNG's transparent colour flattened onto black, 16-bit images scaled by their
# depth): images cached by format 1 are decoded again.
CACHE_FORMAT = 2
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


def discover(root: Path) -> tuple[tuple[str, ...], dict[str, list[tuple[str, int, str]]]]:
    """Class names and, per split present on disk, the sorted (relative path, label, size:mtime) of each image."""
    if not root.is_dir():
        state = "is a file, not a directory" if root.exists() else "does not exist"
        raise DataError(f"--data-dir {root}: {state}; expected {FOLDER_LAYOUT}")
    present = {split: [n for n in names if (root / n).is_dir()] for split, names in SPLITS.items()}
    for split, names in present.items():
        if len(names) > 1:  # one of them would be read and the other silently left out
            raise DataError(f"{root}: both {' and '.join(f'{n}/' for n in names)} are there, for one {split} split; "
                            f"merge them into {names[0]}/")
    split_dirs = {split: names[0] for split, names in present.items() if names}
    if "train" not in split_dirs:
        if split_dirs:  # a test/ without train/ would be a class, its images training images
            raise DataError(f"{root}: {', '.join(f'{n}/' for n in split_dirs.values())} but no train/; expected "
                            f"{FOLDER_LAYOUT}: move the training class folders into {root / 'train'}")
        split_dirs = {"train": ""}
        _refuse_split_named_classes(root)
    classes = _class_names(root / split_dirs["train"])
    files = {}
    for split, sub in split_dirs.items():
        found = _class_names(root / sub)
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise DataError(f"{root / sub}: class folder(s) {', '.join(unknown)} are not in "
                            f"{root / split_dirs['train']}; every split needs the same classes, rename or remove them")
        files[split] = []
        for label, c in enumerate(classes):
            if c not in found:
                continue
            images = _images(root, f"{sub}/{c}" if sub else c)
            if not images:
                raise DataError(f"{root / sub / c}: class folder holds no image files; add images "
                                f"({', '.join(sorted(IMAGE_EXTENSIONS))}) or remove the folder")
            files[split] += [(rel, label, stamp) for rel, stamp in images]
    return classes, files


def _refuse_split_named_classes(root: Path) -> None:
    """Folders named like splits that hold no images of their own, only the same subfolders each
    (training_set/cat, test_set/cat: Kaggle's layout; Train/ and Test/) are splits, not classes: read as classes,
    the test images would be trained on."""
    tops = [p for p in root.iterdir() if p.is_dir() and not _hidden(p.name)]
    inner = []
    for top in tops:
        entries = [e for e in top.iterdir() if not _hidden(e.name)]
        if any(e.is_file() and e.suffix.lower() in IMAGE_EXTENSIONS for e in entries):
            return
        inner.append(frozenset(e.name for e in entries if e.is_dir()))
    named = any(re.search("train|test|val", p.name, re.IGNORECASE) for p in tops)  # not cat/2019, dog/2019
    if named and len(tops) > 1 and len(set(inner)) == 1 and len(inner[0]) > 1:
        raise DataError(f"{root}: the folders {', '.join(sorted(p.name for p in tops))} each hold the same folders "
                        f"({', '.join(sorted(inner[0]))}) and no images: splits, not classes; expected "
                        f"{FOLDER_LAYOUT}: rename them train/ and test/")


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


def _images(root: Path, folder: str) -> list[tuple[str, str]]:
    """(path relative to root, "size:mtime") of the image files below a class folder, nested ones included,
    sorted; hidden and non-image files are ignored. Plain strings: Path objects cost seconds at 58,000 files."""
    out, pending = [], [folder]
    while pending:
        sub = pending.pop()
        with os.scandir(os.path.join(root, sub)) as entries:
            for e in entries:
                if _hidden(e.name):
                    continue
                if e.is_dir():
                    pending.append(os.path.join(sub, e.name))
                elif e.name.lower().endswith(_SUFFIX_TUPLE):
                    st = e.stat()
                    out.append((f"{sub}/{e.name}", f"{st.st_size}:{st.st_mtime_ns}"))
    return sorted(out)


def survey(root: Path, samples: int = 24) -> dict | None:
    """What the default recipe needs to know before anything is decoded: how many training images, whether
    they are grayscale, their typical shorter side (from the headers of a few, spread over the classes).
    None when the folder cannot be read; the data stage then says what is wrong with it."""
    from PIL import Image

    try:
        _, files = discover(Path(root))
    except (DataError, OSError):
        return None
    train = files["train"]
    picked = train[:: max(1, len(train) // samples)][:samples]
    modes, sides = set(), []
    for rel, _, _ in picked:
        try:
            with Image.open(Path(root) / rel) as img:
                modes.add(img.mode)
                sides.append(min(img.size))
        except Exception:  # an unreadable file is the data stage's to report
            continue
    if not sides:
        return None
    return {"train_images": len(train) if len(files) > 1 else round(len(train) * 0.8),
            "grayscale": modes <= {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L"},
            "median_side": int(np.median(sides))}


# ---- decoding, in parallel ----

def _decode_chunk(root: str, paths: list[str], preprocess: dict):
    """Worker: (uint8 images, readable mask, errors of the unreadable, original sizes) for one chunk."""
    from device.core import DeviceError, read_image

    images, ok, errors, sizes = [], [], [], []
    for rel in paths:
        try:
            image, facts = read_image(os.path.join(root, rel), preprocess)
        except DeviceError as e:  # a damaged or non-image file: skipped and listed, not fatal
            ok.append(False)
            errors.append(str(e)[:200])
            continue
        images.append(image)
        ok.append(True)
        sizes.append(f"{facts['height']}x{facts['width']}")
    shape = (0, preprocess["height"], preprocess["width"], preprocess["channels"])
    return (np.stack(images) if images else np.zeros(shape, np.uint8)), ok, errors, sizes


def decode(root: Path, paths: list[str], preprocess: dict, workers: int | None = None):
    """Every path decoded, on every core for a large set; the in-process path avoids start-up for a few."""
    workers = workers or os.cpu_count() or 1
    chunks = [paths[i:i + CHUNK] for i in range(0, len(paths), CHUNK)] or [[]]
    parts = []
    with console.progress(f"decoding {root}", total=len(paths), unit="images") as bar:
        if workers == 1 or len(chunks) == 1:
            for c in chunks:
                parts.append(_decode_chunk(str(root), c, preprocess))
                bar.advance(len(c))
        else:
            import multiprocessing

            # spawn, not fork: the parent may already hold TensorFlow's threads, which fork can deadlock.
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                for c, part in zip(chunks, pool.map(_decode_chunk, [str(root)] * len(chunks), chunks,
                                                    [preprocess] * len(chunks))):
                    parts.append(part)
                    bar.advance(len(c))
    x = np.concatenate([p[0] for p in parts])
    ok = np.array([o for p in parts for o in p[1]], bool)
    return x, ok, [e for p in parts for e in p[2]], Counter(s for p in parts for s in p[3])


# ---- the cache ----

def cache_key(root: Path, files: list[tuple[str, int, str]], preprocess: dict) -> str:
    """Names, sizes and modification times of the files, and the size and colour they are decoded to."""
    h = hashlib.sha256(json.dumps([CACHE_FORMAT, str(root.resolve()), preprocess["height"], preprocess["width"],
                                   preprocess["channels"], preprocess["resize"]]).encode())
    h.update("\n".join(f"{rel}\0{stamp}" for rel, _, stamp in files).encode())
    return h.hexdigest()


def _read_cache(path: Path, key: str, count: int, log):
    """The cached (x, ok, errors, sizes, sha256), or None; a damaged or foreign cache is reported and ignored."""
    meta_path = path.with_suffix(".json")
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        x = np.load(path, allow_pickle=False)
        ok = np.ones(count, bool)
        ok[meta["unreadable"]] = False
        # The checksum catches a truncated or altered array, and an array from another build of the cache.
        if (meta.get("key") != key or x.dtype != np.uint8 or len(x) != int(ok.sum())
                or hashlib.sha256(x).hexdigest() != meta.get("sha256")):
            raise ValueError("its contents do not match their checksum or this folder")
        return x, ok, meta["errors"], Counter(meta["sizes"]), meta["sha256"]
    except (OSError, ValueError, KeyError, IndexError, TypeError, EOFError) as e:
        log(f"decode cache {path} is unusable ({' '.join(str(e).split())[:120]}); decoding again")
        return None


def _atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)  # readers see the old file or the whole new one, never half
    except BaseException:
        os.unlink(tmp)
        raise


def _write_cache(path: Path, key: str, x, ok, errors, sizes, sha256: str, log) -> None:
    meta = {"key": key, "sha256": sha256, "unreadable": np.flatnonzero(~ok).tolist(), "errors": errors,
            "sizes": dict(sizes)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # The array first, its description last: a crash in between leaves a checksum that does not match.
        _atomic(path, lambda f: np.save(f, x, allow_pickle=False))
        _atomic(path.with_suffix(".json"), lambda f: f.write(json.dumps(meta).encode()))
    except OSError as e:
        log(f"decode cache not written to {path.parent} ({e.strerror or e}); the next build decodes again "
            f"(set EDGEPIPE_CACHE_DIR to a writable folder)")


def load_images(root: Path, files: list[tuple[str, int, str]], preprocess: dict, log=print):
    """(x, ok, errors, sizes, sha256 of x, cache facts) for `files` under `root`, from the cache if still valid."""
    key = cache_key(root, files, preprocess)
    paths = [rel for rel, _, _ in files]
    path = cache_dir() / f"{key}.npy"
    cached = _read_cache(path, key, len(paths), log)
    if cached is not None:
        return (*cached, {"path": str(path), "hit": True})
    x, ok, errors, sizes = decode(root, paths, preprocess)
    sha256 = hashlib.sha256(x).hexdigest()
    _write_cache(path, key, x, ok, errors, sizes, sha256, log)
    return x, ok, errors, sizes, sha256, {"path": str(path), "hit": False}


# ---- the dataset ----

def load_folder_dataset(name: str, root: Path, size: tuple[int, int, int], *, seed: int, validation_fraction: float,
                        expected_labels: tuple[str, ...] | None = None, log=print):
    """A Dataset from class folders: decoded (or cached), unreadable files skipped, split stratified by class."""
    from pipeline.data.dataset import Dataset, PreprocessSpec

    classes, files = discover(root)
    if expected_labels is not None and classes != tuple(expected_labels):
        raise DataError(f"--data-dir {root}: class folders {', '.join(classes)}; expected {name}'s classes "
                        f"{', '.join(expected_labels)}; for classes of your own use --dataset folder")
    height, width, channels = size
    spec = PreprocessSpec(height, width, channels, labels=classes, resize=RESIZE)
    everything = [f for split in files.values() for f in split]
    x, ok, errors, sizes, x_sha256, cache = _decode(root, everything, spec.to_dict(), log)
    labels = np.array([label for _, label, _ in everything], np.int64)[ok]
    rows = _split_rows(files, ok, labels, classes, root, seed, validation_fraction)
    parts = {split: (x[r], labels[r]) for split, r in rows.items()}
    empty = [c for i, c in enumerate(classes) if not (parts["train"][1] == i).any()]
    if empty:
        raise DataError(f"{root}: class '{empty[0]}' has no readable training image; add images or remove the "
                        f"folder")

    counts = {split: {c: int((y == i).sum()) for i, c in enumerate(classes)} for split, (_, y) in parts.items()}
    _warn_imbalance(counts["train"], log)
    source = _source(root, files, labels, rows, counts, x_sha256, size, seed, sizes, errors, cache)
    twice = duplicates(x, labels, rows, [rel for (rel, _, _), read in zip(everything, ok) if read], log)
    if twice:
        source["duplicates"] = twice
    return Dataset(name, *parts["train"], *parts["val"], *parts["test"], spec, source)


def _decode(root: Path, everything: list, pre: dict, log):
    """load_images, refusing a folder that is mostly unreadable and saying what was skipped or resized."""
    x, ok, errors, sizes, x_sha256, cache = load_images(root, everything, pre, log)
    if not ok.any():
        raise DataError(f"--data-dir {root}: none of the {len(everything)} image files could be read "
                        f"(first: {errors[0]}); expected images Pillow reads (JPEG, PNG, BMP, WebP, TIFF...)")
    if (~ok).mean() > MAX_UNREADABLE:
        raise DataError(f"--data-dir {root}: {int((~ok).sum())} of {len(everything)} image files are unreadable "
                        f"(first: {errors[0]}); fix or remove them")
    if errors:
        more = "; ..." if len(errors) > 5 else ""
        log(f"skipped {len(errors)} unreadable image(s): " + "; ".join(errors[:5]) + more)
    target = f"{pre['height']}x{pre['width']}"
    if set(sizes) != {target}:
        common = ", ".join(f"{s} ({n})" for s, n in sizes.most_common(3))
        log(f"resized images of {len(sizes)} size(s) (most common: {common}) to {target} ({RESIZE})")
    return x, ok, errors, sizes, x_sha256, cache


def _split_rows(files: dict, ok, labels, classes, root: Path, seed: int, validation_fraction: float) -> dict:
    """Rows of x per split. Rows of x are the readable files in `files` order; a split without a folder
    of its own is drawn from train, per class."""
    ends = np.cumsum([len(f) for f in files.values()])
    bounds = [0] + [int(ok[:end].sum()) for end in ends]
    rows = {split: np.arange(lo, hi) for split, lo, hi in zip(files, bounds[:-1], bounds[1:])}
    rng = np.random.default_rng(seed)
    for split in ("test", "val"):
        if split not in rows:
            rows["train"], rows[split] = _stratified_split(rows["train"], labels, validation_fraction, rng,
                                                           classes, root)
    return rows


def _source(root: Path, files: dict, labels, rows: dict, counts: dict, x_sha256: str, size, seed: int, sizes,
            errors: list, cache) -> dict:
    """What the manifest says about where the images came from and how they were split."""
    from pipeline.data.dataset import _arrays_sha256

    height, width, channels = size
    return {
        "kind": "image-folders", "folder": str(root), "files": [],
        # The decoded pixels' hash (kept with the cache) with the labels and the split: hashing 180 MB again costs.
        "sha256": _arrays_sha256(np.frombuffer(bytes.fromhex(x_sha256), np.uint8), labels,
                                 *(rows[s] for s in ("train", "val", "test"))),
        "counts": {split: len(rows[split]) for split in ("train", "val", "test")},
        "per_class": counts, "image_size": f"{height}x{width}", "channels": channels, "resize": RESIZE,
        "split": {s: ("folder" if s in files else f"stratified from train, seed {seed}") for s in ("val", "test")},
        "original_sizes": dict(sizes.most_common(5)),
        "skipped": {"count": len(errors), "first": errors[:10]},
        "decode_cache": cache,
    }


# A class with this many times the images of another: a model can score well by favouring it.
IMBALANCE_RATIO = 3


def _warn_imbalance(train_counts: dict[str, int], log) -> None:
    big, small = max(train_counts, key=train_counts.get), min(train_counts, key=train_counts.get)
    if train_counts[big] >= IMBALANCE_RATIO * train_counts[small]:
        share = train_counts[big] / sum(train_counts.values())
        log(f"warning: the folder is imbalanced: '{big}' has {train_counts[big]} training images, '{small}' "
            f"{train_counts[small]}; always answering '{big}' would score {100 * share:.0f}%, so judge the accuracy "
            f"against that and each class's recall in the report, and add images of the small classes")


def _stratified_split(rows, labels, fraction: float, rng, classes, root):
    """(kept, drawn) rows: `fraction` of each class, at least one image, drawn at random with `rng`."""
    drawn = []
    for c in range(len(classes)):
        members = rows[labels[rows] == c]
        take = max(1, round(len(members) * fraction))
        if len(members) - take < 1:
            raise DataError(f"{root}: class '{classes[c]}' has {len(members)} readable image(s), too few to split "
                            f"into training, validation and test; add images or provide val/ and test/ folders")
        drawn.append(rng.permutation(members)[:take])
    drawn = np.sort(np.concatenate(drawn))
    return np.setdiff1d(rows, drawn), drawn
