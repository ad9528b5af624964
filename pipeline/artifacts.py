"""The run directory: a kernel lock, atomic writes, a manifest that explains every file, atomic swaps.

Beside a run NAME live, hidden, only while something happens to it:
  .NAME.lock     the lock file; `flock` on it is held by whoever builds or changes NAME. The kernel
                 releases it when the holder dies, so a lock is never stale; the pid inside is only
                 for the message.
  .NAME.partial  the staging folder of a build; `--resume` continues it.
  .NAME.update   a copy of the finished run that `report`, `benchmark` or `analyze` is changing.
  .NAME.swap     the other half of a swap in progress.
A build or an update ends by swapping its folder into place (Linux `renameat2(RENAME_EXCHANGE)`:
the old run or the new one is at NAME at every instant). Whatever a killed process left is
recovered or removed by the next one that takes the lock.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import json
import os
import shutil
import tempfile
import time
from pathlib import Path, PurePosixPath

import pipeline

# check_replaceable is re-exported: `bundle --out`, `runner.py unpack` and exports call it too.
from device.integrity import UMASK, check_replaceable, sha256_file, written_by_edgepipe  # noqa: F401
from pipeline.failures import InputError

MANIFEST = "manifest.json"
LOG = "build.log"  # grows after the manifest is written (the last lines), so it is not hashed
PROGRESS = ".progress.json"
REQUEST = ".request.json"
CREATED_BY = f"edgepipe {pipeline.__version__}"

# mkstemp makes 0600 files; run folders follow the user's umask (read once, in device.integrity).
FILE_MODE = 0o666 & ~UMASK


class RunDirError(InputError):
    """The run directory cannot be used as asked (exists, locked, not ours); the message says what to do."""


class RunChangedError(RunDirError):
    """A finished run's files no longer match its manifest: no command builds on it or records it again."""


# ---------------------------------------------------------------- names (the one place for them)

def _named(final: Path) -> Path:
    """The path itself, or its absolute form where it has no name of its own (".", "..", "runs/")."""
    final = Path(final)
    return final if final.name not in ("", ".", "..") else Path(os.path.abspath(final))


def _sibling(final: Path, kind: str) -> Path:
    final = _named(final)
    return final.parent / f".{final.name}.{kind}"


def staging_dir(final: Path) -> Path:
    return _sibling(final, "partial")


# Where a run named only by its name lives (`--name NAME`, `--resume NAME`, `pipeline compare NAME`).
RUNS = Path("artifacts")
CHECKPOINT = ".train-checkpoint.npz"  # hidden: the training's bookkeeping in a staging folder, never part of a run


def resume_target(final: Path) -> str:
    """What `--resume` takes for this run: its name when it lives in artifacts/, else its path."""
    if final.parent == RUNS:
        return final.name
    return str(final) if "/" in str(final) else f"./{final}"


def run_name(folder: Path) -> str:
    """The run's name, also from its staging or update folder."""
    name = Path(folder).name
    for kind in ("partial", "update", "swap"):
        if name.startswith(".") and name.endswith(f".{kind}"):
            return name[1:-len(kind) - 1]
    return name


def is_staging(folder: Path) -> bool:
    name = Path(folder).name
    return name.startswith(".") and name.endswith(".partial")


def is_run(folder: Path) -> bool:
    return written_by_edgepipe(folder) == "run"


def run_holding(path: Path) -> Path | None:
    """The finished run that path is (or would be) inside, if any: what is written there is not the run's."""
    for folder in [Path(os.path.realpath(path)), *Path(os.path.realpath(path)).parents]:
        if is_run(folder):
            return folder
    return None


# ---------------------------------------------------------------- files

def atomic_write(path: Path, data: bytes | str) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over the target."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)
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


