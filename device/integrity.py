"""Integrity: a model's bytes against the sha256 its metadata records, and safe extraction of a bundle.
Nothing here runs a model (device/verify.py does, through the core), so the core can import this.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import stat
from collections.abc import Callable
from pathlib import Path

METADATA_NAME = "metadata.json"
TFLITE_IDENTIFIER = b"TFL3"
# Smallest file that can hold a flatbuffer root offset, the identifier and a model table.
MIN_MODEL_BYTES = 16
# A model for an edge board far beyond this is a mistake, and reading it whole would hurt the board.
MAX_MODEL_BYTES = 512 * 1024 * 1024
# What a bundle may unpack to, checked on each member's header before a byte of it is written, so a
# decompression bomb or a sparse member claiming gigabytes is refused before it fills the disk. Far
# above a real bundle: a few MB of models, some 100 MB with the wheels of every board platform.
MAX_MEMBERS = 10_000
MAX_MEMBER_BYTES = MAX_MODEL_BYTES
MAX_TOTAL_BYTES = 2 * 1024 * 1024 * 1024
# Pillow's resampling filters by name, as metadata.json's preprocess "resize" gives them (the runner
# looks the name up in Pillow; this module does not import it).
RESIZE_FILTERS = ("nearest", "box", "bilinear", "hamming", "bicubic", "lanczos")


def _read_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (/proc, since 4.7).

    os.umask can only read by setting: between its two calls every file any thread creates gets
    mode 0666. Elsewhere that happens once, here, at import, before the program starts threads.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Read once at start-up: mkstemp and mkdtemp make private files and folders, and what we publish
# follows the user's umask like any other file. A program that changes its umask later (our tests
# do, in the child they start) does so before importing this.
UMASK = _read_umask()


class DeviceError(Exception):
    """A problem with the user's input (model, image, data); the message is one actionable line."""



def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def find_metadata(model_path: Path) -> Path | None:
    """The pipeline writes metadata.json beside every model, in run directories and bundles alike."""
    candidate = Path(model_path).resolve().parent / METADATA_NAME
    return candidate if candidate.is_file() else None


def load_metadata(path: Path) -> dict:
    try:
        meta = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DeviceError(f"{path}: not readable JSON metadata ({e}); rebuild it with `pipeline build`")
    if not isinstance(meta, dict) or not isinstance(meta.get("preprocess"), dict):
        raise DeviceError(f"{path}: metadata has no 'preprocess' section; rebuild it with `pipeline build`")
    problem = _unusable(meta)
    if problem:
        raise DeviceError(f"{path}: {problem}; rebuild it with `pipeline build`")
    return meta


