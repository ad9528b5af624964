"""What went wrong, decided in one place: an interruption, the user's input, the machine, or a bug.

build.py asks before it deletes anything (only the user's input throws a staging folder away); cli.py
asks to choose the exit code and the one line. Ctrl-C inside TensorFlow can come back as an unrelated
error (seen: "ValueError: None values not supported"), so while a command runs under `ctrl_c()` the
signal itself is remembered and wins over whatever exception it turned into.
"""
from __future__ import annotations

import contextlib
import errno
import os
import signal
from pathlib import Path

INTERRUPTED, INPUT, MACHINE, BUG = "interrupted", "input", "machine", "bug"

_signalled: list[int] = []


def user_errors() -> tuple[type, ...]:
    """The exception types that mean 'your input', not 'our bug'; imported lazily to keep --help fast."""
    import click

    from device.core import DeviceError
    from pipeline.artifacts import RunDirError
    from pipeline.boards.deploy import DeployError
    from pipeline.boards.devices import DeviceError as BoardNameError
    from pipeline.build import AccuracyDropError
    from pipeline.config import ConfigError
    from pipeline.convert import ConversionError
    from pipeline.data import DataError
    from pipeline.micro.export import ExportError
    from pipeline.report.compare import CompareError
    from pipeline.report.render import ReportError
    from pipeline.ship.bundle import BundleError
    from pipeline.train import ModelMismatchError

    return (click.ClickException, ConfigError, DeviceError, RunDirError, DataError, ModelMismatchError, ReportError,
            ConversionError, BundleError, DeployError, BoardNameError, ExportError, CompareError, AccuracyDropError)


def kind(error: BaseException) -> str:
    """INTERRUPTED, INPUT (the user's data, files or options), MACHINE (a full or read-only disk, a link
    loop: `os_problem` says which) or BUG."""
    from pipeline.boards.deploy import Interrupted as DeployInterrupted  # boards stopped after a Ctrl-C

    if _signalled or isinstance(error, (KeyboardInterrupt, DeployInterrupted)):
        return INTERRUPTED
    if isinstance(error, user_errors()):
        return INPUT
    if os_problem(error):
        return MACHINE
    return BUG


@contextlib.contextmanager
def ctrl_c():
    """Remember a Ctrl-C while the body runs. A SIGINT ignored by whoever started us (`nohup`, a script's
    background job) stays ignored, and a handler set outside Python (None) stays too."""
    def on_sigint(signum, frame):
        _signalled.append(signum)
        raise KeyboardInterrupt

    previous = signal.getsignal(signal.SIGINT)
    ours = previous not in (signal.SIG_IGN, None)
    _signalled.clear()
    if ours:
        signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        if ours:
            signal.signal(signal.SIGINT, previous)


def os_problem(error: BaseException) -> str | None:
    """One line for an OS error the user can fix (naming the path and the fix), else None."""
    if not isinstance(error, OSError):
        return None
    path = error.filename or "a file"
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left on the disk that holds {path}; free some space there "
                f"(`df -h {Path(path).parent}`) or write somewhere else with --out")
    if error.errno == errno.EROFS:
        return f"{path} is on a read-only file system; run from a writable folder or pass --out DIR on a writable disk"
    if error.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied: {path}; pass --out DIR in a folder you can write, or fix the folder's permissions"
    if error.errno == errno.ELOOP:
        link = _looping_link(str(path))
        if link:
            return (f"{link} is a symbolic link that leads back to {os.path.realpath(link)}, so the folder never "
                    "ends; remove that link or point it elsewhere")
        return f"{path}: too many levels of symbolic links; remove the link that loops"
    return None


def _looping_link(path: str) -> str | None:
    """The first symbolic link on `path` that points at one of its own ancestors (or itself)."""
    parts = Path(path).parts
    for i in range(1, len(parts) + 1):
        prefix = Path(*parts[:i])
        try:
            if not prefix.is_symlink():
                continue
            target = os.path.realpath(prefix)
        except OSError:
            continue
        here = os.path.realpath(prefix.parent)
        if here == target or here.startswith(target.rstrip("/") + "/"):
            return str(prefix)
    return None