def file_table(root: Path, verified: dict | None = None) -> dict:
    """Size and sha256 of every file under root except the manifest and hidden (temporary) files; a
    file `verified` (see check_files) whose stat has not changed since keeps its entry unhashed."""
    out, verified = {}, verified or {}
    for p in sorted(Path(root).rglob("*")):
        rel = p.relative_to(root).as_posix()
        hidden = any(part.startswith(".") for part in p.relative_to(root).parts)
        if p.is_file() and rel not in (MANIFEST, LOG) and not hidden:
            known = verified.get(rel)
            out[rel] = known[1] if known and known[0] == _signature(p) else file_entry(p)
    return out


# ---------------------------------------------------------------- the lock

class RunLock:
    """`flock` on .NAME.lock: one writer per run, released by the kernel when its holder dies."""

    def __init__(self, final: Path, doing: str):
        # Every name of a run (a symbolic link to it, a path through one) takes the one lock beside it.
        self.final, self.doing = Path(os.path.realpath(final)), doing
        self.path = _sibling(self.final, "lock")
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                holder = self._holder(fd)
                os.close(fd)
                raise RunDirError(
                    f"another {holder} is writing {self.final} right now; wait for it or choose another --name "
                    f"(the system releases the lock {self.path} when that process ends; if no such process "
                    "runs and it stays, as on a network file system without flock, delete that file)")
            # The holder before us may have unlinked the file after we opened it: lock the file that is there.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        note = f"{self.doing} (pid {os.getpid()})\n".encode()
        os.pwrite(fd, note, 0)
        os.ftruncate(fd, len(note))
        self.fd = fd
        return self

    @staticmethod
    def _holder(fd: int) -> str:
        # The holder writes its note just after taking the lock: give it a moment.
        for _ in range(50):
            note = os.pread(fd, 200, 0).decode(errors="replace").strip()
            if note:
                return note
            time.sleep(0.01)
        return "edgepipe process"

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            # Unlinked while still held, so the next process never locks a file nobody else can see.
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            os.close(self.fd)
            self.fd = None


# ---------------------------------------------------------------- swapping a folder into place

_RENAME_NOREPLACE, _RENAME_EXCHANGE, _AT_FDCWD = 1, 2, -100


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux renameat2; False where the system or file system lacks it (then the caller falls back)."""
    libc_name = ctypes.util.find_library("c")
    fn = getattr(ctypes.CDLL(libc_name, use_errno=True), "renameat2", None) if libc_name else None
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def swap_into_place(folder: Path, final: Path) -> None:
    """Move a finished folder to `final`, replacing the run there. Call with the run's lock held."""
    final = _named(final)
    swap = _sibling(final, "swap")
    if not final.exists():
        if not _renameat2(folder, final, _RENAME_NOREPLACE):
            os.rename(folder, final)
        return
    # First under the swap name: from here on, .NAME.swap beside a run at NAME is always a whole run
    # (the new one before the exchange, the old one after it), so recovery may simply delete it.
    os.rename(folder, swap)
    if not _renameat2(swap, final, _RENAME_EXCHANGE):
        # Without an exchange there is a moment with no run at NAME; recover() puts the old one back.
        tmp = _sibling(final, "swap-new")
        os.rename(swap, tmp)
        os.rename(final, swap)
        os.rename(tmp, final)
    shutil.rmtree(swap, ignore_errors=True)


def recover(final: Path, log=print) -> None:
    """Finish or undo what a killed process left beside `final`. Call with the run's lock held."""
    final = _named(final)
    swap, swap_new, update = _sibling(final, "swap"), _sibling(final, "swap-new"), _sibling(final, "update")
    if not final.exists():
        for candidate in (swap, swap_new):
            if candidate.is_dir() and is_run(candidate):
                log(f"restoring {final} from an interrupted swap")
                os.rename(candidate, final)
                break
    for leftover in (swap, swap_new, update):
        if leftover.exists():
            shutil.rmtree(leftover, ignore_errors=True)


# ---------------------------------------------------------------- a build's staging folder