def _unusable(meta: dict) -> str | None:
    """What in the metadata the runner could not use, said once here: used as it is, a damaged field
    failed far from its cause (a traceback in Pillow or numpy, or an image blamed for it)."""
    pre = meta["preprocess"]

    def shown(key: str, within: dict) -> str:
        return repr(within[key])[:40] if key in within else "missing"

    def whole(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    for key in ("height", "width"):
        if not whole(pre.get(key)):
            return f"preprocess '{key}' is {shown(key, pre)}, expected a whole number of pixels"
    if not whole(pre.get("channels")) or pre["channels"] not in (1, 3):
        return f"preprocess 'channels' is {shown('channels', pre)}, expected 1 (grayscale) or 3 (RGB)"
    for key in ("scale", "offset"):
        v = pre.get(key)
        if not (number(v) or isinstance(v, list) and len(v) == pre["channels"] and all(map(number, v))):
            return f"preprocess '{key}' is {shown(key, pre)}, expected a number, or one per channel"
    labels = pre.get("labels")
    if not (isinstance(labels, list) and labels and all(isinstance(label, str) for label in labels)):
        return f"preprocess 'labels' is {shown('labels', pre)}, expected a list of label names"
    if pre.get("resize", "bilinear") not in RESIZE_FILTERS:
        return f"preprocess 'resize' is {shown('resize', pre)}, expected one of {', '.join(RESIZE_FILTERS)}"
    if not isinstance(meta.get("models", {}), dict):
        return f"'models' is {shown('models', meta)}, expected an object naming each model file"
    return None


def read_model_bytes(path: Path, expected_sha256: str | None = None) -> bytes:
    """Read a model and refuse anything that is not plausibly a TFLite flatbuffer.

    The interpreter trusts its input; checking size and the `TFL3` identifier first turns an
    empty, truncated or wrong file into a clear error instead of a crash inside C++.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        raise DeviceError(f"{path}: cannot read model ({e.strerror}); pass an existing .tflite with --model")
    if not path.is_file():
        raise DeviceError(f"{path}: is not a file; pass a .tflite file with --model")
    if size < MIN_MODEL_BYTES:
        raise DeviceError(f"{path}: {size} bytes is too small to be a TFLite model; the file is empty or truncated")
    if size > MAX_MODEL_BYTES:
        raise DeviceError(f"{path}: {size} bytes is larger than the {MAX_MODEL_BYTES} byte limit for a model")
    data = path.read_bytes()
    if data[4:8] != TFLITE_IDENTIFIER:
        raise DeviceError(f"{path}: not a TFLite model (no 'TFL3' identifier at byte 4); pass a .tflite file")
    root = int.from_bytes(data[0:4], "little")
    if root < 8 or root + 4 > size:
        raise DeviceError(f"{path}: corrupt TFLite model (root offset {root} outside the {size} byte file)")
    if expected_sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected_sha256:
            raise DeviceError(
                f"{path}: sha256 {actual[:12]}... does not match {expected_sha256[:12]}... in the metadata; "
                "the file was changed or damaged since it was written; "
                + ("rebuild the run" if (path.parent / "manifest.json").is_file() else "copy the bundle again")
            )
    return data


def expected_sha256(model_path: Path, metadata: dict | None) -> str | None:
    """The sha256 the metadata records for this model, or None when nothing can vouch for its bytes."""
    models = metadata.get("models") if isinstance(metadata, dict) else None
    entry = models.get(Path(model_path).name) if isinstance(models, dict) else None
    sha = entry.get("sha256") if isinstance(entry, dict) else None
    return sha if isinstance(sha, str) and sha else None


def extract_bundle(archive: Path, dest: Path, *, keep: Callable[[Path], bool] | None = None,
                   max_members: int = MAX_MEMBERS, max_member_bytes: int = MAX_MEMBER_BYTES,
                   max_total_bytes: int = MAX_TOTAL_BYTES) -> Path:
    """Unpack a bundle: regular files and folders only, every one inside dest, within the size limits;
    refuse the whole archive for any member that is not, never skipping one.

    The members are checked here, and by tarfile's `data` filter too where Python has it (3.12, and
    3.8.17+ / 3.9.17+ / 3.11.4+): boards run Pythons without it (Raspberry Pi OS bullseye has 3.9.2),
    and there our own checks stand alone. It is unpacked into a hidden folder beside dest and renamed
    into place only when complete, so a failure leaves nothing behind: neither that folder nor the
    parent folders this call made. dest must not exist or be an empty folder. `keep`, when given, is
    asked about the folder in place; if it says no, the folder goes as on a failure (an empty dest is
    left empty), so what does not verify is not left to be used.
    """
    import shutil
    import tempfile

    archive, dest = Path(archive), Path(dest)
    if not archive.is_file():
        raise DeviceError(f"{archive}: no such bundle file; pass the .tar.gz written by `pipeline bundle`")
    if dest.is_symlink():
        raise DeviceError(f"{dest}: is a symbolic link, which the unpacked folder would replace; unpack into a new "
                          "folder, or into the folder the link points to by its own path")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise DeviceError(f"{dest}: already exists and is not an empty folder; unpack into a new folder")
    if dest.exists() and os.path.samefile(dest, os.curdir):
        # The folder is replaced by a rename: the shell that ran us would be left in a deleted folder.
        raise DeviceError(f"{dest}: is the current folder, which the unpacked folder would replace; unpack into a "
                          f"new folder, such as {dest / 'bundle'}")
    target = Path(os.path.abspath(dest))  # "." and "dir/.." have no name to put a hidden folder beside
    empty_mode = stat.S_IMODE(target.stat().st_mode) if target.is_dir() else None
    made, parent = [], target.parent  # the parent folders made here, deepest first
    while not os.path.lexists(parent):
        made.append(parent)
        parent = parent.parent
    if not parent.is_dir():
        raise DeviceError(f"{dest}: {parent} is not a folder; unpack into a folder elsewhere")
    tmp, placed = None, False

    def undo() -> None:
        if placed:
            shutil.rmtree(target, ignore_errors=True)
            if empty_mode is not None:
                target.mkdir()
                target.chmod(empty_mode)
        elif tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        for folder in made:
            try:
                folder.rmdir()
            except FileNotFoundError:  # a failed mkdir made the shallower ones only
                continue
            except OSError:  # something else was put there meanwhile: it stays, and so do its parents
                break

    try:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.unpack-"))
            _extract_checked(archive, tmp, dest, max_members, max_member_bytes, max_total_bytes)
            tmp.chmod(0o777 & ~UMASK)  # mkdtemp makes it 0700; the unpacked folder is the user's
            if target.is_dir():
                target.rmdir()
            os.rename(tmp, target)
            placed = True
        except OSError as e:
            raise DeviceError(f"{dest}: cannot unpack there ({e.strerror}); unpack into a folder you can write") \
                from None
        if keep is not None and not keep(dest):
            undo()
    except BaseException:
        undo()
        raise
    return dest


def written_by_edgepipe(path: Path) -> str | None:
    """What edgepipe wrote at path ('run', 'bundle folder', 'bundle'), or None if it cannot prove it wrote it.

    Proof is our own JSON: a run's manifest.json, or a bundle's metadata.json, with our schema and
    created_by. Commands that replace a user-named path (`--overwrite`, `bundle --out`, `unpack`)
    replace only these, because anything else may be a user's own files.
    """
    import tarfile

    path = Path(path)

    def ours(text) -> bool:
        try:
            doc = json.loads(text)
        except (ValueError, UnicodeDecodeError):
            return False
        if not isinstance(doc, dict) or doc.get("schema") != 1:
            return False
        # Runs of edgepipe 0.x before created_by was recorded name edgepipe among their versions.
        versions = doc.get("versions")
        return str(doc.get("created_by", "")).startswith("edgepipe ") or (
            isinstance(versions, dict) and "edgepipe" in versions)

    try:
        if path.is_dir():
            if (path / "manifest.json").is_file() and ours((path / "manifest.json").read_bytes()):
                return "run"
            if (path / METADATA_NAME).is_file() and ours((path / METADATA_NAME).read_bytes()):
                return "bundle folder"
            return None
        if path.is_file():
            with tarfile.open(path, "r:gz") as tar:
                member = tar.extractfile(METADATA_NAME)
                return "bundle" if member is not None and ours(member.read(1 << 20)) else None
    except (OSError, KeyError, EOFError, tarfile.TarError):
        return None
    return None


def check_replaceable(path: Path, flag: str = "--overwrite") -> None:
    """Refuse, touching nothing, to replace a path edgepipe cannot prove it wrote."""
    path = Path(path)
    if not (path.exists() or path.is_symlink()) or (not path.is_symlink() and written_by_edgepipe(path)):
        return
    what = "a symbolic link" if path.is_symlink() else "a folder" if path.is_dir() else "a file"
    raise DeviceError(f"{path}: {what} that edgepipe did not write (no edgepipe manifest.json or metadata.json); "
                      f"{flag} replaces only edgepipe's own output; choose another path or move it away yourself")


def _extract_checked(archive: Path, root: Path, dest: Path, max_members: int, max_member_bytes: int,
                     max_total_bytes: int) -> None:
    """Every member checked first (a file or folder, a relative path without '..', once, within the
    limits, passed by the data filter), each as its header is read; then written into root, streaming
    (`dest`: where the user asked for it, for the messages)."""
    import contextlib
    import tarfile
    import zlib
    from pathlib import PurePosixPath

    data_filter = getattr(tarfile, "data_filter", None)

    @contextlib.contextmanager
    def writing(member):
        # A full disk or a quota is not a damaged archive: say which it is, so the user frees space instead of
        # fetching the bundle again.
        try:
            yield
        except OSError as e:
            raise DeviceError(f"{dest}: cannot write the unpacked {member.name} ({e.strerror or e}); free space "
                              "there or unpack into another folder") from None

    def refuse(member, why: str) -> DeviceError:
        return DeviceError(f"{archive}: refused, member {member.name!r} {why}; "
                           "the archive is not a bundle written by `pipeline bundle`")

    try:
        with tarfile.open(archive, "r:gz") as tar:
            members, names, total = [], set(), 0
            for m in tar:  # header by header: a refusal stops before the next member is read
                path = PurePosixPath(m.name)
                if len(members) == max_members:
                    raise DeviceError(f"{archive}: refused, more than {max_members:,} members; the archive is not "
                                      "a bundle written by `pipeline bundle`")
                if not (m.isfile() or m.isdir()):
                    raise refuse(m, "is a link or a device, not a file or folder")
                if not path.parts or path.is_absolute() or ".." in path.parts:
                    raise refuse(m, "points outside the target folder")
                if path.as_posix() in names:
                    raise refuse(m, "appears twice")
                if m.size > max_member_bytes:
                    raise refuse(m, f"would unpack to {m.size:,} bytes, above the {max_member_bytes:,} byte limit "
                                    "for one file")
                total += m.size
                if total > max_total_bytes:
                    raise refuse(m, f"takes the unpacked size above the {max_total_bytes:,} byte limit")
                if data_filter is not None:
                    try:
                        data_filter(m, str(root))
                    except tarfile.FilterError as e:
                        raise refuse(m, f"is refused by tarfile's data filter ({e})") from None
                members.append(m)
                names.add(path.as_posix())
            for m in members:
                target = root.joinpath(*PurePosixPath(m.name).parts)
                with writing(m):
                    (target if m.isdir() else target.parent).mkdir(parents=True, exist_ok=True)
                if m.isdir():
                    continue
                with tar.extractfile(m) as src:
                    with writing(m):
                        dst = open(target, "wb")
                    try:
                        while chunk := src.read(1 << 20):  # a read error is the archive's, a write error the disk's
                            with writing(m):
                                dst.write(chunk)
                    finally:
                        with writing(m):
                            dst.close()
                with writing(m):
                    target.chmod(0o755 if m.mode & 0o111 else 0o644)
    except (OSError, tarfile.TarError, EOFError, zlib.error) as e:
        raise DeviceError(f"{archive}: not a readable .tar.gz bundle ({e})")
