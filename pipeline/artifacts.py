"""The run directory: atomic writes, one writer at a time, a manifest that explains every file.

A build writes into a hidden staging folder `.<name>.partial` beside the final one and renames it
into place only when every stage has finished and the manifest is written. An interrupted build
therefore never leaves a run directory that looks complete; `--resume` picks the staging folder up.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path

from device.integrity import sha256_file

MANIFEST = "manifest.json"
PROGRESS = ".progress.json"
LOCK = ".lock"


class RunDirError(Exception):
    """The run directory cannot be used as asked (exists, locked); the message says what to do."""


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over the target."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def file_entry(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def file_table(root: Path) -> dict:
    """Size and sha256 of every file under root except the manifest and hidden (temporary) files."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel != MANIFEST and not any(part.startswith(".") for part in p.relative_to(root).parts):
            out[rel] = file_entry(p)
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM
    return True


class RunDir:
    """Staging folder for one build; `commit()` moves it into place."""

    def __init__(self, final: Path, *, overwrite: bool = False, resume: bool = False, log=print):
        self.final = Path(final)
        self.staging = self.final.parent / f".{self.final.name}.partial"
        self.resumed = False
        if self.final.exists() and not overwrite and not resume:
            raise RunDirError(f"run directory {self.final} already exists; pass --overwrite to replace it "
                              "or --name/--out to build elsewhere")
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self._lock(resume, log)

    def _lock(self, resume: bool, log) -> None:
        # Create the staging folder with our lock already inside and rename it into place: the
        # rename fails if another build got there first, so two builds never share one folder.
        fresh = Path(tempfile.mkdtemp(dir=self.final.parent, prefix=f".{self.final.name}.new-"))
        (fresh / LOCK).write_text(str(os.getpid()))
        try:
            os.rename(fresh, self.staging)
            return
        except OSError:
            shutil.rmtree(fresh)
        holder = self._lock_holder()
        if holder is not None and holder != os.getpid() and _pid_alive(holder):
            raise RunDirError(f"another build (pid {holder}) is writing {self.final} right now; "
                              "wait for it or choose another --name")
        if resume:
            self.resumed = True
            log(f"resuming the interrupted build in {self.staging}")
        else:
            log(f"removing the leftovers of an interrupted build in {self.staging} "
                "(pass --resume to continue it instead)")
            shutil.rmtree(self.staging)
            self.staging.mkdir()
        atomic_write(self.staging / LOCK, str(os.getpid()))

    def _lock_holder(self) -> int | None:
        try:
            return int((self.staging / LOCK).read_text().strip())
        except (OSError, ValueError):
            return None

    def path(self, name: str) -> Path:
        return self.staging / name

    def write(self, name: str, data: bytes | str) -> Path:
        atomic_write(self.path(name), data)
        return self.path(name)

    def write_json(self, name: str, obj) -> Path:
        write_json(self.path(name), obj)
        return self.path(name)

    # Progress lets `--resume` skip finished stages; each entry lists the files the stage wrote
    # with their hashes, so a resumed build reuses only what still verifies.
    def progress(self) -> dict:
        try:
            return json.loads(self.path(PROGRESS).read_text())
        except (OSError, ValueError):
            return {}

    def stage_done(self, stage: str, files: list[str], info: dict | None = None) -> None:
        prog = self.progress()
        prog[stage] = {"files": {f: file_entry(self.path(f)) for f in files}, "info": info or {}}
        self.write_json(PROGRESS, prog)

    def reusable(self, stage: str) -> dict | None:
        """The record of a finished stage whose files are all still intact, else None."""
        entry = self.progress().get(stage)
        if entry is None:
            return None
        for name, want in entry["files"].items():
            p = self.path(name)
            if not p.is_file() or file_entry(p) != want:
                return None
        return entry

    def commit(self, manifest: dict) -> Path:
        """Write the manifest (hashes of every file) and move the run into place."""
        manifest["files"] = file_table(self.staging)
        self.write_json(MANIFEST, manifest)
        # Hidden files are bookkeeping (progress, lock) or the temporaries of writes an interrupted
        # attempt never finished: none belongs in the finished run, and none is in the manifest. The
        # lock goes last, once the run is in place, so no other build takes the folder meanwhile.
        for hidden in sorted(self.staging.rglob(".*"), reverse=True):
            if hidden == self.path(LOCK):
                continue
            if hidden.is_dir() and not hidden.is_symlink():
                shutil.rmtree(hidden, ignore_errors=True)
            else:
                hidden.unlink(missing_ok=True)
        trash = None
        if self.final.exists():
            trash = self.final.parent / f".{self.final.name}.old-{os.getpid()}"
            os.replace(self.final, trash)
        os.replace(self.staging, self.final)
        (self.final / LOCK).unlink(missing_ok=True)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        return self.final

    def abandon(self) -> None:
        """Drop the lock but keep the staging folder, so `--resume` can continue."""
        self.path(LOCK).unlink(missing_ok=True)


def update_manifest(run_dir: Path, changed: dict | None = None) -> dict:
    """Re-hash every file of an existing run after a stage rewrote some (benchmark, report)."""
    run_dir = Path(run_dir)
    manifest = json.loads((run_dir / MANIFEST).read_text())
    manifest.update(changed or {})
    manifest["files"] = file_table(run_dir)
    write_json(run_dir / MANIFEST, manifest)
    return manifest


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a))


@contextlib.contextmanager
def updating(run_dir: Path):
    """A copy of a finished run to change; when the block succeeds it replaces the run in one step.

    A kill at any moment leaves the run as it was or as it became, never half of each, so a run
    that verified before still verifies. Updates of one run wait for each other (a lock file beside
    it); what an interrupted update left behind is removed by the next one.
    """
    run_dir = Path(run_dir)
    parent, name = run_dir.parent, run_dir.name
    with open(parent / f".{name}.update-lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for stale in parent.glob(f".{name}.update-*"):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
        stage = Path(tempfile.mkdtemp(dir=parent, prefix=f".{name}.update-"))
        try:
            shutil.copytree(run_dir, stage, symlinks=True, dirs_exist_ok=True)
            yield stage
            if not _exchange(stage, run_dir):  # elsewhere: two renames, with a moment of no run in between
                os.replace(run_dir, stage.with_name(stage.name + "-old"))
                os.replace(stage, run_dir)
                stage = stage.with_name(stage.name + "-old")
        finally:
            shutil.rmtree(stage, ignore_errors=True)