class RunDir:
    """Staging folder for one build, locked for its whole life; `commit()` swaps it into place."""

    def __init__(self, final: Path, *, overwrite: bool = False, resume: bool = False, log=print):
        self.final = _named(final)
        self.staging = staging_dir(self.final)
        self.resumed = False
        self._check_final(overwrite, resume)  # touches nothing when it refuses
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.lock = RunLock(self.final, "build").__enter__()
        try:
            recover(self.final, log)
            self._check_final(overwrite, resume)  # again: another build may have finished meanwhile
            if self.staging.exists():
                if resume:
                    self.resumed = True
                    log(f"resuming the interrupted build in {self.staging}")
                else:
                    self._check_abandonable(overwrite)
                    log(f"removing the leftovers of an interrupted build in {self.staging} "
                        "(pass --resume to continue it instead)")
                    shutil.rmtree(self.staging)
            self.staging.mkdir(exist_ok=True)
        except BaseException:
            self.lock.__exit__()
            raise

    def _check_final(self, overwrite: bool, resume: bool) -> None:
        if not (self.final.exists() or self.final.is_symlink()):
            return
        if not overwrite and not resume:
            raise RunDirError(f"run directory {self.final} already exists; pass --overwrite to replace it "
                              "or --name/--out to build elsewhere")
        try:
            check_replaceable(self.final, "--overwrite")
        except Exception as e:
            raise RunDirError(str(e)) from None
        # check_replaceable also passes a bundle and an unpacked bundle (where a board's eval.json may
        # lie): edgepipe wrote them, but a build replaces only a run.
        if not is_run(self.final):
            raise RunDirError(f"{self.final}: a {written_by_edgepipe(self.final)} written by `pipeline bundle`, not a "
                              "run directory; --overwrite replaces only a run (a folder with edgepipe's "
                              "manifest.json); choose another --out or move it away yourself")

    def _check_abandonable(self, overwrite: bool) -> None:
        """Refuse to throw away what `--resume` continues from (finished stages, a training checkpoint)
        unless --overwrite asks to start over; a build killed before either left nothing worth keeping."""
        kept = self.resumable()
        if overwrite or not kept:
            return
        raise RunDirError(f"{self.final}: an interrupted build of it is in {self.staging} ({'; '.join(kept)}); "
                          f"continue it with `pipeline build --resume {resume_target(self.final)}`, or pass "
                          "--overwrite to start over and discard it")

    def resumable(self) -> list[str]:
        """What `--resume` would continue from here (finished stages, a training checkpoint), in words."""
        kept = [f"finished stages: {', '.join(self.progress())}"] if self.progress() else []
        return kept + (["a training checkpoint"] if self.path(CHECKPOINT).exists() else [])

    def path(self, name: str) -> Path:
        return self.staging / name

    def write(self, name: str, data: bytes | str) -> Path:
        atomic_write(self.path(name), data)
        return self.path(name)

    def write_json(self, name: str, obj) -> Path:
        write_json(self.path(name), obj)
        return self.path(name)

    # Progress lets `--resume` skip finished stages. Each entry lists the files the stage wrote and
    # the inputs it was made from (data hash, source model hash, shaping options), so a resumed build
    # reuses only what still verifies and was made from the same inputs.
    def progress(self) -> dict:
        try:
            return json.loads(self.path(PROGRESS).read_text())
        except (OSError, ValueError):
            return {}

    def stage_done(self, stage: str, files: list[str], info: dict | None = None, inputs: dict | None = None) -> None:
        prog = self.progress()
        prog[stage] = {"files": {f: file_entry(self.path(f)) for f in files}, "info": info or {},
                       "inputs": inputs or {}}
        self.write_json(PROGRESS, prog)

    def reusable(self, stage: str, inputs: dict | None = None, files: list[str] = ()) -> dict | None:
        """The record of a finished stage made from these inputs, whose files (and `files`) are intact."""
        entry = self.progress().get(stage)
        if entry is None or entry.get("inputs", {}) != (inputs or {}) or not set(files) <= set(entry["files"]):
            return None
        for name, want in entry["files"].items():
            p = self.path(name)
            if not p.is_file() or file_entry(p) != want:
                return None
        return entry

    def request(self, until: str | None) -> str:
        """The last stage asked for: given by a new build, read back by a resumed one."""
        if until is None:
            try:
                return json.loads(self.path(REQUEST).read_text())["until"]
            except (OSError, ValueError, KeyError):
                return "report"
        self.write_json(REQUEST, {"until": until})
        return until

    def commit(self, manifest: dict) -> Path:
        """Write the manifest (hashes of every file) and swap the run into place."""
        manifest["files"] = file_table(self.staging)
        self.write_json(MANIFEST, manifest)
        # Hidden files are bookkeeping (progress) or the temporaries of writes an interrupted attempt
        # never finished: none belongs in the finished run, and none is in the manifest.
        for hidden in sorted(self.staging.rglob(".*"), reverse=True):
            if hidden.is_dir() and not hidden.is_symlink():
                shutil.rmtree(hidden, ignore_errors=True)
            else:
                hidden.unlink(missing_ok=True)
        swap_into_place(self.staging, self.final)
        self.lock.__exit__()
        return self.final

    def abandon(self) -> None:
        """Release the lock but keep the staging folder, so `--resume` can continue."""
        self.lock.__exit__()

    def discard(self) -> Path | None:
        """The build failed: nothing to resume, so the staging folder goes. Its build.log is kept beside
        the run as NAME.failed.log (for a bug, it holds the traceback); returns that path, if any."""
        log, kept = self.staging / LOG, self.final.parent / f"{self.final.name}.failed.log"
        try:
            os.replace(log, kept)
        except OSError:
            kept = None
        shutil.rmtree(self.staging, ignore_errors=True)
        self.lock.__exit__()
        return kept


# ---------------------------------------------------------------- a finished run against its manifest

# At most this many problems are named in the one-line refusal; `pipeline verify` lists them all.
NAMED_PROBLEMS = 5


def read_manifest(run_dir: Path) -> tuple[dict | None, str | None]:
    """(the run's manifest, None), or (None, the one-line problem) when it has none with a file table."""
    try:
        manifest = json.loads((Path(run_dir) / MANIFEST).read_text())
    except FileNotFoundError:
        return None, f"{MANIFEST}: missing; {run_dir} is not a run directory written by `pipeline build`"
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return None, f"{MANIFEST}: not readable JSON ({e})"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files:
        return None, f"{MANIFEST}: has no file table; the build that wrote it did not finish"
    return manifest, None


def check_files(run_dir: Path) -> tuple[list[str], dict]:
    """(problems, verified) for a run's files against its manifest: a line for each listed file that is
    missing or differs in size or sha256 and for each file present but not listed (hidden files and
    the build log excepted); `verified` maps each intact file to (its stat signature, its entry)."""
    run_dir = Path(run_dir)
    manifest, problem = read_manifest(run_dir)
    if problem:
        return [problem], {}
    files = manifest["files"]
    problems, verified = [], {}
    for rel, want in files.items():
        problem = _check_file(run_dir, rel, want)
        if problem:
            problems.append(problem)
        else:
            path = run_dir.joinpath(*PurePosixPath(rel).parts)
            verified[rel] = (_signature(path), {"bytes": want["bytes"], "sha256": want["sha256"]})
    for p in sorted(run_dir.rglob("*")):
        parts = p.relative_to(run_dir).parts
        if any(part.startswith(".") for part in parts):
            continue
        rel = PurePosixPath(*parts).as_posix()
        # A build writes no links; one to a folder would hide its files from this walk, while the
        # listed files are read through it.
        if p.is_symlink():
            problems.append(f"{rel}: a symbolic link; a run holds only the files and folders its build wrote")
        elif p.is_file() and rel not in (MANIFEST, LOG) and rel not in files:
            problems.append(f"{rel}: present but not listed in {MANIFEST}")
    return problems, verified


def _check_file(root: Path, rel: str, want) -> str | None:
    parts = PurePosixPath(rel).parts
    if not parts or PurePosixPath(rel).is_absolute() or ".." in parts:
        return f"{rel}: listed in {MANIFEST} with a path outside the run directory"
    if not isinstance(want, dict) or not isinstance(want.get("bytes"), int) or not isinstance(want.get("sha256"), str):
        return f"{rel}: its {MANIFEST} entry has no size and sha256"
    path = root.joinpath(*parts)
    if not path.is_file():
        return f"{rel}: missing"
    size = path.stat().st_size
    if size != want["bytes"]:
        return f"{rel}: {size} bytes, {MANIFEST} says {want['bytes']}"
    actual = sha256_file(path)
    if actual != want["sha256"]:
        return f"{rel}: sha256 {actual[:12]}... does not match {want['sha256'][:12]}... in {MANIFEST}"
    return None


def _signature(path: Path) -> tuple:
    """What any write changes: a new file (atomic_write) has a new inode, a write in place a new ctime.
    A write it misses (in place, same size, within one clock tick of the check) keeps the old hash,
    so the run then fails `pipeline verify`: it errs closed, never blessing unchecked bytes."""
    st = path.stat()
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def check_unchanged(run_dir: Path, doing: str, shown: Path | None = None) -> dict:
    """Refuse, with RunChangedError, a run whose files differ from its manifest; else return the
    verified files (see check_files). `shown` names the run when run_dir is its working copy."""
    problems, verified = check_files(run_dir)
    if problems:
        shown = shown or run_dir
        named = "; ".join(problems[:NAMED_PROBLEMS])
        more = f"; and {len(problems) - NAMED_PROBLEMS} more" if len(problems) > NAMED_PROBLEMS else ""
        raise RunChangedError(
            f"{shown}: changed since it was written ({named}{more}); refusing to {doing} a run that no longer "
            f"matches its {MANIFEST} (`pipeline verify {shown}` lists the same); restore the files or rebuild "
            "the run with `pipeline build --overwrite`")
    return verified


# ---------------------------------------------------------------- changing a finished run

def update_manifest(run_dir: Path, changed: dict | None = None, verified: dict | None = None) -> dict:
    """Record what a step wrote: a file whose stat is still the one `verified` recorded keeps its
    manifest entry, and only the others (the step's own files) are hashed. Without `verified`, the
    run is checked first, so a file changed outside a step is refused, never recorded as the run's."""
    run_dir = Path(run_dir)
    if verified is None:
        verified = check_unchanged(run_dir, "record the changes to")
    manifest = json.loads((run_dir / MANIFEST).read_text())
    manifest.update(changed or {})
    manifest["files"] = file_table(run_dir, verified)
    write_json(run_dir / MANIFEST, manifest)
    return manifest


@contextlib.contextmanager
def updating(run_dir: Path, doing: str, log=print):
    """Change a finished run as one step: yields a copy to change; on success the copy, its manifest
    updated last, replaces the run. Interrupted or failed at any moment, the run is the old one.

    The copy is checked against the manifest before the step sees it: a run changed since it was
    written is refused (RunChangedError), so no later command can record an edit as the run's own.
    Afterwards only the files the step wrote are hashed again. A symbolic link to a run changes the run
    it points to: the copy and the swap happen beside the real folder, never in place of the link."""
    final = Path(os.path.realpath(run_dir))
    if not is_run(final):
        raise RunDirError(f"{final}: not a finished run (no edgepipe manifest.json); pass a run directory "
                          "written by `pipeline build`")
    with RunLock(final, doing):
        recover(final, log)
        work = _sibling(final, "update")
        try:
            shutil.copytree(final, work, symlinks=True)  # on a full disk too, the half copy goes
            verified = check_unchanged(work, doing, shown=final)
            changed: dict = {}
            yield work, changed
            update_manifest(work, changed, verified)
            swap_into_place(work, final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
